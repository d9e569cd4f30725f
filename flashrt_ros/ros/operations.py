"""The capsule operations of a policy node: one table, and which event reports which call.

Every capsule operation has four names that must agree: the srv type (`flashrt_ros/srv/Fork`),
the service under the node (`~/fork`), the operation a CapsuleEvent on `~/capsule_events` names
(`fork`), which is also the `flashrt-ros` command. The node creates its services from this table,
and the CLI, the behaviour-tree behaviours, the bag player and the test clients look them up here.

The node publishes a CapsuleEvent for every operation it applies, just before its service answer.
rmw_fastrtps can lose that answer (docs/node.md, known issues), so a client takes the matching
event in its place (flashrt_ros.ros.client); `reports` is the rule for "matching".

No ROS imports: the srv classes are imported when `Operation.srv_type` is first read.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Operation:
    """One capsule operation of the node."""
    name: str               # as CapsuleEvent.operation names it (and the `flashrt-ros` command)
    srv: str                # the srv type's name in flashrt_ros.srv
    service: str            # the service's basename under the node: `<node>/<service>`
    names_capsule: bool     # the request's `name` field names the capsule the call acts on
    query: bool = False     # only reads: no CapsuleEvent reports it
    file_io: bool = False   # reads or writes capsule files (the node serves it on its disk group)

    @property
    def srv_type(self):
        """The rclpy srv class (flashrt_ros.srv.<srv>)."""
        return getattr(importlib.import_module("flashrt_ros.srv"), self.srv)


OPERATIONS = (
    Operation("snapshot", "Snapshot", "snapshot", names_capsule=True),
    Operation("restore", "Restore", "restore", names_capsule=True),
    Operation("fork", "Fork", "fork", names_capsule=True),
    Operation("rollback", "Rollback", "rollback", names_capsule=False),
    Operation("list", "ListCapsules", "list_capsules", names_capsule=False, query=True),
    Operation("delete", "DeleteCapsule", "delete_capsule", names_capsule=True),
    Operation("reset", "Reset", "reset", names_capsule=False),
    Operation("save", "SaveCapsule", "save_capsule", names_capsule=True, file_io=True),
    Operation("load", "LoadCapsule", "load_capsule", names_capsule=True, file_io=True),
)
BY_NAME = {op.name: op for op in OPERATIONS}
BY_SERVICE = {op.service: op for op in OPERATIONS}


def operation(name) -> Operation:
    """The operation called `name`: its event/command name ("delete") or its service basename
    ("delete_capsule"); an Operation is returned as it is."""
    if isinstance(name, Operation):
        return name
    op = BY_NAME.get(name) or BY_SERVICE.get(name)
    if op is None:
        raise KeyError(f"capsule operation {name!r}: expected one of {list(BY_NAME)} (or a service "
                       f"name: {list(BY_SERVICE)})")
    return op


def reports(event, operation_name: str, request) -> bool:
    """Does `event` report the operation `operation_name` on the capsule that `request` names?

    The event must name the same operation; for an operation whose request names a capsule, the
    event must name that capsule too (for rollback and reset any event of the operation matches).
    """
    if event.operation != operation_name:
        return False
    op = BY_NAME.get(operation_name)
    names = op is None or op.names_capsule
    name = getattr(request, "name", None) if names else None
    return name is None or event.name == name

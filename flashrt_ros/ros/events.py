"""Which capsule event answers which service call (no ROS imports).

The node publishes a CapsuleEvent on ~/capsule_events for every capsule operation it applies,
just before its service answer. rmw_fastrtps can lose that answer (docs/node.md, known issues), so
the CLI, the behaviour-tree behaviours and the bag player take the matching event in its place.
This is the one rule for "matching" they share.
"""
from __future__ import annotations

# operations that name no capsule: any event of the operation matches
UNNAMED_OPERATIONS = ("rollback", "reset")


def reports(event, operation: str, request) -> bool:
    """Does `event` report `operation` on the capsule that `request` names?"""
    if event.operation != operation:
        return False
    name = getattr(request, "name", None) if operation not in UNNAMED_OPERATIONS else None
    return name is None or event.name == name

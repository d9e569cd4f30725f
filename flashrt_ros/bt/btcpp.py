"""BehaviorTree.CPP runs docs/bt/flashrt_capsules.xml, its nodes implemented in Python over rclpy.

BehaviorTree.CPP 4 itself, through the `behaviortreepy` bindings, parses, verifies and ticks the
XML: its control nodes, decorators, scripts, retries, subtrees and their blackboard remapping. The
nodes of the XML's TreeNodesModel are registered under their IDs with Python implementations that
run the py_trees behaviours of this package, so a BT.CPP capsule node makes the same non-blocking
call, with the same timeouts and lost-answer rule, as the py_trees trees:

    XML node          py_trees behaviours it runs (world: with a SimWorld application)
    SnapshotCapsule   [SaveWorld] Snapshot          ForkCapsule      [SaveWorld] Fork
    RestoreCapsule    [RestoreWorld] Restore        RollbackSteps    [RewindWorld] Rollback
    ResetPolicy       [RestoreWorld start] Reset    SaveCapsule, LoadCapsule, DeleteCapsule,
    StepReached       StepReached                   CapsulePresent   the behaviour of that name
    PolicyHealthy     DeadlineHealthy               RunSteps         RunSimSteps
ScoreBranch and ChooseBest are the application's (`SimApplication`): they score the last run by
its arm error and keep the scores as JSON text on the BT.CPP blackboard; ChooseBest logs them
(the rclpy node's logger).

Ports. behaviortreepy 0.1.4 registers a Python node without ports (its `register_simple_*` pass
no PortsList to BT.CPP), and BT.CPP refuses an XML attribute that is not a declared port. So
`XmlTrees` hands BT.CPP the XML with the ports of the model's nodes taken out: each such element
(`<SnapshotCapsule .../>`, or the explicit `<Action ID="SnapshotCapsule" .../>`) gets a unique
instance name and its ports stay here, checked against the TreeNodesModel (an undeclared one is refused, as BT.CPP would). BT.CPP's own attributes, those
starting with `_` (`_skipIf`, `_onSuccess`, `_post`, ...), stay on the element for BT.CPP. The
model's `<SubTree>` entries (Groot's declarations of a subtree's ports) are BT.CPP's business and
skipped here; an `<include>` is refused, since only this file's elements are rewritten. A node reads
its ports by its instance name: a literal (or the model's default), converted to the port's type,
or a `{key}` read from or written to the node's BT.CPP blackboard (`config().blackboard`, the
subtree's own, which follows the subtree's remapping as BT.CPP's getInput/setOutput do). That is
the one thing done here that BT.CPP would do itself if the bindings could declare ports. The
instance name is the element's own `name=` where no other element has it (it labels the node's
calls and failures, as in BT.CPP), else `<name or ID>#<n>` (`SnapshotCapsule#3`, `look#2`).

One py_trees behaviour (or sequence) per XML element, set up with the rclpy node by `setup`;
instances of one element (a SubTree used several times) share it, so they must not run at once
(the trees here run them one after another). BT.CPP conditions cannot return RUNNING: StepReached
fails and PolicyHealthy holds until their first status message.

Threads. `tree.tick_once()` holds the GIL for the whole tick (the bindings do not release it), so
`run` ticks from a Python loop that sleeps between ticks while an executor spins the rclpy node
in another thread, as `trees.run_tree` does. BT.CPP's `tick_while_running` would starve that
executor. A Python exception in a node is caught by the bindings, printed and turned into FAILURE;
the nodes here also keep it in `XmlTrees.errors` and in behaviours.ERROR_KEY.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import behaviortreepy as btcpp
import numpy as np
import py_trees
from py_trees.common import Status

from flashrt_ros.bt import behaviours as b
from flashrt_ros.bt.trees import (RestoreWorld, RewindWorld, RunSimSteps, SaveWorld, SimWorld,
                                  scores_line)

DEFAULT_POLICY = b.DEFAULT_POLICY
BLACKBOARD_PREFIX = "/btcpp"          # py_trees keys of the port values: /btcpp/<instance>/<port>

# XML node ID -> its capsule behaviour; the port of each request field is the field's name,
# except `name`, which BT.CPP reserves for the instance name: the port is `capsule_name`
CAPSULE_NODES = {
    "SnapshotCapsule": b.Snapshot, "RestoreCapsule": b.Restore, "ForkCapsule": b.Fork,
    "RollbackSteps": b.Rollback, "ResetPolicy": b.Reset, "SaveCapsule": b.SaveCapsule,
    "LoadCapsule": b.LoadCapsule, "DeleteCapsule": b.DeleteCapsule, "CapsulePresent": b.CapsulePresent,
}
STATUS_NODES = {"StepReached", "PolicyHealthy"}
APPLICATION_NODES = {"RunSteps", "ScoreBranch", "ChooseBest"}

# tags of BT.CPP's explicit form, <Action ID="SnapshotCapsule" .../>: the ID is the node's type
EXPLICIT_TAGS = ("Action", "Condition", "Control", "Decorator")

_TO_STATUS = {Status.SUCCESS: btcpp.NodeStatus.SUCCESS, Status.FAILURE: btcpp.NodeStatus.FAILURE,
              Status.RUNNING: btcpp.NodeStatus.RUNNING}


def port_of(field: str) -> str:
    """The XML port of a request field (`name` is BT.CPP's instance name)."""
    return "capsule_name" if field == "name" else field


@dataclass(frozen=True)
class Port:
    name: str
    direction: str              # input_port, output_port, inout_port
    type: str                   # the C++ type the model names
    default: str | None


# the spellings BT.CPP's convertFromString<bool> takes
_BOOLS = {"true": True, "True": True, "TRUE": True, "1": True,
          "false": False, "False": False, "FALSE": False, "0": False}


def _parse_literal(text: str, cpp_type: str, where: str):
    if cpp_type == "std::string" or cpp_type.startswith("std::shared_ptr"):
        return text
    if cpp_type == "bool":
        if text in _BOOLS:
            return _BOOLS[text]
        raise ValueError(f"{where}: expected a bool (true, True, TRUE or 1; false, False, FALSE "
                         f"or 0), found {text!r}")
    try:
        return float(text) if cpp_type in ("float", "double") else int(text)
    except ValueError:
        raise ValueError(f"{where}: expected a {cpp_type}, found {text!r}") from None


def _entry(value: str | None, port: str) -> str | None:
    """The blackboard key that value `value` of port `port` names: `{key}`'s key (`{=}`: the
    port's own name); None for a literal or no value."""
    if value is not None and len(value) > 2 and value[0] == "{" and value[-1] == "}":
        key = value[1:-1]
        return port if key == "=" else key
    return None


def _node_id(element) -> str:
    """The node type of a tree element: its tag, or the ID of the explicit form."""
    if element.tag in EXPLICIT_TAGS:
        return element.get("ID", "")
    return element.tag


def _instance_names(elements: list[tuple[str | None, str]]) -> list[str]:
    """A unique instance name for each (XML name or None, node ID) of the model's elements: the
    XML's name where no other element has it, else `<name or ID>#<n>`, numbered in file order
    and skipping any name an element was given."""
    given = collections.Counter(name for name, _ in elements if name)
    count: collections.Counter = collections.Counter()
    names = []
    for name, node_id in elements:
        if name and given[name] == 1:
            names.append(name)
            continue
        base = name or node_id
        count[base] += 1
        while f"{base}#{count[base]}" in given:
            count[base] += 1
        names.append(f"{base}#{count[base]}")
    return names


class XmlTrees:
    """A BT.CPP XML file, its model's nodes registered with Python implementations.

    Args:
        path: the XML (BTCPP_format 4) with a TreeNodesModel.
        policy: the policy node's name; replaces the `/flashrt_policy` prefix of every
            service_name and topic_name in the file.
        application: a SimApplication for RunSteps, ScoreBranch, ChooseBest and the world that
            follows the capsule operations; None: capsule and status nodes only.
        service: keyword arguments for every capsule behaviour (wait_s, timeout_s).
    """

    def __init__(self, path: str, *, policy: str = DEFAULT_POLICY, application=None,
                 service: dict | None = None):
        root = ET.parse(path).getroot()
        models = root.find("TreeNodesModel")
        if models is None:
            raise ValueError(f"{path}: expected a <TreeNodesModel> declaring the nodes' ports, found none")
        # a <SubTree> entry declares a subtree's ports for Groot; BT.CPP remaps those itself
        self.models = {m.get("ID"): (m.tag, {p.get("name"): Port(p.get("name"), p.tag,
                                                                  p.get("type", ""),
                                                                  p.get("default"))
                                              for p in m})
                       for m in models if m.tag != "SubTree"}
        include = root.find(".//include")
        if include is not None:
            raise ValueError(f"{path}: expected every tree in this one file, found include "
                             f"(path={include.get('path')!r}); inline the included tree (the "
                             f"ports of its nodes would reach BT.CPP unrewritten)")
        self.policy, self.application = policy.rstrip("/"), application
        self.service = dict(service or {})
        self.ports: dict[str, dict[str, str]] = {}       # instance name -> port -> XML value
        self.kinds: dict[str, str] = {}                  # instance name -> node ID
        self.errors: list[str] = []
        self.log = logging.getLogger(__name__).info     # the rclpy node's logger once set up
        elements = [(tree, e) for tree in root.findall("BehaviorTree") for e in tree.iter()
                    if _node_id(e) in self.models]
        instances = _instance_names([(e.get("name"), _node_id(e)) for _, e in elements])
        for (tree, e), instance in zip(elements, instances):
            node_id = _node_id(e)
            declared = self.models[node_id][1]
            # `_skipIf`, `_onSuccess` and the like are BT.CPP's, on every node: they stay
            special = {k: v for k, v in e.attrib.items() if k.startswith("_")}
            given = {k: v for k, v in e.attrib.items() if k not in special and k != "name"
                     and not (k == "ID" and e.tag in EXPLICIT_TAGS)}
            undeclared = sorted(set(given) - set(declared))
            if undeclared:
                raise ValueError(f"{path}: <{node_id}> in tree {tree.get('ID')!r} has "
                                 f"attribute(s) {undeclared} that its TreeNodesModel entry "
                                 f"does not declare (ports: {sorted(declared)})")
            values = {p.name: p.default for p in declared.values() if p.default is not None}
            values.update(given)
            for port in declared.values():
                if port.direction != "input_port" and port.name in values \
                        and _entry(values[port.name], port.name) is None:
                    raise ValueError(f"{path}: <{node_id}> port {port.name!r} is an output; "
                                     f"expected a blackboard entry like {{key}}, found "
                                     f"{values[port.name]!r}")
            self.ports[instance], self.kinds[instance] = values, node_id
            e.attrib.clear()
            if e.tag in EXPLICIT_TAGS:
                e.set("ID", node_id)
            e.set("name", instance)
            e.attrib.update(special)
        self.text = ET.tostring(root, encoding="unicode")
        self.factory = btcpp.BehaviorTreeFactory()
        self._runs: dict[str, py_trees.behaviour.Behaviour] = {}    # instance -> what it runs
        self._register()

    # -- building -------------------------------------------------------------------------
    def _register(self):
        known = set(CAPSULE_NODES) | STATUS_NODES | APPLICATION_NODES
        for node_id, (kind, _) in self.models.items():
            if node_id not in known:
                raise ValueError(f"TreeNodesModel declares {node_id!r}, which has no Python "
                                 f"implementation here; known: {sorted(known)}")
            if node_id in APPLICATION_NODES and self.application is None \
                    and node_id in self.kinds.values():
                raise ValueError(f"the trees use the application node {node_id}; pass "
                                 f"application=SimApplication(world) (or another application)")
            if kind == "Condition":
                self.factory.register_simple_condition(node_id, self._guarded(self._condition))
            elif node_id in ("ScoreBranch", "ChooseBest"):
                self.factory.register_simple_action(node_id, self._guarded(self._sync))
            else:
                self.factory.register_simple_stateful_action(
                    node_id, self._guarded(self._start), self._guarded(self._running),
                    self._guarded(self._halted, halt=True))
        self.factory.register_behavior_tree_from_text(self.text)

    def setup(self, node) -> None:
        """Build each element's behaviours and set them up with rclpy node `node` (spun elsewhere).

        Every element is built before any is set up: a port the XML gets wrong raises before
        anything is created on `node`."""
        runs = {instance: self._build(instance, node_id)
                for instance, node_id in self.kinds.items()}
        self.log = node.get_logger().info
        for instance, run in runs.items():
            if run is not None:
                for behaviour in run.iterate():
                    behaviour.setup(node=node)
                self._runs[instance] = run

    def shutdown(self) -> None:
        for run in self._runs.values():
            for behaviour in run.iterate():
                behaviour.shutdown()
        self._runs = {}

    def create_tree(self, tree_id: str):
        return self.factory.create_tree(tree_id)

    def _key(self, instance, port):
        return f"{BLACKBOARD_PREFIX}/{instance}/{port}"

    def _from_bb(self, instance, port):
        return b.FromBlackboard(self._key(instance, port))

    def _literal(self, instance, port, what):
        """The XML text of port `port`, one the behaviours take when they are built (`what` it
        should be), so a literal: BT.CPP's blackboard entries exist only once a tree is ticked."""
        raw = self.ports[instance].get(port)
        if raw is None or _entry(raw, port) is not None:
            found = "no value" if raw is None else f"the blackboard entry {raw}"
            raise ValueError(f"{instance}: expected a literal {port} ({what}), found {found}; "
                             f"set it in the XML")
        return raw

    def _target(self, instance, port, suffix):
        """The policy node a service_name/topic_name names, with `/flashrt_policy` replaced."""
        name = self._literal(instance, port, f"a name ending in /{suffix}")
        if not name.endswith("/" + suffix):
            raise ValueError(f"{instance}: expected {port} ending in /{suffix}, found {name!r}")
        target = name[: -len(suffix) - 1]
        return self.policy if target == DEFAULT_POLICY else target

    def _build(self, instance, node_id):
        ports, app = self.ports[instance], self.application
        world = app.world if app is not None else None
        fb = functools.partial(self._from_bb, instance)     # port -> its FromBlackboard
        if node_id in CAPSULE_NODES:
            cls = CAPSULE_NODES[node_id]
            fields = {f: fb(port_of(f)) for f in cls.srv_type.Request.get_fields_and_field_types()
                      if port_of(f) in ports}
            kw = dict(label=instance, policy=self._target(instance, "service_name", cls.service),
                      response_key=self._key(instance, "response"), **self.service)
            if cls is b.CapsulePresent:
                kw.pop("response_key")
                call = cls(fb("capsule_name"), **kw, **fields)
            else:
                call = cls(**kw, **fields)
            before = self._world_step(node_id, instance, world, fb)
            if before is None:
                return call
            return py_trees.composites.Sequence(instance, memory=True, children=[before, call])
        if node_id == "StepReached":
            return b.StepReached(fb("n"), label=instance,
                                 policy=self._target(instance, "topic_name", "status"))
        if node_id == "PolicyHealthy":
            raw = self._literal(instance, "max_deadline_misses", "a uint64_t")
            misses = _parse_literal(raw, "uint64_t", f"{instance} port max_deadline_misses")
            return b.DeadlineHealthy(misses, label=instance,
                                     policy=self._target(instance, "topic_name", "status"))
        if node_id == "RunSteps":
            if ("steps" in ports) == ("until" in ports):
                raise ValueError(f"{instance}: expected one of the ports steps or until, found "
                                 f"{sorted(ports)}")
            which = "steps" if "steps" in ports else "until"
            return RunSimSteps(world, label=instance, **{which: fb(which)})
        return None                                  # ScoreBranch, ChooseBest: SimApplication

    def _world_step(self, node_id, instance, world, fb):
        """The world's move that goes with a capsule operation (None: none, or no world); `fb`
        makes the FromBlackboard of one of the instance's ports."""
        if world is None:
            return None
        sigma = self.application.explore
        if node_id == "SnapshotCapsule":
            return SaveWorld(world, fb("capsule_name"), label=f"{instance} world")
        if node_id == "ForkCapsule" and self.ports[instance].get("source", "") == "":
            return SaveWorld(world, fb("capsule_name"), label=f"{instance} world")
        if node_id == "RestoreCapsule":
            return RestoreWorld(world, fb("capsule_name"), explore=sigma, label=f"{instance} world")
        if node_id == "RollbackSteps":
            return RewindWorld(world, fb("k"), explore=sigma, label=f"{instance} world")
        if node_id == "ResetPolicy":
            return RestoreWorld(world, "start", label=f"{instance} world")
        return None

    # -- ports ----------------------------------------------------------------------------
    def read(self, node, port: str):
        """Input `port` of BT.CPP node `node`, typed as its model says."""
        instance = node.name()
        model = self.models[self.kinds[instance]][1][port]
        raw = self.ports[instance].get(port)
        if raw is None:
            raise KeyError(f"{instance}: input port {port!r} is not set in the XML and has no default")
        key = _entry(raw, port)
        if key is None:
            return _parse_literal(raw, model.type, f"{instance} port {port}")
        bb, t = node.config().blackboard, model.type
        try:
            if t == "bool":
                return bb.get_bool(key)
            if t in ("float", "double"):
                return bb.get_double(key)
            if t == "std::string" or t.startswith("std::shared_ptr"):
                return bb.get_string(key)
            return bb.get_int(key)
        except RuntimeError as e:
            raise KeyError(f"{instance}: input port {port!r} = {raw}: {e}") from None

    def write(self, node, port: str, value) -> None:
        """Output `port` of `node`, if the XML connects it to a blackboard entry."""
        instance = node.name()
        raw = self.ports[instance].get(port)
        key = _entry(raw, port)
        if key is None:
            return
        bb = node.config().blackboard
        if isinstance(value, bool):
            bb.set_bool(key, value)
        elif isinstance(value, (int, np.integer)):
            bb.set_int(key, int(value))
        elif isinstance(value, float):
            bb.set_double(key, value)
        else:
            bb.set_string(key, str(value))

    def _inputs(self, node):
        """Copy the node's input ports where its behaviours read them (FromBlackboard keys)."""
        instance = node.name()
        for port in self.models[self.kinds[instance]][1].values():
            if port.direction != "output_port" and port.name in self.ports[instance]:
                py_trees.blackboard.Blackboard.set(self._key(instance, port.name),
                                                   self.read(node, port.name))

    def _outputs(self, node, status: Status):
        instance = node.name()
        outputs = [p.name for p in self.models[self.kinds[instance]][1].values()
                   if p.direction != "input_port" and p.name in self.ports[instance]]
        if not outputs:
            return
        run = self._runs[instance]
        if status == Status.SUCCESS:
            key = self._key(instance, "response")
            if py_trees.blackboard.Blackboard.exists(key):
                answer = py_trees.blackboard.Blackboard.get(key)   # a response, or a CapsuleEvent
                for port in outputs:
                    if hasattr(answer, port):
                        self.write(node, port, getattr(answer, port))
        elif status == Status.FAILURE and "message" in outputs:
            tip = run.tip() or run
            self.write(node, "message", tip.feedback_message)

    # -- the callbacks BT.CPP calls -------------------------------------------------------
    def _guarded(self, fn, halt=False):
        def call(node):
            try:
                return fn(node)
            except Exception as e:                  # the bindings would only print it
                why = f"{node.name()}: {type(e).__name__}: {e}"
                self.errors.append(why + "\n" + traceback.format_exc())
                py_trees.blackboard.Blackboard.set(b.ERROR_KEY, why)
                if not halt:
                    return btcpp.NodeStatus.FAILURE
        return call

    def _tick(self, node) -> Status:
        run = self._runs[node.name()]
        run.tick_once()
        if run.status != Status.RUNNING:
            self._outputs(node, run.status)
        return run.status

    def _start(self, node):
        self._inputs(node)
        run = self._runs[node.name()]
        if run.status == Status.RUNNING:             # not halted by BT.CPP: start afresh
            run.stop(Status.INVALID)
        if self.kinds[node.name()] == "RunSteps":
            self.application.run_started()
        return self._running(node)

    def _running(self, node):
        status = self._tick(node)
        if status == Status.SUCCESS and self.kinds[node.name()] == "RunSteps":
            self.application.run_ended()
        return _TO_STATUS[status]

    def _halted(self, node):
        self._runs[node.name()].stop(Status.INVALID)

    def _condition(self, node):
        self._inputs(node)
        status = self._tick(node)
        if status == Status.RUNNING:                 # no status message yet
            status = Status.SUCCESS if self.kinds[node.name()] == "PolicyHealthy" else Status.FAILURE
        return _TO_STATUS[status]

    def _sync(self, node):
        return self.application.tick(self, node)


class SimApplication:
    """The application side of the XML's trees against a SimWorld: RunSteps runs the world, the
    world follows the capsule operations (XmlTrees._world_step), ScoreBranch scores the last run
    as -mean(arm error), ChooseBest picks the best score.

    `explore` is the exploration noise that every world restore and rewind starts (seeded by the
    world's seed sequence), so that branches and retries differ; 0 for a policy that samples,
    whose branches differ by their noise seeds (the XML's BranchAndChooseVLA). Scores are JSON
    text (`{"d0-b0-end": -1.2, ...}`) on the BT.CPP blackboard entry the `scores` port names;
    ChooseBest logs them with its choice.
    """

    def __init__(self, world: SimWorld, explore: float = 0.0):
        self.world, self.explore = world, float(explore)
        self.chosen: list[str] = []          # ChooseBest's picks, in order
        self.last_run: list[float] = []      # arm errors of the last finished RunSteps
        self._mark = 0

    def run_started(self):
        self._mark = len(self.world.trace)

    def run_ended(self):
        self.last_run = [e for _, _, e in self.world.trace[self._mark:]]

    def tick(self, trees: XmlTrees, node):
        kind = trees.kinds[node.name()]
        try:
            scores = json.loads(trees.read(node, "scores") or "{}")
        except KeyError:                         # the entry is written by the first ScoreBranch
            scores = {}
        if kind == "ScoreBranch":
            if not self.last_run:
                py_trees.blackboard.Blackboard.set(b.ERROR_KEY, f"{node.name()}: the branch took no step")
                return btcpp.NodeStatus.FAILURE
            scores[trees.read(node, "branch")] = -float(np.mean(self.last_run))
            trees.write(node, "scores", json.dumps(scores))
            return btcpp.NodeStatus.SUCCESS
        if not scores:
            py_trees.blackboard.Blackboard.set(b.ERROR_KEY, f"{node.name()}: no branch was scored")
            return btcpp.NodeStatus.FAILURE
        best = max(scores, key=scores.get)
        self.chosen.append(best)
        trees.log(f"{node.name()}: " + scores_line(scores, best))
        trees.write(node, "best", best)
        return btcpp.NodeStatus.SUCCESS


def run(tree, timeout_s: float, period_s: float = 0.002, on_tick=None):
    """Tick BT.CPP `tree` every `period_s` from this thread until it is not RUNNING; its status.

    On timeout the tree is halted and TimeoutError raised.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        status = tree.tick_once()
        if on_tick is not None:
            on_tick(tree)
        if status != btcpp.NodeStatus.RUNNING:
            return status
        if time.monotonic() > deadline:
            tree.halt_tree()
            raise TimeoutError(f"BT.CPP tree still running after {timeout_s:g} s")
        time.sleep(period_s)

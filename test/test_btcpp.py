"""docs/bt/flashrt_capsules.xml in BehaviorTree.CPP itself (the behaviortreepy bindings).

Layers:
  * BT.CPP's factory verifies the unmodified file against its node models (the model's IDs
    registered as actions and conditions): every node known, built-ins used with the right
    children; and it refuses what is wrong (a control check that can fail);
  * the unmodified file cannot be instantiated: behaviortreepy 0.1.4 registers Python nodes
    without ports, and BT.CPP refuses undeclared attributes (when a release can declare ports,
    that test fails and says what to change);
  * flashrt_ros.bt.btcpp.XmlTrees: the same trees with the ports kept on the Python side, ticked
    by BT.CPP against a policy node process over DDS on loopback (test_behaviours.py's fixtures),
    with the simulated robot in this process, to the outcome docs/behaviour_trees.md describes;
  * the other XML that BT.CPP takes: its `_` attributes (`_skipIf`, `_post`, ...), the explicit
    `<Action ID=...>` form, a model's `<SubTree>` entry, bool spellings; and what XmlTrees
    refuses with what to do (an `<include>`, a `{key}` where the behaviours need a literal).
Skips where behaviortreepy is not installed (requirements.txt pins it).
"""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("behaviortreepy", reason="behaviortreepy (BehaviorTree.CPP's Python bindings) "
                                             "is not installed; requirements.txt pins it")

from test_behaviours import (  # noqa: E402,F401  (fixtures shared with the py_trees tests)
    TREE_S, calls, clean_blackboard, executor_alive, policy_node, ros, run, world)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XML = os.path.join(ROOT, "docs", "bt", "flashrt_capsules.xml")
TREES = ["EpisodeWithRecovery", "BranchAndChoose", "BranchAndChooseVLA", "RunBranch", "ResumeFromDisk"]


def _factory_with_the_model():
    """A BT.CPP factory with every TreeNodesModel ID registered as its kind, doing nothing."""
    import behaviortreepy as btcpp
    factory = btcpp.BehaviorTreeFactory()
    success = lambda node: btcpp.NodeStatus.SUCCESS    # noqa: E731
    for model in ET.parse(XML).getroot().find("TreeNodesModel"):
        if model.tag == "Condition":
            factory.register_simple_condition(model.get("ID"), success)
        else:
            factory.register_simple_stateful_action(model.get("ID"), success, success)
    return factory


# -- the file against BT.CPP's parser -------------------------------------------------------
def _xml_text():
    # behaviortreepy 0.1.4's register_behavior_tree_from_file cannot take a path (its binding
    # lacks pybind11's std::filesystem caster): the text goes in instead
    with open(XML, encoding="utf-8") as f:
        return f.read()


def test_the_xml_verifies_against_btcpp_node_models():
    factory = _factory_with_the_model()
    factory.register_behavior_tree_from_text(_xml_text())
    assert sorted(factory.registered_behavior_trees()) == sorted(TREES)


@pytest.mark.parametrize("changes, words", [
    ([("<RunSteps ", "<RunStep ")], "RunStep"),                                  # an unknown node
    ([("<Inverter>", "<Inverter><AlwaysSuccess/>")], "Inverter"),                # two children
    ([('<ReactiveSequence name="guarded run">', "<ReactiveSequence/><Sequence>"),
      ("</ReactiveSequence>", "</Sequence>")], "ReactiveSequence"),             # no child
])
def test_btcpp_refuses_a_broken_copy_of_the_xml(changes, words):
    text = _xml_text()
    for old, new in changes:
        assert old in text
        text = text.replace(old, new, 1)
    factory = _factory_with_the_model()
    with pytest.raises(RuntimeError, match=words):
        factory.register_behavior_tree_from_text(text)


def test_the_unmodified_xml_needs_ports_behaviortreepy_cannot_declare():
    """behaviortreepy 0.1.4 passes no PortsList to BT.CPP. If this fails, the bindings can declare
    ports: register the model's ports in flashrt_ros/bt/btcpp.py and give BT.CPP the file as it is."""
    factory = _factory_with_the_model()
    factory.register_behavior_tree_from_text(_xml_text())
    with pytest.raises(RuntimeError, match=r"a port with name \[\w+\] is found in the XML"):
        factory.create_tree("EpisodeWithRecovery")


def test_an_undeclared_port_is_refused_with_the_declared_ones(tmp_path):
    from flashrt_ros.bt.btcpp import XmlTrees
    text = _xml_text().replace('keep_context="true"', 'keep_contxt="true"', 1)
    path = tmp_path / "typo.xml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"<ResetPolicy> .* \['keep_contxt'\] .*keep_context"):
        XmlTrees(str(path))


# -- the trees in BT.CPP against the node --------------------------------------------------------
@pytest.fixture
def trees(ros, policy_node, world):
    from flashrt_ros.bt.btcpp import SimApplication, XmlTrees
    t = XmlTrees(XML, policy=policy_node, application=SimApplication(world, explore=0.5))
    t.setup(ros.node)
    yield t
    t.shutdown()


def _ops(service_calls):
    return [(c.service.rsplit("/", 1)[1], c.outcome) for c in service_calls]


def test_episode_with_recovery_rolls_back_after_a_failure_signal(ros, policy_node, world, trees):
    import behaviortreepy as btcpp
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    from flashrt_ros.bt import btcpp as adapter
    tree = trees.create_tree("EpisodeWithRecovery")
    board = tree.root_blackboard()
    signalled = {}

    def signal_once(_tree):       # a monitor raising the failure flag mid-run, once
        if not signalled and "attempts" in board.get_keys() and board.get_int("attempts") == 1 \
                and world.t >= 12:
            board.set_bool("failure_signal", True)
            signalled["at"] = world.t

    status = adapter.run(tree, TREE_S, on_tick=signal_once)
    assert status == btcpp.NodeStatus.SUCCESS, trees.errors
    assert not trees.errors
    assert board.get_int("attempts") == 2 and world.t == 60
    ops = _ops(calls())
    assert ("rollback", "ok") in ops and ("restore", "ok") not in ops
    assert all(outcome == "ok" for _, outcome in ops), ops
    steps = [t for _, t, _ in world.trace]
    back = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(back) == 1 and steps[back[0]] == steps[back[0] - 1] - 5 + 1, steps  # rewound 5
    # the policy ended on the world's step: StepReached(episode_end) held, and one more does not
    end = board.get_int("episode_end")
    assert end == board.get_int("start_step") + 60
    assert run(b.StepReached(end + 1, policy=policy_node), ros.node) == Status.FAILURE


def test_branch_and_choose_restores_the_best_branch_then_resumes_it_from_disk(
        ros, policy_node, world, trees):
    import behaviortreepy as btcpp

    from flashrt_ros.bt import btcpp as adapter
    tree = trees.create_tree("BranchAndChoose")
    assert adapter.run(tree, TREE_S) == btcpp.NodeStatus.SUCCESS, trees.errors
    assert not trees.errors
    board = tree.root_blackboard()
    scores = json.loads(board.get_string("scores"))
    assert sorted(scores) == ["d0-b0-end", "d0-b1-end", "d0-b2-end"]
    assert len(set(scores.values())) == 3                    # explored branches differ
    best = board.get_string("best")
    assert trees.application.chosen == [best] and best == max(scores, key=scores.get)
    assert world.t == 60                                     # 20, a branch of 20, 20 more
    per_op = {}
    for op, outcome in _ops(calls()):
        assert outcome == "ok", calls()
        per_op[op] = per_op.get(op, 0) + 1
    assert per_op == {"reset": 1, "fork": 3, "restore": 4, "snapshot": 3, "delete_capsule": 3,
                      "save_capsule": 1}
    saved = board.get_string("saved_path")
    assert os.path.isfile(saved) and os.path.basename(saved).startswith(best)

    resume = trees.create_tree("ResumeFromDisk")
    resume.root_blackboard().set_string("resume", best)
    assert adapter.run(resume, TREE_S) == btcpp.NodeStatus.SUCCESS, trees.errors
    assert world.t == 80 and _ops(calls()[-1:]) == [("load_capsule", "ok")]


def test_a_refused_call_fails_the_tree_with_the_nodes_reason(ros, policy_node, world, trees):
    import behaviortreepy as btcpp

    from flashrt_ros.bt import btcpp as adapter
    resume = trees.create_tree("ResumeFromDisk")
    resume.root_blackboard().set_string("resume", "nobody-saved-this")
    assert adapter.run(resume, TREE_S) == btcpp.NodeStatus.FAILURE
    error = resume.root_blackboard().get_string("error")
    assert error.startswith("refused: ") and "nobody-saved-this" in error, error
    assert "no capsule file" in error, error
    assert world.t == 0                                      # RunSteps never ran


# -- the XML forms BT.CPP accepts besides the file's own -------------------------------------------
def _file_with_trees(tmp_path, trees, models=""):
    """The file's TreeNodesModel (with `models` added) and `trees` in place of its trees; a path."""
    root = ET.parse(XML).getroot()
    del root.attrib["main_tree_to_execute"]
    for tree in root.findall("BehaviorTree"):
        root.remove(tree)
    for tree in ET.fromstring(f"<trees>{trees}</trees>"):
        root.insert(0, tree)
    root.find("TreeNodesModel").extend(ET.fromstring(f"<models>{models}</models>"))
    path = tmp_path / "trees.xml"
    path.write_text(ET.tostring(root, encoding="unicode"))
    return str(path)


@pytest.mark.parametrize("text, value", [
    ("true", True), ("True", True), ("TRUE", True), ("1", True),
    ("false", False), ("False", False), ("FALSE", False), ("0", False)])
def test_a_bool_port_takes_the_spellings_btcpp_takes(text, value):
    from flashrt_ros.bt.btcpp import _parse_literal
    assert _parse_literal(text, "bool", "pin") is value


def test_a_bool_port_refuses_other_text_with_the_spellings():
    from flashrt_ros.bt.btcpp import _parse_literal
    with pytest.raises(ValueError, match=r"pin: expected a bool \(true, True.*found 'yes'"):
        _parse_literal("yes", "bool", "pin")


SPECIAL_TREE = """
<BehaviorTree ID="Special">
  <Sequence>
    <SnapshotCapsule service_name="/flashrt_policy/snapshot" capsule_name="special-skipped"
                     _skipIf="skip"/>
    <SnapshotCapsule service_name="/flashrt_policy/snapshot" capsule_name="special-kept"
                     _skipIf="false" _onSuccess="snapped := true" _post="posts += 1"/>
    <DeleteCapsule service_name="/flashrt_policy/delete_capsule" capsule_name="special-kept"
                   _failureIf="fail_delete" _post="posts += 1"/>
  </Sequence>
</BehaviorTree>"""


def test_btcpp_special_attributes_stay_on_the_node_for_btcpp(tmp_path, ros, policy_node):
    import behaviortreepy as btcpp

    from flashrt_ros.bt import btcpp as adapter
    trees = adapter.XmlTrees(_file_with_trees(tmp_path, SPECIAL_TREE), policy=policy_node)
    kept = ET.fromstring(trees.text).find("BehaviorTree").find("Sequence")[1]
    assert kept.attrib == {"name": "SnapshotCapsule#2", "_skipIf": "false",
                           "_onSuccess": "snapped := true", "_post": "posts += 1"}
    trees.setup(ros.node)
    try:
        for skip, fail_delete, status in [(True, False, btcpp.NodeStatus.SUCCESS),
                                          (False, True, btcpp.NodeStatus.FAILURE)]:
            tree = trees.create_tree("Special")
            board = tree.root_blackboard()
            board.set_bool("skip", skip)
            board.set_bool("fail_delete", fail_delete)
            board.set_int("posts", 0)
            assert adapter.run(tree, TREE_S) == status, trees.errors
            assert board.get_bool("snapped") and board.get_int("posts") == 2   # _post: either way
        # the first run skipped one snapshot and deleted; the second snapshotted both, and
        # _failureIf failed the delete without calling it
        assert not trees.errors
        assert _ops(calls()) == [("snapshot", "ok"), ("delete_capsule", "ok"),
                                 ("snapshot", "ok"), ("snapshot", "ok")]
    finally:
        trees.shutdown()
    _delete(ros, policy_node, "special-skipped", "special-kept")


def _delete(ros, policy_node, *names):
    """Delete capsules a test made on the module's policy node."""
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    for name in names:
        assert run(b.DeleteCapsule(name=name, policy=policy_node), ros.node) == Status.SUCCESS


EXPLICIT_TREE = """
<BehaviorTree ID="Explicit">
  <Sequence>
    <Action ID="SnapshotCapsule" service_name="/flashrt_policy/snapshot"
            capsule_name="explicit" pin="True"/>
    <Action ID="CapsulePresent" name="look" service_name="/flashrt_policy/list_capsules"
            capsule_name="explicit" _onSuccess="present := true"/>
    <RetryUntilSuccessful num_attempts="100">
      <Delay delay_msec="50">
        <Condition ID="StepReached" topic_name="/flashrt_policy/status" n="0"/>
      </Delay>
    </RetryUntilSuccessful>
    <Action ID="DeleteCapsule" service_name="/flashrt_policy/delete_capsule"
            capsule_name="explicit"/>
  </Sequence>
</BehaviorTree>"""


def test_the_explicit_form_runs_like_the_short_one(tmp_path, ros, policy_node):
    import behaviortreepy as btcpp

    from flashrt_ros.bt import btcpp as adapter
    trees = adapter.XmlTrees(_file_with_trees(tmp_path, EXPLICIT_TREE), policy=policy_node)
    assert trees.kinds == {"SnapshotCapsule#1": "SnapshotCapsule",
                           "look": "CapsulePresent", "StepReached#1": "StepReached",
                           "DeleteCapsule#1": "DeleteCapsule"}
    assert trees.ports["SnapshotCapsule#1"]["pin"] == "True"
    trees.setup(ros.node)
    try:
        tree = trees.create_tree("Explicit")
        assert adapter.run(tree, TREE_S) == btcpp.NodeStatus.SUCCESS, trees.errors
        assert not trees.errors and tree.root_blackboard().get_bool("present")
        assert _ops(calls()) == [("snapshot", "ok"), ("list_capsules", "ok"),
                                 ("delete_capsule", "ok")]
    finally:
        trees.shutdown()


def test_an_include_is_refused_with_what_to_do(tmp_path):
    from flashrt_ros.bt.btcpp import XmlTrees
    (tmp_path / "other.xml").write_text('<root BTCPP_format="4"><BehaviorTree ID="Other">'
                                        '<AlwaysSuccess/></BehaviorTree></root>')
    path = _file_with_trees(tmp_path, '<BehaviorTree ID="T"><SubTree ID="Other"/></BehaviorTree>')
    text = open(path).read().replace("<BehaviorTree", '<include path="other.xml"/><BehaviorTree', 1)
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match=r"expected .*, found include .*other\.xml.*; inline the "
                                         r"included tree"):
        XmlTrees(path)


def test_a_subtree_entry_of_the_model_declares_ports_for_btcpp(tmp_path):
    from flashrt_ros.bt.btcpp import XmlTrees
    path = _file_with_trees(tmp_path, """
        <BehaviorTree ID="Outer"><SubTree ID="Inner" what="{outer}"/></BehaviorTree>
        <BehaviorTree ID="Inner">
          <DeleteCapsule service_name="/flashrt_policy/delete_capsule" capsule_name="{what}"/>
        </BehaviorTree>""", models='<SubTree ID="Inner"><input_port name="what"/></SubTree>')
    trees = XmlTrees(path)
    assert "Inner" not in trees.models and trees.kinds == {"DeleteCapsule#1": "DeleteCapsule"}
    trees.create_tree("Outer")                   # BT.CPP instantiates it (nothing is ticked)


@pytest.mark.parametrize("attributes, words", [
    ('topic_name="/flashrt_policy/status"', r"PolicyHealthy#1: expected a literal "
     r"max_deadline_misses \(a uint64_t\), found no value; set it in the XML"),
    ('topic_name="/flashrt_policy/status" max_deadline_misses="{k}"', r"PolicyHealthy#1: expected "
     r"a literal max_deadline_misses \(a uint64_t\), found the blackboard entry \{k\}; set it"),
    ('topic_name="/flashrt_policy/status" max_deadline_misses="ten"', r"PolicyHealthy#1 port "
     r"max_deadline_misses: expected a uint64_t, found 'ten'"),
    ('topic_name="{topic}" max_deadline_misses="10"', r"PolicyHealthy#1: expected a literal "
     r"topic_name \(a name ending in /status\), found the blackboard entry \{topic\}"),
])
def test_a_port_the_behaviours_take_when_built_must_be_a_literal(tmp_path, ros, attributes, words):
    from flashrt_ros.bt.btcpp import XmlTrees
    trees = XmlTrees(_file_with_trees(tmp_path, f"""
        <BehaviorTree ID="T"><PolicyHealthy {attributes}/></BehaviorTree>"""))
    with pytest.raises(ValueError, match=words):
        trees.setup(ros.node)
    assert trees._runs == {}                         # nothing was set up on the node


NAMED_TREE = """
<BehaviorTree ID="Named">
  <Sequence>
    <Fallback name="take home">
      <SnapshotCapsule service_name="/flashrt_policy/snapshot" capsule_name="home"
                       name="snapshot home"/>
    </Fallback>
    <SnapshotCapsule service_name="/flashrt_policy/snapshot" capsule_name="a" name="look"/>
    <SnapshotCapsule service_name="/flashrt_policy/snapshot" capsule_name="b" name="look"/>
    <SnapshotCapsule service_name="/flashrt_policy/snapshot" capsule_name="c"/>
    <Action ID="SnapshotCapsule" service_name="/flashrt_policy/snapshot" capsule_name="d"
            name="SnapshotCapsule#1"/>
  </Sequence>
</BehaviorTree>"""


def test_the_xml_names_of_nodes_are_kept(tmp_path, ros):
    """A node's `name=` labels its calls and its failures. An element without one, or one of
    several that share a name, gets `<name or ID>#<n>`, never a name another element has."""
    import behaviortreepy as btcpp
    import py_trees

    from flashrt_ros.bt import behaviours as b
    from flashrt_ros.bt import btcpp as adapter
    trees = adapter.XmlTrees(_file_with_trees(tmp_path, NAMED_TREE), policy="/nobody_serves_this",
                             service=dict(wait_s=0.2))
    assert list(trees.kinds) == ["snapshot home", "look#1", "look#2", "SnapshotCapsule#2",
                                 "SnapshotCapsule#1"]
    assert [trees.ports[i]["capsule_name"] for i in trees.kinds] == ["home", "a", "b", "c", "d"]
    names = [e.get("name") for e in ET.fromstring(trees.text).find("BehaviorTree").iter()
             if e.get("name")]
    assert names == ["take home", "snapshot home", "look#1", "look#2", "SnapshotCapsule#2",
                     "SnapshotCapsule#1"]
    trees.setup(ros.node)
    try:            # nobody serves the snapshot: the tree's failure names the XML's node
        assert adapter.run(trees.create_tree("Named"), TREE_S) == btcpp.NodeStatus.FAILURE
    finally:
        trees.shutdown()
    assert [(c.label, c.outcome) for c in calls()] == [("snapshot home", "unreachable")]
    error = py_trees.blackboard.Blackboard.get(b.ERROR_KEY)
    assert error.startswith("snapshot home: unreachable"), error


# -- a process that builds a tree exits cleanly -------------------------------------------------
EXIT_SCRIPT = """
import sys
import rclpy
from flashrt_ros.bt.btcpp import XmlTrees, run
from flashrt_ros.ros.executors import MultiThreadedExecutor, SpinThread

rclpy.init()
node = rclpy.create_node("bt_exit")
executor = MultiThreadedExecutor(num_threads=3)
executor.add_node(node)
spin = SpinThread(executor)
spin.start()
trees = XmlTrees(sys.argv[1], policy="/nobody_serves_this", service=dict(wait_s=0.2))
trees.setup(node)
tree = trees.create_tree("Exit")
if sys.argv[2] == "tick":
    print(run(tree, timeout_s=30), flush=True)
# the teardown of test_behaviours.py's fixtures
trees.shutdown()
executor.shutdown(timeout_sec=5)
node.destroy_node()
rclpy.try_shutdown()
"""


@pytest.mark.ros
@pytest.mark.parametrize("tick", ["tick", "no-tick"])
def test_a_process_that_builds_a_tree_exits_with_status_0(tmp_path, ros_env, tick):
    """The script docs/behaviour_trees.md shows, with the teardown the tests use, as a process of
    its own: `ros2 launch` or a supervisor would report an abort at exit as a crash."""
    xml = _file_with_trees(tmp_path, """
        <BehaviorTree ID="Exit"><Sequence>
          <SnapshotCapsule service_name="/flashrt_policy/snapshot" capsule_name="x"/>
        </Sequence></BehaviorTree>""")
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), xml, tick], env=ros_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{output}"
    assert "Traceback" not in output and "terminate called" not in output, output
    if tick == "tick":
        assert "NodeStatus.FAILURE" in proc.stdout, output      # nobody serves the snapshot

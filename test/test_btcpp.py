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
    with the simulated robot in this process, to the outcome docs/behaviour_trees.md describes.
Skips where behaviortreepy is not installed (requirements.txt pins it).
"""
import json
import os
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("behaviortreepy", reason="behaviortreepy (BehaviorTree.CPP's Python bindings) "
                                             "is not installed; requirements.txt pins it")

from test_behaviours import (  # noqa: E402,F401  (fixtures shared with the py_trees tests)
    TREE_S, calls, clean_blackboard, executor_alive, policy_node, ros, run, world)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XML = os.path.join(ROOT, "docs", "bt", "flashrt_capsules.xml")
TREES = ["EpisodeWithRecovery", "BranchAndChoose", "RunBranch", "ResumeFromDisk"]


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

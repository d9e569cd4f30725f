"""`flashrt-ros restore/fork/reset --noise-seed N` against a live node over DDS on loopback.

The node runs in this process (a PolicyNode spun by its own executor) on the tiny preset with
`runtime.action_noise > 0`, so its actions are sampled and a seed changes them; the commands run as
the installed executable in child processes, as a user runs them. A seeded command must give the
chunk the same seed gives through the service, byte for byte; a bad seed exits 1 with the message
(the node's refusal, or the command's own before anything is sent) and changes nothing.
Waits have deadlines (node_client); nothing sleeps a fixed time.
"""
import os
import subprocess

import pytest

from flashrt_ros.cli.main import main
from flashrt_ros.ros.waiting import wait_for
from node_client import InProcessNode, chunk_bytes, executable, observations, ros_context  # noqa: F401

OBS = observations(2, seed=3)


def ok(response):
    assert response.success, response.message
    return response


@pytest.fixture(scope="module")
def node(ros_context, tmp_path_factory):
    n = InProcessNode(ros_context, f"/cli_seed_{os.getpid()}", **{
        "runtime.device": "cpu", "runtime.action_noise": 0.5, "control_mode": "observation",
        "observation_qos": "reliable", "store.capsule_dir": str(tmp_path_factory.mktemp("capsules"))})
    assert n.client.transition("configure") and n.client.transition("activate")
    n.client.wait_connected()
    yield n
    n.close()


def cli(ros_env, node, *args):
    return subprocess.run([executable("flashrt-ros"), "--node", node.client.target, "--timeout",
                           "20", *args], env=ros_env, capture_output=True, text=True, timeout=90)


def step(node) -> bytes:
    return chunk_bytes(node.client.step(OBS[1]))


@pytest.mark.ros
@pytest.mark.slow
def test_a_seeded_command_gives_the_chunk_the_seed_gives_through_the_service(node, ros_env):
    c = node.client
    c.step(OBS[0])
    ok(c.capsule("snapshot", name="root"))
    ok(c.capsule("restore", name="root", noise_seed=7))
    seven = step(node)
    ok(c.capsule("restore", name="root"))
    kept = step(node)                                  # the capsule's own sampler
    assert kept != seven

    r = cli(ros_env, node, "restore", "root", "--noise-seed", "7")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "restore: ok: restored 'root'" in r.stdout and "restarted at seed 7" in r.stdout
    assert step(node) == seven
    r = cli(ros_env, node, "restore", "root")          # without the flag the sampler goes on
    assert r.returncode == 0 and "seed" not in r.stdout, r.stdout + r.stderr
    assert step(node) == kept

    ok(c.capsule("restore", name="root"))
    r = cli(ros_env, node, "fork", "", "branch", "--switch", "--noise-seed", "7")
    assert r.returncode == 0 and "switched to it" in r.stdout and "seed 7" in r.stdout, \
        r.stdout + r.stderr
    assert step(node) == seven                         # a branch of root's state

    ok(c.capsule("reset", keep_context=True, noise_seed=9))
    episode = step(node)
    assert episode not in (seven, kept)
    r = cli(ros_env, node, "reset", "--noise-seed", "9")
    assert r.returncode == 0 and "restarted at seed 9" in r.stdout, r.stdout + r.stderr
    assert step(node) == episode
    for name in ("root", "branch"):
        ok(c.capsule("delete", name=name))


@pytest.mark.ros
@pytest.mark.slow
def test_a_bad_seed_exits_1_with_the_message_and_changes_nothing(node, ros_env):
    c = node.client
    c.step(OBS[0])
    ok(c.capsule("snapshot", name="root"))
    ok(c.capsule("restore", name="root", noise_seed=7))
    seven = step(node)
    ok(c.capsule("restore", name="root", noise_seed=7))     # live: root, sampler at seed 7
    before = [x.name for x in c.capsule("list").capsules]
    events = len(c.events)
    for args, said, where in [
            # the node refuses: its message on stdout, after "FAILED"
            (["restore", "root", "--noise-seed", str(1 << 32)], "found 4294967296", "stdout"),
            (["reset", "--noise-seed", "-2"], "expected -1", "stdout"),
            # refused before anything is sent: the message alone on stderr
            (["fork", "", "x", "--noise-seed", "3"], "expected --switch with it", "stderr"),
            (["restore", "root", "--noise-seed", str(1 << 64)], "nothing sent", "stderr")]:
        r = cli(ros_env, node, *args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stdout + r.stderr)
        text = getattr(r, where)
        assert said in text, (args, r.stdout + r.stderr)
        if where == "stdout":
            assert f"{args[0]}: FAILED: noise_seed: " in text and "nothing changed" in text
        else:
            assert text.strip() == text.strip().splitlines()[0] and \
                text.startswith(f"flashrt-ros {args[0]}: --noise-seed")
    assert [x.name for x in c.capsule("list").capsules] == before
    # the node's refusals were events; the command's own refusals never reached the node
    wait_for(lambda: len(c.events) >= events + 2, 15, "the refusals' events")
    assert [(e.operation, e.success) for e in c.events[events:]] == \
        [("restore", False), ("reset", False)]
    assert step(node) == seven
    ok(c.capsule("delete", name="root"))


@pytest.mark.parametrize("command", ["restore", "fork", "reset"])
def test_help_tells_the_noise_seed(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--noise-seed N" in text and "N in 0 .. 2^32-1; -1 keeps the sampler" in text
    if command == "fork":
        assert "with --switch only" in text

"""`flashrt-ros bt-demo --model smolvla-tiny`: the branch-and-choose tree on a VLA, by noise seed.

As test_behaviours' bt-demo test: the command in a subprocess (its policy node, the simulated arm
with its camera and the tree's node in-process there), few steps, the tree's own timeout below
the subprocess's. A policy that samples gets vary="seed" by itself: branch 0 keeps the live
sampler, branch i restores the fork with its own noise seed, and the tree's node logs each
decision's scores with the seeds; the report names them. `--vary seed` with a policy that samples
nothing is refused before the tree runs.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.ros, pytest.mark.slow]

SCORE = r"(-?\d+\.\d{4})"


def bt_demo(ros_env, tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "flashrt_ros.cli", "bt-demo",
                           "--out", str(tmp_path / "demo"), "--node-name",
                           "bt_demo_vla_%d" % os.getpid(), "--timeout", "150", *args],
                          env=dict(ros_env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=240, cwd=ROOT)


def test_bt_demo_branches_a_vla_by_noise_seed(ros_env, tmp_path):
    proc = bt_demo(ros_env, tmp_path, "--model", "smolvla-tiny", "--branches", "2", "--steps",
                   "3", "--decisions", "1", "--warmup", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "[bt-demo] tree SUCCESS" in text and "branches differ by noise seed" in text, text
    # the tree's log line of the decision: each branch's score and seed, the best one chosen
    logged = re.findall(r"ChooseBest d0: scores: (.*)", proc.stderr)
    assert len(logged) == 1, proc.stderr
    m = re.fullmatch(rf"d0-b0 {SCORE} \(live sampler\)( <- chosen)?, "
                     rf"d0-b1 {SCORE} \(seed 1\)( <- chosen)?", logged[0])
    assert m, logged[0]
    scores = [float(m[1]), float(m[3])]
    assert scores[0] != scores[1]                       # two sampled futures of one state
    chosen = scores.index(max(scores))
    assert [bool(m[2]), bool(m[4])] == [chosen == 0, chosen == 1]
    # the report: the same scores, how each branch sampled, the same choice
    assert re.search(rf"d0-b0\s+score\s+{m[1]}\s+\(policy, its live sampler\)", text), text
    assert re.search(rf"d0-b1\s+score\s+{m[3]}\s+\(policy, noise seed 1\)", text), text
    assert f"d0-b{chosen}" in next(x for x in text.splitlines() if "<- chosen" in x)
    png = tmp_path / "demo" / "bt_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bt_demo_refuses_seeds_for_a_policy_that_samples_nothing(ros_env, tmp_path):
    proc = bt_demo(ros_env, tmp_path, "--vary", "seed", "--steps", "2", "--decisions", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("flashrt-ros bt-demo: --vary seed: ") and \
        "samples no action noise" in last and "--vary command" in last, proc.stderr
    assert "[bt-demo] tree" not in proc.stdout and "Traceback" not in proc.stderr

"""Bring-up: late plans change no output, an early instruction waits, the compile cache is keyed.

A runtime built with late_plans=True captures only the step plans; LatePlans (core/bringup.py)
warms (CPU) or captures (CUDA) the prefill plans later, on scratch buffers and between steps.
Nothing captured late may change an output: a late runtime, driven while its background thread
runs, and a runtime captured all at construction go through the same observations,
instructions, decodes and resets and are compared byte for byte (on the CPU the same schedule
runs and captures nothing; the GPU variants skip without a GPU). The node variant compares a
node whose prefill plans come in the background with one that captures them at configure.
"""
import gc
import itertools
import json
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flashrt_ros.core import compile_cache
from flashrt_ros.core.bringup import (CAPTURED, PENDING, READY, LatePlans, Phases, chunk_length,
                                     process_age_s)
from flashrt_ros.core.config import TINY, RuntimeConfig
from flashrt_ros.core.exceptions import ConfigError
from flashrt_ros.core.runtime import STEP_PLANS, PolicyRuntime
from flashrt_ros.ros.waiting import wait_for

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# 42 tokens with the byte tokenizer: chunks of 16, 16, 4, 4 and two token steps
INSTRUCTION = "pick up the red cube and put it in the box"
NEEDED = ["prefill16", "prefill4"]


def obs(i: int) -> np.ndarray:
    return np.random.default_rng(i).uniform(-1, 1, 14).astype(np.float32)


def drive(rt, late: LatePlans | None = None, seed: int = 0) -> list[bytes]:
    """Steps, an instruction, steps, a decode, a reset, the live state: every output as bytes.
    Each call under the runtime's lock, as a server makes it; with `late`, the instruction first
    waits for its plans, as the node does."""
    out = []
    for i in range(4):
        with rt.lock:
            out.append(rt.step(obs(seed + i)).tobytes())
    if late is not None:
        late.wait_for_instruction(len(rt.tokenizer.encode(INSTRUCTION)))
    with rt.lock:
        out.append(np.int64(rt.set_instruction(INSTRUCTION)).tobytes())
    for i in range(4):
        with rt.lock:
            out.append(rt.step(obs(seed + 100 + i)).tobytes())
    with rt.lock:
        out.append(np.asarray(rt.decode(3)).tobytes())
        out.append(rt.last_logits().tobytes())
        rt.reset()
        out.append(rt.step(obs(seed + 7)).tobytes())
        out.append(rt.live_state().cpu().numpy().tobytes())
    return out


def runtimes(device):
    """(captured all at construction and warmed up, late with only its step plans warmed up)"""
    cfg = RuntimeConfig(device=device, cache_dir="")
    reference = PolicyRuntime(runtime_cfg=cfg)
    reference.warm_up()
    late = PolicyRuntime(runtime_cfg=cfg, late_plans=True)
    late.warm_up(prefill=False)
    return reference, late


@pytest.mark.parametrize("device", DEVICES)
def test_late_plans_change_no_output(device):
    reference, rt = runtimes(device)
    assert rt.late_plans and not set(rt.late_plans) & set(STEP_PLANS)
    if rt.use_graphs:
        assert all(rt.plans[n].captured for n in STEP_PLANS)
        assert not any(rt.plans[n].captured for n in rt.late_plans)
    late = LatePlans(rt)
    late.start()                       # steps and the instruction while it runs
    try:
        assert drive(rt, late) == drive(reference)
        assert late.wait(late.order, timeout=300), late.progress()
    finally:
        assert late.stop(timeout=300)
    assert all(s == CAPTURED for s in late.state.values()), late.errors
    if rt.use_graphs:
        assert all(rt.plans[n].captured for n in late.order if rt.plans[n].graph_eligible)
    # again, every plan in: replays of the late captures against the reference's
    assert drive(rt, late, seed=1) == drive(reference, seed=1)
    assert late.progress().startswith(f"ready: {len(late.order)} late plans")


@pytest.mark.parametrize("device", DEVICES)
def test_an_instruction_before_its_plans_waits_for_them(device):
    reference, rt = runtimes(device)
    late = LatePlans(rt)
    assert not any(late.ready(n) for n in NEEDED) and late.ready("token")
    assert not late.wait(NEEDED, timeout=0)
    said, waiting = [], threading.Event()

    def say(line):
        said.append(line)
        waiting.set()

    result = {}
    # torch's CPU thread count is per thread (OpenMP), and it decides how sums are split: this
    # thread steps with the count the reference steps with, as a server pins it in each thread
    # (serving.pin_torch_threads), whatever an earlier test left in the main thread
    threads = torch.get_num_threads()

    def instruction():
        torch.set_num_threads(threads)
        late.wait_for_instruction(len(rt.tokenizer.encode(INSTRUCTION)), say=say)
        with rt.lock:
            rt.set_instruction(INSTRUCTION)
            result["action"] = rt.step(obs(0)).tobytes()

    t = threading.Thread(target=instruction)
    t.start()
    try:
        assert waiting.wait(60), "no line said that the instruction waits"
        # nothing can make its plans ready before the schedule starts: it is still waiting
        assert t.is_alive() and "action" not in result
        late.start()
        t.join(300)
        assert not t.is_alive()
    finally:
        late.stop(timeout=300)
    assert all(n in said[0] for n in NEEDED), said
    assert "waits" in said[0] and "background" in said[0]
    reference.set_instruction(INSTRUCTION)
    assert result["action"] == reference.step(obs(0)).tobytes()


@pytest.mark.parametrize("device", DEVICES)
def test_plans_not_captured_yet_run_eagerly_with_the_same_bytes(device):
    """No schedule at all: every prefill plan runs its function eagerly."""
    reference, rt = runtimes(device)
    assert drive(rt) == drive(reference)
    if rt.use_graphs:
        assert not any(rt.plans[n].captured for n in rt.late_plans)


@pytest.mark.gpu
def test_a_late_capture_runs_no_full_collection(monkeypatch):
    """A late plan is captured under the runtime's lock while a server steps: a full collection
    there holds the GIL for 0.1-0.3 s, and the control loop would wait as long. The collector is
    held off during the capture instead, and on again after it."""
    rt = PolicyRuntime(runtime_cfg=RuntimeConfig(device="cuda", cache_dir=""), late_plans=True)
    capturing, collected = [], []
    collect, capture_plan = gc.collect, rt.capture_plan

    def counted_collect(*args, **kwargs):
        collected.extend(capturing)
        return collect(*args, **kwargs)

    def capture(name):
        capturing.append(name)
        try:
            capture_plan(name)
        finally:
            capturing.pop()
    monkeypatch.setattr(gc, "collect", counted_collect)
    monkeypatch.setattr(rt, "capture_plan", capture)
    late = LatePlans(rt)
    late.run()
    assert all(s == CAPTURED for s in late.state.values()), late.errors
    assert all(rt.plans[n].captured for n in late.order if rt.plans[n].graph_eligible)
    assert collected == [] and gc.isenabled()


def test_schedule_runs_the_shortest_chunks_first_and_skips_unusable_buckets():
    rt = PolicyRuntime(runtime_cfg=RuntimeConfig(device="cpu", cache_dir=""), late_plans=True)
    late = LatePlans(rt)
    lengths = [chunk_length(n) for n in late.order]
    assert lengths == sorted(lengths) and lengths
    assert max(lengths) <= rt.max_tokens       # tiny: 4096 and 1024 exceed its context
    assert set(late.order) <= set(rt.late_plans)
    assert late.progress() == f"{len(late.order)} late plans pending"
    late.run()                                 # the same schedule, in this thread
    assert late.progress().startswith("ready:") and set(late.values()) == \
        {f"{n}_{part}_ms" for n in late.order for part in ("warm", "capture")}


def test_stop_ends_the_schedule_after_the_plan_in_progress():
    rt = PolicyRuntime(runtime_cfg=RuntimeConfig(device="cpu", cache_dir=""), late_plans=True)
    late = LatePlans(rt)
    with rt.lock:                   # the first capture waits here: stop while it is held
        late.start()
        wait_for(lambda: late.warm_s, 60, "the first warm-up")
        late.stop(timeout=0)
    assert late.stop(timeout=60)
    first, *rest = late.order
    assert late.state[first] == READY and all(late.state[n] == PENDING for n in rest)
    assert not late.wait(late.order, timeout=0)


def test_a_logger_that_fails_ends_no_schedule():
    """A log call that raises in the background thread must not end the schedule: plans left
    pending would keep an instruction waiting forever."""
    rt = PolicyRuntime(runtime_cfg=RuntimeConfig(device="cpu", cache_dir=""), late_plans=True)

    def say(msg):
        raise OSError("the log is gone")
    late = LatePlans(rt, say=say)
    late.start()
    try:
        assert late.wait(late.order, timeout=120)
        assert all(late.state[n] == CAPTURED for n in late.order)
    finally:
        assert late.stop(timeout=120)


def test_eager_kernels_beside_the_schedule_wait_for_the_warm_up_in_progress(monkeypatch):
    """An instruction's eager prefill (the node holds `kernels()` around it) never runs beside a
    warm-up, which autotunes the same Triton kernels on CUDA; it says that it waits."""
    from flashrt_ros.core import bringup
    rt = PolicyRuntime(runtime_cfg=RuntimeConfig(device="cpu", cache_dir=""), late_plans=True)
    late = LatePlans(rt)
    first = late.order[0]
    inside, leave = threading.Event(), threading.Event()

    class HeldScratch(bringup._Scratch):
        def __init__(self, rt):
            super().__init__(rt)
            fn, graph = self.fns[first]

            def held():
                inside.set()
                assert leave.wait(60)
                fn()
            self.fns[first] = (held, graph)
    monkeypatch.setattr(bringup, "_Scratch", HeldScratch)
    said, ran = [], threading.Event()

    def instruction():
        with late.kernels(say=said.append):
            ran.set()
    late.start()
    try:
        assert inside.wait(60)
        t = threading.Thread(target=instruction)
        t.start()
        wait_for(lambda: said, 60, "the instruction to say that it waits")
        assert not ran.is_set() and f"warm-up of {first}" in said[0]
        leave.set()
        assert ran.wait(60)
        t.join(60)
        assert late.wait(late.order, timeout=120)
    finally:
        leave.set()
        assert late.stop(timeout=120)


def test_process_age_counts_from_the_process_start():
    """The age of a fresh interpreter, read as it starts, is at most the time since it was
    spawned (boot time in /proc/stat is whole seconds: an age computed from it could be up to a
    second more)."""
    import subprocess
    import sys
    import time
    code = "from flashrt_ros.core.bringup import process_age_s; print(process_age_s())"
    for _ in range(3):
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
        assert 0 <= float(out) <= time.monotonic() - t0 + 0.02


def test_a_held_schedule_starts_at_release_or_when_an_instruction_needs_it():
    for release in ("release", "instruction"):
        rt = PolicyRuntime(runtime_cfg=RuntimeConfig(device="cpu", cache_dir=""),
                           late_plans=True)
        late = LatePlans(rt)
        late.start(hold_s=3600)             # would outlast the test's timeouts
        try:
            if release == "release":
                late.release()
                assert late.wait(late.order, timeout=120), late.progress()
            else:
                late.wait_for_instruction(len(rt.tokenizer.encode(INSTRUCTION)))
                assert all(late.ready(n) for n in NEEDED)
        finally:
            assert late.stop(timeout=120)


def test_phases_time_each_phase_and_the_process_age():
    p = Phases()
    with p.phase("runtime"):
        pass
    at = p.mark("active")
    assert 0 < at < 86400 and p.mark("active") == at        # a milestone is kept once
    assert 0 <= p.seconds["runtime"] < 1 and at <= process_age_s()
    assert set(p.values()) == {"runtime_s", "active_at_s"}
    assert "runtime" in p.text() and "after the interpreter started" in p.text()


# -- the compile cache ---------------------------------------------------------------------
GPU_FIELDS = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "driver": "NVRM 550.54.15",
              "driver_api": 12040}


def test_cache_key_changes_when_anything_it_covers_changes():
    fields = {**GPU_FIELDS, **compile_cache.package_fields()}
    assert {"torch", "triton", "fla", "flashrt_ros", "cuda", "python"} <= set(fields)
    key = compile_cache.cache_key(fields)
    assert key == compile_cache.cache_key(dict(reversed(list(fields.items()))))
    for name, value in fields.items():
        assert compile_cache.cache_key({**fields, name: f"{value}+other"}) != key, name


def test_a_package_version_changes_the_key(monkeypatch):
    before = compile_cache.cache_key({**GPU_FIELDS, **compile_cache.package_fields()})
    real = compile_cache._version
    monkeypatch.setattr(compile_cache, "_version",
                        lambda dist: "9.9.9" if dist == "triton" else real(dist))
    assert compile_cache.package_fields()["triton"] == "9.9.9"
    assert compile_cache.cache_key({**GPU_FIELDS, **compile_cache.package_fields()}) != before


def test_nothing_is_set_on_the_cpu(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cfg = RuntimeConfig(device="cpu", cache_dir=str(tmp_path / "cache"))
    assert cfg.resolve(TINY).compile_cache == ""
    assert "TRITON_CACHE_DIR" not in os.environ and not (tmp_path / "cache").exists()


def fake_cuda(monkeypatch, fields):
    monkeypatch.setattr(compile_cache, "key_fields", lambda device: dict(fields))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    return SimpleNamespace(type="cuda")


def test_the_cache_directory_is_named_by_the_key(monkeypatch, tmp_path):
    fields = {**GPU_FIELDS, **compile_cache.package_fields()}
    path = compile_cache.use_compile_cache(str(tmp_path), fake_cuda(monkeypatch, fields))
    keyed = tmp_path / compile_cache.cache_key(fields)
    assert path == str(keyed / "triton") and os.path.isdir(path)
    assert json.loads((keyed / compile_cache.KEY_FILE).read_text()) == fields
    assert os.environ["TRITON_CACHE_DIR"] == path and os.environ["TRITON_CACHE_AUTOTUNING"] == "1"
    # another driver: another directory, the first one left as it was
    other = compile_cache.use_compile_cache(
        str(tmp_path), fake_cuda(monkeypatch, {**fields, "driver": "NVRM 570.86.10"}))
    assert other != path and os.path.isdir(path) and os.environ["TRITON_CACHE_DIR"] == other


def test_an_unwritable_cache_directory_is_refused(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    device = fake_cuda(monkeypatch, GPU_FIELDS)
    with pytest.raises(ConfigError, match="runtime.cache_dir: expected a writable directory"):
        compile_cache.use_compile_cache(str(tmp_path / "file"), device)
    assert "TRITON_CACHE_DIR" not in os.environ


@pytest.mark.gpu
def test_the_gpu_key_names_the_device_and_driver(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    fields = compile_cache.key_fields(torch.device("cuda"))
    assert fields["gpu"] == torch.cuda.get_device_name() and fields["driver_api"]
    path = compile_cache.use_compile_cache(str(tmp_path), torch.device("cuda"))
    assert path.startswith(str(tmp_path / compile_cache.cache_key(fields)))


# -- the node ------------------------------------------------------------------------------
NODE_SEQUENCE = itertools.count()


@pytest.mark.ros
def test_a_late_captured_node_acts_as_one_captured_at_configure(tmp_path):
    import rclpy
    from std_msgs.msg import String

    from flashrt_ros.ros.publishing import LATCHED
    from node_client import InProcessNode, chunk_bytes
    ros_context = rclpy.Context()
    rclpy.init(context=ros_context)
    nodes = {}
    try:
        for mode in ("background", "configure"):
            ns = f"/bringup{os.getpid()}_{mode}_{next(NODE_SEQUENCE)}"
            nodes[mode] = InProcessNode(ros_context, ns, capture_prefill=mode,
                                        control_mode="observation", observation_qos="reliable",
                                        status_rate_hz=20.0, **{
                                            "runtime.device": "cpu",
                                            "store.capsule_dir": str(tmp_path / mode)})
        actions = {}
        for mode, n in nodes.items():
            c = n.client
            assert c.transition("configure") and c.transition("activate")
            c.wait_connected()
            got = [chunk_bytes(c.step(obs(i))) for i in range(3)]
            pub = c.publisher(String, f"{c.target}/instruction", qos=LATCHED)
            pub.publish(String(data=INSTRUCTION))
            wait_for(lambda: n.node.runtime.context_len > 0, 60, "the instruction prefilled")
            got += [chunk_bytes(c.step(obs(100 + i))) for i in range(3)]
            actions[mode] = got
            if mode == "background":
                late = n.node.late
                assert late is not None and late.wait(late.order, timeout=120)
                status = wait_for(lambda: next((s for s in reversed(c.statuses)
                                                if s.bringup.startswith("ready:")), None),
                                  30, "~/status saying the late plans are ready")
                assert f"{len(late.order)} late plans" in status.bringup
                diag = wait_for(lambda: next((d for d in reversed(c.diagnostics)
                                              if d.status and d.status[0].name.startswith(c.target)
                                              and any(v.key == "bringup.runtime_s"
                                                      for v in d.status[0].values)), None),
                                30, "/diagnostics with the bring-up phases")
                keys = {v.key for v in diag.status[0].values}
                assert {"bringup", "bringup.active_at_s", "bringup.first action_at_s"} <= keys
                assert any(k.startswith("late.prefill") for k in keys)
            else:
                assert n.node.late is None
        assert actions["background"] == actions["configure"]
    finally:
        for n in nodes.values():
            n.close()
        rclpy.try_shutdown(context=ros_context)


@pytest.mark.gpu
def test_weights_drawn_for_the_gpu_are_the_cpu_ones():
    """The seed draws on the CPU generator, each tensor goes to the device as it is drawn: the
    same bytes on every device (the tiny heads were trained against them)."""
    cfg = {"cache_dir": "", "cuda_graphs": False}
    cpu = PolicyRuntime(runtime_cfg=RuntimeConfig(device="cpu", **cfg))
    gpu = PolicyRuntime(runtime_cfg=RuntimeConfig(device="cuda", **cfg))
    assert cpu.model.weights_digest == gpu.model.weights_digest
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())


# -- default weights drawn on the device ---------------------------------------------------
def test_the_counter_hash_has_one_value_in_both_forms():
    """numpy's uint32 form (the CPU) and the int64 form (a GPU) of the hash agree."""
    from flashrt_ros.core import seeded
    i = np.arange(0, 1 << 16, dtype=np.uint32) * np.uint32(65521)
    cpu = seeded._top24(0, 1 << 16, 123456789, 0xDEADBEEF, torch.device("cpu"))
    ints = torch.arange(0, 1 << 16, dtype=torch.int64)
    wide = seeded._hash32(seeded._hash32((ints + 123456789) & seeded.MASK32) ^ 0xDEADBEEF) >> 8
    assert torch.equal(cpu, wide)
    assert torch.equal(torch.from_numpy(seeded._hash32(i).astype(np.int64)),
                       seeded._hash32(torch.from_numpy(i.astype(np.int64))))


def test_counter_draws_have_the_asked_spread_and_depend_on_seed_and_name():
    from flashrt_ros.core.seeded import CounterRNG
    rng = CounterRNG(0, "cpu")
    w = rng.normal("w", (1000, 1000), 0.02)
    assert abs(w.std().item() - 0.02) < 2e-4 and abs(w.mean().item()) < 2e-4
    u = rng.uniform("u", (100_000,), -4.0, -2.0)
    assert -4.0 <= u.min().item() and u.max().item() < -2.0
    assert torch.equal(w, CounterRNG(0, "cpu").normal("w", (1000, 1000), 0.02))
    assert not torch.equal(w, rng.normal("v", (1000, 1000), 0.02))
    assert not torch.equal(w, CounterRNG(1, "cpu").normal("w", (1000, 1000), 0.02))


def test_tiny_keeps_the_cpu_generator_its_heads_were_trained_with():
    rt = PolicyRuntime.from_pretrained("tiny", runtime_cfg=RuntimeConfig(device="cpu",
                                                                         cache_dir=""))
    assert TINY.seed_rng == "cpu" and rt.model.untrained == ("backbone",)


@pytest.mark.gpu
def test_counter_draws_on_the_gpu_are_the_cpu_ones():
    import dataclasses

    from flashrt_ros.core.seeded import CounterRNG
    for shape in [(7,), (1000, 333), (CounterRNG.CHUNK + 5,)]:
        a = CounterRNG(3, "cpu").normal("x", shape, 0.5)
        b = CounterRNG(3, "cuda").normal("x", shape, 0.5).cpu()
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), shape
    cfg = dataclasses.replace(TINY, seed_rng="device")
    rc = {"cache_dir": "", "cuda_graphs": False}
    cpu = PolicyRuntime(cfg, RuntimeConfig(device="cpu", **rc))
    gpu = PolicyRuntime(cfg, RuntimeConfig(device="cuda", **rc))
    assert cpu.model.weights_digest == gpu.model.weights_digest

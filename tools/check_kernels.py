"""Compile every Triton kernel launch the runtime makes for the GPUs it runs on, without a GPU.

core/fused.py's kernels and the prefill attention run on CUDA only, and CI has no GPU: its test
lane runs them through Triton's interpreter (test/test_fused_kernels.py), which checks what they
compute but compiles nothing. This compiles them: each launcher is called as the model calls it
on hybrid-0.8b's shapes (and SmolVLA's norm and RoPE), in bf16 and fp32, with the kernels
replaced by recorders, and every distinct launch (kernel, argument types, constexprs, warps,
stages) goes through Triton's compiler - its LLVM and the ptxas it ships - to a cubin for each
target:

    90   H100 / H200, programmatic dependent launch on (fused.pdl)
    87   Jetson Orin, without it (its grid dependency instructions are sm_90 PTX)
    101  Jetson Thor, as the ptxas of CUDA 12.8 names its architecture (CUDA 13: sm_110)

It catches what only compiling shows: a construct Triton cannot lower, an instruction a target
lacks, shared memory beyond what a target gives a block. What it does not check: values (the
interpreter and the GPU tests do) and speed; launches are compiled without the divisibility hints
Triton derives from a real launch's pointers.

    python tools/check_kernels.py                  # every target
    python tools/check_kernels.py --targets 90 --list

Needs Triton (x86_64: requirements.txt) and TRITON_INTERPRET unset. Run by
test/test_kernels_compile.py. Exits non-zero naming each launch that failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# target -> (what it is, shared memory one block may use in bytes (None: not checked), PDL)
TARGETS = {90: ("H100 / H200", 232448, True),
           87: ("Jetson Orin", 166912, False),
           101: ("Jetson Thor", None, True)}
TYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
         "torch.int64": "i64", "torch.int32": "i32", "torch.uint8": "u8", "torch.bool": "i1"}
OPTIONS = ("num_warps", "num_stages", "num_ctas")


class Recorder:
    """Stands for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, self.kernel, args, kwargs))


def launches(pdl: bool, dtype) -> list:
    """(kernel name, kernel, args, kwargs) of every launch the calls below make in `dtype`."""
    import torch

    from flashrt_ros.core import fused
    from flashrt_ros.core.arena import META_LEN
    from flashrt_ros.core.config import load_preset
    from flashrt_ros.core.models.qwen3_5 import prefill_attention_qwen3_5 as pa
    from flashrt_ros.core.models.qwen3_5.modeling_qwen3_5 import RotaryEmbedding

    log = []
    kernels = fused._kernels()
    attend, combine = pa._kernels()
    saved = fused._kernels, fused.pdl, pa._kernels
    fused._kernels = lambda: {k: Recorder(k, v, log) for k, v in kernels.items()}
    fused.pdl = lambda device: pdl
    pa._kernels = lambda: (Recorder("prefill_attention", attend, log),
                           Recorder("prefill_attention_combine", combine, log))
    try:
        t = load_preset("hybrid-0.8b").text
        bf = dtype
        e = lambda *shape, dtype=bf: torch.empty(*shape, dtype=dtype)       # noqa: E731
        d, F, V = t.hidden_size, t.intermediate_size, t.vocab_size
        H, Hkv, D = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        Hk, Hv, Dk, Dv = (t.linear_num_key_heads, t.linear_num_value_heads,
                          t.linear_key_head_dim, t.linear_value_head_dim)
        C, Kc, kd = t.conv_dim, t.linear_conv_kernel_dim, Hk * Dk
        scale = e(d, dtype=torch.float32)
        # a step: each projection's GEMV (the norm inside it where one comes before)
        for N in (C + Hv * Dv + 2 * Hv, (2 * H + 2 * Hkv) * D, 2 * F, V):
            fused.norm_gemv(e(d), e(d), scale, 1e-6, e(N, d))
            fused.norm_gemv(e(d), None, scale, 1e-6, e(N, d))
        for K in (Hv * Dv, H * D):
            fused.gemv(e(K), e(d, K))
        fused.gemv(e(2 * F), e(d, F), swiglu=True)
        fused.conv_step(e(C), e(Kc - 1, C), e(C, Kc))
        fused.gdn_step(e(Hk, Dk), e(Hk, Dk), e(Hv, Dv), e(Hv), e(Hv), scale[:Hv], scale[:Hv],
                       e(Hv, Dk, Dv, dtype=torch.float32), Dk ** -0.5, 1e-6)
        fused.gated_rms_norm(e(Hv, Dv), e(Hv, Dv), e(Dv), 1e-6)
        # the same layer with fused.gdn_fusion: the conv and the gated norm inside its GEMVs
        N_in = C + Hv * Dv + 2 * Hv
        for delta in (e(d), None):
            fused.norm_gemv_conv(e(d), delta, scale, 1e-6, e(N_in, d), e(Kc - 1, C), e(C, Kc))
        fused.gated_norm_gemv(e(Hv, Dv), e(Hv, Dv), e(Dv), 1e-6, e(d, Hv * Dv))
        with torch.device("cpu"):
            rot = RotaryEmbedding(t, 4096, bf)
        kv, meta = e(4096, 2, Hkv, D), torch.zeros(META_LEN, dtype=torch.int64)
        p = e((2 * H + 2 * Hkv) * D)
        fused.attention_prep(p, e(H + Hkv, D, dtype=torch.float32), 1e-6, rot, kv, meta, H,
                             Hkv, D)
        fused.decode_attention(e(H, D), e(H, D), kv, meta)
        # a prefill chunk of each default bucket: its rows through the row kernels
        for T in (4, 16, 64, 256, 1024, 4096):
            fused.add_rms_norm(e(T, d), e(T, d), scale, 1e-6)
            fused.add_rms_norm(e(T, d), None, scale, 1e-6)
            fused.swiglu(e(T, 2 * F))
            fused.conv_rows(e(T, C), e(Kc - 1, C), e(C, Kc), (kd, kd, C - 2 * kd))
            fused.gated_rms_norm(e(T, Hv, Dv), e(T, Hv, Dv), e(Dv), 1e-6)
            qg = e(T, H, 2, D)
            pa.prefill_attention(qg[:, :, 0], qg[:, :, 1], kv, meta)
        # SmolVLA: Llama's norm (rounded first) and RoPE of a q/k/v slice into grouped heads
        for n in (960, 720):
            fused.add_rms_norm(e(50, n), e(50, n), e(n), 1e-5, round_first=True)
        qkv = e(50, 3 * 5 * 64)
        x = qkv[:, 5 * 64:10 * 64].view(50, 5, 64)
        table = (e(50, 1, 64, dtype=torch.float32), e(50, 1, 64, dtype=torch.float32))
        for tab in (table, None):
            fused.rope_heads(x, tab, e(50, 15, 64), 3)
    finally:
        fused._kernels, fused.pdl, pa._kernels = saved
    return log


def describe(name, kernel, args, kwargs):
    """-> (key, signature, constexprs, options) of a launch: what Triton compiles it from."""
    import torch
    bound = dict(zip(kernel.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
    signature, constexprs = {}, {}
    for p in kernel.params:
        v = bound.get(p.name, p.default)
        if p.is_constexpr or v is None:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + TYPES[str(v.dtype)]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{name}: argument {p.name} of type {type(v).__name__}")
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    key = (name, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)),
           tuple(sorted(options.items())))
    return key, signature, constexprs, options


def compile_one(job):
    """Compile one launch for one target -> (target, what, shared bytes or None, error or None)."""
    target, name, signature, constexprs, options = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashrt_ros.core import fused
    from flashrt_ros.core.models.qwen3_5 import prefill_attention_qwen3_5 as pa
    kernels = {**fused._kernels(), "prefill_attention": pa._kernels()[0],
               "prefill_attention_combine": pa._kernels()[1]}
    what = f"{name}({', '.join(f'{k}={v}' for k, v in constexprs.items() if v is not None)}" \
           f"{'; ' if options else ''}{', '.join(f'{k}={v}' for k, v in options.items())})"
    try:
        src = ASTSource(fn=kernels[name], signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", target, 32), options=options)
        if not compiled.asm.get("cubin"):
            return target, what, None, "no cubin"
        return target, what, compiled.metadata.shared, None
    except Exception as e:  # noqa: BLE001 - reported per launch
        return target, what, None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(str(t) for t in TARGETS),
                    help="compute capabilities (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--list", action="store_true", help="print each launch compiled")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("check_kernels: TRITON_INTERPRET=1 builds the kernels for the interpreter; run it "
              "without", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("check_kernels: Triton is not installed (requirements.txt installs it on x86_64 "
              "Linux)", file=sys.stderr)
        return 2
    import torch
    targets = [int(t) for t in args.targets.split(",")]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"check_kernels: --targets: expected some of {sorted(TARGETS)}, found {unknown}",
              file=sys.stderr)
        return 2
    jobs = []
    for target in targets:
        seen = set()
        for launch in (launch for dtype in (torch.bfloat16, torch.float32)
                       for launch in launches(TARGETS[target][2], dtype)):
            key, signature, constexprs, options = describe(*launch)
            if key not in seen:
                seen.add(key)
                jobs.append((target, launch[0], signature, constexprs, options))
    print(f"[kernels] compiling {len(jobs)} launches for "
          f"{', '.join(f'sm_{t} ({TARGETS[t][0]})' for t in targets)} ...", flush=True)
    t0 = time.time()
    failed = 0
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for target, what, shared, error in pool.map(compile_one, jobs):
            limit = TARGETS[target][1]
            if error is None and limit is not None and shared > limit:
                error = f"{shared} bytes of shared memory, the target gives a block {limit}"
            if error is not None:
                failed += 1
                print(f"[kernels] sm_{target} {what}: FAILED: {error}", flush=True)
            elif args.list:
                print(f"[kernels] sm_{target} {what}: ok, {shared} bytes shared", flush=True)
    print(f"[kernels] {len(jobs) - failed} of {len(jobs)} compiled in {time.time() - t0:.0f} s"
          + (f"; {failed} failed" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Our Qwen3.5 backbone against HuggingFace transformers' `Qwen3_5ForCausalLM`, token for token.

transformers builds a random model with the preset's shapes (seeded, `initializer_range` well above
its 0.02 default, and the norms and DeltaNet gates that it initialises to constants drawn at
random too), casts it to the preset's dtype (or --dtype) and writes it with `save_pretrained`;
`PolicyRuntime.from_pretrained` serves that directory. For random prompts of several lengths:
  * the last-position logits (max abs difference, argmax);
  * N greedy tokens: `rt.decode(N)` against `generate(do_sample=False)`; at the first divergence,
    both sides' top-1 minus top-2 logit margin there (transformers' from that step of generate,
    ours recomputed by prefilling the same prefix);
  * capsules: our runtime snapshotted after k of those tokens in every tier, run on (other tokens,
    a control step), restored; the restored state bytes and the continuation must equal the
    uninterrupted run.
Below fp32 a third model joins as the yardstick: the same checkpoint upcast to fp32, run on
transformers' own torch functions ("fp32" in the report). How far transformers' bf16 logits lie
from it is the rounding noise of the dtype; ours are judged against that, and at a divergence it
says which of the two tokens the exact arithmetic prefers. (With random weights and a 248k
vocabulary, bf16 rounding alone moves logits by more than the top-1/top-2 gaps: transformers'
bf16 model does not reproduce its own fp32 greedy tokens either. `--dtype float32` is then the
token-identity test; fla refuses fp32, so there both sides run torch code.)
The report records which implementation each side ran (fla kernels, torch references, CUDA
graphs), from the functions each side resolved and, on CUDA, the kernels a profiled call launched.

Exit status 0 when every greedy token and every capsule continuation is identical (and the preset's
config survived the round trip through transformers' config.json); 1 otherwise. The report is
written either way: `<out>.md` and `<out>.json` (default docs/bench/transformers-compare-<device>,
with -<dtype> appended when --dtype is not the preset's).

    python bench/compare_transformers.py                  # CUDA: hybrid-0.8b (bf16), 16/300/2048, 256 tokens
    python bench/compare_transformers.py --dtype float32  # CUDA: the same shapes in fp32
    python bench/compare_transformers.py --device cpu     # tiny preset, well under a minute
    python bench/compare_transformers.py --device cpu --preset tiny --tokens 32 --lengths 5,40 --out /tmp/cmp
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import os
import sys
import tempfile
import time
import types

import numpy as np
import torch

if __package__ in (None, ""):      # `python bench/compare_transformers.py` from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (cuda_kernel_profile, device_slug, environment,  # noqa: E402
                          package_version, write_report)
from flashrt_ros.capsules.store import CapsuleStore  # noqa: E402
from flashrt_ros.core.config import (RuntimeConfig, StoreConfig, load_preset,  # noqa: E402
                                     resolve_device)
from flashrt_ros.core.kernels import fla_available  # noqa: E402
from flashrt_ros.core.runtime import PolicyRuntime  # noqa: E402

GPU_LENGTHS = (16, 300, 2048)       # one bucket; several buckets + token steps; two 1024 chunks
CPU_LENGTHS = (5, 70, 133)          # token steps only; 64 + 4 + 2 chunks; 2x64 + 4 + 1
GPU_TOKENS, CPU_TOKENS = 256, 64
# initializer_range of the random model: at transformers' 0.02 default a random model's logits
# are nearly flat; at 0.2 the top-1 / top-2 gaps are mostly well above fp32 rounding, so
# identical tokens say something about the two implementations
INIT_STD = 0.2
MEASURED_CODE = ("flashrt_ros/core", "flashrt_ros/capsules", "config/presets",
                 "bench/compare_transformers.py", "bench/common.py")
# transformers' DeltaNet kernel hooks, by report row: (the DeltaNet instance attribute of the
# older transformers 5.x code, the module-level function of the newer code)
HOOKS = {
    "delta rule (prefill)": ("chunk_gated_delta_rule", "torch_chunk_gated_delta_rule"),
    "delta rule (decode step)": ("recurrent_gated_delta_rule", "torch_recurrent_gated_delta_rule"),
    "short conv (prefill)": ("causal_conv1d_fn", "causal_conv1d_fn"),
    "short conv (decode step)": ("causal_conv1d_update", "causal_conv1d_update"),
}
# rows of the "which implementation" table; every side fills each one
PATH_ROWS = ("attention", *HOOKS, "gated output norm", "fla found", "causal_conv1d found",
             "CUDA graphs", "dtype", "prompt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--preset", default=None,
                   help="model preset whose shapes the random model gets (default: hybrid-0.8b on "
                        "CUDA, tiny on the CPU)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype of the checkpoint and of both sides (default: the preset's)")
    p.add_argument("--lengths", default=None,
                   help="comma-separated prompt lengths (default: %s on CUDA, %s on the CPU)"
                        % (",".join(map(str, GPU_LENGTHS)), ",".join(map(str, CPU_LENGTHS))))
    p.add_argument("--tokens", type=int, default=None,
                   help=f"greedy tokens generated per prompt (default: {GPU_TOKENS} on CUDA, "
                        f"{CPU_TOKENS} on the CPU)")
    p.add_argument("--capsule-at", type=int, default=None,
                   help="snapshot after this many generated tokens (default: a quarter of --tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts (default 0)")
    p.add_argument("--init-std", type=float, default=INIT_STD,
                   help=f"initializer_range of the random model (default {INIT_STD})")
    p.add_argument("--kernels", default="auto", choices=("auto", "fla", "chunked", "reference"),
                   help="our runtime's kernels (default auto: the runtime's choice - fla on CUDA "
                        "when importable, chunked on the CPU - except reference for fp32 on CUDA, "
                        "which fla refuses)")
    p.add_argument("--reference-kernels", default="auto", choices=("auto", "torch"),
                   help="what transformers runs: auto = what it resolves (fla / causal_conv1d when "
                        "importable, except its torch functions for fp32, which fla refuses); "
                        "torch = its own torch functions")
    p.add_argument("--no-graphs", action="store_true",
                   help="run our runtime eagerly on CUDA (default: captured CUDA graphs)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on the CPU (default 1)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="write the random checkpoint here and keep it (default: a temporary "
                        "directory, removed at the end)")
    p.add_argument("--out", default=None,
                   help="output path stem; writes <stem>.md and <stem>.json (default: "
                        "docs/bench/transformers-compare-<device>, plus -<dtype> when --dtype is "
                        "not the preset's)")
    return p.parse_args(argv)


def log(msg):
    print(f"[compare_transformers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ieee_fp32() -> None:
    """fp32 matmuls and convolutions in IEEE fp32 on CUDA, not TF32 (cuDNN convolutions default
    to TF32). torch >= 2.9 has per-backend `fp32_precision`, and refuses to read the legacy
    `allow_tf32` flags once the two have been mixed; older releases only have the flags."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "ieee"
        cudnn.conv.fp32_precision = "ieee"
    else:
        matmul.allow_tf32 = False
        cudnn.allow_tf32 = False


# -- the reference checkpoint -----------------------------------------------------------------
def reference_config(transformers, text, init_std):
    """transformers' Qwen3_5TextConfig with the preset's text fields.

    `TextConfig.to_hf()` is the config.json our own `save_pretrained` writes; its keys are
    Qwen3_5TextConfig's fields (model_type and architectures are the class's, not arguments)."""
    fields = {k: v for k, v in text.to_hf().items() if k not in ("model_type", "architectures")}
    return transformers.Qwen3_5TextConfig(initializer_range=init_std, **fields)


def randomise_constants(model, seed):
    """Draw the parameters transformers initialises to constants, so that a wrong reading of any
    of them changes the output: the zero-centred RMSNorm weights (`x * (1 + w)`: the layer norms,
    q/k norms and the final norm), the DeltaNet's gated output norm (`w * x`, ones) and its
    dt_bias (ones). Values come from a CPU generator: the same on every device."""
    g = torch.Generator().manual_seed(seed + 1)
    ranges = {"linear_attn.dt_bias": (-2.0, 1.0), "linear_attn.norm.weight": (0.5, 1.5)}
    zero_centred = ("input_layernorm.weight", "post_attention_layernorm.weight",
                    "q_norm.weight", "k_norm.weight", "model.norm.weight")
    drawn = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            lo_hi = next((r for suffix, r in ranges.items() if name.endswith(suffix)), None)
            if lo_hi is None and name.endswith(zero_centred):
                lo_hi = (-0.3, 0.3)
            if lo_hi is not None:
                p.copy_(torch.empty(p.shape).uniform_(*lo_hi, generator=g))
                drawn += 1
    return drawn


def make_reference(transformers, cfg, dtype, seed, init_std, directory):
    """The random transformers model in `dtype`, written to `directory` (on the CPU), and below
    fp32 also its fp32 upcast (the same values). Built on the CPU so that the weights are the
    same whatever device runs the comparison."""
    torch.manual_seed(seed)
    model = transformers.Qwen3_5ForCausalLM(reference_config(transformers, cfg.text, init_std))
    drawn = randomise_constants(model, seed)
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(directory)
    exact = copy.deepcopy(model).float() if dtype != "float32" else None
    return model, exact, drawn


# -- which implementation transformers runs ---------------------------------------------------
def _implementation(fn) -> str:
    """Where the code behind a transformers kernel hook lives: the first function outside
    transformers (and outside wrapper machinery) reachable through the hook's closure or
    `__wrapped__` chain, e.g. `fla.ops.gated_delta_rule.chunk.chunk_gated_delta_rule`; else the
    hook's own torch code in transformers."""
    if fn is None:
        return "none"
    wrappers = ("transformers", "functools", "kernels", "torch", "inspect", "typing")
    seen, stack = set(), [fn]
    while stack:
        f = stack.pop()
        if id(f) in seen or not callable(f):
            continue
        seen.add(id(f))
        module = getattr(f, "__module__", None) or ""
        if isinstance(f, (types.FunctionType, types.BuiltinFunctionType)) and module and \
                not module.startswith(wrappers):
            return f"{module}.{getattr(f, '__qualname__', getattr(f, '__name__', '?'))}"
        for cell in getattr(f, "__closure__", None) or ():
            try:
                stack.append(cell.cell_contents)
            except ValueError:          # an empty cell
                pass
        if getattr(f, "__wrapped__", None) is not None:
            stack.append(f.__wrapped__)
    base = inspect.unwrap(fn)
    return f"torch reference ({base.__module__}.{base.__qualname__})"


def _deltanet(model):
    return next(m for n, m in model.named_modules() if n.endswith("linear_attn"))


def has_module_hooks(model) -> bool:
    """Whether this transformers calls module-level DeltaNet kernel functions (newer 5.x code),
    which `torch_functions` can swap; the older code picks them per layer in __init__."""
    modeling = sys.modules[type(model).__module__]
    return not any(attr in vars(_deltanet(model)) for attr, _ in HOOKS.values()) and \
        all(hasattr(modeling, name) for _, name in HOOKS.values())


@contextlib.contextmanager
def torch_functions(model):
    """Inside the block, transformers' Qwen3.5 calls its own torch functions, not fla's or
    causal_conv1d's: the module-level functions, whose decorator picked the package at import,
    are swapped for the torch function each one wraps (its `__wrapped__`)."""
    modeling = sys.modules[type(model).__module__]
    saved = {name: getattr(modeling, name) for _, name in HOOKS.values()}
    try:
        for name, fn in saved.items():
            setattr(modeling, name, inspect.unwrap(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(modeling, name, fn)


class Reference:
    """A transformers model on the device, run on what it resolved or on its torch functions."""

    def __init__(self, transformers, model, device, torch_only: bool):
        if torch_only and not has_module_hooks(model):
            sys.exit(f"compare_transformers: transformers {transformers.__version__} picks its "
                     f"DeltaNet kernels per layer in __init__; running its torch functions needs "
                     f"the module-level kernel hooks of newer 5.x releases (5.17 has them)")
        self.transformers, self.model, self.device = transformers, model.to(device), device
        self.torch_only = torch_only

    def _running(self):
        return torch_functions(self.model) if self.torch_only else contextlib.nullcontext()

    def last_logits(self, ids) -> torch.Tensor:
        """fp32 logits [vocab] of the next token after `ids` (one forward, no cache), on the CPU."""
        with self._running(), torch.no_grad():
            out = self.model(torch.tensor([ids], device=self.device), use_cache=False,
                             logits_to_keep=1)
        return out.logits[0, -1].float().cpu()

    def generate(self, ids, n):
        """n greedy tokens from `generate`, and the fp32 logits it chose each one from [n, vocab].

        An explicit all-ones mask: without one generate() takes prompt tokens equal to
        pad_token_id for padding; no EOS, so exactly n tokens."""
        x = torch.tensor([ids], device=self.device)
        with self._running(), torch.no_grad():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                      eos_token_id=None, pad_token_id=0, min_new_tokens=n,
                                      max_new_tokens=n, output_logits=True,
                                      return_dict_in_generate=True)
        return out.sequences[0, len(ids):].tolist(), torch.stack([s[0] for s in out.logits]).float()

    def paths(self) -> dict:
        """The implementations this model's calls reach on this machine (both code styles of
        transformers 5.x: per-layer attributes set in the DeltaNet's __init__, or module-level
        functions whose decorator picked fla / causal_conv1d at import)."""
        with self._running():
            modeling = sys.modules[type(self.model).__module__]
            deltanet = _deltanet(self.model)
            out = {"attention": f"{getattr(self.model.config, '_attn_implementation', '?')} "
                                f"(config._attn_implementation)"}
            for row, (attr, func) in HOOKS.items():
                if attr in vars(deltanet):
                    fn = vars(deltanet)[attr]
                    # the older code runs the DeltaNet's nn.Conv1d when causal_conv1d is missing
                    out[row] = _implementation(fn) if fn is not None else "torch (nn.Conv1d)"
                else:
                    out[row] = _implementation(getattr(modeling, func, None))
        norm = type(deltanet.norm)
        out["gated output norm"] = f"{norm.__module__}.{norm.__qualname__}"
        import_utils = getattr(self.transformers.utils, "import_utils", None)
        for row, check in (("fla found", "is_flash_linear_attention_available"),
                           ("causal_conv1d found", "is_causal_conv1d_available")):
            f = getattr(import_utils, check, None)
            try:
                out[row] = f"{bool(f())} ({check})" if f is not None else f"? (no {check})"
            except Exception as e:  # noqa: BLE001 - a probe; its failure is the answer
                out[row] = f"? ({check} raised {type(e).__name__})"
        if self.torch_only:
            out["fla found"] += "; not used (--reference-kernels torch)"
        out["CUDA graphs"] = "no (eager generate)"
        out["dtype"] = str(self.model.dtype).replace("torch.", "")
        out["prompt"] = "one forward over the whole prompt, then cached decode steps"
        return out


def our_paths(rt) -> dict:
    """What our runtime runs, from its kernel choice (flashrt_ros/core/models/qwen3_5/modeling_qwen3_5.py,
    core/kernels.py)."""
    fla = rt.kernel == "fla"
    prefill = {"fla": "fla.ops.gated_delta_rule.chunk_gated_delta_rule (q/k L2 norm, decay gate "
                      "and beta in the kernel)",
               "chunked": "torch, chunk-parallel (flashrt_ros.core.kernels.gated_delta_rule_chunked)",
               "reference": "torch reference loop (flashrt_ros.core.kernels)"}[rt.kernel]
    fused = rt.model.backbone.model.fused          # core/fused.py's Triton kernels
    torch_conv = ("torch depthwise conv as unfold + sum "
                  "(flashrt_ros.core.models.qwen3_5.modeling_qwen3_5.GatedDeltaNet)")
    return {
        "attention": ("graph steps: flashrt_ros.core.fused.decode_attention (the live prefix "
                      "only); prefill: torch SDPA" if fused else
                      "torch: SDPA in eager plans and long position-0 chunks, masked matmul + "
                      "softmax over all KV rows in graph plans") if rt.use_graphs else "torch SDPA",
        "delta rule (prefill)": prefill,
        "delta rule (decode step)": "flashrt_ros.core.fused.gdn_step (Triton; fla's fused "
                                    "recurrent math, gates in the kernel)" if fused else
                                    "fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule "
                                    "(gates in the kernel)" if fla else
                                    "torch reference loop (flashrt_ros.core.kernels)",
        "short conv (prefill)": "flashrt_ros.core.fused.conv_rows (Triton)" if fused
                                else torch_conv,
        "short conv (decode step)": "flashrt_ros.core.fused.conv_step (Triton)" if fused
                                    else torch_conv,
        "gated output norm": "flashrt_ros.core.fused.gated_rms_norm (Triton)" if fused
                             else "torch (flashrt_ros.core.models.qwen3_5.modeling_qwen3_5."
                                  "GatedRMSNorm)",
        "norms, SwiGLU, projections": "flashrt_ros.core.fused (Triton: add_rms_norm, swiglu; "
                                      "gemv for single tokens)" if fused else "torch",
        "fla found": f"{fla_available()} (runtime.kernels: {rt.kernel})",
        "causal_conv1d found": "not used",
        "CUDA graphs": "yes (captured plans)" if rt.use_graphs else "no",
        "dtype": rt.model_cfg.dtype,
        "prompt": "prefill chunks of the buckets %s, fewer than %d tokens as single steps"
                  % (list(rt.cfg.prefill_buckets), min(rt.cfg.prefill_buckets))}


def fla_kernel_names() -> set:
    """Names of the Triton kernels defined in the fla modules imported so far (a Triton kernel
    runs under its Python function's name, which is what the profiler lists)."""
    names = set()
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "fla" or mod_name.startswith("fla.")):
            continue
        for value in list(vars(mod).values()):
            if not type(value).__module__.startswith("triton"):
                continue
            fn = value
            for _ in range(4):          # Autotuner / Heuristics -> JITFunction -> function
                if isinstance(fn, types.FunctionType):
                    break
                fn = getattr(fn, "fn", None)
            if isinstance(fn, types.FunctionType):
                names.add(fn.__name__)
    return names


def observed_kernels(fn) -> dict:
    """CUDA only: the fla and causal_conv1d kernels one call of `fn` launched (torch.profiler).

    `fn` runs once before the profiled call: Triton compiles and autotunes on a first call, and
    those launches are not the call's own."""
    try:
        fn()
        prof = cuda_kernel_profile(fn, top=100_000)
    except Exception as e:  # noqa: BLE001 - profiling is evidence, not the comparison itself
        return {"error": f"{type(e).__name__}: {e}"}
    fla_names = fla_kernel_names()
    seen = sorted({k["name"] for k in prof["top"]})
    return {"kernels": prof["kernels"],
            "fla": [n for n in seen if n in fla_names],
            "causal_conv1d": [n for n in seen if "causal_conv1d" in n]}


# -- the comparison ---------------------------------------------------------------------------
def margin(logits: torch.Tensor) -> float:
    """top-1 minus top-2 logit: how far from a tie the greedy choice was."""
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def compare_prompt(rt, ref, exact, ids, n, device) -> dict:
    """Logits after the prompt, then n greedy tokens on both sides; `exact` (or None) is the fp32
    yardstick."""
    L = len(ids)
    rt.reset(keep_context=False)
    t = time.perf_counter()
    rt.prefill(ids)
    ours = torch.from_numpy(rt.last_logits())
    theirs = ref.last_logits(ids)
    r = {"prompt": L, "logits_max_abs_diff": max_diff(ours, theirs),
         "logits_max_abs": float(theirs.abs().max()),
         "argmax_ours": int(ours.argmax()), "argmax_theirs": int(theirs.argmax())}
    r["argmax_agree"] = r["argmax_ours"] == r["argmax_theirs"]
    line = f"L={L}: last logits max |ours - transformers| {r['logits_max_abs_diff']:.3g}"
    if exact is not None:
        ex = exact.last_logits(ids)
        r.update(theirs_vs_exact=max_diff(theirs, ex), ours_vs_exact=max_diff(ours, ex),
                 argmax_exact=int(ex.argmax()))
        line += (f", |transformers - fp32| {r['theirs_vs_exact']:.3g}, |ours - fp32| "
                 f"{r['ours_vs_exact']:.3g}")
    log(f"{line} (logits up to {r['logits_max_abs']:.3g}); argmax "
        f"{'agrees' if r['argmax_agree'] else 'DIFFERS'}")

    ours_tokens = rt.decode(n)              # continues from the prefill above
    sync(device)
    r["ours_s"] = time.perf_counter() - t
    t = time.perf_counter()
    theirs_tokens, step_logits = ref.generate(ids, n)
    sync(device)
    r["theirs_s"] = time.perf_counter() - t
    top2 = step_logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).cpu().numpy()
    first = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs_tokens)) if a != b), None)
    r.update(tokens=n, identical=first is None, first_divergence=first, ours_tokens=ours_tokens,
             theirs_tokens=theirs_tokens)
    agreed = margins if first is None else margins[:first]
    # the closest call both sides got through: transformers' smallest margin on the agreed steps
    r["min_margin_agreed"] = float(agreed.min()) if len(agreed) else None
    r["min_margin_agreed_at"] = int(agreed.argmin()) if len(agreed) else None
    if first is None:
        log(f"L={L}: {n} greedy tokens identical (smallest transformers margin on the way "
            f"{r['min_margin_agreed']:.3g} at step {r['min_margin_agreed_at']}); ours "
            f"{r['ours_s']:.2f} s, transformers {r['theirs_s']:.2f} s")
        return r
    # at the divergence both sides had the same prefix: the prompt + the tokens they agreed on
    prefix = ids + ours_tokens[:first]
    theirs_at = step_logits[first].cpu()
    rt.reset(keep_context=False)
    rt.prefill(prefix)
    ours_at = torch.from_numpy(rt.last_logits())
    a, b = ours_tokens[first], theirs_tokens[first]
    d = r["divergence"] = {
        "step": first, "ours_token": a, "theirs_token": b,
        "theirs_margin": margin(theirs_at), "ours_margin_recomputed": margin(ours_at),
        # how much each side prefers its own token to the other side's
        "theirs_lead_over_ours": float(theirs_at[b] - theirs_at[a]),
        "ours_lead_over_theirs": float(ours_at[a] - ours_at[b]),
        "ours_recomputed_argmax": int(ours_at.argmax()),
        "logits_max_abs_diff_there": max_diff(ours_at, theirs_at)}
    line = (f"L={L}: greedy tokens DIVERGE at step {first} of {n}: ours {a}, transformers {b}; "
            f"margins there: transformers {d['theirs_margin']:.3g}, ours (recomputed) "
            f"{d['ours_margin_recomputed']:.3g}")
    if exact is not None:
        ex = exact.last_logits(prefix)
        d.update(exact_margin=margin(ex), exact_argmax=int(ex.argmax()),
                 exact_ours_minus_theirs=float(ex[a] - ex[b]))
        line += (f"; fp32 prefers {'ours' if ex[a] > ex[b] else 'transformers'} by "
                 f"{abs(d['exact_ours_minus_theirs']):.3g} (its argmax {d['exact_argmax']})")
    log(line)
    return r


def capsule_check(rt, store, ids, n, k, reference_tokens, obs, run_on) -> list[dict]:
    """Snapshot after k generated tokens in every tier, run on, restore each, continue: the state
    bytes and the continuation must equal the uninterrupted run `reference_tokens`."""
    rt.reset(keep_context=False)
    rt.prefill(ids)
    head = rt.decode(k)
    saved = rt.live_state().clone()
    names = {}
    for tier in store.tiers():
        names[tier] = f"cmp-L{len(ids)}-k{k}-{tier}"
        if names[tier] in store.capsules:
            store.delete(names[tier])
        store.snapshot(names[tier], tier=tier)
    rows = []
    for tier, name in names.items():
        # run on: other tokens, a few decoded ones, a control step
        rt.prefill(run_on)
        rt.decode(5)
        rt.step(obs)
        store.restore(name)
        state_equal = bool(torch.equal(rt.live_state(), saved))
        tail = rt.decode(n - k)
        rows.append({"prompt": len(ids), "k": k, "tier": tier, "state_bytes_identical": state_equal,
                     "continuation_identical": head + tail == reference_tokens,
                     "nbytes": int(saved.numel())})
        store.delete(name)
        log(f"L={len(ids)}: capsule at token {k}, tier {tier}: state bytes "
            f"{'identical' if state_equal else 'DIFFER'}, continuation "
            f"{'identical' if rows[-1]['continuation_identical'] else 'DIFFERS'}")
    return rows


# -- report -----------------------------------------------------------------------------------
def report(env, results, out):
    rows = results["prompts"]
    paths, observed = results["paths"], results.get("observed", {})
    exact = "theirs_vs_exact" in rows[0]
    logit_cols = ["prompt tokens", "max abs diff ours vs transformers", "max abs logit",
                  "argmax ours", "argmax transformers", "agree"]
    logit_rows = [[r["prompt"], f"{r['logits_max_abs_diff']:.3g}", f"{r['logits_max_abs']:.3g}",
                   r["argmax_ours"], r["argmax_theirs"], "yes" if r["argmax_agree"] else "NO"]
                  for r in rows]
    if exact:
        logit_cols[2:2] = ["transformers vs fp32", "ours vs fp32"]
        logit_cols.append("argmax fp32")
        for row, r in zip(logit_rows, rows):
            row[2:2] = [f"{r['theirs_vs_exact']:.3g}", f"{r['ours_vs_exact']:.3g}"]
            row.append(r["argmax_exact"])
    greedy_cols = ["prompt tokens", "tokens", "result", "transformers margin there",
                   "ours margin there (recomputed)",
                   "smallest transformers margin on agreed steps (step)", "ours s",
                   "transformers s"]
    if exact:
        greedy_cols.insert(5, "fp32 there")
    sections = [
        {"heading": "Implementations each side ran", "columns": ["", "ours (flashrt_ros)",
                                                                   "transformers"],
         "rows": [[k, paths["ours"][k], paths["transformers"][k]] for k in PATH_ROWS]
         + [[f"kernels launched by a {results['profile_prompt']}-token prefill + 2 decode steps"
             if observed else "kernels launched (CUDA only)",
             _observed_cell(observed.get("ours")), _observed_cell(observed.get("transformers"))]],
         "notes": ["Resolved = the functions each side's code calls on this machine (for "
                   "transformers: read from its Qwen3.5 modeling module and DeltaNet layer). "
                   "Launched = Triton kernel names of the imported fla modules, and causal_conv1d "
                   "kernels, found in a torch.profiler trace of one call (CUDA)."]},
        {"heading": "Last-position logits after the prompt", "columns": logit_cols,
         "rows": logit_rows,
         "notes": ["fp32 = the same checkpoint upcast to fp32 on transformers' torch functions: "
                   "'transformers vs fp32' is the rounding noise of the dtype, the yardstick for "
                   "'ours vs fp32'."] if exact else []},
        {"heading": "Greedy tokens", "columns": greedy_cols,
         "rows": [_greedy_row(r, exact) for r in rows],
         "notes": ["Margin = top-1 minus top-2 logit; 'over ours' / 'over theirs' = how much that "
                   "side's logits prefer its own token to the other side's. At a divergence both "
                   "sides had the same prefix; transformers' logits are those generate() chose from "
                   "at that step, ours are recomputed by prefilling the prompt plus the agreed "
                   "tokens" + ("; 'fp32 there' = which of the two tokens the fp32 model prefers, by "
                               "how much, and its own top-1 minus top-2 margin" if exact else "")
                   + ". The smallest margin on the agreed steps is the closest call both sides got "
                   "through. Seconds are wall time of prefill + decode (ours) and generate "
                   "(transformers), not a benchmark."]},
        {"heading": "Capsules: snapshot, run on, restore, continue", "columns":
         ["prompt tokens", "snapshot after token", "tier", "state bytes", "state bytes identical",
          "continuation identical"],
         "rows": [[c["prompt"], c["k"], c["tier"], c["nbytes"],
                   "yes" if c["state_bytes_identical"] else "NO",
                   "yes" if c["continuation_identical"] else "NO"] for c in results["capsules"]],
         "notes": ["Run on = another prefill, 5 decoded tokens and a control step between the "
                   "snapshot and the restore. Identical continuation = the tokens after the restore "
                   "equal those of the uninterrupted greedy run above."]},
        {"heading": "Verdict", "columns": ["check", "result"], "rows": [
            ["preset text config == what our runtime read from transformers' config.json",
             "yes" if results["config_round_trip"] else "NO: " + results["config_mismatch"]],
            ["greedy tokens identical (all prompts)",
             "yes" if all(r["identical"] for r in rows) else "NO"],
            ["capsule state bytes and continuations identical (all)",
             "yes" if all(c["continuation_identical"] and c["state_bytes_identical"]
                          for c in results["capsules"]) else "NO"]]},
    ]
    title = (f"Qwen3.5 backbone vs transformers: {env['preset']} ({env['dtype']}) on "
             f"{env.get('gpu', 'CPU')}")
    return write_report(out, title, env, sections, results)


def _observed_cell(obs):
    if not obs:
        return "-"
    if "error" in obs:
        return f"profiler failed: {obs['error'][:80]}"
    parts = [f"{obs['kernels']} kernels", "fla: " + (", ".join(obs["fla"]) or "none")]
    if obs["causal_conv1d"]:
        parts.append("causal_conv1d: " + ", ".join(obs["causal_conv1d"]))
    return "<br>".join(parts)


def _greedy_row(r, exact):
    agreed = "-" if r["min_margin_agreed"] is None else \
        f"{r['min_margin_agreed']:.3g} ({r['min_margin_agreed_at']})"
    if r["identical"]:
        result, theirs, ours, there = "identical", "-", "-", "-"
    else:
        d = r["divergence"]
        result = (f"DIVERGE at step {d['step']}: ours {d['ours_token']}, transformers "
                  f"{d['theirs_token']}")
        theirs = f"{d['theirs_margin']:.3g} (over ours: {d['theirs_lead_over_ours']:.3g})"
        ours = f"{d['ours_margin_recomputed']:.3g} (over theirs: {d['ours_lead_over_theirs']:.3g})"
        if exact:
            side = "ours" if d["exact_ours_minus_theirs"] > 0 else "transformers'"
            there = (f"prefers {side} by {abs(d['exact_ours_minus_theirs']):.3g}; margin "
                     f"{d['exact_margin']:.3g}")
    row = [r["prompt"], r["tokens"], result, theirs, ours, agreed, f"{r['ours_s']:.2f}",
           f"{r['theirs_s']:.2f}"]
    if exact:
        row.insert(5, there)
    return row


# -- main -------------------------------------------------------------------------------------
def run(args, checkpoint_dir):
    try:
        import transformers
    except ImportError:
        sys.exit("compare_transformers: needs the transformers package (a test/bench dependency: "
                 "pip install -r requirements.txt)")
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        ieee_fp32()         # fp32 means IEEE fp32 on every side, the fp32 yardstick included
    else:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("hybrid-0.8b" if cuda else "tiny")
    lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else \
        (GPU_LENGTHS if cuda else CPU_LENGTHS)
    n = args.tokens or (GPU_TOKENS if cuda else CPU_TOKENS)
    k = args.capsule_at if args.capsule_at is not None else max(1, n // 4)
    if not 0 < k < n:
        sys.exit(f"compare_transformers: --capsule-at must lie in (0, {n}), found {k}")
    cfg = load_preset(preset)
    dtype = args.dtype or cfg.dtype
    # fla's chunked kernels refuse fp32 inputs: there both sides run torch code
    fp32_cuda = cuda and dtype == "float32"
    kernels = "reference" if args.kernels == "auto" and fp32_cuda else args.kernels
    torch_only = args.reference_kernels == "torch" or fp32_cuda
    run_on = list(range(1, 21))           # the tokens prefilled between snapshot and restore
    # room for the longest prompt, its greedy tokens and the run-on between snapshot and restore
    max_context = max(lengths) + n + len(run_on) + 8

    log(f"building a random Qwen3_5ForCausalLM with the {preset} shapes (seed {args.seed}, "
        f"initializer_range {args.init_std}, {dtype}) on the CPU; transformers "
        f"{transformers.__version__}")
    t = time.perf_counter()
    model, exact_model, drawn = make_reference(transformers, cfg, dtype, args.seed, args.init_std,
                                               checkpoint_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"wrote {checkpoint_dir} ({n_params / 1e6:.1f} M parameters, {drawn} constant-initialised "
        f"tensors drawn at random) in {time.perf_counter() - t:.1f} s")
    ref = Reference(transformers, model, device, torch_only)
    exact = None
    if exact_model is not None and not has_module_hooks(exact_model):
        log(f"no fp32 yardstick: transformers {transformers.__version__} cannot be switched to its "
            f"torch functions (fla refuses fp32)")
    elif exact_model is not None:
        exact = Reference(transformers, exact_model, device, True)

    t = time.perf_counter()
    rt = PolicyRuntime.from_pretrained(
        checkpoint_dir, RuntimeConfig(device=str(device), kernels=kernels,
                                      cuda_graphs=not args.no_graphs),
        progress=log, max_context=max_context)
    build_s = time.perf_counter() - t
    read = rt.model_cfg.text
    mismatch = [f"{f.name}: preset {getattr(cfg.text, f.name)!r}, read {getattr(read, f.name)!r}"
                for f in dataclasses.fields(read)
                if getattr(cfg.text, f.name) != getattr(read, f.name)]
    if mismatch:
        log("config round trip DIFFERS: " + "; ".join(mismatch))

    paths = {"ours": our_paths(rt), "transformers": ref.paths()}
    for side, p in paths.items():
        log(f"{side}: " + "; ".join(f"{key}: {v}" for key, v in p.items()))

    env = environment(device, code=MEASURED_CODE)
    env.update(preset=preset, dtype=dtype, transformers=transformers.__version__,
               flash_linear_attention=package_version("flash-linear-attention"),
               causal_conv1d=package_version("causal-conv1d"), kernels=rt.kernel,
               reference_kernels="torch functions" if torch_only else "as resolved",
               cuda_graphs=rt.use_graphs, fp32_yardstick=exact is not None,
               max_context=max_context, seed=args.seed, initializer_range=args.init_std,
               parameters_M=round(n_params / 1e6, 1), build_and_capture_s=round(build_s, 1))
    if cuda:
        env.update(tf32="off (matmul and cudnn)")

    rng = np.random.RandomState(args.seed)
    V = cfg.text.vocab_size
    prompts = [rng.randint(0, V, size=L).tolist() for L in lengths]
    results = {"paths": paths, "config_round_trip": not mismatch,
               "config_mismatch": "; ".join(mismatch), "prompts": [], "capsules": [],
               "tokens": n, "capsule_at": k, "profile_prompt": min(64, max(lengths))}
    if cuda:
        # a short prefill + 2 decode steps on each side under the profiler: the kernels that ran
        ids = rng.randint(0, V, size=results["profile_prompt"]).tolist()
        log("profiling a short prefill + 2 decode steps on each side")

        def ours():
            rt.reset(keep_context=False)
            rt.prefill(ids)
            rt.decode(2)
        results["observed"] = {"ours": observed_kernels(ours),
                               "transformers": observed_kernels(lambda: ref.generate(ids, 2))}
        for side, o in results["observed"].items():
            log(f"{side} launched: {o}")

    for ids in prompts:
        results["prompts"].append(compare_prompt(rt, ref, exact, ids, n, device))

    live_mb = rt.arena.live_nbytes(max_context - 1) / 2**20
    store = CapsuleStore(rt, StoreConfig(
        gpu_budget_mb=4 * live_mb + 1, host_budget_mb=4 * live_mb + 1,
        disk_budget_mb=8 * live_mb + 1, capsule_dir=os.path.join(checkpoint_dir, "capsules")))
    obs = np.linspace(-1, 1, rt.model_cfg.obs_dim, dtype=np.float32)
    for ids, r in zip(prompts, results["prompts"]):
        results["capsules"] += capsule_check(rt, store, ids, n, k, r["ours_tokens"], obs, run_on)
    return env, results


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.checkpoint_dir:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        env, results = run(args, os.path.abspath(args.checkpoint_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="compare-transformers-") as d:
            env, results = run(args, d)
    # a dtype other than the preset's gets its own default report (bf16 and fp32 runs side by side)
    suffix = "" if env["dtype"] == load_preset(env["preset"]).dtype else "-" + env["dtype"]
    out = args.out or os.path.join("docs", "bench",
                                   f"transformers-compare-{device_slug(env)}{suffix}")
    md, js = report(env, results, out)
    ok = results["config_round_trip"] and all(r["identical"] for r in results["prompts"]) and \
        all(c["continuation_identical"] and c["state_bytes_identical"] for c in results["capsules"])
    log(f"done in {time.perf_counter() - t0:.0f} s: wrote {md} and {js}")
    with open(md, encoding="utf-8") as f:
        print(f.read())
    log("all identical" if ok else "NOT all identical: see the report")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

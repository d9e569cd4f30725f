"""What the tests of core/fused.py's kernels share: the devices they run on, inputs, tolerances.

A kernel runs on the GPU, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1: each
program of the grid run one after another in numpy), which gives a kernel's semantics (its
indexing, masks, rounding points) without a GPU, where Triton is installed: CI's lane for them.
"""
from __future__ import annotations

import os

import pytest
import torch

# fp32: the kernels sum in another order and use another rsqrt/exp: rounding only. bf16: both
# sides round at the same points, so the results differ by the last bit of a rounding that fell
# the other way (a few bf16 steps after a sum); attention also rounds its unnormalised
# probabilities to bf16 for the tensor-core product, as fla and flash attention do.
FUSED_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# fused.gemv against F.linear: both accumulate in fp32, in other orders; in bf16 the output's
# rounding may fall the other way (one bf16 step of a value of size ~1)
GEMV_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}
# The interpreter runs a kernel's programs one at a time in Python: cases with more elements than
# this take minutes there and run on the GPU only.
INTERPRETER_ELEMENTS = 1 << 21

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu), "interpreter"]


def randn(device, *shape, dtype, seed):
    """Normal values drawn on the CPU from `seed` (the same on every device), on `device`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def interpreted(device) -> bool:
    return torch.device(device).type == "cpu"


def runs_here(device, dtype, elements: int = 0) -> None:
    """Skip what the interpreter cannot check: bf16 (it truncates fp32 -> bf16 where the GPU rounds
    to the nearest, so the rounding points the tests hold are not the GPU's), and cases larger
    than INTERPRETER_ELEMENTS."""
    if not interpreted(device):
        return
    if dtype == torch.bfloat16:
        pytest.skip("bf16: Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to the "
                    "nearest); runs on the GPU")
    if elements > INTERPRETER_ELEMENTS:
        pytest.skip(f"{elements} elements: minutes in Triton's interpreter; runs on the GPU")


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    """torch.device("cuda"), or the CPU with the kernels run by Triton's interpreter. Triton reads
    TRITON_INTERPRET as its modules load, so it is set before the session: tools/run-tests.sh
    sets it on a machine without a GPU."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if request.param == "cuda":
        if interpreting:
            pytest.skip("TRITON_INTERPRET=1: the kernels run in Triton's interpreter, not on "
                        "the GPU")
        return torch.device("cuda")
    if not interpreting:
        pytest.skip("Triton's interpreter is off: set TRITON_INTERPRET=1 before the session "
                    "(tools/run-tests.sh does where there is no GPU)")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("Triton is not installed: the kernels run on the GPU only")
    return torch.device("cpu")

"""Every Triton kernel launch of the runtime compiles for the GPUs it runs on (H100/H200 with
programmatic dependent launch, Jetson Orin without, Jetson Thor), on a machine without a GPU:
tools/check_kernels.py, in a child process (Triton must load without TRITON_INTERPRET, which
tools/run-tests.sh sets for test_fused_kernels.py)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_every_kernel_launch_compiles_for_every_target():
    pytest.importorskip("triton", reason="Triton is not installed (x86_64 Linux only)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_kernels.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for target in ("sm_90", "sm_87", "sm_101"):
        assert target in out, out
    assert " 0 of " not in out, out

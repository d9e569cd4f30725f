"""tools/check_aarch64.py, the CI lane for a Jetson AGX Thor (linux aarch64, CPython 3.12), without
the network: the package installs nothing x86-specific, and the checks find what they look for.
(The resolution against the package index runs in its own lane of .ci/run.)
"""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _check():
    spec = importlib.util.spec_from_file_location("check_aarch64", ROOT / "tools" / "check_aarch64.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_installs_nothing_x86_specific():
    assert _check().x86_findings() == []


def test_x86_lines_and_compiled_files_are_found(tmp_path):
    package = tmp_path / "flashrt_ros"
    package.mkdir()
    (package / "kernels.py").write_text("FLAGS = ['-O3']\nFLAGS += ['-march=native']\n")
    (package / "paths.py").write_text("LIB = '/usr/lib/x86_64-linux-gnu/libgomp.so.1'\n")
    (package / "fast.so").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(32))
    (package / "clean.py").write_text("import platform\nprint('portable')\n")
    found = _check().x86_findings(tmp_path, ["flashrt_ros"])
    assert sorted(found) == ["flashrt_ros/fast.so: compiled file (ELF)",
                             "flashrt_ros/kernels.py:2: FLAGS += ['-march=native']",
                             "flashrt_ros/paths.py:1: LIB = '/usr/lib/x86_64-linux-gnu/libgomp.so.1'"]


def test_a_wheel_for_another_architecture_is_found():
    check = _check()
    items = [{"download_info": {"url": f"https://files.example/{name}"}} for name in (
        "torch-2.13.0-cp312-cp312-manylinux_2_28_aarch64.whl",
        "mcap-1.6.0-py3-none-any.whl",
        "numpy-2.4.6-cp312-cp312-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
        "zstandard-0.25.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")]
    assert check.not_aarch64(items) == [
        "zstandard-0.25.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"]


def test_the_runtime_requirements_take_requirements_txt_pins():
    check = _check()
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.startswith(("torch==", "numpy==")))
    reqs = check.requirements()
    assert f"torch=={pins['torch']}" in reqs and f"numpy=={pins['numpy']}" in reqs
    assert "cupy-cuda13x" in reqs                     # not pinned there: any version
    assert not any(r.startswith(("ros-", "behaviortreepy", "pytest")) for r in reqs)

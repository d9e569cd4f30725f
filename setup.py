"""Installs flashrt_ros into a Python environment that has the ROS 2 wheels from PyPI.

Two routes build this package:
  * a ROS 2 machine (Jazzy from apt, Jetson AGX Thor): `colcon build` uses CMakeLists.txt
    (package.xml says ament_cmake); this file is not involved there.
  * a plain Python environment with the PyPI ROS wheels (this repository's dev/CI route):
    `pip install --no-build-isolation .` (or `-e . --config-settings editable_mode=compat`) runs `build_interfaces` first, which drives the
    same CMakeLists.txt through rosidl to generate and install `flashrt_ros.msg` / `flashrt_ros.srv`
    (with their typesupport libraries) into this interpreter's prefix, then installs the Python
    package with its console entry points. `flashrt_ros/__init__.py` merges the generated modules into
    the package's search path, so an editable install sees them too.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Command, find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _fix_wheel_cmake_paths(prefix):
    """Point the wheels' exported CMake files at this interpreter's Python and numpy include dirs.

    The PyPI ROS wheels were built in a manylinux container; their *.cmake exports name that
    container's include paths, which do not exist here (see docs/ros2-from-pypi notes).
    """
    import numpy
    py_inc = sysconfig.get_paths()["include"]
    np_inc = numpy.get_include()
    # the wheels exist per CPython version (cp311, cp312, ...), each built under its own prefix
    tag, ver = "cp%d%d" % sys.version_info[:2], "%d.%d" % sys.version_info[:2]
    root = f"/opt/python/{tag}-{tag}"
    stale = {
        f"{root}/include/python{ver}": py_inc,
        f"{root}/lib/python{ver}/site-packages/numpy/_core/include": np_inc,
    }
    for path in glob.glob(os.path.join(prefix, "share", "**", "*.cmake"), recursive=True):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = text
        for old, repl in stale.items():
            new = new.replace(old, repl)
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)


class BuildInterfaces(Command):
    description = "generate msg/srv with rosidl through CMake and install them into this prefix"
    user_options = [
        ("source=", None, "the CMake package to build (default: this one)"),
        ("build-dir=", None, "its CMake build directory (default: build/interfaces)"),
    ]

    def initialize_options(self):
        self.source = None
        self.build_dir = None

    def finalize_options(self):
        self.source = os.path.abspath(self.source) if self.source else HERE
        self.build_dir = os.path.abspath(self.build_dir or os.path.join(HERE, "build", "interfaces"))

    def run(self):
        if os.environ.get("FLASHRT_SKIP_INTERFACES") == "1":
            return
        prefix = sys.prefix
        if not os.path.isdir(os.path.join(prefix, "share", "rosidl_default_generators")):
            raise SystemExit(
                "flashrt_ros: rosidl_default_generators not found under %s.\n"
                "Install the ROS 2 wheels first (tools/bootstrap.sh does), or build with colcon on a "
                "ROS 2 machine, or set FLASHRT_SKIP_INTERFACES=1 to install the ROS-free runtime only."
                % prefix)
        _fix_wheel_cmake_paths(prefix)
        # A CMake cache made for another prefix (an older venv, another checkout's venv) keeps that
        # prefix's package paths; start that build directory afresh.
        cache = os.path.join(self.build_dir, "CMakeCache.txt")
        if os.path.isfile(cache):
            with open(cache, encoding="utf-8") as f:
                if "CMAKE_INSTALL_PREFIX:PATH=%s\n" % prefix not in f.read():
                    shutil.rmtree(self.build_dir)
        env = dict(os.environ, AMENT_PREFIX_PATH=prefix)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        ours = self.source == HERE
        subprocess.check_call(
            ["cmake", "-S", self.source, "-B", self.build_dir, *generator,
             *(["-DFLASHRT_INTERFACES_ONLY=ON"] if ours else []), "-DBUILD_TESTING=OFF",
             "-DCMAKE_INSTALL_PREFIX=" + prefix, "-DPython3_EXECUTABLE=" + sys.executable,
             "-DCMAKE_BUILD_TYPE=Release"], env=env)
        subprocess.check_call(["cmake", "--build", self.build_dir, "-j", str(os.cpu_count() or 2)],
                              env=env)
        subprocess.check_call(["cmake", "--install", self.build_dir], env=env)
        if ours:
            self._merge_into_package()

    @staticmethod
    def _merge_into_package():
        # rosidl installs an empty `flashrt_ros/__init__.py` beside the generated modules. Removed, that
        # directory becomes a plain portion that this package's own `__init__` (from the source tree
        # in an editable install, or copied over it by a normal install) merges via extend_path.
        purelib = sysconfig.get_paths()["purelib"]
        # ament's Python install also drops an egg-info beside pip's metadata; pip would later treat
        # it as an installed distribution and delete the generated modules when it uninstalls.
        for stale in glob.glob(os.path.join(purelib, "flashrt_ros-*.egg-info")):
            shutil.rmtree(stale, ignore_errors=True)
        generated_init = os.path.join(purelib, "flashrt_ros", "__init__.py")
        if os.path.exists(generated_init):
            with open(generated_init, encoding="utf-8") as f:
                ours = "extend_path" in f.read()
            if not ours:
                os.remove(generated_init)


# The console scripts, which are also the `ros2 run flashrt_ros <name>` executables.
CONSOLE_SCRIPTS = {
    "flashrt-ros": "flashrt_ros.cli.main:main",
    "flashrt_node": "flashrt_ros.ros.node:main",
}
# What an ament install holds besides the Python package and the interfaces (CMakeLists.txt
# installs the same on the colcon route): the package index entry, package.xml, launch and config.
DATA_FILES = [
    ("share/ament_index/resource_index/packages", ["resource/flashrt_ros"]),
    ("share/flashrt_ros", ["package.xml"]),
    ("share/flashrt_ros/launch", sorted(glob.glob("launch/*.py"))),
    ("share/flashrt_ros/config", sorted(glob.glob("config/*.yaml") + glob.glob("config/*.xml"))),
    ("share/flashrt_ros/config/presets", sorted(glob.glob("config/presets/*.yaml")
                                                + glob.glob("config/presets/*.safetensors"))),
] + [  # presets that are checkpoint directories (config/presets/smolvla-tiny/, its backbone/)
    (os.path.join("share/flashrt_ros", d), sorted(f for f in glob.glob(os.path.join(d, "*"))
                                                  if os.path.isfile(f)))
    for d in sorted(p.rstrip("/") for p in glob.glob("config/presets/*/")
                    + glob.glob("config/presets/*/*/"))
]


AMENT_PREFIX_PTH = "flashrt_ros_ament_prefix.pth"
# The prefix goes last: it is the underlay of a workspace that was sourced (an overlay comes first).
AMENT_PREFIX_LINE = (
    "import os, sys; p = os.environ.get('AMENT_PREFIX_PATH', ''); "
    "sys.prefix in p.split(os.pathsep) or os.environ.__setitem__("
    "'AMENT_PREFIX_PATH', os.pathsep.join(filter(None, [p, sys.prefix])))\n")


class InstallAment(Command):
    description = ("link launch/, config/ and the `ros2 run` executables into this prefix, as "
                   "`colcon build --symlink-install` would (an editable install installs no data_files)")
    user_options = []
    # package.xml and the index entry are installed by CMake's ament_package() (build_interfaces);
    # a link there would have CMake's install write through it into the source tree.
    LINKED = ("share/flashrt_ros/launch", "share/flashrt_ros/config", "lib/flashrt_ros")

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        links = {os.path.join(dest, os.path.basename(f)): os.path.join(HERE, f)
                 for dest, files in DATA_FILES if dest.startswith(self.LINKED) for f in files}
        # `ros2 run` and launch_ros look in lib/<package>/; the console scripts there start this
        # interpreter whatever python3 is first on PATH.
        links.update({"lib/flashrt_ros/" + name: os.path.join(os.path.dirname(sys.executable), name)
                      for name in CONSOLE_SCRIPTS})
        for top in self.LINKED:
            for dirpath, _, files in os.walk(os.path.join(sys.prefix, top)):
                for f in files:
                    path = os.path.join(dirpath, f)
                    if os.path.relpath(path, sys.prefix) not in links:
                        os.remove(path)     # a file the source tree no longer has
        for rel, target in links.items():
            path = os.path.join(sys.prefix, rel)
            if os.path.islink(path) and os.readlink(path) == target:
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.lexists(path):
                os.remove(path)
            os.symlink(target, path)
        # ament_index_python (ros2, launch_ros) finds packages through AMENT_PREFIX_PATH only, which a
        # colcon install's setup.bash sets; here every interpreter of this prefix adds the prefix
        # there at start (a .pth line runs at startup; the variable reaches its child processes).
        with open(os.path.join(sysconfig.get_paths()["purelib"], AMENT_PREFIX_PTH), "w",
                  encoding="utf-8") as f:
            f.write(AMENT_PREFIX_LINE)


class BuildPyWithInterfaces(build_py):
    def run(self):
        self.run_command("build_interfaces")
        super().run()


setup(
    name="flashrt_ros",
    version="0.1.0",
    description="Execution-state capsules for robot policies on a graph-bound runtime, as a ROS 2 node",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["flashrt_ros", "flashrt_ros.*"]),
    data_files=DATA_FILES,
    install_requires=["numpy", "pillow", "pyyaml", "safetensors", "tokenizers", "torch>=2.4"],
    extras_require={
        "ros": ["rosbags>=0.10", "mcap>=1.6", "py_trees>=2.2"],
        # fla's kernels only: the flash-linear-attention distribution adds fla.layers and
        # fla.models, which `import fla` then loads too (transformers with them), ~4 s of start
        "gpu": ["fla-core>=0.6", "cupy-cuda13x"],
        "bench": ["matplotlib"],
        "test": ["pytest", "hypothesis", "matplotlib", "mcap-ros2-support"],
    },
    entry_points={"console_scripts": ["%s = %s" % item for item in CONSOLE_SCRIPTS.items()]},
    cmdclass={"build_interfaces": BuildInterfaces, "install_ament": InstallAment,
              "build_py": BuildPyWithInterfaces},
    zip_safe=False,
)

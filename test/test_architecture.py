"""The package's layers, read from its source: which subpackage may import which.

Every `import` and `from ... import` in every module is read with `ast`, also those inside
functions (an import that runs when called counts as much as one at the top). The layers, from
the bottom:

    core      the runtime: config, arena, model, kernels, plans, runtime (no ROS)
    inputs    sensor messages -> the policy's inputs (no ROS), beside core: it raises core's
              errors and holds LeRobot's image preparation to core's processors, and the
              policies write their images through inputs/preprocess.py
    capsules  capsules, pools and stores over the runtime (no ROS)
    ros       the node and its clients
    sim       the simulated arm (ROS-free) and its ROS node
    bags      recording and replaying episodes
    bt        behaviour trees over the node's services
    cli       the command line, on top of everything

A module may import its own layer and the layers its row below allows; nothing imports upward,
and `core`, `inputs` and `capsules` import no ROS module at all (test_core_without_ros.py also
imports them in a Python where ROS is refused). No module imports itself through others (an
import cycle): within a layer, too, the imports go one way.
"""
from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "flashrt_ros")

# what each subpackage may import from flashrt_ros (besides itself); msg/srv are the generated
# interfaces, top-level the package's own __init__
ALLOWED = {
    "core": {"inputs"},
    "inputs": {"core"},
    "capsules": {"core"},
    "ros": {"core", "capsules", "inputs", "msg", "srv"},
    "sim": {"core", "inputs", "ros", "msg", "srv"},
    "bags": {"core", "capsules", "inputs", "ros", "msg", "srv"},
    "bt": {"core", "capsules", "ros", "sim", "msg", "srv"},
    "cli": {"core", "capsules", "inputs", "ros", "sim", "bags", "bt", "msg", "srv", "testing"},
    # flashrt_ros/testing.py: node processes
    "testing": {"core", "inputs", "ros", "bags", "msg", "srv"},
}
ROS_TOP_LEVEL = {"rclpy", "rpyutils", "ament_index_python", "launch", "launch_ros", "ros2cli",
                 "rosidl_runtime_py", "rosbags", "mcap", "mcap_ros2", "py_trees", "py_trees_ros"}


def is_ros(module: str) -> bool:
    top = module.split(".")[0]
    return (top in ROS_TOP_LEVEL or top.startswith(("rosidl", "rmw", "rcl"))
            or top.endswith(("_msgs", "_srvs", "_interfaces")))


def layer_of(relpath: str) -> str:
    """flashrt_ros/<layer>/x.py -> layer; flashrt_ros/x.py -> x (without .py)."""
    parts = relpath.split(os.sep)
    return parts[1] if len(parts) > 2 else parts[1][:-len(".py")]


def modules():
    for base, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(base, f)
                yield os.path.relpath(path, ROOT), path


def imports_of(path: str, relpath: str):
    """(line, absolute module name) of every import in the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = os.path.dirname(relpath).replace(os.sep, ".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:           # relative: resolve against the module's package
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:    # `from flashrt_ros.capsules import store`: the module
                sub = f"{name}.{alias.name}"
                if sub.startswith("flashrt_ros.") and is_module(sub):
                    yield node.lineno, sub


def is_module(dotted: str) -> bool:
    """Whether a name of the package is one of its modules or subpackages (not a name in one)."""
    path = os.path.join(ROOT, *dotted.split("."))
    return os.path.isdir(path) or os.path.exists(path + ".py")


def violations():
    found = []
    for relpath, path in modules():
        layer = layer_of(relpath)
        if layer == "__init__":
            continue
        if layer not in ALLOWED:
            found.append(f"{relpath}: a module outside the known layers {sorted(ALLOWED)}; put "
                         f"it in one, or add its layer to ALLOWED with the imports it may make")
            continue
        for line, name in imports_of(path, relpath):
            if layer in ("core", "inputs", "capsules") and is_ros(name):
                found.append(f"{relpath}:{line}: imports {name}; {layer}/ must import no ROS")
            parts = name.split(".")
            if parts[0] != "flashrt_ros" or len(parts) < 2:
                continue
            target = parts[1]
            if target != layer and target not in ALLOWED[layer]:
                found.append(f"{relpath}:{line}: imports {name}; {layer}/ may import only "
                             f"{sorted(ALLOWED[layer] | {layer})}")
    return found


def module_name(relpath: str) -> str:
    """flashrt_ros/capsules/store.py -> flashrt_ros.capsules.store; a package's __init__.py -> the
    package."""
    name = relpath[:-len(".py")].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def import_graph() -> dict:
    """{module: the package's modules it imports}, function-level imports included."""
    known = {module_name(relpath): (relpath, path) for relpath, path in modules()}
    graph = {}
    for module, (relpath, path) in known.items():
        graph[module] = set()
        for _, name in imports_of(path, relpath):
            while name and name not in known:      # `from m import f`: m
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def import_cycles(graph: dict) -> list:
    """Every cycle a depth-first walk of `graph` meets, each as the modules along it."""
    found, state, path = [], {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_every_import_follows_the_layers():
    assert violations() == []


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "flashrt_ros" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from flashrt_ros.ros import node\n    import rclpy\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", str(tmp_path / "flashrt_ros"))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    got = violations()
    assert any("imports flashrt_ros.ros;" in v for v in got), got
    assert any("imports rclpy" in v for v in got), got


def test_no_module_imports_itself_through_others():
    assert [" -> ".join(c) for c in import_cycles(import_graph())] == []


def test_the_cycle_rule_catches_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    fake = tmp_path / "flashrt_ros" / "capsules"
    fake.mkdir(parents=True)
    (fake / "a.py").write_text("from flashrt_ros.capsules.b import B\n")
    (fake / "b.py").write_text("def f():\n    from flashrt_ros.capsules import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", str(tmp_path / "flashrt_ros"))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert import_cycles(import_graph()) == [["flashrt_ros.capsules.a", "flashrt_ros.capsules.b",
                                              "flashrt_ros.capsules.a"]]


@pytest.mark.parametrize("relpath", ["flashrt_ros/ros/x.py"])
def test_relative_imports_resolve_against_their_package(tmp_path, relpath):
    f = tmp_path / "x.py"
    f.write_text("from ..core import runtime\nfrom . import node\n")
    got = [name for _, name in imports_of(str(f), relpath)]
    assert got == ["flashrt_ros.core", "flashrt_ros.core.runtime", "flashrt_ros.ros",
                   "flashrt_ros.ros.node"]

"""NodeConfig: the policy node's own settings, and the one table its ROS parameters come from.

ROS parameters are declared from three dataclasses, not written out by hand:
  * NodeConfig fields     -> top-level parameters (`control_rate_hz`, `joint_names`, ...);
  * RuntimeConfig fields  -> `runtime.<field>` (device, graphs, rollback depth, weights, ...);
  * StoreConfig fields    -> `store.<field>` (budgets, capsule directory, default tier, ...).

Fixed parameters (the fields marked read_only: they fix captured shapes, allocations or the
control loop's wiring) are read-only while the node is configured: a change is refused with a
reason, and takes a cleanup, a set and a configure. While the node is unconfigured every parameter
may change; nothing is checked until configure, so that parameters that depend on each other
(`command_output` and `joint_names`) can be set one at a time. An invalid value makes configure
fail with the dataclass's message (expected / found / fix), and the node stays unconfigured.
The other parameters may change at any time; they are validated when set.

`configs_from_values` also checks types: ROS hands over whatever a params file or `-p` held
(`control_rate_hz: 30` is an integer), so numbers are coerced to the field's type and anything
else is refused with a message that names the field.

`CONSTRAINTS` says what each parameter accepts beyond its type, in the form the ROS tools show
(`ros2 param describe`: a range, or choices and a note): the node declares its descriptors from
it, and test/test_params.py holds it to the dataclasses' checks, which stay the validation. A name
the node does not declare (a typo in a params file, `ros2 param set` of one) is refused with the
closest declared name (`unknown_parameters`). This module imports no ROS.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field

from flashrt_ros.core.config import (MAX_BUDGET_MB, MAX_DIGEST_THREADS, RuntimeConfig, StoreConfig,
                                     _check, field_table, from_dict)
from flashrt_ros.core.exceptions import ConfigError


def _f(default, help, read_only=False):
    return field(default=default, metadata={"help": help, "read_only": read_only})


@dataclass(frozen=True)
class NodeConfig:
    model: str = _f("tiny", "a preset name (config/presets/<name>.yaml, or a directory "
                            "config/presets/<name>/; tiny is embedded) or a checkpoint directory "
                            "(a path: config.json + model.safetensors as transformers writes "
                            "them, optional policy.safetensors; or a LeRobot SmolVLA policy, "
                            "served with a subscription per camera)", True)
    managed: bool = _f(True, "lifecycle node waiting for configure/activate; false = configure and "
                             "activate at start (a plain auto-starting node)", True)
    instruction: str = _f("", "task instruction prefilled at configure ('' = empty context); to "
                              "change the task of a running node publish ~/instruction")
    control_mode: str = _f("timer", "timer: step at control_rate_hz on the latest observation "
                                    "while it is fresh; observation: step once on each observation",
                           True)
    control_rate_hz: float = _f(30.0, "control loop rate in timer mode", True)
    deadline_ms: float = _f(0.0, "deadline of a step: timer mode, from the tick's scheduled time "
                                 "to the committed step; observation mode, from receipt to commit "
                                 "(0 = one control period)", True)
    stale_observation_s: float = _f(0.5, "observations older than this are not stepped on (header "
                                         "stamp, or receipt in timer mode; 0 = off)")
    observation_qos: str = _f("sensor_data", "QoS of every input (observation, joint states, "
                                             "camera images): sensor_data (best effort, depth 5) "
                                             "or reliable (depth 10, nothing dropped: bag replay)",
                              True)
    sync_slop_s: float = _f(0.02, "camera policies: the state and one frame of each camera make "
                                  "an observation when their header stamps lie within this many "
                                  "seconds of each other", True)
    sync_queue_size: int = _f(10, "camera policies: messages of each input kept while waiting for "
                                  "the others (size it for the slowest camera's delay times the "
                                  "fastest input's rate)", True)
    joint_names: tuple = _f((), "if set, also subscribe sensor_msgs/JointState on `joint_states` "
                                "and build observations from these joints (positions, then "
                                "velocities if obs_dim is twice their number)", True)
    command_output: str = _f("none", "also publish the first action row for ros2_control: none, "
                                     "float64_multi_array (~/command) or joint_trajectory "
                                     "(~/joint_trajectory, one point per chunk row)", True)
    action_dt: float = _f(0.0, "seconds between action chunk rows (0 = one control period)", True)
    status_rate_hz: float = _f(2.0, "rate of ~/status and /diagnostics", True)
    warm_up: bool = _f(True, "at configure, run every plan once and put the exact state back, so "
                             "that the first control step pays no lazy initialisation", True)
    capture_prefill: str = _f("background", "when the prefill plans are captured (CUDA) or warmed "
                                            "up (CPU): background = after activation, between "
                                            "steps (configure prepares only what a step needs; an "
                                            "instruction waits for its plans); configure = all "
                                            "before configure returns", True)
    nice: int = _f(0, "nice value of the node's threads from configure to cleanup (-20..19): "
                      "below 0 gives the control loop a larger share of contended CPUs; needs "
                      "CAP_SYS_NICE or a nice limit (`ulimit -e`). Not SCHED_FIFO: Python threads "
                      "of one real-time priority starve each other on the GIL", True)

    def __post_init__(self):
        _check(self.control_mode in ("timer", "observation"), "control_mode",
               "timer or observation", self.control_mode)
        _check(0 < self.control_rate_hz <= 1000, "control_rate_hz", "a rate in (0, 1000] Hz",
               self.control_rate_hz)
        # upper bounds too: these become nanosecond counts and Duration fields (int32 sec)
        _check(0 <= self.deadline_ms <= 3.6e6, "deadline_ms", "a number of ms in [0, 3600000]",
               self.deadline_ms)
        _check(0 <= self.stale_observation_s <= 86400, "stale_observation_s",
               "a number of seconds in [0, 86400]", self.stale_observation_s)
        _check(self.observation_qos in ("sensor_data", "reliable"), "observation_qos",
               "sensor_data or reliable", self.observation_qos)
        _check(0 <= self.sync_slop_s <= 3600, "sync_slop_s", "a number of seconds in [0, 3600]",
               self.sync_slop_s)
        _check(1 <= self.sync_queue_size <= 10000, "sync_queue_size", "an integer in [1, 10000]",
               self.sync_queue_size)
        _check(self.command_output in ("none", "float64_multi_array", "joint_trajectory"),
               "command_output", "none, float64_multi_array or joint_trajectory", self.command_output)
        _check(0 <= self.action_dt <= 3600, "action_dt", "a number of seconds in [0, 3600]",
               self.action_dt)
        _check(0 < self.status_rate_hz <= 100, "status_rate_hz", "a rate in (0, 100] Hz",
               self.status_rate_hz)
        _check(-20 <= self.nice <= 19, "nice", "an integer in [-20, 19]", self.nice)
        _check(self.capture_prefill in ("background", "configure"), "capture_prefill",
               "background or configure", self.capture_prefill)
        object.__setattr__(self, "joint_names", tuple(self.joint_names))
        _check(all(isinstance(n, str) and n for n in self.joint_names), "joint_names",
               "a list of non-empty joint names", list(self.joint_names))
        _check(len(set(self.joint_names)) == len(self.joint_names), "joint_names",
               "distinct joint names", list(self.joint_names))
        if self.command_output == "joint_trajectory":
            _check(len(self.joint_names) > 0, "joint_names",
                   "the controller's joint names when command_output is joint_trajectory", [],
                   "set joint_names or use command_output float64_multi_array")

    @property
    def period_s(self) -> float:
        return 1.0 / self.control_rate_hz

    @property
    def deadline_s(self) -> float:
        return self.deadline_ms / 1e3 if self.deadline_ms > 0 else self.period_s


SECTIONS = (("", NodeConfig), ("runtime.", RuntimeConfig), ("store.", StoreConfig))


def parameter_table():
    """(parameter name, default, help, fixed, section class) for every ROS parameter."""
    rows = []
    for prefix, cls in SECTIONS:
        for name, default, help, read_only in field_table(cls):
            if isinstance(default, tuple):
                default = list(default)
            rows.append((prefix + name, default, help, read_only, cls))
    return rows


@dataclass(frozen=True)
class Constraint:
    """What a parameter accepts beyond its type: an inclusive range (FloatingPointRange or
    IntegerRange in its descriptor), or choices, and a note; `text` is its descriptor's
    `additional_constraints`."""
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    note: str = ""

    def text(self) -> str:
        parts = []
        if self.choices:
            parts.append("one of: " + ", ".join(self.choices))
        if self.low is not None:
            parts.append(f"in [{self.low:g}, {self.high:g}]")
        return "; ".join(parts + ([self.note] if self.note else []))


def _range(low, high, note=""):
    return Constraint(low=low, high=high, note=note)


def _one_of(*choices):
    return Constraint(choices=choices)


# Every parameter's constraint, as the dataclasses check it (test/test_params.py holds them
# together: each end of a range and each choice is accepted, a value past it refused).
CONSTRAINTS = {
    "model": Constraint(note="a preset name or a checkpoint directory"),
    "instruction": Constraint(note="a text of at most the model's max_context - 1 tokens"),
    "control_mode": _one_of("timer", "observation"),
    "control_rate_hz": _range(0, 1000, "above 0"),
    "deadline_ms": _range(0, 3.6e6),
    "stale_observation_s": _range(0, 86400),
    "observation_qos": _one_of("sensor_data", "reliable"),
    "sync_slop_s": _range(0, 3600),
    "sync_queue_size": _range(1, 10000),
    "joint_names": Constraint(note="distinct, non-empty names; obs_dim of them or half as many; "
                                   "needed by command_output joint_trajectory"),
    "command_output": _one_of("none", "float64_multi_array", "joint_trajectory"),
    "action_dt": _range(0, 3600),
    "status_rate_hz": _range(0, 100, "above 0"),
    "capture_prefill": _one_of("background", "configure"),
    "nice": _range(-20, 19),
    "runtime.device": Constraint(note="cpu, cuda, cuda:N or auto"),
    "runtime.cpu_plans": _one_of("auto", "traced", "eager"),
    "runtime.prefill_buckets": Constraint(note="a non-empty list of integers in [1, 1048576]"),
    "runtime.rollback_depth": _range(0, 4096),
    "runtime.action_noise": _range(0, sys.float_info.max, "finite"),
    "runtime.sample_seed": _range(0, 2**32 - 1),
    "runtime.kernels": _one_of("auto", "fla", "chunked", "reference"),
    "runtime.threads": _range(0, 1024),
    "runtime.cache_dir": Constraint(note="a directory, or '' for Triton's defaults"),
    "store.gpu_budget_mb": _range(0, MAX_BUDGET_MB),
    "store.host_budget_mb": _range(0, MAX_BUDGET_MB),
    "store.disk_budget_mb": _range(0, MAX_BUDGET_MB),
    "store.capsule_dir": Constraint(note="a directory, not ''"),
    "store.default_tier": _one_of("auto", "gpu", "host", "disk"),
    "store.eviction": _one_of("demote", "drop"),
    "store.digest_threads": _range(0, MAX_DIGEST_THREADS),
    "store.block_tokens": _range(0, 65536),
}


def constraint(name: str) -> Constraint:
    """The constraint of parameter `name` (none for a boolean)."""
    return CONSTRAINTS.get(name, Constraint())


def unknown_parameters(names, declared) -> str:
    """'' when every name in `names` is in `declared`; else a message naming each unknown one
    with the closest declared name."""
    declared = sorted(declared)
    parts = []
    for name in sorted(set(names) - set(declared)):
        close = difflib.get_close_matches(name, declared, n=1, cutoff=0.6)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else
                     f"{name} (no declared parameter has a similar name)")
    return ", ".join(parts)


def _coerce(name: str, value, default):
    """A ROS parameter value as the type of the field's default; ConfigError if it is not one."""
    def refuse(expected):
        raise ConfigError(f"{name}: expected {expected}, found {value!r} "
                          f"({type(value).__name__}); fix the params file or the -p override")
    if isinstance(default, bool):
        return value if isinstance(value, bool) else refuse("true or false")
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            refuse("a number")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            refuse("an integer")
        return value
    if isinstance(default, str):
        return value if isinstance(value, str) else refuse("a string")
    if isinstance(default, (list, tuple)):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            refuse("a list")
        return tuple(value)
    return value


def configs_from_values(values: dict):
    """Build (NodeConfig, RuntimeConfig, StoreConfig) from flat parameter values; ConfigError on bad input."""
    out = []
    for prefix, cls in SECTIONS:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        section = {}
        for key, value in values.items():
            short = key[len(prefix):]
            if key.startswith(prefix) and short in fields and (prefix or "." not in key):
                section[short] = _coerce(key, value, fields[short].default)
        out.append(from_dict(cls, section, where=prefix.rstrip(".") or "node"))
    return tuple(out)


def _yaml_value(v) -> str:
    import json
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)      # a JSON string is a YAML string
    return repr(v)


PARAMS_FILE_HEADER = """\
# Parameters of the flashrt_policy node (flashrt_ros), every one at its default.
# Generated from the config dataclasses: `flashrt-ros params > config/flashrt_policy.yaml`
# (test/test_launch.py checks that this file and the dataclasses agree).
# Use: flashrt_node --ros-args --params-file config/flashrt_policy.yaml [-p name:=value ...]
#      ros2 launch flashrt_ros flashrt_policy.launch.py config:=<this file>
# `/**/flashrt_policy` matches the node in any namespace. [fixed] parameters can change only
# while the node is unconfigured; the others at any time (see docs/node.md).
"""


def params_yaml(node_name: str = "/**/flashrt_policy") -> str:
    """A ROS params file with every parameter at its default, each with its help as a comment."""
    import textwrap
    lines = PARAMS_FILE_HEADER.splitlines() + [f"{node_name}:", "  ros__parameters:"]
    for prefix, cls in SECTIONS:
        indent = "    "
        if prefix:
            lines += ["", f"    {prefix.rstrip('.')}:"]
            indent = "      "
        for name, default, help, read_only in field_table(cls):
            default = list(default) if isinstance(default, tuple) else default
            text = help + (" [fixed]" if read_only else "")
            lines += textwrap.wrap(text, 100, initial_indent=indent + "# ",
                                   subsequent_indent=indent + "#   ")
            if isinstance(default, list) and not default:
                # an empty YAML list reaches rclpy as "not set": the node declares it empty
                lines.append(f"{indent}# {name}: [a, b, ...]   (default: empty)")
            else:
                lines.append(f"{indent}{name}: {_yaml_value(default)}")
    return "\n".join(lines) + "\n"


def params_markdown() -> str:
    """The parameter table as Markdown (docs/node.md)."""
    rows = ["| parameter | default | fixed | meaning |", "|---|---|---|---|"]
    for name, default, help, read_only, _ in parameter_table():
        shown = _yaml_value(default) if not isinstance(default, str) else repr(default)
        rows.append(f"| `{name}` | `{shown}` | {'yes' if read_only else ''} | "
                    f"{help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"

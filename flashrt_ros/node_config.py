"""NodeConfig: the policy node's own settings, and the one table its ROS parameters come from.

ROS parameters are declared from three dataclasses, not written out by hand:
  * NodeConfig fields     -> top-level parameters (`control_rate_hz`, `joint_names`, ...);
  * RuntimeConfig fields  -> `runtime.<field>` (device, graphs, rollback depth, weights, ...);
  * StoreConfig fields    -> `store.<field>` (budgets, capsule directory, default tier, ...).
Fields marked read_only fix captured shapes or allocations; the node declares them read-only, so
changing them needs a cleanup + configure. Values are validated when the node configures; an
invalid value makes configure fail with the dataclass's message (expected / found / fix).
This module imports no ROS.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import RuntimeConfig, StoreConfig, _check, field_table


def _f(default, help, read_only=False):
    return field(default=default, metadata={"help": help, "read_only": read_only})


@dataclass(frozen=True)
class NodeConfig:
    preset: str = _f("tiny", "model preset (config/presets/<name>.yaml; tiny is embedded)", True)
    managed: bool = _f(True, "lifecycle node waiting for configure/activate; false = configure and "
                             "activate at start (a plain auto-starting node)", True)
    instruction: str = _f("", "task instruction prefilled at configure ('' = empty context)")
    control_mode: str = _f("timer", "timer: step at control_rate_hz on the latest observation; "
                                    "observation: step on each observation", True)
    control_rate_hz: float = _f(30.0, "control loop rate in timer mode", True)
    deadline_ms: float = _f(0.0, "a step is late if it starts or finishes later than this after its "
                                 "tick (0 = one control period)", True)
    stale_observation_s: float = _f(0.5, "observations older than this are not stepped on (0 = off)")
    observation_qos: str = _f("sensor_data", "sensor_data (best effort, depth 5) or reliable", True)
    joint_names: tuple = _f((), "if set, also subscribe sensor_msgs/JointState on `joint_states` "
                                "and build observations from these joints (positions, then "
                                "velocities if obs_dim is twice their number)", True)
    command_output: str = _f("none", "also publish the first action row for ros2_control: none, "
                                     "float64_multi_array (~/command) or joint_trajectory "
                                     "(~/joint_trajectory, one point per chunk row)", True)
    action_dt: float = _f(0.0, "seconds between action chunk rows (0 = one control period)", True)
    status_rate_hz: float = _f(2.0, "rate of ~/status and /diagnostics", True)

    def __post_init__(self):
        _check(self.control_mode in ("timer", "observation"), "control_mode",
               "timer or observation", self.control_mode)
        _check(isinstance(self.control_rate_hz, (int, float)) and 0 < self.control_rate_hz <= 1000,
               "control_rate_hz", "a rate in (0, 1000] Hz", self.control_rate_hz)
        _check(self.deadline_ms >= 0, "deadline_ms", "a number >= 0", self.deadline_ms)
        _check(self.stale_observation_s >= 0, "stale_observation_s", "a number >= 0",
               self.stale_observation_s)
        _check(self.observation_qos in ("sensor_data", "reliable"), "observation_qos",
               "sensor_data or reliable", self.observation_qos)
        _check(self.command_output in ("none", "float64_multi_array", "joint_trajectory"),
               "command_output", "none, float64_multi_array or joint_trajectory", self.command_output)
        _check(0 < self.status_rate_hz <= 100, "status_rate_hz", "a rate in (0, 100] Hz",
               self.status_rate_hz)
        object.__setattr__(self, "joint_names", tuple(self.joint_names))
        _check(all(isinstance(n, str) and n for n in self.joint_names), "joint_names",
               "a list of non-empty joint names", list(self.joint_names))
        if self.command_output == "joint_trajectory":
            _check(len(self.joint_names) > 0, "joint_names",
                   "the controller's joint names when command_output is joint_trajectory", [])

    @property
    def period_s(self) -> float:
        return 1.0 / self.control_rate_hz

    @property
    def deadline_s(self) -> float:
        return self.deadline_ms / 1e3 if self.deadline_ms > 0 else self.period_s


SECTIONS = (("", NodeConfig), ("runtime.", RuntimeConfig), ("store.", StoreConfig))


def parameter_table():
    """(parameter name, default, help, read_only, section class) for every ROS parameter."""
    rows = []
    for prefix, cls in SECTIONS:
        for name, default, help, read_only in field_table(cls):
            if isinstance(default, tuple):
                default = list(default)
            rows.append((prefix + name, default, help, read_only, cls))
    return rows


def configs_from_values(values: dict):
    """Build (NodeConfig, RuntimeConfig, StoreConfig) from flat parameter values; ConfigError on bad input."""
    from .config import from_dict
    out = []
    for prefix, cls in SECTIONS:
        names = {f.name for f in dataclasses.fields(cls)}
        section = {k[len(prefix):]: v for k, v in values.items()
                   if k.startswith(prefix) and k[len(prefix):] in names
                   and (prefix or "." not in k)}
        out.append(from_dict(cls, section, where=prefix.rstrip(".") or "node"))
    return tuple(out)

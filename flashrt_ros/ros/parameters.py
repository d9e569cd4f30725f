"""The node's ROS parameters: declared from the one table (params.py), checked when set.

`NodeParameters` is a part of `PolicyNode` (a base class of it): the declaration of every
parameter with its constraint in the descriptor, the refusal of unknown names and of changes to
fixed parameters while configured, and the model's shapes as read-only parameters. What a value
means and how it is validated is params.py's (no ROS there); this is the ROS side of it.
"""
from __future__ import annotations

import dataclasses

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.parameter import Parameter

from flashrt_ros.core.exceptions import ConfigError
from flashrt_ros.ros.params import (configs_from_values, constraint, parameter_table,
                                    unknown_parameters)

# The loaded model's shapes, readable as read-only parameters once the node is configured (and in
# every ~/status).
MODEL_SHAPE = {"obs_dim": "observation size (Observation.state length)",
               "action_dim": "action size (ActionChunk.action_dim)",
               "horizon": "rows of an action chunk (ActionChunk.horizon)"}


def model_shape(model_cfg) -> dict:
    """MODEL_SHAPE's values of a model: a VLA's state_dim is its obs_dim, its chunk_size its
    horizon."""
    vla = hasattr(model_cfg, "cameras")
    return {"obs_dim": int(model_cfg.state_dim if vla else model_cfg.obs_dim),
            "action_dim": int(model_cfg.action_dim),
            "horizon": int(model_cfg.chunk_size if vla else model_cfg.horizon)}


class NodeParameters:
    """The parameters of `PolicyNode` (see the module docstring)."""

    def _declare(self, name, default, help_text, fixed):
        """Declare a parameter of the table, with its constraint in the descriptor (what `ros2
        param describe` shows). An override the descriptor refuses (a value out of range, a
        wrong type) must not kill the node at start: the parameter is then declared without the
        check, keeps that value, and configure refuses it with the dataclass's reason."""
        c = constraint(name)
        # floats take integers too (`control_rate_hz: 30` in YAML); configure checks the type
        desc = ParameterDescriptor(
            description=help_text + (" [fixed while configured]" if fixed else ""),
            additional_constraints=c.text(), dynamic_typing=isinstance(default, float))
        if c.low is not None and isinstance(default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=float(c.low),
                                                            to_value=float(c.high))]
        elif c.low is not None and isinstance(default, int) and not isinstance(default, bool):
            desc.integer_range = [IntegerRange(from_value=int(c.low), to_value=int(c.high))]
        if isinstance(default, list) and not default:
            # an empty list has no type of its own (rclpy would make it a byte array), and a
            # parameter declared without a value makes every get_parameters that names it
            # answer no values at all (rclpy 9.1: `ros2 param dump` prints nothing): declared
            # as a string array, then given its empty value unless an override set one
            default = Parameter.Type.STRING_ARRAY
        try:
            self.declare_parameter(name, default, desc)
        except (InvalidParameterTypeException, InvalidParameterValueException) as e:
            self.get_logger().error(f"{name}: {e}; configure will refuse it until it is set")
            loose = ParameterDescriptor(description=desc.description, dynamic_typing=True,
                                        additional_constraints=desc.additional_constraints)
            default = [] if default is Parameter.Type.STRING_ARRAY else default
            self.declare_parameter(name, default, loose)
        if default is Parameter.Type.STRING_ARRAY and self.get_parameter_or(name).value is None:
            self.set_parameters([Parameter(name, Parameter.Type.STRING_ARRAY, [])])

    def _parameters_known(self) -> set:
        """Names a parameter of this node may have: the table, the model's shapes, rclpy's own."""
        return ({name for name, *_ in parameter_table()} | set(MODEL_SHAPE)
                | set(self.get_parameters_by_prefix("")))

    def _param_values(self) -> dict:
        out = {}
        for name, *_ in parameter_table():
            v = self.get_parameter(name).value
            out[name] = list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v
        return out

    def _on_set_parameters(self, params) -> SetParametersResult:
        unknown = unknown_parameters([p.name for p in params], self._parameters_known())
        if unknown:
            return SetParametersResult(successful=False, reason=(
                f"{unknown}: not a parameter of this node, nothing set; `ros2 param list "
                f"{self.get_fully_qualified_name()}` lists them"))
        # a parameter without a value would make every get_parameters that names it answer
        # nothing (see __init__), and configure needs them all: `ros2 param delete` is refused
        unset = [p.name for p in params if p.type_ == Parameter.Type.NOT_SET]
        if unset:
            return SetParametersResult(successful=False, reason=(
                f"{', '.join(unset)}: expected a value, found none (a delete); the node needs "
                f"every parameter - set one instead (its default: `flashrt-ros params`)"))
        if self.runtime is None:      # unconfigured: anything goes; configure validates
            return SetParametersResult(successful=True)
        fixed = [p.name for p in params if self._fixed.get(p.name)]
        if fixed:
            return SetParametersResult(successful=False, reason=(
                f"{', '.join(fixed)}: fixed while the node is {self.state_label} (they fix "
                f"captured shapes, allocations or the control loop); deactivate, cleanup, set "
                f"them, configure again"))
        values = self._param_values()
        values.update({p.name: (list(p.value) if hasattr(p.value, "tolist") else p.value)
                       for p in params})
        try:
            node_cfg, _, store_cfg = configs_from_values(values)
            store_cfg.resolve_tier(None, self.store.cuda)   # a default tier this runtime has
        except ConfigError as e:
            return SetParametersResult(successful=False, reason=str(e))
        self.node_cfg = node_cfg                    # stale_observation_s applies at once
        store = self.store
        with store.lock:                            # budgets, default tier, eviction at once
            store.cfg = dataclasses.replace(store_cfg, capsule_dir=store.cfg.capsule_dir)
        later = [p.name for p in params if p.name in ("instruction", "store.capsule_dir",
                                                      "runtime.sample_seed")]
        if later:
            self.get_logger().info(f"{', '.join(later)} set; takes effect at the next configure")
        return SetParametersResult(successful=True)

    def _check_model_shape(self, model_cfg):
        """A later configure must load a model of the shapes the read-only parameters declared:
        ROS never changes a read-only parameter, and they must not lie."""
        declared = {name: self.get_parameter(name).value for name in MODEL_SHAPE
                    if self.has_parameter(name)}
        found = {name: value for name, value in model_shape(model_cfg).items()
                 if name in declared}
        if declared != found:
            raise ConfigError(f"model: expected a model of the shapes this process declared as "
                              f"read-only parameters at its first configure ({declared}), found "
                              f"{found} in model {model_cfg.name!r}; restart the node to serve a "
                              f"model of other shapes")

    def _declare_model_shape(self, model_cfg):
        """`obs_dim`, `action_dim`, `horizon` of the loaded model as read-only parameters (at the
        first configure; a params file's values for them are ignored: the model says)."""
        for name, help_text in MODEL_SHAPE.items():
            if not self.has_parameter(name):
                self.declare_parameter(name, model_shape(model_cfg)[name], ParameterDescriptor(
                    description=f"{help_text} of the loaded model (read-only: set at the first "
                                f"configure from the model)", read_only=True),
                    ignore_override=True)

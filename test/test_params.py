"""The parameters' constraints (params.CONSTRAINTS: what `ros2 param describe` shows) agree with
the config dataclasses, which validate: each end of a range and each choice is accepted, a value
past an end or outside the choices refused. No ROS."""
import pytest

from flashrt_ros.core.exceptions import ConfigError
from flashrt_ros.ros.params import CONSTRAINTS, configs_from_values, parameter_table

DEFAULTS = {name: default for name, default, *_ in parameter_table()}
# values another parameter must take for this one's to be valid on its own
NEEDS = {"command_output": {"joint_names": ["j0"]}}


def accepts(name, value) -> bool:
    values = dict(DEFAULTS, **NEEDS.get(name, {}))
    values[name] = value
    try:
        configs_from_values(values)
    except ConfigError:
        return False
    return True


def test_every_parameter_but_a_boolean_has_a_constraint():
    for name, default, *_ in parameter_table():
        assert isinstance(default, bool) or name in CONSTRAINTS, name
    assert set(CONSTRAINTS) <= set(DEFAULTS)


@pytest.mark.parametrize("name", [n for n, c in CONSTRAINTS.items() if c.low is not None])
def test_a_range_is_the_one_the_dataclass_checks(name):
    c = CONSTRAINTS[name]
    kind = type(DEFAULTS[name])
    step = 1 if kind is int else max(abs(c.high) * 1e-9, 1e-6)
    low_ok = "above" not in c.note
    assert accepts(name, kind(c.low)) == low_ok, (name, c.low)
    assert accepts(name, kind(c.high)), (name, c.high)
    assert not accepts(name, kind(c.low) - step), (name, "below")
    if kind is int or c.high < 1e300:
        assert not accepts(name, kind(c.high) + step), (name, "above")
    else:                       # the largest float: only infinity is past it
        assert not accepts(name, float("inf"))


@pytest.mark.parametrize("name", [n for n, c in CONSTRAINTS.items() if c.choices])
def test_choices_are_the_ones_the_dataclass_checks(name):
    for choice in CONSTRAINTS[name].choices:
        assert accepts(name, choice), (name, choice)
    assert not accepts(name, "bogus")
    assert CONSTRAINTS[name].text().startswith("one of: ")


def test_unknown_names_are_named_with_the_closest_declared_one():
    from flashrt_ros.ros.params import unknown_parameters
    declared = list(DEFAULTS)
    assert unknown_parameters(declared[:3], declared) == ""
    said = unknown_parameters(["runtime.devcie", "typo_param"], declared)
    assert "runtime.devcie (did you mean runtime.device?)" in said
    assert "typo_param (no declared parameter has a similar name)" in said

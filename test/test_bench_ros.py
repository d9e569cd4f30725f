"""bench/bench_ros.py starts flashrt_node with parameters the node declares: a parameter the node
no longer has made configure refuse, and every experiment waited 120 s for a node that never
became active."""
import os

from flashrt_ros.ros.params import parameter_table, unknown_parameters


def dotted(params: dict, prefix: str = "") -> list:
    """{"runtime": {"device": x}} -> ["runtime.device"] (the inverse of process.nested)."""
    names = []
    for name, value in params.items():
        names += dotted(value, f"{prefix}{name}.") if isinstance(value, dict) else [prefix + name]
    return names


def test_the_benchmarks_node_parameters_are_declared(tmp_path):
    from bench.bench_ros import node_params, parse_args
    args = parse_args(["--device", "cpu"])
    declared = [row[0] for row in parameter_table()]
    for extra in ({"control_mode": "observation", "observation_qos": "reliable"},
                  {"control_mode": "timer", "control_rate_hz": 30.0, "nice": 0}):
        params = node_params(args, str(tmp_path), **extra)
        assert not unknown_parameters(dotted(params), declared)
        assert params["model"] == args.preset and os.path.isabs(params["store"]["capsule_dir"])

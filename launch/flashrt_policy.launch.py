"""Launch the flashrt_policy node (and, on request, a bag recorder of its episode topics).

    ros2 launch flashrt_ros flashrt_policy.launch.py
    ros2 launch flashrt_ros flashrt_policy.launch.py namespace:=robot device:=cuda managed:=false
    ros2 launch flashrt_ros flashrt_policy.launch.py config:=/path/params.yaml record:=true

Arguments: config (params file; default the package's config/flashrt_policy.yaml), namespace,
device and model ('' = as the params file says), managed ('' = as the params file says; false
= configure and activate at start), record (true = also run `flashrt-ros record` on the node's
topics), bag (the recorder's output directory; '' = its default).

`node_arguments()` holds everything the node is started with - executable, params file,
overrides, remappings - and needs no `launch` import: generate_launch_description() builds the
launch_ros Node from it, and test/test_launch.py starts the executable with exactly the same
(`command_line()`) on machines where launch_ros is not installable.
"""
import os

PACKAGE = "flashrt_ros"
EXECUTABLE = "flashrt_node"
NODE_NAME = "flashrt_policy"
CONFIG_FILE = "flashrt_policy.yaml"
# The node's ros2_control outputs, pointed at the usual controllers' command topics (relative:
# they resolve inside the namespace). Observations, actions, status and services stay private
# (~/...) so that `flashrt-ros --node <ns>/flashrt_policy ...` and the recorder find them.
REMAPPINGS = [
    ("~/command", "forward_position_controller/commands"),
    ("~/joint_trajectory", "joint_trajectory_controller/joint_trajectory"),
]
ARGUMENTS = [  # (name, default, description)
    ("config", "", "params file (default: the package's config/flashrt_policy.yaml)"),
    ("namespace", "", "namespace of the node"),
    ("device", "", "cpu, cuda, cuda:N or auto ('' = as the params file says)"),
    ("model", "", "a preset name or a checkpoint directory ('' = as the params file says)"),
    ("managed", "", "true: wait for configure/activate; false: start stepping at once "
                    "('' = as the params file says)"),
    ("record", "false", "also record the node's topics to a bag (`flashrt-ros record`)"),
    ("bag", "", "output directory of the recorded bag ('' = the recorder's default)"),
]


def default_config() -> str:
    """The package's config/flashrt_policy.yaml: installed share directory, else the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = os.path.join(get_package_share_directory(PACKAGE), "config", CONFIG_FILE)
        if os.path.isfile(path):
            return path
    except Exception:  # noqa: BLE001 - not in the ament index (a source checkout, a pip install)
        pass
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config",
                        CONFIG_FILE)


def _true(text: str) -> bool:
    return str(text).strip().lower() in ("1", "true", "yes", "on")


def node_arguments(config="", namespace="", device="", model="", managed="") -> dict:
    """What the node is started with: executable, name, namespace, params file, overrides, remappings."""
    overrides = {}
    if device:
        overrides["runtime.device"] = device
    if model:
        overrides["model"] = model
    if managed != "":
        overrides["managed"] = _true(managed)
    namespace = namespace.strip("/")
    return {"package": PACKAGE, "executable": EXECUTABLE, "name": NODE_NAME,
            "namespace": "/" + namespace if namespace else "",
            "params_file": os.path.abspath(config) if config else default_config(),
            "parameters": overrides, "remappings": list(REMAPPINGS)}


def node_fqn(args: dict) -> str:
    return f"{args['namespace']}/{args['name']}"


def _ros_value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def command_line(args: dict) -> list:
    """The node's command line for node_arguments(): what launch_ros runs, minus the __node rule."""
    cmd = [args["executable"], "--ros-args"]
    if args["namespace"]:
        cmd += ["-r", f"__ns:={args['namespace']}"]
    cmd += ["--params-file", args["params_file"]]
    for k, v in args["parameters"].items():
        cmd += ["-p", f"{k}:={_ros_value(v)}"]
    for a, b in args["remappings"]:
        cmd += ["-r", f"{a}:={b}"]
    return cmd


def recorder_command(args: dict, bag="") -> list:
    return ["flashrt-ros", "record", "--node", node_fqn(args)] + (["--out", bag] if bag else [])


def _launch_setup(context):
    from launch.actions import ExecuteProcess
    from launch_ros.actions import Node

    def value(name):
        from launch.substitutions import LaunchConfiguration
        return LaunchConfiguration(name).perform(context)

    args = node_arguments(value("config"), value("namespace"), value("device"), value("model"),
                          value("managed"))
    actions = [Node(package=args["package"], executable=args["executable"], name=args["name"],
                    namespace=args["namespace"], output="screen",
                    parameters=[args["params_file"]] + ([args["parameters"]] if args["parameters"] else []),
                    remappings=args["remappings"])]
    if _true(value("record")):
        actions.append(ExecuteProcess(cmd=recorder_command(args, value("bag")), output="screen"))
    return actions


def generate_launch_description():
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    return LaunchDescription(
        [DeclareLaunchArgument(n, default_value=d, description=h) for n, d, h in ARGUMENTS]
        + [OpaqueFunction(function=_launch_setup)])

"""Launch the flashrt_policy node (and, on request, a bag recorder of its episode topics).

    ros2 launch flashrt_ros flashrt_policy.launch.py
    ros2 launch flashrt_ros flashrt_policy.launch.py namespace:=robot device:=cuda managed:=false
    ros2 launch flashrt_ros flashrt_policy.launch.py config:=/path/params.yaml record:=true
    ros2 launch -s flashrt_ros flashrt_policy.launch.py     # the arguments
    ros2 launch -p flashrt_ros flashrt_policy.launch.py     # what it starts

Arguments: config (params file; default the package's config/flashrt_policy.yaml), namespace,
device and model ('' = as the params file says), managed (true, false, or '' = as the params
file says; false = configure and activate at start), record (true: also run `flashrt-ros record`
on the node's topics), bag (the recorder's output directory; '' = its default). A boolean that is
neither true nor false is refused.

The node is a launch_ros LifecycleNode and the recorder a process of the package's own
executable (lib/flashrt_ros/flashrt-ros). `node_arguments()` holds the same start - executable,
params file, overrides, remappings - without any `launch` import: test/test_launch.py starts
the executable with exactly that (`command_line()`) where launch_ros is not installed.
"""
import os

PACKAGE = "flashrt_ros"
EXECUTABLE = "flashrt_node"
RECORDER = "flashrt-ros"
NODE_NAME = "flashrt_policy"
CONFIG_FILE = "flashrt_policy.yaml"
# The node's ros2_control outputs, pointed at the usual controllers' command topics (relative:
# they resolve inside the namespace). Observations, actions, status and services stay private
# (~/...) so that `flashrt-ros --node <ns>/flashrt_policy ...` and the recorder find them.
REMAPPINGS = [
    ("~/command", "forward_position_controller/commands"),
    ("~/joint_trajectory", "joint_trajectory_controller/joint_trajectory"),
]
BOOLEAN = ("true", "false")
ARGUMENTS = [  # (name, default, description, choices or None)
    ("config", None, "the node's params file", None),
    ("namespace", "", "namespace of the node: it is <namespace>/flashrt_policy, which the params "
                      "file's /**/flashrt_policy matches", None),
    ("device", "", "cpu, cuda, cuda:N or auto ('' = as the params file says)", None),
    ("model", "", "a preset name or a checkpoint directory ('' = as the params file says)", None),
    ("managed", "", "true: wait for configure/activate; false: start stepping at once "
                    "('' = as the params file says)", ("",) + BOOLEAN),
    ("record", "false", "also record the node's topics to a bag (`flashrt-ros record --node "
                        "<namespace>/flashrt_policy`)", BOOLEAN),
    ("bag", "", "output directory of the recorded bag ('' = the recorder's default)", None),
]
# The launch arguments that override a node parameter when not '': argument -> parameter.
OVERRIDES = {"device": "runtime.device", "model": "model", "managed": "managed"}


def arguments_markdown() -> str:
    """The launch arguments as a Markdown table (docs/node.md; test/test_launch.py checks that
    the page shows this one): `python launch/flashrt_policy.launch.py --markdown`."""
    rows = ["| argument | default | sets | meaning |", "|---|---|---|---|"]
    for name, default, help_, choices in ARGUMENTS:
        shown = "the package's `config/flashrt_policy.yaml`" if default is None else f"`{default!r}`"
        sets = f"`{OVERRIDES[name]}`" if name in OVERRIDES else ""
        meaning = help_ + (f" (one of: {', '.join(repr(c) for c in choices)})" if choices else "")
        rows.append(f"| `{name}` | {shown} | {sets} | {meaning.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


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


def boolean(name: str, text: str) -> bool:
    """A boolean launch argument's value; anything but true/false is refused (a typo such as
    `managed:=ture` must not be taken as false)."""
    value = str(text).strip().lower()
    if value not in BOOLEAN:
        raise ValueError(f"launch argument {name}:={text!r}: expected true or false")
    return value == "true"


def overrides(values: dict) -> dict:
    """The node parameters that the launch arguments `values` ({argument: text}) override."""
    out = {}
    for arg, param in OVERRIDES.items():
        text = values.get(arg, "")
        if text != "":
            out[param] = boolean(arg, text) if arg == "managed" else text
    return out


def node_arguments(config="", namespace="", device="", model="", managed="") -> dict:
    """What the node is started with: executable, name, namespace, params file, overrides, remappings."""
    namespace = namespace.strip("/")
    return {"package": PACKAGE, "executable": EXECUTABLE, "name": NODE_NAME,
            "namespace": "/" + namespace if namespace else "",
            "params_file": os.path.abspath(config) if config else default_config(),
            "parameters": overrides({"device": device, "model": model, "managed": managed}),
            "remappings": list(REMAPPINGS)}


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
    return [RECORDER, "record", "--node", node_fqn(args)] + (["--out", bag] if bag else [])


def _overrides_file():
    """A substitution that writes the non-empty overrides to a params file and gives its path
    (a launch argument of '' leaves the params file's value, and a command line cannot drop an
    argument; launch_ros passes its own parameter dicts to a node the same way)."""
    import tempfile

    import yaml
    from launch import Substitution
    from launch.substitutions import LaunchConfiguration

    class OverridesFile(Substitution):
        written = []                                    # removed when the launch shuts down

        def describe(self):
            return "overrides(%s)" % ", ".join(f"{p}=LaunchConfig('{a}')" for a, p in OVERRIDES.items())

        def perform(self, context):
            values = {a: LaunchConfiguration(a).perform(context) for a in OVERRIDES}
            tree = {}
            for name, value in overrides(values).items():
                *groups, leaf = name.split(".")
                node = tree
                for g in groups:
                    node = node.setdefault(g, {})
                node[leaf] = value
            fd, path = tempfile.mkstemp(prefix="flashrt_launch_", suffix=".yaml")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                yaml.safe_dump({f"/**/{NODE_NAME}": {"ros__parameters": tree}}, f)
            self.written.append(path)
            return path

        @classmethod
        def remove(cls, *_):
            while cls.written:
                try:
                    os.remove(cls.written.pop())
                except OSError:
                    pass

    return OverridesFile()


def generate_launch_description():
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, ExecuteProcess, RegisterEventHandler
    from launch.conditions import IfCondition
    from launch.event_handlers import OnShutdown
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import LifecycleNode
    from launch_ros.substitutions import ExecutableInPackage

    arg = LaunchConfiguration
    declared = [DeclareLaunchArgument(name, default_value=default_config() if default is None else default,
                                      description=help_, **({"choices": list(c)} if c else {}))
                for name, default, help_, c in ARGUMENTS]
    # The params file, the overrides and the remappings are given as the node's ROS arguments
    # (not as launch_ros `parameters=`/`remappings=`, which end on the same command line): there
    # `ros2 launch -p`, which prints a node's command line, shows them.
    remaps = [a for frm, to in REMAPPINGS for a in ("-r", f"{frm}:={to}")]
    overrides_file = _overrides_file()
    node = LifecycleNode(
        package=PACKAGE, executable=EXECUTABLE, name=NODE_NAME, namespace=arg("namespace"),
        output="screen",
        ros_arguments=["--params-file", arg("config"), "--params-file", overrides_file, *remaps])
    # The recorder is the package's executable (lib/flashrt_ros/ on a colcon install, not on PATH).
    recorder = ExecuteProcess(
        cmd=[ExecutableInPackage(executable=RECORDER, package=PACKAGE), "record",
             "--node", [arg("namespace"), "/", NODE_NAME], ["--out=", arg("bag")]],
        output="screen", condition=IfCondition(arg("record")))
    # the node read its overrides file at start; it goes with the launch
    cleanup = RegisterEventHandler(OnShutdown(on_shutdown=overrides_file.remove))
    return LaunchDescription(declared + [node, recorder, cleanup])


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python launch/flashrt_policy.launch.py --markdown   (the argument table of "
                 "docs/node.md); to launch: ros2 launch flashrt_ros flashrt_policy.launch.py")
    print(arguments_markdown(), end="")

"""What a flashrt_ros bag holds: its topics, their types, and a typestore that knows them.

`rosbags` reads and writes rosbag2 bags without ROS, but it only knows the standard message types
of a distro. This package's own types are registered from its `.msg` files - the same files rosidl
generated the rclpy classes from - so the typestore and rclpy agree on every byte:

  1. `msg_dir()` finds the `.msg` files: the package's share directory (flashrt_ros.core.paths: the
     ament index, else `<sys.prefix>/share/flashrt_ros`, where colcon and the pip build install
     them, next to rosidl's `.json` type descriptions), or the source tree's `msg/` when the
     package runs from a checkout without an install.
  2. `typestore()` starts from rosbags' store for the distro (Jazzy or Kilted: `ROS_DISTRO`, else
     Kilted), parses every file with `get_types_from_msg` under `flashrt_ros/msg/<Name>` and
     registers them. Nested standard types (`std_msgs/Header`, `builtin_interfaces/Time`) come
     from the distro's store.
  3. The store then gives what a rosbag2 writer needs per topic: the full message definition (the
     `.msg` text with its dependencies appended, as `ros2 bag record` stores it) and the RIHS01 type
     hash, which equals the one rosidl computed (test_bags checks it against the `.json` files).

CDR bytes from rclpy's `serialize_message` go into a bag unchanged; rosbags deserializes them.
(Fast CDR leaves padding bytes uninitialised, so equal messages need not be equal CDR bytes:
compare decoded fields, never whole serialized messages.)

Also here: `TOPIC_ROLES`, the one table of the topics a recorder subscribes and a player reads,
and `BagError`, the error every bag problem is reported with. Imports no rclpy.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from flashrt_ros.core.exceptions import FlashRTError
from flashrt_ros.core.paths import share_dirs

PACKAGE = "flashrt_ros"


class BagError(FlashRTError):
    """A bag cannot be recorded or replayed: what was expected, what was found, what to do."""


@dataclass(frozen=True)
class TopicRole:
    role: str          # what the topic is to a player: observation, action, ...
    suffix: str        # name under the policy node (`<node>/<suffix>`), or a global default
    msgtype: str       # ROS type name, as stored in the bag
    under_node: bool   # True: `<node>/<suffix>`; False: a global (remappable) topic name
    input: bool        # a player publishes it into the node
    camera: bool = False   # one topic per camera: `<node>/images/<camera>[/compressed]`


# The topics of one episode. A recorder subscribes these; a player finds them again by type.
TOPIC_ROLES = (
    TopicRole("observation", "observation", f"{PACKAGE}/msg/Observation", True, True),
    TopicRole("instruction", "instruction", "std_msgs/msg/String", True, True),
    TopicRole("action", "action", f"{PACKAGE}/msg/ActionChunk", True, False),
    TopicRole("status", "status", f"{PACKAGE}/msg/PolicyStatus", True, False),
    TopicRole("capsule_events", "capsule_events", f"{PACKAGE}/msg/CapsuleEvent", True, False),
    TopicRole("joint_states", "/joint_states", "sensor_msgs/msg/JointState", False, True),
    TopicRole("image", "images", "sensor_msgs/msg/Image", True, True, camera=True),
    TopicRole("compressed_image", "images", "sensor_msgs/msg/CompressedImage", True, True,
              camera=True),
)
ROLES = {r.role: r for r in TOPIC_ROLES}
CAMERA_ROLES = {r.msgtype: r for r in TOPIC_ROLES if r.camera}
COMPRESSED = "compressed"       # image_transport's sub-topic of a camera's CompressedImage

# custom_data keys in metadata.yaml written by `flashrt-ros record`
META_NODE = "flashrt_ros.ros.node"
META_PARAMETERS = "flashrt_ros.node_parameters"
META_RECORDER = "flashrt_ros.recorder"


def topic_name(role: TopicRole, node: str, camera: str = "") -> str:
    """The topic of `role` for policy node `node` ("/flashrt_policy"); a camera role's for
    `camera`: `<node>/images/<camera>`, and `.../compressed` for CompressedImage, as the node
    subscribes them (image_transport's names)."""
    if not role.under_node:
        return role.suffix
    name = f"/{node.strip('/')}/{role.suffix}"
    if role.camera:
        name += f"/{camera}" + (f"/{COMPRESSED}" if role.role == "compressed_image" else "")
    return name


def camera_of(topic: str, msgtype: str) -> str:
    """The camera a topic named `.../images/<camera>` (Image) or `.../images/<camera>/compressed`
    (CompressedImage) carries; "" for any other name or type."""
    role = CAMERA_ROLES.get(msgtype)
    parts = topic.strip("/").split("/")
    if role is None:
        return ""
    if role.role == "compressed_image":
        if parts[-1] != COMPRESSED:
            return ""
        parts = parts[:-1]
    return parts[-1] if len(parts) >= 2 and parts[-2] == role.suffix else ""


def msg_dir() -> Path:
    """The directory holding this package's `.msg` files: the first share directory
    (flashrt_ros.core.paths: installed ones before the source checkout) that has them."""
    candidates = [d / "msg" for d in share_dirs()]
    for d in candidates:
        if d.is_dir() and any(d.glob("*.msg")):
            return d
    raise BagError(f"{PACKAGE} message definitions: expected .msg files in one of "
                   f"{[str(c) for c in candidates]}, found none; build the package (colcon build, "
                   f"or tools/bootstrap.sh) or run from a source checkout")


# rclpy's major version -> the distro it was released for (PyPI's ROS wheels set no ROS_DISTRO)
RCLPY_DISTROS = {3: "humble", 7: "jazzy", 9: "kilted"}


def ros_distro() -> str:
    """The ROS distro's name: `$ROS_DISTRO` (set by a ROS install's setup script), else the one
    the installed rclpy was released for, else "unknown"."""
    if os.environ.get("ROS_DISTRO"):
        return os.environ["ROS_DISTRO"].lower()
    from importlib import metadata
    for dist in ("ros-rclpy", "rclpy"):
        try:
            major = int(metadata.version(dist).split(".")[0])
        except (metadata.PackageNotFoundError, ValueError):
            continue
        return RCLPY_DISTROS.get(major, "unknown")
    return "unknown"


def _store_name(distro: str | None):
    from rosbags.typesys import Stores
    distro = (distro or ros_distro()).lower()
    return {"jazzy": Stores.ROS2_JAZZY, "kilted": Stores.ROS2_KILTED}.get(distro, Stores.ROS2_KILTED)


@functools.cache
def typestore(distro: str | None = None):
    """A rosbags typestore for `distro` (jazzy/kilted) with this package's messages registered."""
    from rosbags.typesys import get_types_from_msg, get_typestore
    store = get_typestore(_store_name(distro))
    types = {}
    for path in sorted(msg_dir().glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(encoding="utf-8"),
                                        f"{PACKAGE}/msg/{path.stem}"))
    store.register(types)
    return store


def type_hash(msgtype: str, definition: str = "") -> str:
    """The RIHS01 hash of `msgtype` (what rosidl computes): from `definition` (a bag's ros2msg
    text) when given, else from this package's typestore; "" for a type neither knows."""
    from rosbags.typesys import get_types_from_msg, get_typestore
    if not definition:
        return typestore().hash_rihs01(msgtype) if knows(msgtype) else ""
    store = get_typestore(_store_name(None))
    store.register(get_types_from_msg(definition, msgtype))
    return store.hash_rihs01(msgtype)


def store_for(connections):
    """The typestore to decode a bag's messages with (`connections`: its topics, with `.msgtype`
    and the `.msgdef` text): `typestore()`, unless the bag carries another
    definition of one of this package's types (a bag recorded by an older release, e.g. before
    CapsuleEvent had its request flags). Then a store with the bag's own definitions of those types,
    so the bag still decodes; fields it lacks are simply absent from its messages."""
    from rosbags.typesys import get_types_from_msg, get_typestore
    ours = typestore()
    theirs = {}
    for c in connections:
        data = c.msgdef
        if not c.msgtype.startswith(PACKAGE + "/") or not data:
            continue
        types = get_types_from_msg(data, c.msgtype)
        if types.get(c.msgtype) != ours.fielddefs.get(c.msgtype):
            theirs[c.msgtype] = types[c.msgtype]
    if not theirs:
        return ours
    store = get_typestore(_store_name(None))
    store.register({name: fields for name, fields in ours.fielddefs.items()
                    if name.startswith(PACKAGE + "/") and name not in theirs})
    store.register(theirs)
    return store


def knows(msgtype: str) -> bool:
    return msgtype in typestore().fielddefs

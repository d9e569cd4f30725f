"""Which of a bag's topics a replay uses, and as what.

A topic is found by its role (flashrt_ros.bags.types.TOPIC_ROLES): by type, and, where its name
is one a policy node uses (`<node>/observation`, `/joint_states`, ...), the name must have that
role's type. Camera topics are the node's names (`<node>/images/<camera>` for sensor_msgs/Image,
`.../compressed` for CompressedImage), or any image topic a caller names for a camera (`play
--camera top=/camera/top/image_raw`), so a bag another tool recorded replays into the node's
cameras. The types of this package's messages that are re-published or compared must be this
package's definitions (told by the bag's type hash, or by its stored definition). Imports no rclpy.
"""
from __future__ import annotations

from flashrt_ros.bags.types import (CAMERA_ROLES, PACKAGE, ROLES, BagError, camera_of, knows,
                                    type_hash, typestore)


def select_connections(bag, cameras: dict | None = None) -> tuple[dict, dict]:
    """The bag's topics a replay uses, by role, and {connection id: camera} of its image topics.
    A known name with a wrong type, or no observations, is an error. An Image or CompressedImage
    topic is a camera's when `cameras` ({topic: camera}) names it or its name is the node's
    (`.../images/<camera>[/compressed]`); other image topics are not replayed."""
    conns, camera_ids = {}, {}
    for c in bag.topics:
        if c.msgtype in CAMERA_ROLES:
            camera = (cameras or {}).get(c.topic) or camera_of(c.topic, c.msgtype)
            if camera:
                conns.setdefault(CAMERA_ROLES[c.msgtype].role, []).append(c)
                camera_ids[c.id] = camera
            continue
        role = role_by_name(c.topic)
        if role is not None and c.msgtype != role.msgtype:
            raise BagError(f"bag {bag.path}: topic {c.topic} has type {c.msgtype}; expected "
                           f"{role.msgtype} for a policy node's {role.role} topic. Record the node "
                           f"with `flashrt-ros record`, or remap the topic")
        by_type = next((r for r in ROLES.values() if r.msgtype == c.msgtype and not r.camera and
                        (r.role != "instruction" or role is not None)), None)
        if by_type is None:
            continue
        # Capsule events are only read (their fields build the requests), so a bag from a
        # release with an older CapsuleEvent still replays, decoded with its own definition
        # (store_for). Observations and actions are re-published or compared as CDR: same
        # definition only - told by the bag's type hash, or by its definition when it states
        # no hash (mcap_ros2's writer, a salvaged file).
        if c.msgtype.startswith(f"{PACKAGE}/") and by_type.role != "capsule_events":
            ours = typestore().hash_rihs01(c.msgtype)
            try:
                theirs = c.type_hash or (type_hash(c.msgtype, c.msgdef) if c.msgdef else "")
            except Exception as e:  # noqa: BLE001 - rosbags' parser raises several types
                raise BagError(f"bag {bag.path}: the definition of {c.msgtype} stored for "
                               f"{c.topic} does not parse as ros2msg text ({type(e).__name__}: "
                               f"{e}); expected the .msg text rosbag2 stores") from None
            if theirs and theirs != ours:
                raise BagError(f"bag {bag.path}: {c.topic} was recorded with another definition "
                               f"of {c.msgtype} (type hash {theirs}; this package's is {ours}); "
                               f"replay it with the {PACKAGE} version that recorded it")
        if not knows(c.msgtype) or by_type.role == "status":      # status: not replayed
            continue
        conns.setdefault(by_type.role, []).append(c)
    if "observation" not in conns and "joint_states" not in conns:
        raise BagError(f"bag {bag.path}: expected an observation topic "
                       f"({ROLES['observation'].msgtype}, `<node>/observation`) or a joint state "
                       f"topic ({ROLES['joint_states'].msgtype}), found {bag.found()}. Record the "
                       f"node with `flashrt-ros record` (add --joint-states for JointState input)")
    if len(conns.get("observation", [])) > 1:
        names = sorted({c.topic for c in conns["observation"]})
        if len(names) > 1:
            raise BagError(f"bag {bag.path}: expected one observation topic, found {names}; a bag "
                           f"of one node's episode has one")
    return conns, camera_ids


def role_by_name(topic: str):
    """The role a topic's name promises (`*/observation` -> observation, ...), if any."""
    last = topic.rstrip("/").rsplit("/", 1)[-1]
    for r in ROLES.values():
        if r.under_node and not r.camera and last == r.suffix:
            return r
    if topic == ROLES["joint_states"].suffix:
        return ROLES["joint_states"]
    return None

"""ROS time stamps <-> nanoseconds and seconds (no ROS imports, but for `ns_to_stamp`'s default).

A ROS stamp (builtin_interfaces/Time, and Duration alike) is two integers, `sec` and `nanosec`
(0 <= nanosec < 1e9). Pairing an action with its observation, ordering status messages, placing a
recorded capsule operation and checking an observation's age all turn stamps into one number and
back; these are the only functions that do. Nanoseconds are exact; seconds are floats for ages
and rates. The stamp side works on any object with `sec` and `nanosec` (rclpy messages, rosbags'
decoded messages).

(Named stamps, not time: a module called time beside a script would shadow the standard one.)
"""
from __future__ import annotations

NS_PER_S = 1_000_000_000


def stamp_to_ns(stamp) -> int:
    """Nanoseconds of a stamp."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def stamp_to_s(stamp) -> float:
    """Seconds of a stamp, as a float."""
    return stamp.sec + stamp.nanosec * 1e-9


def sec_nanosec(ns: int) -> tuple[int, int]:
    """(sec, nanosec) of a time in nanoseconds (nanosec in [0, 1e9))."""
    return divmod(int(ns), NS_PER_S)


def ns_to_s(ns: int) -> float:
    """Seconds of a time in nanoseconds, as a float."""
    return ns * 1e-9


def s_to_ns(seconds: float) -> int:
    """Nanoseconds of a time in seconds, rounded to the nearest one."""
    return int(round(seconds * NS_PER_S))


def ns_to_stamp(ns: int, msg_type=None):
    """A stamp message (`msg_type`, default builtin_interfaces/Time) for a time in nanoseconds."""
    if msg_type is None:
        from builtin_interfaces.msg import Time as msg_type
    sec, nanosec = sec_nanosec(ns)
    return msg_type(sec=sec, nanosec=nanosec)


def s_to_stamp(seconds: float, msg_type=None):
    """A stamp message (`msg_type`, default builtin_interfaces/Time) for a time in seconds."""
    return ns_to_stamp(s_to_ns(seconds), msg_type)


def s_to_duration(seconds: float):
    """A builtin_interfaces/Duration message for a span in seconds."""
    from builtin_interfaces.msg import Duration
    return s_to_stamp(seconds, Duration)

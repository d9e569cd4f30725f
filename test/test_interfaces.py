"""The generated interfaces match msg/ and srv/, and every type's typesupport loads.

Fields are compared with the .msg/.srv files themselves (names, order and types), so a build that
is older than its sources fails here instead of somewhere far away. Each type then goes through
rclpy's serializer, which loads its C typesupport library.
"""
import os
import re

import pytest

pytestmark = pytest.mark.ros

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE_TYPES = ("CapsuleInfo", "Observation", "ActionChunk", "PolicyStatus", "CapsuleEvent")
SERVICE_TYPES = ("Snapshot", "Restore", "Fork", "Rollback", "ListCapsules", "DeleteCapsule", "SaveCapsule",
                 "LoadCapsule", "Reset")
# .msg primitive type -> the name rosidl_generator_py reports in get_fields_and_field_types().
PRIMITIVE_NAMES = {"bool": "boolean", "byte": "octet", "char": "uint8", "float32": "float", "float64": "double"}
PRIMITIVES = {"bool", "byte", "char", "float32", "float64", "string", "wstring",
              *("%sint%d" % (s, n) for s in ("", "u") for n in (8, 16, 32, 64))}


def _generated_type_name(idl_type):
    """'float32[]' -> 'sequence<float>', 'CapsuleInfo' -> 'flashrt_ros/CapsuleInfo', ..."""
    match = re.fullmatch(r"([\w/]+?)(<=\d+)?(\[(<=)?(\d*)\])?", idl_type)
    assert match, "cannot read the field type %r" % idl_type
    base, string_bound, array, bounded, size = match.groups()
    if base in PRIMITIVES:
        name = PRIMITIVE_NAMES.get(base, base) + ("<%s>" % string_bound[2:] if string_bound else "")
    else:
        name = base if "/" in base else "flashrt_ros/" + base
    if array is None:
        return name
    if bounded:
        return "sequence<%s, %s>" % (name, size)
    return "%s[%s]" % (name, size) if size else "sequence<%s>" % name


def _declared_fields(lines):
    """{field: generated type name} for the field lines of one .msg block (constants skipped)."""
    fields = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        idl_type, rest = line.split(None, 1)
        name = rest.split()[0]
        if "=" in name or (len(rest.split()) > 1 and rest.split()[1].startswith("=")):
            continue  # a constant
        fields[name] = _generated_type_name(idl_type)
    return fields


def _read(kind, type_name):
    with open(os.path.join(ROOT, kind, type_name + "." + kind), encoding="utf-8") as f:
        return f.read().splitlines()


def _public_types(module):
    return sorted(name for name, obj in vars(module).items()
                  if isinstance(obj, type) and not name.startswith("_")
                  and not name.endswith(("_Request", "_Response", "_Event")))


def test_type_sets_match_sources():
    import flashrt_ros.msg
    import flashrt_ros.srv

    on_disk_msg = sorted(f[:-4] for f in os.listdir(os.path.join(ROOT, "msg")) if f.endswith(".msg"))
    on_disk_srv = sorted(f[:-4] for f in os.listdir(os.path.join(ROOT, "srv")) if f.endswith(".srv"))
    assert on_disk_msg == sorted(MESSAGE_TYPES)
    assert on_disk_srv == sorted(SERVICE_TYPES)
    assert _public_types(flashrt_ros.msg) == sorted(MESSAGE_TYPES)
    assert _public_types(flashrt_ros.srv) == sorted(SERVICE_TYPES)


@pytest.mark.parametrize("type_name", MESSAGE_TYPES)
def test_message_fields_match_msg_file(type_name):
    import flashrt_ros.msg

    msg_type = getattr(flashrt_ros.msg, type_name)
    assert msg_type.get_fields_and_field_types() == _declared_fields(_read("msg", type_name)), (
        "flashrt_ros.msg.%s differs from msg/%s.msg: rebuild with `bash tools/bootstrap.sh`" % (type_name, type_name))


@pytest.mark.parametrize("type_name", SERVICE_TYPES)
def test_service_fields_match_srv_file(type_name):
    import flashrt_ros.srv

    lines = _read("srv", type_name)
    split = lines.index("---")
    srv_type = getattr(flashrt_ros.srv, type_name)
    hint = "flashrt_ros.srv.%s differs from srv/%s.srv: rebuild with `bash tools/bootstrap.sh`" % (type_name, type_name)
    assert srv_type.Request.get_fields_and_field_types() == _declared_fields(lines[:split]), hint
    assert srv_type.Response.get_fields_and_field_types() == _declared_fields(lines[split + 1:]), hint


@pytest.mark.parametrize("type_name", SERVICE_TYPES)
def test_service_response_has_success_and_message(type_name):
    import flashrt_ros.srv

    fields = getattr(flashrt_ros.srv, type_name).Response.get_fields_and_field_types()
    assert fields.get("success") == "boolean"
    assert fields.get("message") == "string"


@pytest.mark.parametrize("type_name", MESSAGE_TYPES)
def test_message_round_trips_through_serializer(type_name):
    import flashrt_ros.msg
    from rclpy.serialization import deserialize_message, serialize_message

    msg_type = getattr(flashrt_ros.msg, type_name)
    msg = msg_type()
    for field, kind in msg_type.get_fields_and_field_types().items():
        if kind == "string":
            setattr(msg, field, field + "-value")
        elif kind.startswith(("uint", "int")):
            setattr(msg, field, 5)
        elif kind == "sequence<float>":
            setattr(msg, field, [0.5, -1.25])
    assert deserialize_message(serialize_message(msg), msg_type) == msg


@pytest.mark.parametrize("type_name", SERVICE_TYPES)
def test_service_request_and_response_round_trip(type_name):
    import flashrt_ros.srv
    from rclpy.serialization import deserialize_message, serialize_message

    srv_type = getattr(flashrt_ros.srv, type_name)
    response = srv_type.Response(success=True, message="done")
    assert deserialize_message(serialize_message(response), srv_type.Response) == response
    request = srv_type.Request()
    assert deserialize_message(serialize_message(request), srv_type.Request) == request

"""Fuzzing the node's service handlers (hypothesis), in-process and without DDS.

Each capsule service's callback - the exact function the node registered with rclpy - is called
with random requests: empty, huge, unicode, path-like and unknown names, odd tiers and depths.
Every call must return a response (never raise), and a refused call (success=false) must leave the
live state bytes and the stored capsules as they were. Requests are built with the generated
message classes, so field types are those a real client can send.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from node_client import configured_node, service_callbacks

pytestmark = pytest.mark.ros

NAMES = st.one_of(st.text(max_size=300), st.sampled_from(
    ["", ".", "..", "../home", "a/b", "/etc/passwd", "home", "b1", "x" * 129, "ä", "nul\0x",
     "home.capsule", " home", "C:\\x"]))
TIERS = st.one_of(st.sampled_from(["", "gpu", "host", "disk", "GPU", "tape", "../disk"]), st.text(max_size=8))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with configured_node("/fuzz", tmp_path_factory.mktemp("fuzzcaps"),
                         instruction="fuzz the services", **{"store.host_budget_mb": 0.25}) as n:
        n.store.snapshot("home")
        n.store.fork("home", "b1")
        yield n


def _state(node):
    return (bytes(node.runtime.live_state().numpy()),
            {n: (c.tier, c.step, c.nbytes) for n, c in node.store.capsules.items()})


REQUESTS = {
    "snapshot": lambda d: dict(name=d.draw(NAMES), tier=d.draw(TIERS), pin=d.draw(st.booleans())),
    "restore": lambda d: dict(name=d.draw(NAMES)),
    "fork": lambda d: dict(source=d.draw(NAMES), name=d.draw(NAMES), switch_to=d.draw(st.booleans()),
                           tier=d.draw(TIERS)),
    "rollback": lambda d: dict(k=d.draw(st.integers(0, 2**32 - 1))),
    "list_capsules": lambda d: dict(tier=d.draw(TIERS)),
    "delete_capsule": lambda d: dict(name=d.draw(NAMES), delete_file=d.draw(st.booleans())),
    "save_capsule": lambda d: dict(name=d.draw(NAMES), evict_from_memory=d.draw(st.booleans())),
    "load_capsule": lambda d: dict(name=d.draw(NAMES), tier=d.draw(TIERS), restore=d.draw(st.booleans())),
    "reset": lambda d: dict(keep_context=d.draw(st.booleans())),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_requests_never_raise_and_refusals_change_nothing(node, data):
    callbacks = service_callbacks(node)
    assert set(callbacks) == set(REQUESTS)
    op = data.draw(st.sampled_from(sorted(REQUESTS)))
    srv_type, callback = callbacks[op]
    request = srv_type.Request()
    for k, v in REQUESTS[op](data).items():
        setattr(request, k, v)
    before = _state(node)
    response = callback(request, srv_type.Response())
    assert isinstance(response.success, bool) and isinstance(response.message, str)
    if not response.success:
        assert response.message and "internal error" not in response.message, response.message
        assert _state(node) == before, f"{op} refused ({response.message}) but changed the state"
    # keep the fixtures the other requests aim at
    for name in ("home", "b1"):
        if name not in node.store.capsules:
            node.store.snapshot(name)

"""The simulated camera over the arm (flashrt_ros/sim/camera.py, no ROS): it shows the target
where the target is, and the same arm state gives the same frame."""
from __future__ import annotations

import numpy as np
import pytest

from flashrt_ros.sim.arm import SimArm
from flashrt_ros.sim.camera import TARGET, ArmCamera


def _red(frame: np.ndarray) -> np.ndarray:
    """Pixels mostly the target's colour: bool [H, W]."""
    f = frame.astype(int)
    return (np.abs(f - np.array(TARGET)).sum(-1) < 60)


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_the_target_disc_moves_with_the_target():
    cam = ArmCamera(width=96, height=96)
    q = np.array([2.5])                                # the arm points down and away
    seen = []
    for target in (-1.0, -0.3, 0.4, 1.0):
        frame = cam.render(q, [target])
        red = _red(frame)
        assert red.sum() > 20, "the target disc is drawn"
        centre = _centroid(red)
        np.testing.assert_allclose(centre, cam.joint_points([target])[-1], atol=0.5)
        seen.append(centre)
    # the disc moves as far as the target's point moves
    steps = np.linalg.norm(np.diff(seen, axis=0), axis=1)
    assert (steps > 10).all(), steps


def test_every_link_end_of_the_target_pose_is_drawn():
    cam = ArmCamera(width=96, height=96)
    target = np.array([0.8, -0.9, 0.5])
    red = _red(cam.render([-2.5, 0.0, 0.0], target))
    for x, y in cam.joint_points(target)[1:]:
        assert red[int(round(y)), int(round(x))], (x, y)


def test_frames_are_deterministic_and_depend_on_the_pose_only():
    cam = ArmCamera(width=80, height=64)
    a, b = SimArm(6, 2, 1 / 30, seed=5), SimArm(6, 2, 1 / 30, seed=5)
    for _ in range(10):
        a.apply(np.array([1.0, -0.5]))
        b.apply(np.array([1.0, -0.5]))
    frame = cam.render_arm(a)
    assert frame.shape == (64, 80, 3) and frame.dtype == np.uint8
    assert cam.render_arm(b).tobytes() == frame.tobytes()
    b.qd = b.qd + 1.0                                  # velocities are not seen
    assert cam.render_arm(b).tobytes() == frame.tobytes()
    b.q = b.q + np.array([0.02, 0.0])                  # a sub-pixel motion of the arm is
    assert cam.render_arm(b).tobytes() != frame.tobytes()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 8 pixels"):
        ArmCamera(width=4)
    cam = ArmCamera()
    with pytest.raises(ValueError, match="same length"):
        cam.render([0.0, 0.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        cam.render([np.nan], [0.0])

"""The simulated camera over the arm (flashrt_ros/sim/camera.py, no ROS): it shows the target
where the target is, and the same arm state gives the same frame."""
from __future__ import annotations

import numpy as np
import pytest

from flashrt_ros.sim.arm import SimArm
from flashrt_ros.sim.camera import REACH, TARGET, TARGET_TIP_R, ArmCamera


def _red(frame: np.ndarray) -> np.ndarray:
    """Pixels mostly the target's colour: bool [H, W]."""
    f = frame.astype(int)
    return (np.abs(f - np.array(TARGET)).sum(-1) < 60)


def test_the_target_moves_with_the_target():
    """One joint: the target is a red link from the base and a disc at its end, symmetric about
    the target's ray, so the red pixels' centroid lies on that ray and the farthest red pixel is
    the disc's far edge."""
    cam = ArmCamera(width=96, height=96)
    base = cam.joint_points([0.0])[0]
    reach = REACH * 96
    seen = []
    for target in (-1.0, -0.3, 0.4, 1.0):
        red = _red(cam.render([2.5], [target]))        # the arm points down and away
        assert red.sum() > 20, "the target is drawn"
        ys, xs = np.nonzero(red)
        offsets = np.stack([xs, ys], axis=1) - base
        centre = offsets.mean(0)
        angle = np.arctan2(-centre[0], -centre[1])     # from "up", counter-clockwise
        assert abs(angle - target) < 0.02, (angle, target)
        far = np.linalg.norm(offsets, axis=1).max()
        assert abs(far - (reach + TARGET_TIP_R * 96)) < 1.0, far
        seen.append(centre)
    # and it moves as far as the target's point moves
    steps = np.linalg.norm(np.diff(seen, axis=0), axis=1)
    assert (steps > 5).all(), steps


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

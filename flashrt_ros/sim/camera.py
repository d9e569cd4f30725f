"""A camera over the simulated arm (no ROS): what it sees, drawn with numpy.

The camera looks straight down on the arm, drawn as a planar chain: the base at the image's
centre, link i at the absolute angle q[0] + ... + q[i] from "up", the links of equal length
reaching `REACH` of the image's shorter side. `SimArm` has no other kinematics (its joints are
integrators), so this drawing is what gives its joint positions a picture.

The target is a pose in joint space (the expert steers every joint to it), so it is drawn as a
ghost of the arm in that pose: thin red links with a red disc at the end of each, the largest at
its tip. One disc at the tip alone would leave the pose open (with two joints the elbow can bend
either way), and a policy has to read the target from the image: the arm's state carries its
joints, not the target. The target is drawn last, so the arm never hides it, and large: a tiny
policy reads it through a few dozen image tokens.

Shapes are anti-aliased: a pixel takes a shape's colour in proportion to how far inside the shape
its centre lies (clipped to one pixel), so the frame changes with a sub-pixel motion and a policy
can read positions finer than its pixels. The frame depends only on the joints and the target:
the same state gives the same bytes.

    camera = ArmCamera(width=96, height=96)
    frame = camera.render_arm(arm)       # uint8 [H, W, 3], RGB (ROS encoding "rgb8")
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENCODING = "rgb8"
REACH = 0.4                                    # the stretched arm, in units of the shorter side
BACKGROUND = (40, 44, 52)
BASE, LINK, JOINT, TIP = (110, 110, 120), (215, 215, 205), (70, 130, 240), (60, 200, 110)
TARGET = (235, 60, 45)
# sizes in units of the shorter side: link widths; radii of the base, joints, tip and target discs
LINK_WIDTH, BASE_R, JOINT_R, TIP_R = 0.045, 0.05, 0.03, 0.035
TARGET_LINK_WIDTH, TARGET_R, TARGET_TIP_R = 0.025, 0.06, 0.085


@dataclass(frozen=True)
class ArmCamera:
    """A top-down camera of `width` x `height` pixels over the simulated arm."""
    width: int = 96
    height: int = 96

    def __post_init__(self):
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 8:
                raise ValueError(f"ArmCamera.{name}: expected an integer of at least 8 pixels, "
                                 f"found {v!r}")

    @property
    def scale(self) -> int:
        return min(self.width, self.height)

    def joint_points(self, q) -> np.ndarray:
        """Joint angles [A] -> pixel coordinates (x, y) [A + 1, 2] of the base and of the end
        of each link (x to the right, y down; the last row is the tip)."""
        q = np.asarray(q, dtype=np.float64).reshape(-1)
        link = REACH * self.scale / max(len(q), 1)
        angles = np.cumsum(q)                                    # from "up", counter-clockwise
        steps = link * np.stack([-np.sin(angles), -np.cos(angles)], axis=1)
        base = np.array([(self.width - 1) / 2, (self.height - 1) / 2])
        return np.concatenate([base[None], base + np.cumsum(steps, axis=0)])

    def render(self, q, target) -> np.ndarray:
        """The frame for joint angles `q` [A] and the target pose `target` [A]: uint8 [H, W, 3]
        RGB."""
        q = np.asarray(q, dtype=np.float64).reshape(-1)
        target = np.asarray(target, dtype=np.float64).reshape(-1)
        if q.shape != target.shape or not q.size or not (np.isfinite(q).all()
                                                          and np.isfinite(target).all()):
            raise ValueError(f"render: expected finite joint angles and target of the same "
                             f"length (one value per joint), found {q.shape} and {target.shape}")
        img = np.empty((self.height, self.width, 3), dtype=np.float32)
        img[:] = BACKGROUND
        s = self.scale
        arm = self.joint_points(q)
        for a, b in zip(arm[:-1], arm[1:]):
            self._paint(img, _segment_distance, (a, b), LINK_WIDTH * s / 2, LINK)
        self._paint(img, _disc_distance, (arm[0],), BASE_R * s, BASE)
        for p in arm[1:-1]:
            self._paint(img, _disc_distance, (p,), JOINT_R * s, JOINT)
        self._paint(img, _disc_distance, (arm[-1],), TIP_R * s, TIP)
        ghost = self.joint_points(target)
        for a, b in zip(ghost[:-1], ghost[1:]):
            self._paint(img, _segment_distance, (a, b), TARGET_LINK_WIDTH * s / 2, TARGET)
        for p in ghost[1:-1]:
            self._paint(img, _disc_distance, (p,), TARGET_R * s, TARGET)
        self._paint(img, _disc_distance, (ghost[-1],), TARGET_TIP_R * s, TARGET)
        return np.rint(img).astype(np.uint8)

    def render_arm(self, arm) -> np.ndarray:
        """The frame of a `SimArm` (its joint positions and its target)."""
        return self.render(arm.q, arm.target)

    def _paint(self, img, distance, points, radius: float, colour) -> None:
        """Blend `colour` into `img` over the shape of pixels within `radius` of `points`
        (anti-aliased: coverage = radius + 1/2 - distance, clipped to [0, 1]); only the shape's
        bounding box is computed."""
        pts = np.stack(points)
        lo = np.floor(pts.min(0) - radius - 1).astype(int)
        hi = np.ceil(pts.max(0) + radius + 1).astype(int)
        x0, y0 = max(lo[0], 0), max(lo[1], 0)
        x1, y1 = min(hi[0] + 1, self.width), min(hi[1] + 1, self.height)
        if x0 >= x1 or y0 >= y1:
            return
        xs, ys = np.meshgrid(np.arange(x0, x1, dtype=np.float64),
                             np.arange(y0, y1, dtype=np.float64))
        cover = np.clip(radius + 0.5 - distance(xs, ys, *points), 0.0, 1.0)[..., None]
        patch = img[y0:y1, x0:x1]
        patch += (np.asarray(colour, dtype=np.float32) - patch) * cover.astype(np.float32)


def _disc_distance(xs, ys, centre):
    return np.hypot(xs - centre[0], ys - centre[1])


def _segment_distance(xs, ys, a, b):
    """Distance from each pixel centre to the segment a-b."""
    d = b - a
    length2 = float(d @ d)
    t = np.zeros_like(xs) if length2 == 0 else \
        np.clip(((xs - a[0]) * d[0] + (ys - a[1]) * d[1]) / length2, 0.0, 1.0)
    return np.hypot(xs - (a[0] + t * d[0]), ys - (a[1] + t * d[1]))

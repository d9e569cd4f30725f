"""What a replay gives back and how it compares with the recording.

`compare_actions` pairs each replayed step's ActionChunk with the recorded one of that step and
compares `COMPARED_FIELDS` and the float32 payload byte for byte (whole CDR messages are never
compared: Fast CDR leaves their padding bytes uninitialised). `ReplayResult` holds what the player
sent and received; its verdict (`ok`) counts as well: a step without an action, an action no step
explains, or a step the bag holds no action for fails the replay unless counts are tolerated.
Imports no rclpy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COMPARED_FIELDS = ("step", "episode_id", "horizon", "action_dim", "capsule_lineage")


def _ranges(indices) -> str:
    """[0, 1, 2, 7] -> "0-2, 7"."""
    out, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            out.append(f"{start}-{k}" if k > start else f"{k}")
            start = None
    return ", ".join(out)


@dataclass
class ActionComparison:
    recorded: int                  # recorded actions paired with an observation
    replayed: int                  # actions received for replayed observations
    compared: int = 0
    identical: int = 0
    mismatches: list = field(default_factory=list)   # (observation index, what differs)

    @property
    def all_identical(self) -> bool:
        return self.recorded > 0 and self.identical == self.recorded == self.compared

    def describe(self) -> str:
        if not self.recorded:
            return f"{self.replayed} action(s) received; the bag holds no recorded actions to compare"
        head = (f"{self.replayed} action(s) received for {self.recorded} recorded; byte-identical "
                f"{self.identical}/{self.recorded}")
        if self.mismatches:
            i, why = self.mismatches[0]
            head += f"; first difference at observation {i}: {why}"
        return head


def compare_actions(recorded: dict, replayed: dict) -> ActionComparison:
    """Compare recorded and replayed ActionChunks per observation index (payload as bytes)."""
    cmp = ActionComparison(len(recorded), len(replayed))
    for i, rec in sorted(recorded.items()):
        got = replayed.get(i)
        if got is None:
            cmp.mismatches.append((i, "no action was received"))
            continue
        cmp.compared += 1
        a = np.asarray(rec.data, dtype=np.float32)
        b = np.asarray(got.data, dtype=np.float32)
        diffs = [f"{f} {getattr(rec, f)!r} != {getattr(got, f)!r}" for f in COMPARED_FIELDS
                 if getattr(rec, f) != getattr(got, f)]
        if a.tobytes() != b.tobytes():
            if a.shape == b.shape:
                d = np.abs(a.astype(np.float64) - b.astype(np.float64))
                diffs.append(f"data differs in {int((a != b).sum())} of {a.size} values "
                             f"(max |diff| {float(np.nanmax(d)):.3g})")
            else:
                diffs.append(f"data has {b.size} values, recorded {a.size}")
        if diffs:
            cmp.mismatches.append((i, "; ".join(diffs)))
        else:
            cmp.identical += 1
    return cmp


@dataclass
class ReplayResult:
    mode: str
    observations: int = 0       # observations published (one per replayed step)
    instructions: int = 0
    capsule_ops: int = 0
    capsule_failures: list = field(default_factory=list)   # (operation, recorded msg, replay msg)
    answers_lost: int = 0       # capsule calls whose answer DDS lost; their events stood in
    actions: dict = field(default_factory=dict)            # step position -> ActionChunk
    steps: list = field(default_factory=list)              # step positions replayed, in order
    extra: list = field(default_factory=list)              # actions no replayed step explains
    unrecorded: list = field(default_factory=list)         # replayed steps the bag has no action for
    recorded_steps: dict = field(default_factory=dict)     # position -> recorded ActionChunk
    tolerate_counts: bool = False
    ambiguous: list = field(default_factory=list)          # steps whose frames a bag cannot tell
    comparison: ActionComparison | None = None
    error: str = ""
    seconds: float = 0.0

    @property
    def missing(self) -> list:
        """Replayed steps no action came back for."""
        return [p for p in self.steps if p not in self.actions]

    @property
    def counts_match(self) -> bool:
        return not (self.missing or self.extra or (self.unrecorded and self.recorded_steps))

    @property
    def ok(self) -> bool:
        if self.error or self.capsule_failures:
            return False
        if not self.counts_match and not self.tolerate_counts:
            return False
        c = self.comparison
        return c.all_identical if c and c.recorded else not self.missing

    def describe(self) -> str:
        lines = [f"replayed ({self.mode}) {self.observations} observation(s), "
                 f"{self.instructions} instruction(s), {self.capsule_ops} capsule operation(s) "
                 f"in {self.seconds:.2f} s"]
        lines.append(f"steps: {len(self.steps)} replayed, {len(self.actions)} answered, "
                     f"{len(self.extra)} extra action(s), {len(self.recorded_steps)} recorded")
        if self.comparison is not None:
            lines.append("actions: " + self.comparison.describe())
            differ = [i for i, _ in self.comparison.mismatches if i in self.ambiguous]
            if differ:
                lines.append(f"{len(differ)} differing step(s) ({_ranges(differ)}) had more than "
                             f"one frame of a camera within the slop: the live node may have "
                             f"joined another one than the replay (docs/bags.md, Cameras in bags)")
        verdict = "reported only (--tolerate-count-mismatch)" if self.tolerate_counts else "FAILED"
        missing = self.missing
        if missing:
            p = missing[0]
            rec = self.recorded_steps.get(p)
            what = f" (recorded step {rec.step} of episode {rec.episode_id})" if rec else ""
            lines.append(f"counts {verdict}: no action came back for {len(missing)} step(s) "
                         f"{_ranges(missing)}; the first missing step is {p}{what}")
        if self.unrecorded and self.recorded_steps:
            lines.append(f"counts {verdict}: the bag holds no action for step(s) "
                         f"{_ranges(self.unrecorded)}, which the replay stepped (the recorder "
                         f"lost it, or the recorded node refused that observation); the first "
                         f"is step {self.unrecorded[0]}")
        if self.extra:
            lines.append(f"counts {verdict}: {len(self.extra)} extra action(s); the first: "
                         f"{self.extra[0]}")
        for op, rec, got in self.capsule_failures:
            lines.append(f"capsule operation {op} failed on replay: {got} (recorded: {rec})")
        if self.answers_lost:
            lines.append(f"{self.answers_lost} capsule answer(s) lost in DDS; the node's capsule "
                         f"events stood in for them")
        if self.error:
            lines.append("stopped: " + self.error)
        return "\n".join(lines)

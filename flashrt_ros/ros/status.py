"""The node's reports: `~/status` (PolicyStatus) and `/diagnostics`, on the status timer.

`StatusReporting` is a part of `PolicyNode` (a base class of it). It reads the node's counters
(stale, idle and rejected inputs, the deadline monitor, the step latencies), its inputs' join
(camera policies: observations left incomplete by a missing or stale camera, which count as stale
observations in `~/status`, and the cameras stale now), the runtime's position and the store's
usage. It holds no lock but the store's, briefly, inside `store.usage()`.
"""
from __future__ import annotations

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from flashrt_ros.msg import PolicyStatus
from flashrt_ros.ros.parameters import MODEL_SHAPE, model_shape


class StatusReporting:
    """The status reports of `PolicyNode` (see the module docstring)."""

    def _publish_status(self):
        rt, store = self.runtime, self.store
        s = PolicyStatus()
        s.header.stamp = self.get_clock().now().to_msg()
        s.lifecycle_state = self.state_label
        dl = self.deadlines
        inputs = self.inputs
        incomplete = inputs.incomplete if inputs is not None else 0
        s.deadline_misses, s.stale_observations = dl.misses, self._stale + incomplete
        s.rejected_inputs = self._rejected
        if rt is not None and store is not None:
            s.device, s.preset = str(rt.device), rt.model_cfg.name
            shape = model_shape(rt.model_cfg)
            s.obs_dim, s.action_dim, s.horizon = (shape[n] for n in MODEL_SHAPE)
            s.step, s.position, s.episode_id = rt.step_count, rt.position, rt.episode
            s.capsule_lineage = store.lineage
            late = self.late
            s.bringup = late.progress() if late is not None else "ready"
            lat = np.asarray(self._step_ms, dtype=np.float64)
            if lat.size:
                s.last_step_ms = float(lat[-1])
                s.p50_step_ms, s.p99_step_ms = (float(x) for x in np.percentile(lat, [50, 99]))
            usage = store.usage()
            s.capsules = sum(u["count"] for u in usage.values())
            s.gpu_bytes, s.host_bytes, s.disk_bytes = (usage[t]["used"] for t in ("gpu", "host", "disk"))
            s.gpu_budget, s.host_budget, s.disk_budget = (usage[t]["budget"] for t in ("gpu", "host", "disk"))
        self.pub_status.publish(s)
        late = np.asarray(dl.lateness_ms, dtype=np.float64)
        lat_p50, lat_p99 = np.percentile(late, [50, 99]) if late.size else (0.0, 0.0)
        st = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: policy",
                              hardware_id=s.device or "unconfigured")
        st.level = DiagnosticStatus.OK if dl.misses == 0 else DiagnosticStatus.WARN
        st.message = f"{self.state_label}, step {s.step}" + (
            f", {dl.misses} deadline misses" if dl.misses else "")
        kv = {"step": s.step, "position": s.position, "episode": s.episode_id,
              "p50_step_ms": f"{s.p50_step_ms:.3f}", "p99_step_ms": f"{s.p99_step_ms:.3f}",
              "deadline_misses": dl.misses, "late_steps": dl.late, "skipped_ticks": dl.skipped,
              "ticks": dl.ticks, "max_lateness_ms": f"{dl.max_lateness_ns * 1e-6:.3f}",
              "p50_lateness_ms": f"{lat_p50:.3f}", "p99_lateness_ms": f"{lat_p99:.3f}",
              "stale_observations": self._stale + incomplete, "idle_ticks": self._idle,
              "rejected_inputs": self._rejected, "capsules": s.capsules,
              "gpu_bytes": f"{s.gpu_bytes}/{s.gpu_budget}", "host_bytes": f"{s.host_bytes}/{s.host_budget}",
              "disk_bytes": f"{s.disk_bytes}/{s.disk_budget}", "last_error": self._last_error,
              "bringup": s.bringup}
        if inputs is not None and inputs.sync is not None:
            sync = inputs.sync.status()
            kv.update({"inputs.incomplete_observations": incomplete,
                       "inputs.stale_cameras": ", ".join(inputs.stale_cameras()) or "none",
                       "inputs.synced_sets": sync.sets, "inputs.dropped": sync.dropped_total})
        kv.update({f"bringup.{k}": v for k, v in self.bringup.values().items()})
        late = self.late
        if late is not None:
            kv.update({f"late.{k}": v for k, v in late.values().items()})
        st.values = [KeyValue(key=k, value=str(v)) for k, v in kv.items()]
        self.pub_diag.publish(DiagnosticArray(header=s.header, status=[st]))

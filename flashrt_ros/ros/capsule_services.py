"""The node's capsule services: one per operation of `operations.OPERATIONS`, a few lines each.

`CapsuleServices` is a part of `PolicyNode` (a base class of it), kept apart so that the node
reads as its lifecycle and control loop. It reads the node's `runtime`, `store`, `state_label`
and callback groups (`_capsule`, `_disk`), and publishes on its `pub_events`.

Every handler runs under `store.lock` (`_guarded`): operations are serialised and see a consistent
index; the store takes `runtime.lock` only around copies of live bytes (the lock order and the
committed-boundary promise are in node.py's docstring). A failure is `success=false` with the
core's message; no request can kill the node. Every operation but a query publishes a
CapsuleEvent (and one `evict` per capsule the store demoted or dropped to make room) just before
its answer.

A `noise_seed` (Restore, Fork with switch_to, Reset) restarts the live state's noise sampler after
the operation, at the same committed boundary: the runtime lock is held across both. It is checked
before the operation, so a seed the policy cannot take refuses the whole request.
"""
from __future__ import annotations

import contextlib
import time

from rclpy.qos import QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy

from flashrt_ros.core.exceptions import (CapsuleConflict, FlashRTError, InputError,
                                         NotConfiguredError, StorageError)
from flashrt_ros.msg import CapsuleEvent, CapsuleInfo
from flashrt_ros.ros.operations import OPERATIONS
from flashrt_ros.ros.stamps import s_to_stamp

# Services answer many clients through one response writer: with the default KEEP_LAST 10, a
# storm of calls from other clients can overwrite a response a slow client has not acknowledged
# yet, and that client never gets its answer (seen under a 10k-call storm on 2 cores).
SERVICE_QOS = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE,
                         history=QoSHistoryPolicy.KEEP_LAST)
KEEP_SAMPLER = -1           # a request's noise_seed that leaves the noise sampler as it is


class CapsuleServices:
    """The capsule services of `PolicyNode` (see the module docstring)."""

    def _make_services(self):
        """One service per operation of the capsule-operation table (flashrt_ros.ros.operations):
        handled by `_srv_<operation>`, on the disk group if it does file I/O, else the capsule group."""
        self.capsule_services = [
            self.create_service(op.srv_type, f"~/{op.service}",
                                self._guarded(op, getattr(self, f"_srv_{op.name}")),
                                qos_profile=SERVICE_QOS,
                                callback_group=self._disk if op.file_io else self._capsule)
            for op in OPERATIONS]

    def _guarded(self, op, handler):
        """Run operation `op`'s handler under store.lock; turn every failure into success=false;
        emit its CapsuleEvent (and those of evictions), unless it is a query."""
        name = op.name

        def callback(request, response):
            t0 = time.perf_counter()
            event = CapsuleEvent(operation=name)
            rt, store = self.runtime, self.store
            evicted = []
            try:
                if rt is None or store is None:
                    raise NotConfiguredError(
                        f"{name}: the node is {self.state_label}; expected a configured node - "
                        f"configure it first (lifecycle transition 'configure', e.g. "
                        f"`flashrt-ros lifecycle configure`)")
                with store.lock:
                    before = {n: c.tier for n, c in store.capsules.items()}
                    handler(rt, store, request, response, event)
                    evicted = self._evictions(store, before, event.name)
                response.success = True
                response.message = response.message or "ok"
            except FlashRTError as e:
                response.success, response.message = False, str(e)
                if isinstance(e, (StorageError, CapsuleConflict)):    # the directory's fault
                    self.get_logger().warning(f"{name}: {e}")
            except Exception as e:  # noqa: BLE001 - a bug must not take the node down
                self.get_logger().error(f"{name}: unexpected error {type(e).__name__}: {e}")
                response.success = False
                response.message = f"{name}: internal error {type(e).__name__}: {e}"
            ms = (time.perf_counter() - t0) * 1e3
            if hasattr(response, "latency_ms"):
                response.latency_ms = float(ms)
            event.success, event.message, event.latency_ms = response.success, response.message, ms
            if not op.query:          # a query reports nothing
                for ev in evicted:
                    self._emit(ev, rt)
                self._emit(event, rt)
            return response
        return callback

    @staticmethod
    def _evictions(store, before: dict, named: str) -> list:
        """CapsuleEvents for capsules the store demoted or dropped to make room during a call."""
        out = []
        for name, tier in before.items():
            cap = store.capsules.get(name)
            if name == named or (cap is not None and cap.tier == tier):
                continue
            where = f"{tier} -> {cap.tier}" if cap is not None else f"dropped from {tier}"
            out.append(CapsuleEvent(operation="evict", name=name, source=tier,
                                    tier=cap.tier if cap is not None else "", success=True,
                                    message=f"evicted {name!r} ({where}) to make room"))
        return out

    def _emit(self, event: CapsuleEvent, rt):
        event.header.stamp = self.get_clock().now().to_msg()
        if rt is not None:
            event.step, event.position = rt.step_count, rt.position
        self.pub_events.publish(event)

    @staticmethod
    def _info(cap) -> CapsuleInfo:
        info = CapsuleInfo(name=cap.name, parent=cap.parent, step=cap.step, position=cap.position,
                           tier=cap.tier, nbytes=cap.nbytes, pinned=cap.pinned, file=cap.file,
                           fingerprint=cap.fingerprint, digest=cap.digest)
        info.created = s_to_stamp(cap.created)
        return info

    @staticmethod
    def _noise_seed(rt, req, ev, live: bool = True):
        """The seed `req.noise_seed` restarts the live state's noise sampler at (None: -1, keep
        it), checked before the operation changes anything. `live`: the operation lands the live
        state somewhere (a fork that does not switch leaves it alone)."""
        seed = ev.noise_seed = int(req.noise_seed)
        if seed == KEEP_SAMPLER:
            return None
        if not 0 <= seed < 1 << 32:
            raise InputError(f"noise_seed: expected {KEEP_SAMPLER} (keep the sampler) or an "
                             f"integer in [0, 2^32), found {seed}; nothing changed")
        if not live:
            raise InputError(f"fork: noise_seed {seed} restarts the sampler of the live state "
                             f"the branch becomes; expected switch_to: true with it, found false "
                             f"- nothing forked (or restore the branch later with its noise_seed)")
        rt.check_noise_seed(seed)
        return seed

    @staticmethod
    @contextlib.contextmanager
    def _then_seeded(rt, seed):
        """Run the operation, then restart the noise sampler at `seed` (None: nothing) at the
        same committed boundary; a failed operation seeds nothing."""
        if seed is None:
            yield
            return
        with rt.lock:
            yield
            rt.seed_noise(seed)

    @staticmethod
    def _seeded(seed) -> str:
        return "" if seed is None else f", noise sampler restarted at seed {seed}"

    def _srv_snapshot(self, rt, store, req, res, ev):
        ev.name, ev.tier, ev.pin = req.name, req.tier, req.pin
        cap = store.snapshot(req.name, tier=req.tier or None, pin=req.pin)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"snapshot {cap.name!r}: step {cap.step}, {cap.nbytes} bytes in {cap.tier}"

    def _srv_restore(self, rt, store, req, res, ev):
        ev.name = req.name
        seed = self._noise_seed(rt, req, ev)
        # at one boundary: the store copies and sets the lineage under runtime.lock (a disk
        # capsule's file is read and verified before it takes the lock, unless a seed follows)
        with self._then_seeded(rt, seed):
            cap = store.restore(req.name)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"restored {cap.name!r}: step {cap.step}, position {cap.position}" + \
            self._seeded(seed)

    def _srv_fork(self, rt, store, req, res, ev):
        ev.name, ev.source, ev.switch_to = req.name, req.source, req.switch_to
        seed = self._noise_seed(rt, req, ev, live=req.switch_to)
        # one store operation: a branch of the live state is snapshotted and switched to at one
        # boundary (store.fork holds runtime.lock across both)
        with self._then_seeded(rt, seed):
            cap = store.fork(req.source, req.name, switch_to=req.switch_to, tier=req.tier or None)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"forked {req.source or '<live>'!r} -> {cap.name!r}" + \
            (" and switched to it" if req.switch_to else "") + self._seeded(seed)

    def _srv_rollback(self, rt, store, req, res, ev):
        ev.k = req.k
        with rt.lock:
            step, position = rt.rollback(int(req.k))
        res.step, res.position = step, position
        res.message = f"rolled back {req.k} step(s) to step {step}"

    def _srv_list(self, rt, store, req, res, ev):
        res.capsules = [self._info(c) for c in store.list(req.tier or None)]
        res.message = f"{len(res.capsules)} capsule(s)"

    def _srv_delete(self, rt, store, req, res, ev):
        """Without delete_file a saved file always stays: a capsule that has one is demoted to
        the disk tier (its memory copy dropped), one that is only on disk is refused. A file the
        store wrote itself to make room (a spill) was never asked for and goes with its capsule."""
        ev.name, ev.delete_file = req.name, req.delete_file
        cap = store.get(req.name)
        kind = cap.file
        if req.delete_file or kind != "saved":
            store.delete(req.name)
            res.message = f"deleted {req.name!r}" + (
                f" and its file {cap.path}" if kind == "saved" else
                f" and the file the store had spilled it to ({cap.path})" if kind == "spill" else "")
        elif cap.tier == "disk":
            raise InputError(f"delete {req.name!r}: the capsule is only on disk ({cap.path}); "
                             f"expected delete_file: true to delete its file - nothing deleted")
        else:
            store.move(req.name, "disk")
            res.message = (f"dropped the memory copy of {req.name!r}; its file {cap.path} stays "
                           f"(listed in the disk tier; delete_file: true deletes it)")
        ev.tier = cap.tier if req.name in store.capsules else ""

    def _srv_reset(self, rt, store, req, res, ev):
        ev.keep_context = req.keep_context
        seed = self._noise_seed(rt, req, ev)
        with rt.lock, self._then_seeded(rt, seed):
            res.episode_id = rt.reset(keep_context=req.keep_context)
            res.step = rt.step_count
            store.on_reset()
        res.message = (f"reset to {'the instruction context' if req.keep_context else 'an empty context'}"
                       f", episode {res.episode_id}") + self._seeded(seed)

    def _srv_save(self, rt, store, req, res, ev):
        ev.name, ev.evict_from_memory = req.name, req.evict_from_memory
        res.path = store.save(req.name, keep_in_memory=not req.evict_from_memory)
        cap = store.get(req.name)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"saved {req.name!r} to {res.path}" + (
            " (memory copy dropped)" if req.evict_from_memory else f", {cap.tier} copy kept")

    def _srv_load(self, rt, store, req, res, ev):
        ev.name, ev.tier, ev.restore = req.name, req.tier, req.restore
        if req.tier == "disk":      # the store reads "disk" as its default memory tier
            raise InputError(f"load_capsule: expected tier gpu, host or '' (the default memory "
                             f"tier), found 'disk'; a load brings a capsule file into memory")
        cap = store.load(req.name, tier=req.tier or None)
        if req.restore:
            cap = store.restore(req.name)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"loaded {req.name!r} into {cap.tier}" + (" and restored it" if req.restore else "")


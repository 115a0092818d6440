"""A worker's control commands: swap its model for another configured one, or unload it.

A swap stops taking new jobs (Celery stops consuming the old queue; deliveries already on
their way go back to it), lets the jobs in flight finish (or, if asked, requeues them to
go on elsewhere), checks that the new model fits before letting go of the old one, unloads,
loads, and consumes the new model's queue. An unload does the same up to the unload and
then waits, parked, for a load command.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from broker import control
from broker.recovery import requeue_attempt
from broker.sources import resolve
from workers.footprint import model_bytes
from workers.telemetry import free_memory_bytes, gpu_memory

if TYPE_CHECKING:
    from workers.runtime import WorkerRuntime

log = logging.getLogger("tokenpool.worker")
MB = 1024 * 1024
CONTROL_REPLY_S = 10.0


def refused(status: int, type_: str, message: str) -> dict[str, Any]:
    return {"accepted": False, "status": status, "error": {"type": type_, "message": message}}


def held_bytes(rt: WorkerRuntime) -> int:
    """What the current model frees when unloaded: on a GPU, this process's own VRAM as NVML
    counts it (other workers on the same GPU left out); else, or where NVML cannot tell, the
    estimate from the model's file and context."""
    own = gpu_memory(rt.gpu).get("vram_process_bytes")
    if own is not None:
        return int(own)
    return model_bytes(rt.spec, resolve(rt.spec.source, rt.settings.cache_dir))


class ControlLoop:
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime

    def run_once(self) -> None:
        cmd = control.receive(self.rt.redis, self.rt.keys, self.rt.name, block_s=1.0)
        if cmd is None:
            return
        handler = {"load": self.load, "unload": self.unload}.get(cmd.get("action", ""))
        reply = handler(cmd) if handler else refused(400, "unknown_command", str(cmd))
        log.info("control %s: %s", cmd.get("action"), reply)
        control.answer(self.rt.redis, self.rt.keys, cmd, reply)

    def load(self, cmd: dict[str, Any]) -> dict[str, Any]:
        rt, target = self.rt, str(cmd.get("model"))
        if target not in rt.settings.models:
            return refused(404, "unknown_model", f"no model {target!r}; configured: "
                           f"{', '.join(sorted(rt.settings.models))}")
        if rt.swap is not None:
            return refused(409, "busy", f"already {rt.swap['phase']} for {rt.swap}")
        if target == rt.model_name and not rt.parked and rt.state != "error":
            return {"accepted": True, "detail": f"already serving {target}"}
        problem = self.fit_problem(target)
        if problem:
            return refused(409, "insufficient_memory", problem)
        self.begin(target, bool(cmd.get("requeue")))
        return {"accepted": True, "from": rt.model_name, "to": target}

    def unload(self, cmd: dict[str, Any]) -> dict[str, Any]:
        rt = self.rt
        if rt.swap is not None:
            return refused(409, "busy", f"already {rt.swap['phase']} for {rt.swap}")
        if rt.parked:
            return {"accepted": True, "detail": "already unloaded"}
        self.begin(None, bool(cmd.get("requeue")))
        return {"accepted": True, "from": rt.model_name, "to": None}

    def begin(self, target: str | None, requeue: bool) -> None:
        self.rt.swap = {"from": self.rt.model_name, "to": target, "requeue": requeue,
                        "phase": "draining", "since": round(time.time(), 3)}
        threading.Thread(target=self.run_swap, args=(target, requeue), name="swap",
                         daemon=True).start()

    def fit_problem(self, target: str) -> str | None:
        """Why `target` can't be loaded in place of the current model, or None if it fits."""
        rt = self.rt
        spec = rt.settings.models[target]
        needed = model_bytes(spec, resolve(spec.source, rt.settings.cache_dir))
        free, where = free_memory_bytes(rt.gpu)
        held = held_bytes(rt) if rt.state in ("loaded", "generating") else 0
        available, limit = free + held, rt.settings.worker_memory_limit_mb
        if limit is not None:
            available = min(available, int(limit * MB))
        if needed <= available:
            return None
        return (f"model {target!r} needs about {needed / MB:.0f} MB (file and context); "
                f"{available / MB:.0f} MB of {where} is available"
                + (f" (worker_memory_limit_mb {limit:g})" if limit is not None else "")
                + f"; keeping {rt.model_name!r}")

    def run_swap(self, target: str | None, requeue: bool) -> None:
        rt = self.rt
        try:
            self.drain(requeue)
            self.phase("unloading")
            rt.unload()
            if target is None:
                rt.parked = True
                return
            self.phase("loading")
            rt.model_name, rt.spec, rt.parked = target, rt.settings.models[target], False
            try:
                rt.model()
            except Exception:
                log.exception("swap: loading %s failed; jobs will retry the load", target)
            rt.accepting = True
            self.consume(True)
            log.info("swap: now serving %s", target)
        finally:
            rt.swap = None
            rt.heartbeat.beat_now()

    def phase(self, name: str) -> None:
        if self.rt.swap is not None:
            self.rt.swap = {**self.rt.swap, "phase": name}
        self.rt.heartbeat.beat_now()

    def drain(self, requeue: bool) -> None:
        """Take no new jobs; let the running ones finish (or requeue them)."""
        rt = self.rt
        rt.accepting = False
        self.consume(False)
        deadline = time.monotonic() + rt.settings.swap_drain_timeout_s
        if requeue:
            self.requeue_running("the worker's model is being swapped")
        while rt.jobs:
            if time.monotonic() > deadline:
                self.requeue_running("the model swap's drain timed out")
                deadline = float("inf")
            time.sleep(0.1)

    def requeue_running(self, reason: str) -> None:
        rt = self.rt
        if rt.celery is None:
            return
        for job_id in sorted(rt.jobs):
            record = rt.store.get(job_id)
            if record is not None and record["status"] == "running":
                requeue_attempt(rt.store, rt.celery, rt.keys, rt.settings, job_id, rt.name,
                                record, reason)

    def consume(self, on: bool) -> None:
        """Start or stop consuming the current model's queue (Celery's own control)."""
        rt = self.rt
        if rt.celery is None or rt.consuming == on:
            return
        queue = rt.keys.queue(rt.model_name)
        ctl = rt.celery.control
        act = ctl.add_consumer if on else ctl.cancel_consumer
        act(queue, destination=[rt.name], reply=True, timeout=CONTROL_REPLY_S)
        rt.consuming = on
        log.info("%s consuming %s", "now" if on else "no longer", queue)

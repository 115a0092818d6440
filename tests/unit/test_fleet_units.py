"""Pure pieces of fleet telemetry: the state machine, token rate, memory estimates, metrics."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import Frozen, histogram_families, job_families, worker_families
from broker.store import BUCKETS
from workers.footprint import kv_cache_bytes
from workers.state import TRANSITIONS, IllegalTransition, StateMachine
from workers.telemetry import TokenRate, gpu_memory, host_memory

LEGAL_PATH = ["loading", "loaded", "generating", "loaded", "unloading", "idle", "loading",
              "error", "loading", "loaded"]


def test_a_worker_walks_the_legal_path_and_remembers_it() -> None:
    machine = StateMachine()
    for state in LEGAL_PATH:
        machine.to(state)  # type: ignore[arg-type]
    assert machine.state == "loaded"
    assert [t[2] for t in machine.recent()] == LEGAL_PATH
    assert [t[1] for t in machine.recent()] == ["idle", *LEGAL_PATH[:-1]]


@pytest.mark.parametrize(("start", "to"), [
    (s, t) for s in TRANSITIONS for t in TRANSITIONS if t not in TRANSITIONS[s]])
def test_every_illegal_transition_is_refused_and_changes_nothing(start: str, to: str) -> None:
    machine = StateMachine(start)  # type: ignore[arg-type]
    with pytest.raises(IllegalTransition, match=f"{start} -> {to}"):
        machine.to(to)  # type: ignore[arg-type]
    assert machine.state == start and machine.recent() == []


def test_generating_cannot_jump_to_unloading_or_idle() -> None:
    assert TRANSITIONS["generating"] == {"loaded", "error"}
    assert "idle" not in TRANSITIONS["loaded"]


def test_to_if_moves_only_from_the_expected_state() -> None:
    machine = StateMachine("loaded")
    assert not machine.to_if("generating", "loaded")
    assert machine.to_if("loaded", "generating") and machine.state == "generating"


def test_no_gpu_is_reported_as_cpu_without_crashing() -> None:
    assert gpu_memory("cpu") == {"device": "cpu"}
    assert gpu_memory("0")["device"] in ("cpu", "cuda")  # no NVIDIA driver here: cpu
    memory = host_memory()
    assert 0 < memory["rss_bytes"] < memory["host_memory_total_bytes"]


def test_token_rate_counts_only_the_recent_window() -> None:
    rate = TokenRate(window_s=0.5)
    for _ in range(10):
        rate.add()
    assert rate.rate() == 20.0
    time.sleep(0.6)
    assert rate.rate() == 0.0


def test_kv_cache_estimate_follows_the_gguf_metadata() -> None:
    gemma = {"general.architecture": "gemma3", "gemma3.block_count": 18,
             "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
             "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
             "gemma3.embedding_length": 640}
    assert kv_cache_bytes(gemma, 1000) == 1000 * 18 * 1 * 512 * 2
    llama = {"general.architecture": "llama", "llama.block_count": 32,
             "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8,
             "llama.embedding_length": 4096}
    assert kv_cache_bytes(llama, 1) == 32 * 8 * 256 * 2  # 128 KiB a token, as llama 3 8B


def exposition(families: list) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Frozen(families))
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metric_families_expose_counters_and_cumulative_histograms() -> None:
    counts = {"generate|chat|succeeded": "4", "embed|embed|failed": "1", "tokens|chat": "40"}
    values = [0.04, 0.07, 0.08, 40.0]  # as the finishing script counts them: every le >= v
    hist = {f"ttft_s|chat|{le}": str(sum(v <= float(le) for v in values))
            for le in BUCKETS["ttft_s"] if any(v <= float(le) for v in values)}
    hist |= {"ttft_s|chat|+Inf": "4", "ttft_s|chat|sum": str(sum(values))}
    found = exposition([*job_families(counts), *histogram_families(hist)])
    jobs = {(s.labels["kind"], s.labels["status"]): s.value for s in found["tokenpool_jobs"]}
    assert jobs == {("generate", "succeeded"): 4.0, ("embed", "failed"): 1.0}
    ttft = found["tokenpool_job_time_to_first_token_seconds"]
    buckets = [(s.labels["le"], s.value) for s in ttft if s.name.endswith("_bucket")]
    assert ("0.05", 1.0) in buckets and ("0.1", 3.0) in buckets and buckets[-1] == ("+Inf", 4.0)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)


def test_worker_families_mark_one_state_and_gone_workers_down() -> None:
    workers = [{"name": "a", "model": "chat", "gpu": "cpu", "live": True, "state": "loaded",
                "rss_bytes": 5, "jobs": ["x"], "jobs_done": 2},
               {"name": "b", "model": "chat", "gpu": "0", "live": False, "state": "gone"}]
    found = exposition(worker_families(workers))
    assert {s.labels["worker"]: s.value for s in found["tokenpool_worker_up"]} == {"a": 1, "b": 0}
    states = {s.labels["state"]: s.value for s in found["tokenpool_worker_state"]}
    assert states["loaded"] == 1 and sum(states.values()) == 1
    assert [s.value for s in found["tokenpool_worker_running_jobs"]] == [1.0]


class FakeNvml:
    """NVML as nvidia-ml-py shows it: one GPU shared by two workers and a stranger."""

    def __init__(self, compute: list[tuple[int, int | None]],
                 graphics: list[tuple[int, int | None]] | None = None) -> None:
        self.compute, self.graphics = compute, graphics or []

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        assert index == 0
        return "gpu0"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> object:
        return type("Info", (), {"used": 9 << 30, "total": 141 << 30, "free": 132 << 30})()

    def _procs(self, pairs: list[tuple[int, int | None]]) -> list[object]:
        return [type("Proc", (), {"pid": pid, "usedGpuMemory": used})() for pid, used in pairs]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[object]:
        return self._procs(self.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: str) -> list[object]:
        return self._procs(self.graphics)


def test_a_worker_reports_its_own_vram_beside_the_whole_gpus(monkeypatch) -> None:
    import workers.telemetry as telemetry

    fake = FakeNvml([(101, 3 << 30), (202, 5 << 30), (303, 1 << 30)])
    monkeypatch.setattr(telemetry, "_nvml", lambda: fake)
    mine, other = gpu_memory("0", pid=101), gpu_memory("0", pid=202)
    assert mine["vram_used_bytes"] == other["vram_used_bytes"] == 9 << 30  # the device's
    assert mine["vram_process_bytes"] == 3 << 30 and other["vram_process_bytes"] == 5 << 30
    assert mine["vram_free_bytes"] == 132 << 30 and mine["device"] == "cuda"


def test_own_vram_adds_graphics_contexts_and_is_none_where_nvml_cannot_tell(monkeypatch) -> None:
    import workers.telemetry as telemetry

    monkeypatch.setattr(telemetry, "_nvml", lambda: FakeNvml([(101, 3 << 30)], [(101, 1 << 20)]))
    assert gpu_memory("0", pid=101)["vram_process_bytes"] == (3 << 30) + (1 << 20)
    # A container's PID namespace: NVML lists host pids, never ours.
    assert gpu_memory("0", pid=999)["vram_process_bytes"] is None
    # Drivers without per-process accounting report usedGpuMemory as None.
    monkeypatch.setattr(telemetry, "_nvml", lambda: FakeNvml([(101, None)]))
    assert gpu_memory("0", pid=101)["vram_process_bytes"] is None


def test_the_fleet_metrics_carry_the_workers_own_vram() -> None:
    worker = {"name": "chat-0-1@h", "model": "chat", "gpu": "0", "live": True,
              "state": "loaded", "vram_process_bytes": 3 << 30, "vram_used_bytes": 9 << 30}
    families = {f.name: f for f in worker_families([worker])}
    (sample,) = families["tokenpool_worker_vram_process_bytes"].samples
    assert sample.value == 3 << 30 and sample.labels["worker"] == "chat-0-1@h"


def test_a_swap_counts_what_the_current_model_frees_by_the_workers_own_vram(monkeypatch) -> None:
    import workers.control as control

    rt = type("Rt", (), {"gpu": "0"})()
    monkeypatch.setattr(control, "gpu_memory", lambda gpu: {"vram_process_bytes": 7 << 30})
    assert control.held_bytes(rt) == 7 << 30
    monkeypatch.setattr(control, "gpu_memory", lambda gpu: {"device": "cpu"})
    monkeypatch.setattr(control, "model_bytes", lambda spec, path: 123)
    monkeypatch.setattr(control, "resolve", lambda source, cache: source)
    rt.spec = type("Spec", (), {"source": "x.gguf"})()
    rt.settings = type("S", (), {"cache_dir": "/tmp"})()
    assert control.held_bytes(rt) == 123

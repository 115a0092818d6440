"""Prometheus `GET /metrics`: the whole fleet's numbers, read from Redis at scrape time, so
any API process answers for all workers and all jobs (counted once, by the scripts that end
jobs; see broker.store)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.ops import queue_depths
from api.workers import fleet
from broker.store import BUCKETS

HISTOGRAMS = {  # timing in the job record -> metric name, help
    "queued_s": ("tokenpool_job_queue_wait_seconds", "Time from submit to start"),
    "ttft_s": ("tokenpool_job_time_to_first_token_seconds", "Time from start to first token"),
    "total_s": ("tokenpool_job_duration_seconds", "Time from start to end"),
    "tokens_per_s": ("tokenpool_job_tokens_per_second", "Decode rate after the first token"),
}
WORKER_STATES = ("idle", "loading", "loaded", "generating", "unloading", "error")


class Frozen(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def job_families(counts: dict[str, str]) -> list[Metric]:
    jobs = CounterMetricFamily("tokenpool_jobs", "Jobs that ended, by kind, model and status",
                               labels=["kind", "model", "status"])
    tokens = CounterMetricFamily("tokenpool_generated_tokens", "Tokens generated",
                                 labels=["model"])
    for field, value in sorted(counts.items()):
        parts = field.split("|")
        if parts[0] == "tokens":
            tokens.add_metric([parts[1]], float(value))
        elif len(parts) == 3:
            jobs.add_metric(parts, float(value))
    return [jobs, tokens]


def histogram_families(fields: dict[str, str]) -> list[Metric]:
    by_series: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for field, value in fields.items():
        metric, model, le = field.split("|")
        by_series[metric, model][le] = float(value)
    out: list[Metric] = []
    for metric, (name, doc) in HISTOGRAMS.items():
        family = HistogramMetricFamily(name, doc, labels=["model"])
        for (m, model), values in sorted(by_series.items()):
            if m != metric:
                continue
            buckets = [(le, values.get(le, 0.0)) for le in BUCKETS[metric]]
            buckets.append(("+Inf", values.get("+Inf", 0.0)))
            family.add_metric([model], buckets, sum_value=values.get("sum", 0.0))
        out.append(family)
    return out


def worker_families(workers: list[dict[str, Any]]) -> list[Metric]:
    labels = ["worker", "model", "gpu"]
    up = GaugeMetricFamily("tokenpool_worker_up", "1 while the worker's heartbeat is live",
                           labels=labels)
    state = GaugeMetricFamily("tokenpool_worker_state", "1 for the worker's current state",
                              labels=[*labels, "state"])
    gauges = {
        "vram_used_bytes": GaugeMetricFamily("tokenpool_worker_vram_used_bytes",
                                             "VRAM used on the worker's GPU, by every process",
                                             labels=labels),
        "vram_process_bytes": GaugeMetricFamily("tokenpool_worker_vram_process_bytes",
                                                "VRAM the worker process itself holds (NVML "
                                                "per-process accounting)", labels=labels),
        "vram_total_bytes": GaugeMetricFamily("tokenpool_worker_vram_total_bytes",
                                              "VRAM of the worker's GPU", labels=labels),
        "rss_bytes": GaugeMetricFamily("tokenpool_worker_rss_bytes", "Worker process RSS",
                                       labels=labels),
        "tokens_per_s": GaugeMetricFamily("tokenpool_worker_tokens_per_second",
                                          "Tokens per second over the last seconds",
                                          labels=labels),
        "jobs": GaugeMetricFamily("tokenpool_worker_running_jobs", "Jobs running now",
                                  labels=labels),
    }
    done = CounterMetricFamily("tokenpool_worker_jobs", "Jobs a worker ran since it started",
                               labels=[*labels, "outcome"])
    for w in workers:
        values = [w["name"], str(w.get("model")), str(w.get("gpu"))]
        up.add_metric(values, 1.0 if w.get("live") else 0.0)
        if not w.get("live"):
            continue
        for name in WORKER_STATES:
            state.add_metric([*values, name], 1.0 if w.get("state") == name else 0.0)
        for key, family in gauges.items():
            value = len(w.get("jobs") or []) if key == "jobs" else w.get(key)
            if value is not None:
                family.add_metric(values, float(value))
        done.add_metric([*values, "succeeded"], float(w.get("jobs_done", 0)))
        done.add_metric([*values, "failed"], float(w.get("jobs_failed", 0)))
    return [up, state, *gauges.values(), done]


def all_families(counts: dict[str, str], hist: dict[str, str], depths: dict[str, int],
                 followers: int, workers: list[dict[str, Any]]) -> list[Metric]:
    """Every family `/metrics` serves (docs/reference/metrics.md is generated from these)."""
    depth = GaugeMetricFamily("tokenpool_queue_depth", "Jobs waiting in each model's queue",
                              labels=["model"])
    for model, n in depths.items():
        depth.add_metric([model], float(n))
    following = GaugeMetricFamily("tokenpool_api_sse_followers",
                                  "Event streams the scraped API process is serving now")
    following.add_metric([], float(followers))
    return [*job_families(counts), *histogram_families(hist), depth, following,
            *worker_families(workers)]


async def metrics(request: Request) -> Response:
    state = request.app.state
    counts = {_text(k): _text(v) for k, v in
              (await state.redis.hgetall(state.keys.metrics_jobs())).items()}
    hist = {_text(k): _text(v) for k, v in
            (await state.redis.hgetall(state.keys.metrics_histograms())).items()}
    families = all_families(counts, hist, await queue_depths(state), state.followers,
                            await fleet(state))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Frozen(families))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics, methods=["GET"])]

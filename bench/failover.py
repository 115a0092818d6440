"""Many hosts, no single point of failure: what a replica's confirmation costs a submit, and
how long the pool takes to get over a lost Redis primary or a lost worker host.

    python -m bench.failover [--jobs 300] [--chaos-runs 3]

1. Submit latency, side by side in one run: two API processes on one primary with one
   replica (loopback), one with `redis_confirm_replicas = 1` (WAIT for the replica before the
   202) and one without, POSTs alternating; p50 and p99 of each and their ratio.
2. The multi-host chaos (tests/hosts, network namespaces; needs root), `--chaos-runs` times:
   the time without a master after the primary's host dies (target under 10 s with
   down-after-milliseconds 3000), accepted jobs lost (target 0), and the time until a dead
   worker host's jobs run again (target heartbeat_ttl_s + 3 s). Min, median and max.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.record import recorded
from broker.redis_server import EmbeddedRedis, free_port
from cli.supervisor import Supervisor, tokenpool_argv

BODY = {"kind": "generate", "prompt": "Once upon a time", "max_tokens": 8}


def start_apis(url: str, log_dir: Path) -> tuple[Supervisor, dict[str, str]]:
    """Two APIs on one Redis: `confirm` waits for a replica, `plain` does not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPOOL_")}
    env.update({"REDIS_URL": url, "HF_HUB_OFFLINE": "1"})
    sup = Supervisor(env=env, log_dir=log_dir)
    urls = {}
    for name, replicas in (("plain", "0"), ("confirm", "1")):
        port = free_port()
        sup.add(name, tokenpool_argv("api", "--port", str(port), "--log-level", "WARNING"),
                {"TOKENPOOL_REDIS_CONFIRM_REPLICAS": replicas,
                 "TOKENPOOL_KEY_PREFIX": f"tpbench{name}"})
        urls[name] = f"http://127.0.0.1:{port}"
    sup.start()
    for url_ in urls.values():
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url_}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"API at {url_} never answered")
            time.sleep(0.2)
    return sup, urls


def submit_latency(jobs: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        primary = EmbeddedRedis(Path(tmp) / "primary", appendonly=True).start()
        replica = EmbeddedRedis(Path(tmp) / "replica", appendonly=True,
                                replica_of=primary.port).start()
        sup, urls = start_apis(primary.url, Path(tmp) / "logs")
        times: dict[str, list[float]] = {name: [] for name in urls}
        try:
            with httpx.Client(timeout=30) as http:
                for url in urls.values():  # warm: the token counter, the pools
                    for _ in range(5):
                        http.post(f"{url}/v1/jobs", json=BODY)
                for _ in range(jobs):
                    for name, url in urls.items():
                        started = time.perf_counter()
                        reply = http.post(f"{url}/v1/jobs", json=BODY)
                        times[name].append(time.perf_counter() - started)
                        assert reply.status_code == 202, reply.text
        finally:
            sup.stop()
            replica.stop()
            primary.stop()
    return times


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if q < 100 else max(values)


FIGURES = {
    "no_master_s": re.compile(r"failover: a new master ([\d.]+)s after"),
    "lost": re.compile(r"accepted jobs, (\d+) lost"),
    "host_jobs_again_s": re.compile(r"ran again ([\d.]+)s after it died"),
}


def chaos(runs: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {name: [] for name in FIGURES}
    for run in range(runs):
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
             "tests/hosts/test_hosts.py", "-k", "dies"], capture_output=True, text=True,
            timeout=1200)
        for name, pattern in FIGURES.items():
            match = pattern.search(done.stdout)
            if match:
                found[name].append(float(match[1]))
        print(f"  chaos run {run + 1}: exit {done.returncode}", flush=True)
        if done.returncode:
            print("\n".join(done.stdout.splitlines()[-25:]), flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--chaos-runs", type=int, default=3)
    args = parser.parse_args()
    times = submit_latency(args.jobs)
    plain, confirm = times["plain"], times["confirm"]
    with recorded("failover"):
        print(f"\nsubmit latency, {args.jobs} POST /v1/jobs each, alternating "
              "(one replica, loopback):")
        for name, values in times.items():
            print(f"  {name:8} p50 {1000 * p(values, 50):6.2f} ms   "
                  f"p99 {1000 * p(values, 99):6.2f} ms")
        print(f"  confirm / plain: p50 {p(confirm, 50) / p(plain, 50):.2f}x, "
              f"p99 {p(confirm, 99) / p(plain, 99):.2f}x")
        if args.chaos_runs:
            found = chaos(args.chaos_runs)
            print(f"\nmulti-host chaos, {args.chaos_runs} runs (min / median / max):")
            for name, values in found.items():
                if values:
                    print(f"  {name:18} {min(values):6.1f} {statistics.median(values):6.1f} "
                          f"{max(values):6.1f}   ({len(values)} runs)")
                else:
                    print(f"  {name:18} not measured (see the test output)")


if __name__ == "__main__":
    main()

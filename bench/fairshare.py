"""Fair share between API keys: what the fair path costs one key alone, and how the slots are
shared when several keys compete.

One chat worker (max_batch 8) and two APIs on the same Redis: one with fair_share on (jobs wait
in their key's line and reach Celery as slots free up), one with it off (every job goes to
Celery at once: the path before fair share). Rounds alternate between them, each one key
submitting `--jobs` small jobs in one batch POST and timing until all have ended; then the
slot shares, read from the jobs' start times, with two and three keys of equal weight and two
of weights 3:1, all through the fair API.

    python -m bench.fairshare [--jobs 200] [--rounds 3] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import redis

from bench.record import recorded
from bench.stack import bench_redis, wait_ready
from broker.apikeys import KeyStore
from broker.keys import Keys
from broker.redis_server import free_port
from cli.supervisor import Supervisor, tokenpool_argv

PREFIX = "tpbench"
SLOTS = 8


def job(max_tokens: int, i: int) -> dict[str, object]:
    return {"kind": "generate", "model": "chat", "prompt": f"Item {i}: a short note about",
            "max_tokens": max_tokens, "temperature": 0.0}


def submit(http: httpx.Client, token: str, n: int, max_tokens: int) -> list[str]:
    reply = http.post("/v1/jobs/batch", headers={"Authorization": f"Bearer {token}"},
                      json={"jobs": [job(max_tokens, i) for i in range(n)]})
    reply.raise_for_status()
    return [j["id"] for j in reply.json()["data"]]


def ended(client: redis.Redis, keys: Keys, ids: list[str]) -> list[tuple[float, float]]:
    """(started_at, finished_at) of every job, once all succeeded."""
    while True:
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(keys.job(job_id), "status", "started_at", "finished_at")
        rows = pipe.execute()
        if all(r[0] in (b"succeeded", b"failed", b"cancelled") for r in rows):
            assert all(r[0] == b"succeeded" for r in rows), "a job did not succeed"
            return [(float(r[1]), float(r[2])) for r in rows]
        time.sleep(0.05)


def alone(url: str, client: redis.Redis, keys: Keys, token: str, n: int,
          max_tokens: int) -> float:
    """Jobs/s of one key's batch, from the POST to the last job's end."""
    with httpx.Client(base_url=url, timeout=120) as http:
        started = time.time()
        ids = submit(http, token, n, max_tokens)
        last = max(end for _, end in ended(client, keys, ids))
    return n / (last - started)


def shares(url: str, client: redis.Redis, keys: Keys, tokens: list[str], n: int,
           max_tokens: int) -> list[float]:
    """Each key's share of the jobs started while all of them had jobs waiting: from the
    ninth start after the last key submitted (the 8 before were sent already) for the next
    n starts."""
    with httpx.Client(base_url=url, timeout=120) as http:
        batches = [submit(http, token, n, max_tokens) for token in tokens]
    last_submit = max(float(client.hget(keys.job(ids[0]), "created_at") or 0) for ids in batches)
    starts = [(start, k) for k, ids in enumerate(batches)
              for start, _ in ended(client, keys, ids)]
    window = [k for start, k in sorted(starts) if start > last_submit][SLOTS:SLOTS + n]
    return [round(window.count(k) / len(window), 3) for k in range(len(tokens))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = bench_redis(Path(tmp) / "redis")
        client = redis.Redis.from_url(server.url)
        keys = Keys(PREFIX)
        store = KeyStore(client, keys)
        tokens = {name: store.create(name, weight=w)[1]
                  for name, w in [("solo", 1), ("a", 1), ("b", 1), ("c", 1), ("heavy", 3),
                                  ("light", 1)]}
        _, admin = store.create("ops", scopes=("admin",))
        env = {**os.environ, "REDIS_URL": server.url, "HF_HUB_OFFLINE": "1",
               "TOKENPOOL_KEY_PREFIX": PREFIX, "TOKENPOOL_MAX_BATCH_JOBS": "2000",
               "TOKENPOOL_MODELS__SUMMARY__ENABLED": "false",
               "TOKENPOOL_MODELS__EMBED__ENABLED": "false"}
        sup = Supervisor(env=env, log_dir=Path(tmp) / "logs")
        sup.add("worker-chat", tokenpool_argv("worker", "--model", "chat", "--gpu", "cpu"))
        ports = {"fair": free_port(), "direct": free_port()}
        for path, port in ports.items():
            sup.add(f"api-{path}", tokenpool_argv("api", "--port", str(port), "--log-level",
                                                  "WARNING"),
                    {"TOKENPOOL_FAIR_SHARE": "true" if path == "fair" else "false"})
        sup.start()
        urls = {path: f"http://127.0.0.1:{port}" for path, port in ports.items()}
        try:
            for url in urls.values():
                with httpx.Client(base_url=url, timeout=30,
                                  headers={"Authorization": f"Bearer {admin}"}) as http:
                    wait_ready(http)
            for url in urls.values():  # warm up both paths
                alone(url, client, keys, tokens["solo"], 16, args.max_tokens)
            rates: dict[str, list[float]] = {"fair": [], "direct": []}
            for _ in range(args.rounds):
                for path in ("direct", "fair"):
                    rates[path].append(alone(urls[path], client, keys, tokens["solo"],
                                             args.jobs, args.max_tokens))
            two = shares(urls["fair"], client, keys, [tokens["a"], tokens["b"]], 120,
                         args.max_tokens)
            three = shares(urls["fair"], client, keys, [tokens["a"], tokens["b"], tokens["c"]],
                           120, args.max_tokens)
            weighted = shares(urls["fair"], client, keys, [tokens["heavy"], tokens["light"]],
                              160, args.max_tokens)
        finally:
            sup.stop()
            client.close()
            server.stop()
    fair, direct = statistics.median(rates["fair"]), statistics.median(rates["direct"])
    with recorded("fairshare"):
        print(f"one key alone: {args.jobs} jobs of {args.max_tokens} tokens in one batch POST, "
              f"one chat worker (8 slots), {args.rounds} rounds alternating")
        print(f"  straight to Celery (fair_share off): {direct:.2f} jobs/s (median; "
              f"{', '.join(f'{r:.2f}' for r in rates['direct'])})")
        print(f"  fair path (fair_share on):           {fair:.2f} jobs/s (median; "
              f"{', '.join(f'{r:.2f}' for r in rates['fair'])})")
        print(f"  ratio fair / direct: {fair / direct:.3f}")
        print(f"slot shares while all wait (equal weights): two keys {two}, three keys {three}")
        print(f"slot shares with weights 3:1: {weighted} (rule: [0.75, 0.25])")
        print(json.dumps({"jobs_per_s_direct": round(direct, 2),
                          "jobs_per_s_fair": round(fair, 2),
                          "ratio": round(fair / direct, 3), "shares_two": two,
                          "shares_three": three, "shares_3_to_1": weighted}))


if __name__ == "__main__":
    main()

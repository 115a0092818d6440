"""A pool on hosts of its own: two Redis hosts (primary and replica, each with a Sentinel), an
API host (with the third Sentinel), and two worker hosts each running a `chat` worker, in
network namespaces behind one bridge (tests/hosts/net.py). Redis and the Sentinels need
passwords; every tokenpool process finds the master through the Sentinels."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from broker.connection import sync_redis
from broker.keys import Keys
from broker.redis_server import redis_server_binary
from broker.settings import SentinelSpec
from cli.supervisor import tokenpool_argv
from tests.hosts.net import Host, Network

PREFIX = "tphosts"
PASSWORD, SENTINEL_PASSWORD = "pool-secret", "sentinel-secret"
MASTER = "tokenpool"
DOWN_AFTER_MS = 3000
HEARTBEAT_TTL_S = 3.0
CONFIG = f"""
key_prefix = "{PREFIX}"
heartbeat_interval_s = 0.5
heartbeat_ttl_s = {HEARTBEAT_TTL_S}
timeout_grace_s = 2
sse_keepalive_s = 1
visibility_timeout_s = 10
behind_trusted_proxy = true  # the API binds its host's address; the test network is closed
redis_confirm_replicas = 1
[models.chat]
n_ctx = 1024
max_tokens = 160
n_threads = 1  # two worker hosts share two cores
[models.summary]
enabled = false
[models.embed]
enabled = false
[schedules.drain]  # fired only once a test starts beat
action = "summarize_list"
every_s = 1.0
list_key = "{PREFIX}:inbox"
model = "chat"
max_tokens = 6
"""


@dataclass
class Pool:
    net: Network
    dir: Path
    env: dict[str, str]
    api: str
    workers: dict[str, Any] = field(default_factory=dict)  # host name -> worker Popen

    @property
    def redis_url(self) -> str:
        return SentinelSpec(hosts=[f"{h.address}:26379" for h in self.sentinel_hosts()],
                            master=MASTER, password=PASSWORD,
                            sentinel_password=SENTINEL_PASSWORD).url()

    def sentinel_hosts(self) -> list[Host]:
        return [self.net.hosts[name] for name in ("r1", "r2", "api")]

    def client(self) -> redis.Redis:
        return sync_redis(self.redis_url, socket_timeout=5, socket_connect_timeout=2)

    def start_worker(self, host: Host) -> None:
        self.workers[host.name] = host.spawn(
            tokenpool_argv("worker", "--model", "chat", "--gpu", "cpu"), self.env,
            self.dir / f"worker-{host.name}.log")

    def host_of_worker(self, worker: str) -> str:
        """The host whose worker process is `worker` (named chat-cpu-<pid>@…)."""
        pid = int(worker.split("-")[2].split("@")[0])
        return next(name for name, proc in self.workers.items() if proc.pid == pid)

    def loaded_workers(self) -> list[str]:
        try:
            models = {m["id"]: m for m in httpx.get(f"{self.api}/v1/models", timeout=5)
                      .json()["data"]}
        except (httpx.HTTPError, json.JSONDecodeError, KeyError):
            return []
        return [w["name"] for w in models["chat"]["workers"]
                if w["state"] in ("loaded", "generating")]

    def wait_workers(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.loaded_workers()) < n:
            assert time.monotonic() < deadline, f"fewer than {n} workers; logs in {self.dir}"
            time.sleep(0.3)

    def master(self) -> tuple[str, int] | None:
        """The master the Sentinel on the API host names now."""
        sentinel = self.net.hosts["api"]
        client = redis.Redis(sentinel.address, 26379, password=SENTINEL_PASSWORD,
                             socket_timeout=2, socket_connect_timeout=2)
        try:
            found = client.sentinel_get_master_addr_by_name(MASTER)
            if not found:
                return None
            host = found[0].decode() if isinstance(found[0], bytes) else str(found[0])
            return host, int(found[1])
        except redis.RedisError:
            return None
        finally:
            client.close()

    @property
    def keys(self) -> Keys:
        return Keys(PREFIX)


def redis_argv(host: Host, data: Path, replica_of: Host | None) -> list[str]:
    argv = [redis_server_binary(), "--port", "6379", "--bind", host.address, "127.0.0.1",
            "--protected-mode", "no", "--dir", str(data), "--appendonly", "yes",
            "--appendfsync", "everysec", "--save", "", "--requirepass", PASSWORD,
            "--masterauth", PASSWORD]
    return argv + (["--replicaof", replica_of.address, "6379"] if replica_of else [])


def sentinel_argv(host: Host, primary: Host, data: Path) -> list[str]:
    conf = data / "sentinel.conf"
    conf.write_text(
        f"port 26379\nbind {host.address} 127.0.0.1\nprotected-mode no\ndir {data}\n"
        f"requirepass {SENTINEL_PASSWORD}\n"
        f"sentinel monitor {MASTER} {primary.address} 6379 2\n"
        f"sentinel auth-pass {MASTER} {PASSWORD}\n"
        f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
        f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {MASTER} 10000\n"
        f"sentinel parallel-syncs {MASTER} 1\n")
    return [redis_server_binary(), str(conf), "--sentinel"]


def wait_sentinels_agree(pool: Pool, timeout_s: float = 60) -> None:
    """Every Sentinel knows the replica and the two other Sentinels (they find each other
    through the master's hello channel every 2 s): only then can two of them fail over."""
    deadline = time.monotonic() + timeout_s
    for host in pool.sentinel_hosts():
        client = redis.Redis(host.address, 26379, password=SENTINEL_PASSWORD,
                             socket_timeout=2, socket_connect_timeout=2)
        try:
            while True:
                try:
                    info = client.sentinel_master(MASTER)
                    if (int(info["num-slaves"]) >= 1
                            and int(info["num-other-sentinels"]) >= 2):
                        break
                except redis.RedisError:
                    pass
                assert time.monotonic() < deadline, f"Sentinel on {host.name} never agreed"
                time.sleep(0.3)
        finally:
            client.close()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    try:
        net = Network.create()
    except Exception as exc:  # the suite fails with the reason; it never skips quietly
        pytest.fail(f"cannot build the test hosts: {exc}")
    base = tmp_path_factory.mktemp("hosts")
    try:
        for name in ("r1", "r2", "api", "w1", "w2"):
            net.add_host(name)
        hosts = net.hosts
        config = base / "tokenpool.toml"
        config.write_text(CONFIG)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TOKENPOOL_") and k != "REDIS_URL"}
        pool = Pool(net, base, env, f"http://{hosts['api'].address}:8000")
        env.update({
            "TOKENPOOL_CONFIG": str(config), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TOKENPOOL_REDIS_SENTINEL__HOSTS": json.dumps(
                [f"{h.address}:26379" for h in pool.sentinel_hosts()]),
            "TOKENPOOL_REDIS_SENTINEL__MASTER": MASTER,
            "TOKENPOOL_REDIS_SENTINEL__PASSWORD": PASSWORD,
            "TOKENPOOL_REDIS_SENTINEL__SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        })
        for name, replica_of in (("r1", None), ("r2", hosts["r1"])):
            data = base / f"redis-{name}"
            data.mkdir()
            hosts[name].spawn(redis_argv(hosts[name], data, replica_of), env,
                              base / f"redis-{name}.log")
        for name in ("r1", "r2", "api"):
            data = base / f"sentinel-{name}"
            data.mkdir()
            hosts[name].spawn(sentinel_argv(hosts[name], hosts["r1"], data), env,
                              base / f"sentinel-{name}.log")
        wait_sentinels_agree(pool)
        hosts["api"].spawn(tokenpool_argv("api", "--host", hosts["api"].address,
                                          "--port", "8000"), env, base / "api.log")
        for name in ("w1", "w2"):
            pool.start_worker(hosts[name])
        pool.wait_workers(2)
        yield pool
    finally:
        net.destroy()

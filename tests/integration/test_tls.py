"""Redis over TLS: a real redis-server with `--tls-port` only, a CA and certificates the test
makes with openssl, and an API and a worker given nothing but a rediss:// URL and the
redis_tls_* files. Clients that do not trust the server, or bring no certificate, are refused."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from broker.connection import sync_redis
from broker.redis_server import free_port, redis_server_binary
from cli.supervisor import Supervisor, tokenpool_argv
from tests.conftest import chat_only_config, follow, stack_env, wait_ready

PASSWORD = "tls-pw"
MASTER = "tls-master"
CONFIG = chat_only_config("tptls")  # the test gives each run its own prefix


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(base: Path, name: str) -> tuple[Path, Path]:
    key, crt = base / f"{name}.key", base / f"{name}.crt"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", key,
            "-out", crt, "-subj", f"/CN={name}")
    return crt, key


def make_cert(base: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    key, csr, crt, ext = (base / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    ext.write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
            "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
            "-days", "2", "-out", crt, "-extfile", ext)
    return crt, key


class Certs:
    def __init__(self, base: Path) -> None:
        self.ca = make_ca(base, "ca")
        self.rogue_ca = make_ca(base, "rogue-ca")  # trusts nothing of ours
        self.server = make_cert(base, "redis", self.ca, "IP:127.0.0.1,DNS:localhost")
        self.client = make_cert(base, "client", self.ca, "DNS:tokenpool-client")


def start_tls_redis(base: Path, certs: Certs) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = base / "redis.log"
    process = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs.server[0]), "--tls-key-file", str(certs.server[1]),
         "--tls-ca-cert-file", str(certs.ca[0]), "--requirepass", PASSWORD,
         "--save", "", "--appendonly", "no", "--dir", str(base), "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while "Ready to accept connections" not in (log.read_text() if log.exists() else ""):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            text = log.read_text() if log.exists() else ""
            pytest.fail(f"{redis_server_binary()} cannot serve TLS (Debian's redis-server "
                        f"can: `make sysdeps` installs it): {text[-500:]}")
        time.sleep(0.05)
    return process, port


def start_tls_sentinel(base: Path, certs: Certs, master_port: int
                       ) -> tuple[subprocess.Popen[bytes], int]:
    """A Sentinel that speaks TLS to its clients and to the master (tls-replication)."""
    port = free_port()
    conf, log = base / "sentinel.conf", base / "sentinel.log"
    conf.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ndir {base}\nlogfile {log}\n"
        f"tls-cert-file {certs.server[0]}\ntls-key-file {certs.server[1]}\n"
        f"tls-ca-cert-file {certs.ca[0]}\ntls-replication yes\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n"
        f"sentinel auth-pass {MASTER} {PASSWORD}\n")
    process = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while "+monitor master" not in (log.read_text() if log.exists() else ""):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return process, port


def tls_url(port: int, certs: Certs, ca: Path | None = None, client: bool = True) -> str:
    query = f"ssl_cert_reqs=required&ssl_ca_certs={ca or certs.ca[0]}"
    if client:
        query += f"&ssl_certfile={certs.client[0]}&ssl_keyfile={certs.client[1]}"
    return f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?{query}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Certs, int, int]]:
    """The certificates, a TLS-only Redis's port and a TLS-only Sentinel's that watches it."""
    base = tmp_path_factory.mktemp("tls")
    certs = Certs(base)
    process, port = start_tls_redis(base, certs)
    sentinel, sentinel_port = start_tls_sentinel(base, certs, port)
    try:
        yield certs, port, sentinel_port
    finally:
        for child in (sentinel, process):
            child.kill()
            child.wait(10)


@pytest.mark.parametrize("through", ["rediss_url", "sentinel"])
def test_an_api_and_a_worker_given_tls_settings_and_the_files_run_a_job(tls, tmp_path, through):
    certs, port, sentinel_port = tls
    config = tmp_path / "tokenpool.toml"
    config.write_text(CONFIG)
    api_port = free_port()
    address = {"REDIS_URL": f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"} \
        if through == "rediss_url" else {
            "TOKENPOOL_REDIS_SENTINEL__HOSTS": f'["127.0.0.1:{sentinel_port}"]',
            "TOKENPOOL_REDIS_SENTINEL__MASTER": MASTER,
            "TOKENPOOL_REDIS_SENTINEL__PASSWORD": PASSWORD,
            "TOKENPOOL_REDIS_SENTINEL__TLS": "true"}
    env = stack_env("", config, **address)
    if through == "sentinel":
        env.pop("REDIS_URL")
    sup = Supervisor(env={
        **env, "TOKENPOOL_REDIS_TLS_CA_FILE": str(certs.ca[0]),
        "TOKENPOOL_REDIS_TLS_CERT_FILE": str(certs.client[0]),
        "TOKENPOOL_REDIS_TLS_KEY_FILE": str(certs.client[1]),
        "TOKENPOOL_KEY_PREFIX": f"tptls-{through}"},
        log_dir=tmp_path / "logs", restart_delay_s=0.2)
    sup.add("worker", tokenpool_argv("worker", "--model", "chat", "--gpu", "cpu"))
    sup.add("api", tokenpool_argv("api", "--port", str(api_port)))
    sup.start()
    api = f"http://127.0.0.1:{api_port}"
    try:
        with httpx.Client(base_url=api, timeout=60) as http:
            wait_ready(http, sup, timeout_s=120)
            reply = http.post("/v1/jobs", json={"kind": "generate", "max_tokens": 12,
                                                "prompt": "Once upon a time", "temperature": 0})
            assert reply.status_code == 202, reply.text
            events = follow(api, reply.json()["id"], 120)
            record = http.get(f"/v1/jobs/{reply.json()['id']}").json()
            workers = http.get("/v1/workers").json()["data"]
    finally:
        sup.stop()
    assert record["status"] == "succeeded", record
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert "".join(e["text"] for e in events if e["type"] == "token") == \
        record["result"]["text"] != ""
    assert [w["model"] for w in workers] == ["chat"]  # the fleet and control path, over TLS


@pytest.mark.parametrize(("why", "url_of", "error"), [
    ("a CA that did not sign the server's certificate",
     lambda port, certs: tls_url(port, certs, ca=certs.rogue_ca[0]), "CERTIFICATE_VERIFY_FAILED"),
    ("no client certificate", lambda port, certs: tls_url(port, certs, client=False), None),
    ("no TLS at all", lambda port, certs: f"redis://:{PASSWORD}@127.0.0.1:{port}/0", None),
])
def test_a_client_that_cannot_prove_or_check_who_is_who_is_refused(tls, why, url_of, error):
    certs, port, _ = tls
    client = sync_redis(url_of(port, certs), socket_timeout=3, socket_connect_timeout=3)
    with client, pytest.raises(redis.ConnectionError, match=error):
        client.ping()
    with sync_redis(tls_url(port, certs)) as client:  # the same server, the right files
        assert client.ping() is True

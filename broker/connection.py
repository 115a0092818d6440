"""Redis clients that ride out a Redis restart or a Sentinel failover: reconnect and retry with
capped backoff, and find the current master through the Sentinels when there are some.

One address names the Redis everywhere (settings, the REDIS_URL every child of `up` gets):
a plain `redis://` or `rediss://` URL, or `redis+sentinel://[user:password@]host:port,host:port
/master/db[?sentinel_password=…&ssl=1&ssl_ca_certs=…]`, which Settings builds from its
`redis_sentinel` group. TLS options travel in the address too (`ssl_ca_certs`, `ssl_certfile`,
`ssl_keyfile`: Settings adds its `redis_tls_*` files), so a child process given only REDIS_URL
verifies the same certificates. Every client of ours is made here, from that address.

Every script a worker calls is idempotent (see broker.store), so a command retried after its
reply was lost writes nothing twice. Workers retry for long (a token waits rather than a job
failing); the API retries briefly and then answers 503, so a client is never left hanging.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

log = logging.getLogger("tokenpool.redis")
# A Redis host that dies or is cut off sends no reset: a connection to it would wait for ever
# (a blocking XREAD, a BRPOP, a script's reply). An idle connection gets TCP keepalive probes
# after 3 s of silence, every second, three times; one with a request unanswered is dropped
# after 5 s (TCP_USER_TIMEOUT); so either fails within about 6 s and the client reconnects
# (through the Sentinels, to the new master). Both are longer than our blocking reads
# (XREAD's 5 s wait is idle time, kombu's BRPOP waits 1 s).
KEEPALIVE = {opt: value for opt, value in (("TCP_KEEPIDLE", 3), ("TCP_KEEPINTVL", 1),
                                           ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 5000))
             if hasattr(socket, opt)}
KEEPALIVE_OPTIONS = {getattr(socket, opt): value for opt, value in KEEPALIVE.items()}
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
BACKOFF_CAP_S = 1.0
API_RETRIES = 3
API_SPARE_CONNECTIONS = 64  # beside the followers' catch-up reads, for every other request
# A worker's threads each take a connection per command: Celery's `max_batch` task threads,
# and for a bulk message (one per `max_batch` embedding jobs) up to `max_batch` more each.
# redis-py 8 caps a pool at 100 and raises "Too many connections" past it, which the retry
# took for Redis being away (an embed worker on a 10,000-item batch left jobs to the reaper).
# Redis itself allows 10,000 clients.
WORKER_MAX_CONNECTIONS = 4096


def retries_for(retry_s: float) -> int:
    """Attempts that, with backoff capped at one second, span about `retry_s` seconds."""
    return max(1, int(retry_s / BACKOFF_CAP_S) + 4)


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.05, cap=BACKOFF_CAP_S)


SENTINEL_SCHEME = "redis+sentinel"
# The files of a TLS connection, as redis-py and kombu name them: the CA that signs the
# server's certificate, and the client's own certificate and key when the server asks for one
# (Redis's default, `tls-auth-clients yes`).
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class SentinelAddress:
    """A Sentinel-managed Redis: where the Sentinels are, which master, how to log in."""

    sentinels: list[tuple[str, int]]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls: dict[str, Any] = field(default_factory=dict)  # ssl=True and TLS_FILES, for both

    def url(self) -> str:
        auth = ""
        if self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        query = []
        if self.sentinel_password:
            query.append(f"sentinel_password={quote(self.sentinel_password, safe='')}")
        if self.tls:
            query.append("ssl=1")
            query.extend(f"{key}={quote(str(self.tls[key]), safe='')}"
                         for key in TLS_FILES if self.tls.get(key))
        return (f"{SENTINEL_SCHEME}://{auth}{hosts}/{quote(self.master, safe='')}/{self.db}"
                + (f"?{'&'.join(query)}" if query else ""))


def parse_host_port(item: str, default_port: int = 26379) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets) as a pair."""
    host, _, port = item.rpartition(":")
    return host.strip("[]"), int(port or default_port)


def parse_sentinel(url: str) -> SentinelAddress | None:
    """The Sentinel address in `url`, or None for a plain redis:// or rediss:// URL."""
    if not url.startswith(f"{SENTINEL_SCHEME}://"):
        return None
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = [parse_host_port(item) for item in hostlist.split(",")]
    master, _, db = parts.path.strip("/").partition("/")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    tls: dict[str, Any] = {}
    if query.get("ssl") in ("1", "true"):
        tls = {"ssl": True, **{key: query[key] for key in TLS_FILES if query.get(key)}}
    return SentinelAddress(sentinels, unquote(master) or "mymaster", int(db or 0),
                           unquote(username) or None, unquote(password) or None,
                           query.get("sentinel_password"), tls)


def with_tls(url: str, files: dict[str, str | None]) -> str:
    """`url` with the TLS files (TLS_FILES keys -> paths) it does not name yet: in a rediss://
    URL's query (with ssl_cert_reqs=required), or a TLS Sentinel address's. A URL without TLS
    cannot take them: ValueError."""
    given = {key: path for key, path in files.items() if path}
    if not given:
        return url
    address = parse_sentinel(url)
    if address is not None:
        if not address.tls:
            raise ValueError("TLS files need redis_sentinel.tls = true")
        return replace(address, tls={**given, **address.tls}).url()
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        raise ValueError(f"TLS files need a rediss:// URL, not {parts.scheme}://")
    query = {"ssl_cert_reqs": "required", **given, **dict(parse_qsl(parts.query))}
    return urlunsplit(parts._replace(query=urlencode(query)))

class _AskSentinels(redis.sentinel.SentinelManagedConnection):
    """redis-py 8 reconnects a dropped connection from `send_packed_command` through
    `connect_check_health`, which retries the connection's old host: after a failover a worker
    tried the dead master 64 times, 5 s each. Every reconnect here asks the Sentinels first."""

    def connect_check_health(self, check_health: bool = True,
                             retry_socket_connect: bool = True) -> None:
        if retry_socket_connect:
            return self.connect()  # each try: ask the Sentinels, then connect
        return super().connect_check_health(check_health=check_health,
                                            retry_socket_connect=False)


class _AskSentinelsSSL(_AskSentinels, redis.connection.SSLConnection):
    pass


class _AsyncAskSentinels(aiosentinel.SentinelManagedConnection):
    """As _AskSentinels, on redis.asyncio."""

    async def connect_check_health(self, check_health: bool = True,
                                   retry_socket_connect: bool = True) -> None:
        if retry_socket_connect:
            await self.connect()
            return
        await super().connect_check_health(check_health=check_health, retry_socket_connect=False)


class _AsyncAskSentinelsSSL(_AsyncAskSentinels, aioredis.connection.SSLConnection):
    pass


def sync_redis(url: str, **kwargs: Any) -> redis.Redis:
    """A client of the Redis at `url`: the current master's, through the Sentinels if any."""
    address = parse_sentinel(url)
    if address is None:
        return redis.Redis.from_url(url, **kwargs)
    manager = redis.sentinel.Sentinel(
        address.sentinels, sentinel_kwargs=_sentinel_kwargs(address, kwargs), **address.tls)
    return manager.master_for(
        address.master, db=address.db, username=address.username, password=address.password,
        connection_class=_AskSentinelsSSL if address.tls else _AskSentinels, **kwargs)


def async_redis(url: str, **kwargs: Any) -> aioredis.Redis:
    """As sync_redis, on redis.asyncio."""
    address = parse_sentinel(url)
    if address is None:
        return aioredis.Redis.from_url(url, **kwargs)
    manager = aiosentinel.Sentinel(
        address.sentinels, sentinel_kwargs=_sentinel_kwargs(address, kwargs), **address.tls)
    return manager.master_for(
        address.master, db=address.db, username=address.username, password=address.password,
        connection_class=_AsyncAskSentinelsSSL if address.tls else _AsyncAskSentinels, **kwargs)


def _sentinel_kwargs(address: SentinelAddress, kwargs: dict[str, Any]) -> dict[str, Any]:
    """How to reach a Sentinel: its own password, the client's timeouts, and TLS."""
    out: dict[str, Any] = {
        k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout") if k in kwargs}
    out.setdefault("socket_connect_timeout", 2)
    out.setdefault("socket_timeout", 2)
    if address.sentinel_password:
        out["password"] = address.sentinel_password
    return {**out, **address.tls}


def celery_broker(url: str) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """Celery's broker URL for `url`, the transport options it needs (kombu's Sentinel
    transport, `sentinel://…;sentinel://…` with master_name, for a Sentinel address) and its
    `broker_use_ssl` (None without TLS; kombu reads a rediss:// URL's ssl_* query itself)."""
    address = parse_sentinel(url)
    if address is None:
        return url, {}, None
    auth = (f"{quote(address.username or '', safe='')}:{quote(address.password, safe='')}@"
            if address.password else "")
    broker = ";".join(f"sentinel://{auth}{host}:{port}/{address.db}"
                      for host, port in address.sentinels)
    sentinel_kwargs: dict[str, Any] = {**address.tls}
    if address.sentinel_password:
        sentinel_kwargs["password"] = address.sentinel_password
    options: dict[str, Any] = {"master_name": address.master, "sentinel_kwargs": sentinel_kwargs}
    use_ssl = None
    if address.tls:  # the master's connections; sentinel_kwargs has the Sentinels' own
        use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                   **{key: address.tls[key] for key in TLS_FILES if address.tls.get(key)}}
    return broker, options, use_ssl


def worker_redis(url: str, retry_s: float, name: str) -> redis.Redis:
    return sync_redis(
        url, retry=Retry(_backoff(), retries_for(retry_s)), health_check_interval=30,
        client_name=name, socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S, socket_keepalive=True,
        socket_keepalive_options=KEEPALIVE_OPTIONS, max_connections=WORKER_MAX_CONNECTIONS,
    )


def api_redis(url: str, max_connections: int, name: str = "tokenpool-api") -> aioredis.Redis:
    """Followers wait on one shared blocking XREAD (broker.events.StreamHub), but each one
    catches up on its own when it joins, all at once in a burst: the pool allows a connection
    per follower allowed plus spare ones (redis-py's default is 100)."""
    return async_redis(
        url, retry=AsyncRetry(_backoff(), API_RETRIES), health_check_interval=30,
        client_name=name, socket_connect_timeout=2, socket_timeout=SOCKET_TIMEOUT_S,
        socket_keepalive=True, socket_keepalive_options=KEEPALIVE_OPTIONS,
        max_connections=max_connections,
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def warn_if_unauthenticated(url: str) -> bool:
    """Log a warning, and say True, when `url` reaches Redis beyond this machine without a
    password: anyone on that network could read every prompt and write any job."""
    address = parse_sentinel(url)
    if address is not None:
        hosts = [host for host, _ in address.sentinels]
        password = address.password
        certificate = address.tls.get("ssl_certfile")
    else:
        parts = urlsplit(url)
        hosts, password = [parts.hostname or "localhost"], parts.password
        certificate = dict(parse_qsl(parts.query)).get("ssl_certfile")
        if parts.scheme == "unix":
            return False
    if password or certificate or all(_loopback(host) for host in hosts):
        return False
    log.warning("Redis at %s is reached over the network without a password: anyone who can "
                "reach it can read every prompt and write any job. Set a password (or an ACL "
                "user) in REDIS_URL or redis_sentinel.password, or a client certificate "
                "(redis_tls_cert_file)", ", ".join(hosts))
    return True

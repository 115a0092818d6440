"""One Redis address for every component: a plain URL or a Sentinel group (broker.connection)."""

from __future__ import annotations

import logging
import re
import ssl
from urllib.parse import parse_qsl, urlsplit

import pytest
import redis
from kombu.utils.url import parse_url

from broker.connection import celery_broker, parse_sentinel, sync_redis, warn_if_unauthenticated
from broker.settings import SentinelSpec, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("REDIS_URL", "TOKENPOOL_REDIS_URL", "TOKENPOOL_CONFIG",
                 "TOKENPOOL_REDIS_TLS_CA_FILE"):
        monkeypatch.delenv(name, raising=False)


def test_the_sentinel_group_from_the_environment_becomes_one_address(monkeypatch):
    monkeypatch.setenv("TOKENPOOL_REDIS_SENTINEL__HOSTS", '["10.9.0.2:26379", "10.9.0.3:26380"]')
    monkeypatch.setenv("TOKENPOOL_REDIS_SENTINEL__MASTER", "pool")
    monkeypatch.setenv("TOKENPOOL_REDIS_SENTINEL__PASSWORD", "p@ss:word")
    monkeypatch.setenv("TOKENPOOL_REDIS_SENTINEL__SENTINEL_PASSWORD", "s3nt")
    address = parse_sentinel(Settings().redis_address)
    assert address is not None
    assert address.sentinels == [("10.9.0.2", 26379), ("10.9.0.3", 26380)]
    assert (address.master, address.db, address.password) == ("pool", 0, "p@ss:word")
    assert address.sentinel_password == "s3nt" and address.username is None


def test_a_plain_url_stays_exactly_as_it_was(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://:pw@10.0.0.1:6380/2")
    assert Settings().redis_address == "redis://:pw@10.0.0.1:6380/2"
    assert parse_sentinel("redis://:pw@10.0.0.1:6380/2") is None
    assert celery_broker("redis://:pw@10.0.0.1:6380/2") == \
        ("redis://:pw@10.0.0.1:6380/2", {}, None)


def test_celery_gets_kombus_sentinel_transport_with_the_master_and_both_passwords():
    url = SentinelSpec(hosts=["h1:26379", "h2:26379"], master="pool", db=1, username="worker",
                       password="pw", sentinel_password="sp").url()
    broker, options, use_ssl = celery_broker(url)
    assert broker == "sentinel://worker:pw@h1:26379/1;sentinel://worker:pw@h2:26379/1"
    assert options == {"master_name": "pool", "sentinel_kwargs": {"password": "sp"}}
    assert use_ssl is None


@pytest.fixture
def tls_files(tmp_path):
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in paths.values():
        path.write_text("-")
    return paths


def test_a_rediss_url_carries_the_tls_files_to_every_client_and_to_celery(monkeypatch,
                                                                            tls_files):
    monkeypatch.setenv("REDIS_URL", "rediss://:pw@10.0.0.1:6380/0")
    monkeypatch.setenv("TOKENPOOL_REDIS_TLS_CA_FILE", str(tls_files["ca"]))
    monkeypatch.setenv("TOKENPOOL_REDIS_TLS_CERT_FILE", str(tls_files["cert"]))
    monkeypatch.setenv("TOKENPOOL_REDIS_TLS_KEY_FILE", str(tls_files["key"]))
    address = Settings().redis_address
    query = dict(parse_qsl(urlsplit(address).query))
    assert query == {"ssl_cert_reqs": "required", "ssl_ca_certs": str(tls_files["ca"]),
                     "ssl_certfile": str(tls_files["cert"]),
                     "ssl_keyfile": str(tls_files["key"])}
    monkeypatch.setenv("REDIS_URL", address)  # a child of `up` gets it once, unchanged
    assert Settings().redis_address == address
    # kombu reads the ssl_* query of a rediss:// URL itself
    assert parse_url(celery_broker(address)[0])["ssl"]["ssl_ca_certs"] == str(tls_files["ca"])
    client = sync_redis(address)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"]) == (str(tls_files["ca"]),
                                                                 "required")
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert warn_if_unauthenticated("rediss://10.0.0.1:6380/0?ssl_certfile=/c.pem") is False


def test_a_tls_sentinel_group_gives_ssl_to_the_sentinels_and_to_the_masters_connections(
        monkeypatch, tls_files):
    monkeypatch.setenv("TOKENPOOL_REDIS_SENTINEL__HOSTS", '["h1:26379"]')
    monkeypatch.setenv("TOKENPOOL_REDIS_SENTINEL__TLS", "true")
    monkeypatch.setenv("TOKENPOOL_REDIS_TLS_CA_FILE", str(tls_files["ca"]))
    address = Settings().redis_address
    assert parse_sentinel(address).tls == {"ssl": True, "ssl_ca_certs": str(tls_files["ca"])}
    _, options, use_ssl = celery_broker(address)
    assert options["sentinel_kwargs"] == {"ssl": True, "ssl_ca_certs": str(tls_files["ca"])}
    assert use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tls_files["ca"])}


@pytest.mark.parametrize(("env", "field"), [
    ({"REDIS_URL": "redis://10.0.0.1:6379/0"}, "rediss://"),  # TLS files, no TLS
    ({"TOKENPOOL_REDIS_SENTINEL__HOSTS": '["h1:26379"]'}, "redis_sentinel.tls"),
    ({"REDIS_URL": "rediss://h/0", "TOKENPOOL_REDIS_TLS_CERT_FILE": "{cert}"},
     "redis_tls_key_file"),
    ({"REDIS_URL": "rediss://h/0", "TOKENPOOL_REDIS_TLS_CA_FILE": "/no/such/ca.pem"},
     "redis_tls_ca_file: no such file"),
])
def test_tls_settings_that_cannot_work_name_the_field(monkeypatch, tls_files, env, field):
    monkeypatch.setenv("TOKENPOOL_REDIS_TLS_CA_FILE", str(tls_files["ca"]))
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(cert=tls_files["cert"]))
    with pytest.raises(ValueError, match=re.escape(field)):
        Settings()


def test_a_sentinel_host_that_is_not_host_port_names_the_field():
    with pytest.raises(ValueError, match="hosts"):
        SentinelSpec(hosts=["just-a-name"])


@pytest.mark.parametrize(("url", "warned"), [
    ("redis://10.1.2.3:6379/0", True),
    ("redis://redis:6379/0", True),  # a compose service: still a network
    ("redis://:secret@10.1.2.3:6379/0", False),
    ("redis://127.0.0.1:6379/0", False),
    ("redis://localhost:6379/0", False),
    ("redis+sentinel://10.1.2.3:26379/pool/0", True),
    ("redis+sentinel://:pw@10.1.2.3:26379/pool/0", False),
])
def test_redis_over_a_network_without_a_password_is_warned_about(url, warned, caplog):
    with caplog.at_level(logging.WARNING, logger="tokenpool.redis"):
        assert warn_if_unauthenticated(url) is warned
    assert ("without a password" in caplog.text) is warned

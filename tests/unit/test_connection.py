"""One Redis address for every component: a plain URL or a Sentinel group (broker.connection)."""

from __future__ import annotations

import logging

import pytest

from broker.connection import celery_broker, parse_sentinel, warn_if_unauthenticated
from broker.settings import SentinelSpec, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("REDIS_URL", "TOKENPOOL_REDIS_URL", "TOKENPOOL_CONFIG"):
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
    assert celery_broker("redis://:pw@10.0.0.1:6380/2") == ("redis://:pw@10.0.0.1:6380/2", {})


def test_celery_gets_kombus_sentinel_transport_with_the_master_and_both_passwords():
    url = SentinelSpec(hosts=["h1:26379", "h2:26379"], master="pool", db=1, username="worker",
                       password="pw", sentinel_password="sp").url()
    broker, options = celery_broker(url)
    assert broker == "sentinel://worker:pw@h1:26379/1;sentinel://worker:pw@h2:26379/1"
    assert options == {"master_name": "pool", "sentinel_kwargs": {"password": "sp"}}


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

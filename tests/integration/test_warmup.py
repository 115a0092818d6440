"""The API opens its Redis and Celery connections right after start, not in the first burst."""

from __future__ import annotations

import logging
import time

import redis
from starlette.testclient import TestClient

from api.app import create_app, warm_burst
from broker.redis_server import EmbeddedRedis, free_port
from broker.settings import Settings


def test_the_api_opens_a_bursts_connections_before_any_request(tmp_path):
    server = EmbeddedRedis(tmp_path, appendonly=False).start()
    try:
        settings = Settings(key_prefix="tpwarm")
        burst = warm_burst(settings)
        app = create_app(settings, server.url)
        probe = redis.Redis.from_url(server.url)  # one connection of the test's, left out
        own = probe.client_id()
        with TestClient(app):
            producers = min(burst, app.state.celery.conf.broker_pool_limit)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                listed = [c for c in probe.client_list() if int(c["id"]) != own]
                api = [c for c in listed if c["name"] == "tokenpool-api"]
                unnamed = [c for c in listed if not c["name"]]  # Celery's producers
                if len(api) >= burst and len(unnamed) >= producers:
                    break
                time.sleep(0.05)
            assert len(api) >= burst
            assert len(unnamed) >= producers
        probe.close()
    finally:
        server.stop()


def test_with_redis_away_the_api_starts_at_once_and_says_it_skipped_warming(caplog):
    caplog.set_level(logging.WARNING, logger="tokenpool.api")
    started = time.monotonic()
    with TestClient(create_app(Settings(key_prefix="tpwarm"),
                               f"redis://127.0.0.1:{free_port()}")) as client:
        assert client.get("/health").status_code == 200
        assert time.monotonic() - started < 3
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "warm-up skipped" not in caplog.text:
            time.sleep(0.1)
    assert "warm-up skipped" in caplog.text

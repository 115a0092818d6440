"""The API opens its Redis and Celery connections right after start, not in the first burst."""

from __future__ import annotations

import logging
import time

import redis
from starlette.testclient import TestClient

from api.app import WARM_MAX, create_app
from broker.redis_server import EmbeddedRedis, free_port
from broker.settings import Settings


def clients(server: EmbeddedRedis) -> list[dict]:
    return redis.Redis.from_url(server.url).client_list()


def test_the_api_opens_a_bursts_connections_before_any_request(tmp_path):
    server = EmbeddedRedis(tmp_path, appendonly=False).start()
    try:
        settings = Settings(key_prefix="tpwarm")
        burst = min(WARM_MAX, max(spec.max_batch for spec in settings.models.values()))
        app = create_app(settings, server.url)
        with TestClient(app):
            producers = min(burst, app.state.celery.conf.broker_pool_limit)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                listed = clients(server)
                api = [c for c in listed if c["name"] == "tokenpool-api"]
                unnamed = [c for c in listed if not c["name"]]  # Celery's, and ours here
                if len(api) >= burst and len(unnamed) >= producers + 1:
                    break
                time.sleep(0.05)
            assert len(api) >= burst
            assert len(unnamed) >= producers + 1
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

"""Scoped keys, as pure logic: what each scope implies, the legacy rule, and a route table
with no route left out."""

from __future__ import annotations

import pytest

from api.app import create_app
from api.auth import OPEN_PATHS, ROUTE_SCOPES
from broker.apikeys import LEGACY_SCOPES, ApiKey, _decode, checked_scopes
from broker.settings import Settings


def key(*scopes: str) -> ApiKey:
    return ApiKey(id="k", name="k", created_at=0.0, scopes=scopes)


def test_every_route_of_the_app_names_the_scopes_it_needs_and_none_is_stale() -> None:
    app = create_app(Settings(key_prefix="x"), "redis://unused")
    routes = {(method, route.path) for route in app.routes
              for method in set(route.methods or ()) - {"HEAD"}
              if route.path not in OPEN_PATHS}
    assert routes == set(ROUTE_SCOPES)


def test_admin_implies_every_scope_fleet_read_implies_metrics_and_jobs_only_jobs() -> None:
    assert all(key("admin").allows(s) for s in ("jobs", "fleet:read", "metrics", "admin"))
    fleet = key("fleet:read")
    assert fleet.allows("metrics") and not fleet.allows("jobs") and not fleet.allows("admin")
    assert key("jobs").allows("jobs") and not key("jobs").allows("metrics")
    scrape = key("metrics")
    assert scrape.allows("metrics") and not scrape.allows("fleet:read")


def test_a_key_stored_before_scopes_keeps_what_it_could_do() -> None:
    old = {b"id": b"k", b"name": b"old", b"created_at": b"1.0", b"digest": b"d"}
    decoded = _decode(old)
    assert decoded is not None and decoded[0].scopes == LEGACY_SCOPES
    assert decoded[0].allows("admin") and decoded[0].allows("jobs")
    new = _decode({**old, b"scopes": b'["metrics"]'})
    assert new is not None and new[0].scopes == ("metrics",)


def test_unknown_or_no_scopes_are_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="root; known: jobs, fleet:read, metrics, admin"):
        checked_scopes(["jobs", "root"])
    with pytest.raises(ValueError, match="none given"):
        checked_scopes([])
    assert checked_scopes(["jobs", "jobs", "admin"]) == ("jobs", "admin")

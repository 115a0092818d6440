"""The docs' reference pages are generated from the code: a page that differs from what the
code generates now is stale (run `make reference`)."""

from __future__ import annotations

import pytest

from cli.reference import OUT, PAGES


@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_generated_reference_page_is_current(name: str) -> None:
    on_disk = (OUT / name).read_text()
    assert on_disk == PAGES[name](), f"docs/reference/{name} is stale: run `make reference`"


def test_the_references_name_what_they_are_generated_from() -> None:
    settings, http, metrics = (PAGES[n]() for n in ("configuration.md", "http.md", "metrics.md"))
    assert "`responses_ttl_s` (`TOKENPOOL_RESPONSES_TTL_S`)" in settings
    assert "`models.NAME.n_ctx`" in settings and "| `chat` | llm |" in settings
    assert "| POST | `/v1/responses` |" in http and "## ResponseRequest" in http
    assert "`tokenpool_queue_depth`" in metrics and "`tokenpool_jobs_total` | counter" in metrics

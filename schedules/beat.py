"""The beat schedule built from settings: what Celery beat fires, and when."""

from __future__ import annotations

from typing import Any

from broker.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery's `beat_schedule` for these settings; empty until schedules are configured."""
    return {}

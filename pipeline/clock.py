"""The one clock: timezone-aware now in UTC, in a module light enough for a scheduler's start."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utcnow"]


def utcnow() -> datetime:
    """Timezone-aware now in UTC (freezegun-controllable)."""
    return datetime.now(UTC)

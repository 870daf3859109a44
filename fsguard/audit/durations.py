"""Times on the command line: ``24h``, ``7d``, ``90d`` (ago), or ISO 8601 dates and times.

Times without an offset are UTC, like everything ``fsguard audit`` prints.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``24h``, ``7d``, ``2w``; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30m, 24h, 7d or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def parse_time(text: str, now: datetime) -> datetime:
    """A duration before ``now``, or an ISO 8601 date/time (UTC unless it has an offset)."""
    if _DURATION.match(text):
        return now - parse_duration(text)
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (24h, 7d) nor an ISO date (2024-05-01, 2024-05-01T10:00)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


__all__ = ["parse_duration", "parse_time"]

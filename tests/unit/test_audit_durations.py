from datetime import UTC, datetime, timedelta, timezone

import pytest

from fsguard.audit.durations import parse_duration, parse_time

NOW = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("text, expected", [
    ("30s", timedelta(seconds=30)),
    ("15m", timedelta(minutes=15)),
    ("24h", timedelta(hours=24)),
    ("7d", timedelta(days=7)),
    ("90d", timedelta(days=90)),
    ("2w", timedelta(weeks=2)),
    (" 1 d ", timedelta(days=1)),
    ("0h", timedelta(0)),
])
def test_durations(text, expected):
    assert parse_duration(text) == expected
    assert parse_time(text, NOW) == NOW - expected


@pytest.mark.parametrize("text, expected", [
    ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
    ("2024-05-01T10:30", datetime(2024, 5, 1, 10, 30, tzinfo=UTC)),
    ("2024-05-01 10:30:15", datetime(2024, 5, 1, 10, 30, 15, tzinfo=UTC)),
    ("2024-05-01T10:30:00Z", datetime(2024, 5, 1, 10, 30, tzinfo=UTC)),
    ("2024-05-01T12:30:00+02:00", datetime(2024, 5, 1, 10, 30, tzinfo=UTC)),
])
def test_iso_times_are_utc_unless_they_say_otherwise(text, expected):
    value = parse_time(text, NOW)
    assert value == expected and value.tzinfo is UTC


def test_offsets_are_converted_not_dropped():
    value = parse_time("2024-05-01T00:30:00-05:00", NOW)
    assert value == datetime(2024, 5, 1, 5, 30, tzinfo=UTC)
    assert value == datetime(2024, 5, 1, 0, 30, tzinfo=timezone(timedelta(hours=-5)))


@pytest.mark.parametrize("text", ["", "24", "h", "1y", "-1d", "1.5h", "yesterday", "2024-13-01", "1d2h"])
def test_bad_values(text):
    with pytest.raises(ValueError, match="neither a duration"):
        parse_time(text, NOW)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)

"""Timestamps from outside (query strings, CLI options, forms, .NET) read the same on 3.10 to 3.13."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from durable.core._timestamps import parse_timestamp

UTC = timezone.utc


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-30T12:00:00Z", datetime(2026, 11, 30, 12, tzinfo=UTC)),
        ("2026-11-30T12:00:00.1234567Z", datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)),  # .NET
        ("2026-11-30T12:00:00.12Z", datetime(2026, 11, 30, 12, 0, 0, 120000, tzinfo=UTC)),
        ("2026-11-30T12:00:00,5+01:00", datetime(2026, 11, 30, 11, 0, 0, 500000, tzinfo=UTC)),
        ("20261130T120000Z", datetime(2026, 11, 30, 12, tzinfo=UTC)),
        ("2026-11-30T12:00", datetime(2026, 11, 30, 12, tzinfo=UTC)),  # naive: UTC
        ("2026-11-30", datetime(2026, 11, 30, tzinfo=UTC)),
        (" 2026-11-30T12:00:00-02:30 ", datetime(2026, 11, 30, 14, 30, tzinfo=UTC)),
    ],
)
def test_iso_8601_forms(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01", "2026-11-30T25:00:00Z", "12:00"])
def test_anything_else_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)

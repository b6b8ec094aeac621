"""ISO 8601 timestamps from users and other tools, read the same on every supported Python.

Python 3.10's ``datetime.fromisoformat`` reads only what ``isoformat`` writes (no ``Z``, fractions
of exactly 3 or 6 digits, extended format); 3.11 reads most of ISO 8601. Timestamps we write
ourselves are ``isoformat`` output; those that come in (query strings, CLI options, forms, .NET's
seven-digit fractions) go through ``parse_timestamp``.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

_BASIC = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})")
_FRACTION = re.compile(r"(T\d{2}:\d{2}:\d{2})[.,](\d+)")


def parse_timestamp(text: str) -> datetime:
    """An ISO 8601 date or date and time, in UTC (a naive one is taken as UTC): a trailing ``Z``,
    fractions of any length (cut to microseconds) and the basic format (``20261130T120000Z``)
    are accepted. Raises ``ValueError`` for anything else."""
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    basic = _BASIC.match(value)
    if basic is not None:
        year, month, day, hour, minute, second = basic.groups()
        value = f"{year}-{month}-{day}T{hour}:{minute}:{second}" + value[basic.end() :]
    value = _FRACTION.sub(lambda m: f"{m.group(1)}.{(m.group(2) + '00000')[:6]}", value, count=1)
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)

"""Names and keys: task hub naming rules, DTFx key escaping and OData literal escaping.

Table keys may not contain ``/ \\ # ?`` or control characters, so instance ids are escaped the way
DTFx does it (``^`` is the escape character); control characters, which ``validate_instance_id``
rejects anyway, get a reversible ``^x`` + two hex digits form so the mapping stays total. The code
is prefix-free, so ``escape(p)`` is a prefix of ``escape(s)`` exactly when ``p`` is a prefix of
``s`` — the instance-id prefix query relies on it.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from durable.core._ids import is_control

_TASK_HUB_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,44}$")

_ESCAPES = {"^": "^^", "/": "^0", "\\": "^1", "#": "^2", "?": "^3"}
_UNESCAPES = {"^": "^", "0": "/", "1": "\\", "2": "#", "3": "?"}


def validate_task_hub_name(name: str) -> None:
    if not isinstance(name, str) or not _TASK_HUB_RE.match(name):
        raise ValueError(f"invalid task hub name {name!r}: use 3 to 45 letters or digits, starting with a letter")


def escape_key(value: str) -> str:
    """DTFx table-key escaping, extended with ``^xHH`` for control characters."""
    out: list[str] = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif is_control(ch):
            out.append(f"^x{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_key(value: str) -> str:
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch != "^":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            raise ValueError(f"malformed escaped key {value!r}")
        code = value[i + 1]
        if code == "x":
            out.append(chr(int(value[i + 2 : i + 4], 16)))
            i += 4
        elif code in _UNESCAPES:
            out.append(_UNESCAPES[code])
            i += 2
        else:
            raise ValueError(f"malformed escaped key {value!r}")
    return "".join(out)


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (None: unbounded)."""
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF and not 0xD7FF <= last < 0xDFFF:
            chars[-1] = chr(last + 1)
            return "".join(chars)
        chars.pop()
    return None


# -- OData literals: every value that reaches a filter goes through one of these ---------------------
def odata_string(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    return "'" + value.replace("'", "''") + "'"


def odata_datetime(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    value = value.astimezone(timezone.utc)
    return "datetime'" + value.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z'"


def odata_int(value: int) -> str:
    return str(int(value))

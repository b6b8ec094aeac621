"""Instance ids: the one rule every layer applies (client, orchestration context, entities,
storage backends). Ids become table keys and queue routing keys, so they stay printable and bounded."""

from __future__ import annotations

import re

MAX_INSTANCE_ID_LENGTH = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: what ``is_control`` tells apart


def is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F


def validate_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if it is usable; raise ``ValueError`` saying why it is not."""
    if not isinstance(instance_id, str) or not instance_id.strip():
        raise ValueError("instance id must be a non-empty string")
    if len(instance_id) > MAX_INSTANCE_ID_LENGTH:
        raise ValueError(f"instance id is longer than {MAX_INSTANCE_ID_LENGTH} characters")
    if _CONTROL.search(instance_id):  # every message checks its id: one scan, not a call per character
        raise ValueError(f"instance id {instance_id!r} contains control characters")
    return instance_id

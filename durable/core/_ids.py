"""Instance ids: the one rule every layer applies (client, orchestration context, entities,
storage backends). Ids become table keys and queue routing keys, so they stay printable and bounded."""

from __future__ import annotations

MAX_INSTANCE_ID_LENGTH = 256


def is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F


def validate_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if it is usable; raise ``ValueError`` saying why it is not."""
    if not isinstance(instance_id, str) or not instance_id.strip():
        raise ValueError("instance id must be a non-empty string")
    if len(instance_id) > MAX_INSTANCE_ID_LENGTH:
        raise ValueError(f"instance id is longer than {MAX_INSTANCE_ID_LENGTH} characters")
    if any(is_control(ch) for ch in instance_id):
        raise ValueError(f"instance id {instance_id!r} contains control characters")
    return instance_id

"""JSON payload encoding: plain JSON values, classes with ``to_json``/``from_json``, dataclasses.

Custom objects are wrapped with their class's location (``__class__``/``__module__``), as the
official Python SDK does, so they decode back into the same type in another process.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from datetime import datetime
from typing import Any

_CLASS, _MODULE, _DATA = "__class__", "__module__", "__data__"


class PayloadError(ValueError):
    """A payload cannot be encoded to, or decoded from, JSON."""


def _default(value: Any) -> Any:
    cls = type(value)
    if hasattr(cls, "to_json") and hasattr(cls, "from_json"):
        return {_CLASS: cls.__qualname__, _MODULE: cls.__module__, _DATA: cls.to_json(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {_CLASS: cls.__qualname__, _MODULE: cls.__module__, _DATA: fields}
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"object of type {cls.__name__} is not JSON serializable")


def _object_hook(obj: dict[str, Any]) -> Any:
    if _CLASS not in obj or _MODULE not in obj or _DATA not in obj:
        return obj
    try:
        cls: Any = importlib.import_module(obj[_MODULE])
        for part in obj[_CLASS].split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError):
        return obj  # the type is not importable here: hand the raw structure to the caller
    if hasattr(cls, "from_json"):
        return cls.from_json(obj[_DATA])
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        return cls(**obj[_DATA])
    return obj


def encode(value: Any) -> str | None:
    """Encode a payload; ``None`` stays ``None`` (no payload)."""
    if value is None:
        return None
    try:
        return json.dumps(value, default=_default, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"payload is not JSON serializable: {exc}") from exc


def decode(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text, object_hook=_object_hook)
    except ValueError as exc:
        raise PayloadError(f"payload is not valid JSON: {exc}") from exc

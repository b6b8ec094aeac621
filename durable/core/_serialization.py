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


def is_rebuildable(cls: Any) -> bool:
    """A class whose instances a payload can carry: a dataclass, or one with ``to_json``/``from_json``."""
    return isinstance(cls, type) and (
        dataclasses.is_dataclass(cls) or (hasattr(cls, "to_json") and hasattr(cls, "from_json"))
    )


def as_type(value: Any, expected_type: type) -> Any:
    """A decoded payload as ``expected_type`` (the official SDK's ``expected_type``): a class
    envelope whose module could not be imported and, for a dataclass, a plain JSON object are
    rebuilt as ``expected_type``; a value of another type is a ``PayloadError``."""
    try:
        if isinstance(value, expected_type):
            return value
    except TypeError:  # a generic alias such as list[int]: not checked, as in the official SDK
        return value
    if isinstance(value, dict) and _CLASS in value and _DATA in value:
        if value[_CLASS].rpartition(".")[2] == expected_type.__name__:
            return _rebuild(expected_type, value[_DATA], from_envelope=True)
        raise PayloadError(f"payload is a {value[_CLASS]}, not a {expected_type.__name__}")
    if isinstance(value, dict) and dataclasses.is_dataclass(expected_type):
        return _rebuild(expected_type, value, from_envelope=False)
    if expected_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise PayloadError(f"payload is a {type(value).__name__}, not a {expected_type.__name__}")


def _rebuild(cls: type, data: Any, from_envelope: bool) -> Any:
    try:
        if from_envelope and hasattr(cls, "from_json"):
            return cls.from_json(data)
        if dataclasses.is_dataclass(cls) and isinstance(data, dict):
            return cls(**data)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"payload does not make a {cls.__name__}: {exc}") from exc
    raise PayloadError(f"payload cannot be rebuilt as a {cls.__name__}")


def decode_as(text: str | None, expected_type: type | None) -> Any:
    """``decode``, then ``as_type`` when a type is expected (``None`` stays ``None``)."""
    value = decode(text)
    return value if value is None or expected_type is None else as_type(value, expected_type)

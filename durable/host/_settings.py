"""App settings: what ``host.json`` and ``local.settings.json`` say, read the way the Functions
host reads them (only the parts this runtime uses)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_HUB = "DurableHub"
DEFAULT_CONNECTION_SETTING = "AzureWebJobsStorage"


class SettingsError(ValueError):
    """``host.json`` or ``local.settings.json`` is malformed."""


def parse_timespan(value: str | int | float) -> float:
    """A .NET TimeSpan (``"00:05:00"``, ``"1.02:03:04.5"``) or plain seconds, in seconds."""
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2}(?:\.\d+)?)", value.strip())
    if match is None:
        raise SettingsError(f"not a timespan (expected hh:mm:ss): {value!r}")
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"{path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class HostSettings:
    route_prefix: str = "api"
    hub_name: str = DEFAULT_HUB
    partition_count: int = 4
    connection_setting: str = DEFAULT_CONNECTION_SETTING
    queue_batch_size: int = 16
    queue_visibility_timeout: float = 0.0  # delay before a failed message is retried
    # The local host's own setting (the Functions host ignores it): how long a message stays
    # hidden while its function runs, renewed every half lease until the function returns.
    queue_message_lease: float = 20.0
    queue_max_dequeue_count: int = 5
    queue_max_polling_interval: float = 2.0
    message_encoding: str = "base64"  # the Functions queue extension's default

    @classmethod
    def load(cls, app_dir: Path | None = None) -> HostSettings:
        """Settings from ``host.json`` in ``app_dir`` (default: the Functions script root or cwd);
        ``%Name%`` values are taken from the environment, as the host does."""
        folder = app_dir or script_root()
        host = _read_json(folder / "host.json")
        extensions = host.get("extensions", {})
        http = extensions.get("http", {})
        queues = extensions.get("queues", {})
        durable = extensions.get("durableTask", {})
        provider = durable.get("storageProvider", {})
        try:
            return cls(
                route_prefix=str(http.get("routePrefix", "api")).strip("/"),
                hub_name=_expand(str(durable.get("hubName", DEFAULT_HUB))),
                partition_count=int(provider.get("partitionCount", 4)),
                connection_setting=str(provider.get("connectionStringName", DEFAULT_CONNECTION_SETTING)),
                queue_batch_size=int(queues.get("batchSize", 16)),
                queue_visibility_timeout=parse_timespan(queues.get("visibilityTimeout", 0)),
                queue_message_lease=_lease(parse_timespan(queues.get("messageLease", 20))),
                queue_max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
                queue_max_polling_interval=parse_timespan(queues.get("maxPollingInterval", 2)),
                message_encoding=str(queues.get("messageEncoding", "base64")).lower(),
            )
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"invalid setting in {folder / 'host.json'}: {exc}") from exc

    def connection_string(self) -> str:
        value = os.environ.get(self.connection_setting)
        if not value:
            raise SettingsError(
                f"the app setting {self.connection_setting} is not set: put a storage connection string "
                f"(or UseDevelopmentStorage=true) there or in local.settings.json"
            )
        return value


def _lease(seconds: float) -> float:
    if not 1 <= seconds <= 7 * 86400:
        raise ValueError(f"messageLease must be between 1 second and 7 days, got {seconds} s")
    return seconds


def _expand(value: str) -> str:
    """``%Setting%`` → the value of that app setting."""
    match = re.fullmatch(r"%([^%]+)%", value)
    if match is None:
        return value
    name = match.group(1)
    if name not in os.environ:
        raise SettingsError(f"host.json refers to the app setting {name}, which is not set")
    return os.environ[name]


def script_root() -> Path:
    return Path(os.environ.get("AzureWebJobsScriptRoot") or Path.cwd())


def load_local_settings(app_dir: Path) -> dict[str, str]:
    """The ``Values`` of ``local.settings.json`` (empty when the file does not exist)."""
    values = _read_json(app_dir / "local.settings.json").get("Values", {})
    if not isinstance(values, dict):
        raise SettingsError("local.settings.json: Values must be an object")
    return {str(k): str(v) for k, v in values.items()}

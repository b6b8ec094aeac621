"""App settings: what ``host.json`` and ``local.settings.json`` say, read the way the Functions
host reads them (only the parts this runtime uses)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core._versioning import VersioningOptions

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

DEFAULT_HUB = "DurableHub"
DEFAULT_CONNECTION_SETTING = "AzureWebJobsStorage"


class SettingsError(ValueError):
    """``host.json`` or ``local.settings.json`` is malformed."""


class UnreadableSettingsFile(SettingsError):
    """A settings file that is not one JSON object, which the Functions host refuses to start with."""


def parse_timespan(value: str | int | float) -> float:
    """A .NET TimeSpan (``"00:05:00"``, ``"1.02:03:04.5"``) or plain seconds, in seconds."""
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2}(?:\.\d+)?)", value.strip())
    if match is None:
        raise SettingsError(f"not a timespan (expected hh:mm:ss): {value!r}")
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


class _NoCaseDict(dict[str, Any]):
    """A JSON object whose keys match whatever their case, as the Functions host's configuration
    reads ``host.json`` (``routePrefix`` and ``RoutePrefix`` are one setting). Keys keep their case."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self._keys = {key.lower(): key for key in self}

    def _key(self, key: object) -> object:
        return self._keys.get(key.lower(), key) if isinstance(key, str) else key

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(self._key(key))  # type: ignore[index]

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._key(key))

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(self._key(key), default)  # type: ignore[call-overload]


# Json.NET, which reads host.json and local.settings.json for the Functions host and Core Tools,
# accepts comments and trailing commas: drop them outside strings before the strict parser runs.
_JSON_STRING = r'"(?:[^"\\\n]|\\.)*"'
_JSON_COMMENTS = re.compile(rf"({_JSON_STRING})|//[^\n]*|/\*.*?\*/", re.DOTALL)
_JSON_TRAILING_COMMAS = re.compile(rf"({_JSON_STRING})|,(\s*[}}\]])")


def parse_settings_json(text: str) -> Any:
    """JSON as lenient as the Functions host reads its settings files: comments, trailing commas,
    keys in any case."""
    text = _JSON_COMMENTS.sub(lambda found: found.group(1) or " ", text)
    text = _JSON_TRAILING_COMMAS.sub(lambda found: found.group(1) or found.group(2), text)
    try:
        return json.loads(text, object_pairs_hook=_NoCaseDict)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # Json.NET refuses this too ("Additional text encountered")
            raise ValueError(
                f"more text after the JSON object at line {exc.lineno}, column {exc.colno}: the file must "
                f"hold a single JSON object (the Functions host refuses this file too)"
            ) from exc
        raise


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = parse_settings_json(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UnreadableSettingsFile(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UnreadableSettingsFile(f"{path} must hold a JSON object")
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
    # durableTask.storageProvider.maxQueuePollingInterval: how long an idle control or work-item
    # queue goes unchecked (see durable.runtime._polling)
    max_queue_polling_interval: float = 30.0
    message_encoding: str = "base64"  # the Functions queue extension's default
    # extensions.durableTask limits; the Durable extension's default is 10 per processor.
    max_concurrent_activities: int = field(default_factory=lambda: _per_processor(10))
    max_concurrent_orchestrations: int = field(default_factory=lambda: _per_processor(10))
    # logging.logLevel: category ("default", "Function", "Function.hello", ...) -> Python level
    log_levels: Mapping[str, int] = field(default_factory=dict)
    # extensions.durableTask defaultVersion / versionMatchStrategy / versionFailureStrategy
    versioning: VersioningOptions = field(default_factory=VersioningOptions)
    # extensions.durableTask.extendedSessionsEnabled. Unlike the Durable extension (false), on
    # unless set to false: a live execution costs this runtime only its cache slot (see
    # WorkerOptions.extended_sessions).
    extended_sessions: bool = True

    @classmethod
    def load(cls, app_dir: Path | None = None) -> HostSettings:
        """Settings from ``host.json`` in ``app_dir`` (default: the Functions script root or cwd);
        ``%Name%`` values are taken from the environment, as the host does."""
        folder = app_dir or script_root()
        host = _with_overrides(_read_json(folder / "host.json"))
        extensions = host.get("extensions", {})
        http = extensions.get("http", {})
        queues = extensions.get("queues", {})
        durable = extensions.get("durableTask", {})
        provider = durable.get("storageProvider", {})
        _require_azure_storage(provider)
        try:
            return cls(
                route_prefix=str(http.get("routePrefix", "api")).strip("/"),
                hub_name=_expand(str(durable.get("hubName", DEFAULT_HUB))),
                partition_count=int(provider.get("partitionCount", 4)),
                connection_setting=_connection_setting(provider),
                queue_batch_size=int(queues.get("batchSize", 16)),
                queue_visibility_timeout=parse_timespan(queues.get("visibilityTimeout", 0)),
                queue_message_lease=_lease(parse_timespan(queues.get("messageLease", 20))),
                queue_max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
                queue_max_polling_interval=parse_timespan(queues.get("maxPollingInterval", 2)),
                max_queue_polling_interval=parse_timespan(provider.get("maxQueuePollingInterval", 30)),
                message_encoding=str(queues.get("messageEncoding", "base64")).lower(),
                max_concurrent_activities=_positive(durable, "maxConcurrentActivityFunctions"),
                max_concurrent_orchestrations=_positive(durable, "maxConcurrentOrchestratorFunctions"),
                log_levels=_log_levels(host.get("logging", {})),
                extended_sessions=_flag(durable, "extendedSessionsEnabled", True),
                versioning=VersioningOptions.from_settings(
                    durable.get("defaultVersion"),
                    durable.get("versionMatchStrategy"),
                    durable.get("versionFailureStrategy"),
                ),
            )
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"invalid setting in {folder / 'host.json'}: {exc}") from exc

    def connection_string(self) -> str:
        value = os.environ.get(self.connection_setting)
        if value:
            return value
        identity = resolve_identity_connection(self.connection_setting)  # refuses an incomplete one
        if identity is not None:
            raise SettingsError(
                f"{self.connection_setting} is an identity-based connection (to {identity.queue_uri}), "
                f"which this runtime's storage backend cannot use yet: set {self.connection_setting} to a "
                f"connection string"
            )
        raise SettingsError(
            f"the app setting {self.connection_setting} is not set: put a storage connection string "
            f"(or UseDevelopmentStorage=true) there or in local.settings.json"
        )


def _require_azure_storage(provider: Mapping[str, Any]) -> None:
    """This runtime keeps task hubs in Azure Storage only: refuse the other storage providers
    rather than silently using Azure Storage in their place."""
    kind = str(provider.get("type") or "AzureStorage")
    if kind.replace("_", "").lower() == "azurestorage":
        return
    setting = f"host.json: extensions.durableTask.storageProvider.type is {kind!r}"
    if kind.lower() == "azuremanaged":
        raise SettingsError(
            f"{setting} (the Durable Task Scheduler), which this runtime does not support: it keeps task hubs "
            f'in Azure Storage. Remove storageProvider.type (or set it to "AzureStorage") and point '
            f"storageProvider.connectionName at a storage connection string"
        )
    raise SettingsError(f"{setting}, which this runtime does not support: it keeps task hubs in Azure Storage only")


def _connection_setting(provider: Mapping[str, Any]) -> str:
    """``connectionName`` (Durable Functions 2.x), or the older ``connectionStringName``."""
    name = provider.get("connectionName") or provider.get("connectionStringName") or DEFAULT_CONNECTION_SETTING
    return str(name)


def identity_connection(name: str) -> dict[str, str] | None:
    """The settings of an identity-based connection ``name`` (``<name>__accountName``,
    ``<name>__queueServiceUri``, ``<name>__credential`` ...), as the Functions host reads them; None
    when there are none."""
    prefix = f"{name}__"
    found = {key[len(prefix) :]: value for key, value in os.environ.items() if key.startswith(prefix) and value}
    return found or None


@dataclass(frozen=True)
class IdentityConnection:
    """An identity-based storage connection: the service endpoints, and which Entra ID credential
    gets the tokens (the Functions host's rules for ``<name>__*`` settings)."""

    name: str
    blob_uri: str
    queue_uri: str
    table_uri: str
    managed_identity: bool = False  # <name>__credential = managedidentity
    client_id: str | None = None  # a user-assigned identity, or a service principal with the two below
    tenant_id: str | None = None
    client_secret: str | None = None

    def credential(self) -> AsyncTokenCredential:
        """The managed identity when asked for; a service principal when its secret is given;
        otherwise ``DefaultAzureCredential`` (locally: the developer's Azure CLI, VS Code ... sign-in)."""
        from azure.identity.aio import ClientSecretCredential, DefaultAzureCredential, ManagedIdentityCredential

        if self.managed_identity:
            return ManagedIdentityCredential(client_id=self.client_id)
        if self.tenant_id and self.client_id and self.client_secret:
            return ClientSecretCredential(self.tenant_id, self.client_id, self.client_secret)
        return DefaultAzureCredential()


def resolve_identity_connection(name: str) -> IdentityConnection | None:
    """The identity-based connection the ``<name>__*`` app settings describe (None without any):
    ``__accountName`` gives the public-cloud endpoints, ``__blobServiceUri`` / ``__queueServiceUri`` /
    ``__tableServiceUri`` (``__serviceUri`` for blobs) name them; all three services are needed."""
    found = identity_connection(name)
    if found is None:
        return None
    values = {key.lower(): value.strip() for key, value in found.items()}  # the host ignores their case
    account = values.get("accountname")
    uris = {}
    for service in ("blob", "queue", "table"):
        uri = values.get(f"{service}serviceuri") or (values.get("serviceuri") if service == "blob" else None)
        uris[service] = uri or (f"https://{account}.{service}.core.windows.net" if account else None)
    missing = [service for service, uri in uris.items() if not uri]
    if missing:
        raise SettingsError(
            f"the identity-based connection {name} has no {missing[0]} endpoint: set {name}__accountName, "
            f"or {name}__{missing[0]}ServiceUri (the task hub uses blobs, queues and tables)"
        )
    kind = values.get("credential")
    if kind is not None and kind.lower() != "managedidentity":
        raise SettingsError(f"{name}__credential must be managedidentity (or left out), got {kind!r}")
    return IdentityConnection(
        name,
        blob_uri=str(uris["blob"]),
        queue_uri=str(uris["queue"]),
        table_uri=str(uris["table"]),
        managed_identity=kind is not None,
        client_id=values.get("clientid"),
        tenant_id=values.get("tenantid"),
        client_secret=values.get("clientsecret"),
    )


def _per_processor(count: int) -> int:
    return count * (os.cpu_count() or 1)


def _positive(section: Mapping[str, Any], name: str) -> int:
    if name not in section:
        return _per_processor(10)
    value = section[name]
    if isinstance(value, str) and value.strip().isdigit():  # the host's configuration binds "8" as 8
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"extensions.durableTask.{name} must be a whole number of at least 1, got {value!r}")
    return value


def _flag(section: Mapping[str, Any], name: str, default: bool) -> bool:
    value = section.get(name, default)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # bound as the host binds it
        value = value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"extensions.durableTask.{name} must be true or false, got {value!r}")
    return value


# host.json log levels (Microsoft.Extensions.Logging names) as Python logging levels.
_LOG_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "information": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "none": logging.CRITICAL + 10,  # above every record
}


def _log_levels(section: Any) -> dict[str, int]:
    levels = section.get("logLevel", {}) if isinstance(section, dict) else None
    if not isinstance(levels, dict):
        raise ValueError("logging.logLevel must be an object of category: level")
    result = {}
    for category, level in levels.items():
        if str(level).lower() not in _LOG_LEVELS:
            known = ", ".join(name.capitalize() for name in _LOG_LEVELS)
            raise ValueError(f"logging.logLevel.{category}: unknown level {level!r} (one of {known})")
        result[str(category)] = _LOG_LEVELS[str(level).lower()]
    return result


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


@dataclass(frozen=True)
class LocalHostOptions:
    """The ``Host`` section of ``local.settings.json``, which ``func start`` reads."""

    http_port: int | None = None  # LocalHttpPort; --port wins
    cors_origins: tuple[str, ...] = ()  # CORS: comma-separated origins, or "*"
    cors_credentials: bool = False  # CORSCredentials

    def allows_origin(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin.rstrip("/").lower() in self.cors_origins


def load_local_host_options(app_dir: Path) -> LocalHostOptions:
    path = app_dir / "local.settings.json"
    section = _read_json(path).get("Host", {})
    if not isinstance(section, dict):
        raise SettingsError(f"{path}: Host must be an object")
    unknown = {key for key in section if key.lower() not in ("localhttpport", "cors", "corscredentials")}
    if unknown:
        raise SettingsError(
            f"{path}: Host.{sorted(unknown)[0]} is not supported (durable start reads LocalHttpPort, CORS and "
            f"CORSCredentials)"
        )
    port = section.get("LocalHttpPort")
    if isinstance(port, str) and port.strip().isdigit():  # Core Tools binds "7072" as 7072
        port = int(port)
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise SettingsError(f"{path}: Host.LocalHttpPort must be a port number (1-65535), got {port!r}")
    cors = section.get("CORS", "")
    if not isinstance(cors, str):
        raise SettingsError(f"{path}: Host.CORS must be a string of comma-separated origins, got {cors!r}")
    origins = tuple(o.strip().rstrip("/").lower() for o in cors.split(",") if o.strip())
    credentials = section.get("CORSCredentials", False)
    if not isinstance(credentials, bool):
        raise SettingsError(f"{path}: Host.CORSCredentials must be true or false, got {credentials!r}")
    if credentials and "*" in origins:
        raise SettingsError(f"{path}: Host.CORSCredentials cannot be true when Host.CORS allows every origin (*)")
    return LocalHostOptions(port, origins, credentials)


HOST_OVERRIDE_PREFIX = "AzureFunctionsJobHost__"


def _with_overrides(host: dict[str, Any]) -> dict[str, Any]:
    """``host.json`` with the app settings that override its values applied, as the Functions host
    applies them: ``AzureFunctionsJobHost__extensions__durableTask__hubName`` sets
    ``extensions.durableTask.hubName`` (keys matched without regard to case)."""
    for name, value in os.environ.items():
        if not name.lower().startswith(HOST_OVERRIDE_PREFIX.lower()):
            continue
        *path, leaf = name[len(HOST_OVERRIDE_PREFIX) :].split("__")
        section = host
        for key in path:
            found = next((k for k in section if k.lower() == key.lower()), key)
            child = section.setdefault(found, {})
            if not isinstance(child, dict):
                raise SettingsError(f"app setting {name}: host.json's {found} is not an object")
            section = child
        section[next((k for k in section if k.lower() == leaf.lower()), leaf)] = value
    return host

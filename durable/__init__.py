"""Durable Functions for Python on Azure Storage.

The public API mirrors the official ``azure-functions-durable`` SDK, so an app ports by changing
its import to ``import durable as df``.
"""

from .core._context import CriticalSection, DurableOrchestrationContext, FunctionContext
from .core._entities import DurableEntityContext, EntityId
from .core._errors import (
    DurableError,
    FunctionNotFound,
    NonDeterminismError,
    OrchestrationApiMisuse,
    TaskFailedError,
)
from .core._history import EventType, FailureDetails, HistoryEvent
from .core._http import DurableHttpRequest, DurableHttpResponse, ManagedIdentityTokenSource, TokenSource
from .core._retry import RetryOptions
from .core._status import OrchestrationRuntimeStatus
from .core._task import TaskBase, TimerTask
from .core._versioning import (
    VersionFailureStrategy,
    VersioningOptions,
    VersionMatchStrategy,
    VersionMismatchError,
)
from .host._app import Blueprint, http_starter
from .host._connect import connect
from .host._functions import DFApp
from .runtime._client import (
    DurableOrchestrationClient,
    DurableOrchestrationStatus,
    EntityStateResponse,
    EntityStatus,
    OrchestrationAlreadyExistsError,
    PurgeHistoryResult,
    PurgeRefused,
)
from .runtime._replayer import Replayer, ReplayHistory, ReplayResult
from .runtime._runtime import DurableRuntime
from .runtime._worker import Worker, WorkerOptions

__all__ = [
    "Blueprint",
    "CriticalSection",
    "DFApp",
    "DurableEntityContext",
    "DurableError",
    "DurableHttpRequest",
    "DurableHttpResponse",
    "DurableOrchestrationClient",
    "DurableOrchestrationContext",
    "DurableOrchestrationStatus",
    "DurableRuntime",
    "EntityId",
    "EntityStateResponse",
    "EntityStatus",
    "EventType",
    "FailureDetails",
    "FunctionContext",
    "FunctionNotFound",
    "HistoryEvent",
    "ManagedIdentityTokenSource",
    "NonDeterminismError",
    "OrchestrationAlreadyExistsError",
    "OrchestrationApiMisuse",
    "OrchestrationRuntimeStatus",
    "PurgeHistoryResult",
    "PurgeRefused",
    "ReplayHistory",
    "ReplayResult",
    "Replayer",
    "RetryOptions",
    "TaskBase",
    "TaskFailedError",
    "TimerTask",
    "TokenSource",
    "VersionFailureStrategy",
    "VersionMatchStrategy",
    "VersionMismatchError",
    "VersioningOptions",
    "Worker",
    "WorkerOptions",
    "connect",
    "http_starter",
]

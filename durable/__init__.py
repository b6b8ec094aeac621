"""Durable Functions for Python on Azure Storage.

The public API mirrors the official ``azure-functions-durable`` SDK, so an app ports by changing
its import to ``import durable as df``.
"""

from ._app import Blueprint, http_starter
from ._client import (
    DurableOrchestrationClient,
    DurableOrchestrationStatus,
    EntityStateResponse,
    EntityStatus,
    OrchestrationAlreadyExistsError,
    PurgeHistoryResult,
    PurgeRefused,
)
from ._connect import connect
from ._context import CriticalSection, DurableOrchestrationContext
from ._entities import DurableEntityContext, EntityId
from ._errors import (
    DurableError,
    FunctionNotFound,
    NonDeterminismError,
    OrchestrationApiMisuse,
    TaskFailedError,
)
from ._functions import DFApp
from ._history import EventType, FailureDetails, HistoryEvent
from ._replayer import Replayer, ReplayHistory, ReplayResult
from ._retry import RetryOptions
from ._runtime import DurableRuntime
from ._status import OrchestrationRuntimeStatus
from ._task import TaskBase, TimerTask
from ._worker import Worker, WorkerOptions

__all__ = [
    "Blueprint",
    "CriticalSection",
    "DFApp",
    "DurableEntityContext",
    "DurableError",
    "DurableOrchestrationClient",
    "DurableOrchestrationContext",
    "DurableOrchestrationStatus",
    "DurableRuntime",
    "EntityId",
    "EntityStateResponse",
    "EntityStatus",
    "EventType",
    "FailureDetails",
    "FunctionNotFound",
    "HistoryEvent",
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
    "Worker",
    "WorkerOptions",
    "connect",
    "http_starter",
]

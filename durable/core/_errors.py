"""Errors the programming model raises to user code."""

from __future__ import annotations

from ._history import FailureDetails


class DurableError(Exception):
    """Base class of the runtime's own errors."""


class TaskFailedError(DurableError):
    """A task (activity, sub-orchestration, entity call) failed.

    Keeps the original failure's type name, message and traceback text, whatever process raised it.
    """

    def __init__(self, message: str, failure: FailureDetails) -> None:
        super().__init__(message)
        self.failure = failure

    @property
    def error_type(self) -> str:
        return self.failure.error_type

    @property
    def error_message(self) -> str:
        return self.failure.message

    @property
    def stack_trace(self) -> str | None:
        return self.failure.stack_trace


class NonDeterminismError(DurableError):
    """Replayed orchestrator code took an action that disagrees with the stored history."""


class OrchestrationApiMisuse(DurableError):
    """Orchestrator code used the context in a way the runtime cannot make durable."""


class FunctionNotFound(DurableError, ValueError):
    """No orchestrator, activity or entity is registered under the requested name."""

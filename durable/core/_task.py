"""Tasks: what orchestrator code yields. A task completes from history during replay, or from a
newly delivered event; composite tasks complete from their children."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from . import _serialization as serialization
from ._http import DurableHttpRequest, DurableHttpResponse


class _Timers(Protocol):
    """What a retrying task needs of the orchestration context: its clock and durable timers."""

    @property
    def current_utc_datetime(self) -> datetime: ...

    def create_timer(self, fire_at: datetime) -> TimerTask: ...


class _HttpCaller(_Timers, Protocol):
    def _schedule_http(self, request: DurableHttpRequest) -> AtomicTask: ...


class _CompletionListener(Protocol):
    def _on_child_completed(self, child: TaskBase) -> None: ...


class TaskState(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class TaskBase:
    def __init__(self) -> None:
        self.state = TaskState.RUNNING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._parents: list[_CompletionListener] = []

    @property
    def is_completed(self) -> bool:
        return self.state is not TaskState.RUNNING

    @property
    def is_faulted(self) -> bool:
        return self.state is TaskState.FAILED

    @property
    def result(self) -> Any:
        """The task's value once it succeeded (None until then)."""
        return self._result

    @property
    def exception(self) -> BaseException | None:
        return self._exception

    def _set_result(self, value: Any) -> None:
        if self.is_completed:
            return
        self.state, self._result = TaskState.SUCCEEDED, value
        self._notify_parents()

    def _set_exception(self, exc: BaseException) -> None:
        if self.is_completed:
            return
        self.state, self._exception = TaskState.FAILED, exc
        self._notify_parents()

    def _notify_parents(self) -> None:
        for parent in self._parents:
            parent._on_child_completed(self)


class AtomicTask(TaskBase):
    """A task backed by one recorded action (``id`` is the action's sequence number).

    With ``expected_type`` its result is rebuilt as that type (see ``serialization.as_type``); a
    result that is not one fails the task, so the orchestrator sees the error where it waits."""

    def __init__(self, task_id: int, expected_type: type | None = None) -> None:
        super().__init__()
        self.id = task_id
        self._expected_type = expected_type

    def _set_result(self, value: Any) -> None:
        if self._expected_type is not None:
            try:
                value = serialization.as_type(value, self._expected_type)
            except serialization.PayloadError as exc:
                self._set_exception(exc)
                return
        super()._set_result(value)


class TimerTask(AtomicTask):
    def __init__(self, task_id: int, fire_at: datetime) -> None:
        super().__init__(task_id)
        self.fire_at = fire_at
        self.is_cancelled = False

    def cancel(self) -> None:
        """Stop waiting for this timer; the orchestration may then complete without it."""
        if self.is_completed:
            raise ValueError("a timer that has fired cannot be cancelled")
        self.is_cancelled = True


class ExternalEventTask(TaskBase):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class CompositeTask(TaskBase):
    def __init__(self, children: Sequence[TaskBase]) -> None:
        super().__init__()
        for child in children:
            if not isinstance(child, TaskBase):
                raise TypeError(f"expected tasks, got {type(child).__name__}")
        self.children = list(children)
        for child in self.children:
            child._parents.append(self)

    def _on_child_completed(self, child: TaskBase) -> None:
        raise NotImplementedError

    def _check_initial(self) -> None:
        """Account for children that were already complete when the composite was made."""
        for child in self.children:
            if child.is_completed:
                self._on_child_completed(child)


class WhenAllTask(CompositeTask):
    """Succeeds with the list of results when every child has; fails with the first failure."""

    def __init__(self, children: Sequence[TaskBase]) -> None:
        super().__init__(children)
        self._done = 0
        if not self.children:
            self._set_result([])
        self._check_initial()

    def _on_child_completed(self, child: TaskBase) -> None:
        if child.is_faulted:
            assert child.exception is not None
            self._set_exception(child.exception)
            return
        self._done += 1
        if self._done == len(self.children):
            self._set_result([c.result for c in self.children])


class WhenAnyTask(CompositeTask):
    """Succeeds with the first child to complete (successfully or not)."""

    def __init__(self, children: Sequence[TaskBase]) -> None:
        if not children:
            raise ValueError("task_any needs at least one task")
        super().__init__(children)
        self._check_initial()

    def _on_child_completed(self, child: TaskBase) -> None:
        self._set_result(child)


class RetryableTask(TaskBase):
    """An activity or sub-orchestration that is rescheduled after failures, per ``RetryOptions``.

    Each attempt and each backoff timer is an ordinary recorded action, so retries replay exactly.
    """

    def __init__(self, context: _Timers, schedule: Any, retry_options: Any) -> None:
        super().__init__()
        self._context = context
        self._schedule = schedule  # () -> AtomicTask, records one more attempt
        self._retry_options = retry_options
        self._attempt = 0
        self._first_attempt_at = context.current_utc_datetime
        self._start_attempt()

    def _start_attempt(self) -> None:
        self._attempt += 1
        attempt = self._schedule()
        attempt._parents.append(_Continuation(self._on_attempt_completed))

    def _on_attempt_completed(self, attempt: TaskBase) -> None:
        if not attempt.is_faulted:
            self._set_result(attempt.result)
            return
        elapsed = self._context.current_utc_datetime - self._first_attempt_at
        delay = self._retry_options.delay_before_retry(self._attempt, elapsed)
        if delay is None:
            assert attempt.exception is not None
            self._set_exception(attempt.exception)
            return
        timer = self._context.create_timer(self._context.current_utc_datetime + delay)
        timer._parents.append(_Continuation(lambda _: self._start_attempt()))


class HttpTask(TaskBase):
    """``call_http``: the request, then while the answer is a 202 with a ``Location``, a durable
    timer (``Retry-After``) and a GET of that location; succeeds with the final
    ``DurableHttpResponse``, fails if a request cannot be made."""

    def __init__(self, context: _HttpCaller, request: DurableHttpRequest) -> None:
        super().__init__()
        self._context = context
        self._send(request)

    def _send(self, request: DurableHttpRequest) -> None:
        self._request = request
        self._context._schedule_http(request)._parents.append(_Continuation(self._on_answer))

    def _on_answer(self, attempt: TaskBase) -> None:
        if attempt.is_faulted:
            assert attempt.exception is not None
            self._set_exception(attempt.exception)
            return
        response = DurableHttpResponse.from_dict(attempt.result)
        follow_up = self._request.poll(response)
        if follow_up is None:
            self._set_result(response)
            return
        now = self._context.current_utc_datetime
        timer = self._context.create_timer(now + response.retry_after(now))
        timer._parents.append(_Continuation(lambda _: self._send(follow_up)))


class _Continuation:
    """Calls ``then`` with a child task once it completes: the next step of a task made of
    several actions (a retry's attempts and backoff timers, an HTTP call's polls)."""

    def __init__(self, then: Callable[[TaskBase], None]) -> None:
        self._then = then

    def _on_child_completed(self, child: TaskBase) -> None:
        self._then(child)

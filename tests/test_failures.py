"""Failures and retries: typed errors across process boundaries, retry policies on the fake clock."""

from __future__ import annotations

from datetime import timedelta

import durable as df
from durable import EventType

S = df.OrchestrationRuntimeStatus


def _register_failing_activity(app):
    @app.activity_trigger(input_name="value")
    def explode_with_value_error(value):
        raise ValueError(f"bad value: {value}")


async def test_activity_failure_caught_as_task_failed_error(app, runtime):
    _register_failing_activity(app)

    @app.orchestration_trigger(context_name="context")
    def catcher(context):
        try:
            yield context.call_activity("explode_with_value_error", 7)
        except df.TaskFailedError as exc:
            return {
                "error_type": exc.error_type,
                "message": exc.error_message,
                "str": str(exc),
                "stack": exc.stack_trace,
            }
        return "no error"

    client = runtime.client()
    iid = await client.start_new("catcher")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    out = status.output
    assert out["error_type"] == "ValueError"
    assert out["message"] == "bad value: 7"
    assert "bad value: 7" in out["str"]
    assert "explode_with_value_error" in out["stack"]
    assert "ValueError" in out["stack"]


async def test_activity_failure_uncaught_fails_instance(app, runtime):
    _register_failing_activity(app)

    @app.orchestration_trigger(context_name="context")
    def no_catch(context):
        yield context.call_activity("explode_with_value_error", "x")
        return "not reached"

    client = runtime.client()
    iid = await client.start_new("no_catch")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Failed
    assert status.failure_details is not None
    details_text = f"{status.failure_details['ErrorType']} {status.failure_details['Message']}"
    assert "ValueError" in details_text
    assert "bad value: x" in details_text
    assert "bad value: x" in str(status.output)
    history = (await runtime.backend.load_history(iid)).events
    assert history[-1].event_type is EventType.EXECUTION_COMPLETED
    assert history[-1].runtime_status == "Failed"


async def test_orchestrator_raising_fails_instance(app, runtime):
    class OrderRejected(Exception):
        pass

    @app.orchestration_trigger(context_name="context")
    def raiser(context):
        yield context.call_activity("noop")
        raise OrderRejected("order 17 rejected")

    @app.activity_trigger(input_name="x")
    def noop(x):
        return None

    client = runtime.client()
    iid = await client.start_new("raiser")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Failed
    assert status.failure_details["ErrorType"] == "OrderRejected"
    assert status.failure_details["Message"] == "order 17 rejected"
    assert "raiser" in (status.failure_details["StackTrace"] or "")
    assert "order 17 rejected" in str(status.output)


async def test_orchestrator_raising_before_first_yield(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def early(context):
        if context.get_input() == "boom":
            raise KeyError("missing")
        yield context.call_activity("noop")

    client = runtime.client()
    iid = await client.start_new("early", None, "boom")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Failed
    assert status.failure_details["ErrorType"] == "KeyError"


async def test_sub_orchestration_failure_propagates(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def parent(context):
        try:
            yield context.call_sub_orchestrator("failing_child", 3)
        except df.TaskFailedError as exc:
            return {"type": exc.error_type, "message": exc.error_message}
        return "no error"

    @app.orchestration_trigger(context_name="context")
    def failing_child(context):
        yield context.call_activity("noop")
        raise RuntimeError(f"child broke at {context.get_input()}")

    @app.activity_trigger(input_name="x")
    def noop(x):
        return None

    client = runtime.client()
    iid = await client.start_new("parent", "failing-parent")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output["type"] == "RuntimeError"
    assert "child broke at 3" in status.output["message"]
    child = await client.get_status("failing-parent:0")
    assert child.runtime_status is S.Failed


async def test_sub_orchestration_failure_uncaught_fails_parent(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def parent(context):
        yield context.call_sub_orchestrator("failing_child")
        return "not reached"

    @app.orchestration_trigger(context_name="context")
    def failing_child(context):
        raise RuntimeError("child broke")
        yield  # pragma: no cover

    client = runtime.client()
    iid = await client.start_new("parent")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Failed
    assert "child broke" in str(status.failure_details)


async def test_unregistered_activity_is_function_not_found(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def calls_missing(context):
        try:
            yield context.call_activity("does_not_exist", 1)
        except df.TaskFailedError as exc:
            return {"type": exc.error_type, "message": exc.error_message}
        return "no error"

    client = runtime.client()
    iid = await client.start_new("calls_missing")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output["type"] == "FunctionNotFound"
    assert "does_not_exist" in status.output["message"]


async def test_unregistered_sub_orchestrator_fails_parent_task(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def calls_missing(context):
        try:
            yield context.call_sub_orchestrator("no_such_child")
        except df.TaskFailedError as exc:
            return {"type": exc.error_type, "message": exc.error_message}
        return "no error"

    client = runtime.client()
    iid = await client.start_new("calls_missing")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output["type"] == "FunctionNotFound"
    assert "no_such_child" in status.output["message"]


# -- retries ---------------------------------------------------------------------------------------
def _timer_delays(history):
    """fire_at minus the time of the step that created each timer, in seconds."""
    return [(e.fire_at - e.timestamp).total_seconds() for e in history if e.event_type is EventType.TIMER_CREATED]


async def _drive(runtime, clock, seconds_per_round, rounds):
    await runtime.worker.run_until_idle()
    for _ in range(rounds):
        clock.advance(seconds_per_round)
        await runtime.worker.run_until_idle()


async def test_activity_retry_with_exponential_backoff(app, runtime, clock):
    attempts: list[str] = []

    @app.activity_trigger(input_name="value")
    def flaky(value):
        attempts.append(value)
        if len(attempts) <= 3:
            raise ConnectionError(f"transient failure {len(attempts)}")
        return f"ok after {len(attempts)}"

    options = df.RetryOptions(
        first_retry_interval_in_milliseconds=1000, max_number_of_attempts=4, backoff_coefficient=2.0
    )

    @app.orchestration_trigger(context_name="context")
    def retrying(context):
        result = yield context.call_activity_with_retry("flaky", options, "v")
        return result

    client = runtime.client()
    start = clock()
    iid = await client.start_new("retrying")
    await runtime.worker.run_until_idle()
    assert len(attempts) == 1

    clock.advance(0.5)  # before the first backoff elapses: nothing happens
    await runtime.worker.run_until_idle()
    assert len(attempts) == 1
    clock.advance(0.5)
    await runtime.worker.run_until_idle()
    assert len(attempts) == 2
    clock.advance(2)
    await runtime.worker.run_until_idle()
    assert len(attempts) == 3
    clock.advance(4)
    await runtime.worker.run_until_idle()
    assert len(attempts) == 4

    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "ok after 4"
    assert attempts == ["v", "v", "v", "v"]

    history = (await runtime.backend.load_history(iid)).events
    assert _timer_delays(history) == [1.0, 2.0, 4.0]
    timers = [e.fire_at for e in history if e.event_type is EventType.TIMER_CREATED]
    assert timers == [start + timedelta(seconds=s) for s in (1, 3, 7)]
    assert sum(1 for e in history if e.event_type is EventType.TASK_SCHEDULED) == 4
    assert sum(1 for e in history if e.event_type is EventType.TASK_FAILED) == 3


async def test_activity_retry_exhausted(app, runtime, clock):
    attempts: list[int] = []

    @app.activity_trigger(input_name="value")
    def always_fails(value):
        attempts.append(1)
        raise ValueError(f"failure #{len(attempts)}")

    options = df.RetryOptions(first_retry_interval_in_milliseconds=1000, max_number_of_attempts=3)

    @app.orchestration_trigger(context_name="context")
    def retrying(context):
        try:
            yield context.call_activity_with_retry("always_fails", options)
        except df.TaskFailedError as exc:
            return {"type": exc.error_type, "message": exc.error_message}
        return "no error"

    client = runtime.client()
    iid = await client.start_new("retrying")
    await _drive(runtime, clock, 1, 10)
    assert len(attempts) == 3
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == {"type": "ValueError", "message": "failure #3"}  # the last attempt's failure
    history = (await runtime.backend.load_history(iid)).events
    assert _timer_delays(history) == [1.0, 1.0]


async def test_activity_retry_max_retry_interval_caps_delay(app, runtime, clock):
    attempts: list[int] = []

    @app.activity_trigger(input_name="value")
    def fails_four_times(value):
        attempts.append(1)
        if len(attempts) <= 4:
            raise ValueError("not yet")
        return "finally"

    options = df.RetryOptions(
        first_retry_interval_in_milliseconds=1000,
        max_number_of_attempts=10,
        backoff_coefficient=10.0,
        max_retry_interval_in_milliseconds=3000,
    )

    @app.orchestration_trigger(context_name="context")
    def retrying(context):
        return (yield context.call_activity_with_retry("fails_four_times", options))

    client = runtime.client()
    iid = await client.start_new("retrying")
    await _drive(runtime, clock, 1, 20)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "finally"
    assert len(attempts) == 5
    history = (await runtime.backend.load_history(iid)).events
    assert _timer_delays(history) == [1.0, 3.0, 3.0, 3.0]


async def test_activity_retry_timeout_stops_retries(app, runtime, clock):
    attempts: list[int] = []

    @app.activity_trigger(input_name="value")
    def always_fails(value):
        attempts.append(1)
        raise ValueError("nope")

    options = df.RetryOptions(
        first_retry_interval_in_milliseconds=1000,
        max_number_of_attempts=10,
        retry_timeout_in_milliseconds=2000,
    )

    @app.orchestration_trigger(context_name="context")
    def retrying(context):
        yield context.call_activity_with_retry("always_fails", options)

    client = runtime.client()
    iid = await client.start_new("retrying")
    await _drive(runtime, clock, 1, 20)
    # attempts at t=0, 1 s, 2 s; at 2 s the 2 s retry timeout has passed: no further attempt
    assert len(attempts) == 3
    status = await client.get_status(iid)
    assert status.runtime_status is S.Failed
    assert "nope" in str(status.failure_details)


async def test_sub_orchestrator_with_retry(app, runtime, clock):
    runs: list[int] = []

    @app.activity_trigger(input_name="value")
    def flaky_step(value):
        runs.append(value)
        if len(runs) < 3:
            raise RuntimeError(f"child attempt {len(runs)} failed")
        return value * 10

    @app.orchestration_trigger(context_name="context")
    def child(context):
        return (yield context.call_activity("flaky_step", context.get_input()))

    options = df.RetryOptions(first_retry_interval_in_milliseconds=2000, max_number_of_attempts=5)

    @app.orchestration_trigger(context_name="context")
    def parent(context):
        value = yield context.call_sub_orchestrator_with_retry("child", options, 4)
        return value

    client = runtime.client()
    iid = await client.start_new("parent", "retry-parent")
    await _drive(runtime, clock, 2, 5)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == 40
    assert runs == [4, 4, 4]
    history = (await runtime.backend.load_history(iid)).events
    created = [e for e in history if e.event_type is EventType.SUB_ORCHESTRATION_CREATED]
    assert len(created) == 3
    assert sum(1 for e in history if e.event_type is EventType.SUB_ORCHESTRATION_FAILED) == 2
    assert _timer_delays(history) == [2.0, 2.0]


async def test_sub_orchestrator_with_retry_explicit_instance_id(app, runtime, clock):
    runs: list[int] = []

    @app.activity_trigger(input_name="value")
    def flaky_step(value):
        runs.append(value)
        if len(runs) < 2:
            raise RuntimeError("first attempt fails")
        return "ok"

    @app.orchestration_trigger(context_name="context")
    def child(context):
        return (yield context.call_activity("flaky_step", 1))

    options = df.RetryOptions(first_retry_interval_in_milliseconds=1000, max_number_of_attempts=3)

    @app.orchestration_trigger(context_name="context")
    def parent(context):
        return (yield context.call_sub_orchestrator_with_retry("child", options, None, "fixed-child"))

    client = runtime.client()
    iid = await client.start_new("parent")
    await _drive(runtime, clock, 1, 5)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == "ok"
    assert len(runs) == 2
    child_status = await client.get_status("fixed-child")
    assert child_status.runtime_status is S.Completed
    assert child_status.output == "ok"


async def test_retry_inside_task_all(app, runtime, clock):
    attempts: dict[str, int] = {}

    @app.activity_trigger(input_name="key")
    def sometimes(key):
        attempts[key] = attempts.get(key, 0) + 1
        if key == "b" and attempts[key] < 2:
            raise ValueError("b fails once")
        return key.upper()

    options = df.RetryOptions(first_retry_interval_in_milliseconds=1000, max_number_of_attempts=3)

    @app.orchestration_trigger(context_name="context")
    def fan(context):
        return (
            yield context.task_all([context.call_activity_with_retry("sometimes", options, k) for k in ("a", "b", "c")])
        )

    client = runtime.client()
    iid = await client.start_new("fan")
    await _drive(runtime, clock, 1, 3)
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed, status.output
    assert status.output == ["A", "B", "C"]
    assert attempts == {"a": 1, "b": 2, "c": 1}


# -- API misuse and payload failures ---------------------------------------------------------------
async def test_activity_returning_non_json_value_fails_task(app, runtime):
    @app.activity_trigger(input_name="x")
    def returns_object(x):
        return object()

    @app.orchestration_trigger(context_name="context")
    def orch(context):
        try:
            yield context.call_activity("returns_object")
        except df.TaskFailedError as exc:
            return exc.error_type
        return "no error"

    client = runtime.client()
    iid = await client.start_new("orch")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "PayloadError"


async def test_orchestrator_returning_non_json_value_fails(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def orch(context):
        return object()

    client = runtime.client()
    iid = await client.start_new("orch")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Failed
    assert status.failure_details["ErrorType"] == "PayloadError"


async def test_orchestrator_yielding_non_task_fails(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def orch(context):
        yield 42

    client = runtime.client()
    iid = await client.start_new("orch")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Failed
    assert status.failure_details["ErrorType"] == "OrchestrationApiMisuse"


async def test_naive_timer_datetime_is_misuse(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def orch(context):
        naive = context.current_utc_datetime.replace(tzinfo=None)
        yield context.create_timer(naive)

    client = runtime.client()
    iid = await client.start_new("orch")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Failed
    assert status.failure_details["ErrorType"] == "OrchestrationApiMisuse"


async def test_task_all_fails_with_task_failed_error(app, runtime):
    _register_failing_activity(app)

    @app.activity_trigger(input_name="x")
    def fine(x):
        return x

    @app.orchestration_trigger(context_name="context")
    def orch(context):
        try:
            yield context.task_all(
                [context.call_activity("fine", 1), context.call_activity("explode_with_value_error", 2)]
            )
        except df.TaskFailedError as exc:
            return [exc.error_type, exc.error_message]
        return "no error"

    client = runtime.client()
    iid = await client.start_new("orch")
    await runtime.worker.run_until_idle()
    assert (await client.get_status(iid)).output == ["ValueError", "bad value: 2"]


async def test_task_any_returns_faulted_task(app, runtime, clock):
    _register_failing_activity(app)

    @app.orchestration_trigger(context_name="context")
    def orch(context):
        failing = context.call_activity("explode_with_value_error", 3)
        timer = context.create_timer(context.current_utc_datetime + timedelta(hours=1))
        winner = yield context.task_any([failing, timer])
        timer.cancel()
        return {
            "is_failing": winner == failing,
            "faulted": winner.is_faulted,
            "type": type(winner.exception).__name__,
        }

    client = runtime.client()
    iid = await client.start_new("orch")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == {"is_failing": True, "faulted": True, "type": "TaskFailedError"}


async def test_terminated_sub_orchestration_fails_parent_task(app, runtime):
    @app.orchestration_trigger(context_name="context")
    def parent(context):
        try:
            yield context.call_sub_orchestrator("stuck_child", None, "stuck-child")
        except df.TaskFailedError as exc:
            return exc.error_type
        return "no error"

    @app.orchestration_trigger(context_name="context")
    def stuck_child(context):
        yield context.wait_for_external_event("never")

    client = runtime.client()
    iid = await client.start_new("parent")
    await runtime.worker.run_until_idle()
    await client.terminate("stuck-child", "killed")
    await runtime.worker.run_until_idle()
    status = await client.get_status(iid)
    assert status.runtime_status is S.Completed
    assert status.output == "Terminated"

"""The app the multi-process and crash tests run in worker subprocesses."""

from __future__ import annotations

import durable as df

app = df.DFApp()


@app.orchestration_trigger(context_name="context")
def sequence(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    """Five activities in a row: the benchmark's and the crash tests' workload."""
    value = context.get_input() or 0
    for _ in range(5):
        value = yield context.call_activity("add_one", value)
    return value


@app.orchestration_trigger(context_name="context")
def fan_out(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    count = context.get_input()
    results = yield context.task_all([context.call_activity("add_one", i) for i in range(count)])
    return sum(results)


@app.activity_trigger(input_name="value")
def add_one(value: int) -> int:
    return value + 1


@app.entity_trigger(context_name="context")
def chaos_counter(context: df.DurableEntityContext) -> None:
    """A counter for the entity crash tests: ``add`` n, ``get`` the total."""
    value = context.get_state(lambda: 0)
    if context.operation_name == "add":
        value += context.get_input()
    elif context.operation_name == "get":
        context.set_result(value)
    context.set_state(value)


@app.orchestration_trigger(context_name="context")
def signal_counter(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    """Signal ``add 1`` to a ``chaos_counter`` ``count`` times, then call ``get``."""
    spec = context.get_input()
    counter = df.EntityId("chaos_counter", spec["key"])
    for _ in range(spec["count"]):
        context.signal_entity(counter, "add", 1)
    value = yield context.call_entity(counter, "get")
    return value

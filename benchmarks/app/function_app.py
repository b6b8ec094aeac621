"""The benchmark workloads as one app, run in-process or served by ``durable start``.

- ``sequence``: five activities in a row (seq5, and the scale-out's spread-out work).
- ``fan_out``: N activities at once, then their sum (fan100).
- ``signal_counter``: N signals to a counter entity, then a call to read it (counter, and the
  scale-out's hot entity).
- ``transfer``: move money between two accounts inside a critical section (bank).
"""

from __future__ import annotations

import durable as df

app = df.DFApp()


@app.activity_trigger(input_name="value")
def add_one(value: int) -> int:
    return value + 1


@app.orchestration_trigger(context_name="context")
def sequence(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    value = context.get_input() or 0
    for _ in range(5):
        value = yield context.call_activity("add_one", value)
    return value


@app.orchestration_trigger(context_name="context")
def fan_out(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    width = context.get_input()
    results = yield context.task_all([context.call_activity("add_one", i) for i in range(width)])
    return sum(results)


@app.entity_trigger(context_name="context")
def counter(context: df.DurableEntityContext) -> None:
    value = context.get_state(lambda: 0)
    if context.operation_name == "add":
        value += context.get_input()
    elif context.operation_name == "get":
        context.set_result(value)
    context.set_state(value)


@app.orchestration_trigger(context_name="context")
def signal_counter(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    spec = context.get_input()
    entity = df.EntityId("counter", spec["key"])
    for _ in range(spec["count"]):
        context.signal_entity(entity, "add", 1)
    return (yield context.call_entity(entity, "get"))


@app.entity_trigger(context_name="context")
def account(context: df.DurableEntityContext) -> None:
    balance = context.get_state(lambda: 0)
    if context.operation_name == "deposit":
        balance += context.get_input()
    elif context.operation_name == "withdraw":
        balance -= context.get_input()
    context.set_result(balance)
    context.set_state(balance)


@app.orchestration_trigger(context_name="context")
def transfer(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    spec = context.get_input()
    source, target = df.EntityId("account", spec["from"]), df.EntityId("account", spec["to"])
    with (yield context.lock([source, target])):
        balance = yield context.call_entity(source, "get")
        if balance < spec["amount"]:
            return False
        yield context.call_entity(source, "withdraw", spec["amount"])
        yield context.call_entity(target, "deposit", spec["amount"])
    return True

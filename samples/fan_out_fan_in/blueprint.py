"""Fan-out/fan-in: run many activities in parallel, wait for all of them, then aggregate.

POST /api/orchestrators/fan_out_fan_in_orchestrator   body: 10
-> {"items": 10, "squares": [1, 4, ..., 100], "total": 385}
"""

import durable as df

bp = df.Blueprint()


@bp.orchestration_trigger(context_name="context")
def fan_out_fan_in_orchestrator(context: df.DurableOrchestrationContext):
    count = context.get_input() or 10
    work_items = yield context.call_activity("fan_out_get_work_items", count)

    # Fan out: schedule one activity per work item; they run in parallel.
    parallel_tasks = [context.call_activity("fan_out_square", item) for item in work_items]
    # Fan in: resume when every one of them has finished (results keep the scheduling order).
    squares = yield context.task_all(parallel_tasks)

    total = yield context.call_activity("fan_out_sum", squares)
    return {"items": len(work_items), "squares": squares, "total": total}


@bp.activity_trigger(input_name="count")
def fan_out_get_work_items(count: int) -> list[int]:
    return list(range(1, int(count) + 1))


@bp.activity_trigger(input_name="item")
def fan_out_square(item: int) -> int:
    return item * item


@bp.activity_trigger(input_name="values")
def fan_out_sum(values: list[int]) -> int:
    return sum(values)

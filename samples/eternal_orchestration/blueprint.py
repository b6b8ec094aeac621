"""Eternal orchestration: do some work, sleep on a durable timer, then start over with
``continue_as_new``, which restarts the instance with a fresh (so bounded) history.

The input carries the state from one run to the next. Without ``max_runs`` it runs until it is
terminated; with it, it completes after that many runs.

    POST /api/orchestrators/eternal_cleanup_orchestrator   body: {"interval_seconds": 5, "max_runs": 3}
    -> {"runs": 3, "last_result": "cleanup #3 done"}
"""

from datetime import timedelta

import durable as df

bp = df.Blueprint()


@bp.orchestration_trigger(context_name="context")
def eternal_cleanup_orchestrator(context: df.DurableOrchestrationContext):
    state = context.get_input() or {}
    run = state.get("run", 0) + 1
    max_runs = state.get("max_runs")  # None: forever
    interval = timedelta(seconds=float(state.get("interval_seconds", 60)))

    context.set_custom_status({"run": run, "stage": "cleaning"})
    result = yield context.call_activity("eternal_do_cleanup", run)
    if max_runs is not None and run >= max_runs:
        return {"runs": run, "last_result": result}

    context.set_custom_status({"run": run, "stage": "sleeping", "last_result": result})
    yield context.create_timer(context.current_utc_datetime + interval)
    context.continue_as_new({**state, "run": run})


@bp.activity_trigger(input_name="run")
def eternal_do_cleanup(run: int) -> str:
    # A real app would delete expired records, rotate logs, refresh a cache, ...
    return f"cleanup #{run} done"

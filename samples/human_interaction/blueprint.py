"""Human interaction: ask someone for an approval and wait for it, but not forever.

The orchestrator races the external event ``Approval`` against a durable timer with
``task_any``: an answer in time is processed (and the timer cancelled), silence escalates.

    POST /api/orchestrators/approval_orchestrator
         body: {"request": "Buy a new laptop", "timeout_seconds": 60}
    POST <sendEventPostUri with {eventName}=Approval>   body: {"approved": true, "approver": "Ada"}
    -> {"request": "Buy a new laptop", "outcome": "approved", "approver": "Ada", ...}
"""

from datetime import timedelta

import durable as df

bp = df.Blueprint()

DEFAULT_TIMEOUT_SECONDS = 24 * 60 * 60


@bp.orchestration_trigger(context_name="context")
def approval_orchestrator(context: df.DurableOrchestrationContext):
    details = context.get_input() or {}
    request = details.get("request", "approval request")
    timeout = timedelta(seconds=float(details.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)))

    yield context.call_activity("approval_send_request", {"instance_id": context.instance_id, "request": request})
    deadline = context.current_utc_datetime + timeout
    context.set_custom_status({"waiting_for": "Approval", "deadline": deadline.isoformat()})

    approval_task = context.wait_for_external_event("Approval")
    timeout_task = context.create_timer(deadline)
    winner = yield context.task_any([approval_task, timeout_task])

    if winner == approval_task:
        if not timeout_task.is_completed:
            timeout_task.cancel()  # no need to keep the timer: the orchestration can finish now
        answer = approval_task.result or {}
        outcome = yield context.call_activity("approval_process", {"request": request, "answer": answer})
    else:
        outcome = yield context.call_activity("approval_escalate", {"request": request})
    context.set_custom_status(None)
    return outcome


@bp.activity_trigger(input_name="details")
def approval_send_request(details: dict) -> str:
    # A real app would e-mail or message the approver a link to the instance's sendEventPostUri.
    return f"approval for '{details['request']}' requested (instance {details['instance_id']})"


@bp.activity_trigger(input_name="decision")
def approval_process(decision: dict) -> dict:
    answer = decision["answer"] if isinstance(decision["answer"], dict) else {"approved": bool(decision["answer"])}
    return {
        "request": decision["request"],
        "outcome": "approved" if answer.get("approved") else "rejected",
        "approver": answer.get("approver"),
    }


@bp.activity_trigger(input_name="details")
def approval_escalate(details: dict) -> dict:
    # A real app would notify a manager here.
    return {"request": details["request"], "outcome": "escalated", "approver": None}

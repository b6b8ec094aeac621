"""Monitor: poll an external job's status on a durable timer until it is done or the monitor expires.

Unlike a cron job, the monitor stops by itself, its interval can depend on what it observes, and
each instance watches one job. Here the "job" is simulated: it completes ``job_duration_seconds``
after the monitor started.

    POST /api/orchestrators/monitor_orchestrator
         body: {"job_id": "job-42", "polling_interval_seconds": 2, "expiry_seconds": 60,
                "job_duration_seconds": 5}
    -> {"job_id": "job-42", "job_status": "Completed", "checks": 3}
"""

import logging
from datetime import datetime, timedelta, timezone

import durable as df

bp = df.Blueprint()


@bp.orchestration_trigger(context_name="context")
def monitor_orchestrator(context: df.DurableOrchestrationContext):
    job = context.get_input() or {}
    job_id = job.get("job_id", "job-1")
    polling_interval = timedelta(seconds=float(job.get("polling_interval_seconds", 5)))
    expiry_time = context.current_utc_datetime + timedelta(seconds=float(job.get("expiry_seconds", 300)))
    # Stands in for the external system: when the simulated job will report completion.
    ready_at = context.current_utc_datetime + timedelta(seconds=float(job.get("job_duration_seconds", 10)))

    checks = 0
    while context.current_utc_datetime < expiry_time:
        job_status = yield context.call_activity(
            "monitor_get_job_status", {"job_id": job_id, "ready_at": ready_at.isoformat()}
        )
        checks += 1
        context.set_custom_status({"job_id": job_id, "job_status": job_status, "checks": checks})
        if job_status == "Completed":
            yield context.call_activity("monitor_send_alert", f"Job {job_id} completed after {checks} checks")
            return {"job_id": job_id, "job_status": "Completed", "checks": checks}
        # Sleep durably until the next check; no compute is used meanwhile.
        next_check = context.current_utc_datetime + polling_interval
        yield context.create_timer(next_check)

    return {"job_id": job_id, "job_status": "Expired", "checks": checks}


@bp.activity_trigger(input_name="job")
def monitor_get_job_status(job: dict) -> str:
    # A real monitor would call the job system's API here.
    ready = datetime.now(timezone.utc) >= datetime.fromisoformat(job["ready_at"])
    return "Completed" if ready else "Running"


@bp.activity_trigger(input_name="message")
def monitor_send_alert(message: str) -> str:
    # A real monitor would send an e-mail, SMS or chat message here.
    logging.info("ALERT: %s", message)
    return message

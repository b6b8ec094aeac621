"""Sub-orchestrations: a parent orchestration runs a child orchestration per item, in parallel.

Each device is provisioned by its own ``provision_device_orchestrator`` instance (with an id
derived from the parent's), and the parent waits for all of them with ``task_all``.

    POST /api/orchestrators/provision_devices_orchestrator   body: ["sensor-1", "sensor-2"]
    -> [{"device": "sensor-1", "key": "...", "registered": true, ...}, ...]
"""

import hashlib

import durable as df

bp = df.Blueprint()

DEFAULT_DEVICES = ["sensor-1", "sensor-2", "sensor-3"]


@bp.orchestration_trigger(context_name="context")
def provision_devices_orchestrator(context: df.DurableOrchestrationContext):
    devices = context.get_input() or DEFAULT_DEVICES
    provisioning_tasks = [
        context.call_sub_orchestrator("provision_device_orchestrator", device, f"{context.instance_id}-device-{index}")
        for index, device in enumerate(devices)
    ]
    return (yield context.task_all(provisioning_tasks))


@bp.orchestration_trigger(context_name="context")
def provision_device_orchestrator(context: df.DurableOrchestrationContext):
    device = context.get_input()
    key = yield context.call_activity("provision_create_device_key", device)
    registration = yield context.call_activity("provision_register_device", {"device": device, "key": key})
    return {**registration, "parent_instance_id": context.parent_instance_id}


@bp.activity_trigger(input_name="device")
def provision_create_device_key(device: str) -> str:
    # A real app would create the device's credentials in its identity store.
    return hashlib.sha256(device.encode()).hexdigest()[:16]


@bp.activity_trigger(input_name="registration")
def provision_register_device(registration: dict) -> dict:
    # A real app would register the device with its IoT hub.
    return {"device": registration["device"], "key": registration["key"], "registered": True}

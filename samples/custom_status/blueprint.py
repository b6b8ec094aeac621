"""Custom status: an orchestration reports which stage it is in, so clients polling its status
(``customStatus`` in the status JSON) can show progress. Between two stages it waits for an
external event ``PaymentReceived``.

    POST /api/orchestrators/order_orchestrator   body: {"item": "book", "quantity": 2}
    GET  <statusQueryGetUri>   -> "customStatus": {"stage": "awaiting_payment", ...}
    POST <sendEventPostUri with {eventName}=PaymentReceived>   body: {"amount": 30}
    -> {"order": {"item": "book", "quantity": 2}, "paid": 30, "tracking_number": "..."}
"""

import hashlib

import durable as df

bp = df.Blueprint()


@bp.orchestration_trigger(context_name="context")
def order_orchestrator(context: df.DurableOrchestrationContext):
    order = context.get_input() or {"item": "book", "quantity": 1}

    context.set_custom_status({"stage": "validating", "progress": 0})
    order = yield context.call_activity("order_validate", order)

    context.set_custom_status({"stage": "awaiting_payment", "progress": 33})
    payment = yield context.wait_for_external_event("PaymentReceived")

    context.set_custom_status({"stage": "shipping", "progress": 66})
    tracking_number = yield context.call_activity("order_ship", {"order": order, "instance_id": context.instance_id})

    context.set_custom_status({"stage": "done", "progress": 100})
    return {"order": order, "paid": (payment or {}).get("amount"), "tracking_number": tracking_number}


@bp.activity_trigger(input_name="order")
def order_validate(order: dict) -> dict:
    if not order.get("item") or int(order.get("quantity", 0)) < 1:
        raise ValueError(f"invalid order: {order!r}")
    return {"item": order["item"], "quantity": int(order["quantity"])}


@bp.activity_trigger(input_name="shipment")
def order_ship(shipment: dict) -> str:
    # A real app would book the parcel with a carrier here.
    return "TRK-" + hashlib.sha256(shipment["instance_id"].encode()).hexdigest()[:10].upper()

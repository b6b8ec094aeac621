"""The durable functions of the ported app, in a blueprint as the official SDK's samples lay them
out. Written against ``azure-functions-durable``; the import line below is the only change."""

import azure.functions as func

import durable as df  # was: import azure.durable_functions as df

bp = df.Blueprint()


@bp.route(route="orders", methods=["POST"])
@bp.durable_client_input(client_name="client")
async def place_order(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
    """POST an order ``{"id": ..., "lines": [{"sku": ..., "quantity": ..., "unit_price": ...}]}``."""
    try:
        order = req.get_json()
    except ValueError:
        return func.HttpResponse("the order must be a JSON object", status_code=400)
    if not isinstance(order, dict) or not isinstance(order.get("lines"), list):
        return func.HttpResponse('the order needs an "id" and a list of "lines"', status_code=400)
    instance_id = await client.start_new("process_order", client_input=order)
    return client.create_check_status_response(req, instance_id)


# function_name names the durable functions: callers use "process_order", "price_order" and
# "confirm_order", not the Python names.
@bp.function_name(name="process_order")
@bp.orchestration_trigger(context_name="context")
def order_workflow(context: df.DurableOrchestrationContext):
    order = context.get_input()
    total = yield context.call_activity("price_order", order["lines"])
    confirmation = yield context.call_activity("confirm_order", {"id": order["id"], "total": total})
    return {"order": order["id"], "total": total, "confirmation": confirmation}


@bp.function_name(name="price_order")
@bp.activity_trigger(input_name="lines")
def order_total(lines: list) -> float:
    return round(sum(line["quantity"] * line["unit_price"] for line in lines), 2)


@bp.function_name(name="confirm_order")
@bp.activity_trigger(input_name="priced")
def confirmation_text(priced: dict) -> str:
    return f"order {priced['id']} confirmed, {priced['total']:.2f} to pay"

"""Counter entity: a durable actor with an HTTP front end.

POST /api/counters/{key}/add   body: 5      -> signal "add" (one-way, applied exactly once, in order)
POST /api/counters/{key}/reset             -> signal "reset"
GET  /api/counters/{key}                   -> {"key": ..., "exists": true, "value": 5}
"""

import json

import azure.functions as func

import durable as df

bp = df.Blueprint()


def counter_id(key: str) -> df.EntityId | func.HttpResponse:
    """The counter with this key, or a 400 answer saying why the key cannot name one (too long,
    control characters)."""
    try:
        return df.EntityId("counter", key)
    except ValueError as error:
        return func.HttpResponse(f"invalid counter key: {error}", status_code=400)


@bp.entity_trigger(context_name="context")
def counter(context: df.DurableEntityContext) -> None:
    value = context.get_state(lambda: 0)
    operation = context.operation_name
    if operation == "add":
        value += context.get_input()
    elif operation == "reset":
        value = 0
    elif operation == "get":
        context.set_result(value)
    else:
        raise ValueError(f"counter has no operation '{operation}'")
    context.set_state(value)


@bp.route(route="counters/{key}/{operation}", methods=["POST"])
@bp.durable_client_input(client_name="client")
async def counter_signal(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
    operation = req.route_params["operation"]
    if operation not in ("add", "reset"):
        return func.HttpResponse(f"unknown operation '{operation}'", status_code=400)
    try:
        amount = req.get_json() if req.get_body() else None
    except ValueError:
        return func.HttpResponse("the body must be JSON", status_code=400)
    if operation == "add" and not isinstance(amount, int):
        return func.HttpResponse("add needs an integer body", status_code=400)
    entity = counter_id(req.route_params["key"])
    if isinstance(entity, func.HttpResponse):
        return entity
    await client.signal_entity(entity, operation, amount)
    return func.HttpResponse(status_code=202)


@bp.route(route="counters/{key}", methods=["GET"])
@bp.durable_client_input(client_name="client")
async def counter_get(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
    key = req.route_params["key"]
    entity = counter_id(key)
    if isinstance(entity, func.HttpResponse):
        return entity
    state = await client.read_entity_state(entity)
    body = {"key": key, "exists": state.entity_exists, "value": state.entity_state}
    return func.HttpResponse(json.dumps(body), mimetype="application/json")


@bp.orchestration_trigger(context_name="context")
def counter_burst(context: df.DurableOrchestrationContext):
    """Signal a counter N times, then read it: input {"key": ..., "times": N}."""
    request = context.get_input()
    counter_id = df.EntityId("counter", request["key"])
    for _ in range(request["times"]):
        context.signal_entity(counter_id, "add", 1)
    value = yield context.call_entity(counter_id, "get")
    return value

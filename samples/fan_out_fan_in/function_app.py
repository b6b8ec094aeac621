"""Fan-out/fan-in sample app: an HTTP starter plus the orchestrator and activities of
``blueprint.py``. Run it with ``durable start -d samples/fan_out_fan_in``."""

import logging

import azure.functions as func
from blueprint import bp

import durable as df

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.route(route="orchestrators/{functionName}", methods=["POST"])
@app.durable_client_input(client_name="client")
async def http_start(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
    """Start the orchestrator named in the route; the JSON body, if any, is its input."""
    function_name = req.route_params["functionName"]
    client_input = req.get_json() if req.get_body() else None
    instance_id = await client.start_new(function_name, None, client_input)
    logging.info("Started orchestration with ID = '%s'.", instance_id)
    return client.create_check_status_response(req, instance_id)


app.register_functions(bp)

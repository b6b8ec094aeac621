"""The app `make run` serves: an HTTP starter plus the samples' orchestrations.

Each folder under ``samples/`` is also a complete app of its own (``durable start -d samples/<name>``);
here all their blueprints are registered at once, so ``POST /api/orchestrators/<orchestrator>``
starts any of them.
"""

import azure.functions as func

import durable as df
from samples.bank_transfer.blueprint import bp as bank_transfer_bp
from samples.counter_entity.blueprint import bp as counter_entity_bp
from samples.custom_status.blueprint import bp as custom_status_bp
from samples.eternal_orchestration.blueprint import bp as eternal_orchestration_bp
from samples.fan_out_fan_in.blueprint import bp as fan_out_fan_in_bp
from samples.function_chaining.blueprint import bp as function_chaining_bp
from samples.human_interaction.blueprint import bp as human_interaction_bp
from samples.monitor.blueprint import bp as monitor_bp
from samples.sub_orchestrations.blueprint import bp as sub_orchestrations_bp

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
# POST /api/orchestrators/{functionName}: starts any orchestrator by name, the JSON body (if any)
# its input; 404 for an unknown orchestrator, 400 for a body that is not standard JSON.
app.register_functions(df.http_starter())


@app.orchestration_trigger(context_name="context")
def hello_sequence(context: df.DurableOrchestrationContext):  # type: ignore[no-untyped-def]
    results = []
    for city in ("Tokyo", "Seattle", "London"):
        results.append((yield context.call_activity("say_hello", city)))
    return results


@app.activity_trigger(input_name="city")
def say_hello(city: str) -> str:
    return f"Hello {city}!"


app.register_functions(function_chaining_bp)
app.register_functions(fan_out_fan_in_bp)
app.register_functions(human_interaction_bp)
app.register_functions(monitor_bp)
app.register_functions(sub_orchestrations_bp)
app.register_functions(eternal_orchestration_bp)
app.register_functions(custom_status_bp)
app.register_functions(counter_entity_bp)
app.register_functions(bank_transfer_bp)

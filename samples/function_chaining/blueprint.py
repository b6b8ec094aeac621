"""Function chaining: activities run one after another, each one's output the next one's input.

POST /api/orchestrators/chaining_orchestrator   body: "Durable Functions"
-> "HELLO, DURABLE FUNCTIONS!"
"""

import logging

import durable as df

bp = df.Blueprint()


@bp.orchestration_trigger(context_name="context")
def chaining_orchestrator(context: df.DurableOrchestrationContext):
    name = context.get_input() or "World"
    greeting = yield context.call_activity("chaining_greet", name)
    shouted = yield context.call_activity("chaining_shout", greeting)
    finished = yield context.call_activity("chaining_punctuate", shouted)
    if not context.is_replaying:
        logging.info("chaining_orchestrator %s: %s", context.instance_id, finished)
    return finished


@bp.activity_trigger(input_name="name")
def chaining_greet(name: str) -> str:
    return f"Hello, {name}"


@bp.activity_trigger(input_name="text")
def chaining_shout(text: str) -> str:
    return text.upper()


@bp.activity_trigger(input_name="text")
def chaining_punctuate(text: str) -> str:
    return f"{text}!"

"""``Blueprint``: a Functions v2 blueprint with the durable decorators (``DFApp``, the app
object, is a Blueprint the Functions adapter attaches the durable runtime to: ``_functions``).

Orchestrators, activities and entities are registered in the app's ``FunctionRegistry``; the
runtime drives them from the task hub's queues, so they need no bindings of their own. The
decorators return the user's function unchanged, which keeps it directly callable in unit tests.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import azure.functions as func

from ..core._entities import class_entity
from ..runtime._registry import ActivityFunction, FunctionRegistry

if TYPE_CHECKING:
    from ..runtime._client import DurableOrchestrationClient

F = TypeVar("F", bound=Callable[..., Any])


class Blueprint(func.Blueprint):
    """A container of functions, durable ones included, to register on a ``DFApp``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.durable_functions = FunctionRegistry()
        self._client_factory: Callable[[], DurableOrchestrationClient] | None = None
        self._prepare_task_hub: Callable[[], Awaitable[None]] | None = None

    def orchestration_trigger(self, context_name: str, orchestration: str | None = None) -> Callable[[F], F]:
        """Register a generator function ``f(context)`` as an orchestrator."""

        def decorator(function: F) -> F:
            self.durable_functions.add_orchestrator(orchestration or function.__name__, function)
            return function

        return decorator

    def activity_trigger(self, input_name: str, activity: str | None = None) -> Callable[[F], F]:
        """Register ``f(<input_name>)`` (sync or async) as an activity."""

        def decorator(function: F) -> F:
            if input_name not in inspect.signature(function).parameters:
                raise TypeError(f"activity {function.__name__} has no parameter named '{input_name}'")
            name = activity or function.__name__
            self.durable_functions.add_activity(ActivityFunction(name, function, input_name))
            return function

        return decorator

    def entity_trigger(self, context_name: str, entity_name: str | None = None) -> Callable[[F], F]:
        """Register an entity: a function ``f(context)`` handling one operation at a time, or a
        class whose public methods are the operations and whose fields are the state."""

        def decorator(function: F) -> F:
            name = entity_name or function.__name__
            if "@" in name:
                raise ValueError(f"entity names cannot contain '@': {name!r}")
            handler = class_entity(function) if isinstance(function, type) else function
            self.durable_functions.add_entity(name, handler)
            return function

        return decorator

    def durable_client_input(
        self, client_name: str, task_hub: str | None = None, connection_name: str | None = None
    ) -> Callable[[F], F]:
        """Pass a ``DurableOrchestrationClient`` to the decorated function as ``client_name``.

        The client parameter is hidden from the function's signature, since it is not a
        Functions binding: the runtime supplies it."""

        def decorator(function: F) -> F:
            signature = inspect.signature(function)
            if client_name not in signature.parameters:
                raise TypeError(f"{function.__name__} has no parameter named '{client_name}'")

            @functools.wraps(function)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                kwargs[client_name] = await self.ready_client()
                result = function(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result

            wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
                parameters=[p for n, p in signature.parameters.items() if n != client_name]
            )
            return wrapper  # type: ignore[return-value]

        return decorator

    def set_client_factory(
        self,
        factory: Callable[[], DurableOrchestrationClient],
        prepare_task_hub: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Used by the runtime hosting this app to say how clients reach its task hub (and, when
        it may not exist yet, how to create it before first use)."""
        self._client_factory = factory
        self._prepare_task_hub = prepare_task_hub

    async def prepare_task_hub(self) -> None:
        if self._prepare_task_hub is not None:
            await self._prepare_task_hub()

    async def ready_client(self) -> DurableOrchestrationClient:
        """A client, after making sure the task hub it talks to exists."""
        await self.prepare_task_hub()
        return self.client()

    def client(self) -> DurableOrchestrationClient:
        if self._client_factory is None:
            raise RuntimeError("this app is not attached to a durable runtime yet, so it has no client")
        return self._client_factory()


def http_starter(route: str = "orchestrators/{functionName}") -> Blueprint:
    """A blueprint with the HTTP starter every Durable Functions sample carries: ``POST`` to
    ``route`` starts the orchestrator named by ``{functionName}`` with the JSON body (if any) as
    its input, and answers 202 with the instance's management URLs."""
    starter = Blueprint()

    @starter.route(route=route, methods=[func.HttpMethod.POST])
    @starter.durable_client_input(client_name="client")
    async def http_start(req: func.HttpRequest, client: DurableOrchestrationClient) -> func.HttpResponse:
        try:
            client_input = req.get_json() if req.get_body() else None
        except ValueError:
            return func.HttpResponse("the request body must be JSON", status_code=400)
        try:
            instance_id = await client.start_new(req.route_params["functionName"], None, client_input)
        except ValueError as error:  # unknown orchestrator, bad input, id in use
            return func.HttpResponse(str(error), status_code=400)
        return client.create_check_status_response(req, instance_id)

    return starter

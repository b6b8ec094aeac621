"""``Blueprint``: a Functions v2 blueprint with the durable decorators (``DFApp``, the app
object, is a Blueprint the Functions adapter attaches the durable runtime to: ``_functions``).

As in the Functions programming model, each decorator returns a function builder, so the
model's other decorators stack on it (``@bp.function_name(name=...)``) and unit tests reach the
user's code through ``builder.build().get_user_function()``: an orchestrator's generator function
is its ``orchestrator_function``, an entity's is ``entity_function``, a client function's is
``client_function``, and an activity is the function itself. Calling the builder calls the
function (an orchestrator called with a context returns its generator).

Orchestrators, activities and entities are registered in the app's ``FunctionRegistry``; the
runtime drives them from the task hub's queues, so they are not functions of the Functions host:
their builders stay out of the app's indexed functions (``get_functions``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import azure.functions as func
from azure.functions.decorators.core import Binding, Trigger
from azure.functions.decorators.function_app import FunctionBuilder
from azure.functions.decorators.function_name import FunctionName

from ..core._entities import class_entity
from ..core._errors import FunctionNotFound
from ..core._serialization import as_type
from ..runtime._client import DurableOrchestrationClient
from ..runtime._registry import ActivityFunction, FunctionRegistry

DurableKind = Literal["orchestrator", "activity", "entity"]


# The triggers' binding types and parameters are the Durable extension's (function.json format);
# here they only make a durable function's builder build: the runtime, not the host, invokes it.
class OrchestrationTrigger(Trigger):
    @staticmethod
    def get_binding_name() -> str:
        return "orchestrationTrigger"

    def __init__(self, name: str, orchestration: str | None = None) -> None:
        self.orchestration = orchestration
        super().__init__(name=name)


class ActivityTrigger(Trigger):
    @staticmethod
    def get_binding_name() -> str:
        return "activityTrigger"

    def __init__(self, name: str, activity: str | None = None) -> None:
        self.activity = activity
        super().__init__(name=name)


class EntityTrigger(Trigger):
    @staticmethod
    def get_binding_name() -> str:
        return "entityTrigger"

    def __init__(self, name: str, entity_name: str | None = None) -> None:
        self.entity_name = entity_name
        super().__init__(name=name)


class OrchestratorFunction:
    """What an orchestrator's ``build().get_user_function()`` is: callable like the generator
    function (``f(context)`` returns the generator), which is also its ``orchestrator_function``."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.orchestrator_function = function
        functools.update_wrapper(self, function)

    def __call__(self, context: Any) -> Any:
        return self.orchestrator_function(context)


class EntityFunction:
    """What an entity's ``build().get_user_function()`` is: callable like the entity function (or
    class), which is also its ``entity_function``."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.entity_function = function
        functools.update_wrapper(self, function, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.entity_function(*args, **kwargs)


class DurableFunctionBuilder(FunctionBuilder):
    """The builder of an orchestrator, activity or entity. Its durable name is its function name:
    the trigger's explicit name (``orchestration=``, ``activity=``, ``entity_name=``) when given,
    else ``function_name``, else the Python name."""

    def __init__(
        self,
        kind: DurableKind,
        user_function: Callable[..., Any],
        trigger: Trigger,
        explicit_name: str | None,
        input_type: type | None,
        script_file: str,
    ) -> None:
        super().__init__(user_function, script_file)  # type: ignore[no-untyped-call]
        self.kind = kind
        # The decorator's declared input type (the official SDK's parameter): the input is decoded as it.
        self.input_type = input_type
        self.add_trigger(trigger)
        if explicit_name is not None:
            # The first function_name setting is the one that counts, so the explicit name wins
            # over a function_name stacked on the trigger (as the Durable extension has it).
            self.add_setting(FunctionName(function_name=explicit_name))

    @property
    def durable_name(self) -> str:
        return str(self._function.get_function_name())

    @property
    def code(self) -> Callable[..., Any]:
        """The user's own function (or entity class)."""
        handle = self._function.get_user_function()
        if isinstance(handle, OrchestratorFunction):
            return handle.orchestrator_function
        if isinstance(handle, EntityFunction):
            return handle.entity_function
        return handle

    def add_binding(self, binding: Binding) -> FunctionBuilder:
        if isinstance(binding, Trigger):
            return super().add_binding(binding)
        # The runtime calls a durable function with its context or input only.
        raise TypeError(
            f"{self.kind} {self.durable_name}: durable functions take no other bindings "
            f"(got a {binding.type} binding); use the storage SDKs inside the function instead"
        )

    def register(self, registry: FunctionRegistry) -> None:
        name = self.durable_name
        if self.kind == "orchestrator":
            registry.add_orchestrator(name, self.code, self.input_type)
        elif self.kind == "activity":
            input_name = self._function.get_trigger().name  # type: ignore[union-attr]
            code = self.code if self.input_type is None else _typed_input(self.code, input_name, self.input_type)
            registry.add_activity(ActivityFunction(name, code, input_name))
        else:
            if "@" in name:
                raise ValueError(f"entity names cannot contain '@': {name!r}")
            code = self.code
            registry.add_entity(name, class_entity(code) if isinstance(code, type) else code)

    def unregister(self, registry: FunctionRegistry) -> None:
        name = self.durable_name
        if self.kind == "orchestrator":
            registry.orchestrators.pop(name, None)
            registry.orchestrator_input_types.pop(name, None)
        elif self.kind == "activity":
            registry.activities.pop(name, None)
        else:
            registry.entities.pop(name.lower(), None)


def _typed_input(function: Callable[..., Any], input_name: str, input_type: type) -> Callable[..., Any]:
    """``function`` called with its input decoded as ``input_type`` (``activity_trigger(input_type=)``)."""
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def typed_async(**kwargs: Any) -> Any:
            kwargs[input_name] = as_type(kwargs[input_name], input_type)
            return await function(**kwargs)

        return typed_async

    @functools.wraps(function)
    def typed(**kwargs: Any) -> Any:
        kwargs[input_name] = as_type(kwargs[input_name], input_type)
        return function(**kwargs)

    return typed


class Blueprint(func.Blueprint):
    """A container of functions, durable ones included, to register on a ``DFApp`` or on a plain
    ``func.FunctionApp`` (``app.register_functions(bp)``): the durable runtime attaches to the app
    it is registered on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "http_auth_level" in kwargs:  # the official df.Blueprint's parameter name
            kwargs["auth_level"] = kwargs.pop("http_auth_level")
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.durable_functions = FunctionRegistry()
        self.durable_builders: list[DurableFunctionBuilder] = []
        self._client_factory: Callable[[], DurableOrchestrationClient] | None = None
        self._prepare_task_hub: Callable[[], Awaitable[None]] | None = None

    # -- function builders -------------------------------------------------------------------------
    def _configure_function_builder(self, wrap: Callable[..., Any]) -> Callable[..., Any]:
        stock = super()._configure_function_builder(wrap)

        def decorator(function: Any) -> Any:
            if isinstance(function, DurableFunctionBuilder):
                return wrap(function)  # not one of the app's host functions: keep it off their list
            return stock(function)

        return decorator

    def function_name(self, name: str, setting_extra_fields: dict[str, Any] | None = None) -> Callable[..., Any]:
        stock = super().function_name(name, setting_extra_fields)

        def decorator(function: Any) -> Any:
            if not isinstance(function, DurableFunctionBuilder):
                return stock(function)
            # The durable name follows the function name: register it again under the new one.
            function.unregister(self.durable_functions)
            result = stock(function)
            self._register(function)
            return result

        return decorator

    def _durable_decorator(
        self,
        kind: DurableKind,
        trigger: Trigger,
        explicit_name: str | None,
        input_type: type | None = None,
    ) -> Callable[[Any], DurableFunctionBuilder]:
        def decorator(function: Any) -> DurableFunctionBuilder:
            settings: list[Any] = []
            if isinstance(function, DurableFunctionBuilder):  # its code registered once more, e.g. renamed
                function = function.code
            elif isinstance(function, FunctionBuilder):  # a decorator such as function_name applied first
                if function._function.get_trigger() is not None:
                    raise TypeError(f"{function._function.get_function_name()} already has a trigger")
                if not self._function_builders or self._function_builders[-1] is not function:
                    raise TypeError("stack a durable trigger on decorators of the same app or blueprint")
                self._function_builders.pop()
                settings = list(function._function._settings)
                function = function._function.get_user_function()
            self._check_signature(kind, function, trigger)
            builder = DurableFunctionBuilder(
                kind, self._handle(kind, function), trigger, explicit_name, input_type, self.app_script_file
            )
            for setting in settings:
                builder.add_setting(setting)
            self._register(builder)
            return builder

        return decorator

    @staticmethod
    def _check_signature(kind: DurableKind, function: Any, trigger: Trigger) -> None:
        if not callable(function):
            raise TypeError(f"a durable {kind} must be a function, not {type(function).__name__}")
        if kind == "activity" and trigger.name not in inspect.signature(function).parameters:
            raise TypeError(f"activity {function.__name__} has no parameter named '{trigger.name}'")

    @staticmethod
    def _handle(kind: DurableKind, function: Callable[..., Any]) -> Callable[..., Any]:
        if kind == "orchestrator":
            return OrchestratorFunction(function)
        if kind == "entity":
            return EntityFunction(function)
        return function

    def _register(self, builder: DurableFunctionBuilder) -> None:
        builder.register(self.durable_functions)
        if builder not in self.durable_builders:
            self.durable_builders.append(builder)

    # -- the durable decorators --------------------------------------------------------------------
    def orchestration_trigger(
        self, context_name: str, orchestration: str | None = None, input_type: type | None = None
    ) -> Callable[[Any], DurableFunctionBuilder]:
        """Register a generator function ``f(context)`` as an orchestrator."""
        trigger = OrchestrationTrigger(name=context_name, orchestration=orchestration)
        return self._durable_decorator("orchestrator", trigger, orchestration, input_type)

    def activity_trigger(
        self, input_name: str, activity: str | None = None, input_type: type | None = None
    ) -> Callable[[Any], DurableFunctionBuilder]:
        """Register ``f(<input_name>)`` (sync or async) as an activity."""
        trigger = ActivityTrigger(name=input_name, activity=activity)
        return self._durable_decorator("activity", trigger, activity, input_type)

    def entity_trigger(
        self, context_name: str, entity_name: str | None = None
    ) -> Callable[[Any], DurableFunctionBuilder]:
        """Register an entity: a function ``f(context)`` handling one operation at a time, or a
        class whose public methods are the operations and whose fields are the state."""
        trigger = EntityTrigger(name=context_name, entity_name=entity_name)
        return self._durable_decorator("entity", trigger, entity_name)

    def durable_client_input(
        self, client_name: str, task_hub: str | None = None, connection_name: str | None = None
    ) -> Callable[..., Any]:
        """Pass a ``DurableOrchestrationClient`` to the decorated function as ``client_name``.

        The client parameter is hidden from the function's signature, since it is not a
        Functions binding: the runtime supplies it. The function as written stays reachable as
        ``build().get_user_function().client_function``."""

        def attach_client(builder: FunctionBuilder) -> FunctionBuilder:
            if isinstance(builder, DurableFunctionBuilder):
                raise TypeError(f"{builder.kind} {builder.durable_name} cannot take a durable client binding")
            user_function = builder._function.get_user_function()
            code = getattr(user_function, "client_function", user_function)
            signature = inspect.signature(user_function)
            if client_name not in signature.parameters:
                raise TypeError(f"{code.__name__} has no parameter named '{client_name}'")

            @functools.wraps(user_function)
            async def with_client(*args: Any, **kwargs: Any) -> Any:
                from ._client_binding import DurableClient  # imports the Functions adapter, which imports us

                kwargs[client_name] = DurableClient.of(await self.ready_client())
                result = user_function(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result

            with_client.__signature__ = signature.replace(  # type: ignore[attr-defined]
                parameters=[p for n, p in signature.parameters.items() if n != client_name]
            )
            with_client.client_function = code  # type: ignore[attr-defined]
            builder._function._func = with_client
            builder.__signature__ = with_client.__signature__  # type: ignore[attr-defined]  # calling it calls this
            return builder

        return self._configure_function_builder(attach_client)

    # -- the runtime hosting this blueprint --------------------------------------------------------
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
            raise RuntimeError(
                "this blueprint is not attached to a durable runtime yet, so it has no client: register it "
                "on the function app (app.register_functions(bp))"
            )
        return self._client_factory()


def http_starter(route: str = "orchestrators/{functionName}") -> Blueprint:
    """A blueprint with the HTTP starter every Durable Functions sample carries: ``POST`` to
    ``route`` starts the orchestrator named by ``{functionName}`` with the JSON body (if any) as
    its input, and answers 202 with the instance's management URLs."""
    starter = Blueprint()

    @starter.route(route=route, methods=[func.HttpMethod.POST])
    @starter.durable_client_input(client_name="client")
    async def http_start(req: func.HttpRequest, client: DurableOrchestrationClient) -> func.HttpResponse:
        from ._http_api import parse_json_content

        try:
            client_input = parse_json_content(req.get_body())
        except ValueError as error:
            return func.HttpResponse(f"the request body must be JSON: {error}", status_code=400)
        try:
            instance_id = await client.start_new(req.route_params["functionName"], None, client_input)
        except FunctionNotFound as error:
            return func.HttpResponse(str(error), status_code=404)
        except ValueError as error:  # bad input, id in use
            return func.HttpResponse(str(error), status_code=400)
        return client.create_check_status_response(req, instance_id)

    return starter

"""The durable functions an app registers, by kind and name: what the runtime runs.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core._errors import FunctionNotFound


@dataclass(frozen=True)
class ActivityFunction:
    name: str
    function: Callable[..., Any]
    input_name: str

    async def invoke(self, value: Any) -> Any:
        if inspect.iscoroutinefunction(self.function):
            return await self.function(**{self.input_name: value})
        # Sync activities run on a thread so a slow one does not stall the worker's event loop.
        return await asyncio.to_thread(self.function, **{self.input_name: value})


@dataclass
class FunctionRegistry:
    orchestrators: dict[str, Callable[..., Any]] = field(default_factory=dict)
    activities: dict[str, ActivityFunction] = field(default_factory=dict)
    entities: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def merge(self, other: FunctionRegistry) -> None:
        for name in other.orchestrators:
            self._check_free(name)
        for name in [*other.activities, *other.entities]:
            self._check_free(name)
        self.orchestrators.update(other.orchestrators)
        self.activities.update(other.activities)
        self.entities.update(other.entities)

    def _check_free(self, name: str) -> None:
        if name in self.orchestrators or name in self.activities or name in self.entities:
            raise ValueError(f"a durable function named '{name}' is already registered")

    def add_orchestrator(self, name: str, function: Callable[..., Any]) -> None:
        self._check_free(name)
        self.orchestrators[name] = function

    def add_activity(self, activity: ActivityFunction) -> None:
        self._check_free(activity.name)
        self.activities[activity.name] = activity

    def orchestrator(self, name: str) -> Callable[..., Any] | None:
        return self.orchestrators.get(name)

    def entity(self, name: str) -> Callable[..., Any] | None:
        return self.entities.get(name.lower())

    def add_entity(self, name: str, function: Callable[..., Any]) -> None:
        self._check_free(name.lower())
        self.entities[name.lower()] = function

    def require_orchestrator(self, name: str) -> Callable[..., Any]:
        function = self.orchestrators.get(name)
        if function is None:
            known = ", ".join(sorted(self.orchestrators)) or "none"
            raise FunctionNotFound(f"no orchestrator function named '{name}' (registered: {known})")
        return function

"""Storage backends for the durable runtime: one interface, two implementations."""

from durable.runtime._backend import (
    Backend,
    ConcurrencyConflict,
    InstanceExists,
    InstanceHistory,
    InstanceQuery,
    PoisonedMessage,
    ReceivedMessage,
    control_queue,
    partition_of,
)

from .memory import InMemoryBackend

__all__ = [
    "Backend",
    "ConcurrencyConflict",
    "InMemoryBackend",
    "InstanceExists",
    "InstanceHistory",
    "InstanceQuery",
    "PoisonedMessage",
    "ReceivedMessage",
    "control_queue",
    "partition_of",
]

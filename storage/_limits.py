"""Queue limits both backends apply the same way (the Azure Queue service's, so that the
in-memory backend behaves like it).

- A message can be hidden for at most 7 days, whether by a delayed send, a release or a receive's
  lease; both backends cap every delay at ``MAX_QUEUE_DELAY_SECONDS`` (7 days less 5 minutes of
  margin), so a durable timer due later arrives early and is put back by the worker.
- A receive's lease is at least 1 second; a receive takes 1 to 32 messages.

Azure Storage counts visibility in whole seconds: the Azure backend rounds the capped delay up
(a message never becomes visible earlier than asked); the in-memory backend keeps fractions.
"""

from __future__ import annotations

from durable.runtime._backend import MAX_QUEUE_DELAY_SECONDS

MAX_RECEIVE_COUNT = 32
MIN_LEASE_SECONDS = 1.0

__all__ = ["MAX_QUEUE_DELAY_SECONDS", "MAX_RECEIVE_COUNT", "lease_seconds", "message_delay", "receive_count"]


def message_delay(seconds: float) -> float:
    """How long a sent or released message stays invisible: ``seconds`` within [0, 7 days)."""
    return min(float(MAX_QUEUE_DELAY_SECONDS), max(0.0, seconds))


def lease_seconds(seconds: float) -> float:
    """How long a received message stays invisible: ``seconds`` within [1 s, 7 days)."""
    return min(float(MAX_QUEUE_DELAY_SECONDS), max(MIN_LEASE_SECONDS, seconds))


def receive_count(count: int) -> int:
    """How many messages one receive may take: ``count`` within [1, 32]."""
    return max(1, min(MAX_RECEIVE_COUNT, count))

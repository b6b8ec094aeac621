"""Several messages in one queue message: how both backends cut the requests per message.

A send packs the messages bound for the same queue and due now into envelopes: one queue message
(one request to send, one to receive, one to delete) for a step's whole fan-out, a batch of
activity results or a burst of signals. Work items travel at most ``WORK_ITEMS_PER_ENVELOPE`` to
an envelope, so that a large fan-out is still spread over several workers.

A receive unpacks an envelope into one delivery per message, all sharing one ``SharedReceipt``:
settling a delivery (delete, poison) settles its part, and the queue message goes with its last
part; renewing the lease of any part renews the envelope. The runtime sees single messages only.

An envelope delivered a second time (its worker died or stalled past the lease) is not processed
but split into single messages: a message that kills its worker is thereby isolated before it can
take its neighbours to the poison queue. Messages already applied from it come back as
duplicates, which the protocol drops, as it drops any redelivery.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from durable.core._messages import MessageTarget, WorkMessage
from durable.runtime._backend import ReceivedMessage, queue_for

# Characters of JSON per envelope (JSON is ASCII here: json.dumps escapes the rest). Base64 adds a
# third, which keeps an envelope under the large-message threshold (``storage.azure._large``).
ENVELOPE_CHARS = 30_000
WORK_ITEMS_PER_ENVELOPE = 32
# Parts of one envelope renewed within this many seconds of each other cost one request.
RENEWAL_COALESCE_SECONDS = 1.0

_KEY = "Messages"


@dataclass(frozen=True)
class Outgoing:
    """One queue message to send: its queue, delay and the messages it carries."""

    queue: str
    delay: float
    messages: list[WorkMessage]
    # Each message's JSON, as ``pack`` measured it, so that the body does not encode it again.
    texts: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def body(self) -> str:
        texts = self.texts if len(self.texts) == len(self.messages) else [m.to_json() for m in self.messages]
        if len(texts) == 1:
            return texts[0]  # a lone message keeps the plain format
        return f'{{"{_KEY}":[{",".join(texts)}]}}'  # what json.dumps gives, without encoding anew

    def halves(self) -> list[Outgoing]:
        """Two smaller envelopes, for one whose encoded body came out too large after all."""
        middle = len(self.messages) // 2
        texts = self.texts if len(self.texts) == len(self.messages) else []
        return [
            Outgoing(self.queue, self.delay, self.messages[:middle], texts[:middle]),
            Outgoing(self.queue, self.delay, self.messages[middle:], texts[middle:]),
        ]


def pack(messages: Sequence[WorkMessage], partition_count: int, now: datetime) -> list[Outgoing]:
    """The queue messages that carry ``messages``: those due now and bound for the same queue
    share envelopes, in their order; delayed ones (timers, retries) travel alone."""
    out: list[Outgoing] = []
    open_envelopes: dict[str, tuple[Outgoing, int]] = {}  # queue -> (envelope being filled, its size)
    for message in messages:
        queue = queue_for(message, partition_count)
        delay = (message.visible_at - now).total_seconds() if message.visible_at else 0.0
        text = message.to_json()
        if delay > 0:
            out.append(Outgoing(queue, delay, [message], [text]))
            continue
        size = len(text) + 1
        current = open_envelopes.get(queue)
        if current is not None and _fits(current[0], current[1] + size):
            current[0].messages.append(message)
            current[0].texts.append(text)
            open_envelopes[queue] = (current[0], current[1] + size)
            continue
        envelope = Outgoing(queue, 0.0, [message], [text])
        out.append(envelope)
        open_envelopes[queue] = (envelope, size)
    return out


def _fits(envelope: Outgoing, size: int) -> bool:
    if size > ENVELOPE_CHARS:
        return False
    return envelope.messages[0].target is not MessageTarget.ACTIVITY or len(envelope.messages) < WORK_ITEMS_PER_ENVELOPE


def unpack(body: str) -> list[WorkMessage]:
    """The messages a queue message body carries; ``ValueError`` when it is malformed."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"malformed work message: {exc!r}") from exc
    if isinstance(data, dict) and _KEY in data:
        parts = data[_KEY]
        if not isinstance(parts, list) or not parts:
            raise ValueError("malformed envelope: no messages")
        return [WorkMessage.from_dict(part) for part in parts]
    return [WorkMessage.from_dict(data)]


def split_on_redelivery(parts: Sequence[WorkMessage], dequeue_count: int) -> bool:
    """Whether an envelope is to be split into single messages instead of processed: it was
    delivered before (its worker died or stalled past the lease)."""
    return len(parts) > 1 and dequeue_count > 1


def deliveries(
    queue: str, parts: Sequence[WorkMessage], dequeue_count: int, receipt: object, *, held: bool = False
) -> list[ReceivedMessage]:
    """One delivery per message of a queue message; an envelope's parts share its receipt."""
    if len(parts) > 1 and receipt is not None:
        receipt = SharedReceipt(receipt, len(parts))
    return [ReceivedMessage(queue, part, dequeue_count, receipt, held) for part in parts]


@dataclass(eq=False)
class SharedReceipt:
    """The receipt the deliveries unpacked from one envelope share."""

    inner: object  # the backend's receipt of the queue message
    open_parts: int
    renewed_at: float | None = None  # monotonic time of the last renewal of the envelope
    settled: set[int] = field(default_factory=set)  # ids of parts settled, so one counts once

    def settle(self, part: object) -> bool:
        """Settle one part; True when it was the last one (the queue message may go)."""
        if id(part) in self.settled:
            return False
        self.settled.add(id(part))
        self.open_parts -= 1
        return self.open_parts == 0

    def needs_renewal(self, now: float) -> bool:
        """Whether a renewal asked at ``now`` must reach the queue (the first of a round does)."""
        if self.renewed_at is not None and now - self.renewed_at < RENEWAL_COALESCE_SECONDS:
            return False
        self.renewed_at = now
        return True

"""Outbound messages of a step, derived from the step's own history events.

Because every message is a function of one committed event, the sentinel row only has to remember
*which* events' messages are unconfirmed (DESIGN §4); after a crash they are derived again and
re-sent. Message ids are deterministic, so a re-send is recognisable as a duplicate.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable

from ._entities import is_entity_id
from ._history import EventType, FailureDetails, HistoryEvent
from ._messages import MessageTarget, WorkMessage


def child_execution_id(parent_execution_id: str, task_id: int) -> str:
    return uuid.uuid5(uuid.NAMESPACE_OID, f"{parent_execution_id}/{task_id}").hex


def outbound_messages(
    instance_id: str,
    execution_id: str,
    started: HistoryEvent,
    events: Iterable[HistoryEvent],
    rewinds: int = 0,
) -> list[WorkMessage]:
    """The messages ``events`` send. ``rewinds``: how often the execution was rewound; it makes
    the ids of re-sent work new, so that their answers are not taken for the failures that a
    rewind took out of history (whose ids stay known as applied)."""
    out: list[WorkMessage] = []
    suffix = f"~{rewinds}" if rewinds else ""
    for event in events:
        # Actions carried over a continue-as-new still speak for the execution that took them.
        sender_execution = event.execution_id or execution_id
        message_id = f"{instance_id}/{sender_execution}/{event.event_type.value}/{event.event_id}{suffix}"
        kind = event.event_type
        if kind is EventType.TASK_SCHEDULED:
            out.append(WorkMessage(MessageTarget.ACTIVITY, instance_id, event, sender_execution, id=message_id))
        elif kind is EventType.TIMER_CREATED:
            fired = HistoryEvent(EventType.TIMER_FIRED, event.timestamp, timer_id=event.event_id, fire_at=event.fire_at)
            out.append(
                WorkMessage(
                    MessageTarget.ORCHESTRATION,
                    instance_id,
                    fired,
                    execution_id,
                    visible_at=event.fire_at,
                    id=message_id,
                )
            )
        elif kind is EventType.SUB_ORCHESTRATION_CREATED:
            child_id = event.instance_id or ""
            start = HistoryEvent(
                EventType.EXECUTION_STARTED,
                event.timestamp,
                name=event.name,
                input=event.input,
                instance_id=child_id,
                execution_id=child_execution_id(sender_execution, event.event_id),
                parent_instance_id=instance_id,
                parent_execution_id=sender_execution,
                parent_task_scheduled_id=event.event_id,
                version=event.version,
            )
            out.append(WorkMessage(MessageTarget.ORCHESTRATION, child_id, start, id=message_id))
        elif kind is EventType.EVENT_SENT:
            target = event.instance_id or ""
            if is_entity_id(target):
                payload = HistoryEvent(EventType.ENTITY_MESSAGE, event.timestamp, name=event.name, input=event.input)
            else:
                payload = HistoryEvent(EventType.EVENT_RAISED, event.timestamp, name=event.name, input=event.input)
            out.append(
                WorkMessage(MessageTarget.ORCHESTRATION, target, payload, visible_at=event.fire_at, id=message_id)
            )
        elif kind is EventType.EXECUTION_COMPLETED and started.parent_instance_id:
            out.append(_reply_to_parent(started, event, message_id))
    return out


def with_trace_context(messages: Iterable[WorkMessage], trace_context: str | None) -> list[WorkMessage]:
    """``messages`` as sent from a step traced as ``trace_context`` (see ``WorkMessage``): their
    receivers' spans become its children, and a child orchestration's start records it as the
    parent of every step of that execution (``ParentTraceContext``). Ids are unchanged."""
    if trace_context is None:
        return list(messages)
    return [
        dataclasses.replace(
            message,
            trace_context=trace_context,
            event=message.event.replace(parent_trace_context=trace_context)
            if message.event.event_type is EventType.EXECUTION_STARTED and message.event.parent_trace_context is None
            else message.event,
        )
        for message in messages
    ]


def _reply_to_parent(started: HistoryEvent, completed: HistoryEvent, message_id: str) -> WorkMessage:
    succeeded = completed.runtime_status == "Completed"
    reply = HistoryEvent(
        EventType.SUB_ORCHESTRATION_COMPLETED if succeeded else EventType.SUB_ORCHESTRATION_FAILED,
        completed.timestamp,
        name=started.name,
        task_scheduled_id=started.parent_task_scheduled_id,
        result=completed.result if succeeded else None,
        failure=completed.failure,
    )
    if not succeeded and reply.failure is None:  # terminated: say so
        reply = reply.replace(
            failure=FailureDetails("Terminated", f"sub-orchestration was terminated: {completed.result or ''}")
        )
    return WorkMessage(
        MessageTarget.ORCHESTRATION,
        started.parent_instance_id or "",
        reply,
        execution_id=started.parent_execution_id,
        id=message_id,
    )

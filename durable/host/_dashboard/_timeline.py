"""The history timeline: an instance's history as bars and markers on one time axis (a Gantt).

Pure: it reads history events and returns positions in percent of the axis, which the template
draws as SVG. An action is a bar from the event that scheduled it to the one that completed it;
one still open runs to the end of the axis (a timer: to its due time)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ...core._history import EventType, HistoryEvent

TICKS = 5  # labelled instants along the axis, ends included

_E = EventType
# What opens a bar, and the row kind it is drawn as.
_BAR_KINDS = {
    _E.TASK_SCHEDULED: "activity",
    _E.TIMER_CREATED: "timer",
    _E.SUB_ORCHESTRATION_CREATED: "suborchestration",
}
_FAILURES = frozenset({_E.TASK_FAILED, _E.SUB_ORCHESTRATION_FAILED})
# Instants worth a row of their own: what came from outside, or changed the instance's course.
_MARKERS = {
    _E.EVENT_RAISED: "event",
    _E.EVENT_SENT: "entity",
    _E.EXECUTION_SUSPENDED: "control",
    _E.EXECUTION_RESUMED: "control",
    _E.EXECUTION_TERMINATED: "control",
    _E.EXECUTION_REWOUND: "control",
    _E.CONTINUE_AS_NEW: "control",
}


@dataclass(frozen=True)
class Row:
    kind: str  # execution, activity, timer, suborchestration, event, entity, control
    label: str
    start: datetime
    end: datetime | None  # None for an instant (a marker)
    outcome: str  # completed, failed, terminated, running, instant
    left: float  # percent of the axis
    width: float  # percent of the axis; 0 for a marker
    detail: str = ""
    instance_id: str | None = None  # the sub-orchestration a row stands for

    @property
    def duration(self) -> str:
        return "" if self.end is None else format_duration(self.end - self.start)


@dataclass(frozen=True)
class Tick:
    label: str
    left: float


@dataclass(frozen=True)
class Timeline:
    start: datetime
    end: datetime
    rows: list[Row]
    ticks: list[Tick]

    @property
    def span(self) -> str:
        return format_duration(self.end - self.start)


@dataclass
class _Open:
    kind: str
    label: str
    start: datetime
    due: datetime | None = None
    instance_id: str | None = None
    end: datetime | None = None
    outcome: str = "running"
    detail: str = ""


def build_timeline(events: Sequence[HistoryEvent], now: datetime) -> Timeline | None:
    """The timeline of ``events`` (one instance's history); None for an empty history. Bars still
    open at the end run to ``now`` when the instance has not finished, else to its last event."""
    if not events:
        return None
    bars: list[_Open] = []
    by_action: dict[int, _Open] = {}
    markers: list[tuple[str, str, datetime, str]] = []
    execution = _Open("execution", "orchestration", events[0].timestamp)
    for event in events:
        kind = event.event_type
        if kind is _E.EXECUTION_STARTED:
            execution.label = event.name or "orchestration"
        elif kind is _E.EXECUTION_COMPLETED:
            execution.end = event.timestamp
            execution.outcome = "failed" if event.runtime_status == "Failed" else "completed"
            execution.detail = event.runtime_status or ""
        elif kind in _BAR_KINDS:
            bar = _Open(_BAR_KINDS[kind], _action_label(event), event.timestamp, event.fire_at, event.instance_id)
            bars.append(bar)
            by_action[event.event_id] = bar
        elif event.completed_task_id is not None and event.completed_task_id in by_action:
            bar = by_action.pop(event.completed_task_id)
            # A TimerFired carries its timer's creation time: a timer ends when it is due.
            bar.end = max(event.timestamp, bar.due) if kind is _E.TIMER_FIRED and bar.due else event.timestamp
            bar.outcome = "failed" if kind in _FAILURES else "completed"
            if event.failure is not None:
                bar.detail = f"{event.failure.error_type}: {event.failure.message}"
        if kind in _MARKERS:
            markers.append((_MARKERS[kind], _marker_label(event), event.timestamp, event.input or ""))
            if kind is _E.EXECUTION_TERMINATED:
                execution.end, execution.outcome, execution.detail = event.timestamp, "terminated", "Terminated"
    finished = execution.end is not None
    last = max(event.timestamp for event in events)
    start = events[0].timestamp
    end = max([last if finished else max(now, last)] + [b.due for b in bars if b.due is not None and b.end is None])
    if end <= start:  # everything at one instant: give the axis a width
        end = start + timedelta(milliseconds=1)

    def position(at: datetime) -> float:
        return round(100 * (at - start) / (end - start), 3)

    rows: list[Row] = []
    for bar in [execution, *bars]:
        stop = bar.end or (bar.due if bar.kind == "timer" and bar.due is not None else end)
        left = position(bar.start)
        width = max(position(stop) - left, 0.0)
        rows.append(Row(bar.kind, bar.label, bar.start, bar.end, bar.outcome, left, width, bar.detail, bar.instance_id))
    for marker_kind, label, at, detail in markers:
        rows.append(Row(marker_kind, label, at, None, "instant", position(at), 0.0, detail))
    rows[1:] = sorted(rows[1:], key=lambda row: row.start)  # the execution first, the rest in time
    ticks = [Tick(_clock(start + (end - start) * i / (TICKS - 1)), 100 * i / (TICKS - 1)) for i in range(TICKS)]
    return Timeline(start, end, rows, ticks)


def _action_label(event: HistoryEvent) -> str:
    if event.event_type is _E.TIMER_CREATED:
        return f"timer until {_clock(event.fire_at)}" if event.fire_at is not None else "timer"
    return event.name or event.event_type.value


def _marker_label(event: HistoryEvent) -> str:
    if event.event_type is _E.EVENT_RAISED:
        return f"event {event.name or ''}".strip()
    if event.event_type is _E.EVENT_SENT:
        return f"{event.name or 'message'} → {event.instance_id or ''}".strip()
    return str(event.event_type.value)


def _clock(at: datetime | None) -> str:
    return "" if at is None else at.strftime("%H:%M:%S.%f")[:-3]


def format_duration(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

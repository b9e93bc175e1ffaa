"""The in-memory event log: ordered, bounded by count and age, indexed by id for replay.

The log gives every event two names: ``seq``, its own consecutive position used to
order and de-duplicate, and ``id``, the opaque string subscribers see. Ids here look like
Redis stream ids (``<milliseconds>-<counter>``), so they stay unique across restarts of
the process: a client holding an id from a previous run is told it missed events, rather
than being silently matched to a different event that reuses a number.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable

from broker.event import Event, EventDraft
from broker.topics import Selector


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    """What a resuming subscriber gets before going live.

    ``through`` is the log's head position when the replay was read: every live event at
    or below it is already covered by this replay (sent, or not wanted), so the subscriber
    drops those from its live queue. That is what makes the seam exact.
    """

    events: list[Event]
    missed: bool
    through: int
    # The newest event before the first one replayed (before the log's head when none
    # is) that this subscriber would have received (its topics and, for private
    # events, its grants), looked for among at most ``PREDECESSOR_SCAN`` events; None
    # when there is none, or when the replay is ``missed``. Mercure reports it in the
    # ``Last-Event-ID`` response header (``earliest`` for None): a subscriber that finds
    # there the id it asked for knows it lost nothing, and events it may not read or did
    # not ask for are never named.
    predecessor: str | None = None


PREDECESSOR_SCAN = 1000
# Mercure's resume point for "all the history there is": no event bears this id (our
# ids are ``<ms>-<n>``, and Mercure publishes refuse it as a chosen id), so a replay
# from it reads everything retained.
EARLIEST = "earliest"


class EventLog:
    """A ring of the most recent events, at most ``max_events`` and at most ``ttl`` old."""

    def __init__(
        self,
        max_events: int,
        ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._events: deque[Event] = deque()
        self._positions: dict[str, int] = {}
        self._max_events = max_events
        self._ttl = ttl
        self._clock = clock
        self._wall_clock_ms = wall_clock_ms
        self._seq = 0
        self._head_id: str | None = None
        self._last_ms = 0
        self._counter = 0

    def __len__(self) -> int:
        return len(self._events)

    @property
    def head(self) -> int:
        """Position of the newest event ever appended (0 before the first)."""
        return self._seq

    def append(self, drafts: Iterable[EventDraft]) -> list[Event]:
        """Give each draft an id and a position, keep it, and return the logged events.

        One clock reading serves the whole batch: ids within it share the millisecond
        and count up, exactly as they would if it all arrived within one millisecond.
        """
        now = self._clock()
        wall_ms = self._wall_clock_ms()
        if wall_ms > self._last_ms:
            self._last_ms, self._counter = wall_ms, -1
        prefix = f"{self._last_ms}-"
        keep = self._max_events > 0
        events, positions = self._events, self._positions
        appended: list[Event] = []
        for draft in drafts:
            self._seq += 1
            self._counter += 1
            event_id = prefix + str(self._counter) if draft.id is None else draft.id
            event = Event.build(self._seq, event_id, draft, now)
            appended.append(event)
            if keep:
                events.append(event)
                positions[event.id] = event.seq
        if appended:
            self._head_id = appended[-1].id
        self._evict(now)
        return appended

    def trim(self) -> None:
        """Drop events past their age; called periodically so an idle log shrinks too."""
        self._evict(self._clock())

    def _evict(self, now: float) -> None:
        events, positions = self._events, self._positions
        oldest_allowed = now - self._ttl
        while events and (len(events) > self._max_events or events[0].created < oldest_allowed):
            gone = events.popleft()
            if positions.get(gone.id) == gone.seq:
                del positions[gone.id]

    def since(
        self,
        last_id: str,
        selector: Selector,
        grants: Selector | None = None,
        *,
        predecessor: bool = False,
    ) -> Replay:
        """Events after ``last_id`` that ``selector`` wants and ``grants`` allow (private
        events need them, see ``Event.readable_by``), oldest first; with ``predecessor``,
        also ``Replay.predecessor`` (only Mercure reports it).

        An id no longer (or never) in the log cannot be placed: the replay then starts at
        the oldest retained event and says ``missed``, since what came between is gone.
        """
        self.trim()
        head = self._seq
        position = self._positions.get(last_id)
        if position is None:
            if last_id == self._head_id:
                return Replay([], missed=False, through=head)
            return Replay(
                [e for e in self._events if e.readable_by(selector, grants)],
                missed=True,
                through=head,
            )
        newer: list[Event] = []
        before = len(self._events)
        for index in range(len(self._events) - 1, -1, -1):
            event = self._events[index]
            if event.seq <= position:
                break
            if event.readable_by(selector, grants):
                newer.append(event)
                before = index
        newer.reverse()
        found = self._readable_before(before, selector, grants) if predecessor else None
        return Replay(newer, missed=False, through=head, predecessor=found)

    def _readable_before(
        self, index: int, selector: Selector, grants: Selector | None
    ) -> str | None:
        """The id of the newest event before ``index`` this subscriber would receive."""
        events = self._events
        for back in range(index - 1, max(index - 1 - PREDECESSOR_SCAN, -1), -1):
            if events[back].readable_by(selector, grants):
                return events[back].id
        return None

"""The hub: who is subscribed to what, and the fan-out of logged events to them.

The hub never encodes anything. A backend hands it events that already carry their wire
bytes; the hub finds the interested subscribers through the topic index and offers each
the same bytes object. A subscriber holding several patterns that match one event (or
an event with several topics) still gets it once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence

from broker.event import Event
from broker.metrics import Stats
from broker.subscriber import CloseReason, Run, Subscriber
from broker.topics import TopicIndex


class Hub:
    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._index: TopicIndex[Subscriber] = TopicIndex()
        self._subscribers: set[Subscriber] = set()
        self._per_peer: dict[str, int] = {}
        self._emptied: asyncio.Event | None = None

    @property
    def connection_count(self) -> int:
        return len(self._subscribers)

    @property
    def index_size(self) -> int:
        return len(self._index)

    def connections_from(self, peer: str) -> int:
        """Streams open from one client address (``Subscriber.peer``)."""
        return self._per_peer.get(peer, 0)

    def subscribe(self, subscriber: Subscriber) -> None:
        """Register at once: from here on, every fanned-out event that matches is offered."""
        for pattern in subscriber.selector.patterns:
            self._index.add(pattern, subscriber)
        self._subscribers.add(subscriber)
        self._per_peer[subscriber.peer] = self._per_peer.get(subscriber.peer, 0) + 1

    def forget(self, subscriber: Subscriber) -> None:
        """Remove a subscriber whose stream has ended and count why; safe to call twice."""
        if subscriber not in self._subscribers:
            return
        subscriber.disarm()
        self._subscribers.discard(subscriber)
        for pattern in subscriber.selector.patterns:
            self._index.remove(pattern, subscriber)
        remaining = self._per_peer[subscriber.peer] - 1
        if remaining:
            self._per_peer[subscriber.peer] = remaining
        else:
            del self._per_peer[subscriber.peer]
        self._stats.disconnects[subscriber.close_reason or CloseReason.CLIENT] += 1
        if not self._subscribers and self._emptied is not None:
            self._emptied.set()

    def fan_out(self, events: Sequence[Event]) -> None:
        """Offer each event to its subscribers.

        Consecutive events with the same topics (and privacy) go to the same subscribers,
        so a run of them is joined into one bytes object, once, and written with one call
        per subscriber: a batch of 100 events costs each connection one write, not 100.

        A private event goes only to the matching subscribers whose grants cover one of
        its topics; the check is per subscriber, so it is made for private events only.
        """
        index = self._index
        count = len(events)
        start = 0
        while start < count:
            event = events[start]
            topics = event.topics
            private = event.private
            end = start + 1
            while end < count and events[end].topics == topics and events[end].private == private:
                end += 1
            if len(topics) == 1:
                found = index.match(topics[0])
            else:
                found = [group for topic in topics for group in index.match(topic)]
            if found:
                targets: Iterable[Subscriber] = found[0] if len(found) == 1 else set().union(*found)
                if private:
                    targets = [
                        subscriber
                        for subscriber in targets
                        if subscriber.grants is not None and subscriber.grants.matches_any(topics)
                    ]
                if end - start == 1:
                    for subscriber in targets:
                        subscriber.offer(event)
                else:
                    run = Run(events[start:end])
                    for subscriber in targets:
                        subscriber.offer_run(run)
            start = end

    def notify_missed(self, last_id: str, *, new_log: bool = False) -> None:
        """Send every stream a ``broker.missed`` notice: events after ``last_id`` are gone
        (``new_log``: the log itself was replaced, see ``Subscriber.notify_missed``)."""
        for subscriber in self._subscribers:
            subscriber.notify_missed(last_id, new_log=new_log)

    def heartbeat(self) -> None:
        for subscriber in self._subscribers:
            subscriber.heartbeat()

    def close_all(self, reason: CloseReason) -> None:
        for subscriber in list(self._subscribers):
            subscriber.close(reason)

    async def shut_down(self, budget: float) -> None:
        """End every stream cleanly, wait up to ``budget`` seconds for the clients to take
        the end, then cut the connections of those that did not (they were not reading)."""
        self.close_all(CloseReason.SHUTDOWN)
        if self._subscribers:
            self._emptied = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), budget)
        for subscriber in list(self._subscribers):
            subscriber.abort()

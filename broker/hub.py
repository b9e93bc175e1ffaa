"""The hub: who is subscribed to what, and the fan-out of logged events to them.

The hub never encodes anything. A backend hands it events that already carry their wire
bytes; the hub finds the interested subscribers through the topic index and offers each
the same bytes object. A subscriber holding several patterns that match one event (or
an event with several topics) still gets it once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from broker.event import Event
from broker.metrics import Stats
from broker.subscriber import CloseReason, Run, Subscriber
from broker.topics import Matcher, Selector, TopicIndex


class Recipient(Protocol):
    """What the fan-out offers events to: a stream's ``Subscriber``, or a reader of the
    hub's own (``watch``)."""

    grants: Selector | None

    def __hash__(self) -> int: ...

    def offer(self, event: Event) -> None: ...

    def offer_run(self, run: Run) -> None: ...


class Hub:
    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._index: TopicIndex[Recipient] = TopicIndex()
        # Matchers the trie cannot hold (URL patterns, URI templates), each asked once
        # per published topic however many subscribers share it.
        self._scanned: dict[Matcher, set[Recipient]] = {}
        self._subscribers: set[Subscriber] = set()
        self._per_peer: dict[str, int] = {}
        self._emptied: asyncio.Event | None = None
        # Told of every subscriber as it is forgotten, whatever ended its stream (Mercure's
        # active subscriptions publish the end of each then).
        self.on_forget: Callable[[Subscriber], None] | None = None

    @property
    def connection_count(self) -> int:
        return len(self._subscribers)

    @property
    def index_size(self) -> int:
        return len(self._index) + len(self._scanned)

    def connections_from(self, peer: str) -> int:
        """Streams open from one client address (``Subscriber.peer``)."""
        return self._per_peer.get(peer, 0)

    def subscribe(self, subscriber: Subscriber) -> None:
        """Register at once: from here on, every fanned-out event that matches is offered."""
        selector = subscriber.selector
        for pattern in selector.patterns:
            self._index.add(pattern, subscriber)
        for topic in selector.exact:
            self._index.add_exact(topic, subscriber)
        for matcher in selector.scanned:
            self._scanned.setdefault(matcher, set()).add(subscriber)
        self._subscribers.add(subscriber)
        self._per_peer[subscriber.peer] = self._per_peer.get(subscriber.peer, 0) + 1

    def watch(self, pattern: str, recipient: Recipient) -> None:
        """Offer ``recipient`` the events matching ``pattern``, private ones included if
        its grants allow, without counting it as a stream: a reader of the log inside the
        broker (Mercure's active subscriptions). It adds nothing to the fan-out's work for
        topics the pattern cannot match beyond the trie walk any wildcard costs."""
        self._index.add(pattern, recipient)

    def unwatch(self, pattern: str, recipient: Recipient) -> None:
        self._index.remove(pattern, recipient)

    def forget(self, subscriber: Subscriber) -> None:
        """Remove a subscriber whose stream has ended and count why; safe to call twice."""
        if subscriber not in self._subscribers:
            return
        subscriber.disarm()
        self._subscribers.discard(subscriber)
        selector = subscriber.selector
        for pattern in selector.patterns:
            self._index.remove(pattern, subscriber)
        for topic in selector.exact:
            self._index.remove_exact(topic, subscriber)
        for matcher in selector.scanned:
            holders = self._scanned.get(matcher)
            if holders is not None:
                holders.discard(subscriber)
                if not holders:
                    del self._scanned[matcher]
        remaining = self._per_peer[subscriber.peer] - 1
        if remaining:
            self._per_peer[subscriber.peer] = remaining
        else:
            del self._per_peer[subscriber.peer]
        self._stats.disconnects[subscriber.close_reason or CloseReason.CLIENT] += 1
        if self.on_forget is not None:
            self.on_forget(subscriber)
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
            if self._scanned:
                found.extend(self._scan(topics))
            if found:
                targets: Iterable[Recipient] = found[0] if len(found) == 1 else set().union(*found)
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

    def _scan(self, topics: Sequence[str]) -> list[set[Recipient]]:
        return [
            holders
            for matcher, holders in self._scanned.items()
            if any(matcher.matches(topic) for topic in topics)
        ]

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

"""Fan-out: who gets an event, and that each gets it once.

Subscribers here are not attached to a connection yet, so every offered event lands in
their queue, which is exactly what the hub's contract is about.
"""

from __future__ import annotations

from broker.config import Overflow
from broker.event import Event, EventDraft
from broker.history import EventLog
from broker.hub import Hub
from broker.matchers import URLPatternMatcher
from broker.metrics import Stats
from broker.subscriber import CloseReason, Subscriber
from broker.topics import Selector


def subscriber(*patterns: str) -> Subscriber:
    return Subscriber(
        Selector(patterns),
        max_events=100,
        max_bytes=1 << 20,
        overflow=Overflow.DROP_OLDEST,
        stats=Stats(),
        on_lost=lambda _: None,
    )


def events(*topic_lists: tuple[str, ...]) -> list[Event]:
    log = EventLog(100, 60)
    return log.append(EventDraft(topics, b"data: x\n\n") for topics in topic_lists)


def test_each_matching_subscriber_gets_the_event_once() -> None:
    hub = Hub(Stats())
    exact, star, rest, overlapping, other = (
        subscriber("a/b"),
        subscriber("a/*"),
        subscriber("a/**"),
        subscriber("a/b", "a/*", "a/**", "**"),
        subscriber("z"),
    )
    for sub in (exact, star, rest, overlapping, other):
        hub.subscribe(sub)
    hub.fan_out(events(("a/b",)))
    assert [s.queued for s in (exact, star, rest, overlapping, other)] == [1, 1, 1, 1, 0]


def test_an_event_with_several_topics_reaches_a_subscriber_of_both_once() -> None:
    hub = Hub(Stats())
    both, first = subscriber("x", "y"), subscriber("x")
    hub.subscribe(both)
    hub.subscribe(first)
    hub.fan_out(events(("x", "y"), ("y",)))
    assert (both.queued, first.queued) == (2, 1)


def test_forget_stops_delivery_empties_the_index_and_counts_once() -> None:
    stats = Stats()
    hub = Hub(stats)
    sub = subscriber("a", "b/*", "c/**")
    hub.subscribe(sub)
    hub.forget(sub)
    hub.forget(sub)
    assert stats.disconnects == {"client": 1}
    hub.fan_out(events(("a",), ("b/1",), ("c/1/2",)))
    assert sub.queued == 0
    assert (hub.connection_count, hub.index_size) == (0, 0)


def test_close_all_marks_every_subscriber() -> None:
    hub = Hub(Stats())
    subs = [subscriber("a") for _ in range(3)]
    for sub in subs:
        hub.subscribe(sub)
    hub.close_all(CloseReason.SHUTDOWN)
    assert {sub.close_reason for sub in subs} == {CloseReason.SHUTDOWN}
    hub.fan_out(events(("a",)))
    assert all(sub.queued == 0 for sub in subs)


def mercure_subscriber(
    *, patterns: tuple[str, ...] = (), exact: tuple[str, ...] = (), url: tuple[str, ...] = ()
) -> Subscriber:
    selector = Selector(patterns, exact=exact, scanned=[URLPatternMatcher(p, HUB) for p in url])
    return Subscriber(
        selector,
        max_events=100,
        max_bytes=1 << 20,
        overflow=Overflow.DROP_OLDEST,
        stats=Stats(),
        on_lost=lambda _: None,
    )


HUB = "https://hub.example/.well-known/mercure"


def test_exact_topics_are_never_wildcards() -> None:
    """Mercure's Exact matcher compares bytes: ``a/*`` is that topic, not a pattern."""
    hub = Hub(Stats())
    literal, ours = mercure_subscriber(exact=("a/*",)), subscriber("a/*")
    hub.subscribe(literal)
    hub.subscribe(ours)
    hub.fan_out(events(("a/b",), ("a/*",)))
    assert (literal.queued, ours.queued) == (1, 2)


def test_url_patterns_are_matched_once_per_subscriber_and_shared() -> None:
    hub = Hub(Stats())
    books = [mercure_subscriber(url=("/books/:id",)) for _ in range(3)]
    both = mercure_subscriber(url=("/books/:id", "https://hub.example/books/*"))
    for sub in (*books, both):
        hub.subscribe(sub)
    assert hub.index_size == 2  # two distinct patterns, however many subscribers
    hub.fan_out(events(("/books/1",), ("https://hub.example/books/2",), ("/authors/1",)))
    assert [sub.queued for sub in (*books, both)] == [2, 2, 2, 2]


def test_forget_removes_exact_and_scanned_matchers() -> None:
    hub = Hub(Stats())
    sub = mercure_subscriber(exact=("x",), url=("/books/:id",), patterns=("**",))
    hub.subscribe(sub)
    hub.forget(sub)
    hub.fan_out(events(("x",), ("/books/1",)))
    assert sub.queued == 0
    assert hub.index_size == 0

"""The in-memory log: ids, bounds by count and age, and what ``since`` replays."""

from __future__ import annotations

from broker.event import EventDraft
from broker.history import PREDECESSOR_SCAN, EventLog
from broker.topics import Selector


class FakeClock:
    """A settable clock, so age limits are tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drafts(*topics: str) -> list[EventDraft]:
    return [EventDraft((topic,), f"data: {n}\n\n".encode()) for n, topic in enumerate(topics)]


def test_ids_strictly_increase_even_within_one_millisecond() -> None:
    log = EventLog(100, 60, wall_clock_ms=lambda: 5)
    events = log.append(drafts("a", "a", "a"))
    assert [e.id for e in events] == ["5-0", "5-1", "5-2"]
    assert [e.seq for e in events] == [1, 2, 3]


def test_ids_survive_a_clock_going_backwards() -> None:
    times = iter([10, 9, 11])
    log = EventLog(100, 60, wall_clock_ms=lambda: next(times))
    ids = [log.append(drafts("a"))[0].id for _ in range(3)]
    assert ids == ["10-0", "10-1", "11-0"]


def test_a_batch_reads_the_clock_once() -> None:
    times = iter([7, 8])
    log = EventLog(100, 60, wall_clock_ms=lambda: next(times))
    assert [e.id for e in log.append(drafts("a", "b", "c"))] == ["7-0", "7-1", "7-2"]
    assert [e.id for e in log.append(drafts("a"))] == ["8-0"]


def test_events_carry_the_id_in_their_wire_bytes() -> None:
    log = EventLog(10, 60, wall_clock_ms=lambda: 1)
    (event,) = log.append(drafts("a"))
    assert event.frame == b"id: 1-0\ndata: 0\n\n"
    assert event.chunk == b"11\r\nid: 1-0\ndata: 0\n\n\r\n"
    assert event.wire(chunked=False) is event.frame


def test_since_returns_newer_matching_events_in_order() -> None:
    log = EventLog(100, 60)
    first, *_ = log.append(drafts("a", "b", "a", "a/x", "a"))
    replay = log.since(first.id, Selector(["a"]))
    assert not replay.missed
    assert [e.seq for e in replay.events] == [3, 5]
    assert replay.through == 5
    assert [e.seq for e in log.since(first.id, Selector(["a/*", "b"])).events] == [2, 4]


def test_since_newest_id_is_empty_and_not_missed() -> None:
    log = EventLog(100, 60)
    *_, last = log.append(drafts("a", "a"))
    replay = log.since(last.id, Selector(["a"]))
    assert (replay.events, replay.missed, replay.through) == ([], False, 2)


def test_unknown_id_is_missed_and_replays_everything_retained() -> None:
    log = EventLog(100, 60)
    log.append(drafts("a", "b", "a"))
    replay = log.since("not-an-id", Selector(["a"]))
    assert replay.missed
    assert [e.seq for e in replay.events] == [1, 3]


def test_count_bound_evicts_oldest_and_their_ids() -> None:
    log = EventLog(3, 60)
    events = log.append(drafts(*["a"] * 5))
    assert len(log) == 3
    replay = log.since(events[0].id, Selector(["a"]))
    assert replay.missed
    assert [e.seq for e in replay.events] == [3, 4, 5]
    assert not log.since(events[2].id, Selector(["a"])).missed


def test_age_bound_evicts_on_trim() -> None:
    clock = FakeClock()
    log = EventLog(100, 10, clock=clock)
    old = log.append(drafts("a"))[0]
    clock.now += 5
    log.append(drafts("a"))
    clock.now += 6
    log.trim()
    assert len(log) == 1
    assert log.since(old.id, Selector(["a"])).missed


def test_history_size_zero_keeps_nothing_but_knows_the_head() -> None:
    log = EventLog(0, 60)
    first, last = log.append(drafts("a", "a"))
    assert len(log) == 0
    assert not log.since(last.id, Selector(["a"])).missed
    assert log.since(first.id, Selector(["a"])).missed


def test_a_chosen_id_names_the_event_and_resumes_from_its_newest_use() -> None:
    log = EventLog(100, 60, wall_clock_ms=lambda: 1)
    log.append([EventDraft(("a",), b"data: 0\n\n", id="x")])
    log.append(drafts("a"))
    newest, after = log.append([EventDraft(("a",), b"data: 2\n\n", id="x"), *drafts("a")])
    assert newest.id == "x"
    assert newest.frame == b"id: x\ndata: 2\n\n"
    replay = log.since("x", Selector(["a"]))
    assert replay.events == [after]
    assert not replay.missed


def test_the_predecessor_of_an_empty_replay_is_the_newest_event() -> None:
    log = EventLog(100, 60)
    *_, last = log.append(drafts("a", "a"))
    assert log.since(last.id, Selector(["a"]), predecessor=True).predecessor == last.id


def test_the_predecessor_is_an_event_the_subscriber_would_have_received() -> None:
    """Events of other topics are skipped: a subscriber resuming from its last event
    then finds that very id as the predecessor, which tells it nothing was lost."""
    log = EventLog(100, 60)
    events = log.append(drafts("a", "b", "a", "b"))
    replay = log.since(events[0].id, Selector(["a"]), predecessor=True)
    assert replay.events == [events[2]]
    assert replay.predecessor == events[0].id
    replay = log.since(events[2].id, Selector(["a"]), predecessor=True)
    assert (replay.events, replay.predecessor) == ([], events[2].id)


def test_a_private_predecessor_is_known_only_with_a_matching_grant() -> None:
    log = EventLog(100, 60)
    first, secret = log.append(
        [*drafts("a"), EventDraft(("secret",), b"data: s\n\n", private=True)]
    )
    wanted = Selector(["a", "secret"])
    assert log.since(secret.id, wanted, predecessor=True).predecessor == first.id
    assert (
        log.since(secret.id, wanted, Selector(["other"]), predecessor=True).predecessor == first.id
    )
    assert (
        log.since(secret.id, wanted, Selector(["secret"]), predecessor=True).predecessor
        == secret.id
    )


def test_the_predecessor_scan_stops_after_its_limit() -> None:
    log = EventLog(10_000, 60)
    (public,) = log.append(drafts("a"))
    hidden = EventDraft(("secret",), b"data: s\n\n", private=True)
    *_, almost = log.append([hidden] * (PREDECESSOR_SCAN - 1))
    assert (
        log.since(almost.id, Selector(["a", "secret"]), predecessor=True).predecessor == public.id
    )
    (last,) = log.append([hidden])
    assert log.since(last.id, Selector(["a", "secret"]), predecessor=True).predecessor is None
    assert (
        log.since(
            last.id, Selector(["a", "secret"]), Selector(["secret"]), predecessor=True
        ).predecessor
        == last.id
    )


def test_a_missed_replay_has_no_predecessor() -> None:
    log = EventLog(100, 60)
    log.append(drafts("a", "a"))
    replay = log.since("not-an-id", Selector(["a"]), predecessor=True)
    assert replay.missed
    assert replay.predecessor is None


def test_the_predecessor_is_looked_for_only_when_asked() -> None:
    """Only Mercure reports it: ``/events`` resumes do not pay for the backward scan."""
    log = EventLog(100, 60)
    first, _ = log.append(drafts("a", "a"))
    assert log.since(first.id, Selector(["a"])).predecessor is None
    assert log.since(first.id, Selector(["a"]), predecessor=True).predecessor == first.id

"""The Redis backend against a real Redis: ids, order, atomic batches, the tail, replay,
trimming, and what a node does when Redis goes away or comes back empty.

The first part drives ``RedisBackend`` directly, with a hub that records each batch it
is handed (and fans it out as usual). The second part runs the app in process with
``--redis-url`` and talks to it over HTTP, for what only shows at that level: 503s,
``/readyz``, metrics, and the replay seam while the tail trails the log.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio
from httpx_sse import ServerSentEvent, aconnect_sse
from redis.typing import EncodableT, FieldT

from broker.backends.redis import (
    MAX_KEY_TTL_MS,
    REPLAY_BATCH,
    RedisBackend,
    parse_stream_id,
    stream_seq,
)
from broker.config import Overflow
from broker.errors import Unavailable
from broker.event import Event, EventDraft, EventLimits, encode_draft, make_draft
from broker.history import PREDECESSOR_SCAN
from broker.hub import Hub
from broker.metrics import Stats
from broker.subscriber import MISSED_EVENT, Subscriber
from broker.topics import Selector
from tests.conftest import (
    BrokerFactory,
    RawStream,
    RedisServer,
    events_of,
    free_port,
    publish,
    wait_for,
)
from tests.test_metrics import scrape

LIMITS = EventLimits(max_topics=64, max_event_bytes=256 * 1024)
RECEIVE_TIMEOUT = 10.0
TOTAL = 220


class RecordingHub(Hub):
    """A hub that keeps every batch it is handed, then fans it out as usual."""

    def __init__(self) -> None:
        super().__init__(Stats())
        self.batches: list[list[Event]] = []
        self.missed: list[str] = []

    def fan_out(self, events: Sequence[Event]) -> None:
        self.batches.append(list(events))
        super().fan_out(events)

    def notify_missed(self, last_id: str, *, new_log: bool = False) -> None:
        self.missed.append(last_id)
        super().notify_missed(last_id, new_log=new_log)

    @property
    def ids(self) -> list[str]:
        return [event.id for batch in self.batches for event in batch]


Node = tuple[RedisBackend, RecordingHub]
NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node(redis_url: str, redis_prefix: str) -> AsyncIterator[NodeFactory]:
    """Start backends ("nodes") on the test's prefix: ``await start_node(max_events=5)``."""
    started: list[RedisBackend] = []

    async def start(
        *,
        max_events: int = 10_000,
        ttl: float = 3600.0,
        url: str | None = None,
        stats: Stats | None = None,
    ) -> Node:
        backend = RedisBackend(
            url or redis_url,
            redis_prefix,
            max_events=max_events,
            ttl=ttl,
            stats=Stats() if stats is None else stats,
        )
        hub = RecordingHub()
        await backend.start(hub)
        started.append(backend)
        return backend, hub

    yield start
    for backend in started:
        await backend.close()


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def draft(topic: str | list[str], data: object, **fields: object) -> EventDraft:
    return make_draft(topic, data, fields.get("event"), fields.get("retry"), limits=LIMITS)


def chosen(
    topic: str,
    data: str,
    event_id: str | None = None,
    *,
    private: bool = False,
    key: str | None = None,
) -> EventDraft:
    """A draft with the fields HTTP checks for Mercure (an ``id``, ``private``) set."""
    return encode_draft((topic,), data, private=private, key=key, event_id=event_id)


async def stored_entries(
    client: redis.asyncio.Redis, key: str
) -> list[tuple[str, dict[bytes, bytes]]]:
    entries: Any = await client.xrange(key)
    return [(entry_id.decode(), fields) for entry_id, fields in entries]


async def stored_ids(client: redis.asyncio.Redis, key: str) -> list[str]:
    return [entry_id for entry_id, _ in await stored_entries(client, key)]


async def add_entry(client: redis.asyncio.Redis, key: str, fields: dict[FieldT, EncodableT]) -> str:
    """Append an entry as any Redis client could, bypassing the broker."""
    entry_id: Any = await client.xadd(key, fields)
    return str(entry_id.decode())


def seq_of(event_id: str) -> int:
    position = parse_stream_id(event_id)
    assert position is not None
    return stream_seq(position)


def data_of(event: Event) -> str:
    lines = [line for line in event.frame.decode().split("\n") if line.startswith("data: ")]
    return "\n".join(line.removeprefix("data: ") for line in lines)


# --- ids and positions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("1-0", "1-1"),
        ("1-99", "2-0"),
        ("1700000000000-5", "1700000000001-0"),
        ("5-4294967295", "5-4294967296"),  # a counter past 32 bits still orders
        ("5-18446744073709551615", "6-0"),
        ("0-0", "0-1"),
    ],
)
def test_positions_order_exactly_as_stream_ids_do(lower: str, higher: str) -> None:
    assert seq_of(lower) < seq_of(higher)


@pytest.mark.parametrize(
    "text", ["", "5", "a-1", "1-b", "-1-0", "1-2-3", " 1-2", "1-18446744073709551616", "\uff11-2"]
)
def test_anything_but_a_full_stream_id_is_not_one(text: str) -> None:
    assert parse_stream_id(text) is None


async def test_publish_returns_the_stream_ids_in_order(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    backend, _ = await start_node()
    ids = await backend.publish([draft("a", 1), draft("a", 2), draft("b", 3)])
    assert await stored_ids(raw_redis, backend.log_key) == ids
    assert sorted(ids, key=seq_of) == ids
    assert len(set(ids)) == 3


async def test_entries_store_the_raw_fields_under_their_documented_names(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    backend, _ = await start_node()
    await backend.publish(
        [
            draft(["chat/1", "chat/2"], "two\nlines", event="note", retry=1500),
            draft("chat/1", {"n": 1}),
        ]
    )
    (_, first), (_, second) = await stored_entries(raw_redis, backend.log_key)
    assert first == {
        b"topics": b"chat/1\nchat/2",
        b"data": b"two\nlines",
        b"event": b"note",
        b"retry": b"1500",
    }
    assert second == {b"topics": b"chat/1", b"data": b'{"n":1}'}


async def test_batches_stay_contiguous_while_two_nodes_publish_at_once(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    node_a, _ = await start_node()
    node_b, _ = await start_node()
    batches = [
        [draft(f"t/{n}", f"{n}.{i}") for i in range(10)] for n in range(40)
    ]  # 40 batches of 10, published concurrently through two nodes
    results = await asyncio.gather(
        *((node_a if n % 2 else node_b).publish(batch) for n, batch in enumerate(batches))
    )
    order = await stored_ids(raw_redis, node_a.log_key)
    assert len(order) == 400
    for ids in results:
        start = order.index(ids[0])
        assert order[start : start + 10] == ids, "a batch was interleaved with another"


# --- the tail --------------------------------------------------------------------------


async def test_every_node_receives_every_event_once_in_stream_order(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    nodes = [await start_node() for _ in range(3)]
    publisher, _ = nodes[0]
    published: list[list[str]] = []
    for n in range(30):
        published.append(await publisher.publish([draft("t", f"{n}.{i}") for i in range(5)]))
    expected = [event_id for ids in published for event_id in ids]
    for _, hub in nodes:
        await wait_for(lambda hub=hub: len(hub.ids) >= len(expected))  # type: ignore[misc]
        assert hub.ids == expected
        for ids in published:
            assert any(_contains(batch, ids) for batch in hub.batches), "a batch was split"
    first = nodes[0][1].batches[0][0]
    assert data_of(first) == "0.0"
    assert first.frame.startswith(f"id: {first.id}\n".encode())


def _contains(batch: list[Event], ids: list[str]) -> bool:
    batch_ids = [event.id for event in batch]
    for start in range(len(batch_ids) - len(ids) + 1):
        if batch_ids[start : start + len(ids)] == ids:
            return True
    return False


async def test_the_publishing_node_delivers_through_the_tail_like_every_other(
    start_node: NodeFactory,
) -> None:
    """Publishing returns once Redis stored the events; the node's own hub gets them from
    the stream, with the same ids and bytes as the other nodes."""
    node_a, hub_a = await start_node()
    _, hub_b = await start_node()
    ids = await node_a.publish([draft("t", "x", event="kind")])
    await wait_for(lambda: hub_a.ids == ids and hub_b.ids == ids)
    assert hub_a.batches[0][0].frame == hub_b.batches[0][0].frame
    assert hub_a.batches[0][0].seq == seq_of(ids[0])


async def test_an_entry_written_by_another_redis_client_is_delivered_as_an_event(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    backend, hub = await start_node()
    entry_id = await add_entry(
        raw_redis, backend.log_key, {"topics": "a\nb", "data": "line1\r\nline2", "event": "e"}
    )
    await wait_for(lambda: hub.ids == [entry_id])
    event = hub.batches[0][0]
    assert event.topics == ("a", "b")
    assert event.frame == f"id: {entry_id}\nevent: e\ndata: line1\ndata: line2\n\n".encode()


async def test_a_malformed_entry_is_skipped_by_the_tail_and_by_replay(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    backend, hub = await start_node()
    before = await backend.publish([draft("t", "before")])
    await add_entry(raw_redis, backend.log_key, {"topics": "t"})  # no data
    await add_entry(raw_redis, backend.log_key, {"topics": "t", "data": "x", "event": "a\nb"})
    await add_entry(raw_redis, backend.log_key, {"data": "no topics"})
    after = await backend.publish([draft("t", "after")])
    await wait_for(lambda: hub.ids == before + after)
    replay = await backend.replay(before[0], Selector(["t"]))
    assert [event.id for event in replay.events] == after
    assert not replay.missed


async def test_entries_trimmed_before_the_tail_read_them_are_reported_as_missed(
    start_node: NodeFactory,
) -> None:
    """One batch far larger than --history-size: XADD's MAXLEN trims the batch's own
    first entries before any node reads them. Streams must be told, not left with a
    silent hole."""
    stats = Stats()
    backend, hub = await start_node(max_events=10, stats=stats)
    before = await backend.publish([draft("t", "before")])
    await wait_for(lambda: hub.ids == before)
    batch = await backend.publish([draft("t", str(n)) for n in range(1000)])
    await wait_for(lambda: bool(hub.ids) and hub.ids[-1] == batch[-1])
    assert hub.missed == before
    assert stats.stream_gaps["trimmed"] == 1
    delivered = hub.ids[1:]
    assert delivered == batch[-len(delivered) :], "what arrives is the batch's retained end"
    assert len(delivered) < len(batch)


async def test_an_id_that_aged_out_with_nothing_after_it_lost_is_no_gap(
    start_node: NodeFactory,
) -> None:
    """The tail's last id trimmed by --history-ttl while the stream was idle: the next
    event follows it directly, so no stream may be told anything was missed."""
    stats = Stats()
    backend, hub = await start_node(ttl=0.2, stats=stats)
    first = await backend.publish([draft("t", "first")])
    await wait_for(lambda: hub.ids == first)

    async def aged_out() -> bool:
        await backend.trim()
        return backend.history_size() == 0

    await wait_until(aged_out)
    second = await backend.publish([draft("t", "second")])
    await wait_for(lambda: hub.ids == first + second)
    assert hub.missed == []
    assert sum(stats.stream_gaps.values()) == 0


# --- replay ----------------------------------------------------------------------------


async def test_replay_returns_exactly_the_matching_events_after_the_id(
    start_node: NodeFactory,
) -> None:
    backend, _ = await start_node()
    ids = await backend.publish([draft("a" if n % 2 else "b", str(n)) for n in range(10)])
    replay = await backend.replay(ids[3], Selector(["a"]))
    assert [event.id for event in replay.events] == [ids[5], ids[7], ids[9]]
    assert [data_of(event) for event in replay.events] == ["5", "7", "9"]
    assert not replay.missed
    assert replay.through == seq_of(ids[-1])


async def test_replay_from_the_newest_id_is_empty_and_not_missed(start_node: NodeFactory) -> None:
    backend, _ = await start_node()
    ids = await backend.publish([draft("a", "x"), draft("a", "y")])
    replay = await backend.replay(ids[-1], Selector(["a"]))
    assert (replay.events, replay.missed, replay.through) == ([], False, seq_of(ids[-1]))


async def test_replay_reads_past_one_batch_without_gap_or_duplicate(
    start_node: NodeFactory,
) -> None:
    backend, _ = await start_node()
    ids: list[str] = []
    for start in range(0, REPLAY_BATCH * 2 + 500, 500):
        ids += await backend.publish([draft("t", str(n)) for n in range(start, start + 500)])
    replay = await backend.replay(ids[10], Selector(["t"]))
    assert [event.id for event in replay.events] == ids[11:]
    assert not replay.missed


@pytest.mark.parametrize("last_id", ["not-an-id", "42", "0-0", "99999999999999-0"])
async def test_an_id_that_is_not_in_the_stream_is_missed_and_gets_all_retained(
    start_node: NodeFactory, last_id: str
) -> None:
    """Not a stream id, older than anything the stream holds, or newer than anything it
    ever generated (a client holding an id from before Redis restarted empty)."""
    backend, _ = await start_node()
    ids = await backend.publish([draft("a", "1"), draft("b", "2"), draft("a", "3")])
    replay = await backend.replay(last_id, Selector(["a"]))
    assert replay.missed
    assert [event.id for event in replay.events] == [ids[0], ids[2]]
    assert replay.through == seq_of(ids[-1])


async def test_an_id_trimmed_from_the_stream_is_missed(start_node: NodeFactory) -> None:
    backend, _ = await start_node(max_events=5)
    ids = await backend.publish([draft("t", str(n)) for n in range(20)])
    await backend.trim()
    replay = await backend.replay(ids[2], Selector(["t"]))
    assert replay.missed
    assert [event.id for event in replay.events] == ids[-5:]


async def test_an_id_from_a_log_that_was_lost_is_missed(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    """The stream was deleted (as by a Redis restarted empty) and written again: the old
    id sorts before the new entries but was never among them."""
    backend, _ = await start_node()
    old = await backend.publish([draft("t", "old")])
    await raw_redis.delete(backend.log_key)
    new = await backend.publish([draft("t", "new")])
    replay = await backend.replay(old[0], Selector(["t"]))
    assert replay.missed
    assert [event.id for event in replay.events] == new


async def test_replay_of_a_stream_that_does_not_exist_is_missed_and_empty(
    start_node: NodeFactory,
) -> None:
    backend, _ = await start_node()
    replay = await backend.replay("1-0", Selector(["t"]))
    assert (replay.events, replay.missed, replay.through) == ([], True, 0)


# --- ids chosen by the publisher, and the predecessor ------------------------------------


async def test_a_chosen_id_is_stored_returned_and_delivered_live_as_the_event_id(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    backend, hub = await start_node()
    ids = await backend.publish(
        [chosen("t", "1", "urn:uuid:1"), chosen("t", "2"), chosen("t", "3", "https://é.example/3")]
    )
    (first_entry, first), (second_entry, second), (third_entry, third) = await stored_entries(
        raw_redis, backend.log_key
    )
    assert ids == ["urn:uuid:1", second_entry, "https://é.example/3"]
    assert first == {b"topics": b"t", b"data": b"1", b"id": b"urn:uuid:1"}
    assert b"id" not in second
    assert third[b"id"] == "https://é.example/3".encode()
    await wait_for(lambda: hub.ids == ids)
    delivered = hub.batches[0]
    assert delivered[0].frame == b"id: urn:uuid:1\ndata: 1\n\n"
    assert [event.seq for event in delivered] == [
        seq_of(entry) for entry in (first_entry, second_entry, third_entry)
    ], "positions stay the entries' own, whatever id subscribers see"


async def test_a_chosen_id_is_indexed_for_the_history_ttl(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    backend, _ = await start_node(ttl=60)
    await backend.publish([chosen("t", "1", "x")])
    ((entry_id, _),) = await stored_entries(raw_redis, backend.log_key)
    assert await raw_redis.get(f"{redis_prefix}:id:x") == entry_id.encode()
    assert 0 < await raw_redis.pttl(f"{redis_prefix}:id:x") <= 60_000


async def test_the_id_index_ttl_is_capped_like_idempotency_keys(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    backend, _ = await start_node(ttl=1e13)
    assert await backend.publish([chosen("t", "1", "forever")]) == ["forever"]
    assert await raw_redis.pttl(f"{redis_prefix}:id:forever") > MAX_KEY_TTL_MS - 60_000


async def test_another_node_resumes_from_a_chosen_id_with_exactly_the_later_events(
    start_node: NodeFactory,
) -> None:
    node_a, _ = await start_node()
    node_b, _ = await start_node()
    ids = await node_a.publish(
        [
            chosen("t", "0"),
            chosen("t", "1", "x"),
            chosen("t", "2"),
            chosen("other", "3"),
            chosen("t", "4", "y"),
        ]
    )
    replay = await node_b.replay("x", Selector(["t"]))
    assert not replay.missed
    assert [event.id for event in replay.events] == [ids[2], "y"]
    assert [data_of(event) for event in replay.events] == ["2", "4"]
    assert replay.through == seq_of(ids[2]) + 2


async def test_a_reused_chosen_id_resumes_after_its_newest_event(start_node: NodeFactory) -> None:
    backend, _ = await start_node()
    await backend.publish([chosen("t", "first", "same"), chosen("t", "between")])
    await backend.publish([chosen("t", "second", "same"), chosen("t", "after")])
    replay = await backend.replay("same", Selector(["t"]))
    assert not replay.missed
    assert [data_of(event) for event in replay.events] == ["after"]


async def test_a_chosen_id_whose_index_key_expired_is_missed(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """The entry is still in the stream (nothing trimmed it), but nothing can place the
    id any more: the replay must say so rather than guess."""
    backend, _ = await start_node(ttl=0.2)
    await backend.publish([chosen("t", "1", "x"), chosen("t", "2")])

    async def expired() -> bool:
        return not await raw_redis.exists(f"{redis_prefix}:id:x")

    await wait_until(expired)
    replay = await backend.replay("x", Selector(["t"]), predecessor=True)
    assert replay.missed
    assert replay.predecessor is None
    assert [data_of(event) for event in replay.events] == ["1", "2"]


async def test_a_chosen_id_whose_entry_was_trimmed_is_missed(start_node: NodeFactory) -> None:
    backend, _ = await start_node(max_events=5)
    await backend.publish([chosen("t", "x", "x")])
    ids = await backend.publish([chosen("t", str(n)) for n in range(20)])
    await backend.trim()
    replay = await backend.replay("x", Selector(["t"]), predecessor=True)
    assert replay.missed
    assert replay.predecessor is None
    assert [event.id for event in replay.events] == ids[-5:]


async def test_a_keyed_retry_returns_the_chosen_id_and_leaves_the_index_alone(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    backend, _ = await start_node()
    first = await backend.publish([chosen("t", "first", "x", key="k")])
    await backend.publish([chosen("t", "reuses the id", "x")])
    retried = await backend.publish([chosen("t", "first", "x", key="k")])
    assert first == retried == ["x"]
    assert retried.fresh == 0
    entries = await stored_entries(raw_redis, backend.log_key)
    assert len(entries) == 2
    assert await raw_redis.get(f"{redis_prefix}:id:x") == entries[1][0].encode()


async def test_batches_mixing_keyed_chosen_and_plain_drafts_stay_atomic_and_contiguous(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    node_a, _ = await start_node()
    node_b, _ = await start_node()
    batches = [
        [
            chosen("t", f"{n}.0"),
            chosen("t", f"{n}.1", f"id-{n}"),
            chosen("t", f"{n}.2", key=f"key-{n}"),
            chosen("t", f"{n}.3", f"keyed-id-{n}", key=f"other-{n}"),
            chosen("t", f"{n}.4"),
        ]
        for n in range(40)
    ]
    results = await asyncio.gather(
        *((node_a if n % 2 else node_b).publish(batch) for n, batch in enumerate(batches))
    )
    entries = await stored_entries(raw_redis, node_a.log_key)
    assert len(entries) == 200
    order = [fields.get(b"id", entry_id.encode()).decode() for entry_id, fields in entries]
    for n, ids in enumerate(results):
        assert (ids[1], ids[3]) == (f"id-{n}", f"keyed-id-{n}")
        start = order.index(ids[0])
        assert order[start : start + 5] == ids, "a batch was interleaved with another"
        indexed = await raw_redis.get(f"{redis_prefix}:id:id-{n}")
        assert indexed == entries[start + 1][0].encode()


async def test_the_predecessor_of_an_empty_replay_is_the_newest_event(
    start_node: NodeFactory,
) -> None:
    backend, _ = await start_node()
    await backend.publish([chosen("t", "1"), chosen("t", "2", "x")])
    replay = await backend.replay("x", Selector(["t"]), predecessor=True)
    assert (replay.events, replay.missed, replay.predecessor) == ([], False, "x")


async def test_the_predecessor_is_an_event_the_subscriber_would_have_received(
    start_node: NodeFactory,
) -> None:
    backend, _ = await start_node()
    ids = await backend.publish(
        [chosen("a", "0"), chosen("b", "1"), chosen("a", "2"), chosen("b", "3")]
    )
    replay = await backend.replay(ids[0], Selector(["a"]), predecessor=True)
    assert [event.id for event in replay.events] == [ids[2]]
    assert replay.predecessor == ids[0], "events of other topics are skipped"
    replay = await backend.replay(ids[2], Selector(["a"]), predecessor=True)
    assert replay.events == []
    assert replay.predecessor == ids[2], "the newest wanted event when nothing is replayed"


async def test_a_private_predecessor_is_known_only_with_a_matching_grant(
    start_node: NodeFactory,
) -> None:
    backend, _ = await start_node()
    ids = await backend.publish([chosen("a", "0"), chosen("secret", "1", "hidden", private=True)])
    wanted = Selector(["a", "secret"])
    anonymous = await backend.replay("hidden", wanted, predecessor=True)
    granted = await backend.replay("hidden", wanted, Selector(["secret"]), predecessor=True)
    other_grant = await backend.replay("hidden", wanted, Selector(["other"]), predecessor=True)
    assert anonymous.events == granted.events == []
    assert anonymous.predecessor == ids[0]
    assert other_grant.predecessor == ids[0]
    assert granted.predecessor == "hidden"


async def test_the_predecessor_scan_stops_after_its_limit(start_node: NodeFactory) -> None:
    """Past ``PREDECESSOR_SCAN`` entries none visible, the answer is None even though a
    public event lies just beyond: the scan reads several batches and stops exactly."""
    backend, _ = await start_node()
    (public,) = await backend.publish([chosen("a", "public")])
    hidden = await backend.publish(
        [chosen("secret", str(n), private=True) for n in range(PREDECESSOR_SCAN - 1)]
    )
    assert (
        await backend.replay(hidden[-1], Selector(["a", "secret"]), predecessor=True)
    ).predecessor == public
    (last,) = await backend.publish([chosen("secret", "one more", private=True)])
    replay = await backend.replay(last, Selector(["a", "secret"]), predecessor=True)
    assert (replay.missed, replay.predecessor) == (False, None)
    granted = await backend.replay(
        last, Selector(["a", "secret"]), Selector(["secret"]), predecessor=True
    )
    assert granted.predecessor == last


async def test_a_malformed_entry_is_skipped_by_the_predecessor_scan(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    backend, _ = await start_node()
    (before,) = await backend.publish([chosen("t", "before")])
    await add_entry(raw_redis, backend.log_key, {"topics": "t", "data": "x", "id": "a\nb"})
    last = await add_entry(raw_redis, backend.log_key, {"topics": "t"})  # no data
    replay = await backend.replay(last, Selector(["t"]), predecessor=True)
    assert (replay.events, replay.missed, replay.predecessor) == ([], False, before)


async def test_a_missed_replay_has_no_predecessor(start_node: NodeFactory) -> None:
    backend, _ = await start_node()
    await backend.publish([chosen("t", "1"), chosen("t", "2")])
    replay = await backend.replay("not-an-id", Selector(["t"]), predecessor=True)
    assert replay.missed
    assert replay.predecessor is None


# --- trimming and the cached size ------------------------------------------------------


async def test_trim_keeps_exactly_the_newest_history_size_events(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    backend, _ = await start_node(max_events=50)
    ids: list[str] = []
    for start in range(0, 300, 30):
        ids += await backend.publish([draft("t", str(n)) for n in range(start, start + 30)])
    assert await raw_redis.xlen(backend.log_key) >= 50  # XADD's MAXLEN ~ trims whole nodes
    await backend.trim()
    kept = await stored_ids(raw_redis, backend.log_key)
    assert kept == ids[-50:]
    assert backend.history_size() == 50


async def test_trim_drops_events_older_than_the_ttl(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    backend, _ = await start_node(ttl=0.3)
    await backend.publish([draft("t", str(n)) for n in range(10)])

    async def trimmed_to_nothing() -> bool:
        await backend.trim()
        return backend.history_size() == 0

    await wait_until(trimmed_to_nothing)
    fresh = await backend.publish([draft("t", "fresh")])
    await backend.trim()
    assert await stored_ids(raw_redis, backend.log_key) == fresh
    assert backend.history_size() == 1


async def wait_until(condition: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        if await condition():
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_history_size_is_a_cached_count_refreshed_by_trim(
    start_node: NodeFactory, raw_redis: redis.asyncio.Redis
) -> None:
    backend, hub = await start_node()
    assert backend.history_size() == 0
    ids = await backend.publish([draft("t", str(n)) for n in range(5)])
    await wait_for(lambda: hub.ids == ids)
    assert backend.history_size() == 5, "counted by the tail"
    await raw_redis.delete(backend.log_key)
    assert backend.history_size() == 5, "not read from Redis at each call"
    await backend.trim()
    assert backend.history_size() == 0


# --- faults, at the backend ------------------------------------------------------------


async def test_a_node_that_never_reached_redis_refuses_to_publish(
    start_node: NodeFactory,
) -> None:
    backend, _ = await start_node(url=f"redis://127.0.0.1:{free_port()}/0")
    assert not backend.ready()
    with pytest.raises(Unavailable) as refused:
        await backend.publish([draft("t", "x")])
    assert refused.value.headers["Retry-After"] == "1"
    with pytest.raises(Unavailable):
        await backend.replay("1-0", Selector(["t"]))
    await backend.trim()  # never raises


async def test_the_tail_resumes_after_the_last_delivered_id_when_redis_returns(
    redis_server: RedisServer,
) -> None:
    stats = Stats()
    node = RedisBackend(redis_server.url, "r", max_events=1000, ttl=3600, stats=stats)
    hub = RecordingHub()
    await node.start(hub)
    try:
        first = await node.publish([draft("t", "before")])
        await wait_for(lambda: hub.ids == first)
        redis_server.stop(keep_data=True)
        await wait_for(lambda: not node.ready())
        with pytest.raises(Unavailable):
            await node.publish([draft("t", "during")])
        redis_server.start()
        # Appended by another client before this node is back: it must still arrive.
        with redis_server.client() as client:
            added: Any = client.xadd("r:log", {"topics": "t", "data": "meanwhile"})
            meanwhile = added.decode()
        await wait_for(node.ready)
        after = await node.publish([draft("t", "after")])
        await wait_for(lambda: hub.ids == [*first, meanwhile, *after])
        assert stats.backend_reconnects == 1
        assert sum(stats.stream_gaps.values()) == 0
    finally:
        await node.close()


async def test_a_redis_restarted_empty_is_noticed_even_after_another_node_wrote_to_it(
    redis_server: RedisServer,
) -> None:
    """Node A reconnects and publishes first, so the new stream's ids are past node B's
    last id; only the epoch token tells B that the log it knew is gone."""
    stats_a, stats_b = Stats(), Stats()
    node_a = RedisBackend(redis_server.url, "r", max_events=1000, ttl=3600, stats=stats_a)
    node_b = RedisBackend(redis_server.url, "r", max_events=1000, ttl=3600, stats=stats_b)
    hub_a, hub_b = RecordingHub(), RecordingHub()
    await node_a.start(hub_a)
    await node_b.start(hub_b)
    try:
        old = await node_a.publish([draft("t", "old")])
        await wait_for(lambda: hub_b.ids == old)
        redis_server.stop(keep_data=False)
        await wait_for(lambda: not node_a.ready() and not node_b.ready())
        redis_server.start()
        await wait_for(node_a.ready)
        new = await node_a.publish([draft("t", "new")])
        await wait_for(lambda: hub_a.ids == old + new and hub_b.ids == old + new)
        assert stats_a.stream_gaps["reset"] == 1
        assert stats_b.stream_gaps["reset"] == 1
    finally:
        await node_a.close()
        await node_b.close()


# --- the app on Redis, over HTTP -------------------------------------------------------


async def test_publish_while_redis_is_down_is_503_with_retry_after_and_readyz_follows(
    make_broker: BrokerFactory, redis_server: RedisServer, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(redis_url=redis_server.url, heartbeat=0.1)
    assert (await client.get(f"{broker.url}/readyz")).status_code == 200
    assert (await scrape(client, broker.url)).value("sse_broker_backend_up") == 1
    redis_server.stop(keep_data=True)
    await wait_for(lambda: not broker.state.backend.ready())
    response = await client.post(f"{broker.url}/publish", json={"topic": "t", "data": "x"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"] == "unavailable"
    assert (await client.get(f"{broker.url}/readyz")).status_code == 503
    metrics = await scrape(client, broker.url)
    assert metrics.value("sse_broker_backend_up") == 0
    assert metrics.value("sse_broker_events_published_total") == 0
    redis_server.start()
    await wait_for(broker.state.backend.ready)
    assert (await client.get(f"{broker.url}/readyz")).status_code == 200
    await publish(client, broker.url, "t", "x")
    metrics = await scrape(client, broker.url)
    assert metrics.value("sse_broker_backend_reconnects_total") == 1
    assert metrics.value("sse_broker_backend_up") == 1


async def test_ndjson_publish_that_hits_an_outage_lists_what_got_in(
    make_broker: BrokerFactory, redis_server: RedisServer, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(redis_url=redis_server.url)
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def body() -> AsyncIterator[bytes]:
        while (line := await lines.get()) is not None:
            yield line

    async def first_read_published() -> None:
        await wait_for(lambda: broker.state.stats.published == 1)
        redis_server.stop(keep_data=True)
        await wait_for(lambda: not broker.state.backend.ready())
        await lines.put(b'{"topic": "t", "data": "second"}\n')
        await lines.put(None)

    await lines.put(b'{"topic": "t", "data": "first"}\n')
    stopper = asyncio.create_task(first_read_published())
    response = await client.post(
        f"{broker.url}/publish",
        content=body(),
        headers={"Content-Type": "application/x-ndjson"},
    )
    await stopper
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert len(response.json()["ids"]) == 1


async def test_a_resume_while_redis_is_down_ends_the_stream_cleanly_not_500(
    make_broker: BrokerFactory, redis_server: RedisServer, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(redis_url=redis_server.url)
    event_id = await publish(client, broker.url, "t", "x")
    redis_server.stop(keep_data=True)
    await wait_for(lambda: not broker.state.backend.ready())
    async with client.stream(
        "GET", f"{broker.url}/events?topic=t", headers={"Last-Event-ID": event_id}
    ) as response:
        assert response.status_code == 200
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert body == b"retry: 2000\n: ok\n\n", "opening bytes, then a clean end: EventSource retries"
    assert (await scrape(client, broker.url)).value(
        "sse_broker_disconnects_total", reason="error"
    ) == 1


async def test_a_live_stream_stays_open_through_an_outage_and_gets_what_follows(
    make_broker: BrokerFactory, redis_server: RedisServer, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(redis_url=redis_server.url, heartbeat=0.1)
    port = broker.server.port
    assert port is not None
    with await RawStream.connect(port, "/events?topic=t") as stream:
        before = await publish(client, broker.url, "t", "before")
        await stream.read_until(lambda: [frame.id for frame in stream.events()] == [before])
        redis_server.stop(keep_data=True)
        await wait_for(lambda: not broker.state.backend.ready())
        heartbeats = len(stream.comment_blocks())
        await stream.read_until(lambda: len(stream.comment_blocks()) >= heartbeats + 3)
        redis_server.start()
        await wait_for(broker.state.backend.ready)
        after = await publish(client, broker.url, "t", "after")
        await stream.read_until(lambda: len(stream.events()) == 2)
        assert [(frame.id, frame.data) for frame in stream.events()] == [
            (before, "before"),
            (after, "after"),
        ]
        assert not stream.eof


async def next_event(events: AsyncIterator[ServerSentEvent]) -> ServerSentEvent:
    return await asyncio.wait_for(anext(events), RECEIVE_TIMEOUT)


async def test_streams_are_told_missed_when_redis_comes_back_empty(
    make_broker: BrokerFactory, redis_server: RedisServer, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(redis_url=redis_server.url)
    async with aconnect_sse(client, "GET", f"{broker.url}/events?topic=t") as source:
        events = events_of(source)
        old = await publish(client, broker.url, "t", "old")
        assert (await next_event(events)).id == old
        redis_server.stop(keep_data=False)
        redis_server.start()
        notice = await next_event(events)
        assert notice.event == MISSED_EVENT
        assert orjson.loads(notice.data) == {"lastEventId": old}
        await wait_for(broker.state.backend.ready)
        new = await publish(client, broker.url, "t", "new")
        assert (await next_event(events)).id == new
    metrics = await scrape(client, broker.url)
    assert metrics.value("sse_broker_stream_gaps_total", cause="reset") == 1
    assert metrics.value("sse_broker_stream_gaps_total", cause="trimmed") == 0


async def test_resuming_streams_get_exactly_the_events_after_their_id_while_publishing(
    make_broker: BrokerFactory, redis_url: str, redis_prefix: str, client: httpx.AsyncClient
) -> None:
    """The seam with a tail that trails the log: a replay read straight from Redis can be
    ahead of what the tail has fanned out, so covered events arrive after the replay and
    must be skipped then too."""
    broker = await make_broker(redis_url=redis_url, redis_prefix=redis_prefix)
    published = [await publish(client, broker.url, "t", n) for n in range(20)]

    async def keep_publishing() -> None:
        for n in range(20, TOTAL):
            published.append(await publish(client, broker.url, "t", n))

    async def resume(after: int) -> list[str]:
        received: list[str] = []
        headers = {"Last-Event-ID": published[after]}
        async with aconnect_sse(
            client, "GET", f"{broker.url}/events?topic=t", headers=headers
        ) as source:
            async for event in events_of(source):
                assert event.event != MISSED_EVENT
                received.append(event.id)
                if len(received) == TOTAL - 1 - after:
                    break
        return received

    publisher = asyncio.create_task(keep_publishing())
    results = []
    for after in range(0, 19, 3):
        results.append((after, asyncio.create_task(resume(after))))
        await asyncio.sleep(0)  # spread the resumes over the publishing
    await publisher
    for after, task in results:
        received = await asyncio.wait_for(task, 30)
        assert received == published[after + 1 :]


def test_events_a_replay_covered_are_skipped_even_when_offered_after_it() -> None:
    """Regression: ``skip_through`` only cleaned the queue, which is enough when fan-out
    happens as the log appends (in memory). A Redis tail trails the stream, so a replay
    read from Redis can cover events the tail offers only later: those were sent twice."""
    subscriber = Subscriber(
        Selector(["t"]),
        max_events=100,
        max_bytes=1 << 20,
        overflow=Overflow.DROP_OLDEST,
        stats=Stats(),
        on_lost=lambda _: None,
    )
    ids = ["5-0", "5-1", "6-0", "7-0"]
    events = [Event.build(seq_of(i), i, draft("t", i), 0.0) for i in ids]
    subscriber.offer(events[0])
    subscriber.skip_through(seq_of("5-1"))  # the replay went up to 5-1
    assert subscriber.queued == 0
    subscriber.offer(events[1])  # the tail gets to 5-1 only now
    assert subscriber.queued == 0
    subscriber.offer(events[2])
    assert subscriber.queued == 1


async def test_the_lag_gauge_is_zero_for_a_caught_up_node(
    make_broker: BrokerFactory, redis_url: str, redis_prefix: str, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(redis_url=redis_url, redis_prefix=redis_prefix)
    await publish(client, broker.url, "t", "x")
    await wait_for(lambda: broker.state.backend.history_size() == 1)
    metrics = await scrape(client, broker.url)
    assert metrics.value("sse_broker_stream_lag_seconds") == 0
    assert metrics.types["sse_broker_stream_lag_seconds"] == "gauge"
    assert metrics.types["sse_broker_backend_up"] == "gauge"
    assert metrics.types["sse_broker_backend_reconnects"] == "counter"


async def test_a_unix_socket_url_works(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:  # socket paths are short
        server = RedisServer(free_port(), Path(directory), socket_path=Path(directory) / "r.sock")
        server.start()
        try:
            broker = await make_broker(redis_url=f"unix://{directory}/r.sock")
            async with aconnect_sse(client, "GET", f"{broker.url}/events?topic=t") as source:
                event_id = await publish(client, broker.url, "t", "over a unix socket")
                assert (await next_event(events_of(source))).id == event_id
        finally:
            server.kill()


async def test_the_memory_backend_reports_up_with_no_lag_and_no_reconnects(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker()
    metrics = await scrape(client, broker.url)
    assert metrics.value("sse_broker_backend_up") == 1
    assert metrics.value("sse_broker_stream_lag_seconds") == 0
    assert metrics.value("sse_broker_backend_reconnects_total") == 0
    assert metrics.value("sse_broker_stream_gaps_total", cause="reset") == 0

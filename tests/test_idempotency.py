"""Idempotent publishing: a retried publish with the same key is answered with the first
id(s) and neither logged nor delivered again, on the in-memory log and on Redis, and on
Redis also when the retry reaches another node.

Each behaviour is checked where a publisher and a subscriber see it: the ids in the
response, what an open stream receives (up to a marker published afterwards, which
proves nothing else came in between) and what the log replays after a ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio
from httpx_sse import ServerSentEvent, aconnect_sse

from broker.backends.memory import RecentKeys
from broker.event import MAX_KEY_LENGTH
from tests.conftest import (
    JWT_KEY,
    Broker,
    BrokerFactory,
    RedisServer,
    events_of,
    mint,
    publish,
    wait_for,
)
from tests.test_publish import (
    NDJSON,
    RECEIVE_TIMEOUT,
    ControlledBody,
    error_body,
    publish_marker,
    receive,
    subscribed,
)

KEY = "Idempotency-Key"
BACKENDS = ["memory", "redis"]


@pytest.fixture(params=BACKENDS)
def start_broker(request: pytest.FixtureRequest, make_broker: BrokerFactory) -> BrokerFactory:
    """Brokers on the backend the test is parametrised with; on Redis, all the brokers a
    test starts share one prefix, so they are nodes of one cluster."""
    if request.param == "memory":
        return make_broker
    redis_url: str = request.getfixturevalue("redis_url")
    redis_prefix: str = request.getfixturevalue("redis_prefix")

    async def start(**flags: Any) -> Broker:
        return await make_broker(redis_url=redis_url, redis_prefix=redis_prefix, **flags)

    return start


async def post(
    http: httpx.AsyncClient, url: str, key: str | None = None, **request: Any
) -> httpx.Response:
    headers = {KEY: key} if key is not None else {}
    return await http.post(f"{url}/publish", headers=headers, **request)


def ids_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    body = response.json()
    return [body["id"]] if "id" in body else list(body["ids"])


async def until(events: AsyncIterator[ServerSentEvent], marker: str) -> list[tuple[str, str]]:
    """(id, data) of every event before ``marker``, which must come."""
    got: list[tuple[str, str]] = []
    while True:
        (event,) = await receive(events)
        if event.id == marker:
            return got
        got.append((event.id, event.data))


async def delivered(
    http: httpx.AsyncClient, url: str, events: AsyncIterator[ServerSentEvent], topic: str
) -> list[tuple[str, str]]:
    """What the open stream received since the last look, all of it but markers: on Redis
    the fan-out trails the log, so a marker published just before the stream opened may
    still arrive on it."""
    received = await until(events, await publish_marker(http, url, topic))
    return [(event_id, data) for event_id, data in received if data != "marker"]


async def logged(
    http: httpx.AsyncClient, url: str, topic: str, after: str
) -> list[tuple[str, str]]:
    """What the log holds on ``topic`` after the event ``after``, as a replay reads it,
    without the markers ``delivered`` published."""
    marker = await publish_marker(http, url, topic)
    async with aconnect_sse(
        http, "GET", f"{url}/events", params={"topic": topic}, headers={"Last-Event-ID": after}
    ) as source:
        assert source.response.status_code == 200
        replayed = await until(events_of(source), marker)
    return [(event_id, data) for event_id, data in replayed if data != "marker"]


# --- one event -------------------------------------------------------------------------


async def test_a_retried_event_with_the_header_gets_the_first_id_and_is_delivered_once(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker()
    start = await publish_marker(client, broker.url, "t")
    async with subscribed(client, broker.url, "t") as events:
        first = await post(client, broker.url, "order-1", json={"topic": "t", "data": "x"})
        retry = await post(client, broker.url, "order-1", json={"topic": "t", "data": "x"})
        (event_id,) = ids_of(first)
        assert retry.json() == {"id": event_id}
        assert await delivered(client, broker.url, events, "t") == [(event_id, "x")]
    assert await logged(client, broker.url, "t", start) == [(event_id, "x")]


async def test_a_retried_event_with_a_key_in_the_body_gets_the_first_id(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker()
    start = await publish_marker(client, broker.url, "t")
    async with subscribed(client, broker.url, "t") as events:
        event = {"topic": "t", "data": "x", "key": "order-1"}
        event_id = await publish(client, broker.url, "t", "x", key="order-1")
        assert await publish(client, broker.url, "t", "x", key="order-1") == event_id
        assert ids_of(await post(client, broker.url, json=event)) == [event_id]
        assert await delivered(client, broker.url, events, "t") == [(event_id, "x")]
    assert await logged(client, broker.url, "t", start) == [(event_id, "x")]


async def test_a_retry_is_answered_with_the_first_id_whatever_it_now_carries(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """The key alone identifies the publish: a retry is not compared with the original."""
    broker = await start_broker()
    async with subscribed(client, broker.url, "t", "other") as events:
        event_id = await publish(client, broker.url, "t", "first", key="k")
        assert await publish(client, broker.url, "other", "changed", key="k") == event_id
        assert await delivered(client, broker.url, events, "t") == [(event_id, "first")]


async def test_an_events_own_key_wins_over_the_header(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker()
    async with subscribed(client, broker.url, "t") as events:
        response = await post(
            client, broker.url, "header", json={"topic": "t", "data": "own", "key": "own"}
        )
        (own,) = ids_of(response)
        again = await post(client, broker.url, "own", json={"topic": "t", "data": "other"})
        assert ids_of(again) == [own]
        fresh = await post(client, broker.url, "header", json={"topic": "t", "data": "new"})
        (new,) = ids_of(fresh)
        assert new != own
        assert await delivered(client, broker.url, events, "t") == [(own, "own"), (new, "new")]


async def test_a_retried_form_publish_with_the_header_gets_the_first_id(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker()
    start = await publish_marker(client, broker.url, "form")
    form = {"topic": "form", "data": "x", "type": "update"}
    async with subscribed(client, broker.url, "form") as events:
        first = await post(client, broker.url, "form-1", data=form)
        retry = await post(client, broker.url, "form-1", data=form)
        (event_id,) = ids_of(first)
        assert retry.json() == {"id": event_id}
        assert await delivered(client, broker.url, events, "form") == [(event_id, "x")]
    assert await logged(client, broker.url, "form", start) == [(event_id, "x")]


async def test_different_keys_publish_separately(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker()
    async with subscribed(client, broker.url, "t") as events:
        by_header = [
            ids_of(await post(client, broker.url, key, json={"topic": "t", "data": key}))
            for key in ("a", "b")
        ]
        by_body = [await publish(client, broker.url, "t", key, key=key) for key in ("c", "d")]
        unkeyed = [await publish(client, broker.url, "t", "none") for _ in range(2)]
        ids = [*(ids[0] for ids in by_header), *by_body, *unkeyed]
        assert len(set(ids)) == 6
        assert await delivered(client, broker.url, events, "t") == list(
            zip(ids, ["a", "b", "c", "d", "none", "none"], strict=True)
        )


# --- batches ---------------------------------------------------------------------------


async def test_a_retried_array_with_the_header_gets_identical_ids_and_nothing_again(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker()
    start = await publish_marker(client, broker.url, "b")
    batch = [{"topic": "b", "data": str(n)} for n in range(3)]
    async with subscribed(client, broker.url, "b") as events:
        ids = ids_of(await post(client, broker.url, "batch-1", json=batch))
        assert len(set(ids)) == 3
        for _ in range(2):
            assert ids_of(await post(client, broker.url, "batch-1", json=batch)) == ids
        expected = list(zip(ids, ["0", "1", "2"], strict=True))
        assert await delivered(client, broker.url, events, "b") == expected
    assert await logged(client, broker.url, "b", start) == expected


async def test_a_one_element_array_takes_the_indexed_key_not_the_bare_one(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """``[event]`` is a batch: its event is ``<key>#0``, so the same header on a single
    event is another publish; and a single event keyed ``<key>#0`` is its retry."""
    broker = await start_broker()
    event = {"topic": "t", "data": "x"}
    (in_array,) = ids_of(await post(client, broker.url, "k", json=[event]))
    (single,) = ids_of(await post(client, broker.url, "k", json=event))
    assert single != in_array
    assert ids_of(await post(client, broker.url, "k#0", json=event)) == [in_array]


async def test_an_array_whose_keys_are_partly_known_publishes_only_the_new_events(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker()
    start = await publish_marker(client, broker.url, "p")
    async with subscribed(client, broker.url, "p") as events:
        known_a = await publish(client, broker.url, "p", "a", key="a")
        known_b = await publish(client, broker.url, "p", "b", key="b")
        batch = [
            {"topic": "p", "data": "a again", "key": "a"},
            {"topic": "p", "data": "c", "key": "c"},
            {"topic": "p", "data": "b again", "key": "b"},
            {"topic": "p", "data": "unkeyed"},
        ]
        ids = ids_of(await post(client, broker.url, json=batch))
        assert ids[0] == known_a
        assert ids[2] == known_b
        assert len({known_a, known_b, ids[1], ids[3]}) == 4
        expected = [(known_a, "a"), (known_b, "b"), (ids[1], "c"), (ids[3], "unkeyed")]
        assert await delivered(client, broker.url, events, "p") == expected
    assert await logged(client, broker.url, "p", start) == expected


async def test_a_grown_retry_of_an_array_publishes_only_its_new_positions(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """With the header, event ``i`` is ``<key>#i``: the first two positions are known."""
    broker = await start_broker()
    async with subscribed(client, broker.url, "g") as events:
        first = ids_of(
            await post(
                client, broker.url, "g", json=[{"topic": "g", "data": str(n)} for n in range(2)]
            )
        )
        grown = [{"topic": "g", "data": str(n)} for n in range(4)]
        ids = ids_of(await post(client, broker.url, "g", json=grown))
        assert ids[:2] == first
        assert len(set(ids)) == 4
        assert await delivered(client, broker.url, events, "g") == list(
            zip(ids, ["0", "1", "2", "3"], strict=True)
        )


async def test_a_key_repeated_within_one_batch_gets_the_id_of_its_first_occurrence(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker()
    batch = [
        {"topic": "d", "data": "1", "key": "dup"},
        {"topic": "d", "data": "2"},
        {"topic": "d", "data": "3", "key": "dup"},
        {"topic": "d", "data": "4", "key": "other"},
        {"topic": "d", "data": "5", "key": "dup"},
    ]
    async with subscribed(client, broker.url, "d") as events:
        ids = ids_of(await post(client, broker.url, json=batch))
        assert ids[0] == ids[2] == ids[4]
        assert len({ids[0], ids[1], ids[3]}) == 3
        assert await delivered(client, broker.url, events, "d") == [
            (ids[0], "1"),
            (ids[1], "2"),
            (ids[3], "4"),
        ]
        again = ids_of(await post(client, broker.url, json=batch))
        assert [again[n] for n in (0, 2, 3, 4)] == [ids[n] for n in (0, 2, 3, 4)]
        assert await delivered(client, broker.url, events, "d") == [(again[1], "2")], (
            "only the event without a key is published again"
        )


# --- NDJSON streams --------------------------------------------------------------------


def ndjson_lines(topic: str, count: int) -> list[bytes]:
    return [b'{"topic": "%s", "data": "%d"}\n' % (topic.encode(), n) for n in range(count)]


async def test_a_retried_ndjson_stream_gets_identical_ids_and_nothing_again(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """Keys follow event positions, not network reads or blank lines: the first stream
    arrives line by line (each read published before the next is sent) with blank lines
    between, the retry in one piece with CRLF endings, and they still match."""
    broker = await start_broker()
    start = await publish_marker(client, broker.url, "nd")
    lines = ndjson_lines("nd", 4)
    headers = {**NDJSON, KEY: "stream-1"}
    async with subscribed(client, broker.url, "nd") as events:
        body = ControlledBody()
        request = asyncio.create_task(
            client.post(f"{broker.url}/publish", content=body, headers=headers)
        )
        for line in lines:
            body.send(b"\n" + line)
            await receive(events)
        body.finish()
        ids = ids_of(await asyncio.wait_for(request, RECEIVE_TIMEOUT))
        assert len(set(ids)) == 4
        retry_body = b"".join(line.replace(b"\n", b"\r\n") for line in lines)
        retry = await client.post(f"{broker.url}/publish", content=retry_body, headers=headers)
        assert ids_of(retry) == ids
        assert await delivered(client, broker.url, events, "nd") == []
    expected = list(zip(ids, ["0", "1", "2", "3"], strict=True))
    assert await logged(client, broker.url, "nd", start) == expected


async def test_an_ndjson_stream_cut_by_a_bad_line_resumes_exactly_on_retry(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """The publisher resends the whole corrected stream: what got in is not sent again."""
    broker = await start_broker()
    lines = ndjson_lines("nd", 3)
    headers = {**NDJSON, KEY: "stream-2"}
    async with subscribed(client, broker.url, "nd") as events:
        broken = b"".join(lines[:2]) + b"{not json\n" + lines[2]
        response = await client.post(f"{broker.url}/publish", content=broken, headers=headers)
        partial = error_body(response, 400, "invalid_event", extra=frozenset({"ids"}))["ids"]
        assert len(partial) == 2
        fixed = await client.post(f"{broker.url}/publish", content=b"".join(lines), headers=headers)
        ids = ids_of(fixed)
        assert ids[:2] == partial
        assert await delivered(client, broker.url, events, "nd") == list(
            zip(ids, ["0", "1", "2"], strict=True)
        )


async def test_verbatim_ndjson_lines_take_indexed_keys_too(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker()
    body = b'{"choices": [1]}\n{"choices": [2]}\n[DONE]\n'

    async def send() -> list[str]:
        headers = {**NDJSON, KEY: "llm"}
        url = f"{broker.url}/publish"
        return ids_of(
            await client.post(url, content=body, headers=headers, params={"topic": "llm"})
        )

    async with subscribed(client, broker.url, "llm") as events:
        ids = await send()
        assert await send() == ids
        assert [
            event_id for event_id, _ in await delivered(client, broker.url, events, "llm")
        ] == ids


# --- expiry ----------------------------------------------------------------------------


async def test_a_key_publishes_anew_once_the_history_ttl_has_passed(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker(history_ttl=0.5)
    event = {"topic": "ttl", "data": "x"}
    async with subscribed(client, broker.url, "ttl") as events:
        (first,) = ids_of(await post(client, broker.url, "k", json=event))
        while True:  # retried until the key has expired; bounded by the test's timeout
            (event_id,) = ids_of(await post(client, broker.url, "k", json=event))
            if event_id != first:
                break
            await asyncio.sleep(0.05)
        assert ids_of(await post(client, broker.url, "k", json=event)) == [event_id]
        assert await delivered(client, broker.url, events, "ttl") == [
            (first, "x"),
            (event_id, "x"),
        ]


async def test_expired_keys_are_forgotten_by_the_periodic_trim(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(history_ttl=0.2, heartbeat=0.05)
    ids_of(await post(client, broker.url, "k", json=[{"topic": "t", "data": "x"}] * 3))
    keys = broker.state.backend.keys  # type: ignore[attr-defined]
    assert len(keys) == 3
    await wait_for(lambda: len(keys) == 0)


# --- invalid keys ----------------------------------------------------------------------

LONGEST = "k" * MAX_KEY_LENGTH


@pytest.mark.parametrize(
    "key",
    [
        "",
        " ",
        "a b",
        "tab\there",
        "é",
        "snow\u2603man",
        "k" * (MAX_KEY_LENGTH + 1),
        5,
        True,
        ["k"],
        {},
    ],
    ids=repr,
)
async def test_an_invalid_key_in_the_body_is_refused(
    broker: Broker, client: httpx.AsyncClient, key: object
) -> None:
    for body in (
        {"topic": "t", "data": "x", "key": key},
        [{"topic": "t", "data": "ok"}, {"topic": "t", "data": "x", "key": key}],
    ):
        response = await post(client, broker.url, json=body)
        detail = error_body(response, 400, "invalid_event")["detail"]
        assert "'key'" in detail
        if isinstance(body, list):
            assert detail.startswith("event 1: ")
    line = orjson.dumps({"topic": "t", "data": "x", "key": key}) + b"\n"
    response = await client.post(f"{broker.url}/publish", content=line, headers=NDJSON)
    assert error_body(response, 400, "invalid_event", extra=frozenset({"ids"}))["ids"] == []
    assert broker.state.backend.history_size() == 0


INVALID_HEADERS: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("empty", [(b"Idempotency-Key", b"")]),
    ("inner space", [(b"Idempotency-Key", b"a b")]),
    ("inner tab", [(b"Idempotency-Key", b"a\tb")]),
    ("utf-8", [(b"Idempotency-Key", "é".encode())]),
    ("latin-1", [(b"Idempotency-Key", b"\xe9")]),
    ("too long", [(b"Idempotency-Key", b"k" * (MAX_KEY_LENGTH + 1))]),
    ("two headers", [(b"Idempotency-Key", b"a"), (b"Idempotency-Key", b"b")]),
    ("two headers, same value", [(b"Idempotency-Key", b"a"), (b"idempotency-key", b"a")]),
]


@pytest.mark.parametrize(
    "headers", [case[1] for case in INVALID_HEADERS], ids=[case[0] for case in INVALID_HEADERS]
)
@pytest.mark.parametrize("shape", ["object", "array", "form", "ndjson"])
async def test_an_invalid_idempotency_key_header_is_refused(
    broker: Broker, client: httpx.AsyncClient, headers: list[tuple[bytes, bytes]], shape: str
) -> None:
    requests: dict[str, dict[str, Any]] = {
        "object": {"json": {"topic": "t", "data": "x"}},
        "array": {"json": [{"topic": "t", "data": "x"}]},
        "form": {"data": {"topic": "t", "data": "x"}},
        "ndjson": {"content": b'{"topic": "t", "data": "x"}\n'},
    }
    request = requests[shape]
    if shape == "ndjson":
        headers = [*headers, (b"Content-Type", b"application/x-ndjson")]
    response = await client.post(f"{broker.url}/publish", headers=headers, **request)
    detail = error_body(response, 400, "invalid_event")["detail"]
    assert "Idempotency-Key" in detail
    assert broker.state.backend.history_size() == 0


PRINTABLE = "".join(map(chr, range(0x21, 0x7F)))


@pytest.mark.parametrize(
    "key", ["!", "~", PRINTABLE, LONGEST], ids=["!", "~", "printable", "longest"]
)
async def test_the_widest_valid_keys_are_accepted_and_work(
    start_broker: BrokerFactory, client: httpx.AsyncClient, key: str
) -> None:
    """Also as a header on a batch, where the longest key's ``<key>#<i>`` is longer still;
    a key in the body and the same key in the header are one key."""
    broker = await start_broker()
    event = {"topic": "t", "data": "x"}
    (single,) = ids_of(await post(client, broker.url, key, json=event))
    assert await publish(client, broker.url, "t", "x", key=key) == single
    batch = ids_of(await post(client, broker.url, key, json=[event, event]))
    assert ids_of(await post(client, broker.url, key, json=[event, event])) == batch
    assert len({single, *batch}) == 3


# --- Redis: several nodes, the stored keys, outages -------------------------------------


async def two_nodes(
    make_broker: BrokerFactory, redis_url: str, prefix: str, **flags: Any
) -> tuple[Broker, Broker]:
    node_a = await make_broker(redis_url=redis_url, redis_prefix=prefix, **flags)
    node_b = await make_broker(redis_url=redis_url, redis_prefix=prefix, **flags)
    return node_a, node_b


async def test_a_retry_on_another_node_gets_the_same_id_and_the_log_holds_the_event_once(
    make_broker: BrokerFactory,
    redis_url: str,
    redis_prefix: str,
    async_redis: redis.asyncio.Redis,
    client: httpx.AsyncClient,
) -> None:
    node_a, node_b = await two_nodes(make_broker, redis_url, redis_prefix, history_ttl=60)
    event = {"topic": "x", "data": "payload"}
    async with subscribed(client, node_b.url, "x") as events:
        (event_id,) = ids_of(await post(client, node_a.url, "cross", json=event))
        assert ids_of(await post(client, node_b.url, "cross", json=event)) == [event_id]
        assert ids_of(await post(client, node_a.url, "cross", json=event)) == [event_id]
        assert await delivered(client, node_b.url, events, "x") == [(event_id, "payload")]
    entries: Any = await async_redis.xrange(f"{redis_prefix}:log")
    payloads = [entry_id.decode() for entry_id, fields in entries if fields[b"data"] == b"payload"]
    assert payloads == [event_id]
    stored = f"{redis_prefix}:key:cross"
    assert await async_redis.get(stored) == event_id.encode()
    ttl_ms = await async_redis.pttl(stored)
    assert 0 < ttl_ms <= 60_000


async def test_a_retried_array_on_another_node_stores_one_key_per_event(
    make_broker: BrokerFactory,
    redis_url: str,
    redis_prefix: str,
    async_redis: redis.asyncio.Redis,
    client: httpx.AsyncClient,
) -> None:
    node_a, node_b = await two_nodes(make_broker, redis_url, redis_prefix, history_ttl=30)
    batch = [{"topic": "x", "data": str(n)} for n in range(3)]
    ids = ids_of(await post(client, node_a.url, "arr", json=batch))
    assert ids_of(await post(client, node_b.url, "arr", json=batch)) == ids
    assert await async_redis.xlen(f"{redis_prefix}:log") == 3
    for position, event_id in enumerate(ids):
        stored = f"{redis_prefix}:key:arr#{position}"
        assert await async_redis.get(stored) == event_id.encode()
        assert 0 < await async_redis.pttl(stored) <= 30_000


async def test_concurrent_retries_on_two_nodes_publish_once(
    make_broker: BrokerFactory,
    redis_url: str,
    redis_prefix: str,
    async_redis: redis.asyncio.Redis,
    client: httpx.AsyncClient,
) -> None:
    nodes = await two_nodes(make_broker, redis_url, redis_prefix)
    event = {"topic": "x", "data": "race"}
    responses = await asyncio.gather(
        *(post(client, nodes[n % 2].url, "race", json=event) for n in range(20))
    )
    ids = {event_id for response in responses for event_id in ids_of(response)}
    assert len(ids) == 1
    assert await async_redis.xlen(f"{redis_prefix}:log") == 1


async def test_a_history_ttl_past_what_redis_can_expire_still_publishes_once(
    make_broker: BrokerFactory,
    redis_url: str,
    redis_prefix: str,
    async_redis: redis.asyncio.Redis,
    client: httpx.AsyncClient,
) -> None:
    """Redis cannot expire a key 1e300 s ahead; the key must still be stored, not the
    event logged and the publisher told 503 (which its retry would log again)."""
    broker = await make_broker(redis_url=redis_url, redis_prefix=redis_prefix, history_ttl=1e300)
    event = {"topic": "t", "data": "x"}
    (event_id,) = ids_of(await post(client, broker.url, "forever", json=event))
    assert ids_of(await post(client, broker.url, "forever", json=event)) == [event_id]
    assert await async_redis.xlen(f"{redis_prefix}:log") == 1
    assert await async_redis.pttl(f"{redis_prefix}:key:forever") > 0


async def test_unkeyed_events_store_no_keys(
    make_broker: BrokerFactory,
    redis_url: str,
    redis_prefix: str,
    async_redis: redis.asyncio.Redis,
    client: httpx.AsyncClient,
) -> None:
    broker = await make_broker(redis_url=redis_url, redis_prefix=redis_prefix)
    await publish(client, broker.url, "x", "one")
    ids_of(await post(client, broker.url, json=[{"topic": "x", "data": "two"}] * 2))
    assert [key async for key in async_redis.scan_iter(match=f"{redis_prefix}:key:*")] == []


async def test_a_publish_refused_while_redis_is_down_stores_no_key(
    make_broker: BrokerFactory, redis_server: RedisServer, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(redis_url=redis_server.url, redis_prefix="idem")
    event = {"topic": "t", "data": "x"}
    (before,) = ids_of(await post(client, broker.url, "before", json=event))
    redis_server.stop(keep_data=True)
    await wait_for(lambda: not broker.state.backend.ready())
    for body in (event, [event, event]):
        response = await post(client, broker.url, "during", json=body)
        error_body(response, 503, "unavailable")
        assert response.headers["Retry-After"] == "1"
    redis_server.start()
    await wait_for(broker.state.backend.ready)
    with redis_server.client() as raw:
        assert raw.exists("idem:key:during", "idem:key:during#0", "idem:key:during#1") == 0
        assert raw.get("idem:key:before") == before.encode()
    async with subscribed(client, broker.url, "t") as events:
        (during,) = ids_of(await post(client, broker.url, "during", json=event))
        assert ids_of(await post(client, broker.url, "before", json=event)) == [before]
        assert await delivered(client, broker.url, events, "t") == [(during, "x")]
    with redis_server.client() as raw:
        assert raw.xlen("idem:log") == 3  # before, during and the marker


# --- RecentKeys ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def recent(ttl: float = 10.0, limit: int = 100) -> tuple[RecentKeys, Clock]:
    clock = Clock()
    return RecentKeys(ttl, limit=limit, clock=clock), clock


def test_recent_keys_answer_until_their_ttl_has_passed() -> None:
    keys, clock = recent(ttl=10.0)
    assert keys.get("a") is None
    keys.put("a", "1-0")
    clock.now += 9.999
    assert keys.get("a") == "1-0"
    clock.now += 0.001
    assert keys.get("a") is None
    assert len(keys) == 0, "an expired key found by get is dropped"


def test_recent_keys_evict_the_oldest_past_the_limit() -> None:
    keys, clock = recent(limit=3)
    for n in range(5):
        keys.put(f"k{n}", f"{n}-0")
        clock.now += 1
    assert len(keys) == 3
    assert [keys.get(f"k{n}") for n in range(5)] == [None, None, "2-0", "3-0", "4-0"]


def test_recent_keys_trim_drops_exactly_the_expired_ones() -> None:
    keys, clock = recent(ttl=10.0)
    for n in range(4):
        keys.put(f"k{n}", f"{n}-0")
        clock.now += 2
    # Put at 1000, 1002, 1004 and 1006, so they expire at 1010, 1012, 1014 and 1016.
    clock.now = 1012.0
    keys.trim()
    assert len(keys) == 2
    assert [keys.get(f"k{n}") for n in range(4)] == [None, None, "2-0", "3-0"]
    clock.now = 1016.0
    keys.trim()
    assert len(keys) == 0


def test_recent_keys_put_again_renews_the_key_and_its_place() -> None:
    keys, clock = recent(ttl=10.0, limit=2)
    keys.put("a", "1-0")
    clock.now += 5
    keys.put("b", "2-0")
    keys.put("a", "3-0")
    clock.now += 6
    keys.trim()
    assert keys.get("a") == "3-0", "renewed at +5, so alive at +11"
    keys.put("c", "4-0")
    assert keys.get("b") is None, "the oldest in order of last put goes first"
    assert keys.get("a") == "3-0"


def test_recent_keys_trim_of_an_empty_set_does_nothing() -> None:
    keys, _ = recent()
    keys.trim()
    assert len(keys) == 0


# --- keys, rates and counters together -----------------------------------------------------


async def test_retries_are_not_counted_as_published(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await start_broker()
    event = {"topic": "t", "data": "x"}
    for _ in range(3):
        await post(client, broker.url, "once", json=event)
    assert broker.state.stats.published == 1
    metrics = (await client.get(f"{broker.url}/metrics")).text
    assert "sse_broker_events_published_total 1.0" in metrics


async def test_a_retried_stream_under_a_rate_limit_pays_only_for_new_events(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """A retry re-sends what was published; if it paid for those events again, a stream
    longer than the burst could never get through."""
    broker = await start_broker(publish_rate=2, publish_burst=3)
    lines = b"".join(b'{"topic": "t", "data": %d}\n' % n for n in range(5))
    headers = {"Content-Type": "application/x-ndjson", KEY: "stream"}
    first = await client.post(f"{broker.url}/publish", content=lines, headers=headers)
    assert first.status_code == 429, first.text
    published = first.json()["ids"]
    assert len(published) == 3
    # Charged 5 events each time, the retry would exceed the burst of 3 forever; charged
    # only for the 2 new ones, it passes once the bucket holds 2 again.
    for _ in range(10):
        await asyncio.sleep(int(first.headers["Retry-After"]))
        retry = await client.post(f"{broker.url}/publish", content=lines, headers=headers)
        if retry.status_code == 200:
            break
        assert retry.status_code == 429, retry.text
    else:
        raise AssertionError("the retried stream never got through")
    assert retry.json()["ids"][:3] == published
    assert broker.state.stats.published == 5


async def test_idempotency_keys_are_scoped_per_token_subject(
    start_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """Another publisher re-using a key must neither suppress the first one's event nor
    learn its id."""
    broker = await start_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False)
    event = {"topic": "t", "data": "x", "key": "order-123"}
    alice = {"Authorization": f"Bearer {mint(publish=['t'], sub='alice')}"}
    mallory = {"Authorization": f"Bearer {mint(publish=['t'], sub='mallory')}"}
    first = ids_of(await client.post(f"{broker.url}/publish", json=event, headers=mallory))
    second = ids_of(await client.post(f"{broker.url}/publish", json=event, headers=alice))
    assert first != second
    again = ids_of(await client.post(f"{broker.url}/publish", json=event, headers=alice))
    assert again == second

"""``GET /events`` end to end: headers, first bytes, wire format, patterns, replay,
heartbeats, disconnects and shutdown, over real sockets on 127.0.0.1.

Where the wire format is the point, events are read with httpx-sse, a parser we did not
write. Where a test must see raw bytes or decide when (and whether) to read, it uses
``RawStream`` (tests/conftest.py), a plain socket with a minimal chunked-body and SSE block
reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator

import httpx
import orjson
from httpx_sse import ServerSentEvent, aconnect_sse

from broker.subscriber import CloseReason, Subscriber
from tests.conftest import (
    PREAMBLE,
    Broker,
    BrokerFactory,
    events_of,
    open_raw,
    publish,
    wait_for,
)


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value}."""
    response = await client.get(f"{url}/metrics")
    assert response.status_code == 200
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def subscribers(broker: Broker) -> list[Subscriber]:
    """The hub's live subscribers; the hub keeps them private, tests look anyway."""
    return list(broker.state.hub._subscribers)


async def take(
    events: AsyncIterator[ServerSentEvent], count: int, within: float = 10.0
) -> list[ServerSentEvent]:
    return [await asyncio.wait_for(anext(events), within) for _ in range(count)]


async def deliveries(
    broker: Broker,
    client: httpx.AsyncClient,
    patterns: list[str],
    published: list[str | list[str]],
    sentinel: str,
) -> list[str]:
    """Subscribe to ``patterns``, publish one event per entry of ``published`` (its data
    names its topics), then one to ``sentinel``; return the data received before it."""
    params = [("topic", pattern) for pattern in patterns]
    async with aconnect_sse(client, "GET", f"{broker.url}/events", params=params) as source:
        events = events_of(source)
        for topics in published:
            label = topics if isinstance(topics, str) else "|".join(topics)
            await publish(client, broker.url, topics, label)
        await publish(client, broker.url, sentinel, "sentinel")
        received: list[str] = []
        while True:
            [event] = await take(events, 1)
            if event.data == "sentinel":
                return received
            received.append(event.data)


async def publish_numbered(client: httpx.AsyncClient, url: str, topics: list[str]) -> list[str]:
    """Publish event ``n`` (data ``str(n)``, counting from 1) to ``topics[n - 1]``."""
    return [
        await publish(client, url, topic, str(number))
        for number, topic in enumerate(topics, start=1)
    ]


def stream_url(broker: Broker) -> str:
    return f"{broker.url}/events"


# --- headers and first bytes ------------------------------------------------------------


async def test_headers_and_opening_bytes_arrive_before_any_event_is_published(
    broker: Broker,
) -> None:
    """``EventSource.onopen`` fires on the first bytes, so they must not wait for an event."""
    with await open_raw(broker, "topic=quiet") as stream:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        assert bytes(stream.body.data) == PREAMBLE
        assert stream.frames[0].fields == [("retry", "2000")]
        assert stream.frames[0].comments == [" ok"]
        assert broker.state.stats.published == 0


async def test_opening_retry_field_follows_the_retry_setting(make_broker: BrokerFactory) -> None:
    broker = await make_broker(retry=500)
    with await open_raw(broker, "topic=quiet") as stream:
        pass
    assert bytes(stream.body.data) == b"retry: 500\n: ok\n\n"


async def test_http_1_0_client_gets_plain_frames_and_the_end_is_the_connection_closing(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """No chunked encoding before HTTP/1.1: the same frames, unwrapped."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.server.port)
    try:
        writer.write(b"GET /events?topic=old HTTP/1.0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.0 200")
        assert b"transfer-encoding" not in head.lower()
        assert await asyncio.wait_for(reader.readexactly(len(PREAMBLE)), 10) == PREAMBLE
        event_id = await publish(client, broker.url, "old", "one\ntwo")
        frame = f"id: {event_id}\ndata: one\ndata: two\n\n".encode()
        assert await asyncio.wait_for(reader.readexactly(len(frame)), 10) == frame
        broker.state.hub.close_all(CloseReason.SHUTDOWN)
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
    await wait_for(lambda: broker.state.stats.disconnects[CloseReason.SHUTDOWN] == 1)


async def test_event_published_as_soon_as_headers_arrive_is_never_missed(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """The subscription is in the hub before the headers leave, so a publish triggered by
    ``onopen`` cannot slip in between."""
    for attempt in range(50):
        topic = f"race/{attempt % 5}"
        params = {"topic": topic}
        async with aconnect_sse(client, "GET", stream_url(broker), params=params) as source:
            event_id = await publish(client, broker.url, topic, f"attempt {attempt}")
            [received] = await take(events_of(source), 1)
        assert (received.id, received.data) == (event_id, f"attempt {attempt}")


# --- wire format ------------------------------------------------------------------------

TEXTS = [
    "line one\nline two",
    "carriage\rreturn",
    "crlf\r\nline",
    "mixed\n\r\r\n\nendings",
    "\n\nleading empty lines",
    "trailing newline\n",
    "trailing crlf\r\n",
    "\n",
    "",
    " leading space kept",
    "  two leading spaces",
    "data: looks like a field\nid: 99\nevent: nope\nretry: 1",
    ":not a comment\n: nor this",
    "emoji 🎉 family 👩\u200d👩\u200d👧 flag 🇯🇵",
    "中文字符 日本語のテキスト 한국어",
    "combining: e\u0301 a\u0308 \u1e9b\u0323 ñ",
    "U+2028\u2028U+2029\u2029NEL\x85VT\x0bFF\x0c are not SSE line breaks",
    "nul\x00inside",
    "tab\tseparated",
    "x" * 20_000,
]


async def test_multiline_and_unicode_data_round_trip_through_httpx_sse(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """SSE has no way to carry a CR: a parser joins ``data:`` lines with LF. So CR and
    CRLF arrive as LF, and everything else (empty lines, a trailing line break, a
    leading space, characters other parsers treat as line breaks) arrives exactly."""
    async with aconnect_sse(client, "GET", stream_url(broker), params={"topic": "text"}) as source:
        events = events_of(source)
        ids = [await publish(client, broker.url, "text", text) for text in TEXTS]
        received = await take(events, len(TEXTS))
    assert [event.id for event in received] == ids
    for sent, event in zip(TEXTS, received, strict=True):
        assert event.event == "message"
        assert event.data == sent.replace("\r\n", "\n").replace("\r", "\n")
        if "\r" not in sent:
            assert event.data == sent


async def test_each_line_of_data_is_its_own_data_field_on_the_wire(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    with await open_raw(broker, "topic=wire") as stream:
        event_id = await publish(client, broker.url, "wire", "one\r\ntwo\rthree\n\nfour\n")
        await stream.read_until(lambda: bool(stream.events()))
        [frame] = stream.events()
    assert frame.fields == [
        ("id", event_id),
        ("data", "one"),
        ("data", "two"),
        ("data", "three"),
        ("data", ""),
        ("data", "four"),
        ("data", ""),
    ]


async def test_event_type_and_json_data_round_trip(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    payload = {"text": "héllo\nwörld 🎉", "numbers": [1, 2.5], "nested": {"ok": True}}
    async with aconnect_sse(client, "GET", stream_url(broker), params={"topic": "json"}) as source:
        await publish(client, broker.url, "json", payload, event="greeting")
        [received] = await take(events_of(source), 1)
    assert received.event == "greeting"
    assert orjson.loads(received.data) == payload


# --- topics and patterns ----------------------------------------------------------------


async def test_single_star_matches_exactly_one_segment(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    published: list[str | list[str]] = ["a", "a/b", "a/b/c", "b/a", "ab/c", "a/c", "x/a/b"]
    assert await deliveries(broker, client, ["a/*"], published, "a/end") == ["a/b", "a/c"]


async def test_single_star_in_the_middle_matches_one_segment(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    published: list[str | list[str]] = ["a/b/c", "a/b/d", "a/c", "a/b/c/d", "a/x/c", "b/b/c"]
    received = await deliveries(broker, client, ["a/*/c"], published, "a/s/c")
    assert received == ["a/b/c", "a/x/c"]


async def test_double_star_as_last_segment_matches_one_or_more_segments(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    published: list[str | list[str]] = ["a", "a/b", "a/b/c/d", "b/a/c", "ab/c", "aa"]
    received = await deliveries(broker, client, ["a/**"], published, "a/end")
    assert received == ["a/b", "a/b/c/d"]


async def test_lone_double_star_matches_every_topic(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    published: list[str | list[str]] = ["x", "x/y/z"]
    assert await deliveries(broker, client, ["**"], published, "end") == ["x", "x/y/z"]


async def test_star_inside_a_segment_is_an_ordinary_character(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    published: list[str | list[str]] = ["a/bc", "a/b*", "a/b"]
    assert await deliveries(broker, client, ["a/b*"], published, "a/b*") == ["a/b*"]


async def test_overlapping_patterns_on_one_connection_deliver_an_event_once(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    patterns = ["a/b", "a/*", "a/**", "*/b", "**"]
    published: list[str | list[str]] = ["a/b", ["a/b", "a/c", "z"], "q", ["z", "y/b"]]
    received = await deliveries(broker, client, patterns, published, "end")
    assert received == ["a/b", "a/b|a/c|z", "q", "z|y/b"]


async def test_fifty_topics_on_one_connection(broker: Broker, client: httpx.AsyncClient) -> None:
    patterns = [f"many/{n}" for n in range(50)]
    published: list[str | list[str]] = ["many", "many/50", *patterns, "many/0/x"]
    received = await deliveries(broker, client, patterns, published, "many/7")
    assert received == patterns


# --- replay -----------------------------------------------------------------------------

# Event n (data str(n)) goes to REPLAY_TOPICS[n - 1].
REPLAY_TOPICS = ["r/a", "r/b", "other", "r/a", "r/b", "r/a"]


async def resume(
    broker: Broker,
    client: httpx.AsyncClient,
    topics: list[str],
    *,
    header: str | None = None,
    query: str | None = None,
    live_topic: str,
) -> tuple[list[ServerSentEvent], str]:
    """Resume, then publish one live event to ``live_topic``; return everything received
    up to and including it, and its id."""
    params = [("topic", topic) for topic in topics]
    if query is not None:
        params.append(("lastEventID", query))
    headers = {} if header is None else {"Last-Event-ID": header}
    async with aconnect_sse(
        client, "GET", stream_url(broker), params=params, headers=headers
    ) as source:
        events = events_of(source)
        live_id = await publish(client, broker.url, live_topic, "live")
        received: list[ServerSentEvent] = []
        while not received or received[-1].id != live_id:
            received += await take(events, 1)
    return received, live_id


def numbers(events: list[ServerSentEvent]) -> list[str]:
    return [event.data for event in events]


async def test_resume_with_last_event_id_header_replays_its_topics_in_order_then_live(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    ids = await publish_numbered(client, broker.url, REPLAY_TOPICS)
    received, live_id = await resume(broker, client, ["r/a"], header=ids[0], live_topic="r/a")
    assert [(e.id, e.data) for e in received] == [(ids[3], "4"), (ids[5], "6"), (live_id, "live")]
    assert broker.state.stats.replayed == 2


async def test_resume_with_last_event_id_query_parameter(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    ids = await publish_numbered(client, broker.url, REPLAY_TOPICS)
    received, _ = await resume(broker, client, ["r/b"], query=ids[0], live_topic="r/b")
    assert numbers(received) == ["2", "5", "live"]


async def test_last_event_id_header_wins_over_query_parameter(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    ids = await publish_numbered(client, broker.url, REPLAY_TOPICS)
    received, _ = await resume(
        broker, client, ["r/a"], header=ids[3], query=ids[0], live_topic="r/a"
    )
    assert numbers(received) == ["6", "live"]


async def test_resume_with_a_pattern_replays_every_matching_topic(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    ids = await publish_numbered(client, broker.url, REPLAY_TOPICS)
    received, _ = await resume(broker, client, ["r/*"], header=ids[1], live_topic="r/z")
    assert numbers(received) == ["4", "5", "6", "live"]


async def test_unknown_id_gets_a_missed_notice_then_all_retained_matching_events(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    await publish_numbered(client, broker.url, REPLAY_TOPICS)
    received, _ = await resume(broker, client, ["r/a"], header="1-0", live_topic="r/a")
    missed, *rest = received
    assert (missed.event, missed.id) == ("broker.missed", "")
    assert orjson.loads(missed.data) == {"lastEventId": "1-0"}
    assert numbers(rest) == ["1", "4", "6", "live"]
    assert all(event.event == "message" for event in rest)


async def test_missed_notice_carries_no_id_field_on_the_wire(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """Without an ``id:`` the browser's resume point stays where it was."""
    ids = await publish_numbered(client, broker.url, ["w", "w"])
    with await open_raw(broker, "topic=w", headers={"Last-Event-ID": "no-such-id"}) as stream:
        await stream.read_until(lambda: len(stream.events()) == 3)
    notice, first, second = stream.events()
    assert notice.fields == [
        ("event", "broker.missed"),
        ("data", '{"lastEventId":"no-such-id"}'),
    ]
    assert (first.id, second.id) == (ids[0], ids[1])


async def test_ids_that_fell_out_of_a_small_history_are_missed(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(history_size=3)
    ids = await publish_numbered(client, broker.url, ["h"] * 6)
    received, _ = await resume(broker, client, ["h"], header=ids[3], live_topic="h")
    assert [(e.event, e.data) for e in received] == [
        ("message", "5"),
        ("message", "6"),
        ("message", "live"),
    ]
    received, _ = await resume(broker, client, ["h"], header=ids[2], live_topic="h")
    assert received[0].event == "broker.missed"
    assert numbers(received[1:]) == ["5", "6", "live", "live"]


async def test_expired_history_is_missed(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(history_ttl=0.3)
    ids = await publish_numbered(client, broker.url, ["t"] * 3)
    await asyncio.sleep(0.6)
    received, _ = await resume(broker, client, ["t"], header=ids[0], live_topic="t")
    assert [event.event for event in received] == ["broker.missed", "message"]
    assert numbers(received[1:]) == ["live"]


async def test_empty_last_event_id_is_a_fresh_subscription_not_a_missed_replay(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """Regression: an empty header or query value was taken as an unknown id, so a fresh
    subscriber got a ``broker.missed`` notice and the whole history."""
    await publish_numbered(client, broker.url, ["e"] * 3)
    for options in ({"header": ""}, {"query": ""}, {"header": "", "query": ""}):
        received, live_id = await resume(broker, client, ["e"], live_topic="e", **options)
        assert [(e.event, e.id) for e in received] == [("message", live_id)], options


async def test_resume_with_newest_id_replays_nothing_and_sends_no_notice(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    ids = await publish_numbered(client, broker.url, ["n"] * 3)
    received, live_id = await resume(broker, client, ["n"], header=ids[-1], live_topic="n")
    assert [(e.event, e.id, e.data) for e in received] == [("message", live_id, "live")]


async def test_resume_with_newest_id_after_it_expired_sends_no_notice(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """Nothing came after the newest event, so nothing was missed even once it expired."""
    broker = await make_broker(history_ttl=0.3)
    ids = await publish_numbered(client, broker.url, ["n"] * 3)
    await asyncio.sleep(0.6)
    received, live_id = await resume(broker, client, ["n"], header=ids[-1], live_topic="n")
    assert [(e.event, e.id) for e in received] == [("message", live_id)]


async def test_replay_seam_no_gap_no_duplicate_when_publish_races_reconnect(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """A subscriber keeps dropping its connection and resuming from its last id while a
    publisher never stops; together its connections must see 1..N exactly once, in order.

    The publisher stays at most ``ahead`` events in front of the subscriber, so every
    reconnect overlaps publishing; half the resumes use the header, half the query.
    (Events queued while a replay waits for a slow socket are pinned in
    test_subscriber.py, where the socket's pace is under control.)
    """
    total, ahead, pad = 2000, 300, "p" * 200
    rng = random.Random(2)
    received: list[int] = []
    progress = asyncio.Event()

    async def publisher() -> None:
        number = 0
        while number < total:
            while number - len(received) > ahead:
                progress.clear()
                await progress.wait()
            batch: list[dict[str, str]] = []
            for _ in range(rng.randint(1, 6)):
                if number < total:
                    number += 1
                    batch.append({"topic": "seam", "data": f"{number}:{pad}"})
                if rng.random() < 0.3:
                    batch.append({"topic": "seam/other", "data": "noise"})
            response = await client.post(f"{broker.url}/publish", json=batch)
            assert response.status_code == 200, response.text

    publishing: asyncio.Task[None] | None = None
    last_id: str | None = None
    reconnects_while_publishing = 0
    try:
        while not received or received[-1] < total:
            params = [("topic", "seam")]
            headers: dict[str, str] = {}
            if last_id is not None and rng.random() < 0.5:
                headers["Last-Event-ID"] = last_id
            elif last_id is not None:
                params.append(("lastEventID", last_id))
            to_read = rng.randint(1, 100)
            async with aconnect_sse(
                client, "GET", stream_url(broker), params=params, headers=headers
            ) as source:
                if publishing is None:
                    publishing = asyncio.create_task(publisher())
                events = events_of(source)
                while to_read and (not received or received[-1] < total):
                    [event] = await take(events, 1)
                    assert event.event == "message", event
                    received.append(int(event.data.partition(":")[0]))
                    progress.set()
                    last_id = event.id
                    to_read -= 1
            if not publishing.done():
                reconnects_while_publishing += 1
        assert publishing is not None
        await publishing
    finally:
        if publishing is not None and not publishing.done():
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
    assert received == list(range(1, total + 1))
    assert reconnects_while_publishing >= 20


# --- heartbeats -------------------------------------------------------------------------


async def test_idle_stream_receives_heartbeat_comments(make_broker: BrokerFactory) -> None:
    broker = await make_broker(heartbeat=0.2)
    with await open_raw(broker, "topic=idle") as stream:
        await stream.read_until(lambda: len(stream.comment_blocks()) >= 3, within=10)
    assert all(block.comments == [""] for block in stream.comment_blocks())
    assert bytes(stream.body.data).startswith(PREAMBLE + b":\n\n")
    assert not stream.events()


async def test_heartbeats_are_invisible_to_an_event_parser(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(heartbeat=0.05)
    async with aconnect_sse(client, "GET", stream_url(broker), params={"topic": "hb"}) as source:
        await asyncio.sleep(0.3)
        event_id = await publish(client, broker.url, "hb", "after heartbeats")
        [received] = await take(events_of(source), 1)
    assert (received.id, received.data) == (event_id, "after heartbeats")


# --- disconnects ------------------------------------------------------------------------


async def test_client_that_goes_away_is_removed_promptly(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    hub = broker.state.hub
    params = [("topic", "d/a"), ("topic", "d/*"), ("topic", "d/**"), ("topic", "*/x")]
    async with aconnect_sse(client, "GET", stream_url(broker), params=params):
        assert hub.connection_count == 1
        assert hub.index_size > 0
    await wait_for(lambda: hub.connection_count == 0)
    assert hub.index_size == 0
    metrics = await scrape(client, broker.url)
    assert metrics["sse_broker_connections"] == 0
    assert metrics['sse_broker_disconnects_total{reason="client"}'] == 1


async def test_reset_connection_is_removed_and_later_events_still_flow(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    hub = broker.state.hub
    gone = await open_raw(broker, "topic=shared")
    gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    gone.close()  # linger 0: the peer sees a reset, not a FIN
    await wait_for(lambda: hub.connection_count == 0)
    async with aconnect_sse(
        client, "GET", stream_url(broker), params={"topic": "shared"}
    ) as source:
        event_id = await publish(client, broker.url, "shared", "still flowing")
        [received] = await take(events_of(source), 1)
    assert received.id == event_id
    await wait_for(lambda: broker.state.stats.disconnects[CloseReason.CLIENT] == 2)


async def test_ten_thousand_connect_disconnect_cycles_leak_nothing(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """Every way of leaving (FIN, reset), with exact topics, patterns and unique topics,
    while events keep flowing: afterwards nothing of any subscriber remains."""
    cycles, concurrency = 10_000, 50
    port = broker.server.port
    numbers_left = iter(range(cycles))

    def query(n: int) -> str:
        return [
            f"topic=leak/unique/{n}",
            "topic=leak/*&topic=leak/**",
            f"topic=leak/shared&topic=leak/{n}/*&topic=u/{n}/**",
            "topic=leak/shared",
            f"topic=*/{n}&topic=leak/*/x&topic=**",
        ][n % 5]

    async def cycle() -> None:
        for n in numbers_left:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /events?{query(n)} HTTP/1.1\r\nHost: broker\r\n\r\n".encode())
            await asyncio.wait_for(reader.readuntil(b": ok\n\n"), 10)
            if n % 2:
                writer.transport.abort()
            else:
                writer.close()
                await writer.wait_closed()

    stop = asyncio.Event()

    async def keep_publishing() -> None:
        while not stop.is_set():
            await publish(client, broker.url, ["leak/shared", "leak/a/x"], "noise")
            await asyncio.sleep(0.005)

    publisher = asyncio.create_task(keep_publishing())
    try:
        await asyncio.gather(*(cycle() for _ in range(concurrency)))
    finally:
        stop.set()
        await publisher
    hub = broker.state.hub
    await wait_for(lambda: hub.connection_count == 0, seconds=30)
    assert hub.index_size == 0
    metrics = await scrape(client, broker.url)
    assert metrics["sse_broker_connections"] == 0
    assert metrics['sse_broker_disconnects_total{reason="client"}'] == cycles
    assert metrics['sse_broker_disconnects_total{reason="error"}'] == 0


# --- shutdown ---------------------------------------------------------------------------


async def test_closing_the_server_ends_every_stream_cleanly(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """Each stream ends with the chunked terminator and a FIN, never a reset, so an
    EventSource reconnects (to another node, behind a balancer) instead of erroring."""
    parsed: list[str] = []
    opened = asyncio.Event()

    async def read_with_httpx_sse() -> None:
        async with aconnect_sse(client, "GET", stream_url(broker), params={"topic": "s/0"}) as src:
            opened.set()
            async for event in events_of(src):  # ends without error only on a clean end
                parsed.append(event.data)

    with contextlib.ExitStack() as cleanup:
        raws = [cleanup.enter_context(await open_raw(broker, f"topic=s/{n}")) for n in range(3)]
        reader = asyncio.create_task(read_with_httpx_sse())
        cleanup.callback(reader.cancel)
        await opened.wait()
        await publish(client, broker.url, "s/0", "before shutdown")
        await raws[0].read_until(lambda: len(raws[0].events()) == 1)
        await wait_for(lambda: parsed == ["before shutdown"])

        await broker.server.close()

        await asyncio.wait_for(reader, 10)
        for raw in raws:
            await raw.read_to_end()
            assert raw.body.complete
            assert not raw.reset
    assert broker.state.hub.connection_count == 0
    assert broker.state.stats.disconnects[CloseReason.SHUTDOWN] == 4
    assert broker.state.stats.disconnects[CloseReason.CLIENT] == 0


async def test_close_all_ends_open_streams_and_new_ones_still_work(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    with await open_raw(broker, "topic=c") as stream:
        broker.state.hub.close_all(CloseReason.SHUTDOWN)
        await stream.read_until(lambda: stream.body.complete)
    await wait_for(lambda: broker.state.stats.disconnects[CloseReason.SHUTDOWN] == 1)
    async with aconnect_sse(client, "GET", stream_url(broker), params={"topic": "c"}) as source:
        event_id = await publish(client, broker.url, "c", "after")
        [received] = await take(events_of(source), 1)
    assert received.id == event_id


async def test_a_last_event_id_that_is_not_utf8_is_refused(broker: Broker) -> None:
    """Header bytes that are not UTF-8 reach the handler as lone surrogates; answering
    ``broker.missed`` would have to quote them back, which cannot be encoded."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.server.port)
    writer.write(
        b"GET /events?topic=x HTTP/1.1\r\nHost: t\r\nLast-Event-ID: \xff\xfe\r\n"
        b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert orjson.loads(body)["error"] == "invalid_subscription"

"""Publishing over Redis without HTTP: the ``<prefix>_publish`` Redis Function, and plain
``PUBLISH`` on ``<prefix>:topic:<topic>`` channels, against a real Redis.

The function must accept exactly what ``make_draft`` accepts and store exactly what the
HTTP path stores; a property test holds the two side by side. Channel messages are
live-only events: delivered to the topic's subscribers, with no id, never replayed.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import orjson
import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from broker.backends.redis import LIVE_ONLY_SEQ, RedisBackend, stored_fields, stream_seq
from broker.backends.redis_functions import (
    library_name,
    library_source,
    publish_function_name,
)
from broker.config import Overflow
from broker.errors import ClientError
from broker.event import MAX_RETRY_MS, Event, EventLimits, make_draft
from broker.metrics import Stats
from broker.subscriber import Subscriber
from broker.topics import Selector, in_hub_namespace
from tests.conftest import BrokerFactory, RawStream, RedisServer, publish, wait_for

SMALL = EventLimits(max_topics=3, max_event_bytes=200)


def load_small_library(client: redis.Redis, prefix: str) -> None:
    client.function_load(
        library_source(
            prefix,
            max_events=1000,
            max_topics=SMALL.max_topics,
            max_event_bytes=SMALL.max_event_bytes,
        ),
        replace=True,
    )


def fcall(client: redis.Redis, prefix: str, *args: str | bytes) -> str:
    result: Any = client.fcall(publish_function_name(prefix), 0, *args)
    return str(result.decode("ascii"))


def entries(client: redis.Redis, prefix: str) -> list[tuple[str, dict[bytes, bytes]]]:
    result: Any = client.xrange(f"{prefix}:log")
    return [(entry_id.decode(), fields) for entry_id, fields in result]


def as_bytes(fields: dict[Any, Any]) -> dict[bytes, bytes]:
    return {
        (k if isinstance(k, bytes) else str(k).encode()): (
            v if isinstance(v, bytes) else str(v).encode()
        )
        for k, v in fields.items()
    }


# --- the function against make_draft --------------------------------------------------

_TOPIC_TEXT = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\n"), max_size=12
) | st.sampled_from(["*", "**", "a/*", "a/**/b", "a*b", "x" * 1025, "é" * 1024, "ok/topic"])
_DATA = st.text(max_size=150) | st.sampled_from(["", "a\r\nb", "\r\r\n\n", "x" * 130])
_EVENT = (
    st.none()
    | st.text(min_size=1, max_size=10)
    | st.sampled_from(["broker.x", "broker", "a\nb", "a\x00", "é" * 256, "é" * 257])
)
_RETRY = st.none() | st.integers(-3, 3) | st.sampled_from([MAX_RETRY_MS, MAX_RETRY_MS + 1, 10**13])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    topics=st.lists(_TOPIC_TEXT, min_size=1, max_size=5),
    data=_DATA,
    event=_EVENT,
    retry=_RETRY,
)
def test_the_function_accepts_and_stores_exactly_what_the_http_path_does(
    sync_redis: redis.Redis,
    redis_prefix: str,
    topics: list[str],
    data: str,
    event: str | None,
    retry: int | None,
) -> None:
    # The hub's namespace is refused over HTTP only: whoever can call the function can
    # write the stream directly anyway.
    assume(not any(in_hub_namespace(topic) for topic in topics))
    load_small_library(sync_redis, redis_prefix)
    args = ["\n".join(topics), data, event or "", "" if retry is None else str(retry)]
    try:
        draft = make_draft(topics, data, event, retry, limits=SMALL)
    except ClientError as exc:
        refusal: str | None = exc.detail
    else:
        refusal = None
    if refusal is not None:
        with pytest.raises(ResponseError) as refused:
            fcall(sync_redis, redis_prefix, *args)
        assert refusal in str(refused.value)
        return
    event_id = fcall(sync_redis, redis_prefix, *args)
    stored = dict(entries(sync_redis, redis_prefix))[event_id]
    assert stored == as_bytes(stored_fields(draft))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "'topic' and 'data' are required"),
        (("t",), "'topic' and 'data' are required"),
        (("t", "d", "", "", "", "extra"), "expected <topic> <data> [event] [retry] [private]"),
        (("t", "d", "", "", "yes"), "'private' must be 1 (private), 0 or empty (public)"),
        (("", "d"), "topic must not be empty"),
        (("a\n\nb", "d"), "topic must not be empty"),
        (("a/*", "d"), "has a wildcard segment"),
        (("**", "d"), "has a wildcard segment"),
        (("a\tb", "d"), "must not contain control characters"),
        (("x" * 1025, "d"), "longer than 1024 characters"),
        ((b"\xff", "d"), "topic is not valid UTF-8"),
        ((b"\xed\xa0\x80", "d"), "topic is not valid UTF-8"),  # a surrogate
        (("a\nb\nc\nd", "d"), "at most 3 topics"),
        (("t", b"\xc0\x80"), "'data' is not valid UTF-8"),  # an overlong NUL
        (("t", b"\xf4\x90\x80\x80"), "'data' is not valid UTF-8"),  # past U+10FFFF
        (("t", b"ab\xe2\x82"), "'data' is not valid UTF-8"),  # cut short
        (("t", "d", "broker.x"), "are reserved"),
        (("t", "d", "a\rb"), "event must not contain CR, LF or NUL"),
        (("t", "d", "e" * 257), "longer than 256 characters"),
        (("t", "d", b"\x80"), "'event' is not valid UTF-8"),
        (("t", "d", "", "-1"), "'retry' must be an integer"),
        (("t", "d", "", "1.5"), "'retry' must be an integer"),
        (("t", "d", "", "2147483648"), "'retry' must be an integer"),
        (("t", "x" * 200), "too large: encoded event is 208 bytes; the limit is 200"),
        (("x" * 5000, "d"), "longer than 1024 characters"),  # refused without a scan
        (("t", "d", "e" * 2000), "longer than 256 characters"),
        (("t", b"\xff" * 300), "too large: encoded event is 308 bytes"),  # before UTF-8
    ],
)
def test_every_invalid_call_is_refused_with_a_clear_error_and_stores_nothing(
    sync_redis: redis.Redis, redis_prefix: str, args: tuple[str | bytes, ...], message: str
) -> None:
    load_small_library(sync_redis, redis_prefix)
    with pytest.raises(ResponseError, match=r"^(invalid event|too large): ") as refused:
        fcall(sync_redis, redis_prefix, *args)
    assert message in str(refused.value)
    assert entries(sync_redis, redis_prefix) == []


def test_keys_are_refused_since_the_function_writes_only_its_own_log(
    sync_redis: redis.Redis, redis_prefix: str
) -> None:
    load_small_library(sync_redis, redis_prefix)
    with pytest.raises(ResponseError, match="pass 0 keys"):
        sync_redis.fcall(publish_function_name(redis_prefix), 1, "somekey", "t", "d")


def test_an_event_exactly_at_the_size_limit_is_accepted_with_line_breaks_counted(
    sync_redis: redis.Redis, redis_prefix: str
) -> None:
    """Each line costs ``data: `` and a line feed, whatever break ended it."""
    load_small_library(sync_redis, redis_prefix)
    lines = "a\r\nb\rc\n"  # four lines: 4 * 7 + 3 characters, plus the final blank line
    body = 4 * 7 + 3 + 1
    filler = "x" * (SMALL.max_event_bytes - 64 - body)
    data = filler + lines
    make_draft("t", data, limits=SMALL)  # the HTTP path accepts it too
    fcall(sync_redis, redis_prefix, "t", data)
    with pytest.raises(ResponseError, match="too large"):
        fcall(sync_redis, redis_prefix, "t", data + "y")


def test_an_empty_event_or_retry_argument_means_none(
    sync_redis: redis.Redis, redis_prefix: str
) -> None:
    load_small_library(sync_redis, redis_prefix)
    event_id = fcall(sync_redis, redis_prefix, "t", "d", "", "0100")
    assert dict(entries(sync_redis, redis_prefix))[event_id] == {
        b"topics": b"t",
        b"data": b"d",
        b"retry": b"100",
    }


def test_the_log_is_capped_like_the_http_path_caps_it(
    sync_redis: redis.Redis, redis_prefix: str
) -> None:
    load_small_library(sync_redis, redis_prefix)  # MAXLEN ~ 1000
    with sync_redis.pipeline(transaction=False) as pipe:
        for n in range(3000):
            pipe.fcall(publish_function_name(redis_prefix), 0, "t", str(n))
        pipe.execute()
    length = sync_redis.xlen(f"{redis_prefix}:log")
    assert 1000 <= length < 3000


def test_libraries_of_two_prefixes_live_side_by_side(sync_redis: redis.Redis) -> None:
    prefixes = ["test_side_a", "test_side_b"]
    try:
        for prefix in prefixes:
            load_small_library(sync_redis, prefix)
        for prefix in prefixes:
            fcall(sync_redis, prefix, "t", prefix)
            assert [f[b"data"] for _, f in entries(sync_redis, prefix)] == [prefix.encode()]
    finally:
        for prefix in prefixes:
            sync_redis.delete(f"{prefix}:log")
            sync_redis.function_delete(library_name(prefix))


# --- the node loads it ----------------------------------------------------------------


def libraries(client: redis.Redis, prefix: str) -> list[Any]:
    found: Any = client.function_list(library=library_name(prefix))
    return [entry for entry in found if entry[1] == library_name(prefix).encode()]


async def test_nodes_load_the_library_idempotently_and_fcall_reaches_their_streams(
    make_broker: BrokerFactory,
    redis_url: str,
    redis_prefix: str,
    sync_redis: redis.Redis,
    client: httpx.AsyncClient,
) -> None:
    brokers = [await make_broker(redis_url=redis_url, redis_prefix=redis_prefix) for _ in range(2)]
    try:
        assert len(libraries(sync_redis, redis_prefix)) == 1
        streams = []
        for broker in brokers:
            port = broker.server.port
            assert port is not None
            streams.append(await RawStream.connect(port, "/events?topic=a&topic=b"))
        for stream in streams:
            await stream.read_until(lambda s=stream: bool(s.frames))  # type: ignore[misc]
        ids = [
            fcall(sync_redis, redis_prefix, "a", "one"),
            fcall(sync_redis, redis_prefix, "a\nb", "two\nlines", "kind", "500"),
            await publish(client, brokers[0].url, "b", "over http"),
        ]
        assert [entry_id for entry_id, _ in entries(sync_redis, redis_prefix)] == ids
        for stream in streams:
            await stream.read_until(lambda s=stream: len(s.events()) == 3)  # type: ignore[misc]
            assert [(f.id, f.event, f.last("retry"), f.data) for f in stream.events()] == [
                (ids[0], None, None, "one"),
                (ids[1], "kind", "500", "two\nlines"),
                (ids[2], None, None, "over http"),
            ]
            stream.close()
    finally:
        sync_redis.function_delete(library_name(redis_prefix))


async def test_a_redis_restarted_empty_gets_the_library_again(
    make_broker: BrokerFactory, redis_server: RedisServer
) -> None:
    broker = await make_broker(redis_url=redis_server.url)
    with redis_server.client() as sync:
        assert len(libraries(sync, "sse")) == 1
    redis_server.stop(keep_data=False)
    redis_server.start()
    with redis_server.client() as sync:
        assert libraries(sync, "sse") == []
    await wait_for(broker.state.backend.ready)
    with redis_server.client() as sync:
        await wait_for(lambda: len(libraries(sync, "sse")) == 1)
        event_id = fcall(sync, "sse", "t", "after the restart")
        assert [entry_id for entry_id, _ in entries(sync, "sse")] == [event_id]


# --- PUBLISH on channels: live-only events --------------------------------------------


async def connect(broker_port: int | None, query: str) -> RawStream:
    assert broker_port is not None
    stream = await RawStream.connect(broker_port, f"/events?{query}")
    await stream.read_until(lambda: bool(stream.frames))
    return stream


async def channels_ready(client: redis.asyncio.Redis, prefix: str, port: int | None) -> None:
    """Wait until the node at ``port`` delivers what is PUBLISHed on its channels.

    Redis counts a subscription (``PUBSUB NUMPAT``) a moment before redis-py reads
    messages on it, and a message in that window is lost; so probe until one arrives.
    """
    probe = await connect(port, "topic=probe")
    try:
        for _ in range(200):
            await client.publish(f"{prefix}:topic:probe", "probe")
            try:
                await probe.receive(within=0.1)
            except TimeoutError:
                continue
            if probe.events():
                return
        raise AssertionError("the node never delivered a channel message")
    finally:
        probe.close()


async def test_published_payloads_become_live_events_without_ids(
    make_broker: BrokerFactory,
    redis_url: str,
    redis_prefix: str,
    async_redis: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = await make_broker(redis_url=redis_url, redis_prefix=redis_prefix)
    await channels_ready(async_redis, redis_prefix, broker.server.port)
    stream = await connect(broker.server.port, "topic=room/*")
    channel = f"{redis_prefix}:topic:room/1"
    caplog.set_level(logging.WARNING, logger="broker.backends.redis")
    messages: list[str | bytes] = [
        "plain text",
        orjson.dumps({"data": {"n": 1}, "event": "tick", "retry": 50, "topic": "elsewhere"}),
        orjson.dumps({"no": "data key"}),  # not an event object: raw data
        "{not json",
        orjson.dumps({"data": "x", "event": "broker.fake"}),  # refused
        b"\xff",  # refused: not UTF-8
    ]
    for message in messages:
        await async_redis.publish(channel, message)
    await async_redis.publish(f"{redis_prefix}:topic:room/*", "a wildcard topic: refused")
    await async_redis.publish(f"{redis_prefix}:topic:room/2", "last")
    await stream.read_until(lambda: len(stream.events()) == 5)
    assert [(f.id, f.event, f.last("retry"), f.data) for f in stream.events()] == [
        (None, None, None, "plain text"),
        (None, "tick", "50", '{"n":1}'),
        (None, None, None, '{"no":"data key"}'),
        (None, None, None, "{not json"),
        (None, None, None, "last"),
    ]
    refusals = [r.getMessage() for r in caplog.records if "ignoring a message" in r.getMessage()]
    assert len(refusals) == 3
    assert "reserved" in refusals[0]
    assert "not valid UTF-8" in refusals[1]
    assert "wildcard" in refusals[2]
    assert broker.state.backend.history_size() == 0  # nothing entered the log
    stream.close()


async def test_a_live_only_event_is_delivered_once_to_a_subscriber_with_overlapping_patterns(
    make_broker: BrokerFactory,
    redis_url: str,
    redis_prefix: str,
    async_redis: redis.asyncio.Redis,
) -> None:
    broker = await make_broker(redis_url=redis_url, redis_prefix=redis_prefix)
    await channels_ready(async_redis, redis_prefix, broker.server.port)
    stream = await connect(broker.server.port, "topic=a/b&topic=a/*&topic=a/**")
    await async_redis.publish(f"{redis_prefix}:topic:a/b", "once")
    await async_redis.publish(f"{redis_prefix}:topic:a/c", "marker")
    await stream.read_until(lambda: any(f.data == "marker" for f in stream.events()))
    assert [f.data for f in stream.events()] == ["once", "marker"]
    stream.close()


async def test_the_channel_subscription_comes_back_after_redis_does(
    make_broker: BrokerFactory, redis_server: RedisServer
) -> None:
    broker = await make_broker(redis_url=redis_server.url, heartbeat=0.2)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await channels_ready(client, "sse", broker.server.port)
        stream = await connect(broker.server.port, "topic=t")
        await client.publish("sse:topic:t", "before")
        await stream.read_until(lambda: len(stream.events()) == 1)
        await client.aclose()
        redis_server.stop(keep_data=True)
        redis_server.start()
        client = redis.asyncio.Redis.from_url(redis_server.url)
        await channels_ready(client, "sse", broker.server.port)
        await client.publish("sse:topic:t", "after")
        await stream.read_until(lambda: len(stream.events()) == 2)
        assert [f.data for f in stream.events()] == ["before", "after"]
        assert not stream.eof
        stream.close()
    finally:
        await client.aclose()


def test_a_live_only_event_queued_between_covered_ones_survives_the_replay_seam() -> None:
    """``skip_through`` used to drop covered events from the head of the queue only: a
    live-only event (positioned past every log position) ahead of covered ones stopped it,
    and they were sent twice."""
    subscriber = Subscriber(
        Selector(["t"]),
        max_events=100,
        max_bytes=1 << 20,
        overflow=Overflow.DROP_OLDEST,
        stats=Stats(),
        on_lost=lambda _: None,
    )
    draft = make_draft("t", "x", limits=SMALL)
    live = Event(LIVE_ONLY_SEQ, "", draft.topics, draft.body, draft.body, 0.0)
    logged = [Event.build(stream_seq((5, n)), f"5-{n}", draft, 0.0) for n in range(3)]
    for event in (logged[0], live, logged[1], logged[2]):
        subscriber.offer(event)
    subscriber.skip_through(stream_seq((5, 1)))  # the replay went up to 5-1
    assert subscriber.queued == 2  # the live-only event and 5-2
    subscriber.offer(live)  # and one offered after the replay is never taken as covered
    assert subscriber.queued == 3


async def test_the_backend_builds_its_library_from_the_node_limits() -> None:
    backend = RedisBackend(
        "redis://127.0.0.1:1/0",
        "pfx",
        max_events=5000,
        ttl=60,
        stats=Stats(),
        limits=EventLimits(max_topics=7, max_event_bytes=4096),
    )
    source = library_source("pfx", max_events=5000, max_topics=7, max_event_bytes=4096)
    assert source.startswith("#!lua name=sse_broker_v1_pfx\n")
    assert "local MAX_TOPICS = 7\n" in source
    assert "local LOG_KEY = 'pfx:log'\n" in source
    assert backend._library == source
    await backend.close()

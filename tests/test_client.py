"""``broker.client``: the SSE parser against the broker's encoder and tricky inputs, the
backoff schedule, and ``Subscriber`` / ``Publisher`` against a live broker on a socket."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from broker import sse
from broker.client import (
    BrokerError,
    Event,
    EventParser,
    Publisher,
    Subscriber,
    backoff_delay,
)
from broker.config import load_config
from broker.subscriber import CloseReason
from broker.web import create_app
from tests.conftest import (
    JWT_KEY,
    Broker,
    BrokerFactory,
    BrokerTestServer,
    free_port,
    mint,
    wait_for,
)

# Generous bound on anything a test waits for; never a speed assertion.
DEADLINE = 20.0


def parse(*chunks: bytes) -> tuple[list[Event], EventParser]:
    parser = EventParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events, parser


def split_everywhere(frame: bytes) -> list[list[bytes]]:
    """The frame cut into two pieces at every byte, and into single bytes."""
    cuts = [[frame[:i], frame[i:]] for i in range(len(frame) + 1)]
    return [*cuts, [frame[i : i + 1] for i in range(len(frame))]]


# --- the parser ---------------------------------------------------------------------------

# Text without the characters an id or type may not hold, and without a leading U+FEFF:
# a BOM is stripped only at the very start of the stream, which a data field never is.
field_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"), min_size=1
)


@given(
    data=st.text(st.characters(exclude_categories=["Cs"])),
    event=st.none() | field_text,
    event_id=st.none() | field_text,
    retry=st.none() | st.integers(0, 2**31 - 1),
    cut=st.integers(0, 10_000),
)
def test_parser_reads_back_what_the_broker_encodes(
    data: str, event: str | None, event_id: str | None, retry: int | None, cut: int
) -> None:
    frame = sse.encode_event(sse.encode_body(data, event, retry), event_id)
    cut %= len(frame) + 1
    events, parser = parse(b"retry: 2000\n: ok\n\n", frame[:cut], frame[cut:])
    normalised = data.replace("\r\n", "\n").replace("\r", "\n")
    assert events == [Event(normalised, event or "message", event_id or "")]
    assert parser.retry == (2000 if retry is None else retry)


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\n"])
def test_every_line_ending_in_every_split(ending: bytes) -> None:
    frame = ending.join([b"id: 1", b"event: e", b"data: a", b"data: b", b"", b""])
    for pieces in split_everywhere(frame):
        events, _ = parse(*pieces)
        assert events == [Event("a\nb", "e", "1")], pieces


def test_mixed_line_endings_in_one_stream() -> None:
    events, _ = parse(b"data: a\rdata: b\r\n\ndata: c\n\r")
    assert events == [Event("a\nb"), Event("c")]


def test_a_leading_bom_is_skipped_once() -> None:
    for pieces in split_everywhere(b"\xef\xbb\xbfdata: x\n\n\xef\xbb\xbfdata: y\n\ndata: z\n\n"):
        events, _ = parse(*pieces)
        # The second BOM is part of the field name "\ufeffdata", which is ignored.
        assert events == [Event("x"), Event("z")], pieces


def test_utf8_split_inside_a_character() -> None:
    frame = "data: naïve ☃ 👩‍👧\n\n".encode()
    for pieces in split_everywhere(frame):
        assert parse(*pieces)[0] == [Event("naïve ☃ 👩‍👧")]


def test_invalid_utf8_becomes_replacement_characters() -> None:
    assert parse(b"data: a\xffb\n\n")[0] == [Event("a\ufffdb")]


def test_comments_and_unknown_fields_are_ignored() -> None:
    events, _ = parse(b": ok\n:\nfoo: bar\ndata: x\n: between\nbogus\n\n")
    assert events == [Event("x")]


def test_only_one_space_after_the_colon_is_removed() -> None:
    events, _ = parse(b"data:no space\ndata:  two spaces\ndata\ndata:\n\n")
    assert events == [Event("no space\n two spaces\n\n")]


def test_a_blank_line_without_data_dispatches_nothing_and_resets_the_type() -> None:
    events, _ = parse(b"event: lost\n\ndata: x\n\n")
    assert events == [Event("x", "message")]


def test_the_type_applies_to_one_event_only() -> None:
    events, _ = parse(b"event: a\ndata: 1\n\ndata: 2\n\n")
    assert events == [Event("1", "a"), Event("2", "message")]


def test_an_event_not_ended_by_a_blank_line_is_not_dispatched() -> None:
    events, _ = parse(b"data: whole\n\ndata: cut off\n")
    assert events == [Event("whole")]


def test_last_event_id_persists_ignores_nul_and_can_be_cleared() -> None:
    events, parser = parse(
        b"id: 1\ndata: a\n\ndata: b\n\nid: 2\0x\ndata: c\n\nid\ndata: d\n\nid: 3\n\n"
    )
    assert [event.id for event in events] == ["1", "1", "1", ""]
    assert parser.last_event_id == "3"


def test_retry_takes_digits_only() -> None:
    _, parser = parse(b"retry: 1500\n\nretry: 2.5\n\nretry: -1\n\nretry: x1\n\nretry:  7\n\n")
    assert parser.retry == 1500


def test_broker_notices_are_events_with_their_type() -> None:
    events, _ = parse(
        b'id: 5-0\ndata: a\n\nevent: broker.missed\ndata: {"lastEventId": "1-0"}\n\n'
        b'event: broker.dropped\ndata: {"dropped": 3}\n\n'
    )
    assert events == [
        Event("a", "message", "5-0"),
        Event('{"lastEventId": "1-0"}', "broker.missed", "5-0"),
        Event('{"dropped": 3}', "broker.dropped", "5-0"),
    ]


# --- backoff --------------------------------------------------------------------------------


def test_backoff_starts_at_the_server_retry_and_doubles_up_to_the_cap() -> None:
    low, high = random.Random(), random.Random()
    low.random = lambda: 0.0  # type: ignore[method-assign]
    high.random = lambda: 0.999999  # type: ignore[method-assign]
    assert backoff_delay(2000, 0, 30, jitter=low) == 2.0
    assert [backoff_delay(2000, n, 30, jitter=low) for n in range(1, 6)] == [4, 8, 16, 30, 30]
    assert backoff_delay(2000, 0, 30, jitter=high) == pytest.approx(3.0, rel=1e-5)
    # A server asking for more than the cap is obeyed.
    assert backoff_delay(60_000, 3, 30, jitter=low) == 60.0
    # retry 0: reconnect at once after a clean end, but failures still back off.
    assert backoff_delay(0, 0, 30, jitter=low) == 0.0
    assert backoff_delay(0, 2, 30, jitter=low) > 0


# --- against a live broker ------------------------------------------------------------------


async def collect(events: Subscriber, count: int) -> list[Event]:
    received: list[Event] = []
    async with asyncio.timeout(DEADLINE):
        async for event in events:
            received.append(event)
            if len(received) == count:
                break
    return received


async def test_events_arrive_in_order_with_their_ids_types_and_data(broker: Broker) -> None:
    async with (
        Publisher(broker.url) as publisher,
        Subscriber(broker.url, ["chat/*"]) as events,
    ):
        ids = [await publisher.publish("chat/1", f"n{i}") for i in range(10)]
        ids.append(await publisher.publish("chat/2", {"k": [1, 2]}, event="update"))
        ids.append(await publisher.publish("other", "not for us"))
        ids.append(await publisher.publish("chat/3", "line one\nline two"))
        received = await collect(events, 12)
    assert [event.id for event in received] == ids[:11] + ids[12:]
    assert [event.data for event in received[:10]] == [f"n{i}" for i in range(10)]
    assert received[10] == Event('{"k":[1,2]}', "update", ids[10])
    assert received[11].data == "line one\nline two"


async def test_entering_means_subscribed(broker: Broker) -> None:
    async with Subscriber(broker.url, "t") as events, Publisher(broker.url) as publisher:
        event_id = await publisher.publish("t", "first")
        assert await collect(events, 1) == [Event("first", "message", event_id)]


async def test_reconnects_after_the_broker_ends_streams_and_loses_nothing(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(retry=20)
    async with Publisher(broker.url) as publisher, Subscriber(broker.url, "t") as events:
        ids = [await publisher.publish("t", "before")]
        received = await collect(events, 1)
        for round_ in range(3):
            broker.state.hub.close_all(CloseReason.SHUTDOWN)
            # Published while the client is away or coming back: replayed or live, once.
            ids += [await publisher.publish("t", f"r{round_}-{i}") for i in range(5)]
            received += await collect(events, 5)
        assert events.connections >= 2
    assert [event.id for event in received] == ids
    assert [event.event for event in received] == ["message"] * len(ids)


async def test_a_silent_stream_is_taken_for_dead_and_replaced(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(heartbeat=3600, retry=20)
    async with (
        Publisher(broker.url) as publisher,
        Subscriber(broker.url, "t", idle_timeout=0.1) as events,
    ):
        reading = asyncio.create_task(collect(events, 1))
        await wait_for(lambda: events.connections >= 3, DEADLINE)
        event_id = await publisher.publish("t", "still here")
        assert await reading == [Event("still here", "message", event_id)]


async def start_on(port: int, **flags: str) -> TestServer:
    argv = [
        "--allow-anonymous-publish",
        *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items()),
    ]
    server = BrokerTestServer(
        create_app(load_config(argv, environ={})), host="127.0.0.1", port=port
    )
    await server.start_server()
    return server


async def test_reconnects_after_a_restart_and_is_told_what_was_missed() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = await start_on(port, retry="20")
    try:
        async with Publisher(url) as publisher, Subscriber(url, "t") as events:
            old_id = await publisher.publish("t", "old")
            assert [e.id for e in await collect(events, 1)] == [old_id]
            await first.close()
            second = await start_on(port, retry="20")
            try:
                # The new broker's history does not hold old_id: the resume is announced
                # as missed, and events published from then on arrive.
                missed = await collect(events, 1)
                assert missed[0].event == "broker.missed"
                assert old_id in missed[0].data
                new_id = await publisher.publish("t", "new")
                assert await collect(events, 1) == [Event("new", "message", new_id)]
            finally:
                await second.close()
    finally:
        await first.close()


async def test_resumes_after_a_saved_id_without_loss_or_duplicates(broker: Broker) -> None:
    async with Publisher(broker.url) as publisher:
        ids = await publisher.publish_many([{"topic": "t", "data": str(i)} for i in range(6)])
        async with Subscriber(broker.url, ["t"], last_event_id=ids[2]) as events:
            ids.append(await publisher.publish("t", "live"))
            received = await collect(events, 1)
            # The id of the last event handed out, even if more have arrived behind it.
            assert events.last_event_id == ids[3]
            received += await collect(events, 3)
            assert events.last_event_id == ids[-1]
    assert [event.id for event in received] == ids[3:]
    assert [event.data for event in received] == ["3", "4", "5", "live"]


async def test_takes_the_retry_of_the_broker_and_of_events(make_broker: BrokerFactory) -> None:
    broker = await make_broker(retry=1234)
    async with Publisher(broker.url) as publisher, Subscriber(broker.url, "t") as events:
        await publisher.publish("t", "a")
        await collect(events, 1)
        assert events.retry == 1234
        await publisher.publish("t", "b", retry=4321)
        await collect(events, 1)
        assert events.retry == 4321


async def test_a_refusal_retrying_cannot_fix_is_raised(make_broker: BrokerFactory) -> None:
    broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_subscribe=False)
    with pytest.raises(BrokerError) as bad_topic:
        async with Subscriber(broker.url, "a/**/b", token=mint(subscribe=["**"])):
            pass
    assert (bad_topic.value.status, bad_topic.value.error) == (400, "invalid_subscription")
    with pytest.raises(BrokerError) as anonymous:
        async with Subscriber(broker.url, "t"):
            pass
    assert (anonymous.value.status, anonymous.value.error) == (401, "unauthorized")
    assert anonymous.value.detail


async def test_a_full_broker_is_retried_until_a_slot_frees(
    make_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await make_broker(max_connections=1, retry=20)
    async with Subscriber(broker.url, "t"):
        # Until a stream opens, the client's own retry is the delay to start from.
        waiting = asyncio.create_task(Subscriber(broker.url, "t", retry=20).__aenter__())
        # Refused twice (503 too_many_connections), and still trying rather than raising.
        await wait_for(lambda: caplog.text.count("too_many_connections") >= 2, DEADLINE)
        assert not waiting.done()
    async with asyncio.timeout(DEADLINE):
        second = await waiting
    await second.close()
    assert second.connections == 1


async def test_tokens_private_events_and_publisher_errors(make_broker: BrokerFactory) -> None:
    broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False)
    writer = mint(publish=["room/*"])
    async with (
        Publisher(broker.url, writer) as publisher,
        Subscriber(broker.url, "room/1", token=mint(subscribe=["room/*"])) as member,
        Subscriber(broker.url, "room/1") as stranger,
    ):
        secret = await publisher.publish("room/1", "secret", private=True)
        public = await publisher.publish("room/1", "public")
        assert [e.id for e in await collect(member, 2)] == [secret, public]
        assert [e.id for e in await collect(stranger, 1)] == [public]

        with pytest.raises(BrokerError) as forbidden:
            await publisher.publish("elsewhere", "x")
        assert (forbidden.value.status, forbidden.value.error) == (403, "forbidden")
        with pytest.raises(BrokerError) as reserved:
            await publisher.publish("room/1", "x", event="broker.fake")
        assert (reserved.value.status, reserved.value.error) == (400, "invalid_event")
        assert "broker." in reserved.value.detail

    async with Publisher(broker.url) as anonymous:
        with pytest.raises(BrokerError) as unauthorized:
            await anonymous.publish("room/1", "x")
        assert unauthorized.value.status == 401


async def test_publish_many_is_one_ordered_batch_and_keys_make_retries_safe(
    broker: Broker,
) -> None:
    async with Publisher(broker.url) as publisher, Subscriber(broker.url, "t/**") as events:
        ids = await publisher.publish_many(
            [
                {"topic": "t/a", "data": "1"},
                {"topic": ["t/b", "t/c"], "data": {"two": 2}, "event": "e"},
                {"topic": "t/a", "data": "3", "retry": 100},
            ]
        )
        assert await publisher.publish_many([]) == []
        first = await publisher.publish("t/a", "once", key="k-1")
        again = await publisher.publish("t/a", "once", key="k-1")
        assert again == first
        received = await collect(events, 4)
        with pytest.raises(BrokerError) as refused:
            await publisher.publish_many([{"topic": "t/a", "data": "ok"}, {"data": "no topic"}])
        assert refused.value.error == "invalid_event"
        assert "event 1" in refused.value.detail
    assert [event.id for event in received] == [*ids, first]
    assert received[1] == Event('{"two":2}', "e", ids[1])


async def test_publish_stream_publishes_each_item_as_it_is_sent(broker: Broker) -> None:
    release = asyncio.Event()

    async def items() -> AsyncIterator[dict[str, str] | str]:
        yield "first line"
        await release.wait()
        yield {"data": "an object", "event": "obj"}
        yield '{"data": "read as an event object"}'
        yield "[DONE]"

    async with Publisher(broker.url) as publisher, Subscriber(broker.url, "t") as events:
        streaming = asyncio.create_task(publisher.publish_stream(items(), topic="t"))
        first = await collect(events, 1)
        assert first[0].data == "first line"
        assert not streaming.done()
        release.set()
        rest = await collect(events, 3)
        async with asyncio.timeout(DEADLINE):
            ids = await streaming
    received = first + rest
    assert [event.id for event in received] == ids
    assert [(event.event, event.data) for event in received] == [
        ("message", "first line"),
        ("obj", "an object"),
        ("message", "read as an event object"),
        ("message", "[DONE]"),
    ]


async def test_publish_stream_keeps_an_idle_stream_open(make_broker: BrokerFactory) -> None:
    broker = await make_broker(body_timeout=0.5)

    async def slow() -> AsyncIterator[str]:
        yield "a"
        await asyncio.sleep(1.5)  # three times the broker's allowance for a silent stream
        yield "b"

    async with Publisher(broker.url) as publisher:
        ids = await publisher.publish_stream(slow(), topic="t", keepalive=0.02)
    assert len(ids) == 2


async def test_publish_stream_refusal_names_what_was_published(broker: Broker) -> None:
    async def items() -> AsyncIterator[dict[str, str] | str]:
        yield "fine"
        yield {"data": "bad", "event": "broker.no"}
        yield "never"

    async with Publisher(broker.url) as publisher:
        with pytest.raises(BrokerError) as refused:
            await publisher.publish_stream(items(), topic="t", key="batch")
        assert refused.value.error == "invalid_event"
        assert len(refused.value.ids) == 1
        with pytest.raises(ValueError, match="line break"):
            await publisher.publish_stream(_one("two\nlines"), topic="t")


async def _one(item: str) -> AsyncIterator[str]:
    yield item

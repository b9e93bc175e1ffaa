"""A subscriber's bounded queue, its overflow policies, the replay seam and its ending.

The first half drives ``Subscriber`` directly over a real TCP connection on 127.0.0.1.
The broker's end is an asyncio transport that starts out owned by ``RequestSide`` (which
stands in for aiohttp's protocol: it hears the transport's flow control and offers the
``drain`` a replay waits on) until ``take_over`` makes the subscriber its protocol, as the
stream handler does. The client's end is a socket the test reads only when it chooses,
with small kernel buffers so that "not reading" backs up after a few kilobytes. The
second half does the same through the running app with raw-socket subscribers that stop
reading, and checks what ``/metrics`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse

from broker.config import Overflow
from broker.event import Event, EventLimits, make_draft
from broker.history import EventLog
from broker.hub import Hub
from broker.metrics import Stats
from broker.subscriber import (
    DROPPED_EVENT,
    MISSED_EVENT,
    REPLAY_BATCH_BYTES,
    CloseReason,
    Subscriber,
)
from broker.topics import Selector
from tests.conftest import Broker, BrokerFactory, Frame, RawStream, events_of, open_raw, wait_for
from tests.test_stream import scrape, subscribers

LIMITS = EventLimits(max_topics=64, max_event_bytes=256 * 1024)
SMALL_BUFFER = 4096
HIGH_WATER = 16 * 1024
LINGER_ZERO = b"\x01\x00\x00\x00\x00\x00\x00\x00"


# --- a real connection, and events to offer ---------------------------------------------


class RequestSide(asyncio.Protocol):
    """The connection's protocol until the take-over, in aiohttp's place: it is told when
    the transport pauses and resumes, and ``drain`` waits for the resume."""

    def __init__(self) -> None:
        self.paused = False
        self.lost = False
        self._resumed: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    async def drain(self) -> None:
        while self.paused:
            if self.lost:
                raise ConnectionResetError("connection lost while waiting to write")
            self._resumed = asyncio.get_running_loop().create_future()
            await self._resumed


@dataclasses.dataclass
class Wire:
    """One TCP connection: ``transport`` is the broker's side, first owned by
    ``request_side``; ``peer`` is the client's, which reads nothing until the test asks it
    to. ``forgotten`` records the subscribers whose ``on_lost`` was called."""

    transport: asyncio.Transport
    request_side: RequestSide
    peer: RawStream
    forgotten: list[Subscriber] = dataclasses.field(default_factory=list)

    @property
    def drain(self) -> Callable[[], Awaitable[None]]:
        return self.request_side.drain

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()


WireFactory = Callable[[], Awaitable[Wire]]


@pytest.fixture
async def connect() -> AsyncIterator[WireFactory]:
    wires: list[Wire] = []

    async def make() -> Wire:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            peer.setblocking(False)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
            await loop.sock_connect(peer, listener.getsockname())
            server_side, _ = await loop.sock_accept(listener)
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        transport, request_side = await loop.connect_accepted_socket(RequestSide, server_side)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        wire = Wire(transport, request_side, RawStream(peer, http=False))
        wires.append(wire)
        return wire

    yield make
    for wire in wires:
        # Only a connection still open: on Python 3.11, aborting a transport whose close
        # already completed (after flushing its buffer) raises AttributeError.
        if not wire.forgotten and not wire.request_side.lost:
            wire.transport.abort()
        wire.peer.close()
    await asyncio.sleep(0)


class Numbered:
    """Logs events whose data starts with their number (1, 2, ...), padded to a size."""

    def __init__(self, pad: int = 1024, log: EventLog | None = None) -> None:
        self.log = EventLog(100_000, 3600) if log is None else log
        self.pad = "x" * pad
        self.count = 0

    def take(self, count: int, topic: str = "t") -> list[Event]:
        drafts = []
        for _ in range(count):
            self.count += 1
            drafts.append(make_draft(topic, f"{self.count}:{self.pad}", limits=LIMITS))
        return self.log.append(drafts)


def new_subscriber(
    wire: Wire,
    overflow: Overflow = Overflow.DROP_OLDEST,
    *,
    max_events: int = 8,
    max_bytes: int = 1 << 20,
    stats: Stats | None = None,
    topic: str = "t",
    hub: Hub | None = None,
) -> Subscriber:
    """A subscriber for ``wire``'s connection (not yet bound to it) whose ``on_lost``
    records it in ``wire.forgotten`` and, given a ``hub``, has the hub forget it."""

    def on_lost(subscriber: Subscriber) -> None:
        wire.forgotten.append(subscriber)
        if hub is not None:
            hub.forget(subscriber)

    return Subscriber(
        Selector([topic]),
        max_events=max_events,
        max_bytes=max_bytes,
        overflow=overflow,
        stats=Stats() if stats is None else stats,
        on_lost=on_lost,
    )


def take_over(subscriber: Subscriber, wire: Wire) -> None:
    """Bind and take the connection over, as the stream handler does once its opening
    bytes (and any replay) are out."""
    subscriber.attach(wire.transport, chunked=True)
    subscriber.take_over()
    assert wire.transport.get_protocol() is subscriber


def stall(subscriber: Subscriber, wire: Wire, source: Numbered) -> list[Event]:
    """Offer events to a flowing subscriber whose peer does not read until the transport
    passes its high-water mark (and so pauses the subscriber); return them all: every one
    of them was written, none queued."""
    offered: list[Event] = []
    while wire.buffered() <= HIGH_WATER:
        assert len(offered) < 10_000, "the socket never backed up"
        [event] = source.take(1)
        subscriber.offer(event)
        offered.append(event)
    assert subscriber.queued == 0, "a flowing subscriber writes, it does not queue"
    return offered


def queued_events(subscriber: Subscriber) -> list[Event]:
    return list(subscriber._queue or ())


def queued_bytes(subscriber: Subscriber) -> int:
    return subscriber._queued_bytes


def ids(events: list[Event]) -> list[str]:
    return [event.id for event in events]


def received(frames: list[Frame]) -> list[str]:
    """Each dispatched block as its id, or as ``event:value`` for a broker notice."""
    names: list[str] = []
    for frame in frames:
        if frame.data is None:
            continue
        if frame.event is None:
            names.append(frame.id or "<no id>")
        else:
            [value] = orjson.loads(frame.data).values()
            names.append(f"{frame.event}:{value}")
    return names


def last_event(stream: RawStream) -> Frame:
    events = stream.events()
    return events[-1] if events else Frame([], [])


# --- the bounded queue ------------------------------------------------------------------


async def test_flowing_subscriber_writes_directly_and_queues_nothing(connect: WireFactory) -> None:
    wire = await connect()
    stats = Stats()
    subscriber = new_subscriber(wire, stats=stats)
    take_over(subscriber, wire)
    events = Numbered(pad=10).take(5)
    for event in events:
        subscriber.offer(event)
        assert subscriber.queued == 0
    await wire.peer.read_until(lambda: len(wire.peer.events()) == 5)
    assert received(wire.peer.frames) == ids(events)
    assert stats.delivered == 5


@pytest.mark.parametrize("overflow", [Overflow.DROP_OLDEST, Overflow.DROP_NEWEST])
async def test_stuck_reader_queue_never_exceeds_its_event_limit(
    connect: WireFactory, overflow: Overflow
) -> None:
    wire = await connect()
    stats = Stats()
    subscriber = new_subscriber(wire, overflow, max_events=8, stats=stats)
    take_over(subscriber, wire)
    source = Numbered()
    stall(subscriber, wire, source)
    buffered = wire.buffered()
    for event in source.take(100):
        subscriber.offer(event)
        assert subscriber.queued <= 8
    assert subscriber.queued == 8
    assert wire.buffered() == buffered, "a paused subscriber must not write"
    assert subscriber.dropped == stats.dropped == 92


async def test_stuck_reader_queue_never_exceeds_its_byte_limit(connect: WireFactory) -> None:
    wire = await connect()
    subscriber = new_subscriber(wire, max_events=1000, max_bytes=8 * 1024)
    take_over(subscriber, wire)
    source = Numbered(pad=1000)
    stall(subscriber, wire, source)
    for event in source.take(50):
        subscriber.offer(event)
        assert queued_bytes(subscriber) <= 8 * 1024
    assert queued_bytes(subscriber) == sum(len(event.chunk) for event in queued_events(subscriber))
    assert queued_bytes(subscriber) + len(source.take(1)[0].chunk) > 8 * 1024, "queue is full"
    assert subscriber.dropped == 50 - subscriber.queued


async def test_drop_oldest_makes_room_by_bytes_for_a_large_event(connect: WireFactory) -> None:
    wire = await connect()
    subscriber = new_subscriber(wire, max_events=1000, max_bytes=8 * 1024)
    take_over(subscriber, wire)
    stall(subscriber, wire, Numbered(pad=100))
    small = Numbered(pad=100, log=EventLog(1000, 60)).take(40)
    for event in small:
        subscriber.offer(event)
    [large] = Numbered(pad=6000, log=EventLog(1000, 60)).take(1)
    dropped = subscriber.dropped
    subscriber.offer(large)
    assert queued_bytes(subscriber) <= 8 * 1024
    assert queued_events(subscriber)[-1] is large
    assert subscriber.dropped > dropped, "older events made room"


async def test_drop_oldest_keeps_the_newest_and_reports_the_count_before_them(
    connect: WireFactory,
) -> None:
    wire = await connect()
    stats = Stats()
    subscriber = new_subscriber(wire, Overflow.DROP_OLDEST, max_events=8, stats=stats)
    take_over(subscriber, wire)
    source = Numbered()
    written = stall(subscriber, wire, source)
    overflowing = source.take(24)
    for event in overflowing:
        subscriber.offer(event)

    await wire.peer.read_until(lambda: last_event(wire.peer).id == overflowing[-1].id)
    assert received(wire.peer.frames) == [
        *ids(written),
        f"{DROPPED_EVENT}:16",
        *ids(overflowing[-8:]),
    ]
    assert subscriber.dropped == stats.dropped == 16

    # The transport resumed it to flush the queue: caught up, the next event goes out at once.
    [after] = source.take(1)
    subscriber.offer(after)
    assert subscriber.queued == 0
    await wire.peer.read_until(lambda: last_event(wire.peer).id == after.id)


async def test_drop_newest_keeps_the_oldest_and_reports_the_count_after_them(
    connect: WireFactory,
) -> None:
    wire = await connect()
    stats = Stats()
    subscriber = new_subscriber(wire, Overflow.DROP_NEWEST, max_events=8, stats=stats)
    take_over(subscriber, wire)
    source = Numbered()
    written = stall(subscriber, wire, source)
    overflowing = source.take(24)
    for event in overflowing:
        subscriber.offer(event)

    await wire.peer.read_until(lambda: last_event(wire.peer).event == DROPPED_EVENT)
    [after] = source.take(1)
    subscriber.offer(after)
    assert subscriber.queued == 0
    await wire.peer.read_until(lambda: last_event(wire.peer).id == after.id)
    assert received(wire.peer.frames) == [
        *ids(written),
        *ids(overflowing[:8]),
        f"{DROPPED_EVENT}:16",
        after.id,
    ]
    assert subscriber.dropped == stats.dropped == 16


async def test_disconnect_policy_cuts_the_connection_on_the_first_overflow(
    connect: WireFactory,
) -> None:
    wire = await connect()
    stats = Stats()
    subscriber = new_subscriber(wire, Overflow.DISCONNECT, max_events=8, stats=stats)
    take_over(subscriber, wire)
    source = Numbered()
    stall(subscriber, wire, source)
    for event in source.take(8):
        subscriber.offer(event)
    assert subscriber.close_reason is None
    queued = subscriber.queued
    [overflowing] = source.take(1)
    subscriber.offer(overflowing)
    assert subscriber.close_reason is CloseReason.OVERFLOW
    assert wire.transport.is_closing()
    assert subscriber.queued == 0
    await wait_for(lambda: wire.forgotten == [subscriber])
    assert subscriber.close_reason is CloseReason.OVERFLOW, "losing the connection keeps why"
    dropped = subscriber.dropped
    assert stats.dropped == dropped == queued + 1, "the discarded queue counts as dropped"
    for event in source.take(5):  # a closed subscriber ignores what it is offered
        subscriber.offer(event)
    assert (subscriber.queued, subscriber.dropped, stats.dropped) == (0, dropped, dropped)
    await wire.peer.read_to_end()
    assert not wire.peer.body.complete, "cut, not ended: the client must resume with its id"
    assert overflowing.id not in received(wire.peer.frames)


# --- the connection's end ---------------------------------------------------------------


async def test_shutdown_close_flushes_what_is_queued_then_ends(connect: WireFactory) -> None:
    """Unlike an overflow, a shutdown lets a reading client have everything queued, then
    the end of the chunked body, then the end of the connection."""
    wire = await connect()
    stats = Stats()
    subscriber = new_subscriber(wire, max_events=100, stats=stats)
    take_over(subscriber, wire)
    source = Numbered()
    written = stall(subscriber, wire, source)
    queued = source.take(3)
    for event in queued:
        subscriber.offer(event)
    assert subscriber.queued == 3
    subscriber.close(CloseReason.SHUTDOWN)
    assert subscriber.queued == 0
    assert wire.transport.is_closing()
    subscriber.offer(source.take(1)[0])
    assert subscriber.queued == 0
    await wire.peer.read_to_end()
    assert received(wire.peer.frames) == ids([*written, *queued])
    assert wire.peer.body.complete
    assert not wire.peer.reset
    await wait_for(lambda: wire.forgotten == [subscriber])
    assert subscriber.close_reason is CloseReason.SHUTDOWN
    assert stats.delivered == len(written) + 3


async def test_close_before_the_take_over_is_carried_out_by_it(connect: WireFactory) -> None:
    """Before the take-over the request's task owns the connection, so ``close`` only
    records why; taking over a closed subscriber flushes its queue and ends the stream."""
    wire = await connect()
    subscriber = new_subscriber(wire, max_events=100)
    subscriber.attach(wire.transport, chunked=True)
    events = Numbered(pad=10).take(3)
    for event in events:  # not taken over yet, so these queue
        subscriber.offer(event)
    assert subscriber.queued == 3
    subscriber.close(CloseReason.SHUTDOWN)
    assert not wire.transport.is_closing()
    subscriber.offer(Numbered(pad=10).take(1)[0])
    assert subscriber.queued == 3
    subscriber.take_over()
    assert wire.transport.is_closing()
    await wire.peer.read_to_end()
    assert received(wire.peer.frames) == ids(events)
    assert wire.peer.body.complete
    await wait_for(lambda: wire.forgotten == [subscriber])
    assert subscriber.close_reason is CloseReason.SHUTDOWN


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_client_that_leaves_is_forgotten_with_reason_client(
    connect: WireFactory, how: str
) -> None:
    """Nothing need be written for the subscriber to notice: the transport tells it."""
    wire = await connect()
    subscriber = new_subscriber(wire, max_events=100)
    take_over(subscriber, wire)
    source = Numbered()
    if how == "reset":
        stall(subscriber, wire, source)
        subscriber.offer(source.take(1)[0])
        assert subscriber.queued == 1
        wire.peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    wire.peer.close()
    await wait_for(lambda: wire.forgotten == [subscriber])
    assert subscriber.close_reason is CloseReason.CLIENT
    assert subscriber.queued == 0, "its queue is let go"
    assert queued_bytes(subscriber) == 0
    subscriber.offer(source.take(1)[0])
    subscriber.heartbeat()
    assert subscriber.queued == 0


async def test_hub_shut_down_ends_readers_cleanly_and_cuts_a_stuck_stream(
    connect: WireFactory,
) -> None:
    """Every stream is ended; one whose client reads nothing cannot take its end, so it is
    cut once the budget is spent and the shutdown still finishes."""
    stats = Stats()
    hub = Hub(stats)
    source = Numbered()
    reader_wire, stuck_wire = await connect(), await connect()
    reader = new_subscriber(reader_wire, max_events=100, stats=stats, hub=hub)
    stuck = new_subscriber(stuck_wire, max_events=100, stats=stats, topic="stuck", hub=hub)
    for subscriber, wire in ((reader, reader_wire), (stuck, stuck_wire)):
        hub.subscribe(subscriber)
        take_over(subscriber, wire)
    while stuck_wire.buffered() <= HIGH_WATER:
        hub.fan_out(source.take(1, topic="stuck"))
    hub.fan_out(source.take(2, topic="stuck"))
    assert stuck.queued == 2
    for_reader = source.take(2)
    hub.fan_out(for_reader)

    await asyncio.wait_for(hub.shut_down(1.0), 30)
    await wait_for(lambda: hub.connection_count == 0)
    assert stats.disconnects == {CloseReason.SHUTDOWN: 2}
    await reader_wire.peer.read_to_end()
    assert received(reader_wire.peer.frames) == ids(for_reader)
    assert reader_wire.peer.body.complete
    assert not reader_wire.peer.reset
    await stuck_wire.peer.read_to_end()
    assert not stuck_wire.peer.body.complete, "cut: its end never got out"


async def test_heartbeat_is_written_only_while_the_stream_flows(connect: WireFactory) -> None:
    wire = await connect()
    subscriber = new_subscriber(wire)
    subscriber.heartbeat()  # not attached: nothing to write to
    subscriber.attach(wire.transport, chunked=True)
    subscriber.heartbeat()  # attached but not taken over: the request's task owns the socket
    take_over(subscriber, wire)
    subscriber.heartbeat()
    source = Numbered(pad=10)
    [event] = source.take(1)
    subscriber.offer(event)
    await wire.peer.read_until(lambda: last_event(wire.peer).id == event.id)
    assert bytes(wire.peer.body.data) == b":\n\n" + event.frame, "exactly one heartbeat"
    stall(subscriber, wire, source)
    buffered = wire.buffered()
    subscriber.heartbeat()  # backed up: a comment would only add to the backlog
    assert wire.buffered() == buffered


async def test_take_over_of_a_backed_up_transport_queues_until_it_drains(
    connect: WireFactory,
) -> None:
    """Flow control passes with the connection: taken over while the transport is past
    its high-water mark, the subscriber queues, and the transport's resume (now its own,
    no longer the request side's) flushes the queue and lets it write directly again."""
    wire = await connect()
    subscriber = new_subscriber(wire, max_events=100)
    subscriber.attach(wire.transport, chunked=True)
    source = Numbered()
    backlog: list[Event] = []  # written before the take-over, as a replay is
    while not wire.request_side.paused:
        assert len(backlog) < 10_000, "the socket never backed up"
        [event] = source.take(1)
        wire.transport.write(event.chunk)
        backlog.append(event)
    subscriber.take_over()
    buffered = wire.buffered()
    queued = source.take(3)
    for event in queued:
        subscriber.offer(event)
    assert subscriber.queued == 3
    assert wire.buffered() == buffered

    await wire.peer.read_until(lambda: last_event(wire.peer).id == queued[-1].id)
    assert subscriber.queued == 0
    [after] = source.take(1)
    subscriber.offer(after)
    assert subscriber.queued == 0
    await wire.peer.read_until(lambda: last_event(wire.peer).id == after.id)
    assert received(wire.peer.frames) == ids([*backlog, *queued, after])
    assert wire.request_side.paused, "the request side hears nothing after the take-over"


# --- the replay seam --------------------------------------------------------------------


async def test_replay_drops_queued_live_events_it_already_covered(connect: WireFactory) -> None:
    """Events published between registration and the replay read are both queued and in
    the replay; ``through`` removes the queued copies. Later ones stay queued."""
    wire = await connect()
    hub = Hub(Stats())
    source = Numbered(pad=10)
    seen = source.take(3)
    subscriber = new_subscriber(wire, max_events=100)
    hub.subscribe(subscriber)
    subscriber.attach(wire.transport, chunked=True)
    racing = source.take(2)
    hub.fan_out(racing)
    replay = source.log.since(seen[0].id, subscriber.selector)
    later = source.take(2)
    hub.fan_out(later)
    assert subscriber.queued == 4

    await subscriber.send_replay(replay, seen[0].id, wire.drain)
    assert subscriber.queued == 2
    assert queued_bytes(subscriber) == sum(len(event.chunk) for event in later)
    subscriber.take_over()
    assert subscriber.queued == 0
    live = source.take(1)
    hub.fan_out(live)
    assert subscriber.queued == 0
    await wire.peer.read_until(lambda: len(wire.peer.events()) == 7)
    assert received(wire.peer.frames) == ids([*seen[1:], *racing, *later, *live])


async def test_missed_replay_starts_with_a_notice_and_skips_covered_events(
    connect: WireFactory,
) -> None:
    wire = await connect()
    hub = Hub(Stats())
    source = Numbered(pad=10, log=EventLog(3, 3600))
    source.take(5)
    subscriber = new_subscriber(wire, max_events=100)
    hub.subscribe(subscriber)
    subscriber.attach(wire.transport, chunked=True)
    racing = source.take(1)
    hub.fan_out(racing)
    retained = list(source.log._events)
    replay = source.log.since("gone", subscriber.selector)
    assert replay.missed
    await subscriber.send_replay(replay, "gone", wire.drain)
    assert subscriber.queued == 0
    await wire.peer.read_until(lambda: len(wire.peer.events()) == 4)
    assert received(wire.peer.frames) == [f"{MISSED_EVENT}:gone", *ids(retained)]
    assert wire.peer.events()[0].id is None


async def test_events_published_while_a_replay_waits_for_the_socket_follow_it_exactly(
    connect: WireFactory,
) -> None:
    """A replay larger than the socket's buffers makes ``send_replay`` wait mid-way; what
    is published meanwhile queues, and arrives after the replay with no gap or repeat."""
    wire = await connect()
    hub = Hub(Stats())
    source = Numbered(pad=1000)
    history = source.take(300)
    subscriber = new_subscriber(wire, max_events=1000)
    hub.subscribe(subscriber)
    subscriber.attach(wire.transport, chunked=True)
    replay = source.log.since(history[0].id, subscriber.selector)
    assert sum(len(event.chunk) for event in replay.events) > 2 * REPLAY_BATCH_BYTES

    replaying = asyncio.create_task(subscriber.send_replay(replay, history[0].id, wire.drain))
    published_meanwhile: list[Event] = []
    for _ in range(20):
        await asyncio.sleep(0)
        assert not replaying.done(), "the replay should be waiting for the socket"
        events = source.take(2)
        hub.fan_out(events)
        published_meanwhile += events
    assert subscriber.queued == len(published_meanwhile)

    reading = asyncio.create_task(
        wire.peer.read_until(lambda: len(wire.peer.events()) == 299 + 40 + 1)
    )
    try:
        await asyncio.wait_for(replaying, 10)
        await wire.drain()  # as the handler does before it hands the connection over
        subscriber.take_over()
        last = source.take(1)
        hub.fan_out(last)
        await asyncio.wait_for(reading, 10)
    finally:
        await finish_reading(reading)
    assert received(wire.peer.frames) == ids([*history[1:], *published_meanwhile, *last])


# --- through the app: stuck readers among readers ---------------------------------------


def check_announced_gaps(published: list[str], frames: list[Frame]) -> list[int]:
    """Walk what a subscriber received against what was published: ids in order, none
    twice, and every gap announced by ``broker.dropped`` notices worth exactly its size.
    Returns the notices' counts."""
    position = {event_id: n for n, event_id in enumerate(published)}
    expected_next = 0
    unexplained = 0
    counts: list[int] = []
    for frame in frames:
        if frame.event == DROPPED_EVENT:
            count = orjson.loads(frame.data or "")["dropped"]
            counts.append(count)
            unexplained += count
        elif frame.id is not None:
            n = position[frame.id]
            assert n >= expected_next, f"event {n} out of order or repeated"
            assert n - expected_next == unexplained, "a gap not matching its notice"
            expected_next, unexplained = n + 1, 0
    assert len(published) - expected_next == unexplained, "a trailing gap not matching"
    return counts


async def publish_batch(
    client: httpx.AsyncClient, url: str, topic: str, first: int, count: int, pad: str
) -> list[str]:
    batch = [{"topic": topic, "data": f"{n}:{pad}"} for n in range(first, first + count)]
    response = await client.post(f"{url}/publish", json=batch)
    assert response.status_code == 200, response.text
    event_ids: list[str] = response.json()["ids"]
    return event_ids


async def stuck_subscriber(broker: Broker, topic: str) -> tuple[RawStream, Subscriber]:
    """A subscriber whose client has read the opening bytes and now reads nothing."""
    stream = await open_raw(broker, f"topic={topic}", receive_buffer=SMALL_BUFFER)
    [subscriber] = [s for s in subscribers(broker) if s.selector.patterns == (topic,)]
    return stream, subscriber


async def overflow_then_resume(
    broker: Broker, client: httpx.AsyncClient, queue_size: int
) -> tuple[list[str], RawStream, Subscriber]:
    """Publish to a stuck subscriber until it has dropped several queues' worth, then read
    everything and publish one marker event once it has caught up."""
    stream, subscriber = await stuck_subscriber(broker, "slow")
    with stream:
        published = await publish_until(
            broker, client, lambda: subscriber.dropped >= 3 * queue_size
        )
        assert subscriber.queued <= queue_size
        marker: list[str] = []
        reading = asyncio.create_task(stream.read_until(lambda: last_event(stream).id in marker))
        try:
            # An empty queue means the transport resumed the subscriber and it flushed.
            await wait_for(lambda: subscriber.queued == 0)
            published += await publish_batch(
                client, broker.url, "slow", len(published) + 1, 1, "marker"
            )
            marker.append(published[-1])
            await asyncio.wait_for(reading, 30)
        finally:
            await finish_reading(reading)
    return published, stream, subscriber


async def publish_until(
    broker: Broker, client: httpx.AsyncClient, done: Callable[[], bool]
) -> list[str]:
    """Publish 2 KiB events to ``slow`` in batches of 10 until ``done()``; their ids."""
    published: list[str] = []
    while not done():
        assert len(published) < 20_000, "the stuck socket never backed up"
        published += await publish_batch(
            client, broker.url, "slow", len(published) + 1, 10, "x" * 2048
        )
    return published


async def finish_reading(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_drop_oldest_over_http_reports_drops_and_keeps_the_newest(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(queue_size=8, overflow="drop-oldest")
    published, stream, subscriber = await overflow_then_resume(broker, client, 8)
    counts = check_announced_gaps(published, stream.frames)
    got = received(stream.frames)
    assert got[-9:] == published[-9:], "the newest events (and the marker) are kept"
    assert got[-10].startswith(DROPPED_EVENT)
    metrics = await scrape(client, broker.url)
    assert sum(counts) == subscriber.dropped == metrics["sse_broker_events_dropped_total"]
    assert sum(counts) >= 24


async def test_drop_newest_over_http_keeps_the_oldest_and_reports_drops_after_them(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(queue_size=8, overflow="drop-newest")
    published, stream, subscriber = await overflow_then_resume(broker, client, 8)
    counts = check_announced_gaps(published, stream.frames)
    got = received(stream.frames)
    assert got[-2].startswith(DROPPED_EVENT), "the notice follows the kept (oldest) events"
    assert got[-1] == published[-1]
    assert published[-2] not in got, "the newest overflowing events are the ones dropped"
    metrics = await scrape(client, broker.url)
    assert sum(counts) == subscriber.dropped == metrics["sse_broker_events_dropped_total"]
    assert sum(counts) >= 24


async def test_disconnect_policy_over_http_closes_the_stuck_connection(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(queue_size=8, overflow="disconnect")
    stream, subscriber = await stuck_subscriber(broker, "slow")
    with stream:
        params = {"topic": "slow"}
        async with aconnect_sse(client, "GET", f"{broker.url}/events", params=params):
            published = await publish_until(
                broker, client, lambda: subscriber.close_reason is not None
            )
            await wait_for(lambda: broker.state.hub.connection_count == 1)
        await stream.read_to_end()
    assert not stream.body.complete, "cut, not ended: the client must resume with its id"
    assert published[-1] not in received(stream.frames)
    await wait_for(lambda: broker.state.hub.connection_count == 0)
    metrics = await scrape(client, broker.url)
    assert metrics['sse_broker_disconnects_total{reason="overflow"}'] == 1
    assert metrics['sse_broker_disconnects_total{reason="client"}'] == 1
    assert metrics["sse_broker_events_dropped_total"] == subscriber.dropped >= 1


async def test_stuck_client_that_goes_away_is_removed_promptly(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """A client that leaves while its stream waits for the socket is noticed all the same."""
    broker = await make_broker(queue_size=8)
    stream, subscriber = await stuck_subscriber(broker, "slow")
    with stream:
        await publish_until(broker, client, lambda: subscriber.queued > 0)
    await wait_for(lambda: broker.state.hub.connection_count == 0)
    assert broker.state.hub.index_size == 0
    assert broker.state.stats.disconnects[CloseReason.CLIENT] == 1


async def test_stuck_subscriber_does_not_slow_or_starve_the_readers(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """Three readers take 10,000 events, in order and complete, while a fourth connection
    reads nothing; its queue stays within its limits and only it loses events."""
    queue_size, queue_bytes = 256, 512 * 1024
    broker = await make_broker(
        queue_size=queue_size, queue_bytes=queue_bytes, max_event_bytes=64 * 1024
    )
    total, batch_size, window, pad = 10_000, 100, 300, "x" * 1024
    readers: list[list[int]] = [[], [], []]
    progress = asyncio.Event()

    async def read(into: list[int]) -> None:
        params = {"topic": "load"}
        async with aconnect_sse(client, "GET", f"{broker.url}/events", params=params) as source:
            async for event in events_of(source):
                assert event.event == "message", event
                into.append(int(event.data.partition(":")[0]))
                progress.set()
                if len(into) == total:
                    return

    stuck_stream, stuck = await stuck_subscriber(broker, "load")
    with stuck_stream:
        reading = [asyncio.create_task(read(into)) for into in readers]
        try:
            await wait_for(lambda: broker.state.hub.connection_count == 4)
            transport = stuck._transport
            assert transport is not None
            high_water = transport.get_write_buffer_limits()[1]
            batch_bytes = batch_size * (len(pad) + 128)
            fullest = 0
            for first in range(1, total + 1, batch_size):
                while first - 1 - min(map(len, readers)) > window:
                    progress.clear()
                    await progress.wait()
                await publish_batch(client, broker.url, "load", first, batch_size, pad)
                assert stuck.queued <= queue_size
                assert queued_bytes(stuck) <= queue_bytes
                assert transport.get_write_buffer_size() <= high_water + batch_bytes + queue_bytes
                fullest = max(fullest, stuck.queued)
            await asyncio.wait_for(asyncio.gather(*reading), 60)
        finally:
            for task in reading:
                await finish_reading(task)
    for into in readers:
        assert into == list(range(1, total + 1))
    assert fullest == queue_size, "the stuck queue reached its limit"
    assert stuck.dropped > 0
    assert broker.state.stats.dropped == stuck.dropped
    metrics = await scrape(client, broker.url)
    assert metrics["sse_broker_events_dropped_total"] == stuck.dropped

"""The take-over contract, against the real aiohttp.

Once a stream's opening bytes are out, its ``Subscriber`` becomes the transport's
protocol and ``release_connection`` tells aiohttp the connection is gone (see
``broker.web.stream``). aiohttp has no public call for that, so these tests pin what we
rely on: aiohttp lets go of everything it had for the connection (request, handler,
response, task, its connection list) and never writes to it again; the bytes stay valid
HTTP/1.1 (or HTTP/1.0) across the hand-over; the server keeps accepting; and since
aiohttp's own graceful shutdown no longer sees these connections, the hub's ends them:
cleanly if the client reads, by a cut after the budget if it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import socket
from collections.abc import Callable, Collection

import httpx
import pytest
from aiohttp import web

from broker.subscriber import CloseReason, Subscriber
from tests.conftest import (
    PREAMBLE,
    Broker,
    BrokerFactory,
    RawConnection,
    RawStream,
    open_raw,
    publish,
    wait_for,
)
from tests.test_stream import subscribers

LINGER_ZERO = b"\x01\x00\x00\x00\x00\x00\x00\x00"
TERMINATOR = b"0\r\n\r\n"
CHUNK_SIZE_LINE = re.compile(rb"([0-9a-f]+)\r\n")


def split_head(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """Status line, headers (lower-case names, each seen once) and the bytes after."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete response head in {raw[:200]!r}"
    status, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        assert colon, f"malformed header line {line!r}"
        assert name == name.strip(), f"malformed header line {line!r}"
        assert name.lower() not in headers, f"header {name} repeated"
        headers[name.lower()] = value.strip()
    return status, headers, body


def parse_chunked_strictly(body: bytes) -> list[bytes]:
    """The chunks of a complete chunked body, which must be all of ``body``: lower-case
    hex sizes without leading zeros or extensions, CRLF after each chunk, then the zero
    chunk with no trailers, and not one byte after it."""
    chunks: list[bytes] = []
    position = 0
    while True:
        size_line = CHUNK_SIZE_LINE.match(body, position)
        assert size_line, f"no chunk-size line at {position}: {body[position : position + 40]!r}"
        size = int(size_line.group(1), 16)
        assert size_line.group(1) == b"%x" % size, f"chunk size {size_line.group(1)!r}"
        start = size_line.end()
        if size == 0:
            assert body[start:] == b"\r\n", f"bytes after the terminating chunk: {body[start:]!r}"
            return chunks
        assert len(body) >= start + size + 2, "the body ended inside a chunk"
        assert body[start + size : start + size + 2] == b"\r\n", f"chunk at {position} overruns"
        chunks.append(body[start : start + size])
        position = start + size + 2


def frame(event_id: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"id: {event_id}\n{lines}\n".encode()


# --- looking inside aiohttp and the broker ----------------------------------------------


def port_of(broker: Broker) -> int:
    port = broker.server.port
    assert port is not None
    return port


def aiohttp_server(broker: Broker) -> web.Server:
    runner = broker.server.runner
    assert runner is not None
    assert runner.server is not None
    return runner.server


def held_by_aiohttp(broker: Broker, clients: Collection[socket.socket]) -> list[web.RequestHandler]:
    """The connections aiohttp still tracks among ``clients``' (matched by address).

    A handler that has let go of its transport but is still listed counts too: which
    client it served is no longer known, and it is not gone yet.
    """
    addresses = {client.getsockname() for client in clients}
    held: list[web.RequestHandler] = []
    for handler in aiohttp_server(broker).connections:
        transport = handler.transport
        if transport is None or transport.get_extra_info("peername") in addresses:
            held.append(handler)
    return held


async def taken_over(broker: Broker, clients: Collection[socket.socket]) -> None:
    """Wait until aiohttp tracks none of ``clients``' connections: every stream on them
    has been handed over (or the take-over contract is broken, and this fails)."""
    try:
        await wait_for(lambda: not held_by_aiohttp(broker, clients))
    except AssertionError:
        held = held_by_aiohttp(broker, clients)
        raise AssertionError(f"aiohttp still tracks {len(held)} stream connections") from None


CENSUS: dict[str, type] = {
    "request": web.BaseRequest,
    "request handler": web.RequestHandler,
    "response": web.StreamResponse,
    "subscriber": Subscriber,
}


def census() -> dict[str, int]:
    """How many objects of each kind in ``CENSUS`` are alive, after a full collection."""
    gc.collect()
    counts = dict.fromkeys(CENSUS, 0)
    for obj in gc.get_objects():
        for name, kind in CENSUS.items():
            if isinstance(obj, kind):
                counts[name] += 1
    return counts


def has_events(stream: RawStream) -> Callable[[], bool]:
    return lambda: bool(stream.events())


def sockets(streams: list[RawStream]) -> list[socket.socket]:
    return [stream.sock for stream in streams]


# --- (a, b) aiohttp lets go of everything it had for a stream ---------------------------


async def test_live_streams_hold_no_aiohttp_request_state_and_no_task(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """50 open streams cost 50 subscribers: no request, handler, response or task each,
    and they are not on aiohttp's connection list; yet each still gets every event."""
    count = 50
    before = census()
    tasks_before = len(asyncio.all_tasks())
    streams = [await open_raw(broker, "topic=live") for _ in range(count)]
    try:
        await taken_over(broker, sockets(streams))
        assert broker.state.hub.connection_count == count
        assert census() == {**before, "subscriber": before["subscriber"] + count}
        assert len(asyncio.all_tasks()) == tasks_before, "a task per live stream"
        event_id = await publish(client, broker.url, "live", "to every stream")
        for stream in streams:
            await stream.read_until(has_events(stream))
            [received] = stream.events()
            assert (received.id, received.data) == (event_id, "to every stream")
    finally:
        for stream in streams:
            stream.close()
    await wait_for(lambda: broker.state.hub.connection_count == 0)


async def test_streams_that_came_and_went_leave_nothing_behind(broker: Broker) -> None:
    """After streams connect, are taken over and leave (by FIN or reset), aiohttp and the
    broker hold nothing more than before they came."""
    count = 50
    hub = broker.state.hub
    before = census()
    tasks_before = len(asyncio.all_tasks())
    streams = [await open_raw(broker, f"topic=gone/{n}&topic=gone/*") for n in range(count)]
    try:
        await taken_over(broker, sockets(streams))
        assert hub.connection_count == count
    finally:
        for n, stream in enumerate(streams):
            if n % 2:
                stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
            stream.close()
    await wait_for(lambda: hub.connection_count == 0)
    assert hub.index_size == 0
    assert not aiohttp_server(broker).connections
    assert census() == before
    assert len(asyncio.all_tasks()) == tasks_before
    assert broker.state.stats.disconnects == {CloseReason.CLIENT: count}


# --- (c, f) the bytes on the wire -------------------------------------------------------


async def test_wire_is_valid_chunked_http_across_the_take_over(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """Head and opening chunk come from aiohttp, events and the terminator from the
    subscriber: together one well-formed chunked response, each event its own chunk."""
    broker = await make_broker(heartbeat=60)
    with await RawConnection.stream(broker, "topic=c/a&topic=c/b") as connection:
        await taken_over(broker, [connection.sock])
        published: list[tuple[str, str]] = []
        published.append((await publish(client, broker.url, "c/a", "one"), "one"))
        batch = [("c/a", "run 1"), ("c/a", "run 2"), ("c/a", "run 3"), ("c/b", "other")]
        batch += [("c/a", "two\nlines"), ("c/b", "ünïcode ✓"), ("c/b", "x" * 20_000)]
        response = await client.post(
            f"{broker.url}/publish", json=[{"topic": t, "data": d} for t, d in batch]
        )
        assert response.status_code == 200, response.text
        published += zip(response.json()["ids"], [data for _, data in batch], strict=True)

        await broker.server.close()
        await connection.read_to_end()
    assert not connection.reset, "the stream must end with a FIN, not a reset"

    status, headers, body = split_head(bytes(connection.data))
    assert status == "HTTP/1.1 200 OK"
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    chunks = parse_chunked_strictly(body)
    assert chunks[0] == PREAMBLE
    assert chunks[1:] == [frame(event_id, data) for event_id, data in published]
    assert broker.state.stats.disconnects == {CloseReason.SHUTDOWN: 1}


async def test_http_1_0_stream_is_plain_frames_ended_by_the_close(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """No chunking before HTTP/1.1, before or after the take-over: the body is the bare
    frames, and the connection closing is its end."""
    broker = await make_broker(heartbeat=60)
    with await RawConnection.stream(broker, "topic=old", version="1.0") as connection:
        await taken_over(broker, [connection.sock])
        event_id = await publish(client, broker.url, "old", "one\ntwo")
        await connection.read_until(lambda data: data.endswith(frame(event_id, "one\ntwo")))
        await broker.server.close()
        await connection.read_to_end()
    assert not connection.reset
    status, headers, body = split_head(bytes(connection.data))
    assert status == "HTTP/1.0 200 OK"
    assert "transfer-encoding" not in headers
    assert "content-length" not in headers
    assert body == PREAMBLE + frame(event_id, "one\ntwo")
    assert broker.state.stats.disconnects == {CloseReason.SHUTDOWN: 1}


async def test_bytes_a_client_sends_after_the_take_over_are_ignored(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """aiohttp's parser is gone with the request: a request pipelined on a stream's
    connection gets no response spliced into the event stream."""
    broker = await make_broker(heartbeat=60)
    with await RawConnection.stream(broker, "topic=p") as connection:
        await taken_over(broker, [connection.sock])
        await connection.send(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
        await connection.send(b"not even HTTP\r\n\r\n")
        first = await publish(client, broker.url, "p", "first")
        await connection.read_until(lambda data: frame(first, "first") in data)
        second = await publish(client, broker.url, "p", "second")
        await connection.read_until(lambda data: frame(second, "second") in data)
        await broker.server.close()
        await connection.read_to_end()
    _, _, body = split_head(bytes(connection.data))
    assert parse_chunked_strictly(body) == [
        PREAMBLE,
        frame(first, "first"),
        frame(second, "second"),
    ]


# --- (d) shutdown of connections aiohttp no longer knows --------------------------------


async def test_server_close_ends_taken_over_streams_with_the_terminator_and_a_fin(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(heartbeat=60)
    connections = [await RawConnection.stream(broker, f"topic=s/{n}") for n in range(3)]
    try:
        await taken_over(broker, [connection.sock for connection in connections])
        event_id = await publish(client, broker.url, "s/0", "before shutdown")
        await broker.server.close()
        for connection in connections:
            await connection.read_to_end()
    finally:
        for connection in connections:
            connection.close()
    for n, connection in enumerate(connections):
        assert not connection.reset
        _, _, body = split_head(bytes(connection.data))
        events = [frame(event_id, "before shutdown")] if n == 0 else []
        assert parse_chunked_strictly(body) == [PREAMBLE, *events]
    assert broker.state.hub.connection_count == 0
    assert broker.state.stats.disconnects == {CloseReason.SHUTDOWN: 3}


async def test_stuck_taken_over_stream_is_cut_after_the_budget_and_shutdown_finishes(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """A client that reads nothing cannot take its end; after the budget (half the
    shutdown timeout) its connection is cut, and the readers' streams still end cleanly."""
    broker = await make_broker(shutdown_timeout=2, heartbeat=60)
    reader = await RawConnection.stream(broker, "topic=fast")
    stuck = await open_raw(broker, "topic=slow", receive_buffer=4096)
    with reader, stuck:
        await taken_over(broker, [reader.sock, stuck.sock])
        [stuck_subscriber] = [s for s in subscribers(broker) if s.selector.patterns == ("slow",)]
        published = 0
        while stuck_subscriber.queued == 0:
            assert published < 5_000, "the stuck socket never backed up"
            batch = [{"topic": "slow", "data": "x" * 2048} for _ in range(10)]
            response = await client.post(f"{broker.url}/publish", json=batch)
            assert response.status_code == 200, response.text
            published += 10
        event_id = await publish(client, broker.url, "fast", "for the reader")

        await asyncio.wait_for(broker.server.close(), 60)

        await reader.read_to_end()
        await stuck.read_to_end()
    assert broker.state.hub.connection_count == 0
    assert not reader.reset
    _, _, body = split_head(bytes(reader.data))
    assert parse_chunked_strictly(body) == [PREAMBLE, frame(event_id, "for the reader")]
    assert not stuck.body.complete, "cut: the end of its stream never got out"
    assert broker.state.stats.disconnects == {CloseReason.SHUTDOWN: 2}


# --- (e) clients that leave -------------------------------------------------------------


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_client_that_leaves_a_taken_over_stream_is_forgotten_promptly(
    make_broker: BrokerFactory, how: str
) -> None:
    """Nothing is written to an idle stream (the heartbeat is a minute away), so only
    the transport's own notice can tell the subscriber the client left."""
    broker = await make_broker(heartbeat=60)
    hub = broker.state.hub
    stream = await open_raw(broker, "topic=bye&topic=bye/**")
    with stream:
        await taken_over(broker, [stream.sock])
        assert hub.connection_count == 1
        if how == "reset":
            stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    await wait_for(lambda: hub.connection_count == 0)
    assert hub.index_size == 0
    assert broker.state.stats.disconnects == {CloseReason.CLIENT: 1}


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_client_leaving_before_its_stream_starts_is_not_logged_as_a_bug(
    broker: Broker, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Regression: a client that sends its request and leaves at once (the broker's loop
    sees the request, then the end, before the handler writes the head) made the handler
    raise ``ConnectionError`` into the error middleware, which logged "unhandled error"
    with a traceback and tried to answer 500; the log record also kept the request alive."""
    loop = asyncio.get_running_loop()
    before = census()
    attempts = 20
    for _ in range(attempts):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        with sock:
            await loop.sock_connect(sock, ("127.0.0.1", port_of(broker)))
            # Request and end together, with no await between: the loop that serves the
            # broker also runs this test, so it finds both when it first reads.
            sock.send(b"GET /events?topic=early HTTP/1.1\r\nHost: broker\r\n\r\n")
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
            else:
                sock.shutdown(socket.SHUT_WR)
                with contextlib.suppress(ConnectionResetError):
                    while await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
                        pass
    await wait_for(lambda: broker.state.hub.connection_count == 0)
    await wait_for(lambda: not aiohttp_server(broker).connections)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []
    disconnects = broker.state.stats.disconnects
    assert set(disconnects) <= {CloseReason.CLIENT}
    if how == "fin":  # a reset may discard the request before the broker reads it
        assert disconnects[CloseReason.CLIENT] == attempts
    assert census() == before


# --- (g) the server keeps serving -------------------------------------------------------


async def test_new_connections_are_served_after_a_stream_was_taken_over(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    first = await open_raw(broker, "topic=k")
    with first:
        await taken_over(broker, [first.sock])
        response = await client.get(f"{broker.url}/healthz")
        assert response.status_code == 200
        second = await open_raw(broker, "topic=k")
        with second:
            await taken_over(broker, [first.sock, second.sock])
            event_id = await publish(client, broker.url, "k", "both")
            for stream in (first, second):
                await stream.read_until(has_events(stream))
                assert [event.id for event in stream.events()] == [event_id]
        response = await client.get(f"{broker.url}/healthz")
        assert response.status_code == 200
    await wait_for(lambda: broker.state.hub.connection_count == 0)

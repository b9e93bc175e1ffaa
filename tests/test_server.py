"""The HTTP server layer (``broker.web.server``), over raw sockets on 127.0.0.1.

A raw socket is the only client that can stop in the middle of a request line, send a
header a byte at a time, or send bytes no HTTP library would: exactly what a slow-loris
client or a fuzzer does. Deadlines in these tests only keep a failing test from hanging;
what they check is behaviour: who gets cut, what they are told, and who is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Broker, BrokerFactory, open_raw, publish, wait_for

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
DEADLINE = 10.0


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Connection:
    """One client connection that sends exactly the bytes a test gives it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, broker: Broker) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.server.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> Answer:
        """The next response: its head, and as much body as its Content-Length says."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), DEADLINE)
        return Answer(int(status_line.split(" ")[1]), headers, body)

    async def ended(self) -> bool:
        """Whether the broker ends the connection (without sending more) within the deadline."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), DEADLINE)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        assert rest == b"", rest
        return True

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def connected(broker: Broker) -> AsyncIterator[Connection]:
    connection = await Connection.open(broker)
    try:
        yield connection
    finally:
        connection.close()


def assert_error(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["content-type"].split(";")[0] == "application/json"
    body: dict[str, Any] = answer.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


def open_connections(broker: Broker) -> int:
    """Connections aiohttp holds (event streams leave it after their head)."""
    return len(broker.server.handler.connections)


async def trickle(connection: Connection, byte: bytes = b"a") -> None:
    """Send one byte every few milliseconds until the broker stops taking them."""
    with contextlib.suppress(ConnectionError):
        while not connection.writer.is_closing():
            await connection.send(byte)
            await asyncio.sleep(0.02)


async def cut_while_trickling(connection: Connection) -> bytes:
    """Trickle until the broker ends the connection; return what it sent before."""
    sender = asyncio.create_task(trickle(connection))
    try:
        received = await asyncio.wait_for(connection.reader.read(), DEADLINE)
    except ConnectionResetError:
        received = b""
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    return received


# --- the head deadline -------------------------------------------------------------------


async def test_a_client_that_sends_nothing_is_answered_408_and_disconnected(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(header_timeout=0.3)
    async with connected(broker) as connection:
        body = assert_error(await connection.answer(), 408, "request_timeout")
        assert "0.3 s" in body["detail"]
        assert await connection.ended()
    await wait_for(lambda: open_connections(broker) == 0)


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(b"GET /healthz HT", id="request-line"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: ", id="headers"),
        pytest.param(b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\n", id="publish-head"),
    ],
)
async def test_a_partial_head_is_answered_408_and_disconnected(
    make_broker: BrokerFactory, partial: bytes
) -> None:
    broker = await make_broker(header_timeout=0.3)
    async with connected(broker) as connection:
        await connection.send(partial)
        assert_error(await connection.answer(), 408, "request_timeout")
        assert await connection.ended()
    await wait_for(lambda: open_connections(broker) == 0)


async def test_a_head_trickled_byte_by_byte_is_cut(make_broker: BrokerFactory) -> None:
    """Each byte is progress of a sort, but the deadline is for the whole head."""
    broker = await make_broker(header_timeout=0.3)
    async with connected(broker) as connection:
        await connection.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        received = await cut_while_trickling(connection)
    # The 408 normally arrives; a reset (bytes still arriving as it closes) may destroy it.
    assert received == b"" or received.startswith(b"HTTP/1.0 408 "), received
    await wait_for(lambda: open_connections(broker) == 0)


async def test_a_head_sent_in_pieces_within_the_deadline_is_served(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(header_timeout=5)
    async with connected(broker) as connection:
        for piece in (b"GET /heal", b"thz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"):
            await connection.send(piece)
            await asyncio.sleep(0.1)
        answer = await connection.answer()
    assert answer.status == 200
    assert answer.json() == {"status": "ok"}


async def test_an_idle_kept_alive_connection_is_not_cut_by_the_head_deadline(
    make_broker: BrokerFactory,
) -> None:
    """Between requests the wait is aiohttp's keep-alive timeout's; the head deadline starts
    with the next request's first byte."""
    broker = await make_broker(header_timeout=0.3)
    async with connected(broker) as connection:
        await connection.send(HEALTHZ)
        assert (await connection.answer()).status == 200
        await asyncio.sleep(1.0)
        await connection.send(HEALTHZ)
        assert (await connection.answer()).status == 200


async def test_a_trickled_second_request_on_a_kept_alive_connection_is_cut(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(header_timeout=0.3)
    async with connected(broker) as connection:
        await connection.send(HEALTHZ)
        assert (await connection.answer()).status == 200
        await connection.send(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        received = await cut_while_trickling(connection)
    assert received == b"" or received.startswith(b"HTTP/1.0 408 "), received
    await wait_for(lambda: open_connections(broker) == 0)


async def test_an_event_stream_outlives_the_head_deadline(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(header_timeout=0.3)
    with await open_raw(broker, "topic=long") as stream:
        await asyncio.sleep(1.5)
        event_id = await publish(client, broker.url, "long", "still here")
        await stream.read_until(lambda: bool(stream.events()))
        assert not stream.eof
    (event,) = stream.events()
    assert (event.id, event.data) == (event_id, "still here")


async def test_a_publish_stream_outlives_the_head_deadline(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """The body is not the head: an NDJSON stream is bounded by --body-timeout's pauses."""
    broker = await make_broker(header_timeout=0.3, body_timeout=5)

    async def lines() -> AsyncIterator[bytes]:
        for number in range(6):
            yield orjson.dumps({"topic": "slow", "data": str(number)}) + b"\n"
            await asyncio.sleep(0.2)

    response = await client.post(
        f"{broker.url}/publish", content=lines(), headers={"Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["ids"]) == 6


# --- what aiohttp's parser refuses ---------------------------------------------------------


def many_headers(count: int) -> bytes:
    return b"".join(b"X-Header-%d: y\r\n" % number for number in range(count))


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, "bad_request", id="no-method"),
        pytest.param(b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="bad-method"),
        pytest.param(b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request", id="bad-version"),
        pytest.param(b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", 400, "bad_request", id="space-in-name"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\x00y\r\n\r\n", 400, "bad_request", id="nul"),
        pytest.param(b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="url-byte"),
        pytest.param(b"GET \xff HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="url-start"),
        pytest.param(b"GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="url"),
        pytest.param(b"\xff\xfe\xfd\xfc\r\n\r\n", 400, "bad_request", id="binary"),
        pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, "bad_request", id="tls"),
        pytest.param(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
            "bad_request",
            id="two-lengths",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "request_header_fields_too_large",
            id="long-header",
        ),
        pytest.param(
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            431,
            "request_header_fields_too_large",
            id="long-url",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many_headers(200) + b"\r\n",
            431,
            "request_header_fields_too_large",
            id="many-headers",
        ),
    ],
)
async def test_an_unparsable_request_gets_a_json_4xx_and_the_connection_ends(
    broker: Broker,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
    status: int,
    code: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with connected(broker) as connection:
        await connection.send(request_bytes)
        body = assert_error(await connection.answer(), status, code)
        assert await connection.ended()
    assert "\n" not in body["detail"]
    assert len(body["detail"]) < 300
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [], "client garbage is not the broker's error"


def mutate(request: bytes, rng: random.Random) -> bytes:
    """A few random byte edits (replace, insert, delete) in the request's head."""
    head_end = request.index(b"\r\n\r\n") + 4
    head, body = bytearray(request[:head_end]), request[head_end:]
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(head))
        edit = rng.choice(("replace", "insert", "delete"))
        if edit == "replace":
            head[position] = rng.randrange(256)
        elif edit == "insert":
            head[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            del head[position]
    return bytes(head) + body


async def test_mutated_requests_never_get_a_server_error(
    make_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Random bytes in request lines and headers: every answer is below 500, an error is
    JSON, and nothing is logged as the broker's failure. A mutation that breaks the head's
    end waits out the head deadline, one that inflates a body length the body deadline."""
    caplog.set_level(logging.DEBUG)
    broker = await make_broker(header_timeout=0.3, body_timeout=0.5)
    event = b'{"topic": "fuzz", "data": "x"}'
    seeds = [
        HEALTHZ,
        b"GET /events?topic=fuzz HTTP/1.1\r\nHost: 127.0.0.1\r\nLast-Event-ID: 1-1\r\n\r\n",
        b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(event), event),
    ]
    rng = random.Random(5)
    requests = [mutate(rng.choice(seeds), rng) for _ in range(60)]

    async def answer_to(request: bytes) -> Answer:
        async with connected(broker) as connection:
            await connection.send(request)
            return await connection.answer()

    answers = await asyncio.gather(*(answer_to(request) for request in requests))
    for request, answer in zip(requests, answers, strict=True):
        assert answer.status < 500, (request, answer)
        if answer.status >= 400:
            assert answer.headers["content-type"].split(";")[0] == "application/json", request
            assert set(answer.json()) >= {"error", "detail"}, (request, answer)
    assert any(answer.status == 400 for answer in answers)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


# --- answers aiohttp would otherwise give itself --------------------------------------------


@pytest.mark.parametrize("path", [b"/publish", b"/events?topic=t", b"/no-such-path"])
@pytest.mark.parametrize("expect", [b"x", b"\xff\xfe"])
async def test_an_unknown_expectation_is_a_json_417_on_every_path(
    broker: Broker, path: bytes, expect: bytes
) -> None:
    """aiohttp answers ``Expect`` before any middleware: plain text, or a 500 for bytes that
    are not UTF-8, and on unknown paths too."""
    async with connected(broker) as connection:
        await connection.send(
            b"POST "
            + path
            + b" HTTP/1.1\r\nHost: t\r\nExpect: "
            + expect
            + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n{}"
        )
        assert_error(await connection.answer(), 417, "expectation_failed")


async def test_100_continue_still_works(broker: Broker) -> None:
    async with connected(broker) as connection:
        await connection.send(
            b"POST /publish HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
            b"Content-Type: application/json\r\nContent-Length: 27\r\nConnection: close\r\n\r\n"
        )
        interim = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await connection.send(b'{"topic": "t", "data": "x"}')
        answer = await connection.answer()
    assert answer.status == 200, answer.body

"""Baseline: the practical fan-out limit of one Python process on this machine.

An ``asyncio.Protocol`` HTTP/1.1 server with no framework: it parses the request line,
the headers and a Content-Length body itself. ``GET /events`` writes the response head
(``text/event-stream``, no chunked encoding, the body ends when the connection closes)
and keeps the transport in a topic -> set-of-transports registry. ``POST /publish``
encodes each event once as ``data: ...`` lines, joins consecutive events for the same
topic into one bytes object, and hands that same object to every subscribed transport
with ``transport.write``: no task, queue, future or copy per subscriber. A transport
whose write buffer is already above ``--max-buffer`` bytes (a reader that stopped) is
skipped and the events are counted as dropped, so memory stays bounded. One timer sends
a comment to every stream as a heartbeat. ``GET /healthz`` reports the stream count and
the dropped total.

    python bench/servers/raw_asyncio.py --host 127.0.0.1 --port 8003
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl

import orjson

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BUFFER = 256 * 1024
HEARTBEAT = b": ping\n\n"
LINE_BREAK = re.compile(r"\r\n|\r|\n")
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
}
# The comment after the head lets a reader that splits on "\ndata: " see the first event.
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Connection: close\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"\r\n"
    b": ok\n\n"
)


class BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def encode_event(data: str) -> bytes:
    """One SSE frame; a multi-line payload becomes one ``data:`` line per line."""
    if "\n" in data or "\r" in data:
        data = "\ndata: ".join(LINE_BREAK.split(data))
    return b"data: " + data.encode() + b"\n\n"


def parse_events(body: bytes) -> list[tuple[str, bytes]]:
    """(topic, encoded frame) pairs from a JSON object or array body."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"invalid JSON: {exc}") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    events = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("topic"), str):
            raise BadRequest(400, "each event needs a string topic")
        data = item.get("data", "")
        if not isinstance(data, str):
            data = orjson.dumps(data).decode()
        events.append((item["topic"], encode_event(data)))
    return events


class Hub:
    """Which transports stream which topics, and the fan-out that writes to them."""

    def __init__(self, max_buffer: int, coalesce: bool) -> None:
        self.topics: dict[str, set[asyncio.Transport]] = {}
        self.streams: set[asyncio.Transport] = set()
        self.max_buffer = max_buffer
        self.coalesce = coalesce
        self.dropped = 0

    def subscribe(self, transport: asyncio.Transport, topics: list[str]) -> None:
        self.streams.add(transport)
        for topic in topics:
            self.topics.setdefault(topic, set()).add(transport)

    def unsubscribe(self, transport: asyncio.Transport, topics: list[str]) -> None:
        self.streams.discard(transport)
        for topic in topics:
            subscribers = self.topics.get(topic)
            if subscribers is not None:
                subscribers.discard(transport)
                if not subscribers:
                    del self.topics[topic]

    def publish(self, events: list[tuple[str, bytes]]) -> None:
        """Write each event's bytes object to each of its topic's transports.

        With ``coalesce``, a run of consecutive events for one topic (a JSON batch) is
        joined first and written as one shared bytes object: one write per subscriber
        per batch instead of per event.
        """
        if not self.coalesce:
            for topic, frame in events:
                subscribers = self.topics.get(topic)
                if subscribers:
                    self._write_all(subscribers, frame, 1)
            return
        start = 0
        while start < len(events):
            topic = events[start][0]
            end = start + 1
            while end < len(events) and events[end][0] == topic:
                end += 1
            subscribers = self.topics.get(topic)
            if subscribers:
                if end - start == 1:
                    payload = events[start][1]
                else:
                    payload = b"".join(frame for _, frame in events[start:end])
                self._write_all(subscribers, payload, end - start)
            start = end

    def heartbeat(self) -> None:
        self._write_all(self.streams, HEARTBEAT, 0)

    def _write_all(self, transports: set[asyncio.Transport], payload: bytes, count: int) -> None:
        limit = self.max_buffer
        skipped = 0
        for transport in transports:
            if transport.is_closing():
                continue
            if transport.get_write_buffer_size() > limit:
                skipped += 1
                continue
            transport.write(payload)
        self.dropped += skipped * count


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    length: int


def parse_head(raw: bytes) -> RequestHead:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise BadRequest(501, "chunked request bodies are not supported; send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise BadRequest(400, "invalid Content-Length") from None
    if length < 0:
        raise BadRequest(400, "invalid Content-Length")
    if length > MAX_BODY_BYTES:
        raise BadRequest(413, f"the body limit is {MAX_BODY_BYTES} bytes")
    return RequestHead(parts[0], parts[1], parts[2], headers, length)


class Connection(asyncio.Protocol):
    """One client connection: plain request/response until it asks for a stream."""

    __slots__ = ("buffer", "head", "hub", "topics", "transport")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: RequestHead | None = None
        self.topics: list[str] | None = None  # set once the connection streams

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports do not subclass asyncio.Transport, so no isinstance here.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.topics is not None and self.transport is not None:
            self.hub.unsubscribe(self.transport, self.topics)
        self.topics = None

    def data_received(self, data: bytes) -> None:
        if self.topics is not None:
            return  # a streaming client has nothing more to say
        self.buffer += data
        try:
            self._process()
        except BadRequest as exc:
            self._respond(exc.status, {"error": exc.detail}, keep_alive=False)

    def _process(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.topics is None and not transport.is_closing():
            if self.head is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEAD_BYTES:
                        raise BadRequest(431, "the request head is too large")
                    return
                self.head = parse_head(bytes(self.buffer[:end]))
                del self.buffer[: end + 4]
                expects = self.head.headers.get("expect", "").lower() == "100-continue"
                if expects and len(self.buffer) < self.head.length:
                    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            head = self.head
            if len(self.buffer) < head.length:
                return
            body = bytes(self.buffer[: head.length])
            del self.buffer[: head.length]
            self.head = None
            self._handle(head, body)

    def _handle(self, head: RequestHead, body: bytes) -> None:
        path, _, query = head.target.partition("?")
        connection = head.headers.get("connection", "").lower()
        if head.version == "HTTP/1.1":
            keep_alive = "close" not in connection
        else:
            keep_alive = "keep-alive" in connection
        route = ROUTES.get(path)
        if route is None:
            raise BadRequest(404, f"no route {path}")
        method, handler = route
        if head.method != method:
            raise BadRequest(405, f"use {method} for {path}")
        handler(self, head, query, body, keep_alive)

    def _stream(self, head: RequestHead, query: str, body: bytes, keep_alive: bool) -> None:
        topics = [value for name, value in parse_qsl(query) if name == "topic"]
        if not topics:
            raise BadRequest(400, "topic is required")
        assert self.transport is not None
        self.transport.write(STREAM_HEAD)
        self.topics = topics
        self.buffer.clear()
        self.hub.subscribe(self.transport, topics)

    def _publish(self, head: RequestHead, query: str, body: bytes, keep_alive: bool) -> None:
        media_type = head.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise BadRequest(415, "send application/json")
        events = parse_events(body)
        self.hub.publish(events)
        self._respond(200, {"published": len(events)}, keep_alive)

    def _healthz(self, head: RequestHead, query: str, body: bytes, keep_alive: bool) -> None:
        status = {"status": "ok", "streams": len(self.hub.streams), "dropped": self.hub.dropped}
        self._respond(200, status, keep_alive)

    def _respond(self, status: int, document: dict[str, Any], keep_alive: bool) -> None:
        transport = self.transport
        assert transport is not None
        body = orjson.dumps(document)
        close = "" if keep_alive else "Connection: close\r\n"
        head = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{close}\r\n"
        )
        transport.write(head.encode() + body)
        if not keep_alive:
            transport.close()


Handler = Callable[[Connection, RequestHead, str, bytes, bool], None]
ROUTES: dict[str, tuple[str, Handler]] = {
    "/events": ("GET", Connection._stream),
    "/publish": ("POST", Connection._publish),
    "/healthz": ("GET", Connection._healthz),
}


async def heartbeat(hub: Hub, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        hub.heartbeat()


async def serve(
    host: str, port: int, max_buffer: int, heartbeat_interval: float, coalesce: bool
) -> None:
    loop = asyncio.get_running_loop()
    hub = Hub(max_buffer, coalesce)
    server = await loop.create_server(lambda: Connection(hub), host, port, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    pinger = asyncio.create_task(heartbeat(hub, heartbeat_interval)) if heartbeat_interval else None
    await stop.wait()
    if pinger is not None:
        pinger.cancel()
    server.close()
    for transport in list(hub.streams):
        transport.close()


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument(
        "--max-buffer",
        type=int,
        default=DEFAULT_MAX_BUFFER,
        help="bytes buffered for one stream above which its events are dropped",
    )
    parser.add_argument(
        "--heartbeat", type=float, default=15.0, help="seconds between comments; 0 disables"
    )
    parser.add_argument(
        "--coalesce",
        action="store_true",
        help="write a batch's consecutive same-topic events as one bytes object",
    )
    args = parser.parse_args()
    raise_file_limit()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.host, args.port, args.max_buffer, args.heartbeat, args.coalesce))


if __name__ == "__main__":
    main()

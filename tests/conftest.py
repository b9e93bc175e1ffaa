"""Shared fixtures: a broker on a real socket, a broker as a real process, SSE readers.

Every test talks to the broker over TCP on 127.0.0.1, through clients we did not write
(httpx and httpx-sse) or through raw sockets where a test needs to control reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import httpx
import jwt
import pytest
import redis
import redis.asyncio
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner
from httpx_sse import EventSource, ServerSentEvent
from playwright.async_api import Browser, async_playwright
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.config import load_config
from broker.web import STATE, BrokerState, create_app
from broker.web.server import BrokerRunner


class BrokerTestServer(TestServer):
    """aiohttp's test server on the runner ``sse-broker serve`` uses, so that tests see the
    same connection handling (head deadline, JSON for unparsable requests)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        config = self.app[STATE].config
        return BrokerRunner(self.app, header_timeout=config.header_timeout, **kwargs)


@dataclasses.dataclass
class Broker:
    """A broker app served on a real socket, with a way to look inside it."""

    server: TestServer
    url: str

    @property
    def state(self) -> BrokerState:
        return self.server.app[STATE]


BrokerFactory = Callable[..., Awaitable[Broker]]


def _flags(overrides: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            argv += [flag, str(item)]
    return argv


@pytest.fixture
async def make_broker() -> AsyncIterator[BrokerFactory]:
    """Start brokers with serve-flag overrides, e.g. ``await make_broker(queue_size=4)``."""
    servers: list[TestServer] = []

    async def start(**overrides: Any) -> Broker:
        # Open publishing unless a test says otherwise: most tests are not about tokens.
        overrides.setdefault("allow_anonymous_publish", True)
        config = load_config(_flags(overrides), environ={})
        server = BrokerTestServer(create_app(config), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Broker(server, f"http://127.0.0.1:{server.port}")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> Broker:
    return await make_broker()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
        yield http


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass
class BrokerProcess:
    process: subprocess.Popen[str]
    url: str
    port: int

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> tuple[int, str]:
        """Send ``signum``, wait for the exit, and return (exit status, stderr)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        return self.process.returncode, stderr


def wait_until_healthy(handle: BrokerProcess) -> None:
    """Wait for ``/healthz``; a broker that exits or never answers fails the test."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(f"broker exited: {handle.process.communicate()[1]}")
        try:
            if httpx.get(f"{handle.url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    handle.process.kill()
    raise RuntimeError("broker did not become healthy")


@pytest.fixture
def broker_process() -> Iterator[Callable[..., BrokerProcess]]:
    """Run ``python -m broker serve`` as a real process on a free port."""
    started: list[BrokerProcess] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> BrokerProcess:
        """Flags as for ``sse-broker serve``; publishing is open unless they say otherwise."""
        port = free_port()
        if not any("anonymous-publish" in flag for flag in flags):
            flags = ("--allow-anonymous-publish", *flags)
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--port", str(port), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        handle = BrokerProcess(process, f"http://127.0.0.1:{port}", port)
        started.append(handle)
        wait_until_healthy(handle)
        return handle

    yield start
    for handle in started:
        if handle.process.poll() is None:
            handle.process.kill()
        handle.process.communicate()  # also closes the pipes of one that died in the test


async def publish(
    http: httpx.AsyncClient, url: str, topic: str | list[str], data: Any, **fields: Any
) -> str:
    """Publish one event as JSON and return its id."""
    response = await http.post(f"{url}/publish", json={"topic": topic, "data": data, **fields})
    assert response.status_code == 200, response.text
    event_id: str = response.json()["id"]
    return event_id


# An HS256 secret as long as the hash (RFC 7518 3.2), as the broker requires.
JWT_KEY = "test-only-hmac-secret-0123456789abcdef"


def mint(
    key: str = JWT_KEY,
    *,
    publish: list[str] | None = None,
    subscribe: list[str] | None = None,
    claim: str = "sse",
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    """A token granting ``publish`` and ``subscribe`` patterns in ``claim`` (``sse`` or
    Mercure's ``mercure``), signed with PyJWT as a user's application would."""
    grants: dict[str, list[str]] = {}
    if publish is not None:
        grants["publish"] = publish
    if subscribe is not None:
        grants["subscribe"] = subscribe
    return jwt.encode({claim: grants, **claims}, key, algorithm=algorithm)


async def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll until ``condition`` holds; a test states what it waits for, not how long."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


SENTINEL = "end"
RECEIVE_TIMEOUT = 10.0


async def until_sentinel(events: AsyncIterator[ServerSentEvent]) -> list[ServerSentEvent]:
    """The events before the one whose data is ``SENTINEL``: published last, and public,
    it makes "received nothing else" a complete statement rather than a timeout."""
    received: list[ServerSentEvent] = []
    while True:
        event = await asyncio.wait_for(anext(events), RECEIVE_TIMEOUT)
        if event.data == SENTINEL:
            return received
        received.append(event)


async def events_of(source: EventSource) -> AsyncIterator[ServerSentEvent]:
    """The events a browser would dispatch.

    httpx-sse also yields the blank-line dispatch that follows the broker's opening
    ``retry:`` field, with empty data; the WHATWG parser dispatches nothing there.
    """
    async for event in source.aiter_sse():
        if event.retry is not None and not event.data:
            continue
        yield event


# --- Chromium: Debian's, driven by Playwright (no browser download) ---------------------

CHROMIUM = Path("/usr/bin/chromium")


@contextlib.asynccontextmanager
async def launch_chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            # Chromium's sandbox cannot start as root (CI containers).
            args=["--no-sandbox"] if os.geteuid() == 0 else [],
        )
        yield launched
        await launched.close()


# --- Redis: a real server, private to the test run unless REDIS_URL names one ------------


@dataclasses.dataclass
class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 that a test can stop and start again on the
    same port: with its data (``SHUTDOWN SAVE``, as a Redis with persistence comes back)
    or without (``SHUTDOWN NOSAVE``, as one without persistence does)."""

    port: int
    directory: Path
    socket_path: Path | None = None  # also listen on this Unix socket
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain synchronous client that fails at once instead of retrying."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=5,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
        )

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed (apt-get install redis-server) "
                "and REDIS_URL is not set"
            )
        self.process = subprocess.Popen(
            [
                binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
                *("--dir", str(self.directory), "--dbfilename", "dump.rdb"),
                *(("--unixsocket", str(self.socket_path)) if self.socket_path else ()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self.process.returncode}")
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self, *, keep_data: bool) -> None:
        """Shut the server down; ``keep_data`` saves the dataset for the next ``start``."""
        process = self.process
        assert process is not None
        command = b"SHUTDOWN SAVE\r\n" if keep_data else b"SHUTDOWN NOSAVE\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(command)
            while sock.recv(4096):  # the server closes the connection as it exits
                pass
        process.wait(timeout=10)
        self.process = None
        if not keep_data:
            (self.directory / "dump.rdb").unlink(missing_ok=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis shared by the session's tests (each uses its own key prefix)."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test_{uuid.uuid4().hex[:12]}"
    yield prefix
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the test run's Redis, for looking at what the broker stored."""
    with redis.Redis.from_url(redis_url) as client:
        yield client


@pytest.fixture
async def async_redis(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, for stopping and restarting it."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


# The broker runs on uvloop in production and on asyncio's own loop where uvloop is absent.
# The stream take-over talks to the transport directly (set_protocol, pause/resume), and
# the server layer times and closes connections itself, where the two loops differ, so the
# tests that exercise them run on both.
BOTH_LOOPS_MODULES = frozenset({"test_takeover", "test_stream", "test_subscriber", "test_server"})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    if module is None or module.__name__.rpartition(".")[2] not in BOTH_LOOPS_MODULES:
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


# --- raw sockets, for tests that must see every byte or decide when (and whether) to read

PREAMBLE = b"retry: 2000\n: ok\n\n"


async def raw_socket(
    port: int, request: bytes, *, receive_buffer: int | None = None
) -> socket.socket:
    """A non-blocking socket to 127.0.0.1:``port`` that has sent ``request``. A small
    ``receive_buffer`` (set before connecting, so the advertised window stays small) makes
    an unread socket back up after kilobytes rather than megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    return sock


class RawSocket:
    """A plain socket, read only when the test says so; subclasses decide what to keep."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.eof = False
        self.reset = False

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def receive(self, within: float = 10.0) -> bool:
        """Read what the socket has (waiting up to ``within`` seconds); False once it ended
        (by FIN or by reset)."""
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 256 * 1024), within)
        except ConnectionResetError:
            self.eof = self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self._feed(data)
        return True

    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    async def read_to_end(self, within: float = 10.0) -> None:
        while await self.receive(within):
            pass

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RawConnection(RawSocket):
    """A socket that sends one request and keeps every byte of the answer, so the whole
    exchange can be parsed strictly afterwards."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.data = bytearray()

    @classmethod
    async def open(
        cls, broker: Broker, request: bytes, *, receive_buffer: int | None = None
    ) -> RawConnection:
        port = broker.server.port
        assert port is not None
        return cls(await raw_socket(port, request, receive_buffer=receive_buffer))

    @classmethod
    async def stream(cls, broker: Broker, query: str, version: str = "1.1") -> RawConnection:
        """``GET /events?query`` that has received its response head and opening bytes."""
        request = f"GET /events?{query} HTTP/{version}\r\nHost: broker\r\n\r\n".encode()
        connection = await cls.open(broker, request)
        await connection.read_until(lambda data: PREAMBLE in data)
        return connection

    def _feed(self, data: bytes) -> None:
        self.data += data

    async def read_until(self, condition: Callable[[bytes], bool], within: float = 10.0) -> None:
        while not condition(bytes(self.data)):
            if not await self.receive(within):
                raise AssertionError(f"the connection ended first: {bytes(self.data)!r}")


@dataclasses.dataclass
class Frame:
    """One SSE block as it appeared on the wire, up to its blank line."""

    fields: list[tuple[str, str]]
    comments: list[str]

    def last(self, name: str) -> str | None:
        values = [value for field, value in self.fields if field == name]
        return values[-1] if values else None

    @property
    def id(self) -> str | None:
        return self.last("id")

    @property
    def event(self) -> str | None:
        return self.last("event")

    @property
    def data(self) -> str | None:
        lines = [value for field, value in self.fields if field == "data"]
        return "\n".join(lines) if lines else None


def parse_block(block: str) -> Frame:
    frame = Frame([], [])
    for line in block.split("\n"):
        if line.startswith(":"):
            frame.comments.append(line[1:])
            continue
        name, _, value = line.partition(":")
        frame.fields.append((name, value.removeprefix(" ")))
    return frame


class ChunkedBody:
    """An HTTP/1.1 chunked body decoded as it arrives.

    ``complete`` tells a clean end (the zero-size terminating chunk) from a cut connection.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.complete = False
        self._pending = bytearray()

    def feed(self, raw: bytes) -> None:
        self._pending += raw
        offset = 0
        pending = self._pending
        while not self.complete:
            line_end = pending.find(b"\r\n", offset)
            if line_end < 0:
                break
            size = int(bytes(pending[offset:line_end]).split(b";")[0], 16)
            start = line_end + 2
            if len(pending) < start + size + 2:
                break
            assert pending[start + size : start + size + 2] == b"\r\n", "malformed chunk"
            if size == 0:
                self.complete = True
            else:
                self.data += pending[start : start + size]
            offset = start + size + 2
        del pending[:offset]


class RawStream(RawSocket):
    """An event stream: the response head, the chunked body and its SSE blocks, decoded as
    they arrive."""

    def __init__(self, sock: socket.socket, *, http: bool = True) -> None:
        super().__init__(sock)
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = ChunkedBody()
        self.frames: list[Frame] = []
        self._head = bytearray() if http else None
        self._scanned = 0

    @classmethod
    async def connect(
        cls,
        port: int,
        target: str,
        *,
        headers: Mapping[str, str] | None = None,
        receive_buffer: int | None = None,
    ) -> RawStream:
        """Send ``GET target``. A small ``receive_buffer`` makes an unread socket back up
        after kilobytes rather than megabytes."""
        lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        return cls(await raw_socket(port, request, receive_buffer=receive_buffer))

    def _feed(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line, *header_lines = bytes(self._head[:end]).decode("latin-1").split("\r\n")
            self.status = int(status_line.split(" ")[1])
            for line in header_lines:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            assert self.headers.get("transfer-encoding") == "chunked", self.headers
            data = bytes(self._head[end + 4 :])
            self._head = None
        self.body.feed(data)
        body = self.body.data
        while (end := body.find(b"\n\n", self._scanned)) >= 0:
            self.frames.append(parse_block(bytes(body[self._scanned : end]).decode("utf-8")))
            self._scanned = end + 2

    async def read_until(self, condition: Callable[[], bool], within: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError("condition not met in time")
            try:
                ended = not await self.receive(remaining)
            except TimeoutError:
                continue
            if ended and not condition():
                raise AssertionError("the stream ended before the condition was met")

    def events(self) -> list[Frame]:
        """Blocks a browser would dispatch (they carry ``data``)."""
        return [frame for frame in self.frames if frame.data is not None]

    def comment_blocks(self) -> list[Frame]:
        return [frame for frame in self.frames if not frame.fields]


async def open_raw(
    broker: Broker,
    query: str,
    *,
    headers: Mapping[str, str] | None = None,
    receive_buffer: int | None = None,
) -> RawStream:
    """A raw stream that has received its response head and opening bytes."""
    port = broker.server.port
    assert port is not None
    stream = await RawStream.connect(
        port, f"/events?{query}", headers=headers, receive_buffer=receive_buffer
    )
    try:
        await stream.read_until(lambda: bool(stream.frames))
    except BaseException:
        stream.close()
        raise
    return stream


@pytest.fixture(params=["memory", "redis"])
def backend_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Serve flags for each backend in turn: a test taking it runs on both."""
    if request.param == "memory":
        return {}
    return {
        "redis_url": request.getfixturevalue("redis_url"),
        "redis_prefix": request.getfixturevalue("redis_prefix"),
    }

"""Shared fixtures: a broker on a real socket, a broker as a real process, SSE readers.

Every test talks to the broker over TCP on 127.0.0.1, through clients we did not write
(httpx and httpx-sse) or through raw sockets where a test needs to control reading.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestServer
from httpx_sse import EventSource, ServerSentEvent

from broker.config import load_config
from broker.web import STATE, BrokerState, create_app


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
        for item in value if isinstance(value, (list, tuple)) else [value]:
            argv += [flag, str(item)]
    return argv


@pytest.fixture
async def make_broker() -> AsyncIterator[BrokerFactory]:
    """Start brokers with serve-flag overrides, e.g. ``await make_broker(queue_size=4)``."""
    servers: list[TestServer] = []

    async def start(**overrides: Any) -> Broker:
        config = load_config(_flags(overrides), environ={})
        server = TestServer(create_app(config), host="127.0.0.1")
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


@pytest.fixture
def broker_process() -> Iterator[Callable[..., BrokerProcess]]:
    """Run ``python -m broker serve`` as a real process on a free port."""
    started: list[BrokerProcess] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> BrokerProcess:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--port", str(port), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"broker exited: {process.communicate()[1]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            process.kill()
            raise RuntimeError("broker did not become healthy")
        handle = BrokerProcess(process, url, port)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.process.poll() is None:
            handle.process.kill()
            handle.process.communicate()


async def publish(
    http: httpx.AsyncClient, url: str, topic: str | list[str], data: Any, **fields: Any
) -> str:
    """Publish one event as JSON and return its id."""
    response = await http.post(f"{url}/publish", json={"topic": topic, "data": data, **fields})
    assert response.status_code == 200, response.text
    event_id: str = response.json()["id"]
    return event_id


async def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll until ``condition`` holds; a test states what it waits for, not how long."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def events_of(source: EventSource) -> AsyncIterator[ServerSentEvent]:
    """The events a browser would dispatch.

    httpx-sse also yields the blank-line dispatch that follows the broker's opening
    ``retry:`` field, with empty data; the WHATWG parser dispatches nothing there.
    """
    async for event in source.aiter_sse():
        if event.retry is not None and not event.data:
            continue
        yield event

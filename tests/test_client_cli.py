"""``sse-broker tail``, ``publish`` and ``bridge`` as real processes, against a live broker
and, for ``bridge``, a local stand-in for an OpenAI-compatible streaming endpoint.

Output is read line by line while the commands run: the point of these commands is that
each event goes through the moment it exists, not when a stream ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.client import Event, Publisher, Subscriber
from broker.subscriber import CloseReason
from tests.conftest import JWT_KEY, Broker, BrokerFactory, free_port, mint, wait_for
from tests.test_client import collect

# Generous bound on anything a test waits for; never a speed assertion.
DEADLINE = 30.0


def environment(**variables: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return {**inherited, **variables}


async def start(
    *args: str, env: dict[str, str] | None = None, stdin: bool = False
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment(**(env or {})),
    )


async def line_of(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(DEADLINE):
        return (await process.stdout.readline()).decode()


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """Wait for the exit; (status, rest of stdout, stderr)."""
    try:
        async with asyncio.timeout(DEADLINE):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def subscribed(broker: Broker, count: int = 1) -> None:
    await wait_for(lambda: broker.state.hub.connection_count == count, DEADLINE)


# --- tail ---------------------------------------------------------------------------------


async def test_tail_prints_each_event_as_it_arrives_and_stops_quietly_on_ctrl_c(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(retry=20)
    tail = await start("tail", broker.url, "--topic", "chat/*")
    try:
        await subscribed(broker)
        async with Publisher(broker.url) as publisher:
            # Each line is read while the broker and the command are still running.
            await publisher.publish("chat/1", "one")
            assert await line_of(tail) == "one\n"
            await publisher.publish("chat/2", "two\nlines", event="typed")
            assert [await line_of(tail), await line_of(tail)] == ["two\n", "lines\n"]
            broker.state.hub.close_all(CloseReason.SHUTDOWN)
            await publisher.publish("chat/1", "after the stream ended")
            assert await line_of(tail) == "after the stream ended\n"
        tail.send_signal(signal.SIGINT)
        status, rest, stderr = await finish(tail)
    finally:
        if tail.returncode is None:
            tail.kill()
    assert status == 130
    assert rest == ""
    assert "Traceback" not in stderr


async def test_tail_json_until_done_reads_the_url_from_the_environment(
    broker: Broker,
) -> None:
    tail = await start(
        "tail",
        "--topic",
        "llm/1",
        "--json",
        "--until-data",
        "[DONE]",
        env={"BROKER_URL": broker.url},
    )
    await subscribed(broker)
    async with Publisher(broker.url) as publisher:
        first = await publisher.publish("llm/1", '{"choices": []}', event="chunk")
        assert orjson.loads(await line_of(tail)) == {
            "id": first,
            "event": "chunk",
            "data": '{"choices": []}',
        }
        await publisher.publish("llm/1", "[DONE]")
        await publisher.publish("llm/1", "never printed")
    status, rest, stderr = await finish(tail)
    assert (status, rest, stderr) == (0, "", "")


async def test_tail_refused_exits_1_with_one_line(broker: Broker) -> None:
    tail = await start("tail", broker.url, "--topic", "a/**/b")
    status, stdout, stderr = await finish(tail)
    assert status == 1
    assert stdout == ""
    assert stderr.count("\n") == 1
    assert stderr.startswith("sse-broker tail: error: 400 invalid_subscription")


async def test_tail_without_a_url_is_a_usage_error() -> None:
    status, _, stderr = await finish(await start("tail", "--topic", "t"))
    assert status == 2
    assert "BROKER_URL" in stderr


# --- publish ------------------------------------------------------------------------------


async def test_publish_data_with_a_token_prints_the_id(make_broker: BrokerFactory) -> None:
    broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False)
    token = mint(publish=["news/*"])
    async with Subscriber(broker.url, "news/*") as events:
        command = await start(
            "publish",
            broker.url,
            "--topic",
            "news/eu",
            "--event",
            "headline",
            "hello",
            env={"BROKER_TOKEN": token},
        )
        status, stdout, stderr = await finish(command)
        assert (status, stderr) == (0, "")
        assert await collect(events, 1) == [Event("hello", "headline", stdout.strip())]

    refused = await start("publish", broker.url, "--topic", "news/eu", "x")
    status, stdout, stderr = await finish(refused)
    assert (status, stdout) == (1, "")
    assert stderr.count("\n") == 1
    assert stderr.startswith("sse-broker publish: error: 401 unauthorized")


async def test_publish_to_an_unreachable_broker_exits_1_with_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    status, stdout, stderr = await finish(await start("publish", url, "--topic", "t", "x"))
    assert (status, stdout) == (1, "")
    assert stderr.count("\n") == 1
    assert stderr.startswith(f"sse-broker publish: error: cannot reach the broker at {url}: ")


async def test_publish_dash_streams_each_line_of_stdin_as_it_is_read(broker: Broker) -> None:
    async with Subscriber(broker.url, "llm/1") as events:
        command = await start(
            "publish", "--topic", "llm/1", "-", env={"BROKER_URL": broker.url}, stdin=True
        )
        assert command.stdin is not None
        try:
            command.stdin.write(b'{"choices": [{"delta": {"content": "Hi"}}]}\n')
            await command.stdin.drain()
            # Seen while standard input is still open.
            first = await collect(events, 1)
            assert first[0].data == '{"choices": [{"delta": {"content": "Hi"}}]}'
            command.stdin.write(b'\n{"data": "an event object", "event": "note"}\r\n[DONE]\n')
            command.stdin.close()
            status, stdout, stderr = await finish(command)
        finally:
            if command.returncode is None:
                command.kill()
        rest = await collect(events, 2)
    assert (status, stderr) == (0, "")
    received = first + rest
    assert stdout.split() == [event.id for event in received]
    assert [(e.event, e.data) for e in rest] == [("note", "an event object"), ("message", "[DONE]")]


async def test_publish_dash_with_an_event_type_applies_it_to_every_line(broker: Broker) -> None:
    async with Subscriber(broker.url, "t") as events:
        command = await start(
            "publish", broker.url, "--topic", "t", "--event", "line", "-", stdin=True
        )
        assert command.stdin is not None
        command.stdin.write(b'plain\n{"data": "object", "event": "own"}\n')
        command.stdin.close()
        status, _, stderr = await finish(command)
        assert (status, stderr) == (0, "")
        received = await collect(events, 2)
    assert [(e.event, e.data) for e in received] == [("line", "plain"), ("own", "object")]


async def test_publish_dash_stops_quietly_on_ctrl_c(broker: Broker) -> None:
    async with Subscriber(broker.url, "t") as events:
        command = await start("publish", broker.url, "--topic", "t", "-", stdin=True)
        assert command.stdin is not None
        try:
            command.stdin.write(b"sent\n")
            await command.stdin.drain()
            assert [e.data for e in await collect(events, 1)] == ["sent"]
            command.send_signal(signal.SIGINT)
            status, stdout, stderr = await finish(command)
        finally:
            if command.returncode is None:
                command.kill()
    assert (status, stdout) == (130, "")
    assert "Traceback" not in stderr


# --- bridge -------------------------------------------------------------------------------


def chunk(choice: dict[str, object]) -> dict[str, object]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}


CHUNKS = [
    chunk({"index": 0, "delta": {"role": "assistant", "content": ""}}),
    chunk({"index": 0, "delta": {"content": "Hel"}}),
    chunk({"index": 0, "delta": {"content": "lo"}}),
    # Not OpenAI's shape, but a JSON object with a "data" key must still go through as text.
    {"data": "not an event object", "topic": "elsewhere"},
    chunk({"index": 0, "delta": {}, "finish_reason": "stop"}),
]
DATA = [orjson.dumps(chunk).decode() for chunk in CHUNKS]


class Upstream:
    """An OpenAI-compatible ``/v1/chat/completions`` that streams ``CHUNKS``; ``mode``
    makes it fail in one of the ways the bridge must report."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.first_seen = asyncio.Event()
        self.requests: list[tuple[dict[str, str], object]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.json()))
        if self.mode == "500":
            return web.json_response({"error": {"message": "model overloaded"}}, status=500)
        if self.mode == "html":
            return web.Response(text="<html><body>login</body></html>", content_type="text/html")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {DATA[0]}\n\n".encode())
        if self.mode == "drop":
            assert request.transport is not None
            request.transport.close()
            return response
        if self.mode == "ok":
            # The rest waits until a subscriber has the first chunk: the bridge must not
            # hold events back until the upstream ends.
            await self.first_seen.wait()
        for data in DATA[1:]:
            await response.write(f"data: {data}\r\n\r\n".encode())
        if self.mode != "no-done":
            await response.write(b": done\ndata: [DONE]\n\n")
        return response


@pytest.fixture
async def upstream_server() -> AsyncIterator[tuple[Upstream, TestServer]]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield upstream, server
    await server.close()


async def test_bridge_republishes_each_chunk_verbatim_as_it_arrives(
    broker: Broker, upstream_server: tuple[Upstream, TestServer], tmp_path: Path
) -> None:
    upstream, server = upstream_server
    request_body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    body_file = tmp_path / "request.json"
    body_file.write_bytes(orjson.dumps(request_body))
    async with (
        Subscriber(broker.url, "gen/1") as first_viewer,
        Subscriber(broker.url, "gen/*") as second_viewer,
    ):
        command = await start(
            "bridge",
            f"{server.make_url('/v1/chat/completions')}",
            "--topic",
            "gen/1",
            "--url",
            broker.url,
            "--header",
            "Authorization: Bearer upstream-key",
            "--data",
            f"@{body_file}",
        )
        try:
            early = await collect(first_viewer, 1)
            upstream.first_seen.set()
            status, stdout, stderr = await finish(command)
        finally:
            if command.returncode is None:
                command.kill()
        first = early + await collect(first_viewer, len(DATA))
        second = await collect(second_viewer, len(DATA) + 1)
    assert (status, stdout) == (0, "")
    assert [event.data for event in first] == [*DATA, "[DONE]"]
    assert second == first
    assert (
        stderr == f"sse-broker bridge: published {len(DATA) + 1} events to gen/1 "
        f"(last id {first[-1].id})\n"
    )
    [(headers, sent)] = upstream.requests
    assert sent == request_body
    assert headers["Authorization"] == "Bearer upstream-key"
    assert headers["Content-Type"] == "application/json"


async def test_bridge_reports_a_broker_refusal_in_one_line(
    make_broker: BrokerFactory, upstream_server: tuple[Upstream, TestServer]
) -> None:
    broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False)
    upstream, server = upstream_server
    upstream.first_seen.set()
    command = await start(
        "bridge",
        f"{server.make_url('/v1/chat/completions')}",
        "--topic",
        "gen/1",
        "--url",
        broker.url,
        "--data",
        "{}",
        "--token",
        mint(publish=["other/*"]),
    )
    status, stdout, stderr = await finish(command)
    assert (status, stdout) == (1, "")
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith(
        "sse-broker bridge: error: the broker refused the events: 403 forbidden"
    )


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("500", "upstream answered 500 Internal Server Error: "),
        ("html", "upstream answered with Content-Type 'text/html', not text/event-stream"),
        ("drop", "upstream connection dropped after 1 events"),
        ("no-done", f"upstream stream ended after {len(DATA)} events, before '[DONE]'"),
    ],
)
async def test_bridge_reports_an_upstream_failure_in_one_line(
    broker: Broker, upstream_server: tuple[Upstream, TestServer], mode: str, says: str
) -> None:
    upstream, server = upstream_server
    upstream.mode = mode
    command = await start(
        "bridge",
        f"{server.make_url('/v1/chat/completions')}",
        "--topic",
        "gen/1",
        "--data",
        '{"stream": true}',
        "--quiet",
        env={"BROKER_URL": broker.url},
    )
    status, stdout, stderr = await finish(command)
    assert status == 1
    assert stdout == ""
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("sse-broker bridge: error: " + says), stderr

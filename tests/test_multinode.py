"""Several broker processes on one Redis: the same ids everywhere, nothing lost when a
node is killed or Redis goes away, and fan-out to many subscribers across nodes.

Every node is a real ``python -m broker serve`` process with ``--redis-url`` and a key
prefix of the test's own; subscribers are raw sockets, so comments (heartbeats) and the
exact frames are visible. Checks are on counts and orders of ids, never on timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import resource
import signal
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import jwt
import orjson
import pytest
import redis.asyncio

from broker.subscriber import MISSED_EVENT
from tests.conftest import BrokerProcess, RawStream, RedisServer, wait_for
from tests.test_redis_functions import channels_ready

StartBroker = Callable[..., BrokerProcess]

READ_TIMEOUT = 20.0


def start_nodes(
    broker_process: StartBroker, redis_url: str, prefix: str, count: int, *flags: str
) -> list[BrokerProcess]:
    return [
        broker_process("--redis-url", redis_url, "--redis-prefix", prefix, *flags)
        for _ in range(count)
    ]


async def subscribe(node: BrokerProcess, query: str, last_id: str | None = None) -> RawStream:
    headers = {"Last-Event-ID": last_id} if last_id else None
    stream = await RawStream.connect(node.port, f"/events?{query}", headers=headers)
    await stream.read_until(lambda: bool(stream.frames), within=READ_TIMEOUT)
    return stream


def received(stream: RawStream) -> list[tuple[str | None, str | None]]:
    return [(frame.id, frame.data) for frame in stream.events() if frame.event != MISSED_EVENT]


def received_ids(stream: RawStream) -> list[str]:
    return [event_id for event_id, _ in received(stream) if event_id is not None]


async def post(http: httpx.AsyncClient, node: BrokerProcess, events: object) -> list[str]:
    response = await http.post(f"{node.url}/publish", json=events)
    assert response.status_code == 200, response.text
    body = response.json()
    return [body["id"]] if "id" in body else list(body["ids"])


async def ready(http: httpx.AsyncClient, node: BrokerProcess) -> int:
    return (await http.get(f"{node.url}/readyz")).status_code


async def wait_ready(http: httpx.AsyncClient, nodes: Sequence[BrokerProcess], status: int) -> None:
    async def poll() -> None:
        while True:
            if [await ready(http, node) for node in nodes] == [status] * len(nodes):
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), READ_TIMEOUT)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


async def test_events_published_on_one_node_reach_every_node_with_the_same_ids(
    broker_process: StartBroker, redis_url: str, redis_prefix: str, client: httpx.AsyncClient
) -> None:
    node_a, node_b, node_c = start_nodes(broker_process, redis_url, redis_prefix, 3)
    streams = {
        "a": await subscribe(node_a, "topic=chat/*"),
        "b": await subscribe(node_b, "topic=chat/*"),
        "c": await subscribe(node_c, "topic=chat/*"),
        "b1": await subscribe(node_b, "topic=chat/1"),
    }
    published: list[tuple[str, str, str]] = []  # (id, topic, data)
    for n in range(40):
        topic = f"chat/{n % 2}"
        (event_id,) = await post(client, node_a, {"topic": topic, "data": f"single {n}"})
        published.append((event_id, topic, f"single {n}"))
        if n % 8 == 0:
            batch = [{"topic": "chat/1", "data": f"batch {n}.{i}"} for i in range(5)]
            ids = await post(client, node_a, batch)
            published += [(i, "chat/1", e["data"]) for i, e in zip(ids, batch, strict=True)]
    everything = [(event_id, data) for event_id, _, data in published]
    only_chat_1 = [(event_id, data) for event_id, topic, data in published if topic == "chat/1"]
    for name, stream in streams.items():
        expected = only_chat_1 if name == "b1" else everything
        count = len(expected)
        await stream.read_until(lambda s=stream, n=count: len(s.events()) >= n)  # type: ignore[misc]
        assert received(stream) == expected, name
        stream.close()


async def test_a_subscriber_of_a_killed_node_resumes_on_another_without_loss_or_duplicate(
    broker_process: StartBroker, redis_url: str, redis_prefix: str, client: httpx.AsyncClient
) -> None:
    node_a, node_b = start_nodes(broker_process, redis_url, redis_prefix, 2)
    total = 300
    published: list[str] = []
    killed = asyncio.Event()

    async def keep_publishing() -> None:
        for n in range(total):
            if n == total // 2:
                await killed.wait()  # half the events are published after the kill
            published.extend(await post(client, node_b, {"topic": "t", "data": str(n)}))

    stream = await subscribe(node_a, "topic=t")
    publisher = asyncio.create_task(keep_publishing())
    await stream.read_until(lambda: len(stream.events()) >= 100, within=READ_TIMEOUT)
    node_a.stop(signal.SIGKILL)
    killed.set()
    await stream.read_to_end(within=READ_TIMEOUT)  # the connection dies with the process
    before = received_ids(stream)
    stream.close()
    resumed = await subscribe(node_b, "topic=t", last_id=before[-1])
    await publisher
    await resumed.read_until(lambda: len(before) + len(resumed.events()) >= total)
    assert not any(frame.event == MISSED_EVENT for frame in resumed.frames)
    assert before + received_ids(resumed) == published
    resumed.close()


async def test_a_redis_outage_loses_no_acknowledged_event_and_streams_stay_open(
    broker_process: StartBroker, redis_server: RedisServer, client: httpx.AsyncClient
) -> None:
    """Redis stops for a while and comes back with its data (as with persistence)."""
    nodes = start_nodes(broker_process, redis_server.url, "outage", 2, "--heartbeat", "0.2")
    streams = [await subscribe(node, "topic=t") for node in nodes]
    acknowledged: list[str] = []
    refusals: list[httpx.Response] = []
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        n = 0
        while not stop.is_set():
            node = nodes[n % 2]
            response = await client.post(f"{node.url}/publish", json={"topic": "t", "data": n})
            if response.status_code == 200:
                acknowledged.append(response.json()["id"])
            else:
                refusals.append(response)
                await asyncio.sleep(0.02)
            n += 1

    publisher = asyncio.create_task(keep_publishing())
    await wait_for(lambda: len(acknowledged) >= 20, READ_TIMEOUT)
    redis_server.stop(keep_data=True)
    await wait_ready(client, nodes, 503)
    await wait_for(lambda: len(refusals) >= 5, READ_TIMEOUT)
    for stream in streams:  # heartbeats go on while Redis is away
        beats = len(stream.comment_blocks())
        await stream.read_until(lambda s=stream, b=beats: len(s.comment_blocks()) >= b + 2)  # type: ignore[misc]
    acknowledged_before_restart = len(acknowledged)
    redis_server.start()
    await wait_ready(client, nodes, 200)
    await wait_for(lambda: len(acknowledged) >= acknowledged_before_restart + 20, READ_TIMEOUT)
    stop.set()
    await publisher

    assert all(r.status_code == 503 for r in refusals), [r.text for r in refusals]
    assert all(r.headers.get("Retry-After") == "1" for r in refusals)
    for stream in streams:
        await stream.read_until(lambda s=stream: set(acknowledged) <= set(received_ids(s)))  # type: ignore[misc]
        ids = received_ids(stream)
        assert len(ids) == len(set(ids)), "an event arrived twice"
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert not any(frame.event == MISSED_EVENT for frame in stream.frames)
        assert not stream.eof
        stream.close()
    for node in nodes:
        metrics = (await client.get(f"{node.url}/metrics")).text
        assert metric(metrics, "sse_broker_backend_reconnects_total") == 1
        assert metric(metrics, "sse_broker_backend_up") == 1


async def test_every_stream_is_told_missed_when_redis_comes_back_empty(
    broker_process: StartBroker, redis_server: RedisServer, client: httpx.AsyncClient
) -> None:
    nodes = start_nodes(broker_process, redis_server.url, "empty", 2)
    streams = [await subscribe(node, "topic=t") for node in nodes]
    old = [(await post(client, nodes[0], {"topic": "t", "data": n}))[0] for n in range(5)]
    for stream in streams:
        await stream.read_until(lambda s=stream: received_ids(s) == old)  # type: ignore[misc]
    redis_server.stop(keep_data=False)
    redis_server.start()
    for stream in streams:
        await stream.read_until(
            lambda s=stream: any(f.event == MISSED_EVENT for f in s.frames),  # type: ignore[misc]
            within=READ_TIMEOUT,
        )
        (notice,) = [frame for frame in stream.frames if frame.event == MISSED_EVENT]
        assert notice.id is None
        assert notice.data is not None
        assert orjson.loads(notice.data) == {"lastEventId": old[-1]}
    await wait_ready(client, nodes, 200)
    new = [(await post(client, nodes[1], {"topic": "t", "data": n}))[0] for n in range(5)]
    for stream in streams:
        await stream.read_until(lambda s=stream: received_ids(s) == old + new)  # type: ignore[misc]
        stream.close()
    for node in nodes:
        metrics = (await client.get(f"{node.url}/metrics")).text
        assert metric(metrics, 'sse_broker_stream_gaps_total{cause="reset"}') == 1


# --- publishing over Redis, without HTTP --------------------------------------------------


async def test_fcall_publish_from_a_plain_redis_client_reaches_every_node_with_the_stream_ids(
    broker_process: StartBroker, redis_url: str, redis_prefix: str
) -> None:
    nodes = start_nodes(broker_process, redis_url, redis_prefix, 2)
    streams = [await subscribe(node, "topic=news/*") for node in nodes]
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        published: list[tuple[str, str]] = []
        for n in range(30):
            result: Any = await client.fcall(
                f"{redis_prefix}_publish", 0, f"news/{n % 3}", f"event {n}"
            )
            published.append((result.decode(), f"event {n}"))
        logged: Any = await client.xrange(f"{redis_prefix}:log")
        assert [entry_id.decode() for entry_id, _ in logged] == [i for i, _ in published]
        for stream in streams:
            await stream.read_until(lambda s=stream: len(s.events()) >= 30)  # type: ignore[misc]
            assert received(stream) == published
            stream.close()
    finally:
        await client.aclose()
        await client_delete_library(redis_url, redis_prefix)


async def client_delete_library(redis_url: str, prefix: str) -> None:
    async with redis.asyncio.Redis.from_url(redis_url) as client:
        await client.function_delete(f"sse_broker_v1_{prefix}")


async def test_channel_publish_reaches_every_subscriber_on_every_node_exactly_once(
    broker_process: StartBroker, redis_url: str, redis_prefix: str
) -> None:
    nodes = start_nodes(broker_process, redis_url, redis_prefix, 2)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        for node in nodes:
            await channels_ready(client, redis_prefix, node.port)
        streams = [
            await subscribe(node, query)
            for node in nodes
            for query in ("topic=room/*", "topic=room/1&topic=room/**")
        ]
        sent = [f"message {n}" for n in range(25)]
        for text in sent:
            await client.publish(f"{redis_prefix}:topic:room/1", text)
        await client.publish(f"{redis_prefix}:topic:room/1", orjson.dumps({"data": "end"}))
        for stream in streams:
            await stream.read_until(lambda s=stream: any(f.data == "end" for f in s.events()))  # type: ignore[misc]
            assert received(stream) == [(None, text) for text in [*sent, "end"]]
            stream.close()
        assert await client.xlen(f"{redis_prefix}:log") == 0  # live only: not in the log
    finally:
        await client.aclose()


# --- many subscribers --------------------------------------------------------------------

_ID_LINE = re.compile(rb"\nid: ([0-9]+-[0-9]+)\n")


class CountingStream(asyncio.Protocol):
    """A subscriber that keeps no events: it counts ids and hashes them in order, so 1,000
    streams of 10,000 events cost the test little memory."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.order = hashlib.sha256()
        self.pending = b""
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.pending + data
        cut = buffer.rfind(b"\n")
        if cut < 0:
            self.pending = buffer
            return
        ids = _ID_LINE.findall(buffer, 0, cut + 1)
        self.pending = buffer[cut:]  # keep the newline an id line after it starts with
        if ids:
            self.order.update(b",".join(ids) + b",")
            self.count += len(ids)
        if self.count >= self.expected and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(AssertionError(f"stream ended after {self.count} events"))


async def open_counting(port: int, expected: int) -> CountingStream:
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(lambda: CountingStream(expected), "127.0.0.1", port)
    stream.transport.write(
        f"GET /events?topic=load HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    )
    return stream


async def test_a_thousand_subscribers_on_three_nodes_receive_ten_thousand_events_in_order(
    broker_process: StartBroker, redis_url: str, redis_prefix: str, client: httpx.AsyncClient
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        if hard != resource.RLIM_INFINITY and hard < 2048:
            pytest.skip(f"needs 2048 file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    subscribers, total, batch = 1000, 10_000, 500
    nodes = start_nodes(
        broker_process, redis_url, redis_prefix, 3, "--queue-size", "20000", "--queue-bytes", "4MiB"
    )
    streams = [await open_counting(nodes[n % 3].port, total) for n in range(subscribers)]

    async def all_subscribed() -> None:
        while True:
            counts = [
                metric((await client.get(f"{node.url}/metrics")).text, "sse_broker_connections")
                for node in nodes
            ]
            if sum(counts) == subscribers:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(all_subscribed(), READ_TIMEOUT)
    published: list[str] = []
    for start in range(0, total, batch):
        events = [{"topic": "load", "data": str(n)} for n in range(start, start + batch)]
        published += await post(client, nodes[start // batch % 3], events)
    expected = hashlib.sha256(b"".join(i.encode() + b"," for i in published)).hexdigest()
    await asyncio.wait_for(asyncio.gather(*(s.done for s in streams)), 60)
    assert [s.count for s in streams] == [total] * subscribers
    assert all(s.order.hexdigest() == expected for s in streams), "order or content differs"
    for s in streams:
        s.transport.close()


MERCURE_KEY = "!ChangeThisMercureHubJWTSecretKey!"


async def test_mercure_updates_cross_nodes_and_resume_from_a_chosen_id_on_another_node(
    broker_process: StartBroker, redis_url: str, redis_prefix: str, client: httpx.AsyncClient
) -> None:
    """A Mercure publisher on one node, a Mercure subscriber on another and an /events
    subscriber on a third see the same updates with the publisher's ids; a subscriber
    whose node is killed resumes on another node from a publisher-chosen id, and the
    response header says nothing was lost."""
    flags = ("--publisher-jwt-key", MERCURE_KEY)
    node_a, node_b, node_c = start_nodes(broker_process, redis_url, redis_prefix, 3, *flags)
    token = jwt.encode({"mercure": {"publish": ["*"]}}, MERCURE_KEY, algorithm="HS256")
    topic = "https://example.com/books/1"
    mercure = await RawStream.connect(
        node_b.port, "/.well-known/mercure?matchURLPattern=https://example.com/books/:id"
    )
    await mercure.read_until(lambda: bool(mercure.frames), within=READ_TIMEOUT)
    ours = await subscribe(node_c, "topic=**")

    async def publish(n: int) -> str:
        answer = await client.post(
            f"{node_a.url}/.well-known/mercure",
            data={"topic": topic, "data": f"v{n}", "id": f"urn:example:book-1:{n}"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/plain")
        return answer.text

    first = [await publish(n) for n in range(10)]
    assert first == [f"urn:example:book-1:{n}" for n in range(10)]
    expected = [(event_id, f"v{n}") for n, event_id in enumerate(first)]
    for stream in (mercure, ours):
        await stream.read_until(lambda s=stream: len(s.events()) >= 10, within=READ_TIMEOUT)  # type: ignore[misc]
        assert received(stream) == expected
    node_b.stop(signal.SIGKILL)
    await mercure.read_to_end(within=READ_TIMEOUT)
    mercure.close()
    later = [await publish(n) for n in range(10, 15)]
    resumed = await RawStream.connect(
        node_c.port,
        "/.well-known/mercure?matchURLPattern=https://example.com/books/:id",
        headers={"Last-Event-ID": first[-1]},
    )
    await resumed.read_until(lambda: len(resumed.events()) >= 5, within=READ_TIMEOUT)
    assert resumed.headers["last-event-id"] == first[-1]
    assert received_ids(resumed) == later
    resumed.close()
    ours.close()

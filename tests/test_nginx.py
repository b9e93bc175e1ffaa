"""deploy/nginx.conf, run by the real nginx in front of two broker nodes on one Redis.

The file nginx runs is deploy/nginx.conf itself: ``render`` swaps only the values the
file marks ``# SITE`` (listen address, upstream servers, paths, TLS lines) for free ports
and paths under the test's own directory, and fails when one of them is not found, so
the test and the file cannot drift apart. Every request goes through nginx.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from httpx_sse import aconnect_sse

from broker.subscriber import MISSED_EVENT
from tests.conftest import JWT_KEY, BrokerProcess, RawStream, free_port, mint

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx-light; .ci/run does)"
)

StartBroker = Callable[..., BrokerProcess]
READ_TIMEOUT = 20.0


def render(directory: Path, listen: int, nodes: list[int], tls: tuple[int, Path] | None) -> Path:
    """deploy/nginx.conf with its site values replaced; ``tls`` is (port, directory of
    cert.pem and key.pem) to turn on the HTTPS/HTTP2 listener."""
    text = CONFIG.read_text(encoding="utf-8")

    def swap(old: str, new: str) -> None:
        nonlocal text
        assert text.count(old) == 1, f"deploy/nginx.conf no longer has exactly one {old!r}"
        text = text.replace(old, new)

    # A root master would hand the workers to www-data, who cannot enter the test's
    # directory; a non-root master ignores "user" (with a warning).
    swap("user www-data;", "user root;" if os.geteuid() == 0 else "")
    swap("pid /run/sse-broker-nginx.pid;", f"pid {directory}/nginx.pid;")
    for old in ("/var/log/nginx/", "/var/lib/nginx/"):
        assert old in text
        text = text.replace(old, f"{directory}/")
    swap("listen 80;", f"listen 127.0.0.1:{listen};")
    swap("server 127.0.0.1:8080 ", f"server 127.0.0.1:{nodes[0]} ")
    swap("server 127.0.0.1:8081 ", f"server 127.0.0.1:{nodes[1]} ")
    if tls is not None:
        port, certs = tls
        swap("# listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;")
        swap(
            "# ssl_certificate /etc/ssl/certs/broker.example.com.pem;",
            f"ssl_certificate {certs}/cert.pem;",
        )
        swap(
            "# ssl_certificate_key /etc/ssl/private/broker.example.com.key;",
            f"ssl_certificate_key {certs}/key.pem;",
        )
    path = directory / "nginx.conf"
    path.write_text(text, encoding="utf-8")
    return path


def nginx_command(config: Path, *extra: str) -> list[str]:
    assert NGINX is not None
    return [NGINX, "-p", str(config.parent), "-c", str(config), "-e", "stderr", *extra]


def self_signed(directory: Path) -> None:
    """A certificate for 127.0.0.1 made with the openssl tool, as an operator would."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl tool is not installed")
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")),
        ],
        check=True,
        capture_output=True,
    )


@dataclasses.dataclass
class Deployment:
    nginx: subprocess.Popen[str]
    port: int
    nodes: list[BrokerProcess]
    tls_port: int | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def deploy(
    broker_process: StartBroker, redis_url: str, redis_prefix: str, tmp_path: Path
) -> Iterator[Callable[..., Deployment]]:
    """Two broker nodes on one Redis, and nginx in front of them."""
    started: list[subprocess.Popen[str]] = []

    def start(*flags: str, tls: bool = False) -> Deployment:
        nodes = [
            broker_process("--redis-url", redis_url, "--redis-prefix", redis_prefix, *flags)
            for _ in range(2)
        ]
        tls_port = free_port() if tls else None
        if tls:
            self_signed(tmp_path)
        port = free_port()
        config = render(
            tmp_path,
            port,
            [node.port for node in nodes],
            (tls_port, tmp_path) if tls_port is not None else None,
        )
        nginx = subprocess.Popen(
            nginx_command(config, "-g", "daemon off;"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(nginx)
        deadline = time.monotonic() + 15
        while True:
            if nginx.poll() is not None:
                raise RuntimeError(f"nginx exited: {nginx.communicate()[1]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not answer")
            time.sleep(0.05)
        return Deployment(nginx, port, nodes, tls_port)

    yield start
    for nginx in started:
        if nginx.poll() is None:
            nginx.terminate()  # fast shutdown: open streams need not end first
        try:
            nginx.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.communicate()


async def open_stream(
    deployment: Deployment, query: str, headers: dict[str, str] | None = None
) -> RawStream:
    """A raw stream through nginx that has its response head and opening bytes."""
    stream = await RawStream.connect(deployment.port, f"/events?{query}", headers=headers)
    await stream.read_until(lambda: bool(stream.frames), within=READ_TIMEOUT)
    return stream


def connections(node: BrokerProcess) -> float:
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    match = re.search(r"^sse_broker_connections (\S+)$", text, re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def test_the_rendered_config_passes_nginx_t(tmp_path: Path) -> None:
    self_signed(tmp_path)
    config = render(tmp_path, free_port(), [free_port(), free_port()], (free_port(), tmp_path))
    check = subprocess.run(nginx_command(config, "-t"), capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "test is successful" in check.stderr


async def test_events_pass_through_nginx_as_they_are_published(
    deploy: Callable[..., Deployment], client: httpx.AsyncClient
) -> None:
    deployment = deploy()
    # A client that accepts gzip still gets the stream uncompressed, chunk by chunk.
    stream = await open_stream(deployment, "topic=live", {"Accept-Encoding": "gzip"})
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in stream.headers
    # The opening bytes arrive before any event exists: nothing waits for a buffer to fill.
    assert stream.frames[0].last("retry") is not None
    assert " ok" in stream.frames[0].comments
    assert not stream.events()
    for n in range(5):
        response = await client.post(
            f"{deployment.url}/publish", json={"topic": "live", "data": f"event {n}"}
        )
        assert response.status_code == 200, response.text
        # Each event arrives while the stream is open, before the next one is published.
        await stream.read_until(lambda n=n: len(stream.events()) == n + 1, within=READ_TIMEOUT)  # type: ignore[misc]
        assert stream.events()[-1].data == f"event {n}"
        assert stream.events()[-1].id == response.json()["id"]
        assert not stream.eof
    stream.close()


@dataclasses.dataclass
class Follower:
    """An EventSource through nginx: on any failure it reconnects with Last-Event-ID."""

    received: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    connections: int = 0
    open: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def run(self, http: httpx.AsyncClient, url: str) -> None:
        while True:
            headers = {"Last-Event-ID": self.received[-1][0]} if self.received else {}
            try:
                async with aconnect_sse(http, "GET", url, headers=headers) as source:
                    if source.response.status_code != 200:
                        await asyncio.sleep(0.05)
                        continue
                    self.connections += 1
                    async for event in source.aiter_sse():
                        if event.retry is not None and not event.data:
                            self.open.set()  # the opening "retry:" block
                            continue
                        assert event.event != MISSED_EVENT, "the log lost events"
                        self.received.append((event.id, event.data))
            except httpx.TransportError:
                pass  # the connection died with its node: reconnect at once


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "stop"])
async def test_subscribers_of_a_stopped_node_resume_on_the_other_and_lose_nothing(
    deploy: Callable[..., Deployment], redis_url: str, redis_prefix: str, signum: int
) -> None:
    """A node dies (SIGKILL: its connections are cut) or is stopped for a rolling restart
    (SIGTERM: it ends its streams cleanly) while events are being published."""
    deployment = deploy()
    total = 200
    followers = [Follower() for _ in range(20)]
    acknowledged: list[str] = []
    timeout = httpx.Timeout(READ_TIMEOUT)
    limits = httpx.Limits(max_connections=len(followers) + 5)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        url = f"{deployment.url}/events?topic=t"
        tasks = [asyncio.create_task(follower.run(http, url)) for follower in followers]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(follower.open.wait() for follower in followers)), READ_TIMEOUT
            )
            on_node = [connections(node) for node in deployment.nodes]
            assert sum(on_node) == len(followers)
            victim = deployment.nodes[0] if on_node[0] else deployment.nodes[1]

            for n in range(total):
                if n == total // 3:
                    await asyncio.to_thread(victim.stop, signum)
                # A publish that had reached the dying node may fail with 502 and is
                # repeated; it may have been stored already, and its key makes the
                # repeat answer with the stored id instead of storing it again.
                event = {"topic": "t", "data": str(n), "key": f"event-{n}"}
                while True:
                    response = await http.post(f"{deployment.url}/publish", json=event)
                    if response.status_code == 200:
                        acknowledged.append(response.json()["id"])
                        break
                    assert response.status_code == 502, response.text
                    await asyncio.sleep(0.05)

            with redis.Redis.from_url(redis_url) as r:
                log = [
                    (entry_id.decode(), fields[b"data"].decode())
                    for entry_id, fields in r.xrange(f"{redis_prefix}:log")
                ]
            assert [event_id for event_id, _ in log] == acknowledged
            assert [data for _, data in log] == [str(n) for n in range(total)]

            async def all_received() -> None:
                while any(len(follower.received) < len(log) for follower in followers):
                    for task in tasks:
                        if task.done():
                            task.result()  # a follower that failed says why
                    await asyncio.sleep(0.02)

            await asyncio.wait_for(all_received(), READ_TIMEOUT)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    moved = [follower for follower in followers if follower.connections > 1]
    assert len(moved) == on_node[deployment.nodes.index(victim)]
    for follower in followers:
        assert follower.received == log  # every event, once, in order, across the move


async def test_the_nodes_count_streams_per_client_address_from_x_forwarded_for(
    deploy: Callable[..., Deployment],
) -> None:
    """nginx appends the address it saw (127.0.0.1, a trusted proxy) to the header the
    client sent; a node skips that and counts the address before it, as it would count a
    browser behind a trusted load balancer in front of nginx."""
    deployment = deploy("--trusted-proxy", "127.0.0.1", "--max-connections-per-ip", "1")
    async with httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT)) as http:

        async def open_as(client_address: str) -> httpx.Response:
            request = http.build_request(
                "GET",
                f"{deployment.url}/events?topic=t",
                headers={"X-Forwarded-For": client_address},
            )
            return await http.send(request, stream=True)

        # Four clients, one stream each. Counted by nginx's own address, the two nodes
        # would take two streams in all.
        streams = [await open_as(f"203.0.113.{n}") for n in range(1, 5)]
        # Three streams of one client on two nodes: one node has two, and refuses one.
        same = [await open_as("198.51.100.7") for _ in range(3)]
        try:
            assert [response.status_code for response in streams] == [200] * 4
            refused = [response for response in same if response.status_code != 200]
            assert len(refused) == 1, [response.status_code for response in same]
            assert refused[0].status_code == 429
            await refused[0].aread()
            assert refused[0].json()["error"] == "too_many_requests"
            assert "198.51.100.7 already has 1 open streams" in refused[0].json()["detail"]
        finally:
            for response in streams + same:
                await response.aclose()


def curl_with_http2() -> str | None:
    curl = shutil.which("curl")
    if curl is None:
        return None
    features = subprocess.run([curl, "-V"], capture_output=True, text=True).stdout
    return curl if "HTTP2" in features else None


async def test_https_with_http2_serves_the_stream(
    deploy: Callable[..., Deployment], tmp_path: Path
) -> None:
    curl = curl_with_http2()
    if curl is None:
        pytest.skip("no curl with HTTP/2 to test the HTTPS listener with")
    deployment = deploy(tls=True)
    process = await asyncio.create_subprocess_exec(
        *(curl, "--http2", "--cacert", str(tmp_path / "cert.pem"), "-sSN", "-D", "-"),
        f"https://127.0.0.1:{deployment.tls_port}/events?topic=t",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    received = b""
    try:
        while b"retry:" not in received:
            chunk = await asyncio.wait_for(process.stdout.read(4096), READ_TIMEOUT)
            assert chunk, f"curl ended early: {received!r}"
            received += chunk
    finally:
        process.kill()
        await process.wait()
    assert received.startswith(b"HTTP/2 200"), received
    assert b"content-type: text/event-stream" in received


async def test_mercure_streams_and_publishes_pass_through_nginx(
    deploy: Callable[..., Deployment], client: httpx.AsyncClient
) -> None:
    """The Mercure hub behind nginx: a stream resumed on one node with a publisher's id
    gets its Last-Event-ID answer header, and each update published through nginx (to
    either node) arrives before the next is published."""
    deployment = deploy("--publisher-jwt-key", JWT_KEY)
    token = mint(publish=["*"], claim="mercure")
    hub = f"{deployment.url}/.well-known/mercure"
    headers = {"Authorization": f"Bearer {token}"}
    first = await client.post(hub, data={"topic": "urn:t", "id": "urn:id:0"}, headers=headers)
    assert (first.status_code, first.text) == (200, "urn:id:0")
    stream = await RawStream.connect(
        deployment.port,
        "/.well-known/mercure?match=urn:t",
        headers={"Last-Event-ID": "urn:id:0", "Accept-Encoding": "gzip"},
    )
    await stream.read_until(lambda: bool(stream.frames), within=READ_TIMEOUT)
    assert stream.status == 200
    assert stream.headers["last-event-id"] == "urn:id:0"
    assert "content-encoding" not in stream.headers
    for n in range(1, 5):
        response = await client.post(
            hub, data={"topic": "urn:t", "data": f"v{n}", "id": f"urn:id:{n}"}, headers=headers
        )
        assert response.status_code == 200, response.text
        await stream.read_until(lambda n=n: len(stream.events()) == n, within=READ_TIMEOUT)  # type: ignore[misc]
        assert (stream.events()[-1].id, stream.events()[-1].data) == (f"urn:id:{n}", f"v{n}")
    stream.close()

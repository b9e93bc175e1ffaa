"""The ``sse-broker`` command as a real process: help, refusals, start-up, graceful stop.

Streams are read over bare sockets here, because what matters is how they end: a clean
end is the HTTP/1.1 chunked terminator followed by EOF, which makes an ``EventSource``
reconnect (to another node, behind a load balancer), while a reset looks like a crash.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest

from tests.conftest import BrokerProcess, free_port

StartBroker = Callable[..., BrokerProcess]

# Generous bounds for a shared machine; none of them is a speed assertion.
COMMAND_TIMEOUT = 30.0
READ_TIMEOUT = 10.0
# The stop must finish within --shutdown-timeout; this is the allowance for the
# interpreter to start the shutdown and exit around it.
EXIT_SLACK = 4.0

SERVE_FLAGS = {
    "--host": "BROKER_HOST",
    "--port": "BROKER_PORT",
    "--heartbeat": "BROKER_HEARTBEAT",
    "--retry": "BROKER_RETRY",
    "--history-size": "BROKER_HISTORY_SIZE",
    "--history-ttl": "BROKER_HISTORY_TTL",
    "--queue-size": "BROKER_QUEUE_SIZE",
    "--queue-bytes": "BROKER_QUEUE_BYTES",
    "--overflow": "BROKER_OVERFLOW",
    "--max-connections": "BROKER_MAX_CONNECTIONS",
    "--max-topics": "BROKER_MAX_TOPICS",
    "--max-body-bytes": "BROKER_MAX_BODY_BYTES",
    "--max-event-bytes": "BROKER_MAX_EVENT_BYTES",
    "--cors-origin": "BROKER_CORS_ORIGIN",
    "--log-level": "BROKER_LOG_LEVEL",
    "--shutdown-timeout": "BROKER_SHUTDOWN_TIMEOUT",
    "--redis-url": "BROKER_REDIS_URL",
    "--redis-prefix": "BROKER_REDIS_PREFIX",
    "--workers": "BROKER_WORKERS",
    "--jwt-key": "BROKER_JWT_KEY",
    "--jwt-key-file": "BROKER_JWT_KEY_FILE",
    "--publisher-jwt-key": "BROKER_PUBLISHER_JWT_KEY",
    "--publisher-jwt-key-file": "BROKER_PUBLISHER_JWT_KEY_FILE",
    "--subscriber-jwt-key": "BROKER_SUBSCRIBER_JWT_KEY",
    "--subscriber-jwt-key-file": "BROKER_SUBSCRIBER_JWT_KEY_FILE",
    "--jwt-algorithm": "BROKER_JWT_ALGORITHM",
    "--publisher-jwt-algorithm": "BROKER_PUBLISHER_JWT_ALGORITHM",
    "--subscriber-jwt-algorithm": "BROKER_SUBSCRIBER_JWT_ALGORITHM",
    "--jwt-cookie": "BROKER_JWT_COOKIE",
    "--jwt-issuer": "BROKER_JWT_ISSUER",
    "--jwt-audience": "BROKER_JWT_AUDIENCE",
    "--allow-anonymous-publish": "BROKER_ALLOW_ANONYMOUS_PUBLISH",
    "--allow-anonymous-subscribe": "BROKER_ALLOW_ANONYMOUS_SUBSCRIBE",
    "--max-connections-per-ip": "BROKER_MAX_CONNECTIONS_PER_IP",
    "--max-stream-age": "BROKER_MAX_STREAM_AGE",
    "--trusted-proxy": "BROKER_TRUSTED_PROXY",
    "--publish-rate": "BROKER_PUBLISH_RATE",
    "--publish-burst": "BROKER_PUBLISH_BURST",
    "--header-timeout": "BROKER_HEADER_TIMEOUT",
    "--body-timeout": "BROKER_BODY_TIMEOUT",
    "--demo": "BROKER_DEMO",
    "--mercure": "BROKER_MERCURE",
    "--mercure-legacy": "BROKER_MERCURE_LEGACY",
    "--mercure-cookie": "BROKER_MERCURE_COOKIE",
    "--public-url": "BROKER_PUBLIC_URL",
    "--mercure-subscriptions": "BROKER_MERCURE_SUBSCRIPTIONS",
}


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without any ``BROKER_*`` setting, plus ``variables``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return {**inherited, **variables}


def run_broker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m broker ARGS`` to completion; a broker that serves instead of
    refusing its arguments fails the test by timing out."""
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        env=environment(**(env or {})),
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True


def wait_until(condition: Callable[[], bool], seconds: float = READ_TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def wait_for_exit(broker: BrokerProcess, seconds: float) -> tuple[int, str]:
    """Wait for the process to end by itself (no second signal), return (status, stderr)."""
    try:
        broker.process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the broker was still running after {seconds}s") from None
    _, stderr = broker.process.communicate()
    return broker.process.returncode, stderr


class RawStream:
    """``GET /events`` over a bare socket, with the chunked body decoded by hand."""

    def __init__(self, port: int, query: str, *, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Set before connecting, so the advertised window stays small.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(READ_TIMEOUT)
        try:
            self.sock.connect(("127.0.0.1", port))
            self.sock.sendall(
                f"GET /events?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
        except OSError:
            self.sock.close()
            raise
        self.reader: BinaryIO = self.sock.makefile("rb")
        status = self.reader.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        headers: dict[str, str] = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers.get("transfer-encoding") == "chunked", headers
        self.body = b""

    def read_chunk(self) -> bytes:
        """The next chunk's data; ``b""`` for the terminating zero-size chunk."""
        size_line = self.reader.readline()
        assert size_line.endswith(b"\r\n"), f"stream cut inside a chunk header: {size_line!r}"
        size = int(size_line.split(b";")[0], 16)
        data = self.reader.read(size)
        assert len(data) == size, "stream cut inside a chunk"
        assert self.reader.read(2) == b"\r\n", "chunk not followed by CRLF"
        self.body += data
        return data

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.body:
            assert self.read_chunk(), f"stream ended before {marker!r}"
        return self.body

    def read_to_clean_end(self) -> bytes:
        """Read every remaining chunk up to the terminator, then require EOF (not a reset)."""
        while self.read_chunk():
            pass
        assert self.reader.read() == b"", "bytes after the chunked terminator"
        return self.body

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def open_streams() -> Iterator[Callable[..., RawStream]]:
    streams: list[RawStream] = []

    def open_stream(port: int, query: str, **options: int) -> RawStream:
        stream = RawStream(port, query, **options)
        streams.append(stream)
        return stream

    yield open_stream
    for stream in streams:
        stream.close()


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=READ_TIMEOUT).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


# --- help and the command itself ---------------------------------------------------------


def test_top_level_help_names_the_serve_command() -> None:
    result = run_broker("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sse-broker")
    assert re.search(r"^\s+serve\s", result.stdout, re.MULTILINE), result.stdout


def serve_help_entries(text: str) -> dict[str, str]:
    """Each option line of ``serve --help`` with its wrapped help, whitespace collapsed."""
    entries: dict[str, str] = {}
    for block in re.split(r"\n(?=  -)", text.split("\noptions:\n", 1)[1]):
        words = block.split()
        entries[words[0].rstrip(",")] = " ".join(words)
    return entries


def test_serve_help_lists_every_flag_with_its_environment_variable() -> None:
    result = run_broker("serve", "--help")
    assert result.returncode == 0, result.stderr
    entries = serve_help_entries(result.stdout)
    assert set(entries) - {"-h"} == set(SERVE_FLAGS)
    for flag, variable in SERVE_FLAGS.items():
        assert re.search(rf"\(env {variable}, default [^)]+\)", entries[flag]), entries[flag]


def test_version_is_printed() -> None:
    result = run_broker("--version")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"sse-broker \S+\n", result.stdout), result.stdout


def test_console_script_is_installed_and_serves() -> None:
    script = Path(sys.executable).parent / "sse-broker"
    assert script.is_file()
    assert os.access(script, os.X_OK)
    help_result = subprocess.run(
        [str(script), "serve", "--help"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert help_result.returncode == 0, help_result.stderr
    assert "--shutdown-timeout" in help_result.stdout

    port = free_port()
    process = subprocess.Popen(
        [str(script), "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    try:

        def healthy() -> bool:
            assert process.poll() is None, process.communicate()[1]
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            return False

        wait_until(healthy, seconds=COMMAND_TIMEOUT)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=COMMAND_TIMEOUT) == 0, process.communicate()[1]
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_no_command_shows_usage_and_exits_2() -> None:
    result = run_broker()
    assert result.returncode == 2
    assert "usage: sse-broker" in result.stderr


# --- refusals at start -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "0"], {}, ["--port", "'0'"]),
        (["--port", "70000"], {}, ["--port", "'70000'"]),
        ([], {"BROKER_QUEUE_SIZE": "x"}, ["--queue-size", "BROKER_QUEUE_SIZE", "'x'"]),
        ([], {"BROKER_HEARTBEAT": "nan"}, ["--heartbeat", "BROKER_HEARTBEAT", "'nan'"]),
        (["--overflow", "explode"], {}, ["--overflow", "'explode'"]),
        (["--cors-origin", "example.com"], {}, ["--cors-origin", "'example.com'"]),
        (["--max-event-bytes", "2MiB"], {}, ["--max-event-bytes", "--queue-bytes"]),
        (["--nope"], {}, ["--nope"]),
        (["--port"], {}, ["--port"]),
        (["--workers", "2"], {}, ["--workers", "(2)", "--redis-url"]),
        ([], {"BROKER_WORKERS": "3"}, ["--workers", "(3)", "--redis-url"]),
    ],
    ids=[
        "port-0",
        "port-70000",
        "env-queue-size",
        "env-heartbeat-nan",
        "overflow",
        "cors-origin",
        "event-larger-than-queue",
        "unknown-flag",
        "missing-value",
        "workers-without-redis",
        "env-workers-without-redis",
    ],
)
def test_invalid_start_exits_2_with_one_line(
    args: list[str], env: dict[str, str], named: list[str]
) -> None:
    result = run_broker("serve", *args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sse-broker"), lines[0]
    assert "error" in lines[0]
    for text in named:
        assert text in lines[0], lines[0]
    assert result.stdout == ""


def test_port_in_use_fails_with_one_clear_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_broker("serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# --- a running broker --------------------------------------------------------------------


def test_started_broker_serves_healthz(broker_process: StartBroker) -> None:
    broker = broker_process()
    response = httpx.get(f"{broker.url}/healthz", timeout=READ_TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    status, stderr = broker.stop()
    assert status == 0, stderr


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ([], {"BROKER_RETRY": "1234"}, b"retry: 1234\n"),
        (["--retry", "4321"], {"BROKER_RETRY": "1234"}, b"retry: 4321\n"),
    ],
    ids=["variable", "flag-wins"],
)
def test_retry_setting_reaches_the_first_line_of_a_stream(
    broker_process: StartBroker,
    open_streams: Callable[..., RawStream],
    flags: list[str],
    env: dict[str, str],
    expected: bytes,
) -> None:
    broker = broker_process(*flags, env=env)
    stream = open_streams(broker.port, "topic=news")
    first = stream.read_chunk()
    assert first.startswith(expected), first


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_ends_every_stream_cleanly_and_exits_0(
    broker_process: StartBroker, open_streams: Callable[..., RawStream], signum: int
) -> None:
    shutdown_timeout = 3.0
    broker = broker_process("--shutdown-timeout", str(shutdown_timeout), "--heartbeat", "60")
    streams = [open_streams(broker.port, "topic=news") for _ in range(3)]
    for stream in streams:
        stream.read_until(b": ok\n\n")
    response = httpx.post(
        f"{broker.url}/publish", json={"topic": "news", "data": "before-stop"}, timeout=10
    )
    assert response.status_code == 200
    for stream in streams:  # every stream is live before the signal
        stream.read_until(b"data: before-stop\n\n")

    broker.process.send_signal(signum)

    for stream in streams:
        body = stream.read_to_clean_end()
        assert body.endswith(b"data: before-stop\n\n")
    status, stderr = wait_for_exit(broker, shutdown_timeout + EXIT_SLACK)
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert refuses_connections(broker.port)


def test_stuck_subscriber_does_not_hold_the_process_past_the_shutdown_timeout(
    broker_process: StartBroker, open_streams: Callable[..., RawStream]
) -> None:
    """A client that never reads keeps its connection's writer waiting for a drain that
    never comes; the stop must still finish, and new connections are refused meanwhile."""
    shutdown_timeout = 3.0
    broker = broker_process("--shutdown-timeout", str(shutdown_timeout), "--max-body-bytes", "4MiB")
    stuck = open_streams(broker.port, "topic=firehose", receive_buffer=4096)
    stuck.read_until(b": ok\n\n")
    reader = open_streams(broker.port, "topic=other")  # a healthy stream alongside it
    reader.read_until(b": ok\n\n")

    batch = [{"topic": "firehose", "data": "x" * 100_000} for _ in range(30)]
    with httpx.Client(timeout=READ_TIMEOUT) as http:

        def queue_overflowed() -> bool:
            assert http.post(f"{broker.url}/publish", json=batch).status_code == 200
            return metric(broker.url, "sse_broker_events_dropped_total") > 0

        wait_until(queue_overflowed, seconds=60)

    broker.process.send_signal(signal.SIGTERM)
    # The listener closes first: while the stuck stream still holds the process, new
    # connections are refused rather than accepted and left hanging.
    wait_until(lambda: refuses_connections(broker.port))
    assert broker.process.poll() is None, "the stuck stream should hold the process a while"
    reader.read_to_clean_end()
    status, stderr = wait_for_exit(broker, shutdown_timeout + EXIT_SLACK)
    assert status == 0, stderr
    assert "Traceback" not in stderr

"""A cheap SSE load generator: many raw asyncio connections in one process.

Started by ``bench/run.py`` (one or more per scenario). It competes with the server for
the same two cores, so it does as little as an HTTP client can: one ``asyncio.Protocol``
per connection (no task, no stream reader), no HTTP library, and no SSE parsing beyond
counting ``\\ndata: `` with ``bytes.count``. Only a sample of connections, spread evenly
over the connection order (a server writes to its subscribers in some order, so the
first N would all be early ones), parse the payload's first token, the publisher's
``time.monotonic_ns()`` stamp, and record publish -> receive latency into a log-spaced
histogram. ``CLOCK_MONOTONIC`` is system-wide on Linux, so the stamp compares across
processes.

A fraction of the connections can be "stalled": they set a small receive buffer before
connecting and stop reading (``pause_reading``) after the response head. The server's
own socket send buffer still takes a few megabytes (Linux autotunes it) before the
server's writes back up.

Every connection asks for ``/events?topic=...`` unless ``--path`` names another request
target (the Mercure hub's, say); a ``{n}`` in it gives each connection a query of its own.

Protocol with the driver: JSON lines on stdout, one ``{"type": "connected", ...}`` once
every connection has its response head (or failed), then ``{"type": "report", ...}``
every ``--report-interval`` seconds with cumulative counters and the latency histogram
*delta* since the previous report. The driver reads these continuously in a thread, so
the pipe never fills and a report is never late. On stdin the driver may send
``sample <fraction> [quiet]`` lines: which share of the reading connections parse
stamps, and whether the others pause meanwhile (answered by ``{"type": "sampling"}``).
The process exits when stdin reaches EOF (the driver closed it or died), on
SIGTERM/SIGINT, or after ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import signal
import socket
import sys
import threading
import time
from typing import Any, TypeVar, cast

MARKER = b"\ndata: "
TAIL = len(MARKER) - 1
STAMP = re.compile(rb"\ndata: (\d*)")
# Latency histogram: BUCKETS_PER_OCTAVE log-spaced buckets per doubling of nanoseconds
# (about 4.4% wide), indexed by round-down of log2(ns) * BUCKETS_PER_OCTAVE.
BUCKETS_PER_OCTAVE = 16
STALLED_RECEIVE_BUFFER = 4096
# In ``--path``, the connection's number: the driver percent-encodes query values, so no
# brace it sends is meant literally.
NUMBER = "{n}"
T = TypeVar("T")


def bucket_of(nanoseconds: int) -> int:
    return int(math.log2(max(nanoseconds, 1)) * BUCKETS_PER_OCTAVE)


def bucket_value(index: int) -> float:
    """The geometric middle of a bucket, in nanoseconds."""
    return float(2 ** ((index + 0.5) / BUCKETS_PER_OCTAVE))


class Totals:
    """Counters shared by every connection of this process."""

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0
        self.closed = 0
        self.latency: dict[int, int] = {}
        self.latency_max = 0

    def record(self, nanoseconds: int) -> None:
        index = bucket_of(nanoseconds)
        self.latency[index] = self.latency.get(index, 0) + 1
        if nanoseconds > self.latency_max:
            self.latency_max = nanoseconds


class SseClient(asyncio.Protocol):
    """One subscriber connection. Sends the request, checks the head, then counts."""

    __slots__ = (
        "_head",
        "_pending",
        "_request",
        "_totals",
        "_transport",
        "ready",
        "sampled",
        "stalled",
    )

    def __init__(
        self, totals: Totals, request: bytes, ready: asyncio.Future[None], *, sampled: bool
    ) -> None:
        self._totals = totals
        self._head = b""
        self._pending = b"\n"  # the head ends with a line break
        self._transport: asyncio.Transport | None = None
        self.ready = ready
        self.sampled = sampled
        self.stalled = False
        self._request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        totals = self._totals
        if not self.ready.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 65536:
                    self._fail("response head too long")
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            status = head.split(b"\r\n", 1)[0]
            if b" 200" not in status:
                self._fail(status.decode(errors="replace"))
                return
            self.ready.set_result(None)
            if not data:
                return
        totals.bytes += len(data)
        if self.sampled:
            self._parse(data, time.monotonic_ns())
            return
        count = data.count(MARKER)
        pending = self._pending
        if pending:
            count += (pending + data[:TAIL]).count(MARKER)
        totals.events += count
        self._pending = data[-TAIL:]

    def _parse(self, data: bytes, now: int) -> None:
        totals = self._totals
        buffer = self._pending + data
        pending = buffer[-TAIL:]
        size = len(buffer)
        for match in STAMP.finditer(buffer):
            if match.end() == size:
                # The stamp may go on in the next read: count this event then.
                pending = buffer[match.start() :]
                break
            totals.events += 1
            digits = match.group(1)
            if digits:
                totals.record(now - int(digits))
        self._pending = pending

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self._transport is not None:
            self._transport.abort()

    def quiet(self, paused: bool) -> None:
        """Pause (or resume) reading for a while; unlike ``stall``, not for good."""
        if self._transport is None or self.stalled or self._transport.is_closing():
            return
        if paused:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    def stall(self) -> None:
        """Stop reading for good: the server's writes to this connection back up."""
        self.stalled = True
        if self._transport is not None:
            self._transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed before the response head"))
        else:
            self._totals.closed += 1

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def raise_file_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit; return (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def spread(population: list[T], count: int) -> list[T]:
    """``count`` members of ``population`` spread evenly over it."""
    if count >= len(population):
        return list(population)
    if count <= 0:
        return []
    step = len(population) / count
    return [population[int(i * step)] for i in range(count)]


def choose_roles(
    connections: int, stalled_fraction: float, sample: int
) -> tuple[set[int], set[int]]:
    """Positions of the stalled connections, then of the sampled ones among the readers.

    Both are spread evenly over the connection order: a server writes to its subscribers
    in some order, so the first N connections would all be early (or late) ones.
    """
    everyone = list(range(connections))
    stalled = set(spread(everyone, round(connections * stalled_fraction)))
    readers = [position for position in everyone if position not in stalled]
    return stalled, set(spread(readers, sample))


async def connect_all(
    args: argparse.Namespace, totals: Totals
) -> tuple[list[SseClient], int, list[str]]:
    loop = asyncio.get_running_loop()
    path = args.path or f"/events?topic={args.topic}"
    head = (
        f" HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    )
    numbered = NUMBER in path
    shared = f"GET {path}{head}".encode()
    stalled, sampled = choose_roles(args.connections, args.stalled, args.sample)
    gate = asyncio.Semaphore(args.concurrency)
    clients: list[SseClient] = []
    errors: list[str] = []

    async def one(position: int) -> None:
        async with gate:
            ready: asyncio.Future[None] = loop.create_future()
            request = shared
            if numbered:
                request = f"GET {path.replace(NUMBER, str(args.first + position))}{head}".encode()
            client = SseClient(totals, request, ready, sampled=position in sampled)
            try:
                async with asyncio.timeout(args.connect_timeout):
                    if position in stalled:
                        # A small receive buffer set before connecting keeps the window
                        # small, so the server's writes back up after kilobytes.
                        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RECEIVE_BUFFER)
                        sock.setblocking(False)
                        try:
                            await loop.sock_connect(sock, (args.host, args.port))
                        except BaseException:
                            sock.close()
                            raise
                        await loop.create_connection(lambda: client, sock=sock)
                    else:
                        await loop.create_connection(lambda: client, args.host, args.port)
                    await ready
            except (OSError, TimeoutError) as exc:
                client.close()
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            if position in stalled:
                client.stall()
            clients.append(client)

    await asyncio.gather(*(one(position) for position in range(args.connections)))
    return clients, len(stalled), errors


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    clients: list[SseClient] = []

    def resample(fraction: float, quiet: bool) -> None:
        readers = [client for client in clients if not client.stalled]
        chosen = {id(client) for client in spread(readers, round(len(readers) * fraction))}
        for client in readers:
            client.sampled = id(client) in chosen
            client.quiet(quiet and not client.sampled)
        emit({"type": "sampling", "sampled": len(chosen), "quiet": quiet})

    def watch_stdin() -> None:
        # Commands, one a line: "sample <fraction of readers> [quiet]". With "quiet" the
        # readers that are not sampled stop reading until the next command: the kernel
        # keeps their bytes, the server's work is unchanged, and this process spends its
        # time on the sampled connections only. EOF on stdin means the driver is gone or
        # done with us.
        with contextlib.suppress(Exception):
            for line in sys.stdin:
                command, *values = line.split()
                if command == "sample" and values:
                    quiet = values[1:] == ["quiet"]
                    loop.call_soon_threadsafe(resample, float(values[0]), quiet)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()

    totals = Totals()
    started = time.monotonic()
    connecting = asyncio.create_task(connect_all(args, totals))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((connecting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():
        connecting.cancel()
        return
    stopping.cancel()
    connected, stalled, errors = connecting.result()
    clients.extend(connected)
    elapsed = time.monotonic() - started
    emit(
        {
            "type": "connected",
            "connected": len(clients),
            "failed": args.connections - len(clients),
            "stalled": stalled,
            "sampled": sum(client.sampled for client in clients),
            "seconds": elapsed,
            "errors": sorted(set(errors))[:5],
        }
    )
    deadline = time.monotonic() + args.seconds
    while not stop.is_set() and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.report_interval):
                await stop.wait()
        latency, latency_max = totals.latency, totals.latency_max
        totals.latency, totals.latency_max = {}, 0
        emit(
            {
                "type": "report",
                "t": time.monotonic(),
                "events": totals.events,
                "bytes": totals.bytes,
                "closed": totals.closed,
                "latency": latency,
                "latency_max": latency_max,
            }
        )
    for client in clients:
        client.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--topic", default="bench")
    parser.add_argument(
        "--path",
        help="request target instead of /events?topic=TOPIC; " + NUMBER + " in it becomes "
        "the connection's number (--first + its position), for per-connection queries",
    )
    parser.add_argument("--first", type=int, default=0, help="number of the first connection")
    parser.add_argument(
        "--sample", type=int, default=200, help="connections that record latency (spread evenly)"
    )
    parser.add_argument(
        "--stalled", type=float, default=0.0, help="fraction of connections that stop reading"
    )
    parser.add_argument("--concurrency", type=int, default=100, help="connects in flight")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--report-interval", type=float, default=0.05)
    parser.add_argument("--seconds", type=float, default=3600.0, help="safety limit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    soft, hard = raise_file_limit()
    loop_name = "asyncio"
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        loop_name = "uvloop"
    except ImportError:
        runner = asyncio.Runner()
    emit({"type": "hello", "nofile_soft": soft, "nofile_hard": hard, "loop": loop_name})
    with runner:
        runner.run(run(args))
        # Leave at once: a thread blocked reading stdin must not hold up interpreter exit,
        # and the connections are already closed.
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()

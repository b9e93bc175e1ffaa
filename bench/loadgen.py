"""A cheap SSE load generator: raw asyncio connections that only count events.

Runs as its own process so it competes with the broker for the CPU as little as an
HTTP client can: no HTTP library, no SSE parsing beyond counting ``data:`` lines.
Prints one JSON line per report to stdout; reads commands from nothing, stops after
``--seconds`` or when its parent closes stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time

MARKER = b"\ndata: "


class Counter:
    def __init__(self) -> None:
        self.events = 0


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_stream(host: str, port: int, path: str) -> Stream:
    """Connect and read the response head; the writer is kept so the socket stays open."""
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
    writer.write(request.encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.decode(errors="replace"))
    return reader, writer


async def count_events(stream: Stream, counter: Counter) -> None:
    reader = stream[0]
    tail = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return
        data = tail + chunk
        counter.events += data.count(MARKER)
        tail = data[-(len(MARKER) - 1) :]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--topic", default="bench")
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counter = Counter()
    path = f"/events?topic={args.topic}"
    streams: list[Stream] = []
    for start in range(0, args.connections, 200):
        size = min(200, args.connections - start)
        streams += await asyncio.gather(
            *(open_stream("127.0.0.1", args.port, path) for _ in range(size))
        )
    tasks = [asyncio.create_task(count_events(stream, counter)) for stream in streams]
    print(json.dumps({"connected": len(streams)}), flush=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        print(json.dumps({"t": time.monotonic(), "events": counter.events}), flush=True)
    for task in tasks:
        task.cancel()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    sys.exit(0)

"""Baseline: the fan-out server people write today with aiohttp and aiohttp-sse.

It follows the library's own chat example: a registry from topic to the set of
per-client ``asyncio.Queue`` objects (unbounded), one handler per connection that
loops ``data = await queue.get(); await response.send(data)`` inside
``sse_response``, and a publish handler that puts the data into every matching queue.
Each connection therefore costs a handler task, a ping task and a queue, and every
event is formatted and written once per subscriber. Library defaults are kept (15 s
ping, 120 s send timeout, no handler cancellation, so a client that leaves is noticed
by the first send after it left); only the listen backlog and the file limit are raised
to match the broker, so connect rates compare the servers rather than the listen queue,
and the shutdown grace is cut to 1 s so the harness can stop it quickly.

    python bench/servers/aiohttp_sse_pattern.py --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
from collections import defaultdict
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

Registry = defaultdict[str, set[asyncio.Queue[str]]]
SUBSCRIBERS = web.AppKey("subscribers", Registry)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def events(request: web.Request) -> web.StreamResponse:
    topics = request.query.getall("topic", [])
    if not topics:
        return web.json_response({"error": "topic is required"}, status=400)
    registry = request.app[SUBSCRIBERS]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for topic in topics:
        registry[topic].add(queue)
    try:
        async with sse_response(request) as response:
            # A client that went away is noticed by the first send after it left.
            with contextlib.suppress(ConnectionResetError):
                while response.is_connected():
                    data = await queue.get()
                    await response.send(data)
    finally:
        for topic in topics:
            subscribers = registry.get(topic)
            if subscribers is not None:
                subscribers.discard(queue)
                if not subscribers:
                    del registry[topic]
    return response


def _parse_events(body: Any) -> list[tuple[str, str]]:
    """The events of a JSON object or array body, as (topic, data) pairs."""
    items = body if isinstance(body, list) else [body]
    parsed = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("topic"), str):
            raise ValueError("each event needs a string topic")
        data = item.get("data", "")
        parsed.append((item["topic"], data if isinstance(data, str) else json.dumps(data)))
    return parsed


async def publish(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        return web.json_response({"error": "send application/json"}, status=415)
    try:
        published = _parse_events(await request.json())
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    registry = request.app[SUBSCRIBERS]
    for topic, data in published:
        for queue in registry.get(topic, ()):
            queue.put_nowait(data)
    return web.json_response({"published": len(published)})


def create_app() -> web.Application:
    app = web.Application()
    registry: Registry = defaultdict(set)
    app[SUBSCRIBERS] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/events", events)
    app.router.add_post("/publish", publish)
    return app


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    raise_file_limit()
    web.run_app(
        create_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        backlog=4096,
        # Handlers parked in queue.get() never end by themselves; without this, SIGTERM
        # waits the default 60 s for them. It changes nothing before shutdown.
        shutdown_timeout=1.0,
        print=None,
        loop=new_event_loop(),
    )


if __name__ == "__main__":
    main()

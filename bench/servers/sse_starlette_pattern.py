"""Baseline: the fan-out server people write today with Starlette and sse-starlette.

The shape the sse-starlette README and its users follow: a registry from topic to the
set of per-client ``asyncio.Queue`` objects (unbounded), an async generator per
connection that yields ``{"data": ...}`` dicts from its queue to ``EventSourceResponse``
(its ``finally`` unsubscribes when the library cancels it on disconnect), and a publish
endpoint that puts the data into every matching queue. It runs under uvicorn with uvloop
and httptools when installed. Library defaults are kept (15 s ping, no send timeout);
only the listen backlog and the file limit are raised to match the broker, so connect
rates compare the servers rather than the listen queue.

    python bench/servers/sse_starlette_pattern.py --host 127.0.0.1 --port 8002
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import resource
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Registry = defaultdict[str, set[asyncio.Queue[str]]]


async def healthz(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def events(request: Request) -> Response:
    topics = request.query_params.getlist("topic")
    if not topics:
        return JSONResponse({"error": "topic is required"}, status_code=400)
    registry: Registry = request.app.state.subscribers

    async def stream() -> AsyncIterator[dict[str, str]]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for topic in topics:
            registry[topic].add(queue)
        try:
            while True:
                data = await queue.get()
                yield {"data": data}
        finally:
            for topic in topics:
                subscribers = registry.get(topic)
                if subscribers is not None:
                    subscribers.discard(queue)
                    if not subscribers:
                        del registry[topic]

    return EventSourceResponse(stream())


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


async def publish(request: Request) -> Response:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip()
    if media_type != "application/json":
        return JSONResponse({"error": "send application/json"}, status_code=415)
    try:
        published = _parse_events(await request.json())
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    registry: Registry = request.app.state.subscribers
    for topic, data in published:
        for queue in registry.get(topic, ()):
            queue.put_nowait(data)
    return JSONResponse({"published": len(published)})


def create_app() -> Starlette:
    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/events", events),
            Route("/publish", publish, methods=["POST"]),
        ]
    )
    app.state.subscribers = defaultdict(set)
    return app


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    raise_file_limit()
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="auto",  # httptools when installed
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()

"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from aiohttp import web

from broker.errors import Unavailable
from broker.metrics import CONTENT_TYPE
from broker.web.state import STATE


async def handle_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    if not request.app[STATE].backend.ready():
        raise Unavailable("the event backend is not usable")
    return web.json_response({"status": "ready"})


async def handle_metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

"""Assembling the aiohttp application: shared state, routes, middleware, lifecycle.

One timer serves every connection: each ``--heartbeat`` seconds it writes a keep-alive
comment to every flowing stream and trims expired history. Nothing runs per connection
except the task aiohttp already gives each request.

The backend is the in-memory one unless ``--redis-url`` names a Redis to share the log
with other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from broker.auth import Gatekeeper
from broker.backends import Backend
from broker.backends.memory import MemoryBackend
from broker.backends.redis import RedisBackend
from broker.config import Config
from broker.event import EventLimits
from broker.hub import Hub
from broker.limits import PublishLimiter
from broker.metrics import Gauges, Metrics, Stats
from broker.subscriptions import Registry
from broker.topics import HUB_PATH
from broker.web import cors, demo, health, mercure, openapi, publish, stream, subscriptions
from broker.web.errors import error_middleware
from broker.web.state import STATE, BrokerState


def create_app(config: Config, backend: Backend | None = None) -> web.Application:
    """Build the application; ``backend`` defaults to the one ``config`` names."""
    stats = Stats()
    hub = Hub(stats)
    if backend is None:
        backend = make_backend(config, stats)
    gauges = Gauges(
        connections=lambda: hub.connection_count,
        history=backend.history_size,
        backend_up=backend.ready,
        stream_lag=backend.lag_seconds,
    )
    metrics = Metrics(stats, gauges)
    limits = EventLimits(config.max_topics, config.max_event_bytes)
    state = BrokerState(config, hub, backend, stats, metrics, limits, make_gatekeeper(config))
    if config.publish_rate > 0:
        state.publish_limiter = PublishLimiter(config.publish_rate, config.publish_burst)

    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body_bytes)
    app[STATE] = state
    app.router.add_get("/events", stream.handle_events, allow_head=False)
    app.router.add_post("/publish", publish.handle_publish)
    app.router.add_get("/healthz", health.handle_healthz)
    app.router.add_get("/readyz", health.handle_readyz)
    app.router.add_get("/metrics", health.handle_metrics)
    app.router.add_get("/openapi.yaml", openapi.handle_openapi)
    if config.demo:
        app.router.add_get("/", demo.handle_demo)
    paths = ["/events", "/publish"]
    if config.mercure:
        mercure.install(app, HUB_PATH)
        paths.append(HUB_PATH)
        if config.mercure_subscriptions:
            state.subscriptions = Registry(hub, backend)
            subscriptions.install(app)
    cors.install(app, config.cors_origins, paths)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_end_streams)
    return app


def make_gatekeeper(config: Config) -> Gatekeeper:
    return Gatekeeper(
        publisher_key=config.publisher_key,
        subscriber_key=config.subscriber_key,
        publisher_algorithm=config.publisher_algorithm,
        subscriber_algorithm=config.subscriber_algorithm,
        cookie=config.jwt_cookie,
        allow_anonymous_publish=config.allow_anonymous_publish,
        allow_anonymous_subscribe=config.allow_anonymous_subscribe,
        issuer=config.jwt_issuer,
        audience=config.jwt_audience,
    )


def make_backend(config: Config, stats: Stats) -> Backend:
    if config.redis_url is not None:
        return RedisBackend(
            config.redis_url,
            config.redis_prefix,
            max_events=config.history_size,
            ttl=config.history_ttl,
            stats=stats,
            limits=EventLimits(config.max_topics, config.max_event_bytes),
        )
    return MemoryBackend(config.history_size, config.history_ttl)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.backend.start(state.hub)
    if state.subscriptions is not None:
        await state.subscriptions.start()
    ticker = asyncio.create_task(_tick(state), name="broker-heartbeat")
    yield
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker
    if state.subscriptions is not None:
        await state.subscriptions.close()
    await state.backend.close()


async def _tick(state: BrokerState) -> None:
    while True:
        await asyncio.sleep(state.config.heartbeat)
        state.hub.heartbeat()
        await state.backend.trim()


async def _end_streams(app: web.Application) -> None:
    """End every stream cleanly so each EventSource reconnects, to another node if any.

    Streams are not aiohttp's connections any more (see ``Subscriber.take_over``), so
    aiohttp's own graceful shutdown does not see them: half the budget is theirs.
    """
    state = app[STATE]
    await state.hub.shut_down(state.config.shutdown_timeout / 2)

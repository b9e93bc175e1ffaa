"""``GET /events``: the Server-Sent Events stream.

Order matters here. The subscriber is registered with the hub before the response
headers are written, so an event published the moment ``EventSource.onopen`` fires is
already queued for it. A resuming client's replay is read after registration and
written before the queue is released; the replay's ``through`` position then removes
the queued events it already covered. Together: no gap and no duplicate at the seam.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.http import HttpVersion11

from broker import sse
from broker.errors import InvalidSubscription, TooManyConnections
from broker.subscriber import CloseReason, Subscriber
from broker.topics import Selector, TopicError, validate_pattern
from broker.web.state import STATE

logger = logging.getLogger(__name__)

MAX_LAST_EVENT_ID_LENGTH = 1024
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def parse_selector(patterns: list[str], max_topics: int) -> Selector:
    if not patterns:
        raise InvalidSubscription("at least one 'topic' query parameter is required")
    try:
        checked = [validate_pattern(pattern) for pattern in patterns]
    except TopicError as exc:
        raise InvalidSubscription(str(exc)) from None
    selector = Selector(checked)
    if len(selector.patterns) > max_topics:
        raise InvalidSubscription(f"a subscription may have at most {max_topics} topics")
    return selector


def last_event_id(request: web.Request) -> str | None:
    """The resume point: the header a reconnecting browser sends wins over the query
    parameter that its first connection (which cannot set headers) carried.

    An empty value is no resume point (a browser whose last event ID is empty sends no
    header at all), not an unknown id that would replay the whole history as missed.
    """
    value = request.headers.get("Last-Event-ID") or request.query.get("lastEventID")
    if not value:
        return None
    if len(value) > MAX_LAST_EVENT_ID_LENGTH:
        raise InvalidSubscription(
            f"Last-Event-ID is longer than {MAX_LAST_EVENT_ID_LENGTH} characters"
        )
    return value


async def handle_events(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config
    selector = parse_selector(request.query.getall("topic", []), config.max_topics)
    resume_from = last_event_id(request)
    if config.max_connections and state.hub.connection_count >= config.max_connections:
        raise TooManyConnections(
            f"the broker is at its limit of {config.max_connections} streams", retry_after=5
        )

    subscriber = Subscriber(
        selector,
        max_events=config.queue_size,
        max_bytes=config.queue_bytes,
        overflow=config.overflow,
        stats=state.stats,
    )
    response = web.StreamResponse(headers=STREAM_HEADERS)
    chunked = request.version >= HttpVersion11
    if chunked:
        response.enable_chunked_encoding()
    state.hub.subscribe(subscriber)
    reason = CloseReason.CLIENT
    try:
        await response.prepare(request)
        transport = request.transport
        if transport is None:
            return response
        subscriber.attach(transport, chunked=chunked)
        await response.write(sse.encode_retry(config.retry)[:-1] + sse.encode_comment("ok"))
        drain = request.writer.drain
        if resume_from is not None:
            replay = await state.backend.replay(resume_from, selector)
            await subscriber.send_replay(replay, resume_from, drain)
        reason = await subscriber.run(drain)
        if reason is not CloseReason.OVERFLOW:
            await response.write_eof()
    except asyncio.CancelledError:
        reason = subscriber.close_reason or CloseReason.CLIENT
        raise
    except ConnectionError:
        reason = subscriber.close_reason or CloseReason.CLIENT
    except Exception:
        # Headers are out, so no error response is possible: end the stream, keep the bug.
        logger.exception("event stream for %s failed", list(selector.patterns))
        reason = CloseReason.ERROR
    finally:
        state.hub.unsubscribe(subscriber)
        state.stats.disconnects[reason] += 1
    return response

"""``GET /events``: the Server-Sent Events stream.

Order matters here. The subscriber is registered with the hub before the response
headers are written, so an event published the moment ``EventSource.onopen`` fires is
already queued for it. A resuming client's replay is read after registration and
written before the queue is released; the replay's ``through`` position then removes
the queued events it already covered. Together: no gap and no duplicate at the seam.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping

from aiohttp import web
from aiohttp.http import HttpVersion11

from broker import sse
from broker.auth import Grants
from broker.backends import Backend
from broker.errors import InvalidSubscription, TooManyConnections, TooManyRequests, Unavailable
from broker.history import EARLIEST, Replay
from broker.limits import request_address
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
    if len(selector) > max_topics:
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
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Header bytes that are not UTF-8 reach us as lone surrogates: no id we ever
            # sent looks like that, and no notice could quote it back.
            raise InvalidSubscription("Last-Event-ID is not valid UTF-8") from None
    return value


async def handle_events(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    selector = parse_selector(request.query.getall("topic", []), state.config.max_topics)
    resume_from = last_event_id(request)
    grants = state.gatekeeper.subscriber(request)
    return await open_stream(request, selector, grants, resume_from)


async def open_stream(
    request: web.Request,
    selector: Selector,
    token_grants: Grants | None,
    resume_from: str | None,
    *,
    headers: Mapping[str, str] = STREAM_HEADERS,
    resume_header: bool = False,
    on_open: Callable[[Subscriber], None] | None = None,
) -> web.StreamResponse:
    """Serve one stream: limits, registration, the head, the opening bytes, any replay,
    then the take-over. Shared by ``/events`` and Mercure's endpoint.

    ``resume_header``: when resuming, read the replay before the head and report its
    ``predecessor`` in a ``Last-Event-ID`` response header (Mercure's data-loss check);
    ``earliest`` as ``resume_from`` then replays all history. ``on_open`` is called once
    the stream is registered and its head about to be sent (subscription events).
    """
    state = request.app[STATE]
    config = state.config
    grants = None if token_grants is None else token_grants.subscribe
    if config.max_connections and state.hub.connection_count >= config.max_connections:
        raise TooManyConnections(
            f"the broker is at its limit of {config.max_connections} streams", retry_after=5
        )
    address = request_address(request, config.trusted_proxies)
    per_address = config.max_connections_per_ip
    if per_address and state.hub.connections_from(address) >= per_address:
        raise TooManyRequests(
            f"{address} already has {per_address} open streams, the limit per client address",
            retry_after=5,
        )

    subscriber = Subscriber(
        selector,
        max_events=config.queue_size,
        max_bytes=config.queue_bytes,
        overflow=config.overflow,
        stats=state.stats,
        on_lost=state.hub.forget,
        grants=grants,
        peer=address,
    )
    response = web.StreamResponse(headers=headers)
    chunked = request.version >= HttpVersion11
    if chunked:
        response.enable_chunked_encoding()
    state.hub.subscribe(subscriber)
    end = _end_time(token_grants, config.max_stream_age)
    if end is not None:
        subscriber.end_at(end)
    replay: Replay | None = None
    unavailable: Unavailable | None = None
    try:
        if resume_from is not None and resume_header:
            try:
                replay = await _read_replay(state.backend, resume_from, selector, grants)
            except Unavailable as exc:
                unavailable = exc
            else:
                response.headers["Last-Event-ID"] = replay.predecessor or EARLIEST
        if on_open is not None:
            on_open(subscriber)
        await response.prepare(request)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away before the stream started")
        subscriber.attach(transport, chunked=chunked)
        await response.write(sse.encode_retry(config.retry)[:-1] + sse.encode_comment("ok"))
        drain = request.writer.drain
        if unavailable is not None:
            raise unavailable
        if resume_from is not None:
            if replay is None:
                replay = await state.backend.replay(resume_from, selector, grants)
            await subscriber.send_replay(replay, resume_from, drain)
        await drain()
    except asyncio.CancelledError:
        state.hub.forget(subscriber)
        raise
    except ConnectionError:
        # The client left before its stream started: nothing to answer and no bug to log
        # (raised on, the error middleware would log it as one and answer 500).
        state.hub.forget(subscriber)
        return response
    except Unavailable as exc:
        # The history cannot be read now (Redis is down). The head is out, so no 503 is
        # possible, and EventSource would not retry one anyway: end the stream cleanly,
        # and the client comes back after ``retry`` ms with the same Last-Event-ID.
        logger.warning("ending a resuming stream: %s", exc.detail)
        subscriber.close(CloseReason.ERROR)
        state.hub.forget(subscriber)
        return response
    except Exception:
        # Headers are out, so no error response is possible: end the stream, keep the bug.
        logger.exception("event stream for %r failed", selector)
        subscriber.close(CloseReason.ERROR)
        state.hub.forget(subscriber)
        return response
    if subscriber.close_reason is not None:
        state.hub.forget(subscriber)
        return response
    subscriber.take_over()
    release_connection(request)
    return response


def _end_time(grants: Grants | None, max_age: float) -> float | None:
    """When a stream must end (Unix time): at its token's ``exp``, and after
    ``--max-stream-age``, which alone ends streams whose token can no longer be revoked.
    The age is shortened by up to a tenth at random, so that streams opened together
    (after a restart, say) do not all come back in the same instant."""
    ends = []
    if grants is not None and grants.expires is not None:
        ends.append(grants.expires)
    if max_age > 0:
        ends.append(time.time() + max_age * (1 - random.random() / 10))
    return min(ends, default=None)


async def _read_replay(
    backend: Backend, resume_from: str, selector: Selector, grants: Selector | None
) -> Replay:
    replay = await backend.replay(resume_from, selector, grants, predecessor=True)
    if resume_from == EARLIEST:
        # No event bears this id, so the log replayed everything it holds; nothing is
        # "missed" when everything was asked for.
        return dataclasses.replace(replay, missed=False, predecessor=None)
    return replay


def release_connection(request: web.Request) -> None:
    """Tell aiohttp the connection is no longer its own, so it frees the request.

    The stream's transport now belongs to its ``Subscriber`` (``take_over``). What aiohttp
    kept for this connection (the request and its parser, the connection and request
    tasks, the keep-alive timer) costs about 11 KiB; a subscriber costs a tenth of that.
    aiohttp has no public call for this, so we give its protocol the notice a transport
    gives when a connection ends: from then on it writes nothing more, closes nothing,
    and lets its request task finish. Pinned to aiohttp's minor version in
    pyproject.toml; tests/test_takeover.py checks the contract.
    """
    protocol = request.protocol
    protocol.transport = None  # so that its clean-up does not close what is no longer its own
    protocol.connection_lost(None)

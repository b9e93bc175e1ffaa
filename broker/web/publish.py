"""``POST /publish``: one event, a batch, or an endless NDJSON stream of them.

Three body shapes, chosen by ``Content-Type``:

* ``application/json``: an event object, or an array of them (one atomic batch);
* ``application/x-www-form-urlencoded``: the fields Mercure publishers send
  (``topic`` repeated, ``data``, ``type``, ``retry``; other fields are ignored);
* ``application/x-ndjson``: one event per line, read as a stream. Lines are published as
  they arrive, so a long-lived upstream can be piped in; ``--max-body-bytes`` then bounds
  each line rather than the whole body.

``?topic=`` in the query names default topics for events that give none. With it, an
NDJSON line that is not an event object (a JSON object with a ``data`` key) is published
verbatim as the data of one event: an OpenAI-style chunk stream ending in ``[DONE]``
needs no rewrapping.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from aiohttp import StreamReader, web

from broker.errors import (
    ClientError,
    InvalidBody,
    InvalidEvent,
    PayloadTooLarge,
    Unavailable,
    UnsupportedMediaType,
)
from broker.event import EventDraft, EventLimits, make_draft
from broker.topics import TopicError, validate_topic
from broker.web.state import STATE, BrokerState

JSON_TYPES = frozenset({"application/json"})
FORM_TYPES = frozenset({"application/x-www-form-urlencoded"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/jsonlines"})
EVENT_FIELDS = frozenset({"topic", "data", "event", "retry"})


async def handle_publish(request: web.Request) -> web.Response:
    state = request.app[STATE]
    content_type = request.content_type
    defaults = _default_topics(request, state.limits)
    if content_type in NDJSON_TYPES:
        return await _publish_ndjson(request, state, defaults)
    if content_type not in JSON_TYPES and content_type not in FORM_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not accepted; use application/json, "
            "application/x-www-form-urlencoded or application/x-ndjson"
        )
    length = request.content_length
    if length is not None and length > state.config.max_body_bytes:
        raise PayloadTooLarge(f"body is {length} bytes; the limit is {state.config.max_body_bytes}")
    try:
        if content_type in FORM_TYPES:
            drafts = [await _form_draft(request, state.limits, defaults)]
            single = True
        else:
            drafts, single = _json_drafts(await request.read(), state.limits, defaults)
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"the body is larger than the limit of {state.config.max_body_bytes} bytes"
        ) from None
    ids = await _publish(state, drafts)
    return web.json_response({"id": ids[0]} if single else {"ids": ids})


async def _publish(state: BrokerState, drafts: list[EventDraft]) -> list[str]:
    started = time.perf_counter()
    ids = await state.backend.publish(drafts)
    state.stats.published += len(ids)
    state.metrics.publish_duration.observe(time.perf_counter() - started)
    return ids


def _default_topics(request: web.Request, limits: EventLimits) -> tuple[str, ...]:
    topics = request.query.getall("topic", [])
    try:
        checked = tuple(dict.fromkeys(validate_topic(topic) for topic in topics))
    except TopicError as exc:
        raise InvalidEvent(f"query: {exc}") from None
    if len(checked) > limits.max_topics:
        raise InvalidEvent(f"an event may have at most {limits.max_topics} topics")
    return checked


def draft_from_object(
    obj: dict[str, Any], limits: EventLimits, defaults: Sequence[str]
) -> EventDraft:
    unknown = obj.keys() - EVENT_FIELDS
    if unknown:
        raise InvalidEvent(
            f"unknown field(s) {', '.join(sorted(map(repr, unknown)))}; "
            f"an event has {', '.join(sorted(EVENT_FIELDS))}"
        )
    return make_draft(
        obj.get("topic"),
        obj.get("data"),
        obj.get("event"),
        obj.get("retry"),
        limits=limits,
        default_topics=defaults,
    )


def _json_drafts(
    body: bytes, limits: EventLimits, defaults: Sequence[str]
) -> tuple[list[EventDraft], bool]:
    if not body.strip():
        raise InvalidBody("the body is empty; send an event object or an array of them")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidBody(f"the body is not valid JSON: {exc}") from None
    if isinstance(parsed, dict):
        return [draft_from_object(parsed, limits, defaults)], True
    if not isinstance(parsed, list):
        raise InvalidBody("the body must be an event object or an array of event objects")
    if not parsed:
        raise InvalidBody("the array holds no events")
    drafts = []
    for position, item in enumerate(parsed):
        if not isinstance(item, dict):
            raise InvalidEvent(f"event {position}: must be an object")
        try:
            drafts.append(draft_from_object(item, limits, defaults))
        except InvalidEvent as exc:
            raise type(exc)(f"event {position}: {exc.detail}") from None
    return drafts, False


async def _form_draft(
    request: web.Request, limits: EventLimits, defaults: Sequence[str]
) -> EventDraft:
    try:
        form = await request.post()
    except UnicodeDecodeError:
        raise InvalidBody("the form is not valid UTF-8") from None
    except ValueError as exc:
        raise InvalidBody(f"the form cannot be parsed: {exc}") from None
    fields: dict[str, list[str]] = {}
    for key, value in form.items():
        if not isinstance(value, str):
            raise InvalidBody(f"form field {key!r} must be text, not a file")
        fields.setdefault(key, []).append(value)
    retry: object = None
    if "retry" in fields:
        text = fields["retry"][0]
        if not text.isascii() or not text.isdigit():
            raise InvalidEvent("'retry' must be a non-negative integer")
        retry = int(text)
    return make_draft(
        fields.get("topic"),
        fields.get("data", [""])[0],
        fields.get("type", [None])[0],
        retry,
        limits=limits,
        default_topics=defaults,
    )


async def _lines(content: StreamReader, max_line: int) -> AsyncIterator[list[bytes]]:
    """Yield the complete lines each network read brings, never holding a line past
    ``max_line`` bytes. A final line without a newline is still a line."""
    pending = b""
    while True:
        chunk = await content.readany()
        if not chunk:
            break
        parts = (pending + chunk).split(b"\n")
        pending = parts.pop()
        if len(pending) > max_line:
            raise PayloadTooLarge(f"a line is longer than {max_line} bytes")
        if parts:
            yield parts
    if pending:
        yield [pending]


def _ndjson_draft(line: bytes, limits: EventLimits, defaults: Sequence[str]) -> EventDraft:
    try:
        parsed = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        if not defaults:
            raise InvalidEvent(f"not valid JSON: {exc}") from None
        parsed = None
    if isinstance(parsed, dict) and "data" in parsed:
        return draft_from_object(parsed, limits, defaults)
    if not defaults:
        raise InvalidEvent(
            "each line must be an event object with 'data' "
            "(or pass ?topic= to publish lines verbatim)"
        )
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent("the line is not valid UTF-8") from None
    return make_draft(None, text, limits=limits, default_topics=defaults)


async def _publish_ndjson(
    request: web.Request, state: BrokerState, defaults: Sequence[str]
) -> web.Response:
    """Publish each network read's complete lines as one batch, as soon as they arrive.

    A bad line stops the stream: the lines before it stay published, and the error lists
    their ids so the publisher knows exactly where to resume.
    """
    max_line = state.config.max_body_bytes
    ids: list[str] = []
    line_number = 0
    reads = _lines(request.content, max_line)
    while True:
        try:
            lines = await anext(reads)
        except StopAsyncIteration:
            break
        except PayloadTooLarge as exc:
            raise _at_line(exc, line_number + 1, ids) from None
        drafts: list[EventDraft] = []
        try:
            for line in lines:
                line_number += 1
                if len(line) > max_line:
                    raise PayloadTooLarge(f"the line is longer than {max_line} bytes")
                line = line.rstrip(b"\r")
                if line.strip():
                    drafts.append(_ndjson_draft(line, state.limits, defaults))
        except (InvalidEvent, PayloadTooLarge) as exc:
            if drafts:
                ids.extend(await _publish_read(state, drafts, ids))
            raise _at_line(exc, line_number, ids) from None
        if drafts:
            ids.extend(await _publish_read(state, drafts, ids))
    if not ids:
        raise InvalidBody("the stream held no events")
    return web.json_response({"ids": ids})


async def _publish_read(
    state: BrokerState, drafts: list[EventDraft], published: list[str]
) -> list[str]:
    """Publish one read's lines; if the backend is down, say which earlier ones got in."""
    try:
        return await _publish(state, drafts)
    except Unavailable as exc:
        raise Unavailable(
            f"{exc.detail}; the {len(published)} event(s) of earlier reads were published",
            retry_after=int(exc.headers.get("Retry-After", "1")),
            extra={"ids": published},
        ) from None


def _at_line(exc: InvalidEvent | PayloadTooLarge, line: int, ids: list[str]) -> ClientError:
    return type(exc)(
        f"line {line}: {exc.detail}; the {len(ids)} event(s) before it were published",
        extra={"ids": ids},
    )

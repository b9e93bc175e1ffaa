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

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import orjson
from aiohttp import StreamReader, web

from broker.auth import Grants, check_publish
from broker.backends import Published
from broker.errors import (
    ClientError,
    Forbidden,
    InvalidBody,
    InvalidEvent,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    Unavailable,
    UnsupportedMediaType,
)
from broker.event import EventDraft, EventLimits, check_key, make_draft
from broker.limits import charge, charge_up_to, refund
from broker.topics import TopicError, validate_topic
from broker.web.state import STATE, BrokerState

JSON_TYPES = frozenset({"application/json"})
FORM_TYPES = frozenset({"application/x-www-form-urlencoded"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/jsonlines"})
EVENT_FIELDS = frozenset({"topic", "data", "event", "retry", "private", "key"})

T = TypeVar("T")


async def handle_publish(request: web.Request) -> web.Response:
    state = request.app[STATE]
    grants = state.gatekeeper.publisher(request)
    content_type = request.content_type
    defaults = _default_topics(request, state.limits)
    key = _idempotency_key(request)
    if content_type in NDJSON_TYPES:
        return await _publish_ndjson(request, state, defaults, grants, key)
    if content_type not in JSON_TYPES and content_type not in FORM_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not accepted; use application/json, "
            "application/x-www-form-urlencoded or application/x-ndjson"
        )
    if content_type in FORM_TYPES:
        drafts = [await read_body(request, state, _form_draft(request, state.limits, defaults))]
        single = True
    else:
        drafts, single = _json_drafts(
            await read_body(request, state, request.read()), state.limits, defaults
        )
    check_publish(grants, (draft.topics for draft in drafts))
    subject = None if grants is None else grants.subject
    _assign_keys(drafts, key, None if single else 0, subject)
    charge(request, state, subject, len(drafts))
    ids = await publish_drafts(request, state, drafts, subject)
    return web.json_response({"id": ids[0]} if single else {"ids": ids})


async def read_body(request: web.Request, state: BrokerState, reading: Awaitable[T]) -> T:
    """Await ``reading`` (of the request's body) within the body size and time limits,
    turning aiohttp's ways of failing into our client errors."""
    limit = state.config.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        if inspect.iscoroutine(reading):
            reading.close()
        raise PayloadTooLarge(f"body is {length} bytes; the limit is {limit}")
    try:
        async with asyncio.timeout(state.config.body_timeout):
            return await reading
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body is larger than the limit of {limit} bytes") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the body did not arrive within {state.config.body_timeout:g} s"
        ) from None
    except web.RequestPayloadError as exc:
        raise InvalidBody(_unreadable(exc)) from None


def _idempotency_key(request: web.Request) -> str | None:
    values = request.headers.getall("Idempotency-Key", [])
    if not values:
        return None
    if len(values) > 1:
        raise InvalidEvent("give one Idempotency-Key header")
    return check_key(values[0], "the Idempotency-Key header")


def _assign_keys(
    drafts: list[EventDraft], key: str | None, batch_start: int | None, subject: str | None
) -> None:
    """Give drafts without a ``key`` of their own the request's ``Idempotency-Key``, and
    scope every key to the publisher's token subject.

    A single event (``batch_start`` None) takes the header's key as it is; event ``i`` of an
    array or of an NDJSON stream (whose reads start at ``batch_start``) takes ``<key>#<i>``,
    so a retried batch is recognised event by event. Scoping keeps each subject's keys
    apart, so that one publisher cannot claim (and so suppress) another's key, or learn its
    event ids by guessing keys.
    """
    for position, draft in enumerate(drafts):
        if draft.key is None and key is not None:
            draft.key = key if batch_start is None else f"{key}#{batch_start + position}"
        if draft.key is not None and subject is not None:
            draft.key = f"{subject}|{draft.key}"


async def publish_drafts(
    request: web.Request, state: BrokerState, drafts: list[EventDraft], subject: str | None
) -> Published:
    """Publish drafts already charged to the publisher's rate, and give back the charge
    for those not logged now: retries of published events, or all when the log is down."""
    started = time.perf_counter()
    try:
        published = await state.backend.publish(drafts)
    except Unavailable:
        refund(request, state, subject, len(drafts))
        raise
    refund(request, state, subject, len(drafts) - published.fresh)
    state.stats.published += published.fresh
    state.metrics.publish_duration.observe(time.perf_counter() - started)
    return published


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
        private=obj.get("private", False),
        key=obj.get("key"),
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
    fields = await read_form(request)
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
        private="private" in fields,
    )


async def read_form(request: web.Request) -> dict[str, list[str]]:
    """A form body's fields, each with its values in order; files are refused."""
    try:
        form = await request.post()
    except UnicodeDecodeError:
        raise InvalidBody("the form is not valid UTF-8") from None
    except LookupError:
        raise UnsupportedMediaType(
            f"the form's charset {request.charset!r} is unknown; send UTF-8"
        ) from None
    except ValueError as exc:
        raise InvalidBody(f"the form cannot be parsed: {exc}") from None
    fields: dict[str, list[str]] = {}
    for key, value in form.items():
        if not isinstance(value, str):
            raise InvalidBody(f"form field {key!r} must be text, not a file")
        fields.setdefault(key, []).append(value)
    return fields


async def _lines(
    content: StreamReader, max_line: int, max_pause: float
) -> AsyncIterator[list[bytes]]:
    """Yield the complete lines each network read brings, never holding a line past
    ``max_line`` bytes. A final line without a newline is still a line.

    A stream may last for ever, but not stall for longer than ``max_pause`` seconds between
    reads: a publisher that stops sending would otherwise hold its connection for ever.
    """
    pending = b""
    while True:
        try:
            async with asyncio.timeout(max_pause):
                chunk = await content.readany()
        except TimeoutError:
            raise RequestTimeout(f"the stream sent nothing for {max_pause:g} s") from None
        except web.RequestPayloadError as exc:
            raise InvalidBody(_unreadable(exc)) from None
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


def _unreadable(exc: web.RequestPayloadError) -> str:
    """aiohttp's reason (its last line) for a body it could not decode: bad chunking, or a
    ``Content-Encoding`` the bytes do not match. The client's fault, so a 400, not a 500."""
    lines = str(exc).strip().splitlines() or ["malformed"]
    return f"the body cannot be read: {lines[-1].strip()}"


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
    request: web.Request,
    state: BrokerState,
    defaults: Sequence[str],
    grants: Grants | None,
    key: str | None,
) -> web.Response:
    """Publish each network read's complete lines as one batch, as soon as they arrive.

    A bad line stops the stream: the lines before it stay published, and the error lists
    their ids so the publisher knows exactly where to resume.
    """
    subject = None if grants is None else grants.subject
    max_line = state.config.max_body_bytes
    ids: list[str] = []
    line_number = 0
    reads = _lines(request.content, max_line, state.config.body_timeout)
    while True:
        try:
            lines = await anext(reads)
        except StopAsyncIteration:
            break
        except (PayloadTooLarge, RequestTimeout, InvalidBody) as exc:
            raise _at_line(exc, line_number + 1, ids) from None
        drafts: list[EventDraft] = []
        try:
            for line in lines:
                line_number += 1
                if len(line) > max_line:
                    raise PayloadTooLarge(f"the line is longer than {max_line} bytes")
                line = line.rstrip(b"\r")
                if line.strip():
                    draft = _ndjson_draft(line, state.limits, defaults)
                    check_publish(grants, (draft.topics,))
                    _assign_keys([draft], key, len(ids) + len(drafts), subject)
                    drafts.append(draft)
        except (InvalidEvent, PayloadTooLarge, Forbidden) as exc:
            if drafts:
                ids.extend(await _publish_read(request, state, drafts, ids, subject))
            raise _at_line(exc, line_number, ids) from None
        if drafts:
            ids.extend(await _publish_read(request, state, drafts, ids, subject))
    if not ids:
        raise InvalidBody("the stream held no events")
    return web.json_response({"ids": ids})


async def _publish_read(
    request: web.Request,
    state: BrokerState,
    drafts: list[EventDraft],
    published: list[str],
    subject: str | None,
) -> list[str]:
    """Publish one read's lines; if the rate or the backend stops them, say which got in.

    Under ``--publish-rate`` as many lines pass as the publisher's bucket holds, and the
    stream stops at the first that does not fit: where the network happened to cut the
    stream into reads must not decide how much of it is published.
    """
    done: list[str] = []
    start = 0
    while start < len(drafts):
        try:
            count = charge_up_to(request, state, subject, len(drafts) - start)
            done += await publish_drafts(request, state, drafts[start : start + count], subject)
        except (TooManyRequests, Unavailable) as exc:
            so_far = [*published, *done]
            raise type(exc)(
                f"{exc.detail}; the {len(so_far)} event(s) before them were published",
                retry_after=int(exc.headers.get("Retry-After", "1")),
                extra={"ids": so_far},
            ) from None
        start += count
    return done


def _at_line(
    exc: InvalidEvent | PayloadTooLarge | Forbidden | RequestTimeout | InvalidBody,
    line: int,
    ids: list[str],
) -> ClientError:
    return type(exc)(
        f"line {line}: {exc.detail}; the {len(ids)} event(s) before it were published",
        extra={"ids": ids},
    )

"""``/.well-known/mercure``: the Mercure protocol (draft-dunglas-mercure-08) on our hub.

Mercure's subscribers and publishers share the hub, the log and the backends with our
own API: an update published here reaches ``/events`` subscribers whose topics match, and
an event published to ``/publish`` reaches Mercure subscribers. What differs is only the
surface:

* subscribing names topics with matcher parameters (``match``/``matchExact``: byte-exact;
  ``matchURLPattern``: WHATWG URL patterns, relative ones resolved against the hub's URL;
  ``*`` in any of them: every topic). With ``--mercure-legacy`` (the default) the
  ``topic`` parameter of earlier drafts also works: an exact topic, or a URI template;
* publishing is a form with one ``topic`` (several with ``--mercure-legacy``, the first
  canonical), ``data``, ``private``, ``id``, ``type`` and ``retry``; the answer is the
  update's id as ``text/plain``. Without an ``id`` the hub makes one, ``urn:uuid:...``;
* tokens come from ``Authorization: Bearer``, then ``?access_token=``, then the
  ``mercureAccessToken`` cookie (with ``--mercure-legacy`` then also earlier drafts'
  ``?authorization=`` and ``mercureAuthorization``), and failures are RFC 6750
  challenges; without ``--mercure-legacy`` they must be RFC 9068 access tokens;
* a resuming subscriber learns from the ``Last-Event-ID`` response header where its
  replay really starts (``earliest`` when events may be lost).
"""

from __future__ import annotations

import contextlib
import functools
import urllib.parse
import uuid
from collections.abc import Callable

import orjson
from aiohttp import web
from yarl import URL

from broker import sse
from broker.auth import EXACT, Grants, TokenSource, check_publish
from broker.config import Config
from broker.discovery import METADATA_PATH, hub_url, origin, resource_metadata
from broker.errors import (
    ClientError,
    Forbidden,
    InvalidEvent,
    InvalidSubscription,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from broker.event import (
    ID_ALLOWANCE,
    MAX_RETRY_MS,
    MAX_TYPE_LENGTH,
    RESERVED_TYPE_PREFIX,
    EventDraft,
    encode_draft,
)
from broker.history import EARLIEST
from broker.limits import charge
from broker.matchers import (
    MAX_PATTERN_LENGTH,
    URI_TEMPLATE,
    URL_PATTERN,
    MatcherError,
    URITemplateMatcher,
    URLPatternMatcher,
    is_uri_template,
)
from broker.subscriptions import presented
from broker.topics import (
    DOUBLE_STAR,
    MAX_TOPIC_LENGTH,
    Matcher,
    Selector,
    is_reserved,
    text_problem,
)
from broker.web.publish import FORM_TYPES, publish_drafts, read_body, read_form
from broker.web.state import STATE, BrokerState
from broker.web.stream import STREAM_HEADERS, last_event_id, open_stream

ANY_TOPIC = "*"
TOKEN_QUERY = "access_token"
# Where Mercure hubs before draft 8 read tokens (Symfony's Mercure component sets this cookie).
LEGACY_TOKEN_QUERY = "authorization"
LEGACY_TOKEN_COOKIE = "mercureAuthorization"
MAX_ID_LENGTH = 1024
# Subscribe parameters: each names the type of the matcher it carries. Any other
# parameter whose name starts with "match", whatever its case, is an error.
MATCH_PARAMETERS = {"match": EXACT, "matchExact": EXACT, "matchURLPattern": URL_PATTERN}
LEGACY_PARAMETER = "topic"
# What aiohttp decodes invalid UTF-8 in a form to.
REPLACEMENT = "\ufffd"
INVALID_REQUEST_CHALLENGE = 'Bearer error="invalid_request"'
MERCURE_STREAM_HEADERS = {**STREAM_HEADERS, "Cache-Control": "private, no-cache"}


class InvalidRequest(ClientError):
    """A malformed Mercure request: 400 with RFC 6750's ``invalid_request``."""

    code = "invalid_request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": INVALID_REQUEST_CHALLENGE})


def install(app: web.Application, path: str) -> None:
    app.router.add_get(path, handle_subscribe, allow_head=False)
    app.router.add_post(path, handle_publish)
    app.router.add_get(METADATA_PATH, handle_metadata)


# -- subscribing


async def handle_subscribe(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    hub = hub_url(request, state.config)
    selector, subscriptions = parse_matchers(request, hub, state)
    try:
        resume_from = last_event_id(request)
    except InvalidSubscription as exc:
        raise InvalidRequest(exc.detail) from None
    grants = grants_for(request, state, hub, state.gatekeeper.subscriber)
    registry = state.subscriptions
    on_open = None
    if registry is not None:
        on_open = functools.partial(
            registry.opened, grants=grants, matchers=presented(subscriptions, selector)
        )
    return await open_stream(
        request,
        selector,
        grants,
        resume_from,
        headers=MERCURE_STREAM_HEADERS,
        resume_header=True,
        on_open=on_open,
    )


def parse_matchers(
    request: web.Request, hub: str, state: BrokerState
) -> tuple[Selector, list[tuple[str, str]]]:
    """The subscription's selector, and its (matcher type, matcher) pairs in order."""
    patterns: list[str] = []
    exact: list[str] = []
    scanned: list[Matcher] = []
    subscriptions: list[tuple[str, str]] = []
    legacy = state.config.mercure_legacy
    given = 0
    for name, value in _raw_query(request):
        if name.lower().startswith("match"):
            kind = MATCH_PARAMETERS.get(name)
            if kind is None:
                raise InvalidRequest(
                    f"unknown matcher parameter {name!r}; use match, matchExact or matchURLPattern"
                )
        elif name == LEGACY_PARAMETER and legacy:
            kind = URI_TEMPLATE
        else:
            continue
        _check_matcher(name, value)
        # The limit is on parameters, as sent: duplicates count before they are merged.
        given += 1
        if given > state.config.max_topics:
            raise InvalidRequest(
                f"a subscription may have at most {state.config.max_topics} matchers"
            )
        if (kind, value) not in subscriptions:
            subscriptions.append((kind, value))
        if value == ANY_TOPIC:
            patterns.append(DOUBLE_STAR)
        elif kind == EXACT:
            exact.append(value)
        elif kind == URL_PATTERN:
            try:
                scanned.append(URLPatternMatcher(value, hub))
            except MatcherError as exc:
                raise InvalidRequest(f"{name}={value!r}: {exc}") from None
        else:
            # Earlier drafts: a topic selector is the topic itself or, when it has
            # expressions, a URI template (one that does not compile is only a topic).
            exact.append(value)
            if is_uri_template(value):
                with contextlib.suppress(MatcherError):
                    scanned.append(URITemplateMatcher(value))
    if not subscriptions:
        wanted = "match, matchExact or matchURLPattern" + (" (or topic)" if legacy else "")
        raise InvalidRequest(f"name at least one topic with a query parameter: {wanted}")
    return Selector(patterns, exact=exact, scanned=scanned), subscriptions


def _raw_query(request: web.Request) -> list[tuple[str, str]]:
    """The query's parameters decoded from the bytes the client sent. ``request.query``
    turns invalid UTF-8 into U+FFFD, indistinguishable from a real U+FFFD; decoded with
    ``surrogateescape`` it shows as lone surrogates, which ``text_problem`` refuses."""
    return urllib.parse.parse_qsl(
        request.rel_url.raw_query_string, keep_blank_values=True, errors="surrogateescape"
    )


def _check_matcher(name: str, value: str) -> None:
    if not value:
        raise InvalidRequest(f"{name} must not be empty")
    if len(value) > MAX_PATTERN_LENGTH:
        raise InvalidRequest(f"{name} is longer than {MAX_PATTERN_LENGTH} characters")
    problem = text_problem(value)
    if problem is not None:
        raise InvalidRequest(f"{name} {problem}")


# -- publishing


async def handle_publish(request: web.Request) -> web.Response:
    state = request.app[STATE]
    hub = hub_url(request, state.config)
    _refuse_cross_site(request, state)
    grants = grants_for(request, state, hub, state.gatekeeper.publisher)
    if request.content_type not in FORM_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {request.content_type!r} is not accepted; "
            "Mercure updates are application/x-www-form-urlencoded"
        )
    try:
        fields = await read_body(request, state, read_form(request))
        if any(REPLACEMENT in text for name, values in fields.items() for text in (name, *values)):
            fields = _form_as_sent(await request.read())
        draft = _draft(fields, state)
    except ClientError as exc:
        # Mercure answers every malformed request with RFC 6750's invalid_request.
        if exc.status == InvalidRequest.status:
            exc.headers.setdefault("WWW-Authenticate", INVALID_REQUEST_CHALLENGE)
        raise
    for topic in draft.topics:
        if is_reserved(topic):
            raise Forbidden(
                f"the topic {topic!r} is in the hub's reserved namespace /.well-known/mercure"
            )
    check_publish(grants, (draft.topics,))
    subject = None if grants is None else grants.subject
    charge(request, state, subject, 1)
    ids = await publish_drafts(request, state, [draft], subject)
    return web.Response(text=ids[0], content_type="text/plain")


def _form_as_sent(body: bytes) -> dict[str, list[str]]:
    """The form's fields decoded from the bytes sent (already read, so cached): aiohttp
    turns invalid UTF-8 into U+FFFD, which a publisher may also have sent on purpose;
    decoded here, invalid bytes show as lone surrogates, which the checks refuse."""
    fields: dict[str, list[str]] = {}
    text = body.decode("utf-8", "surrogateescape")
    for name, value in urllib.parse.parse_qsl(
        text, keep_blank_values=True, errors="surrogateescape"
    ):
        fields.setdefault(name, []).append(value)
    return fields


def _draft(fields: dict[str, list[str]], state: BrokerState) -> EventDraft:
    """Check an update's fields as Mercure says, and encode it."""
    topics = list(dict.fromkeys(fields.get("topic", [])))
    if not topics:
        raise InvalidEvent("the 'topic' field is required")
    if len(fields["topic"]) > 1 and not state.config.mercure_legacy:
        raise InvalidEvent("an update has exactly one 'topic' field")
    if len(topics) > state.limits.max_topics:
        raise InvalidEvent(f"an update may have at most {state.limits.max_topics} topics")
    for topic in topics:
        _check_topic(topic)
    data = fields.get("data", [""])[0]
    if not _is_utf8(data):
        raise InvalidEvent("'data' is not valid UTF-8")
    event_id = _first(fields, "id")
    if event_id is None:
        event_id = uuid.uuid4().urn
    else:
        _check_id(event_id)
    event_type = _first(fields, "type")
    if event_type is not None:
        _check_type(event_type)
    retry = _first(fields, "retry")
    if retry is not None and (not retry.isascii() or not retry.isdigit()):
        raise InvalidEvent("'retry' must be ASCII digits only")
    if retry is not None and int(retry) > MAX_RETRY_MS:
        raise InvalidEvent(f"'retry' must be at most {MAX_RETRY_MS}")
    try:
        draft = encode_draft(
            tuple(topics),
            data,
            event_type,
            None if retry is None else int(retry),
            private="private" in fields,
            event_id=event_id,
        )
    except sse.EncodingError as exc:
        raise InvalidEvent(str(exc)) from None
    limit = state.limits.max_event_bytes
    if len(draft.body) + ID_ALLOWANCE > limit:
        raise PayloadTooLarge(
            f"the encoded update is {len(draft.body)} bytes; the limit is {limit}"
        )
    return draft


def _is_utf8(text: str) -> bool:
    """False for text holding lone surrogates: bytes that were not UTF-8 as sent."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first(fields: dict[str, list[str]], name: str) -> str | None:
    """A field's value; an empty one counts as absent (a form sends every input)."""
    values = fields.get(name)
    return values[0] if values and values[0] else None


def _check_topic(topic: str) -> None:
    if not topic:
        raise InvalidEvent("a topic must not be empty")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise PayloadTooLarge(f"a topic is longer than {MAX_TOPIC_LENGTH} characters")
    problem = text_problem(topic)
    if problem is not None:
        raise InvalidEvent(f"a topic {problem}")
    if topic == ANY_TOPIC:
        raise InvalidEvent("'*' is the wildcard matcher, not a topic one can publish to")


def _check_id(event_id: str) -> None:
    if len(event_id) > MAX_ID_LENGTH:
        raise PayloadTooLarge(f"'id' is longer than {MAX_ID_LENGTH} characters")
    if event_id.startswith("#"):
        raise InvalidEvent("'id' must not start with '#' (the hub's own ids may)")
    _check_field("'id'", event_id)
    if event_id == EARLIEST:
        # Resuming from it would mean "all the history", not "after this update".
        raise InvalidEvent(f"'id' must not be {EARLIEST!r}, the reserved resume point")
    if not _is_utf8(event_id):
        raise InvalidEvent("'id' is not valid UTF-8")


def _check_field(name: str, value: str) -> None:
    """No CR, LF or NUL: they would end the SSE field and let the rest forge others."""
    try:
        sse.check_field(name, value)
    except sse.EncodingError as exc:
        raise InvalidEvent(str(exc)) from None


def _check_type(event_type: str) -> None:
    if len(event_type) > MAX_TYPE_LENGTH:
        raise PayloadTooLarge(f"'type' is longer than {MAX_TYPE_LENGTH} characters")
    _check_field("'type'", event_type)
    if not _is_utf8(event_type):
        raise InvalidEvent("'type' is not valid UTF-8")
    if event_type.startswith(RESERVED_TYPE_PREFIX):
        raise InvalidEvent(f"event types starting with {RESERVED_TYPE_PREFIX!r} are the hub's own")


# -- tokens and discovery


def _refuse_cross_site(request: web.Request, state: BrokerState) -> None:
    """Cross-site request forgery: a browser sends the token cookie with any site's form
    post. A publish authenticated by the cookie alone must therefore come from our own
    origin or one ``--cors-origin`` names (not ``*``), as its ``Origin`` (else its
    ``Referer``) shows; with neither header it is refused too (Mercure's advice)."""
    if not token_source(state.config).carries_only_cookie(request):
        return
    source = request.headers.get("Origin")
    if source is None and "Referer" in request.headers:
        with contextlib.suppress(ValueError):
            source = str(URL(request.headers["Referer"]).origin())
    allowed = {origin(request, state.config), *state.config.cors_origins} - {"*"}
    if source not in allowed:
        raise Forbidden(
            "a publish authenticated by a cookie must come from this hub's "
            f"origin or an allowed --cors-origin, not {source or 'an unknown origin'}"
        )


def grants_for(
    request: web.Request,
    state: BrokerState,
    hub: str,
    role: Callable[[web.Request, TokenSource, str], Grants | None],
    *,
    required: str | None = None,
) -> Grants | None:
    """The request's grants, taking its token where Mercure clients put it. A request
    refused for want of a token (or, with ``required``, the reason one is needed, for
    any request without one) is told where the hub's metadata is (RFC 9728).

    Without ``--mercure-legacy`` only RFC 9068 access tokens whose ``aud`` names this
    hub are accepted, as draft 8 requires; with it, also the tokens earlier drafts'
    publishers mint (no ``typ``, often no ``aud``)."""
    try:
        grants = role(request, token_source(state.config), hub)
        if grants is None and required is not None:
            raise Unauthorized(required, invalid_token=False)
    except Unauthorized as exc:
        if exc.headers.get("WWW-Authenticate") == "Bearer":
            metadata = origin(request, state.config) + METADATA_PATH
            exc.headers["WWW-Authenticate"] = f'Bearer resource_metadata="{metadata}"'
        raise
    if grants is None or state.config.mercure_legacy:
        return grants
    if not grants.access_token:
        raise Unauthorized(
            "the token is not an access token (the header typ at+jwt and an exp claim); "
            "tokens of earlier Mercure drafts need --mercure-legacy"
        )
    resource = state.config.jwt_audience or hub
    if resource not in grants.audiences:
        raise Unauthorized(f"the token's aud does not name this hub, {resource!r}")
    return grants


def token_source(config: Config) -> TokenSource:
    """Mercure's token places; earlier drafts' clients (``--mercure-legacy``) may also use
    ``?authorization=`` and the ``mercureAuthorization`` cookie, after the current ones."""
    if config.mercure_legacy:
        return TokenSource(
            (TOKEN_QUERY, LEGACY_TOKEN_QUERY), (config.mercure_cookie, LEGACY_TOKEN_COOKIE)
        )
    return TokenSource((TOKEN_QUERY,), (config.mercure_cookie,))


async def handle_metadata(request: web.Request) -> web.Response:
    """OAuth 2.0 protected-resource metadata: what audience tokens name, how they come."""
    state = request.app[STATE]
    config = state.config
    document = resource_metadata(
        # The hub's OAuth 2.0 resource identifier, which draft 8 tokens name in aud.
        resource=config.jwt_audience or hub_url(request, config),
        issuer=config.jwt_issuer,
    )
    return web.Response(body=orjson.dumps(document), content_type="application/json")

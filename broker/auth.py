"""Who may publish where and who may read private events: JSON Web Tokens, via PyJWT.

A token grants topics in any of three claims, merged:

* ``{"sse": {"publish": [...], "subscribe": [...]}}``, our own, in the topic pattern
  syntax of ``broker.topics``;
* ``authorization_details`` (RFC 9396), Mercure's current form: objects of type
  ``mercure`` with ``actions`` and ``topics`` matchers (``Exact`` or ``URLPattern``), an
  optional ``payload`` per ``subscribe`` detail. Such a token must be an RFC 9068 access
  token (header ``typ: at+jwt``, an ``exp``); a detail that does not parse refuses the
  whole token, never part of it;
* ``{"mercure": {"publish": [...], "subscribe": [...]}}``, the claim of earlier Mercure
  drafts, so tokens minted for those hubs work unchanged: each entry is an exact topic or
  a URI template, and ``"*"`` means every topic.

In Mercure's two forms ``*`` as a whole matcher means every topic (in ours, ``**``
does: there ``*`` is one segment).

Publishing needs ``publish`` grants covering every topic of every event. Reading
*public* events needs no grant at all (unless anonymous subscribers are refused); a
*private* event is delivered only to subscribers whose ``subscribe`` grants match one
of its topics, which makes ``subscribe`` the list of private topics a holder may read.

The key and the one accepted algorithm are fixed by configuration, never taken from the
token: ``alg: none`` and algorithm confusion are refused by construction. A verified
token's grants are cached until it expires, so a publisher that sends its token with
every request pays for the signature check once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import jwt
from aiohttp import web

from broker.errors import Forbidden, Unauthorized
from broker.matchers import (
    URL_PATTERN,
    MatcherError,
    URITemplateMatcher,
    URLPatternMatcher,
    is_uri_template,
)
from broker.topics import (
    DOUBLE_STAR,
    MAX_TOPIC_LENGTH,
    Matcher,
    Selector,
    TopicError,
    text_problem,
    validate_pattern,
)

CLAIM = "sse"
MERCURE_CLAIM = "mercure"
DETAILS_CLAIM = "authorization_details"
DETAIL_TYPE = "mercure"
EXACT = "Exact"
ACTIONS = ("publish", "subscribe")
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
ANY_TOPIC = "*"
QUERY_PARAMETER = "authorization"
MAX_TOKEN_LENGTH = 16 * 1024
MAX_GRANTED_PATTERNS = 1024
MAX_DETAILS = 256
CACHE_SIZE = 4096
# Where relative URL patterns in a token point when the request names no hub URL.
DEFAULT_HUB_URL = "http://localhost/.well-known/mercure"


@dataclasses.dataclass(frozen=True, slots=True)
class TokenSource:
    """Where a request may carry its token besides ``Authorization: Bearer``, each list
    in order of precedence: our API reads ``?authorization=`` and the
    ``brokerAuthorization`` cookie, Mercure's endpoint ``?access_token=`` (RFC 6750) and
    the ``mercureAccessToken`` cookie (and the names of earlier drafts with
    ``--mercure-legacy``)."""

    queries: tuple[str, ...]
    cookies: tuple[str, ...]

    def carries_only_cookie(self, request: web.Request) -> bool:
        """Whether a cookie is what would authenticate the request (no header, no query
        parameter): a browser sends cookies with any site's request."""
        return (
            "Authorization" not in request.headers
            and not any(name in request.query for name in self.queries)
            and any(name in request.cookies for name in self.cookies)
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Grants:
    """What one verified token allows. ``subject`` names the holder for rate limiting:
    the ``sub`` claim, or a digest of the token when it has none. ``expires`` is its
    ``exp`` (Unix time), after which a stream opened with it is ended."""

    publish: Selector
    subscribe: Selector
    subject: str
    expires: float | None = None
    # Mercure ``subscribe`` details carrying a ``payload``, in the token's order: the
    # first whose topics match a subscription's matcher describes that subscription.
    payloads: tuple[tuple[Selector, dict[str, Any]], ...] = ()
    # Whether ``sub`` named the holder (else ``subject`` is a digest of the token).
    named: bool = False
    # Whether the token is an RFC 9068 access token (header typ at+jwt, an exp): what
    # Mercure's draft 8 requires of every token (``--no-mercure-legacy``).
    access_token: bool = False
    # The token's ``aud``: draft 8 wants the hub's resource identifier among them.
    audiences: tuple[str, ...] = ()

    def payload_for(self, matcher: str) -> dict[str, Any] | None:
        for topics, payload in self.payloads:
            if topics.matches_any((matcher,)):
                return payload
        return None

    def may_publish(self, topics: Iterable[str]) -> bool:
        matches = self.publish.matches_any
        return all(matches((topic,)) for topic in topics)


def key_problem(key: str, algorithm: str) -> str | None:
    """Why ``key`` cannot check tokens signed with ``algorithm``, or None.

    Checked at start-up so that a wrong key stops the broker with one line instead of
    refusing every token later. Keys must be public keys (a broker never signs) and HMAC
    secrets at least as long as the hash (RFC 7518, section 3.2).
    """
    implementation = jwt.get_algorithm_by_name(algorithm)
    try:
        prepared = implementation.prepare_key(key)
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        return f"not a key for {algorithm}: {exc}"
    if hasattr(prepared, "private_bytes"):
        return f"this is a private key; give the broker the public key for {algorithm}"
    short = implementation.check_key_length(prepared)
    if short is not None:
        return short
    return None


class TokenChecker:
    """Verifies tokens with one key and one algorithm, remembering recent results."""

    def __init__(
        self, key: str, algorithm: str, *, issuer: str | None = None, audience: str | None = None
    ) -> None:
        self._key = jwt.get_algorithm_by_name(algorithm).prepare_key(key)
        self._algorithms = [algorithm]
        self._issuer = issuer
        self._audience = audience
        # ``aud`` is checked only against a configured audience: otherwise a token naming
        # one (as every RFC 9068 access token does) would be refused for carrying it.
        self._options: jwt.types.Options = {
            "enforce_minimum_key_length": True,
            "verify_aud": audience is not None,
        }
        self._cache: OrderedDict[tuple[str, str], tuple[Grants, float]] = OrderedDict()

    def check(self, token: str, base: str = DEFAULT_HUB_URL) -> Grants:
        """The token's grants; raises ``Unauthorized`` if it does not verify. ``base`` is
        the hub's URL, against which relative URL patterns in the token are resolved."""
        cache_key = (token, base)
        cached = self._cache.get(cache_key)
        if cached is not None:
            grants, expires = cached
            if time.time() < expires:
                self._cache.move_to_end(cache_key)
                return grants
            del self._cache[cache_key]
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized(f"the token is longer than {MAX_TOKEN_LENGTH} characters")
        if not token.isascii():
            # A JWT is base64url and dots; other characters (undecodable header bytes
            # among them) could not even be handed to the decoder.
            raise Unauthorized("the token is not a JWT: it has characters outside ASCII")
        try:
            decoded = jwt.decode_complete(
                token,
                self._key,
                algorithms=self._algorithms,
                options=self._options,
                issuer=self._issuer,
                audience=self._audience,
            )
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"the token is not valid: {exc}") from None
        claims: dict[str, Any] = decoded["payload"]
        access_token = _is_access_token(decoded["header"], claims)
        if DETAILS_CLAIM in claims and not access_token:
            raise Unauthorized(
                "a token with authorization_details must be an access token: "
                "the header typ at+jwt and an exp claim"
            )
        grants = grants_from_claims(claims, token, base, access_token=access_token)
        until = float("inf") if grants.expires is None else grants.expires
        self._cache[cache_key] = (grants, until)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grants


def _audiences(aud: object) -> tuple[str, ...]:
    """``aud`` is a string or a list of them (RFC 7519); anything else names none."""
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(item for item in aud if isinstance(item, str))
    return ()


def _is_access_token(header: dict[str, Any], claims: dict[str, Any]) -> bool:
    """RFC 9068: an access token says so in its header (so that an ID token carrying
    the same claims is not taken for one) and always expires."""
    kind = header.get("typ")
    return isinstance(kind, str) and kind.lower() in ACCESS_TOKEN_TYPES and "exp" in claims


def grants_from_claims(
    claims: dict[str, Any],
    token: str,
    base: str = DEFAULT_HUB_URL,
    *,
    access_token: bool = False,
) -> Grants:
    """Read the grants of every claim form, merged (see the module docstring)."""
    publish = _Collected()
    subscribe = _Collected()
    payloads: list[tuple[Selector, dict[str, Any]]] = []
    found = False
    if CLAIM in claims:
        found = True
        claim = _claim_object(claims, CLAIM)
        for action, into in (("publish", publish), ("subscribe", subscribe)):
            into.patterns.extend(_patterns(claim.get(action, []), f"{CLAIM}.{action}"))
    if MERCURE_CLAIM in claims:
        found = True
        claim = _claim_object(claims, MERCURE_CLAIM)
        for action, into in (("publish", publish), ("subscribe", subscribe)):
            into.add_legacy(claim.get(action, []), f"{MERCURE_CLAIM}.{action}")
    if DETAILS_CLAIM in claims:
        found = True
        payloads = _read_details(claims[DETAILS_CLAIM], base, publish, subscribe)
    if not found:
        raise Unauthorized(
            f"the token has none of the claims {CLAIM!r}, {DETAILS_CLAIM!r} or {MERCURE_CLAIM!r}"
        )
    if publish.count > MAX_GRANTED_PATTERNS or subscribe.count > MAX_GRANTED_PATTERNS:
        raise Unauthorized(f"the token grants more than {MAX_GRANTED_PATTERNS} topics per action")
    sub = claims.get("sub")
    named = isinstance(sub, str) and bool(sub)
    subject = sub if isinstance(sub, str) and sub else _token_digest(token)
    expiry = claims.get("exp")
    # PyJWT has checked that a present exp is a number; it compares whole seconds.
    expires = float(int(expiry)) if isinstance(expiry, (int, float)) else None
    return Grants(
        publish.selector(),
        subscribe.selector(),
        subject,
        expires,
        tuple(payloads),
        named,
        access_token,
        _audiences(claims.get("aud")),
    )


def _token_digest(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:32]


class _Collected:
    """One action's grants as they are read, in the three kinds a ``Selector`` holds."""

    def __init__(self) -> None:
        self.patterns: list[str] = []
        self.exact: list[str] = []
        self.scanned: list[Matcher] = []

    @property
    def count(self) -> int:
        return len(self.patterns) + len(self.exact) + len(self.scanned)

    def selector(self) -> Selector:
        return Selector(self.patterns, exact=self.exact, scanned=self.scanned)

    def add_legacy(self, value: object, where: str) -> None:
        for item in _strings(value, where):
            if item == ANY_TOPIC:
                self.patterns.append(DOUBLE_STAR)
                continue
            self.exact.append(item)
            if is_uri_template(item):
                try:
                    self.scanned.append(URITemplateMatcher(item))
                except MatcherError as exc:
                    raise Unauthorized(f"the token's {where}: {exc}") from None


def _read_details(
    details: object, base: str, publish: _Collected, subscribe: _Collected
) -> list[tuple[Selector, dict[str, Any]]]:
    """Mercure's ``authorization_details``: all of it valid, or the token is refused."""
    if not isinstance(details, list):
        raise Unauthorized(f"the token's {DETAILS_CLAIM} must be an array")
    if len(details) > MAX_DETAILS:
        raise Unauthorized(f"the token has more than {MAX_DETAILS} authorization details")
    payloads: list[tuple[Selector, dict[str, Any]]] = []
    for number, detail in enumerate(details):
        where = f"{DETAILS_CLAIM}[{number}]"
        if not isinstance(detail, dict):
            raise Unauthorized(f"the token's {where} must be an object")
        if detail.get("type") != DETAIL_TYPE:
            continue  # another API's detail: not ours to judge
        actions = detail.get("actions")
        if (
            not isinstance(actions, list)
            or not actions
            or any(action not in ACTIONS for action in actions)
        ):
            raise Unauthorized(f"the token's {where}.actions must list publish and/or subscribe")
        topics = _detail_topics(detail.get("topics"), base, f"{where}.topics")
        payload = detail.get("payload")
        if payload is not None and not isinstance(payload, dict):
            raise Unauthorized(f"the token's {where}.payload must be an object")
        for action, into in (("publish", publish), ("subscribe", subscribe)):
            if action in actions:
                into.patterns.extend(topics.patterns)
                into.exact.extend(topics.exact)
                into.scanned.extend(topics.scanned)
        if payload is not None and "subscribe" in actions:
            payloads.append((topics.selector(), payload))
    return payloads


def _detail_topics(value: object, base: str, where: str) -> _Collected:
    if not isinstance(value, list) or not value:
        raise Unauthorized(f"the token's {where} must be a non-empty array")
    topics = _Collected()
    for number, item in enumerate(value):
        if not isinstance(item, dict):
            raise Unauthorized(f"the token's {where}[{number}] must be an object")
        match = _matcher_text(item.get("match"), f"{where}[{number}].match")
        kind = item.get("matchType", EXACT)
        if kind not in (EXACT, URL_PATTERN):
            raise Unauthorized(
                f"the token's {where}[{number}].matchType must be Exact or URLPattern"
            )
        if match == ANY_TOPIC:
            topics.patterns.append(DOUBLE_STAR)
        elif kind == EXACT:
            topics.exact.append(match)
        else:
            try:
                topics.scanned.append(URLPatternMatcher(match, base))
            except MatcherError as exc:
                raise Unauthorized(f"the token's {where}[{number}]: {exc}") from None
    return topics


def _matcher_text(item: object, where: str) -> str:
    """A topic or matcher a token names: text Mercure accepts, of bounded length."""
    if not isinstance(item, str) or not item or text_problem(item) is not None:
        raise Unauthorized(f"the token's {where} must hold topics, not {item!r}")
    if len(item) > MAX_TOPIC_LENGTH:
        raise Unauthorized(f"the token's {where} has a topic over {MAX_TOPIC_LENGTH} characters")
    return item


def _claim_object(claims: dict[str, Any], name: str) -> dict[str, Any]:
    claim = claims[name]
    if not isinstance(claim, dict):
        raise Unauthorized(f"the token's {name!r} claim must be an object")
    return claim


def _strings(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Unauthorized(f"the token's {where} must be a list of topics")
    if len(value) > MAX_GRANTED_PATTERNS:
        raise Unauthorized(f"the token's {where} lists more than {MAX_GRANTED_PATTERNS} topics")
    return [_matcher_text(item, where) for item in value]


def _patterns(value: object, where: str) -> list[str]:
    patterns = []
    for item in _strings(value, where):
        try:
            patterns.append(validate_pattern(item))
        except TopicError as exc:
            raise Unauthorized(f"the token's {where}: {exc}") from None
    return patterns


def token_from(request: web.Request, source: TokenSource) -> str | None:
    """The token a request carries: ``Authorization: Bearer``, else the query parameter
    (``EventSource`` cannot set headers), else the cookie. The first found is the one
    used, the others ignored (Mercure requires exactly this precedence).

    A header with another scheme, or an empty value anywhere, is an error rather than
    no token: a client that meant to authenticate should hear that it did not.
    """
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("the Authorization header must use the Bearer scheme")
        token = value.strip()
        if not token:
            raise Unauthorized("the Authorization header holds no token")
        return token
    for name in source.queries:
        query = request.query.getall(name, [])
        if query:
            if len(query) > 1 or not query[0]:
                raise Unauthorized(f"give one non-empty {name!r} query parameter")
            return query[0]
    for name in source.cookies:
        cookie_value = request.cookies.get(name)
        if cookie_value is not None:
            if not cookie_value:
                raise Unauthorized(f"the {name!r} cookie is empty")
            return cookie_value
    return None


class Gatekeeper:
    """The broker's authorisation policy, applied by the publish and stream handlers.

    Without a key for a role, no token of that role can be checked, so tokens are not read
    at all: publishing is then open or closed by ``--allow-anonymous-publish`` alone, and
    subscribers are all anonymous (they get public events only).
    """

    def __init__(
        self,
        *,
        publisher_key: str | None,
        subscriber_key: str | None,
        publisher_algorithm: str,
        subscriber_algorithm: str,
        cookie: str,
        allow_anonymous_publish: bool,
        allow_anonymous_subscribe: bool,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        def checker(key: str | None, algorithm: str) -> TokenChecker | None:
            if key is None:
                return None
            return TokenChecker(key, algorithm, issuer=issuer, audience=audience)

        self._publishers = checker(publisher_key, publisher_algorithm)
        self._subscribers = checker(subscriber_key, subscriber_algorithm)
        self.source = TokenSource((QUERY_PARAMETER,), (cookie,))
        self._anonymous_publish = allow_anonymous_publish
        self._anonymous_subscribe = allow_anonymous_subscribe

    def publisher(
        self, request: web.Request, source: TokenSource | None = None, base: str = DEFAULT_HUB_URL
    ) -> Grants | None:
        """The publisher's grants, or None for an anonymous publisher who may publish
        anywhere; raises ``Unauthorized`` when a token is needed and missing or bad."""
        return self._grants(
            request,
            source or self.source,
            base,
            self._publishers,
            self._anonymous_publish,
            "publishing",
        )

    def subscriber(
        self, request: web.Request, source: TokenSource | None = None, base: str = DEFAULT_HUB_URL
    ) -> Grants | None:
        """The subscriber's grants, or None for an anonymous subscriber (public events
        only); raises ``Unauthorized`` when a token is needed and missing or bad."""
        return self._grants(
            request,
            source or self.source,
            base,
            self._subscribers,
            self._anonymous_subscribe,
            "subscribing",
        )

    def _grants(
        self,
        request: web.Request,
        source: TokenSource,
        base: str,
        checker: TokenChecker | None,
        anonymous_allowed: bool,
        action: str,
    ) -> Grants | None:
        if checker is None:
            if not anonymous_allowed:
                raise Unauthorized(
                    f"{action} is closed: the broker has no key to check tokens with "
                    f"(--jwt-key) and {action} without a token is not allowed",
                    invalid_token=False,
                )
            return None
        token = token_from(request, source)
        if token is None:
            if anonymous_allowed:
                return None
            raise Unauthorized(f"{action} needs a token", invalid_token=False)
        return checker.check(token, base)


def check_publish(grants: Grants | None, topics: Iterable[tuple[str, ...]]) -> None:
    """Raise ``Forbidden`` unless ``grants`` (None: an allowed anonymous publisher) cover
    every topic of every event."""
    if grants is None:
        return
    for event_topics in topics:
        if not grants.may_publish(event_topics):
            denied = [t for t in event_topics if not grants.publish.matches_any((t,))]
            raise Forbidden(f"the token does not allow publishing to {denied[0]!r}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_warnings(
    *,
    host: str,
    publisher_key: str | None,
    subscriber_key: str | None,
    allow_anonymous_publish: bool,
    allow_anonymous_subscribe: bool,
) -> list[str]:
    """What an operator should hear about the security settings at start-up."""
    warnings = []
    if allow_anonymous_publish and not is_loopback(host):
        warnings.append(
            f"anyone who can reach {host} may publish to any topic "
            "(--allow-anonymous-publish); set --jwt-key and drop it for production"
        )
    if publisher_key is None and not allow_anonymous_publish:
        warnings.append(
            "publishing is closed to everyone: set --jwt-key (or --publisher-jwt-key), "
            "or --allow-anonymous-publish on a trusted network"
        )
    if subscriber_key is None and not allow_anonymous_subscribe:
        warnings.append(
            "subscribing is closed to everyone: anonymous subscribers are refused and no "
            "--jwt-key (or --subscriber-jwt-key) is set to check tokens"
        )
    return warnings

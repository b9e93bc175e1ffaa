"""Who may publish where and who may read private events: JSON Web Tokens, via PyJWT.

A token grants topic patterns (the syntax of ``broker.topics``) in one of two claims:

* ``{"sse": {"publish": [...], "subscribe": [...]}}``, our own;
* ``{"mercure": {"publish": [...], "subscribe": [...]}}``, so tokens minted for a Mercure
  hub work unchanged. There ``"*"`` means every topic (Mercure's meaning); other entries
  are taken as topics or patterns of ours.

Publishing needs ``publish`` patterns covering every topic of every event. Reading
*public* events needs no grant at all (unless anonymous subscribers are refused); a
*private* event is delivered only to subscribers whose ``subscribe`` patterns match one
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
from broker.topics import DOUBLE_STAR, Selector, TopicError, validate_pattern

CLAIM = "sse"
MERCURE_CLAIM = "mercure"
MERCURE_ANY_TOPIC = "*"
QUERY_PARAMETER = "authorization"
MAX_TOKEN_LENGTH = 16 * 1024
MAX_GRANTED_PATTERNS = 1024
CACHE_SIZE = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class Grants:
    """What one verified token allows. ``subject`` names the holder for rate limiting:
    the ``sub`` claim, or a digest of the token when it has none. ``expires`` is its
    ``exp`` (Unix time), after which a stream opened with it is ended."""

    publish: Selector
    subscribe: Selector
    subject: str
    expires: float | None = None

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
        self._cache: OrderedDict[str, tuple[Grants, float]] = OrderedDict()

    def check(self, token: str) -> Grants:
        """The token's grants; raises ``Unauthorized`` if it does not verify."""
        cached = self._cache.get(token)
        if cached is not None:
            grants, expires = cached
            if time.time() < expires:
                self._cache.move_to_end(token)
                return grants
            del self._cache[token]
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized(f"the token is longer than {MAX_TOKEN_LENGTH} characters")
        if not token.isascii():
            # A JWT is base64url and dots; other characters (undecodable header bytes
            # among them) could not even be handed to the decoder.
            raise Unauthorized("the token is not a JWT: it has characters outside ASCII")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options=self._options,
                issuer=self._issuer,
                audience=self._audience,
            )
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"the token is not valid: {exc}") from None
        grants = grants_from_claims(claims, token)
        until = float("inf") if grants.expires is None else grants.expires
        self._cache[token] = (grants, until)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grants


def grants_from_claims(claims: dict[str, Any], token: str) -> Grants:
    """Read the publish and subscribe patterns of both claim shapes, merged."""
    publish: list[str] = []
    subscribe: list[str] = []
    found = False
    for name in (CLAIM, MERCURE_CLAIM):
        if name not in claims:
            continue
        found = True
        claim = claims[name]
        if not isinstance(claim, dict):
            raise Unauthorized(f"the token's {name!r} claim must be an object")
        for action, into in (("publish", publish), ("subscribe", subscribe)):
            into.extend(_patterns(claim.get(action, []), f"{name}.{action}", name))
    if not found:
        raise Unauthorized(f"the token has neither a {CLAIM!r} nor a {MERCURE_CLAIM!r} claim")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        subject = "token:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:32]
    expiry = claims.get("exp")
    # PyJWT has checked that a present exp is a number; it compares whole seconds.
    expires = float(int(expiry)) if isinstance(expiry, (int, float)) else None
    return Grants(Selector(publish), Selector(subscribe), subject, expires)


def _patterns(value: object, where: str, claim: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Unauthorized(f"the token's {where} must be a list of topics")
    if len(value) > MAX_GRANTED_PATTERNS:
        raise Unauthorized(f"the token's {where} lists more than {MAX_GRANTED_PATTERNS} topics")
    patterns = []
    for item in value:
        if claim == MERCURE_CLAIM and item == MERCURE_ANY_TOPIC:
            patterns.append(DOUBLE_STAR)
            continue
        try:
            patterns.append(validate_pattern(item))
        except TopicError as exc:
            raise Unauthorized(f"the token's {where}: {exc}") from None
    return patterns


def token_from(request: web.Request, cookie: str) -> str | None:
    """The token a request carries: ``Authorization: Bearer``, else the ``authorization``
    query parameter (``EventSource`` cannot set headers), else the cookie.

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
    query = request.query.getall(QUERY_PARAMETER, [])
    if query:
        if len(query) > 1 or not query[0]:
            raise Unauthorized(f"give one non-empty {QUERY_PARAMETER!r} query parameter")
        return query[0]
    cookie_value = request.cookies.get(cookie)
    if cookie_value is not None and not cookie_value:
        raise Unauthorized(f"the {cookie!r} cookie is empty")
    return cookie_value


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
        self._cookie = cookie
        self._anonymous_publish = allow_anonymous_publish
        self._anonymous_subscribe = allow_anonymous_subscribe

    def publisher(self, request: web.Request) -> Grants | None:
        """The publisher's grants, or None for an anonymous publisher who may publish
        anywhere; raises ``Unauthorized`` when a token is needed and missing or bad."""
        return self._grants(request, self._publishers, self._anonymous_publish, "publishing")

    def subscriber(self, request: web.Request) -> Grants | None:
        """The subscriber's grants, or None for an anonymous subscriber (public events
        only); raises ``Unauthorized`` when a token is needed and missing or bad."""
        return self._grants(request, self._subscribers, self._anonymous_subscribe, "subscribing")

    def _grants(
        self,
        request: web.Request,
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
        token = token_from(request, self._cookie)
        if token is None:
            if anonymous_allowed:
                return None
            raise Unauthorized(f"{action} needs a token", invalid_token=False)
        return checker.check(token)


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

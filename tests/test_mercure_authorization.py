"""Mercure, section "Authorization": access tokens with ``authorization_details`` (and the
``mercure`` claim of earlier drafts), where a request may carry them, the RFC 6750
challenges, who may read private updates, and the protected-resource metadata.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import httpx
import jwt
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import JWT_KEY, Broker, BrokerFactory, events_of
from tests.mercure_client import (
    HUB,
    MERCURE_CONFORMANCE_KEY,
    PUBLISHER,
    access_token,
    data_until_sentinel,
    detail,
    end,
    post,
    publish,
    subscribe,
)

METADATA = "/.well-known/oauth-protected-resource/.well-known/mercure"
INVALID_TOKEN = 'Bearer error="invalid_token"'
INSUFFICIENT_SCOPE = 'Bearer error="insufficient_scope"'
SUBSCRIBE_ALL = access_token(detail(["subscribe"], "*"))


@pytest.fixture
async def secured(make_broker: BrokerFactory) -> Broker:
    return await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False)


def assert_challenge(response: httpx.Response, status: int, challenge: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["WWW-Authenticate"] == challenge


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hs256(claims: dict[str, Any], key: str = JWT_KEY, **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm="HS256", headers=headers or None)


# -- access tokens


@pytest.mark.parametrize(
    "token",
    [
        access_token(detail(["publish"], "*"), typ=None),
        access_token(detail(["publish"], "*"), typ="JWT"),
        access_token(detail(["publish"], "*"), typ="jwt"),
        access_token(detail(["publish"], "*"), typ="at+jwt+x"),
        access_token(detail(["publish"], "*"), lifetime=None),
        access_token(detail(["publish"], "*"), lifetime=-60),
        access_token(detail(["publish"], "*"), nbf=int(time.time()) + 3600),
        access_token(detail(["publish"], "*"), key="another-hmac-secret-0123456789abcdef"),
        access_token(detail(["publish"], "*")) + "x",
        "not-a-jwt",
    ],
    ids=[
        "no-typ",
        "typ-JWT",
        "typ-jwt",
        "typ-other",
        "no-exp",
        "expired",
        "not-yet-valid",
        "wrong-key",
        "bad-signature",
        "garbage",
    ],
)
async def test_tokens_that_do_not_validate_are_invalid_token(
    secured: Broker, client: httpx.AsyncClient, token: str
) -> None:
    assert_challenge(await post(client, secured.url, "a", token=token), 401, INVALID_TOKEN)
    response = await client.get(secured.url + HUB, params={"match": "a"}, headers=bearer(token))
    assert_challenge(response, 401, INVALID_TOKEN)


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt"])
async def test_access_token_types(secured: Broker, client: httpx.AsyncClient, typ: str) -> None:
    token = access_token(detail(["publish"], "a"), typ=typ)
    await publish(client, secured.url, "a", token=token)


async def test_publish_grants(secured: Broker, client: httpx.AsyncClient) -> None:
    origin = secured.url
    token = access_token(
        detail(["publish"], "https://example.com/books/1", ("/authors/:id", "URLPattern")),
        detail(["subscribe"], "https://example.com/books/2"),
        detail(["publish", "subscribe"], ("https://example.com/shelves/1", "Exact")),
        {"type": "other-api", "actions": ["publish"], "topics": "*"},
    )
    for topic in [
        "https://example.com/books/1",
        "/authors/1",
        f"{origin}/authors/2",
        "https://example.com/shelves/1",
    ]:
        await publish(client, origin, topic, token=token)
    for topic in [
        "https://example.com/books/2",
        "https://example.com/books/10",
        "/authors/1/books",
        "https://example.com/authors/3",
        "/shelves/1",
    ]:
        assert_challenge(await post(client, origin, topic, token=token), 403, INSUFFICIENT_SCOPE)


async def test_a_token_without_mercure_details_grants_nothing(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    token = access_token({"type": "payment", "actions": ["publish"], "topics": [{"match": "*"}]})
    assert_challenge(await post(client, secured.url, "a", token=token), 403, INSUFFICIENT_SCOPE)
    empty = access_token()
    assert_challenge(await post(client, secured.url, "a", token=empty), 403, INSUFFICIENT_SCOPE)


async def test_the_wildcard_grants_every_topic(secured: Broker, client: httpx.AsyncClient) -> None:
    for token in [
        access_token(detail(["publish"], "*")),
        access_token(detail(["publish"], ("*", "URLPattern"))),
        access_token(detail(["publish"], ("*", "Exact"))),
    ]:
        for topic in ["a", "https://example.com/x", "/y", "urn:z"]:
            await publish(client, secured.url, topic, token=token)


async def test_every_topic_of_a_legacy_update_needs_a_grant(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    token = access_token(detail(["publish"], "a", "b"))
    await publish(client, secured.url, ["a", "b"], token=token)
    response = await post(client, secured.url, ["a", "c"], token=token)
    assert_challenge(response, 403, INSUFFICIENT_SCOPE)


VALID = detail(["publish", "subscribe"], "*")


@pytest.mark.parametrize(
    "details",
    [
        {"type": "mercure"},
        "mercure",
        [VALID, "not an object"],
        [VALID, 42],
        [VALID, None],
        [VALID, [VALID]],
        [VALID, detail(["publish"], ("a", "exact"))],
        [VALID, detail(["publish"], ("a", "URLPATTERN"))],
        [VALID, detail(["publish"], ("a", "Regex"))],
        [VALID, {**detail(["publish"], "a"), "topics": [{"match": "a", "matchType": 1}]}],
        [VALID, detail([], "a")],
        [VALID, {"type": "mercure", "topics": [{"match": "a"}]}],
        [VALID, {**detail([], "a"), "actions": "publish"}],
        [VALID, detail(["publish", "delete"], "a")],
        [VALID, detail(["Publish"], "a")],
        [VALID, detail(["publish"])],
        [VALID, {"type": "mercure", "actions": ["publish"]}],
        [VALID, {"type": "mercure", "actions": ["publish"], "topics": {"match": "a"}}],
        [VALID, {"type": "mercure", "actions": ["publish"], "topics": ["a"]}],
        [VALID, {"type": "mercure", "actions": ["publish"], "topics": [{"matchType": "Exact"}]}],
        [VALID, detail(["publish"], "")],
        [VALID, {"type": "mercure", "actions": ["publish"], "topics": [{"match": 1}]}],
        [VALID, detail(["publish"], "a\nb")],
        [VALID, detail(["publish"], ("/(", "URLPattern"))],
        [VALID, detail(["subscribe"], "a", payload="not an object")],
    ],
)
async def test_invalid_details_refuse_the_whole_token(
    secured: Broker, client: httpx.AsyncClient, details: Any
) -> None:
    token = hs256({"authorization_details": details, "exp": int(time.time()) + 3600}, typ="at+jwt")
    assert_challenge(await post(client, secured.url, "a", token=token), 401, INVALID_TOKEN)
    response = await client.get(secured.url + HUB, params={"match": "a"}, headers=bearer(token))
    assert_challenge(response, 401, INVALID_TOKEN)


async def test_matchers_over_the_length_limit_make_a_token_invalid(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    """Counts are bounded by the size of a header; the length of a matcher is checked."""
    longest = "/" + "a" * 1023
    within = [
        access_token(detail(["publish"], longest), VALID),
        access_token(detail(["publish"], (longest, "URLPattern")), VALID),
    ]
    for token in within:
        await publish(client, secured.url, "a", token=token)
    over = [
        access_token(detail(["publish"], longest + "a"), VALID),
        access_token(detail(["publish"], (longest + "a", "URLPattern")), VALID),
    ]
    for token in over:
        assert_challenge(await post(client, secured.url, "a", token=token), 401, INVALID_TOKEN)


async def test_a_missing_token_is_a_challenge_without_an_error(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(
        jwt_key=JWT_KEY, allow_anonymous_publish=False, allow_anonymous_subscribe=False
    )
    expected = f'Bearer resource_metadata="{broker.url}{METADATA}"'
    assert_challenge(await post(client, broker.url, "a"), 401, expected)
    response = await client.get(broker.url + HUB, params={"match": "a"})
    assert_challenge(response, 401, expected)
    # Our API's own cookie is not Mercure's: no token either.
    cookie = {"Cookie": f"brokerAuthorization={PUBLISHER}", "Origin": broker.url}
    response = await client.post(broker.url + HUB, data={"topic": "a"}, headers=cookie)
    assert_challenge(response, 401, expected)


async def test_earlier_drafts_token_places_work_with_legacy_support_only(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """Hubs before draft 8 read ``?authorization=`` and the ``mercureAuthorization``
    cookie (Symfony's Mercure component sets it): after the current places, and only
    with ``--mercure-legacy``."""
    legacy = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False)
    strict = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False, mercure_legacy=False)
    for broker, status in ((legacy, 200), (strict, 401)):
        by_query = await client.post(
            broker.url + HUB, params={"authorization": PUBLISHER}, data={"topic": "a"}
        )
        assert by_query.status_code == status, by_query.text
        cookie = {"Cookie": f"mercureAuthorization={PUBLISHER}", "Origin": broker.url}
        by_cookie = await client.post(broker.url + HUB, data={"topic": "a"}, headers=cookie)
        assert by_cookie.status_code == status, by_cookie.text
    # The current places win: a bad access_token is not rescued by a good authorization.
    both = await client.post(
        legacy.url + HUB,
        params={"access_token": "not.a.token", "authorization": PUBLISHER},
        data={"topic": "a"},
    )
    assert both.status_code == 401


async def test_the_challenge_names_the_public_url(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(
        jwt_key=JWT_KEY, allow_anonymous_publish=False, public_url="https://hub.example.com"
    )
    expected = f'Bearer resource_metadata="https://hub.example.com{METADATA}"'
    assert_challenge(await post(client, broker.url, "a"), 401, expected)


# -- where the token comes from


async def test_a_token_in_the_query_or_the_cookie(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        secured.url + HUB, params={"access_token": PUBLISHER}, data={"topic": "a"}
    )
    assert response.status_code == 200, response.text
    response = await client.post(
        secured.url + HUB,
        data={"topic": "a"},
        headers={"Cookie": f"mercureAccessToken={PUBLISHER}", "Origin": secured.url},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("header", "query", "cookie", "status"),
    [
        ("good", "bad", "bad", 200),
        ("bad", "good", "good", 401),
        (None, "good", "bad", 200),
        (None, "bad", "good", 401),
        (None, None, "good", 200),
        (None, None, "bad", 401),
    ],
)
async def test_header_then_query_then_cookie(
    secured: Broker,
    client: httpx.AsyncClient,
    header: str | None,
    query: str | None,
    cookie: str | None,
    status: int,
) -> None:
    tokens = {"good": PUBLISHER, "bad": "not.a.token"}
    headers = {"Origin": secured.url}
    if header is not None:
        headers["Authorization"] = f"Bearer {tokens[header]}"
    if cookie is not None:
        headers["Cookie"] = f"mercureAccessToken={tokens[cookie]}"
    params = {} if query is None else {"access_token": tokens[query]}
    response = await client.post(
        secured.url + HUB, params=params, data={"topic": "a"}, headers=headers
    )
    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["WWW-Authenticate"] == INVALID_TOKEN


async def test_the_selected_token_alone_decides_what_a_subscriber_reads(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    reads = {name: access_token(detail(["subscribe"], name)) for name in ["h", "q", "c"]}
    routing = [("match", "h"), ("match", "q"), ("match", "c")]
    cases = [
        ({"Authorization": f"Bearer {reads['h']}"}, reads["q"], ["h"]),
        ({}, reads["q"], ["q"]),
        ({}, None, ["c"]),
    ]
    async with contextlib.AsyncExitStack() as stack:
        readers = []
        for headers, query, _ in cases:
            params = routing + ([("access_token", query)] if query else [])
            headers = {**headers, "Cookie": f"mercureAccessToken={reads['c']}"}
            _, events = await stack.enter_async_context(
                subscribe(client, secured.url, params, headers=headers)
            )
            readers.append(events)
        for topic in ["h", "q", "c"]:
            await publish(client, secured.url, topic, topic, token=PUBLISHER, private="on")
        await end(client, secured.url, PUBLISHER)
        for events, (_, _, expected) in zip(readers, cases, strict=True):
            assert await data_until_sentinel(events) == expected


async def test_the_cookie_name_is_configurable(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(
        jwt_key=JWT_KEY, allow_anonymous_publish=False, mercure_cookie="hubToken"
    )
    named = await client.post(
        broker.url + HUB,
        data={"topic": "a"},
        headers={"Cookie": f"hubToken={PUBLISHER}", "Origin": broker.url},
    )
    assert named.status_code == 200, named.text
    default = await client.post(
        broker.url + HUB,
        data={"topic": "a"},
        headers={"Cookie": f"mercureAccessToken={PUBLISHER}", "Origin": broker.url},
    )
    assert default.status_code == 401


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 403),  # neither Origin nor Referer: refused
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Referer": "https://evil.example/page"}, 403),
        ({"Origin": "https://app.example"}, 200),  # --cors-origin
        ({"Origin": "SELF"}, 200),
        ({"Referer": "SELF/some/page?x=1"}, 200),
        ({"Origin": "https://evil.example", "Authorization": "Bearer TOKEN"}, 200),
    ],
)
async def test_a_publish_authenticated_by_the_cookie_alone_must_come_from_an_allowed_origin(
    make_broker: BrokerFactory,
    client: httpx.AsyncClient,
    headers: dict[str, str],
    status: int,
) -> None:
    """Cross-site request forgery: any site's form can post with the victim's cookie."""
    broker = await make_broker(
        jwt_key=JWT_KEY, allow_anonymous_publish=False, cors_origin="https://app.example"
    )
    sent = {
        name: value.replace("SELF", broker.url).replace("TOKEN", PUBLISHER)
        for name, value in headers.items()
    }
    response = await client.post(
        broker.url + HUB,
        data={"topic": "a"},
        headers={**sent, "Cookie": f"mercureAccessToken={PUBLISHER}"},
    )
    assert response.status_code == status, response.text
    if status == 403:
        assert response.json()["error"] == "forbidden"


# -- private updates


async def test_private_updates_reach_only_subscribers_granted_their_topic(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    origin = secured.url
    book = "https://example.com/books/{}".format
    routing = [("matchURLPattern", "https://example.com/books/:id")]
    grants = {
        "exact": access_token(detail(["subscribe"], book(1), book(7))),
        "pattern": access_token(
            detail(["subscribe"], ("https://example.com/books/:id(\\d)", "URLPattern"))
        ),
        "relative": access_token(detail(["subscribe"], ("/books/:id", "URLPattern"))),
        "exact-relative": access_token(detail(["subscribe"], "/books/3", "/books/4")),
        "wildcard": SUBSCRIBE_ALL,
        "publish-only": access_token(detail(["publish"], "*")),
        "none": access_token(),
        "legacy": hs256({"mercure": {"subscribe": ["https://example.com/books/{id}"]}}),
    }
    topics = [book(1), book(2), book(7), book(12), "/books/3", f"{origin}/books/4"]
    expected = {
        "exact": [book(1), book(7)],
        "pattern": [book(1), book(2), book(7)],
        "relative": ["/books/3", f"{origin}/books/4"],
        # Exact grants are not resolved: the absolute form of /books/4 is another topic.
        "exact-relative": ["/books/3"],
        "wildcard": topics,
        "publish-only": [],
        "none": [],
        "legacy": [book(1), book(2), book(7), book(12)],
        "anonymous": [],
    }
    async with contextlib.AsyncExitStack() as stack:
        readers = {}
        for name in expected:
            headers = bearer(grants[name]) if name in grants else {}
            params = [*routing, ("matchURLPattern", "/books/:id")]
            _, readers[name] = await stack.enter_async_context(
                subscribe(client, origin, params, headers=headers)
            )
        for topic in topics:
            await publish(client, origin, topic, topic, token=PUBLISHER, private="")
        await publish(client, origin, book(99), "public", token=PUBLISHER)
        await end(client, origin, PUBLISHER)
        for name, wanted in expected.items():
            assert await data_until_sentinel(readers[name]) == [*wanted, "public"], name


async def test_routing_never_widens_access(secured: Broker, client: httpx.AsyncClient) -> None:
    token = access_token(detail(["subscribe"], "https://example.com/books/1"))
    async with subscribe(client, secured.url, [("match", "*")], headers=bearer(token)) as (
        _,
        events,
    ):
        for n in [1, 2]:
            topic = f"https://example.com/books/{n}"
            await publish(client, secured.url, topic, topic, token=PUBLISHER, private="on")
        await end(client, secured.url, PUBLISHER)
        assert await data_until_sentinel(events) == ["https://example.com/books/1"]


async def test_a_private_update_needs_a_grant_on_its_topic_not_the_matcher(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    """A grant naming the subscriber's URL pattern as an exact string is no grant on the
    topics the pattern matches."""
    pattern = "https://example.com/books/:id"
    token = access_token(detail(["subscribe"], pattern))
    async with subscribe(
        client, secured.url, [("matchURLPattern", pattern)], headers=bearer(token)
    ) as (_, events):
        await publish(
            client, secured.url, "https://example.com/books/1", "x", token=PUBLISHER, private="on"
        )
        await end(client, secured.url, PUBLISHER)
        assert await data_until_sentinel(events) == []


async def test_mercure_conformance_tokens_work(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(jwt_key=MERCURE_CONFORMANCE_KEY, allow_anonymous_publish=False)
    token = hs256({"mercure": {"publish": ["*"], "subscribe": ["*"]}}, MERCURE_CONFORMANCE_KEY)
    async with subscribe(client, broker.url, [("match", "*")], headers=bearer(token)) as (
        _,
        events,
    ):
        await publish(
            client, broker.url, "https://example.com/a", "secret", token=token, private="on"
        )
        await end(client, broker.url, token)
        assert await data_until_sentinel(events) == ["secret"]


async def test_separate_publisher_and_subscriber_keys(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    publisher_key = "publisher-hmac-secret-0123456789abcdef"
    subscriber_key = "subscriber-hmac-secret-0123456789abcdef"
    broker = await make_broker(
        publisher_jwt_key=publisher_key,
        subscriber_jwt_key=subscriber_key,
        allow_anonymous_publish=False,
    )
    both = detail(["publish", "subscribe"], "*")
    as_publisher = access_token(both, key=publisher_key)
    as_subscriber = access_token(both, key=subscriber_key)
    await publish(client, broker.url, "a", token=as_publisher)
    assert_challenge(await post(client, broker.url, "a", token=as_subscriber), 401, INVALID_TOKEN)
    response = await client.get(
        broker.url + HUB, params={"match": "a"}, headers=bearer(as_publisher)
    )
    assert_challenge(response, 401, INVALID_TOKEN)
    async with subscribe(client, broker.url, [("match", "a")], headers=bearer(as_subscriber)):
        pass


# -- audience, issuer, expiry


async def test_the_audience_is_checked_only_when_configured(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    hub = "https://hub.example.com/.well-known/mercure"
    grant = detail(["publish"], "*")
    open_broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False)
    await publish(client, open_broker.url, "a", token=access_token(grant, aud="elsewhere"))
    await publish(client, open_broker.url, "a", token=access_token(grant))
    broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False, jwt_audience=hub)
    for audience in [hub, ["https://other.example", hub]]:
        await publish(client, broker.url, "a", token=access_token(grant, aud=audience))
    for token in [
        access_token(grant),
        access_token(grant, aud="https://other.example"),
        access_token(grant, aud=[hub + "/"]),
    ]:
        assert_challenge(await post(client, broker.url, "a", token=token), 401, INVALID_TOKEN)


async def test_the_issuer_is_checked_when_configured(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    issuer = "https://auth.example.com"
    broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False, jwt_issuer=issuer)
    grant = detail(["publish"], "*")
    await publish(client, broker.url, "a", token=access_token(grant, iss=issuer))
    for token in [access_token(grant), access_token(grant, iss="https://evil.example")]:
        assert_challenge(await post(client, broker.url, "a", token=token), 401, INVALID_TOKEN)


async def test_a_stream_ends_at_its_tokens_exp(secured: Broker, client: httpx.AsyncClient) -> None:
    token = access_token(detail(["subscribe"], "*"), lifetime=2)
    params = {"match": "a", "access_token": token}
    async with aconnect_sse(client, "GET", secured.url + HUB, params=params) as source:
        assert source.response.status_code == 200
        # The stream ends by itself: iterating it finishes instead of waiting for events.
        assert [event async for event in events_of(source)] == []
    response = await client.get(secured.url + HUB, params=params)
    assert_challenge(response, 401, INVALID_TOKEN)


# -- protected-resource metadata


async def test_the_metadata_document(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.get(broker.url + METADATA)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {
        "resource": broker.url + HUB,
        "bearer_methods_supported": ["header", "query"],
        "mercure_cookie": True,
        "mercure_version": 8,
    }


async def test_the_metadata_names_the_public_url_audience_and_issuer(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    public = await make_broker(public_url="https://hub.example.com")
    document = (await client.get(public.url + METADATA)).json()
    assert document["resource"] == "https://hub.example.com" + HUB
    assert "authorization_servers" not in document
    configured = await make_broker(
        jwt_key=JWT_KEY, jwt_audience="urn:hub", jwt_issuer="https://auth.example.com"
    )
    document = (await client.get(configured.url + METADATA)).json()
    assert document["resource"] == "urn:hub"
    assert document["authorization_servers"] == ["https://auth.example.com"]


async def test_without_legacy_support_only_access_tokens_for_this_hub_are_accepted(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """Draft 8 requires RFC 9068 access tokens naming the hub's resource identifier in
    ``aud``; earlier drafts' tokens (no ``typ``, no ``exp``, no ``aud``) work only with
    ``--mercure-legacy``, on either role."""
    strict = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False, mercure_legacy=False)
    everything = detail(["publish", "subscribe"], "*")
    legacy_claim = jwt.encode({"mercure": {"publish": ["*"], "subscribe": ["*"]}}, JWT_KEY)
    for_this_hub = access_token(everything, aud=[strict.url + HUB, "urn:other"])
    for token, status in (
        (legacy_claim, 401),
        (access_token(everything), 401),  # no aud
        (access_token(everything, aud="https://other.example/.well-known/mercure"), 401),
        (for_this_hub, 200),
    ):
        published = await client.post(
            strict.url + HUB, data={"topic": "a"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert published.status_code == status, published.text
        if status == 401:
            assert published.headers["WWW-Authenticate"] == INVALID_TOKEN
    refused = await client.get(
        strict.url + HUB, params={"match": "a", "access_token": legacy_claim}
    )
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == INVALID_TOKEN
    async with aconnect_sse(
        client, "GET", strict.url + HUB, params={"match": "a", "access_token": for_this_hub}
    ) as accepted:
        assert accepted.response.status_code == 200

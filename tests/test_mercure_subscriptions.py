"""Mercure, section "Active Subscriptions": subscription events and the subscription API
(``--mercure-subscriptions``).

Everything goes over real HTTP. The expected topics and documents are written out by
hand from the draft's rules (each variable percent-encoded once, as a whole), not built
with the broker's own encoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from httpx_sse import ServerSentEvent

from broker.config import load_config
from tests.conftest import JWT_KEY, RECEIVE_TIMEOUT, Broker, BrokerFactory, until_sentinel
from tests.mercure_client import (
    HUB,
    access_token,
    detail,
    end,
    subscribe,
)

SUBSCRIPTIONS = HUB + "/subscriptions"
CONTEXT = "https://mercure.rocks/"
EVERY_SUBSCRIPTION = SUBSCRIPTIONS + "/:type/:match/:subscriber"
# Reads subscription events and the whole API: a URL pattern covering the namespace.
WATCHER = access_token(detail(["subscribe"], (SUBSCRIPTIONS + "{/*}?", "URLPattern")))
EVERYTHING = access_token(detail(["subscribe"], "*"))
BOOK = "https://example.com/books/1?x=a b%"
BOOK_ENCODED = "https%3A%2F%2Fexample.com%2Fbooks%2F1%3Fx%3Da%20b%25"
PATTERN = "/books/:id"
PATTERN_ENCODED = "%2Fbooks%2F%3Aid"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def encoded_urn(subscriber: str) -> str:
    assert subscriber.startswith("urn:uuid:"), subscriber
    return subscriber.replace(":", "%3A")


def subscription(event: ServerSentEvent) -> dict[str, Any] | None:
    """The document of a subscription event, None for any other event."""
    try:
        doc = json.loads(event.data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc.get("type") == "Subscription" else None


async def documents(
    events: AsyncIterator[ServerSentEvent],
    count: int,
    wanted: Callable[[dict[str, Any]], bool],
) -> list[tuple[str, dict[str, Any]]]:
    """The next ``count`` subscription events ``wanted`` picks, as (event id, document)."""
    found: list[tuple[str, dict[str, Any]]] = []
    while len(found) < count:
        event = await asyncio.wait_for(anext(events), RECEIVE_TIMEOUT)
        doc = subscription(event)
        if doc is not None and wanted(doc):
            found.append((event.id, doc))
    return found


def about(*matches: str) -> Callable[[dict[str, Any]], bool]:
    return lambda doc: doc["match"] in matches


async def poll(
    http: httpx.AsyncClient,
    url: str,
    condition: Callable[[dict[str, Any]], bool],
    token: str = WATCHER,
    path: str = SUBSCRIPTIONS,
) -> dict[str, Any]:
    """GET ``path`` until its document satisfies ``condition`` (the registry follows the
    log, so it may trail the stream that was just opened)."""
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    while True:
        response = await http.get(url + path, headers=bearer(token))
        assert response.status_code == 200, response.text
        document: dict[str, Any] = response.json()
        if condition(document):
            return document
        if time.monotonic() > deadline:
            raise AssertionError(f"never satisfied: {document}")
        await asyncio.sleep(0.01)


def matches_listed(document: dict[str, Any]) -> set[str]:
    return {doc["match"] for doc in document["subscriptions"]}


@contextlib.asynccontextmanager
async def watching(
    http: httpx.AsyncClient, url: str, token: str = WATCHER
) -> AsyncIterator[AsyncIterator[ServerSentEvent]]:
    """A live reader of every subscription event, its own start events already read."""
    params = [("matchURLPattern", EVERY_SUBSCRIPTION)]
    async with subscribe(http, url, params, headers=bearer(token)) as (_, events):
        await documents(events, 2, lambda doc: doc["active"])
        yield events


async def secured(make_broker: BrokerFactory, **overrides: Any) -> Broker:
    return await make_broker(jwt_key=JWT_KEY, mercure_subscriptions=True, **overrides)


# -- subscription events


async def test_each_matcher_starts_a_subscription_and_its_end_ends_it(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await secured(make_broker)
    async with watching(client, broker.url) as watched:
        params = [("match", BOOK), ("matchURLPattern", PATTERN)]
        async with subscribe(client, broker.url, params, sentinel=None):
            started = await documents(watched, 2, about(BOOK, PATTERN))
        ended = await documents(watched, 2, about(BOOK, PATTERN))

    book, pattern = (doc for _, doc in started)
    subscriber = book["subscriber"]
    book_topic = f"{SUBSCRIPTIONS}/Exact/{BOOK_ENCODED}/{encoded_urn(subscriber)}"
    pattern_topic = f"{SUBSCRIPTIONS}/URLPattern/{PATTERN_ENCODED}/{encoded_urn(subscriber)}"
    assert book == {
        "@context": CONTEXT,
        "id": book_topic,
        "type": "Subscription",
        "matchType": "Exact",
        "match": BOOK,
        "subscriber": subscriber,
        "active": True,
    }
    assert pattern == {
        "@context": CONTEXT,
        "id": pattern_topic,
        "type": "Subscription",
        "matchType": "URLPattern",
        "match": PATTERN,
        "subscriber": subscriber,
        "active": True,
    }
    assert [doc for _, doc in ended] == [{**book, "active": False}, {**pattern, "active": False}]
    assert len({event_id for event_id, _ in started + ended}) == 4


async def test_events_are_published_on_their_topic_and_kept_in_history(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await secured(make_broker)
    async with watching(client, broker.url) as watched:
        async with subscribe(client, broker.url, [("match", BOOK)], sentinel=None):
            started = await documents(watched, 1, about(BOOK))
        ended = await documents(watched, 1, about(BOOK))
    topic = started[0][1]["id"]
    params = [("match", topic), ("lastEventID", "earliest")]
    async with subscribe(client, broker.url, params, headers=bearer(EVERYTHING)) as (_, events):
        await end(client, broker.url)
        replayed = [(e.id, subscription(e)) for e in await until_sentinel(events)]
    assert replayed == started + ended


async def test_subscription_events_are_private(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await secured(make_broker)
    anonymous = subscribe(client, broker.url, [("match", "*")])
    entitled = subscribe(client, broker.url, [("match", "*")], headers=bearer(EVERYTHING))
    async with anonymous as (_, anonymous_events), entitled as (_, entitled_events):
        async with subscribe(client, broker.url, [("match", BOOK)], sentinel=None):
            await documents(entitled_events, 1, about(BOOK))
        await documents(entitled_events, 1, about(BOOK))
        await end(client, broker.url)
        assert await until_sentinel(anonymous_events) == []


async def test_named_subscribers_carry_their_sub_and_the_payload_of_their_token(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await secured(make_broker)
    token = access_token(
        detail(["subscribe"], "https://example.com/books/1", payload={"user": "alice"}),
        detail(["subscribe"], "https://example.com/news"),
        sub="https://example.com/users/alice",
    )
    params = [("match", "https://example.com/books/1"), ("match", "https://example.com/news")]
    async with watching(client, broker.url) as watched:
        first = subscribe(client, broker.url, params, headers=bearer(token), sentinel=None)
        second = subscribe(client, broker.url, params, headers=bearer(token), sentinel=None)
        async with first, second:
            started = await documents(watched, 4, about(*(match for _, match in params)))
    books = [doc for _, doc in started if doc["match"] == "https://example.com/books/1"]
    news = [doc for _, doc in started if doc["match"] == "https://example.com/news"]
    assert all(doc["payload"] == {"user": "alice"} for doc in books)
    assert all("payload" not in doc for doc in news)
    subscribers = {doc["subscriber"] for doc in books}
    assert subscribers == {doc["subscriber"] for doc in news}
    assert len(subscribers) == 2, "two streams of one sub are two subscribers"
    assert all(name.startswith("https://example.com/users/alice#") for name in subscribers)


async def test_legacy_topics_are_exact_unless_used_as_uri_templates(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await secured(make_broker)
    params = [("topic", "https://example.com/books/{id}"), ("topic", "https://example.com/a")]
    async with subscribe(client, broker.url, params, sentinel=None):
        document = await poll(client, broker.url, lambda d: len(d["subscriptions"]) == 2)
    assert {(doc["matchType"], doc["match"]) for doc in document["subscriptions"]} == {
        ("URITemplate", "https://example.com/books/{id}"),
        ("Exact", "https://example.com/a"),
    }


async def test_without_the_option_there_are_no_subscription_events_nor_api(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(jwt_key=JWT_KEY)
    watcher = subscribe(client, broker.url, [("match", "*")], headers=bearer(EVERYTHING))
    other = subscribe(client, broker.url, [("match", BOOK)], sentinel=None)
    async with watcher as (_, events), other:
        await end(client, broker.url)
        assert await until_sentinel(events) == []
    response = await client.get(broker.url + SUBSCRIPTIONS, headers=bearer(EVERYTHING))
    assert response.status_code == 404


def test_the_option_is_off_by_default_and_set_by_flag_or_environment() -> None:
    assert load_config([], environ={}).mercure_subscriptions is False
    assert load_config(["--mercure-subscriptions"], environ={}).mercure_subscriptions is True
    environ = {"BROKER_MERCURE_SUBSCRIPTIONS": "true"}
    assert load_config([], environ=environ).mercure_subscriptions is True


# -- the subscription API


async def test_the_api_lists_collections_and_single_subscriptions(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await secured(make_broker)
    empty = await client.get(broker.url + SUBSCRIPTIONS, headers=bearer(WATCHER))
    assert empty.status_code == 200
    assert empty.headers["Content-Type"] == "application/ld+json"
    assert empty.headers["Link"] == f'<{broker.url}{HUB}>; rel="mercure"'
    assert empty.json() == {
        "@context": CONTEXT,
        "id": SUBSCRIPTIONS,
        "type": "Subscriptions",
        "lastEventID": "earliest",
        "subscriptions": [],
    }
    async with watching(client, broker.url) as watched:
        params = [("match", BOOK), ("matchURLPattern", PATTERN)]
        async with subscribe(client, broker.url, params, sentinel=None):
            started = await documents(watched, 2, about(BOOK, PATTERN))
            last_id = started[-1][0]
            book, pattern = (
                {k: v for k, v in doc.items() if k != "@context"} for _, doc in started
            )

            listed = await poll(client, broker.url, lambda d: d["lastEventID"] == last_id)
            assert listed["id"] == SUBSCRIPTIONS
            assert book in listed["subscriptions"]
            assert pattern in listed["subscriptions"]

            per_matcher = f"{SUBSCRIPTIONS}/Exact/{BOOK_ENCODED}"
            response = await client.get(broker.url + per_matcher, headers=bearer(WATCHER))
            assert response.headers["Content-Type"] == "application/ld+json"
            assert response.json() == {
                "@context": CONTEXT,
                "id": per_matcher,
                "type": "Subscriptions",
                "lastEventID": last_id,
                "subscriptions": [book],
            }

            response = await client.get(broker.url + book["id"], headers=bearer(WATCHER))
            assert response.status_code == 200
            assert response.headers["Content-Type"] == "application/ld+json"
            assert response.headers["Link"] == f'<{broker.url}{HUB}>; rel="mercure"'
            assert response.json() == {"@context": CONTEXT, **book, "lastEventID": last_id}
        ended = await documents(watched, 2, about(BOOK, PATTERN))
        listed = await poll(client, broker.url, lambda d: d["lastEventID"] == ended[-1][0])
    assert book not in listed["subscriptions"]
    response = await client.get(broker.url + book["id"], headers=bearer(WATCHER))
    assert response.status_code == 404


async def test_the_api_answers_404_for_what_it_does_not_have(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await secured(make_broker)
    unknown = f"{SUBSCRIPTIONS}/Exact/{BOOK_ENCODED}/urn%3Auuid%3Anobody"
    for path in [unknown, f"{SUBSCRIPTIONS}/Exact", f"{SUBSCRIPTIONS}/a/b/c/d"]:
        response = await client.get(broker.url + path, headers=bearer(EVERYTHING))
        assert response.status_code == 404, path


async def test_the_api_needs_subscribe_on_the_requested_path(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await secured(make_broker)
    exact_only = access_token(
        detail(["subscribe"], (f"{SUBSCRIPTIONS}/Exact/:match", "URLPattern"))
    )
    elsewhere = access_token(detail(["subscribe"], "https://example.com/books/1"))
    per_matcher = f"{SUBSCRIPTIONS}/Exact/{BOOK_ENCODED}"
    cases = [
        (SUBSCRIPTIONS, None, 401),
        (SUBSCRIPTIONS, elsewhere, 403),
        (SUBSCRIPTIONS, exact_only, 403),
        (per_matcher, exact_only, 200),
        (f"{SUBSCRIPTIONS}/URLPattern/{PATTERN_ENCODED}", exact_only, 403),
        (per_matcher, EVERYTHING, 200),
    ]
    for path, token, status in cases:
        headers = {} if token is None else bearer(token)
        response = await client.get(broker.url + path, headers=headers)
        assert response.status_code == status, (path, response.text)
        if status == 401:
            challenge = response.headers["WWW-Authenticate"]
            assert challenge.startswith("Bearer resource_metadata="), challenge

    closed = await secured(make_broker, allow_anonymous_subscribe=False)
    response = await client.get(closed.url + SUBSCRIPTIONS)
    assert response.status_code == 401
    response = await client.get(closed.url + SUBSCRIPTIONS, params={"access_token": EVERYTHING})
    assert response.status_code == 200


async def test_nodes_sharing_redis_list_each_others_subscriptions(
    make_broker: BrokerFactory, client: httpx.AsyncClient, redis_url: str, redis_prefix: str
) -> None:
    shared = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    first = await secured(make_broker, **shared)
    second = await secured(make_broker, **shared)
    one = subscribe(client, first.url, [("match", "urn:test:one")], sentinel=None)
    two = subscribe(client, second.url, [("match", "urn:test:two")], sentinel=None)
    both = {"urn:test:one", "urn:test:two"}
    async with one, two:
        for node in (first, second):
            await poll(client, node.url, lambda d: matches_listed(d) == both)
        # A node started later finds them in the history.
        third = await secured(make_broker, **shared)
        await poll(client, third.url, lambda d: matches_listed(d) == both)
    for node in (first, second, third):
        await poll(client, node.url, lambda d: matches_listed(d) == set())


async def test_a_node_shutting_down_ends_its_subscriptions(
    make_broker: BrokerFactory, client: httpx.AsyncClient, redis_url: str, redis_prefix: str
) -> None:
    shared = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    leaving = await secured(make_broker, **shared)
    staying = await secured(make_broker, **shared)
    async with subscribe(client, leaving.url, [("match", "urn:test:one")], sentinel=None):
        await poll(client, staying.url, lambda d: matches_listed(d) == {"urn:test:one"})
        closing = asyncio.create_task(leaving.server.close())
        await poll(client, staying.url, lambda d: matches_listed(d) == set())
    await closing


async def test_a_sub_json_cannot_carry_leaves_the_stream_working_but_unannounced(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await secured(make_broker)
    token = access_token(detail(["subscribe"], "urn:test:private"), sub="\ud800")
    params = [("match", "urn:test:unannounced")]
    async with subscribe(client, broker.url, params, headers=bearer(token)) as (_, events):
        await end(client, broker.url)
        assert await until_sentinel(events) == []
        async with subscribe(client, broker.url, [("match", BOOK)], sentinel=None):
            listed = await poll(client, broker.url, lambda d: BOOK in matches_listed(d))
    assert matches_listed(listed) == {BOOK}

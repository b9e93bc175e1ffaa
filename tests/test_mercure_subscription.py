"""Mercure, section "Subscription": subscribing with GET and topic matcher parameters.

Every request goes over real HTTP. Values that a client library would re-encode (control
characters, invalid UTF-8) are sent as raw query strings, exactly as a hostile client
would put them on the wire.
"""

from __future__ import annotations

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import Broker, BrokerFactory, events_of, until_sentinel
from tests.mercure_client import (
    HUB,
    data_until_sentinel,
    end,
    publish,
    subscribe,
)


def assert_bad_request(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_request"'


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD"])
async def test_only_get_subscribes(broker: Broker, client: httpx.AsyncClient, method: str) -> None:
    response = await client.request(method, broker.url + HUB, params={"match": "a"})
    assert response.status_code == 405


async def test_every_matcher_parameter_adds_a_subscription(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    params = [
        ("match", "https://example.com/foo"),
        ("match", "bar"),
        ("matchExact", "baz"),
        ("matchURLPattern", "https://example.com/bar/:id"),
        ("topic", "legacy"),
    ]
    async with subscribe(client, broker.url, params) as (response, events):
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert "private" in response.headers["Cache-Control"]
        for topic in [
            "https://example.com/foo",
            "https://example.com/other",
            "bar",
            "baz",
            "https://example.com/bar/1",
            "https://example.com/bar/1/2",
            "legacy",
            "leg",
        ]:
            await publish(client, broker.url, topic, topic)
        await end(client, broker.url)
        assert await data_until_sentinel(events) == [
            "https://example.com/foo",
            "bar",
            "baz",
            "https://example.com/bar/1",
            "legacy",
        ]


async def test_one_update_matched_by_several_matchers_arrives_once(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    params = [("match", "/a/1"), ("matchURLPattern", "/a/:id"), ("match", "*")]
    async with subscribe(client, broker.url, params) as (_, events):
        await publish(client, broker.url, "/a/1", "once")
        await end(client, broker.url)
        assert await data_until_sentinel(events) == ["once"]


async def test_unrelated_parameters_are_ignored(broker: Broker, client: httpx.AsyncClient) -> None:
    async with subscribe(client, broker.url, [("match", "a"), ("foo", "x"), ("mat", "y")]) as (
        _,
        events,
    ):
        await publish(client, broker.url, "a", "got it")
        await end(client, broker.url)
        assert await data_until_sentinel(events) == ["got it"]


@pytest.mark.parametrize(
    "name",
    [
        "matchfoo",
        "MATCH",
        "Match",
        "mAtch",
        "matchurlpattern",
        "matchUrlPattern",
        "MatchURLPattern",
        "matchexact",
        "matchEXACT",
        "matchTopic",
        "match_",
        "match[]",
    ],
)
async def test_the_match_namespace_is_reserved(
    broker: Broker, client: httpx.AsyncClient, name: str
) -> None:
    response = await client.get(broker.url + HUB, params=[("match", "a"), (name, "a")])
    assert_bad_request(response)


@pytest.mark.parametrize(
    "raw",
    [
        "%00",
        "a%01b",
        "%1F",
        "tab%09",
        "line%0Afeed",
        "%0D",
        "%7F",
        "%C2%80",
        "x%C2%85",
        "%C2%9F",
        "%FF",
        "a%C3",
        "%C3%28",
        "%ED%A0%80",
        "%F8%88%80%80%80",
    ],
)
@pytest.mark.parametrize("name", ["match", "matchExact", "matchURLPattern", "topic"])
async def test_control_characters_and_invalid_utf8_are_refused(
    broker: Broker, client: httpx.AsyncClient, name: str, raw: str
) -> None:
    response = await client.get(f"{broker.url}{HUB}?{name}={raw}")
    assert_bad_request(response)


@pytest.mark.parametrize("raw", ["%C2%A0", "%C3%A9t%C3%A9", "%EF%BF%BD", "%F0%9F%93%9A", "%25FF"])
async def test_printable_unicode_is_accepted(
    broker: Broker, client: httpx.AsyncClient, raw: str
) -> None:
    async with aconnect_sse(client, "GET", f"{broker.url}{HUB}?match={raw}") as source:
        assert source.response.status_code == 200


async def test_a_raw_unicode_topic_is_matched_byte_for_byte(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with subscribe(client, broker.url, [("match", "été/📚"), ("match", "%FF")]) as (
        _,
        events,
    ):
        await publish(client, broker.url, "été/📚", "unicode")
        await publish(client, broker.url, "%FF", "percent")
        await publish(client, broker.url, "ete/📚", "other")
        await end(client, broker.url)
        assert await data_until_sentinel(events) == ["unicode", "percent"]


async def test_at_most_max_topics_matchers(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_topics=3)
    three = [("match", "a"), ("matchExact", "b"), ("matchURLPattern", "/c/:id")]
    async with aconnect_sse(client, "GET", broker.url + HUB, params=three) as source:
        assert source.response.status_code == 200
    assert_bad_request(await client.get(broker.url + HUB, params=[*three, ("topic", "d")]))
    assert_bad_request(await client.get(broker.url + HUB, params=[*three, ("match", "d")]))
    # Parameters count as sent, even those that merge into one subscription.
    assert_bad_request(await client.get(broker.url + HUB, params=[("match", "a")] * 4))


@pytest.mark.parametrize("name", ["match", "matchExact", "matchURLPattern", "topic"])
async def test_matchers_longer_than_1024_characters_are_refused(
    broker: Broker, client: httpx.AsyncClient, name: str
) -> None:
    longest = "/" + "a" * 1023
    async with aconnect_sse(client, "GET", broker.url + HUB, params={name: longest}) as source:
        assert source.response.status_code == 200
    assert_bad_request(await client.get(broker.url + HUB, params={name: longest + "a"}))


@pytest.mark.parametrize(
    "query", ["", "?", "?foo=bar", "?topics=a", "?match=", "?matchURLPattern=", "?lastEventID=x"]
)
async def test_a_subscription_needs_a_matcher(
    broker: Broker, client: httpx.AsyncClient, query: str
) -> None:
    assert_bad_request(await client.get(f"{broker.url}{HUB}{query}"))


async def test_strict_mode_does_not_read_the_topic_parameter(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(mercure_legacy=False)
    assert_bad_request(await client.get(broker.url + HUB, params={"topic": "a"}))
    async with subscribe(client, broker.url, [("match", "a"), ("topic", "b")]) as (_, events):
        await publish(client, broker.url, "b", "b is not subscribed")
        await publish(client, broker.url, "a", "a is")
        await end(client, broker.url)
        assert await data_until_sentinel(events) == ["a is"]


async def test_every_sse_property_is_delivered(broker: Broker, client: httpx.AsyncClient) -> None:
    async with subscribe(client, broker.url, [("match", "https://example.com/a")]) as (_, events):
        await publish(
            client,
            broker.url,
            "https://example.com/a",
            "line 1\nline 2\r\nline 3\rline 4\n\n: not a comment\nid: not an id",
            id="urn:example:1",
            type="book.updated",
            retry="1234",
        )
        generated = await publish(client, broker.url, "https://example.com/a", "")
        await end(client, broker.url)
        first, second = await until_sentinel(events)
    assert first.data == "line 1\nline 2\nline 3\nline 4\n\n: not a comment\nid: not an id"
    assert first.id == "urn:example:1"
    assert first.event == "book.updated"
    assert first.retry == 1234
    assert second.data == ""
    assert second.id == generated
    assert second.event == "message"


async def test_our_publish_api_reaches_mercure_subscribers(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with subscribe(
        client,
        broker.url,
        [("match", "books/1"), ("matchURLPattern", "https://example.com/books/:id")],
    ) as (_, events):
        for topic in ["books/1", "https://example.com/books/2", "books/3"]:
            response = await client.post(
                f"{broker.url}/publish",
                json={"topic": topic, "data": f"json {topic}", "event": "e"},
            )
            assert response.status_code == 200, response.text
        await end(client, broker.url)
        received = await until_sentinel(events)
    assert [(e.data, e.event) for e in received] == [
        ("json books/1", "e"),
        ("json https://example.com/books/2", "e"),
    ]


async def test_mercure_updates_reach_our_subscribers(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    params = [("topic", "books/*"), ("topic", "urn:test:sentinel")]
    async with aconnect_sse(client, "GET", f"{broker.url}/events", params=params) as source:
        assert source.response.status_code == 200
        events = events_of(source)
        update_id = await publish(client, broker.url, "books/1", "from mercure", type="t")
        await publish(client, broker.url, "books/1/2", "too deep")
        await end(client, broker.url)
        received = await until_sentinel(events)
    assert [(e.data, e.id, e.event) for e in received] == [("from mercure", update_id, "t")]

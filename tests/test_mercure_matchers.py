"""Mercure, section "Matcher Types": ``Exact`` (byte for byte), ``URLPattern`` (WHATWG URL
patterns resolved against the hub's URL), the ``*`` wildcard, and the URI templates of the
legacy ``topic`` parameter. Each case publishes a set of topics and checks which of them
one subscription receives, up to a sentinel.
"""

from __future__ import annotations

import unicodedata

import httpx
import pytest

from tests.conftest import Broker, BrokerFactory
from tests.mercure_client import HUB, data_until_sentinel, end, publish, subscribe

Params = list[tuple[str, str]]


async def received(
    client: httpx.AsyncClient, url: str, params: Params, topics: list[str]
) -> list[str]:
    """Which of ``topics`` (each published with itself as data) the subscription gets."""
    async with subscribe(client, url, params) as (_, events):
        for topic in topics:
            await publish(client, url, topic, topic)
        await end(client, url)
        return await data_until_sentinel(events)


async def test_exact_does_not_read_our_wildcards(broker: Broker, client: httpx.AsyncClient) -> None:
    topics = ["a/b", "a/*", "a/b/c", "a/**", "a"]
    assert await received(client, broker.url, [("match", "a/*")], topics) == ["a/*"]
    assert await received(client, broker.url, [("matchExact", "a/**")], topics) == ["a/**"]


async def test_exact_is_case_sensitive(broker: Broker, client: httpx.AsyncClient) -> None:
    topics = [
        "https://example.com/Books/1",
        "https://example.com/books/1",
        "HTTPS://EXAMPLE.COM/Books/1",
    ]
    params = [("match", "https://example.com/Books/1")]
    assert await received(client, broker.url, params, topics) == ["https://example.com/Books/1"]


async def test_exact_does_not_resolve_or_normalise(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    origin = broker.url  # the hub's own origin: a relative topic would resolve to it
    nfc = unicodedata.normalize("NFC", "/café")
    nfd = unicodedata.normalize("NFD", "/café")
    topics = [
        f"{origin}/foo",
        "/foo",
        "/foo/",
        "/./foo",
        "/%66oo",
        "foo",
        f"{origin}/.well-known/../foo",
        nfd,
        nfc,
    ]
    assert await received(client, broker.url, [("match", "/foo"), ("match", nfc)], topics) == [
        "/foo",
        nfc,
    ]
    assert await received(client, broker.url, [("match", f"{origin}/foo")], topics) == [
        f"{origin}/foo"
    ]


async def test_relative_url_patterns_resolve_against_the_hub(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    origin = broker.url
    topics = [
        "/books/1",
        f"{origin}/books/2",
        "https://other.example/books/3",
        "/books/4/chapters/1",
        "books/5",
        "/Books/6",
    ]
    params = [("matchURLPattern", "/books/:id")]
    assert await received(client, broker.url, params, topics) == ["/books/1", f"{origin}/books/2"]


async def test_relative_topics_resolve_against_the_hub_for_absolute_patterns(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    params = [("matchURLPattern", f"{broker.url}/books/:id")]
    topics = ["/books/1", "https://example.com/books/2", f"{broker.url}/books/3"]
    assert await received(client, broker.url, params, topics) == [
        "/books/1",
        f"{broker.url}/books/3",
    ]


async def test_the_public_url_is_the_base(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(public_url="https://hub.example.com")
    topics = ["/books/1", "https://hub.example.com/books/2", f"{broker.url}/books/3"]
    relative = [("matchURLPattern", "/books/:id")]
    assert await received(client, broker.url, relative, topics) == [
        "/books/1",
        "https://hub.example.com/books/2",
    ]
    absolute = [("matchURLPattern", "https://hub.example.com/books/:id")]
    assert await received(client, broker.url, absolute, topics) == [
        "/books/1",
        "https://hub.example.com/books/2",
    ]


async def test_url_patterns_ignore_case_in_the_host_only(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    topics = [
        "https://example.com/books/1",
        "https://EXAMPLE.com/books/2",
        "https://example.com/Books/3",
        "HTTPS://Example.Com/books/4",
        "https://example.com/books/5?x=1",
        "https://example.com/books/6#top",
    ]
    params = [("matchURLPattern", "https://Example.COM/books/:id")]
    assert await received(client, broker.url, params, topics) == [
        "https://example.com/books/1",
        "https://EXAMPLE.com/books/2",
        "HTTPS://Example.Com/books/4",
        "https://example.com/books/5?x=1",
        "https://example.com/books/6#top",
    ]


async def test_url_pattern_syntax(broker: Broker, client: httpx.AsyncClient) -> None:
    topics = [
        "https://example.com/books/1",
        "https://example.com/books/x",
        "https://example.com/books/1/reviews/2",
        "https://api.example.com/books/3",
        "http://example.com/books/4",
    ]
    params = [
        ("matchURLPattern", "https://example.com/books/:id(\\d+)"),
        ("matchURLPattern", "https://example.com/books/*/reviews/*"),
        ("matchURLPattern", "https://{*.}?example.com/books/3"),
        ("matchURLPattern", "http{s}?://example.com/books/4"),
    ]
    assert await received(client, broker.url, params, topics) == [
        "https://example.com/books/1",
        "https://example.com/books/1/reviews/2",
        "https://api.example.com/books/3",
        "http://example.com/books/4",
    ]


async def test_topics_that_are_not_urls_never_match_a_url_pattern(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    topics = ["urn:isbn:1", "http://[::1/books/1", "https://exa mple.com/books/1", "/books/1"]
    params = [("matchURLPattern", "/books/:id"), ("matchURLPattern", "urn\\:isbn\\:1")]
    assert await received(client, broker.url, params, topics) == ["/books/1"]


async def test_pathological_patterns_answer(broker: Broker, client: httpx.AsyncClient) -> None:
    """Patterns that make a backtracking engine run for ages: the hub's engine is linear,
    so fan-out goes on and the sentinel arrives."""
    topics = ["/" + "a" * 900 + "c", "/aab", "/" + "a" * 500 + "b"]
    params = [
        ("matchURLPattern", "/:x((?:a+)+b)"),
        ("matchURLPattern", "/:x((?:a|aa)*(?:a|aa)*c)"),
        ("matchURLPattern", "/:x((?:a*)*d)"),
    ]
    assert await received(client, broker.url, params, topics) == topics


@pytest.mark.parametrize(
    "pattern",
    ["/books/:id(", "/(", "/:x(?=a)", "/:x((a+)+b)", "https://exa mple.com/", "/:id/:id", "/:"],
)
async def test_invalid_url_patterns_are_400(
    broker: Broker, client: httpx.AsyncClient, pattern: str
) -> None:
    response = await client.get(broker.url + HUB, params={"matchURLPattern": pattern})
    assert response.status_code == 400, response.text
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_request"'


@pytest.mark.parametrize("name", ["match", "matchExact", "matchURLPattern", "topic"])
async def test_the_wildcard_gets_every_topic(
    broker: Broker, client: httpx.AsyncClient, name: str
) -> None:
    topics = ["a", "https://example.com/books/1", "/relative/x", "urn:uuid:1", "a/*", "*x", "**"]
    assert await received(client, broker.url, [(name, "*")], topics) == topics


async def test_legacy_topics_are_uri_templates(broker: Broker, client: httpx.AsyncClient) -> None:
    topics = [
        "https://example.com/books/1",
        "https://example.com/books/{id}",
        "https://example.com/books/1/2",
        "https://example.com/books/",
        "https://example.com/authors/a/b/c",
        "https://example.com/search?q=x&page=2",
        "https://example.com/search?other=1",
        "/plain",
        "/plain/x",
    ]
    params = [
        ("topic", "https://example.com/books/{id}"),
        ("topic", "https://example.com/authors/{+path}"),
        ("topic", "https://example.com/search{?q,page}"),
        ("topic", "/plain"),
    ]
    assert await received(client, broker.url, params, topics) == [
        "https://example.com/books/1",
        "https://example.com/books/{id}",
        "https://example.com/books/",
        "https://example.com/authors/a/b/c",
        "https://example.com/search?q=x&page=2",
        "/plain",
    ]


async def test_a_legacy_topic_that_is_no_template_is_exact(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """Braces that do not compile as a template, and our wildcards, match only themselves."""
    topics = ["/a{", "/a{b", "/a/*", "/a/b", "/x{=y}"]
    params = [("topic", "/a{"), ("topic", "/a/*"), ("topic", "/x{=y}")]
    assert await received(client, broker.url, params, topics) == ["/a{", "/a/*", "/x{=y}"]

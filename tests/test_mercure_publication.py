"""Mercure, section "Publication": the form a publisher POSTs, what the hub refuses (400,
403, 413, 415), and what subscribers get. Raw bodies are sent where a client library
would re-encode a field (control characters, invalid UTF-8, repeated fields).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import Broker, BrokerFactory, events_of, until_sentinel
from tests.mercure_client import (
    HUB,
    data_until_sentinel,
    end,
    post,
    publish,
    subscribe,
)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def post_raw(client: httpx.AsyncClient, url: str, body: str | bytes) -> httpx.Response:
    content = body.encode("ascii") if isinstance(body, str) else body
    return await client.post(url + HUB, content=content, headers=FORM)


def assert_status(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text


def assert_bad_request(response: httpx.Response) -> None:
    """RFC 6750's answer to a malformed request, as Mercure requires."""
    assert_status(response, 400)
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_request"'


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/x-ndjson",
        None,
    ],
)
async def test_only_forms_are_accepted(
    broker: Broker, client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = await client.post(broker.url + HUB, content=b"topic=a&data=x", headers=headers)
    assert_status(response, 415)


async def test_a_form_with_a_charset_is_accepted(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.post(
        broker.url + HUB,
        content=b"topic=a&data=%C3%A9",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"},
    )
    assert_status(response, 200)


async def test_the_answer_is_the_id_as_plain_text(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    response = await post(client, broker.url, "https://example.com/foo", "the content")
    assert_status(response, 200)
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "Location" not in response.headers
    assert response.text.startswith("urn:uuid:")


async def test_generated_ids_are_urn_uuids(broker: Broker, client: httpx.AsyncClient) -> None:
    async with subscribe(client, broker.url, [("match", "a")]) as (_, events):
        ids = [await publish(client, broker.url, "a", str(n)) for n in range(3)]
        ids.append(await publish(client, broker.url, "a", "3", id=""))
        await end(client, broker.url)
        received = await until_sentinel(events)
    assert [event.id for event in received] == ids
    assert len(set(ids)) == 4
    for event_id in ids:
        assert event_id.startswith("urn:uuid:")
        assert uuid.UUID(event_id.removeprefix("urn:uuid:")).urn == event_id


async def test_a_supplied_id_is_used_and_replayable(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    ids = ["https://example.com/revisions/1", "urn:example:a#b", "tag:x,2026:é"]
    async with subscribe(client, broker.url, [("match", "a")]) as (_, events):
        for event_id in ids:
            assert await publish(client, broker.url, "a", event_id, id=event_id) == event_id
        await end(client, broker.url)
        assert [e.id for e in await until_sentinel(events)] == ids
    params = [("match", "a"), ("lastEventID", ids[0])]
    async with subscribe(client, broker.url, params) as (response, events):
        assert response.headers["Last-Event-ID"] == ids[0]
        await end(client, broker.url)
        assert await data_until_sentinel(events) == ids[1:]


@pytest.mark.parametrize(
    "raw_id", ["%23", "%23fragment", "a%0Ab", "a%0Db", "%0D%0A", "a%00b", "%0A", "earliest"]
)
async def test_ids_the_spec_forbids_are_400(
    broker: Broker, client: httpx.AsyncClient, raw_id: str
) -> None:
    assert_bad_request(await post_raw(client, broker.url, f"topic=a&data=x&id={raw_id}"))


@pytest.mark.parametrize("raw_type", ["a%0Ab", "a%0Db", "%0D%0A", "%0A", "a%FFb"])
async def test_types_with_line_breaks_are_400(
    broker: Broker, client: httpx.AsyncClient, raw_type: str
) -> None:
    assert_bad_request(await post_raw(client, broker.url, f"topic=a&data=x&type={raw_type}"))


@pytest.mark.parametrize(
    "retry", ["-1", "1.5", "abc", "%201", "1%20", "%2B1", "1e3", "%D9%A1", "0x10"]
)
async def test_retry_is_ascii_digits_only(
    broker: Broker, client: httpx.AsyncClient, retry: str
) -> None:
    assert_bad_request(await post_raw(client, broker.url, f"topic=a&data=x&retry={retry}"))


async def test_retry_digits_are_accepted(broker: Broker, client: httpx.AsyncClient) -> None:
    async with subscribe(client, broker.url, [("match", "a")]) as (_, events):
        await publish(client, broker.url, "a", "x", retry="0")
        await publish(client, broker.url, "a", "y", retry="007")
        await end(client, broker.url)
        assert [e.retry for e in await until_sentinel(events)] == [0, 7]


async def test_unknown_fields_are_ignored(broker: Broker, client: httpx.AsyncClient) -> None:
    async with subscribe(client, broker.url, [("match", "a")]) as (_, events):
        await publish(client, broker.url, "a", "x", event="not-ours", key="k", foo="bar")
        await end(client, broker.url)
        (event,) = await until_sentinel(events)
    assert (event.data, event.event) == ("x", "message")


async def test_strict_mode_takes_exactly_one_topic(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(mercure_legacy=False)
    assert_bad_request(await post_raw(client, broker.url, "topic=a&topic=b&data=x"))
    assert_bad_request(await post_raw(client, broker.url, "topic=a&topic=a&data=x"))
    assert_bad_request(await post_raw(client, broker.url, "data=x"))
    assert_status(await post_raw(client, broker.url, "topic=a&data=x"), 200)


async def test_legacy_mode_takes_several_topics(broker: Broker, client: httpx.AsyncClient) -> None:
    async with (
        subscribe(client, broker.url, [("match", "a")]) as (_, on_a),
        subscribe(client, broker.url, [("match", "b")]) as (_, on_b),
        subscribe(client, broker.url, [("match", "a"), ("match", "b")]) as (_, on_both),
        subscribe(client, broker.url, [("match", "c")]) as (_, on_c),
    ):
        response = await post_raw(client, broker.url, "topic=a&topic=b&topic=a&data=x")
        assert_status(response, 200)
        await end(client, broker.url)
        assert await data_until_sentinel(on_a) == ["x"]
        assert await data_until_sentinel(on_b) == ["x"]
        assert await data_until_sentinel(on_both) == ["x"]
        assert await data_until_sentinel(on_c) == []


@pytest.mark.parametrize(
    "raw_topic",
    ["", "%00", "a%01", "a%0A", "%1F", "%7F", "%C2%80", "%C2%9F", "%FF", "a%C3", "*"],
)
async def test_topics_the_spec_forbids_are_400(
    broker: Broker, client: httpx.AsyncClient, raw_topic: str
) -> None:
    assert_bad_request(await post_raw(client, broker.url, f"topic={raw_topic}&data=x"))


async def test_data_must_be_utf8(broker: Broker, client: httpx.AsyncClient) -> None:
    assert_bad_request(await post_raw(client, broker.url, "topic=a&data=%FF"))
    assert_bad_request(await post_raw(client, broker.url, b"topic=a&data=\xff"))


async def test_a_real_replacement_character_is_kept(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with subscribe(client, broker.url, [("match", "\ufffd")]) as (_, events):
        response = await post_raw(
            client, broker.url, "topic=%EF%BF%BD&data=%EF%BF%BD&type=%EF%BF%BD"
        )
        assert_status(response, 200)
        await end(client, broker.url)
        (event,) = await until_sentinel(events)
    assert (event.data, event.event) == ("\ufffd", "\ufffd")


def reserved_topics(hub_origin: str) -> list[str]:
    return [
        "/.well-known/mercure",
        "/.well-known/mercure/",
        "/.well-known/mercure/subscriptions/Exact/a/b",
        f"{hub_origin}/.well-known/mercure",
        f"{hub_origin}/.well-known/mercure/x",
        "https://other.example/.well-known/mercure/x",
        "ftp://other.example/.well-known/mercure",
        "//other.example/.well-known/mercure/x",
        "/x/../.well-known/mercure",
        "/x/%2E%2E/.well-known/mercure/y",
        "/%2Ewell-known/mercure",
        "/%2ewell-known/mercure/x",
        "/.well-known/./mercure",
        "/.well-known/%6Dercure",
        "/a/b/../../.well-known/mercure",
        "../../../.well-known/mercure/x",
        "mailto:/.well-known/mercure",
        "mercure",
        "mercure/x",
        "./mercure/subscriptions",
        "?x=1",
        "#frag",
    ]


async def test_the_reserved_namespace_is_403(broker: Broker, client: httpx.AsyncClient) -> None:
    for topic in reserved_topics(broker.url):
        response = await post(client, broker.url, topic, "forged")
        assert_status(response, 403)
        assert response.headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope"'


async def test_the_reserved_namespace_follows_the_public_url(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(public_url="https://hub.example.com")
    for topic in reserved_topics("https://hub.example.com"):
        assert_status(await post(client, broker.url, topic, "forged"), 403)


async def test_next_to_the_reserved_namespace_is_fine(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    topics = [
        "/.well-known/mercurex",
        "/.well-known/mercure-x",
        "/.well-known/Mercure",
        "/.well-known/mercurey/z",
        "/x/.well-known/mercure",
        "/.well-known/mercure/../x",
        "/.well-known//mercure",
        "//.well-known/mercure",
        "/.well-known/mercure%3Bx",
        "https://example.com/.WELL-KNOWN/MERCURE",
        "urn:x:/.well-known/mercure",
        "well-known/mercure",
        "mercurex",
    ]
    async with subscribe(client, broker.url, [("match", t) for t in topics]) as (_, events):
        for topic in topics:
            assert await publish(client, broker.url, topic, topic)
        await end(client, broker.url)
        assert await data_until_sentinel(events) == topics


@pytest.mark.parametrize(
    "field", ["private", "private=", "private=on", "private=off", "private=false", "private=0"]
)
async def test_private_is_its_presence(
    broker: Broker, client: httpx.AsyncClient, field: str
) -> None:
    async with subscribe(client, broker.url, [("match", "a")]) as (_, events):
        assert_status(await post_raw(client, broker.url, f"topic=a&data=secret&{field}"), 200)
        assert_status(await post_raw(client, broker.url, "topic=a&data=public"), 200)
        await end(client, broker.url)
        assert await data_until_sentinel(events) == ["public"]


async def test_a_body_over_the_limit_is_413(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_body_bytes=4096)
    assert_status(await post_raw(client, broker.url, "topic=a&data=" + "x" * 4000), 200)
    assert_status(await post_raw(client, broker.url, "topic=a&data=" + "x" * 5000), 413)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"data=" + b"x" * 1000 + b"&"

    streamed = await client.post(broker.url + HUB, content=chunks(), headers=FORM)
    assert_status(streamed, 413)


@pytest.mark.parametrize(("field", "limit"), [("topic", 1024), ("id", 1024), ("type", 256)])
async def test_fields_over_their_limit_are_413(
    broker: Broker, client: httpx.AsyncClient, field: str, limit: int
) -> None:
    fields = {"topic": "a", "data": "x", field: "a" * limit}
    assert_status(await client.post(broker.url + HUB, data=fields), 200)
    fields[field] += "a"
    assert_status(await client.post(broker.url + HUB, data=fields), 413)


async def test_data_over_the_event_limit_is_413(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_event_bytes=2048, queue_bytes=65536)
    assert_status(await post(client, broker.url, "a", "x" * 1000), 200)
    assert_status(await post(client, broker.url, "a", "x" * 3000), 413)


async def test_updates_reach_every_kind_of_subscriber(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    params = [("topic", "books/*"), ("topic", "urn:test:sentinel")]
    async with (
        aconnect_sse(client, "GET", f"{broker.url}/events", params=params) as ours,
        subscribe(client, broker.url, [("matchURLPattern", "/books/:id")]) as (_, theirs),
    ):
        assert ours.response.status_code == 200
        await publish(client, broker.url, "/books/1", "relative")
        await publish(client, broker.url, "books/1", "ours")
        await end(client, broker.url)
        assert await data_until_sentinel(events_of(ours)) == ["ours"]
        assert await data_until_sentinel(theirs) == ["relative"]

"""Private events reach only subscribers whose tokens grant one of their topics.

Checked live, through ``*`` and ``**`` patterns, and in replay from any Last-Event-ID, on
the in-memory backend and on Redis; and counted: the delivery metric grows by exactly the
deliveries to entitled subscribers. Each reader stops at a public sentinel event published
last, so "received nothing private" is a complete statement, not a timeout.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.conftest import (
    JWT_KEY,
    SENTINEL,
    Broker,
    BrokerFactory,
    events_of,
    mint,
    until_sentinel,
)

PUBLISHER = mint(publish=["**"])


@pytest.fixture
async def secured(make_broker: BrokerFactory, backend_options: dict[str, Any]) -> Broker:
    return await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False, **backend_options)


@contextlib.asynccontextmanager
async def stream(
    http: httpx.AsyncClient,
    url: str,
    *topics: str,
    token: str | None = None,
    last_event_id: str | None = None,
) -> AsyncIterator[AsyncIterator[ServerSentEvent]]:
    params = [("topic", topic) for topic in topics]
    if token is not None:
        params.append(("authorization", token))
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    async with aconnect_sse(http, "GET", f"{url}/events", params=params, headers=headers) as source:
        assert source.response.status_code == 200
        yield events_of(source)


async def send(
    http: httpx.AsyncClient, url: str, topic: str | list[str], data: str, *, private: bool
) -> str:
    response = await http.post(
        f"{url}/publish",
        json={"topic": topic, "data": data, "private": private},
        headers={"Authorization": f"Bearer {PUBLISHER}"},
    )
    assert response.status_code == 200, response.text
    event_id: str = response.json()["id"]
    return event_id


async def publish_mixed(
    http: httpx.AsyncClient, url: str, topic: str
) -> tuple[list[str], list[str]]:
    """Three private and three public events, interleaved, then the sentinel."""
    private, public = [], []
    for n in range(3):
        await send(http, url, topic, f"private-{n}", private=True)
        private.append(f"private-{n}")
        await send(http, url, topic, f"public-{n}", private=False)
        public.append(f"public-{n}")
    await send(http, url, topic, SENTINEL, private=False)
    return private, public


def delivered_metric(text: str) -> float:
    match = re.search(r"^sse_broker_events_delivered_total (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


async def test_live_private_events_reach_only_entitled_subscribers(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    url = secured.url
    entitled = mint(subscribe=["orders/**"])
    other_grant = mint(subscribe=["invoices/**"])
    before = delivered_metric((await client.get(f"{url}/metrics")).text)
    async with contextlib.AsyncExitStack() as stack:
        readers = {
            "entitled": await stack.enter_async_context(
                stream(client, url, "orders/42", token=entitled)
            ),
            "entitled-by-pattern": await stack.enter_async_context(
                stream(client, url, "**", token=entitled)
            ),
            "anonymous-exact": await stack.enter_async_context(stream(client, url, "orders/42")),
            "anonymous-star": await stack.enter_async_context(stream(client, url, "orders/*")),
            "anonymous-double-star": await stack.enter_async_context(stream(client, url, "**")),
            "other-grant": await stack.enter_async_context(
                stream(client, url, "**", token=other_grant)
            ),
        }
        private, public = await publish_mixed(client, url, "orders/42")
        received = {
            name: [event.data for event in await until_sentinel(events)]
            for name, events in readers.items()
        }
    interleaved = [d for pair in zip(private, public, strict=True) for d in pair]
    assert received["entitled"] == interleaved
    assert received["entitled-by-pattern"] == interleaved
    for name in ("anonymous-exact", "anonymous-star", "anonymous-double-star", "other-grant"):
        assert received[name] == public, name
    # Every public event (and the sentinel) went to all six, each private one to two.
    expected = 6 * (len(public) + 1) + 2 * len(private)
    after = delivered_metric((await client.get(f"{url}/metrics")).text)
    assert after - before == expected


async def test_replay_never_leaks_private_events(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    url = secured.url
    first = await send(client, url, "orders/1", "public-first", private=False)
    for n in range(3):
        await send(client, url, "orders/1", f"secret-{n}", private=True)
        await send(client, url, ["orders/1", "audit"], f"multi-secret-{n}", private=True)
    await send(client, url, "orders/1", "public-last", private=False)

    async def replayed(*topics: str, token: str | None, last_id: str) -> list[str]:
        async with stream(client, url, *topics, token=token, last_event_id=last_id) as events:
            await send(client, url, "orders/1", SENTINEL, private=False)
            return [event.data for event in await until_sentinel(events)]

    for last_id in ("0", first):
        for topics in (("orders/1",), ("orders/*",), ("**",), ("orders/1", "audit")):
            got = await replayed(*topics, token=None, last_id=last_id)
            assert not [data for data in got if "secret" in data], (last_id, topics, got)
        stranger = await replayed("**", token=mint(subscribe=["billing/**"]), last_id=last_id)
        assert not [data for data in stranger if "secret" in data]
    # A grant on one of an event's topics is enough, whichever topic was subscribed to.
    auditor = await replayed("orders/1", token=mint(subscribe=["audit"]), last_id=first)
    assert auditor == [*(f"multi-secret-{n}" for n in range(3)), "public-last"]
    owner = await replayed("orders/*", token=mint(subscribe=["orders/*"]), last_id=first)
    assert owner == [
        *(data for n in range(3) for data in (f"secret-{n}", f"multi-secret-{n}")),
        "public-last",
    ]


async def test_mercure_star_grant_reads_every_private_event(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    token = mint(subscribe=["*"], claim="mercure")
    async with stream(client, secured.url, "https://example.com/books/1", token=token) as events:
        await send(client, secured.url, "https://example.com/books/1", "p", private=True)
        await send(client, secured.url, "https://example.com/books/1", SENTINEL, private=False)
        assert [e.data for e in await until_sentinel(events)] == ["p"]


async def test_form_and_ndjson_publishers_mark_events_private(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    url = secured.url
    auth = {"Authorization": f"Bearer {PUBLISHER}"}
    async with (
        stream(client, url, "t", token=mint(subscribe=["t"])) as entitled,
        stream(client, url, "t") as anonymous,
    ):
        form = await client.post(
            f"{url}/publish", data={"topic": "t", "data": "form", "private": "on"}, headers=auth
        )
        assert form.status_code == 200, form.text
        ndjson = await client.post(
            f"{url}/publish",
            content=b'{"topic": "t", "data": "line", "private": true}\n',
            headers={**auth, "Content-Type": "application/x-ndjson"},
        )
        assert ndjson.status_code == 200, ndjson.text
        await send(client, url, "t", SENTINEL, private=False)
        assert [e.data for e in await until_sentinel(entitled)] == ["form", "line"]
        assert await until_sentinel(anonymous) == []


@pytest.mark.parametrize("value", [1, "yes", None, [True]])
async def test_private_must_be_a_boolean(
    secured: Broker, client: httpx.AsyncClient, value: object
) -> None:
    response = await client.post(
        f"{secured.url}/publish",
        json={"topic": "t", "data": "x", "private": value},
        headers={"Authorization": f"Bearer {PUBLISHER}"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_event"


async def test_redis_function_and_channel_publishes_can_be_private(
    make_broker: BrokerFactory,
    client: httpx.AsyncClient,
    redis_url: str,
    redis_prefix: str,
    sync_redis: redis.Redis,
) -> None:
    broker = await make_broker(jwt_key=JWT_KEY, redis_url=redis_url, redis_prefix=redis_prefix)

    async with (
        stream(client, broker.url, "t", token=mint(subscribe=["t"])) as entitled,
        stream(client, broker.url, "t") as anonymous,
    ):
        # The log and the channels are separate paths with no order between them:
        # each is read up to its own sentinel.
        sync_redis.fcall(f"{redis_prefix}_publish", 0, "t", "fcall-private", "", "", "1")
        sync_redis.fcall(f"{redis_prefix}_publish", 0, "t", "fcall-public", "", "", "0")
        sync_redis.fcall(f"{redis_prefix}_publish", 0, "t", SENTINEL)
        assert [e.data for e in await until_sentinel(entitled)] == [
            "fcall-private",
            "fcall-public",
        ]
        assert [e.data for e in await until_sentinel(anonymous)] == ["fcall-public"]
        channel = f"{redis_prefix}:topic:t"
        sync_redis.publish(channel, '{"data": "channel-private", "private": true}')
        sync_redis.publish(channel, SENTINEL)
        assert [e.data for e in await until_sentinel(entitled)] == ["channel-private"]
        assert await until_sentinel(anonymous) == []

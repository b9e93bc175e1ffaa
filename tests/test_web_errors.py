"""Errors outside ``/publish`` share its JSON shape: ``{"error": code, "detail": text}``.

Clients (and the people reading their logs) get the same body whether the router, the
stream handler or the connection limit refused them, and no 4xx is ever HTML or text.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import Broker, BrokerFactory, wait_for


def error_body(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


def allowed_methods(response: httpx.Response) -> set[str]:
    return {method.strip() for method in response.headers["Allow"].split(",")}


@pytest.mark.parametrize("path", ["/x", "/nope", "/events/extra", "/publish/", "/metrics/x"])
async def test_unknown_path_is_a_json_404(
    broker: Broker, client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(f"{broker.url}{path}")
    error_body(response, 404, "not_found")


async def test_post_to_unknown_path_is_a_json_404(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    response = await client.post(f"{broker.url}/subscribe", json={"topic": "t"})
    error_body(response, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/publish", "POST"),
        ("PUT", "/publish", "POST"),
        ("DELETE", "/publish", "POST"),
        ("POST", "/events", "GET"),
        ("PUT", "/events", "GET"),
        ("POST", "/metrics", "GET"),
        ("POST", "/healthz", "GET"),
    ],
)
async def test_wrong_method_is_a_json_405_keeping_allow(
    broker: Broker, client: httpx.AsyncClient, method: str, path: str, allowed: str
) -> None:
    response = await client.request(method, f"{broker.url}{path}")
    error_body(response, 405, "method_not_allowed")
    assert allowed in allowed_methods(response)
    assert method not in allowed_methods(response)


async def test_events_without_topic(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.get(f"{broker.url}/events")
    body = error_body(response, 400, "invalid_subscription")
    assert "topic" in body["detail"]


@pytest.mark.parametrize(
    ("pattern", "detail_part"),
    [
        ("a/**/b", "'**' is only allowed as the last segment"),
        ("**/a", "'**' is only allowed as the last segment"),
        ("", "must not be empty"),
        ("t" * 1025, "longer than 1024"),
        ("a\x01b", "control characters"),
    ],
)
async def test_events_with_a_bad_pattern(
    broker: Broker, client: httpx.AsyncClient, pattern: str, detail_part: str
) -> None:
    response = await client.get(f"{broker.url}/events", params={"topic": pattern})
    body = error_body(response, 400, "invalid_subscription")
    assert detail_part in body["detail"]
    assert broker.state.hub.connection_count == 0


async def test_events_with_one_bad_pattern_among_good_ones(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    params = {"topic": ["fine", "a/**/b", "also/*"]}
    response = await client.get(f"{broker.url}/events", params=params)
    error_body(response, 400, "invalid_subscription")


async def test_events_with_too_many_topics(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_topics=2)
    params = {"topic": ["a", "b", "c"]}
    response = await client.get(f"{broker.url}/events", params=params)
    body = error_body(response, 400, "invalid_subscription")
    assert "at most 2 topics" in body["detail"]
    assert broker.state.hub.connection_count == 0


async def test_repeated_topics_count_once_against_max_topics(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_topics=2)
    params = {"topic": ["a", "b", "a"]}
    async with aconnect_sse(client, "GET", f"{broker.url}/events", params=params) as source:
        assert source.response.status_code == 200


async def test_over_long_last_event_id_header(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.get(
        f"{broker.url}/events", params={"topic": "t"}, headers={"Last-Event-ID": "1" * 1025}
    )
    body = error_body(response, 400, "invalid_subscription")
    assert "Last-Event-ID" in body["detail"]
    assert broker.state.hub.connection_count == 0


async def test_over_long_last_event_id_query(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.get(
        f"{broker.url}/events", params={"topic": "t", "lastEventID": "1" * 1025}
    )
    error_body(response, 400, "invalid_subscription")


async def test_last_event_id_at_the_length_limit_is_accepted(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """An unknown id of exactly 1024 characters is a resume point, not an error."""
    async with aconnect_sse(
        client,
        "GET",
        f"{broker.url}/events",
        params={"topic": "t"},
        headers={"Last-Event-ID": "1" * 1024},
    ) as source:
        assert source.response.status_code == 200


async def test_connection_limit_refuses_with_503_and_recovers(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_connections=2)
    url = f"{broker.url}/events"
    async with contextlib.AsyncExitStack() as streams:
        first = await streams.enter_async_context(
            aconnect_sse(client, "GET", url, params={"topic": "a"})
        )
        async with aconnect_sse(client, "GET", url, params={"topic": "b"}) as second:
            assert first.response.status_code == second.response.status_code == 200
            assert broker.state.hub.connection_count == 2

            refused = await client.get(url, params={"topic": "c"})
            body = error_body(refused, 503, "too_many_connections")
            assert "2" in body["detail"]
            retry_after = refused.headers["Retry-After"]
            assert retry_after.isdigit()
            assert int(retry_after) >= 1
            assert broker.state.hub.connection_count == 2

        await wait_for(lambda: broker.state.hub.connection_count == 1)
        async with aconnect_sse(client, "GET", url, params={"topic": "c"}) as again:
            assert again.response.status_code == 200
            assert again.response.headers["Content-Type"].startswith("text/event-stream")
            assert broker.state.hub.connection_count == 2


async def test_refused_streams_are_not_counted_as_connections(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """Bad requests fail before the limit is consulted, and leave nothing registered."""
    broker = await make_broker(max_connections=1)
    for _ in range(5):
        response = await client.get(f"{broker.url}/events")
        error_body(response, 400, "invalid_subscription")
    async with aconnect_sse(client, "GET", f"{broker.url}/events", params={"topic": "t"}) as one:
        assert one.response.status_code == 200

"""Cross-origin access for browsers: only configured origins, and credentials only by name.

``new EventSource(url, {withCredentials: true})`` fails unless the response echoes the
exact origin with ``Access-Control-Allow-Credentials: true``; a ``*`` would be refused
by the browser. ``Vary: Origin`` keeps shared caches from serving one origin's answer to
another.
"""

from __future__ import annotations

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import JWT_KEY, Broker, BrokerFactory, events_of, mint

ALLOWED = "https://app.example"
OTHER = "https://evil.example"


def vary_values(response: httpx.Response) -> set[str]:
    return {
        value.strip().lower()
        for header in response.headers.get_list("Vary")
        for value in header.split(",")
    }


def header_set(response: httpx.Response, name: str) -> set[str]:
    return {value.strip().lower() for value in response.headers[name].split(",")}


async def test_stream_from_allowed_origin_is_shared_with_credentials(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(cors_origin=[ALLOWED])
    async with aconnect_sse(
        client, "GET", f"{broker.url}/events", params={"topic": "t"}, headers={"Origin": ALLOWED}
    ) as source:
        response = source.response
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert "origin" in vary_values(response)


async def test_publish_from_allowed_origin_is_shared_with_credentials(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(cors_origin=[ALLOWED])
    response = await client.post(
        f"{broker.url}/publish", json={"topic": "t", "data": "d"}, headers={"Origin": ALLOWED}
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "origin" in vary_values(response)


async def test_error_response_to_allowed_origin_is_readable(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """A browser can only show the JSON error if the error response carries CORS too."""
    broker = await make_broker(cors_origin=[ALLOWED])
    response = await client.post(
        f"{broker.url}/publish", json={"data": "no topic"}, headers={"Origin": ALLOWED}
    )
    assert response.status_code == 400
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    stream = await client.get(f"{broker.url}/events", headers={"Origin": ALLOWED})
    assert stream.status_code == 400
    assert stream.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_one_of_several_configured_origins(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    second = "http://localhost:3000"
    broker = await make_broker(cors_origin=[ALLOWED, second])
    response = await client.post(
        f"{broker.url}/publish", json={"topic": "t", "data": "d"}, headers={"Origin": second}
    )
    assert response.headers["Access-Control-Allow-Origin"] == second


async def test_disallowed_origin_gets_no_allow_origin(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(cors_origin=[ALLOWED])
    publish = await client.post(
        f"{broker.url}/publish", json={"topic": "t", "data": "d"}, headers={"Origin": OTHER}
    )
    assert publish.status_code == 200
    assert "Access-Control-Allow-Origin" not in publish.headers
    assert "Access-Control-Allow-Credentials" not in publish.headers
    assert "origin" in vary_values(publish)
    async with aconnect_sse(
        client, "GET", f"{broker.url}/events", params={"topic": "t"}, headers={"Origin": OTHER}
    ) as source:
        assert "Access-Control-Allow-Origin" not in source.response.headers
        assert "Access-Control-Allow-Credentials" not in source.response.headers


async def test_origin_match_is_exact(make_broker: BrokerFactory, client: httpx.AsyncClient) -> None:
    """A look-alike origin (other scheme, port or a suffix) is a different origin."""
    broker = await make_broker(cors_origin=[ALLOWED])
    for origin in (
        "http://app.example",
        "https://app.example:8443",
        "https://app.example.evil.example",
        "null",
    ):
        response = await client.post(
            f"{broker.url}/publish", json={"topic": "t", "data": "d"}, headers={"Origin": origin}
        )
        assert "Access-Control-Allow-Origin" not in response.headers, origin


@pytest.mark.parametrize("path", ["/publish", "/.well-known/mercure"])
async def test_preflight_from_allowed_origin(
    make_broker: BrokerFactory, client: httpx.AsyncClient, path: str
) -> None:
    broker = await make_broker(cors_origin=[ALLOWED])
    response = await client.options(
        f"{broker.url}{path}",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, idempotency-key, content-type",
        },
    )
    assert response.status_code == 204
    assert response.content == b""
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert {"post", "get", "options"} <= header_set(response, "Access-Control-Allow-Methods")
    assert {"content-type", "last-event-id", "authorization", "idempotency-key"} <= header_set(
        response, "Access-Control-Allow-Headers"
    )
    assert int(response.headers["Access-Control-Max-Age"]) > 0


async def test_preflight_for_events(make_broker: BrokerFactory, client: httpx.AsyncClient) -> None:
    broker = await make_broker(cors_origin=[ALLOWED])
    response = await client.options(
        f"{broker.url}/events",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id",
        },
    )
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "last-event-id" in header_set(response, "Access-Control-Allow-Headers")


@pytest.mark.parametrize("path", ["/publish", "/.well-known/mercure"])
async def test_preflight_from_disallowed_origin_is_a_json_403(
    make_broker: BrokerFactory, client: httpx.AsyncClient, path: str
) -> None:
    broker = await make_broker(cors_origin=[ALLOWED])
    response = await client.options(
        f"{broker.url}{path}",
        headers={"Origin": OTHER, "Access-Control-Request-Method": "POST"},
    )
    assert response.status_code == 403
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == "origin_not_allowed"
    assert OTHER in body["detail"]
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Methods" not in response.headers


async def test_wildcard_origin_allows_any_without_credentials(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(cors_origin="*")
    publish = await client.post(
        f"{broker.url}/publish", json={"topic": "t", "data": "d"}, headers={"Origin": OTHER}
    )
    assert publish.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in publish.headers
    async with aconnect_sse(
        client, "GET", f"{broker.url}/events", params={"topic": "t"}, headers={"Origin": OTHER}
    ) as source:
        assert source.response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in source.response.headers
    preflight = await client.options(
        f"{broker.url}/publish",
        headers={"Origin": OTHER, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in preflight.headers


async def test_named_origin_beside_wildcard_keeps_credentials(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(cors_origin=[ALLOWED, "*"])
    named = await client.post(
        f"{broker.url}/publish", json={"topic": "t", "data": "d"}, headers={"Origin": ALLOWED}
    )
    assert named.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert named.headers["Access-Control-Allow-Credentials"] == "true"
    other = await client.post(
        f"{broker.url}/publish", json={"topic": "t", "data": "d"}, headers={"Origin": OTHER}
    )
    assert other.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in other.headers


async def test_no_configured_origins_means_no_cors_headers(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    publish = await client.post(
        f"{broker.url}/publish", json={"topic": "t", "data": "d"}, headers={"Origin": ALLOWED}
    )
    assert publish.status_code == 200
    assert "Access-Control-Allow-Origin" not in publish.headers
    async with aconnect_sse(
        client, "GET", f"{broker.url}/events", params={"topic": "t"}, headers={"Origin": ALLOWED}
    ) as source:
        assert "Access-Control-Allow-Origin" not in source.response.headers
    preflight = await client.options(
        f"{broker.url}/publish",
        headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 403
    assert "Access-Control-Allow-Origin" not in preflight.headers


async def test_same_origin_request_without_origin_header_is_untouched(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(cors_origin=[ALLOWED])
    response = await client.post(f"{broker.url}/publish", json={"topic": "t", "data": "d"})
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_a_cross_origin_subscriber_with_a_cookie_token_reads_private_events(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """What ``new EventSource(url, {withCredentials: true})`` does: the cookie carries the
    token, and the credentialed response names the exact origin."""
    broker = await make_broker(cors_origin=[ALLOWED], jwt_key=JWT_KEY)
    cookie = {"Cookie": f"brokerAuthorization={mint(subscribe=['t'])}"}
    async with aconnect_sse(
        client,
        "GET",
        f"{broker.url}/events",
        params={"topic": "t"},
        headers={"Origin": ALLOWED, **cookie},
    ) as source:
        response = source.response
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        published = await client.post(
            f"{broker.url}/publish", json={"topic": "t", "data": "secret", "private": True}
        )
        assert published.status_code == 200, published.text
        event = await anext(events_of(source))
        assert event.data == "secret"


async def test_a_refused_token_is_readable_cross_origin(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(
        cors_origin=[ALLOWED], jwt_key=JWT_KEY, allow_anonymous_publish=False
    )
    response = await client.post(
        f"{broker.url}/publish",
        json={"topic": "t", "data": "d"},
        headers={"Origin": ALLOWED, "Authorization": "Bearer junk"},
    )
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert header_set(response, "Access-Control-Expose-Headers") >= {
        "retry-after",
        "www-authenticate",
    }


async def test_a_cross_origin_mercure_subscriber_with_its_cookie_reads_private_updates(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """Mercure's browser flow: ``EventSource`` with credentials on the hub, the token in
    the ``mercureAccessToken`` cookie; the resume header is readable by scripts."""
    broker = await make_broker(cors_origin=[ALLOWED], jwt_key=JWT_KEY)
    first = await client.post(
        f"{broker.url}/.well-known/mercure",
        data={"topic": "t", "data": "old"},
        headers={"Authorization": f"Bearer {mint(publish=['**'])}"},
    )
    cookie = {"Cookie": f"mercureAccessToken={mint(subscribe=['t'])}"}
    async with aconnect_sse(
        client,
        "GET",
        f"{broker.url}/.well-known/mercure",
        params={"match": "t", "lastEventID": first.text},
        headers={"Origin": ALLOWED, **cookie},
    ) as source:
        response = source.response
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert "last-event-id" in header_set(response, "Access-Control-Expose-Headers")
        assert response.headers["Last-Event-ID"] == first.text
        published = await client.post(
            f"{broker.url}/.well-known/mercure",
            data={"topic": "t", "data": "secret", "private": "on"},
            headers={"Authorization": f"Bearer {mint(publish=['**'])}"},
        )
        assert published.status_code == 200, published.text
        event = await anext(events_of(source))
        assert (event.id, event.data) == (published.text, "secret")

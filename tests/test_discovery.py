"""Discovery: the hub's URL and reserved namespace, the publishers' Link header, and the
protected-resource metadata a client reads before it asks for a token."""

from __future__ import annotations

import httpx
import pytest

from broker.discovery import (
    MERCURE_VERSION,
    METADATA_PATH,
    link_header,
)
from broker.topics import HUB_PATH, is_reserved
from tests.conftest import BrokerFactory

HUB = "https://hub.example/.well-known/mercure"


@pytest.mark.parametrize(
    ("topic", "reserved"),
    [
        ("/.well-known/mercure", True),
        ("/.well-known/mercure/subscriptions/Exact/a/b", True),
        ("https://hub.example/.well-known/mercure/x", True),
        ("https://elsewhere.example/.well-known/mercure/x", True),  # any host: spec
        ("http://hub.example:8080/.well-known/mercure", True),
        ("/x/../.well-known/mercure/subscriptions", True),
        ("https://hub.example/a/b/../../.well-known/mercure", True),
        ("https://hub.example/%2Ewell-known/mercure", True),
        ("?query-only", True),  # resolves to the hub's own URL
        ("/.well-known/mercurex", False),
        ("/.well-known/mercure-not", False),
        ("mercure", True),  # relative: resolves to /.well-known/mercure itself
        ("books/1", False),  # relative: /.well-known/books/1
        ("https://example.com/books/1", False),
        ("urn:uuid:1", False),
        ("plain topic", False),
        ("http://[::1", False),  # not a URL at all
    ],
)
def test_reserved_namespace(topic: str, reserved: bool) -> None:
    assert is_reserved(topic) is reserved


def test_link_header() -> None:
    assert link_header(HUB) == f'<{HUB}>; rel="mercure"'
    assert link_header(HUB, last_event_id="urn:uuid:1", content_type="application/ld+json") == (
        f'<{HUB}>; rel="mercure"; last-event-id="urn:uuid:1"; content-type="application/ld+json"'
    )
    assert link_header(HUB, last_event_id='a"b\\c').endswith('last-event-id="a\\"b\\\\c"')


async def test_metadata_names_the_hub_from_the_request_or_the_configuration(
    make_broker: BrokerFactory,
) -> None:
    local = await make_broker()
    public = await make_broker(public_url="https://hub.example", jwt_issuer="https://auth.example")
    audience = await make_broker(jwt_audience="urn:example:hub")
    async with httpx.AsyncClient() as client:
        first = (await client.get(local.url + METADATA_PATH)).json()
        second = (await client.get(public.url + METADATA_PATH)).json()
        third = (await client.get(audience.url + METADATA_PATH)).json()
    assert first == {
        "resource": local.url + HUB_PATH,
        "bearer_methods_supported": ["header", "query"],
        "mercure_version": MERCURE_VERSION,
        "mercure_cookie": True,
    }
    assert second["resource"] == "https://hub.example" + HUB_PATH
    assert second["authorization_servers"] == ["https://auth.example"]
    assert third["resource"] == "urn:example:hub"


async def test_no_mercure_switch_removes_the_endpoint(make_broker: BrokerFactory) -> None:
    broker = await make_broker(mercure=False)
    async with httpx.AsyncClient() as client:
        for path in (HUB_PATH, METADATA_PATH):
            answer = await client.get(broker.url + path, params={"match": "a"})
            assert answer.status_code == 404
            assert answer.json()["error"] == "not_found"


async def test_a_trusted_proxy_tells_the_scheme_clients_use(make_broker: BrokerFactory) -> None:
    """Behind a TLS proxy the broker's own connection is plain HTTP: the hub's URL (and
    so what relative URL patterns resolve against) takes ``X-Forwarded-Proto`` from a
    ``--trusted-proxy`` only."""
    trusting = await make_broker(trusted_proxy="127.0.0.1")
    trusting_none = await make_broker()
    forwarded = {"X-Forwarded-Proto": "https", "Host": "hub.example"}
    async with httpx.AsyncClient() as client:
        trusted = (await client.get(trusting.url + METADATA_PATH, headers=forwarded)).json()
        ignored = (await client.get(trusting_none.url + METADATA_PATH, headers=forwarded)).json()
    assert trusted["resource"] == "https://hub.example" + HUB_PATH
    assert ignored["resource"] == "http://hub.example" + HUB_PATH

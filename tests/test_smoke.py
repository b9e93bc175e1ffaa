from __future__ import annotations

import asyncio

import httpx
from httpx_sse import aconnect_sse

from tests.conftest import Broker, events_of, publish


async def test_published_event_reaches_subscriber(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with aconnect_sse(client, "GET", f"{broker.url}/events?topic=news") as source:
        events = events_of(source)
        event_id = await publish(client, broker.url, "news", "hello")
        received = await asyncio.wait_for(anext(events), 5)
    assert (received.id, received.data) == (event_id, "hello")

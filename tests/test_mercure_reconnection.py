"""Mercure, section "Reconnection, State Reconciliation, and Event Sourcing": resuming
with ``Last-Event-ID`` or ``lastEventID``, ``earliest``, and the ``Last-Event-ID``
response header that tells where the replay really starts, never naming an event the
subscriber may not read. On the in-memory log and on Redis.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import JWT_KEY, Broker, BrokerFactory, until_sentinel
from tests.mercure_client import (
    PUBLISHER,
    SENTINEL_TOPIC,
    access_token,
    detail,
    end,
    publish,
    subscribe,
)

EARLIEST = "earliest"


@pytest.fixture
async def hub(make_broker: BrokerFactory, backend_options: dict[str, Any]) -> Broker:
    return await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False, **backend_options)


async def resume(
    client: httpx.AsyncClient,
    broker: Broker,
    *,
    header: str | None = None,
    query: str | None = None,
    token: tuple[dict[str, Any], ...] | None = None,
) -> tuple[str | None, list[str]]:
    """The ``Last-Event-ID`` response header and the data of the updates replayed, for a
    subscriber to the topic ``a``, anonymous or holding a token with ``token`` details.

    Each call ends at a sentinel of its own, on a topic of its own: earlier sentinels are
    never replayed, and a token holder's sentinel is private to it, so that the header
    of a later call (the newest update that subscriber may read) is not a sentinel.
    """
    sentinel = f"urn:test:end:{uuid.uuid4()}"
    params = [("match", "a")]
    if query is not None:
        params.append(("lastEventID", query))
    headers = {}
    if header is not None:
        headers["Last-Event-ID"] = header
    if token is not None:
        held = access_token(*token, detail(["subscribe"], sentinel))
        headers["Authorization"] = f"Bearer {held}"
    async with subscribe(client, broker.url, params, headers=headers, sentinel=sentinel) as (
        response,
        events,
    ):
        await end(client, broker.url, PUBLISHER, topic=sentinel, private=token is not None)
        received = await until_sentinel(events)
    # The hub's own notices (events may be lost) are not updates.
    return response.headers.get("Last-Event-ID"), [
        event.data for event in received if not event.event.startswith("broker.")
    ]


async def send(
    client: httpx.AsyncClient, broker: Broker, data: str, *, topic: str = "a", private: bool = False
) -> str:
    fields = {"id": f"urn:test:{data}"}
    if private:
        fields["private"] = "on"
    return await publish(client, broker.url, topic, data, token=PUBLISHER, **fields)


async def test_resuming_by_header_or_query(hub: Broker, client: httpx.AsyncClient) -> None:
    first, second, _ = [await send(client, hub, name) for name in ["1", "2", "3"]]
    await send(client, hub, "elsewhere", topic="b")
    assert await resume(client, hub, header=first) == (first, ["2", "3"])
    assert await resume(client, hub, query=first) == (first, ["2", "3"])
    assert await resume(client, hub, query=second) == (second, ["3"])


async def test_the_header_wins_over_the_query(hub: Broker, client: httpx.AsyncClient) -> None:
    first, second, _ = [await send(client, hub, name) for name in ["1", "2", "3"]]
    assert await resume(client, hub, header=second, query=first) == (second, ["3"])
    assert await resume(client, hub, header=first, query=second) == (first, ["2", "3"])


async def test_no_resume_point_means_no_header_and_no_replay(
    hub: Broker, client: httpx.AsyncClient
) -> None:
    await send(client, hub, "1")
    assert await resume(client, hub) == (None, [])


async def test_earliest_replays_the_whole_history(hub: Broker, client: httpx.AsyncClient) -> None:
    for name in ["1", "2", "3"]:
        await send(client, hub, name)
    await send(client, hub, "elsewhere", topic="b")
    assert await resume(client, hub, header=EARLIEST) == (EARLIEST, ["1", "2", "3"])
    assert await resume(client, hub, query=EARLIEST) == (EARLIEST, ["1", "2", "3"])


async def test_resuming_from_the_newest_update(hub: Broker, client: httpx.AsyncClient) -> None:
    await send(client, hub, "1")
    newest = await send(client, hub, "2")
    assert await resume(client, hub, header=newest) == (newest, [])


async def test_an_unknown_id_is_earliest(hub: Broker, client: httpx.AsyncClient) -> None:
    await send(client, hub, "1")
    header, _ = await resume(client, hub, header="urn:test:never-published")
    assert header == EARLIEST


async def test_an_empty_history_is_earliest(hub: Broker, client: httpx.AsyncClient) -> None:
    assert await resume(client, hub, header="urn:test:anything") == (EARLIEST, [])
    assert await resume(client, hub, header=EARLIEST) == (EARLIEST, [])


async def test_a_trimmed_id_is_earliest(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(jwt_key=JWT_KEY, history_size=2)
    first = await send(client, broker, "1")
    for name in ["2", "3", "4"]:
        await send(client, broker, name)
    header, replayed = await resume(client, broker, header=first)
    assert header == EARLIEST
    assert replayed == ["3", "4"]  # what the history still holds


async def test_private_updates_are_replayed_only_to_those_granted(
    hub: Broker, client: httpx.AsyncClient
) -> None:
    first = await send(client, hub, "public-1")
    await send(client, hub, "private-1", private=True)
    await send(client, hub, "public-2")
    granted = (detail(["subscribe"], "a"),)
    other = (detail(["subscribe"], "b"),)
    assert await resume(client, hub, header=first, token=granted) == (
        first,
        ["private-1", "public-2"],
    )
    assert await resume(client, hub, header=first, token=other) == (first, ["public-2"])
    assert await resume(client, hub, header=first) == (first, ["public-2"])
    assert await resume(client, hub, header=EARLIEST) == (EARLIEST, ["public-1", "public-2"])


async def test_the_header_never_names_a_private_update(
    hub: Broker, client: httpx.AsyncClient
) -> None:
    first = await send(client, hub, "public-1")
    secret = await send(client, hub, "private-1", private=True)
    await send(client, hub, "public-2")
    # The update before the first one sent is private: the one before it is named.
    assert await resume(client, hub, header=secret) == (first, ["public-2"])
    granted = (detail(["subscribe"], "a"),)
    assert await resume(client, hub, header=secret, token=granted) == (secret, ["public-2"])


async def test_only_private_predecessors_are_earliest(
    hub: Broker, client: httpx.AsyncClient
) -> None:
    hidden = await send(client, hub, "private-1", private=True)
    newest = await send(client, hub, "private-2", private=True)
    elsewhere = (detail(["subscribe"], "b"),)
    assert await resume(client, hub, header=newest, token=elsewhere) == (EARLIEST, [])
    assert await resume(client, hub, header=hidden, token=elsewhere) == (EARLIEST, [])
    assert await resume(client, hub, header=hidden) == (EARLIEST, [])
    # "a" resolves against the hub's URL to /.well-known/a.
    granted = (detail(["subscribe"], ("/.well-known/:x", "URLPattern")),)
    assert await resume(client, hub, header=hidden, token=granted) == (hidden, ["private-2"])


async def test_replay_is_authorised_against_the_current_token(
    hub: Broker, client: httpx.AsyncClient
) -> None:
    first = await send(client, hub, "public-1")
    granted = access_token(detail(["subscribe"], "a", SENTINEL_TOPIC))
    async with subscribe(
        client, hub.url, [("match", "a")], headers={"Authorization": f"Bearer {granted}"}
    ) as (_, events):
        await send(client, hub, "private-1", private=True)
        await end(client, hub.url, PUBLISHER, private=True)
        assert [e.data for e in await until_sentinel(events)] == ["private-1"]
    # Reconnecting with a token that no longer grants the topic: the update is not replayed.
    revoked = (detail(["subscribe"], "b"),)
    assert await resume(client, hub, header=first, token=revoked) == (first, [])


@pytest.mark.parametrize(("hidden", "expected"), [(999, "first"), (1000, EARLIEST)])
async def test_the_backward_scan_is_bounded(
    hub: Broker, client: httpx.AsyncClient, hidden: int, expected: str
) -> None:
    """Past the scan limit (``PREDECESSOR_SCAN``, 1000 updates) the answer is earliest."""
    first = await send(client, hub, "public-1")
    batch = [{"topic": "a", "data": f"private-{n}", "private": True} for n in range(hidden)]
    response = await client.post(
        f"{hub.url}/publish", json=batch, headers={"Authorization": f"Bearer {PUBLISHER}"}
    )
    assert response.status_code == 200, response.text
    await send(client, hub, "public-2")
    header, replayed = await resume(client, hub, header=first)
    assert replayed == ["public-2"]
    assert header == (first if expected == "first" else EARLIEST)

"""``/metrics``, ``/healthz`` and ``/readyz`` as a scraper and an orchestrator see them.

The exposition is parsed with prometheus-client's own parser, so a name or a format
slip shows up here rather than in a dashboard. Values are read after waiting for the
behaviour that moves them, never after a fixed delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import Broker, BrokerFactory, events_of, publish, wait_for

RECEIVE_TIMEOUT = 10.0

COUNTER_FAMILIES = (
    "sse_broker_events_published",
    "sse_broker_events_delivered",
    "sse_broker_events_dropped",
    "sse_broker_events_replayed",
    "sse_broker_disconnects",
)
GAUGE_FAMILIES = ("sse_broker_connections", "sse_broker_history_events")
HISTOGRAM_FAMILY = "sse_broker_publish_duration_seconds"
DISCONNECT_REASONS = {"client", "overflow", "shutdown", "error", "expired"}


class Scrape:
    """One parsed scrape: families by name, and samples looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.samples.extend(family.samples)

    def value(self, name: str, **labels: str) -> float:
        found = [
            sample.value
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}


async def scrape(http: httpx.AsyncClient, url: str) -> Scrape:
    response = await http.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "version=0.0.4" in response.headers["Content-Type"]
    return Scrape(response.text)


async def receive(events: AsyncIterator[ServerSentEvent], count: int) -> list[ServerSentEvent]:
    return [await asyncio.wait_for(anext(events), RECEIVE_TIMEOUT) for _ in range(count)]


async def test_every_metric_has_its_exact_name_and_type(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    metrics = await scrape(client, broker.url)
    for family in COUNTER_FAMILIES:
        assert metrics.types[family] == "counter", family
    for family in GAUGE_FAMILIES:
        assert metrics.types[family] == "gauge", family
    assert metrics.types[HISTOGRAM_FAMILY] == "histogram"
    assert {
        "sse_broker_connections",
        "sse_broker_history_events",
        "sse_broker_events_published_total",
        "sse_broker_events_delivered_total",
        "sse_broker_events_dropped_total",
        "sse_broker_events_replayed_total",
        "sse_broker_disconnects_total",
        f"{HISTOGRAM_FAMILY}_bucket",
        f"{HISTOGRAM_FAMILY}_count",
        f"{HISTOGRAM_FAMILY}_sum",
    } <= metrics.names()
    reasons = {
        sample.labels["reason"]
        for sample in metrics.samples
        if sample.name == "sse_broker_disconnects_total"
    }
    assert reasons == DISCONNECT_REASONS


async def test_a_fresh_broker_reports_zero(broker: Broker, client: httpx.AsyncClient) -> None:
    metrics = await scrape(client, broker.url)
    for name in (
        "sse_broker_connections",
        "sse_broker_history_events",
        "sse_broker_events_published_total",
        "sse_broker_events_delivered_total",
        "sse_broker_events_dropped_total",
        "sse_broker_events_replayed_total",
        f"{HISTOGRAM_FAMILY}_count",
    ):
        assert metrics.value(name) == 0, name
    for reason in DISCONNECT_REASONS:
        assert metrics.value("sse_broker_disconnects_total", reason=reason) == 0


async def test_connections_gauge_follows_open_streams(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    url = f"{broker.url}/events"
    async with aconnect_sse(client, "GET", url, params={"topic": "a"}):
        assert (await scrape(client, broker.url)).value("sse_broker_connections") == 1
        async with aconnect_sse(client, "GET", url, params={"topic": "b"}):
            assert (await scrape(client, broker.url)).value("sse_broker_connections") == 2
    await wait_for(lambda: broker.state.hub.connection_count == 0)
    metrics = await scrape(client, broker.url)
    assert metrics.value("sse_broker_connections") == 0
    assert metrics.value("sse_broker_disconnects_total", reason="client") == 2


async def test_published_and_delivered_counts_with_three_subscribers(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    url = f"{broker.url}/events"
    async with (
        aconnect_sse(client, "GET", url, params={"topic": "fan"}) as first,
        aconnect_sse(client, "GET", url, params={"topic": "fan"}) as second,
        aconnect_sse(client, "GET", url, params={"topic": "fan/**"}) as third,
    ):
        streams = [events_of(source) for source in (first, second, third)]
        await publish(client, broker.url, "fan", "one")
        await publish(client, broker.url, "fan", "two")
        response = await client.post(
            f"{broker.url}/publish",
            json=[{"topic": "fan", "data": "three"}, {"topic": "fan/sub", "data": "four"}],
        )
        assert response.status_code == 200
        await publish(client, broker.url, "elsewhere", "unheard")
        for events in streams[:2]:
            assert [event.data for event in await receive(events, 3)] == ["one", "two", "three"]
        received = await receive(streams[2], 1)
        assert [event.data for event in received] == ["four"]

        metrics = await scrape(client, broker.url)
    assert metrics.value("sse_broker_events_published_total") == 5
    assert metrics.value("sse_broker_events_delivered_total") == 3 * 2 + 1
    assert metrics.value("sse_broker_events_dropped_total") == 0
    assert metrics.value("sse_broker_history_events") == 5
    # One observation per publish request (a batch is one request).
    assert metrics.value(f"{HISTOGRAM_FAMILY}_count") == 4
    assert metrics.value(f"{HISTOGRAM_FAMILY}_sum") > 0
    assert metrics.value(f"{HISTOGRAM_FAMILY}_bucket", le="+Inf") == 4


async def test_histogram_buckets_are_cumulative(broker: Broker, client: httpx.AsyncClient) -> None:
    for n in range(5):
        await publish(client, broker.url, "h", str(n))
    metrics = await scrape(client, broker.url)
    buckets = sorted(
        (float(sample.labels["le"]), sample.value)
        for sample in metrics.samples
        if sample.name == f"{HISTOGRAM_FAMILY}_bucket"
    )
    counts = [count for _, count in buckets]
    assert counts == sorted(counts)
    assert buckets[-1] == (float("inf"), 5)


async def test_failed_publish_is_not_counted(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.post(f"{broker.url}/publish", json={"data": "no topic"})
    assert response.status_code == 400
    metrics = await scrape(client, broker.url)
    assert metrics.value("sse_broker_events_published_total") == 0
    assert metrics.value("sse_broker_history_events") == 0


async def test_replayed_counts_events_sent_from_history(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    ids = [await publish(client, broker.url, "r", str(n)) for n in range(4)]
    async with aconnect_sse(
        client,
        "GET",
        f"{broker.url}/events",
        params={"topic": "r"},
        headers={"Last-Event-ID": ids[0]},
    ) as source:
        replayed = await receive(events_of(source), 3)
        assert [event.id for event in replayed] == ids[1:]
        metrics = await scrape(client, broker.url)
    assert metrics.value("sse_broker_events_replayed_total") == 3
    assert metrics.value("sse_broker_events_delivered_total") == 3
    assert metrics.value("sse_broker_history_events") == 4


async def test_history_gauge_is_bounded_by_history_size(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(history_size=3)
    for n in range(5):
        await publish(client, broker.url, "bounded", str(n))
    metrics = await scrape(client, broker.url)
    assert metrics.value("sse_broker_history_events") == 3
    assert metrics.value("sse_broker_events_published_total") == 5


async def test_healthz(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.get(f"{broker.url}/healthz")
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert response.json() == {"status": "ok"}


async def test_readyz(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.get(f"{broker.url}/readyz")
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert response.json() == {"status": "ready"}

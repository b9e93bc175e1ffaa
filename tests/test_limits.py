"""Per-client limits: the client's address, the publish rate, streams per address.

The address rules are checked as a function (every proxy arrangement, spoofing attempt and
malformed header); the bucket arithmetic with a clock the test moves by hand, so every
``Retry-After`` is exact. The HTTP tests run a real broker on a real socket: every client
there is 127.0.0.1, and ``--trusted-proxy 127.0.0.1/32`` turns the test into a proxy
that names several clients in ``X-Forwarded-For``.
"""

from __future__ import annotations

import contextlib
import ipaddress

import httpx
import pytest
from httpx_sse import EventSource, aconnect_sse

from broker.config import IPNetwork
from broker.errors import TooManyRequests
from broker.limits import PublishLimiter, client_address
from tests.conftest import BrokerFactory, publish, wait_for
from tests.test_publish import NDJSON, error_body, receive, subscribed


def networks(*cidrs: str) -> list[IPNetwork]:
    return [ipaddress.ip_network(cidr) for cidr in cidrs]


PROXIES = networks("10.0.0.0/8", "::1/128")

# --- client_address --------------------------------------------------------------------


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_address("192.0.2.1", "198.51.100.7", []) == "192.0.2.1"


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    """Anyone can send the header: only a trusted proxy's word counts."""
    assert client_address("192.0.2.1", "198.51.100.7", PROXIES) == "192.0.2.1"


def test_trusted_peer_names_the_client() -> None:
    assert client_address("10.0.0.1", "198.51.100.7", PROXIES) == "198.51.100.7"


def test_trusted_peer_without_the_header_is_the_client() -> None:
    assert client_address("10.0.0.1", None, PROXIES) == "10.0.0.1"
    assert client_address("10.0.0.1", "", PROXIES) == "10.0.0.1"


def test_addresses_the_client_put_in_front_are_not_believed() -> None:
    """The client sent ``X-Forwarded-For: 203.0.113.9``; the proxy appended what it saw."""
    assert client_address("10.0.0.1", "203.0.113.9, 198.51.100.7", PROXIES) == "198.51.100.7"


def test_a_chain_of_trusted_proxies_is_walked_from_the_right() -> None:
    forwarded = "203.0.113.9, 198.51.100.7, 10.1.1.1, 10.2.2.2"
    assert client_address("10.0.0.1", forwarded, PROXIES) == "198.51.100.7"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    assert client_address("10.0.0.1", "10.9.9.9, 10.1.1.1", PROXIES) == "10.9.9.9"


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        ("garbage", "10.0.0.1"),  # the peer: the only trusted hop examined
        ("198.51.100.7, unknown, 10.1.1.1", "10.1.1.1"),
        ("198.51.100.7, 10.1.1.1:8080", "10.0.0.1"),
        ("198.51.100.7, [::1]", "10.0.0.1"),
        ("198.51.100.7, _hidden", "10.0.0.1"),
        ("198.51.100.7, 010.1.1.1", "10.0.0.1"),
        ("198.51.100.7 10.1.1.1", "10.0.0.1"),
    ],
)
def test_a_malformed_entry_stops_at_the_last_trusted_hop(forwarded: str, client: str) -> None:
    """Nothing past a malformed entry was written by a proxy we trust to speak plainly."""
    assert client_address("10.0.0.1", forwarded, PROXIES) == client


def test_empty_list_elements_are_skipped() -> None:
    assert client_address("10.0.0.1", "198.51.100.7,, 10.1.1.1, ", PROXIES) == "198.51.100.7"


def test_ipv6_clients_and_proxies() -> None:
    assert client_address("::1", "2001:DB8:0:0::1", PROXIES) == "2001:db8::1"
    assert client_address("2001:db8::2", "198.51.100.7", PROXIES) == "2001:db8::2"
    assert client_address("10.0.0.1", "2001:db8::1, ::1", PROXIES) == "2001:db8::1"


def test_ipv4_mapped_addresses_are_ipv4() -> None:
    """A dual-stack socket reports IPv4 peers as ``::ffff:a.b.c.d``: one client, one key."""
    assert client_address("::ffff:192.0.2.1", None, []) == "192.0.2.1"
    assert client_address("::ffff:10.0.0.1", "::ffff:198.51.100.7", PROXIES) == "198.51.100.7"


def test_zone_of_a_link_local_address_is_dropped() -> None:
    assert client_address("fe80::1%eth0", None, []) == "fe80::1"


def test_trusted_networks_of_the_other_family_do_not_match() -> None:
    assert client_address("127.0.0.1", "198.51.100.7", networks("::1/128")) == "127.0.0.1"


@pytest.mark.parametrize("peer", [None, "", "/run/broker.sock"])
def test_a_peer_that_is_not_an_ip_address_is_unknown(peer: str | None) -> None:
    assert client_address(peer, "198.51.100.7", networks("0.0.0.0/0")) == "unknown"


# --- PublishLimiter --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(limiter: PublishLimiter, key: str, cost: int) -> TooManyRequests:
    with pytest.raises(TooManyRequests) as caught:
        limiter.take(key, cost)
    error = caught.value
    assert error.status == 429
    assert error.code == "too_many_requests"
    return error


def retry_after(error: TooManyRequests) -> int:
    return int(error.headers["Retry-After"])


def test_bucket_starts_full_and_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = PublishLimiter(2, 4, clock=clock)
    limiter.take("a", 4)
    assert retry_after(refused(limiter, "a", 1)) == 1
    clock.now += 0.5  # one token back
    limiter.take("a", 1)
    error = refused(limiter, "a", 1)
    assert retry_after(error) == 1
    assert "2 events per second" in error.detail
    clock.now += 0.25  # half a token: still not one
    refused(limiter, "a", 1)
    clock.now += 0.25
    limiter.take("a", 1)


def test_a_refused_take_costs_nothing() -> None:
    limiter = PublishLimiter(1, 5, clock=Clock())
    limiter.take("a", 3)
    refused(limiter, "a", 3)
    limiter.take("a", 2)  # both tokens were still there
    refused(limiter, "a", 1)


def test_retry_after_is_the_wait_until_the_bucket_holds_the_cost() -> None:
    clock = Clock()
    limiter = PublishLimiter(0.25, 4, clock=clock)
    limiter.take("a", 4)
    assert retry_after(refused(limiter, "a", 1)) == 4
    assert retry_after(refused(limiter, "a", 3)) == 12
    clock.now += 1  # a quarter of a token
    assert retry_after(refused(limiter, "a", 1)) == 3  # 0.75 tokens short: 3 s
    clock.now += 3
    limiter.take("a", 1)


def test_retry_after_is_the_shortest_whole_wait_that_is_enough() -> None:
    clock = Clock()
    limiter = PublishLimiter(3, 10, clock=clock)
    limiter.take("a", 10)
    for cost in (1, 2, 3, 4, 7, 10):
        wait = retry_after(refused(limiter, "a", cost))
        if wait > 1:
            clock.now += wait - 1
            refused(limiter, "a", cost)
            clock.now += 1
        else:
            clock.now += wait
        limiter.take("a", cost)
        with contextlib.suppress(TooManyRequests):
            limiter.take_up_to("a", 10)  # start the next round from an empty bucket


def test_refill_stops_at_the_burst() -> None:
    clock = Clock()
    limiter = PublishLimiter(1, 3, clock=clock)
    clock.now += 3600
    limiter.take("a", 3)
    refused(limiter, "a", 1)


def test_a_cost_above_the_burst_never_passes() -> None:
    limiter = PublishLimiter(2, 4, clock=Clock())
    error = refused(limiter, "a", 5)
    assert "burst of 4" in error.detail
    assert retry_after(error) == 2  # the time an empty bucket takes to fill
    limiter.take("a", 4)  # and it cost nothing


def test_retry_after_of_a_tiny_rate_is_capped_at_a_day() -> None:
    limiter = PublishLimiter(5e-324, 1, clock=Clock())
    limiter.take("a", 1)
    assert retry_after(refused(limiter, "a", 1)) == 86_400


@pytest.mark.parametrize(("rate", "burst"), [(0.5, 1), (1, 1), (2.5, 3), (10, 10)])
def test_burst_zero_is_one_seconds_worth(rate: float, burst: int) -> None:
    assert PublishLimiter(rate, 0).burst == burst


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf")])
def test_no_limiter_without_a_positive_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        PublishLimiter(rate, 1)


def test_keys_have_their_own_buckets() -> None:
    limiter = PublishLimiter(1, 2, clock=Clock())
    limiter.take("a", 2)
    limiter.take("b", 2)
    refused(limiter, "a", 1)
    refused(limiter, "b", 1)


def test_take_up_to_grants_what_the_bucket_holds() -> None:
    clock = Clock()
    limiter = PublishLimiter(2, 5, clock=clock)
    assert limiter.take_up_to("a", 3) == 3
    assert limiter.take_up_to("a", 3) == 2
    with pytest.raises(TooManyRequests) as caught:
        limiter.take_up_to("a", 3)
    assert retry_after(caught.value) == 1
    clock.now += 0.75  # one and a half tokens
    assert limiter.take_up_to("a", 100) == 1


def test_the_key_table_is_bounded_least_recently_used_first() -> None:
    limiter = PublishLimiter(1, 2, clock=Clock(), max_keys=2)
    limiter.take("a", 2)
    limiter.take("b", 2)
    refused(limiter, "a", 1)  # a refusal is a use too: "b" is now the least recent
    limiter.take("c", 2)  # a third key: "b" goes
    assert len(limiter) == 2
    refused(limiter, "a", 1)
    refused(limiter, "c", 1)
    limiter.take("b", 2)  # forgotten, so full again; "a" goes now
    assert len(limiter) == 2
    refused(limiter, "c", 1)
    limiter.take("a", 2)


def test_full_buckets_are_forgotten_as_they_lose_nothing() -> None:
    clock = Clock()
    limiter = PublishLimiter(1, 2, clock=clock)
    limiter.take("a", 1)
    limiter.take("b", 2)
    assert len(limiter) == 2
    clock.now += 1  # "a" is full again; "b" holds one token
    limiter.take("c", 1)
    assert len(limiter) == 2  # "a" dropped
    limiter.take("a", 2)
    refused(limiter, "b", 2)


# --- streams per client address, over HTTP ---------------------------------------------


async def test_streams_per_address_are_limited_and_a_closed_one_frees_its_slot(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_connections_per_ip=2)
    url = f"{broker.url}/events"
    async with contextlib.AsyncExitStack() as streams:
        first = await streams.enter_async_context(
            aconnect_sse(client, "GET", url, params={"topic": "a"})
        )
        async with aconnect_sse(client, "GET", url, params={"topic": "b"}) as second:
            assert first.response.status_code == second.response.status_code == 200
            assert broker.state.hub.connections_from("127.0.0.1") == 2

            response = await client.get(url, params={"topic": "c"})
            body = error_body(response, 429, "too_many_requests")
            assert "127.0.0.1" in body["detail"]
            assert "2" in body["detail"]
            assert response.headers["Retry-After"] == "5"
            assert broker.state.hub.connections_from("127.0.0.1") == 2

        await wait_for(lambda: broker.state.hub.connections_from("127.0.0.1") == 1)
        async with aconnect_sse(client, "GET", url, params={"topic": "c"}) as again:
            assert again.response.status_code == 200
            assert broker.state.hub.connections_from("127.0.0.1") == 2


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_connections_per_ip=1, trusted_proxy="127.0.0.1/32")
    url = f"{broker.url}/events"

    def stream(forwarded: str | None) -> contextlib.AbstractAsyncContextManager[EventSource]:
        headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
        return aconnect_sse(client, "GET", url, params={"topic": "t"}, headers=headers)

    async with contextlib.AsyncExitStack() as streams:
        for forwarded in ("198.51.100.1", "198.51.100.2", None):
            source = await streams.enter_async_context(stream(forwarded))
            assert source.response.status_code == 200
        hub = broker.state.hub
        assert [hub.connections_from(a) for a in ("198.51.100.1", "198.51.100.2")] == [1, 1]
        assert hub.connections_from("127.0.0.1") == 1

        again = await client.get(
            url, params={"topic": "t"}, headers={"X-Forwarded-For": "198.51.100.1"}
        )
        assert "198.51.100.1" in error_body(again, 429, "too_many_requests")["detail"]
        # Naming another client in front of what the proxy appended changes nothing.
        spoofed = await client.get(
            url, params={"topic": "t"}, headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.1"}
        )
        assert "198.51.100.1" in error_body(spoofed, 429, "too_many_requests")["detail"]
        assert hub.connection_count == 3


async def test_forwarded_for_from_an_untrusted_peer_does_not_escape_the_limit(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_connections_per_ip=1, trusted_proxy="10.0.0.0/8")
    url = f"{broker.url}/events"
    headers = {"X-Forwarded-For": "198.51.100.1"}
    async with aconnect_sse(client, "GET", url, params={"topic": "t"}, headers=headers) as one:
        assert one.response.status_code == 200
        other = await client.get(
            url, params={"topic": "t"}, headers={"X-Forwarded-For": "198.51.100.2"}
        )
        assert "127.0.0.1" in error_body(other, 429, "too_many_requests")["detail"]
        assert broker.state.hub.connections_from("127.0.0.1") == 1


# --- publish rate, over HTTP -----------------------------------------------------------

# A rate this low refills one token in 1000 s: nothing comes back during a test.
SLOW = 0.001


async def test_no_rate_no_limiter(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    assert broker.state.publish_limiter is None


async def test_burst_passes_then_429_with_retry_after(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(publish_rate=SLOW, publish_burst=3)
    for n in range(3):
        await publish(client, broker.url, "r", str(n))
    response = await client.post(f"{broker.url}/publish", json={"topic": "r", "data": "x"})
    body = error_body(response, 429, "too_many_requests")
    assert "publish rate" in body["detail"]
    assert 1 <= int(response.headers["Retry-After"]) <= 1000
    assert broker.state.stats.published == 3


async def test_batches_are_charged_per_event_and_refused_whole(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(publish_rate=SLOW, publish_burst=5, trusted_proxy="127.0.0.1/32")
    url = f"{broker.url}/publish"
    one = {"X-Forwarded-For": "198.51.100.1"}
    batch = [{"topic": "r", "data": str(n)} for n in range(6)]

    assert (await client.post(url, json=batch[:3], headers=one)).status_code == 200
    error_body(await client.post(url, json=batch[:3], headers=one), 429, "too_many_requests")
    assert broker.state.stats.published == 3
    ok = await client.post(url, json=batch[:2], headers=one)  # the refusal took nothing
    assert ok.status_code == 200, ok.text
    form = await client.post(url, data={"topic": "r", "data": "x"}, headers=one)
    error_body(form, 429, "too_many_requests")

    other = {"X-Forwarded-For": "198.51.100.2"}
    too_big = await client.post(url, json=batch, headers=other)
    assert "burst of 5" in error_body(too_big, 429, "too_many_requests")["detail"]
    assert (await client.post(url, json=batch[:5], headers=other)).status_code == 200
    assert broker.state.stats.published == 10


async def test_forwarded_for_from_an_untrusted_peer_does_not_pick_the_bucket(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(publish_rate=SLOW, publish_burst=1)
    url = f"{broker.url}/publish"
    event = {"topic": "r", "data": "x"}
    first = await client.post(url, json=event, headers={"X-Forwarded-For": "198.51.100.1"})
    assert first.status_code == 200
    second = await client.post(url, json=event, headers={"X-Forwarded-For": "198.51.100.2"})
    error_body(second, 429, "too_many_requests")


async def test_ndjson_stream_over_the_rate_stops_with_the_ids_published(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(publish_rate=SLOW, publish_burst=3)
    lines = b"".join(b'{"topic":"nd","data":"%d"}\n' % n for n in range(5))
    async with subscribed(client, broker.url, "nd") as events:
        response = await client.post(f"{broker.url}/publish", content=lines, headers=NDJSON)
        body = error_body(response, 429, "too_many_requests", extra=frozenset({"ids"}))
        delivered = await receive(events, 3)
    assert 1 <= int(response.headers["Retry-After"]) <= 1000
    assert "3 event(s) before them were published" in body["detail"]
    assert body["ids"] == [event.id for event in delivered]
    assert [event.data for event in delivered] == ["0", "1", "2"]
    assert broker.state.stats.published == 3

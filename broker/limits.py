"""Per-client limits: who the client is, and how fast it may publish.

**The client's address.** Behind a proxy every connection comes from the proxy, so limits
per address need the address the proxy saw. ``X-Forwarded-For`` carries it, but anyone
can send that header: it is read only when the connection itself comes from a trusted
proxy (``--trusted-proxy``), and then only as far as trusted proxies wrote it. Each proxy
appends the address it received the request from, so the list is walked from the right:
trusted proxies are skipped, and the first address that is not one is the client. What
lies left of it was written by the client and is never believed. An entry that is not a
bare IP address (nginx's ``$proxy_add_x_forwarded_for`` and HAProxy's ``option
forwardfor`` write bare addresses, IPv6 without brackets, and no ports; ``[::1]``,
``1.2.3.4:80``, ``unknown`` or an obfuscated RFC 7239 name are refused) stops the walk at
the last trusted hop, so a client never names its own key. Empty list elements are
skipped. Addresses are normalised (``::ffff:192.0.2.1`` is ``192.0.2.1``; IPv6 is
compressed, lower case, without a ``%zone``), so one client has one spelling. Trusted
networks are matched against the normalised address: give IPv4 proxies as IPv4 networks.
A peer that is not an IP address at all counts as ``unknown``.

**Publish rate.** A token bucket per publisher: ``burst`` tokens, refilled at ``rate`` per
second. A request of n events takes n tokens or is refused whole, so a refused request
costs nothing and its ``Retry-After`` is exact. An NDJSON stream's lines pass one by one
(``take_up_to``), so how the network cuts the stream into reads changes nothing.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from broker.config import IPNetwork
from broker.errors import TooManyRequests

if TYPE_CHECKING:
    from broker.web.state import BrokerState

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UNKNOWN_ADDRESS = "unknown"
"""The address of a connection whose peer is not an IP address; such clients share it."""

MAX_RETRY_AFTER = 86_400
"""The longest ``Retry-After``: only rates below one event a day would need more."""

# Refills are float sums: a bucket that should hold exactly ``cost`` tokens may hold a
# hair less, and a client that waited its whole Retry-After must not be refused for that.
_EPSILON = 1e-9


def _parse(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(address.packed)
    return address


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]
) -> str:
    """The address limits are counted against (see the module docstring for the rules)."""
    hop = _parse(peer) if peer is not None else None
    if hop is None:
        return UNKNOWN_ADDRESS
    if not forwarded_for or not _trusted(hop, trusted):
        return str(hop)
    for entry in reversed(forwarded_for.split(",")):
        entry = entry.strip(" \t")
        if not entry:
            continue  # an empty list element is no element (RFC 9110, section 5.6.1)
        address = _parse(entry)
        if address is None:
            break
        hop = address
        if not _trusted(hop, trusted):
            break
    return str(hop)


def _trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def from_trusted_proxy(request: web.Request, trusted: Sequence[IPNetwork]) -> bool:
    """Whether the request's peer is a trusted proxy, whose forwarding headers count."""
    hop = _parse(request.remote) if request.remote is not None else None
    return hop is not None and _trusted(hop, trusted)


def request_address(request: web.Request, trusted: Sequence[IPNetwork]) -> str:
    """The client address of an aiohttp request; repeated header fields read as one list."""
    forwarded = request.headers.getall("X-Forwarded-For", ()) if trusted else ()
    return client_address(request.remote, ",".join(forwarded), trusted)


class PublishLimiter:
    """Token buckets per publisher key, in a table of at most ``max_keys`` keys.

    A key is only worth remembering while its bucket is not full: a new bucket starts
    full, so forgetting a full one changes nothing. Full buckets are dropped as they reach
    the front of the table (least recently used first); beyond ``max_keys`` the least
    recently used key is dropped even if its bucket is not full yet, which at worst hands
    a long-idle publisher a refill early.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if not rate > 0 or math.isinf(rate):
            raise ValueError("rate must be a positive number; without a rate, use no limiter")
        if burst < 0 or max_keys < 1:
            raise ValueError("burst must be at least 0 and max_keys at least 1")
        self.rate = rate
        self.burst = burst or max(1, math.ceil(rate))
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens, when they were counted); ordered least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, cost: int) -> None:
        """Take ``cost`` tokens from ``key``'s bucket, or raise ``TooManyRequests``.

        A cost above the burst could never pass, however long the publisher waits: that
        answer's ``Retry-After`` is the time a drained bucket takes to fill, after which a
        request of up to ``burst`` events passes.
        """
        if cost > self.burst:
            raise TooManyRequests(
                f"{cost} events at once exceed the publish burst of {self.burst}; "
                f"send at most {self.burst} per request",
                retry_after=self._seconds(self.burst),
            )
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens + _EPSILON < cost:
            self._store(key, tokens, now)
            raise self._over_rate(cost - tokens)
        self._store(key, max(0.0, tokens - cost), now)

    def take_up_to(self, key: str, cost: int) -> int:
        """Take as many of ``cost`` tokens as the bucket holds, and say how many: for a
        stream, whose events may pass one by one. ``TooManyRequests`` if not even one."""
        now = self._clock()
        tokens = self._tokens(key, now)
        granted = min(cost, math.floor(tokens + _EPSILON))
        if granted < 1:
            self._store(key, tokens, now)
            raise self._over_rate(1 - tokens)
        self._store(key, max(0.0, tokens - granted), now)
        return granted

    def give_back(self, key: str, count: int) -> None:
        """Return ``count`` tokens taken for events that were not published after all
        (idempotent retries of events already published), up to the burst."""
        if count <= 0:
            return
        now = self._clock()
        self._store(key, min(float(self.burst), self._tokens(key, now) + count), now)

    def _over_rate(self, deficit: float) -> TooManyRequests:
        return TooManyRequests(
            f"over the publish rate of {self.rate:g} events per second (burst {self.burst})",
            retry_after=self._seconds(deficit),
        )

    def _tokens(self, key: str, now: float) -> float:
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            return float(self.burst)
        tokens, counted = bucket
        return min(float(self.burst), tokens + max(0.0, now - counted) * self.rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        buckets = self._buckets
        buckets[key] = (tokens, now)
        while buckets:
            oldest, (held, counted) = next(iter(buckets.items()))
            full = held + max(0.0, now - counted) * self.rate + _EPSILON >= self.burst
            if not full and len(buckets) <= self._max_keys:
                break
            del buckets[oldest]

    def _seconds(self, deficit: float) -> int:
        return max(1, math.ceil(min(deficit / self.rate, MAX_RETRY_AFTER)))


def charge(request: web.Request, state: BrokerState, key: str | None, cost: int) -> None:
    """Charge ``cost`` events, all or none, to the publisher: its token subject ``key`` if
    it has one, else its client address. Does nothing when no rate is set."""
    limiter = state.publish_limiter
    if limiter is not None:
        limiter.take(_rate_key(request, state, key), cost)


def charge_up_to(request: web.Request, state: BrokerState, key: str | None, cost: int) -> int:
    """``charge`` for a stream: charge as many of ``cost`` events as the publisher's bucket
    holds, at least one, and return that count (all of them when no rate is set)."""
    limiter = state.publish_limiter
    if limiter is None:
        return cost
    return limiter.take_up_to(_rate_key(request, state, key), cost)


def refund(request: web.Request, state: BrokerState, key: str | None, count: int) -> None:
    """Give back what ``charge`` took for ``count`` events that turned out to be retries of
    published ones: a retried stream must not pay twice, or it could never finish."""
    limiter = state.publish_limiter
    if limiter is not None:
        limiter.give_back(_rate_key(request, state, key), count)


def _rate_key(request: web.Request, state: BrokerState, key: str | None) -> str:
    """Subjects and addresses in separate namespaces: no token subject can name, and so
    drain, an address's bucket."""
    if key is None:
        return "ip:" + request_address(request, state.config.trusted_proxies)
    return "sub:" + key

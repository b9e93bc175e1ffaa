"""What every handler shares, stored on the application under one typed key."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from broker.auth import Gatekeeper
from broker.backends import Backend
from broker.config import Config
from broker.event import EventLimits
from broker.hub import Hub
from broker.limits import PublishLimiter
from broker.metrics import Metrics, Stats
from broker.subscriptions import Registry


@dataclasses.dataclass(slots=True)
class BrokerState:
    config: Config
    hub: Hub
    backend: Backend
    stats: Stats
    metrics: Metrics
    limits: EventLimits
    gatekeeper: Gatekeeper
    publish_limiter: PublishLimiter | None = None
    # Mercure's active subscriptions (--mercure-subscriptions).
    subscriptions: Registry | None = None


STATE = web.AppKey("state", BrokerState)

"""HTTP surface of the broker: the SSE stream, publishing, health and metrics."""

from broker.web.app import create_app
from broker.web.state import STATE, BrokerState

__all__ = ["STATE", "BrokerState", "create_app"]

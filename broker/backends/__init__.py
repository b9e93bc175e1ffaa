"""Where events are logged and how they reach the hub.

A backend owns the event log: it assigns ids, keeps history for replay, and hands each
logged event to the hub for fan-out. The in-memory backend does all of this in one
process; the Redis backend keeps one log shared by every node and has each node tail it.
Either way the hub and the handlers are the same.
"""

from __future__ import annotations

from typing import Protocol

from broker.event import EventDraft
from broker.history import Replay
from broker.hub import Hub
from broker.topics import Selector


class Backend(Protocol):
    async def start(self, hub: Hub) -> None:
        """Begin delivering logged events to ``hub``."""

    async def close(self) -> None: ...

    async def publish(self, drafts: list[EventDraft]) -> list[str]:
        """Log the drafts, in order and contiguously, and return their ids.

        Must not return before the events are stored: an acknowledged event is never lost.
        Raises ``broker.errors.Unavailable`` when the log cannot be written now.
        """

    async def replay(self, last_id: str, selector: Selector) -> Replay:
        """What a subscriber resuming after ``last_id`` gets; see ``Replay``.

        Raises ``broker.errors.Unavailable`` when the log cannot be read now.
        """

    def ready(self) -> bool:
        """Whether publishing and replay can work right now (``/readyz``)."""

    def history_size(self) -> int:
        """Events retained for replay; cheap, read at every scrape."""

    def lag_seconds(self) -> float:
        """How far this node's fan-out is behind the log's head (0 when caught up)."""

    async def trim(self) -> None:
        """Apply the history's limits; called by the shared timer. Never raises."""

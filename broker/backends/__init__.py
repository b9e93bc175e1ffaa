"""Where events are logged and how they reach the hub.

A backend owns the event log: it assigns ids, keeps history for replay, and hands each
logged event to the hub for fan-out. The in-memory backend does all of this in one
process; other backends put the log elsewhere without changing the hub or the handlers.
"""

from __future__ import annotations

from typing import Protocol

from broker.event import Event, EventDraft
from broker.history import Replay
from broker.hub import Hub
from broker.topics import Selector


class Backend(Protocol):
    async def start(self, hub: Hub) -> None:
        """Begin delivering logged events to ``hub``."""

    async def close(self) -> None: ...

    async def publish(self, drafts: list[EventDraft]) -> list[Event]:
        """Log the drafts, in order, and return them as logged events.

        Must not return before the events are stored: an acknowledged event is never lost.
        """

    async def replay(self, last_id: str, selector: Selector) -> Replay: ...

    def ready(self) -> bool:
        """Whether publishing and replay can work right now (``/readyz``)."""

    def history_size(self) -> int: ...

    def trim(self) -> None:
        """Apply the history's age limit; called by the shared timer."""

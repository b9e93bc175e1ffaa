"""Where events are logged and how they reach the hub.

A backend owns the event log: it assigns ids, keeps history for replay, and hands each
logged event to the hub for fan-out. The in-memory backend does all of this in one
process; the Redis backend keeps one log shared by every node and has each node tail it.
Either way the hub and the handlers are the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from broker.event import EventDraft
from broker.history import Replay
from broker.hub import Hub
from broker.topics import Selector


class Published(list[str]):
    """The ids of a publish, in order, and how many of them are new (``fresh``): fewer
    than all when idempotency keys matched events published before, whose ids are
    returned in their place. Rate limits and the published counter count only new ones."""

    def __init__(self, ids: Iterable[str], fresh: int) -> None:
        super().__init__(ids)
        self.fresh = fresh


class Backend(Protocol):
    async def start(self, hub: Hub) -> None:
        """Begin delivering logged events to ``hub``."""

    async def close(self) -> None: ...

    async def publish(self, drafts: list[EventDraft]) -> Published:
        """Log the drafts, in order and contiguously, and return their ids; a draft whose
        ``key`` was seen within the history's TTL is not logged again (see ``Published``).

        Must not return before the events are stored: an acknowledged event is never lost.
        Raises ``broker.errors.Unavailable`` when the log cannot be written now.
        """

    async def replay(
        self,
        last_id: str,
        selector: Selector,
        grants: Selector | None,
        *,
        predecessor: bool = False,
    ) -> Replay:
        """What a subscriber resuming after ``last_id`` gets; see ``Replay``. Private
        events are included only where ``grants`` (the subscriber's token) allow them.
        ``Replay.predecessor`` is looked for only when asked (Mercure reports it).

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

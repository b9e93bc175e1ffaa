"""The embedded backend: the log lives in this process and fan-out is a direct call.

Publishing appends to the log and fans out in the same step, with no await between, so
the order subscribers see is the log's order and a replay read is never torn.
"""

from __future__ import annotations

from broker.event import EventDraft
from broker.history import EventLog, Replay
from broker.hub import Hub
from broker.topics import Selector


class MemoryBackend:
    def __init__(self, max_events: int, ttl: float) -> None:
        self.log = EventLog(max_events, ttl)
        self._hub: Hub | None = None

    async def start(self, hub: Hub) -> None:
        self._hub = hub

    async def close(self) -> None:
        self._hub = None

    async def publish(self, drafts: list[EventDraft]) -> list[str]:
        events = self.log.append(drafts)
        if self._hub is not None:
            self._hub.fan_out(events)
        return [event.id for event in events]

    async def replay(self, last_id: str, selector: Selector) -> Replay:
        return self.log.since(last_id, selector)

    def ready(self) -> bool:
        return self._hub is not None

    def history_size(self) -> int:
        return len(self.log)

    def lag_seconds(self) -> float:
        return 0.0

    async def trim(self) -> None:
        self.log.trim()

"""The embedded backend: the log lives in this process and fan-out is a direct call.

Publishing appends to the log and fans out in the same step, with no await between, so
the order subscribers see is the log's order and a replay read is never torn.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from broker.backends import Published
from broker.event import EventDraft
from broker.history import EventLog, Replay
from broker.hub import Hub
from broker.topics import Selector

# Idempotency keys remembered at most, whatever the TTL: the oldest go first.
MAX_KEYS = 100_000


class RecentKeys:
    """Idempotency keys and the ids they were first published under, kept ``ttl`` seconds
    (the history's): a retry within that time gets the same id and publishes nothing."""

    def __init__(
        self, ttl: float, *, limit: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._limit = limit
        self._clock = clock
        self._ids: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, key: str) -> str | None:
        found = self._ids.get(key)
        if found is None:
            return None
        if found[1] <= self._clock():
            del self._ids[key]
            return None
        return found[0]

    def put(self, key: str, event_id: str) -> None:
        self._ids[key] = (event_id, self._clock() + self._ttl)
        self._ids.move_to_end(key)
        while len(self._ids) > self._limit:
            self._ids.popitem(last=False)

    def trim(self) -> None:
        """Forget expired keys; entries are in insertion order, so the oldest are first."""
        now = self._clock()
        ids = self._ids
        while ids:
            key, (_, expires) = next(iter(ids.items()))
            if expires > now:
                break
            del ids[key]


class MemoryBackend:
    def __init__(self, max_events: int, ttl: float) -> None:
        self.log = EventLog(max_events, ttl)
        self.keys = RecentKeys(ttl)
        self._hub: Hub | None = None

    async def start(self, hub: Hub) -> None:
        self._hub = hub

    async def close(self) -> None:
        self._hub = None

    async def publish(self, drafts: list[EventDraft]) -> Published:
        if any(draft.key is not None for draft in drafts):
            return self._publish_keyed(drafts)
        events = self.log.append(drafts)
        if self._hub is not None:
            self._hub.fan_out(events)
        return Published([event.id for event in events], len(events))

    def _publish_keyed(self, drafts: list[EventDraft]) -> Published:
        """Append only the drafts whose key is new (also within this batch), and answer
        every draft with its id: the new one, or the one its key was first given."""
        fresh: list[EventDraft] = []
        # Per draft: its earlier id, or its position among the fresh drafts.
        answers: list[str | int] = []
        batch_keys: dict[str, int] = {}
        for draft in drafts:
            key = draft.key
            if key is not None:
                known = self.keys.get(key)
                if known is not None:
                    answers.append(known)
                    continue
                if key in batch_keys:
                    answers.append(batch_keys[key])
                    continue
                batch_keys[key] = len(fresh)
            answers.append(len(fresh))
            fresh.append(draft)
        events = self.log.append(fresh)
        for draft, event in zip(fresh, events, strict=True):
            if draft.key is not None:
                self.keys.put(draft.key, event.id)
        if self._hub is not None and events:
            self._hub.fan_out(events)
        return Published([events[a].id if isinstance(a, int) else a for a in answers], len(events))

    async def replay(
        self,
        last_id: str,
        selector: Selector,
        grants: Selector | None = None,
        *,
        predecessor: bool = False,
    ) -> Replay:
        return self.log.since(last_id, selector, grants, predecessor=predecessor)

    def ready(self) -> bool:
        return self._hub is not None

    def history_size(self) -> int:
        return len(self.log)

    def lag_seconds(self) -> float:
        return 0.0

    async def trim(self) -> None:
        self.log.trim()
        self.keys.trim()

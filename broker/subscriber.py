"""One connected subscriber: its bounded queue, its overflow policy, and its writer loop.

Delivery has two speeds. While the socket keeps up, ``offer`` writes the event's shared
bytes straight to the transport: no queue, no task switch, nothing allocated per
subscriber. Once the transport's buffer passes its high-water mark, the subscriber stops
writing directly and queues events instead, up to ``max_events`` and ``max_bytes``;
its connection's task (the one serving the request, never one per event) waits for the
socket to drain, writes the queue as one batch and goes back to direct writes. A slow
reader therefore costs the publisher one append, and its memory is bounded by the
transport's high-water mark plus the queue limits.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import orjson

from broker import sse
from broker.config import Overflow
from broker.event import Event
from broker.history import Replay
from broker.metrics import Stats
from broker.topics import Selector

DROPPED_EVENT = "broker.dropped"
MISSED_EVENT = "broker.missed"
# Replay is written in batches of about this size, waiting for the socket between them.
REPLAY_BATCH_BYTES = 64 * 1024
_HEARTBEAT = sse.encode_comment()
_HEARTBEAT_CHUNK = sse.as_chunk(_HEARTBEAT)


class CloseReason(enum.StrEnum):
    CLIENT = "client"
    OVERFLOW = "overflow"
    SHUTDOWN = "shutdown"
    ERROR = "error"


def notice(event_type: str, payload: dict[str, object]) -> bytes:
    """A broker-generated named event: no ``id`` (the client's resume point stays put),
    and a type ``onmessage`` never sees."""
    return sse.encode_body(orjson.dumps(payload).decode("utf-8"), event_type)


class Run:
    """Consecutive events bound for the same subscribers, joined into one write.

    The joined bytes are built on first use and shared, so a run costs one join per wire
    form however many subscribers receive it.
    """

    __slots__ = ("_chunk", "_frame", "events")

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = events
        self._chunk: bytes | None = None
        self._frame: bytes | None = None

    def wire(self, chunked: bool) -> bytes:
        if chunked:
            if self._chunk is None:
                self._chunk = b"".join(event.chunk for event in self.events)
            return self._chunk
        if self._frame is None:
            self._frame = b"".join(event.frame for event in self.events)
        return self._frame


class Subscriber:
    __slots__ = (
        "_chunked",
        "_live",
        "_max_bytes",
        "_max_events",
        "_overflow",
        "_queue",
        "_queued_bytes",
        "_stats",
        "_transport",
        "_unreported_drops",
        "_waiter",
        "close_reason",
        "dropped",
        "selector",
    )

    def __init__(
        self,
        selector: Selector,
        *,
        max_events: int,
        max_bytes: int,
        overflow: Overflow,
        stats: Stats,
    ) -> None:
        self.selector = selector
        self.dropped = 0
        self.close_reason: CloseReason | None = None
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._overflow = overflow
        self._stats = stats
        self._queue: deque[Event] = deque()
        self._queued_bytes = 0
        self._unreported_drops = 0
        self._transport: asyncio.Transport | None = None
        self._chunked = True
        self._live = False
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<Subscriber {list(self.selector.patterns)!r} queued={len(self._queue)}>"

    @property
    def queued(self) -> int:
        return len(self._queue)

    def attach(self, transport: asyncio.Transport, *, chunked: bool) -> None:
        """Bind to the connection once the response headers are out."""
        self._transport = transport
        self._chunked = chunked

    def offer(self, event: Event) -> None:
        """Hand one event to this subscriber; never blocks, never raises."""
        if self._live:
            self._write_live(event.chunk if self._chunked else event.frame, 1)
        elif self.close_reason is None:
            self._enqueue(event)

    def offer_run(self, run: Run) -> None:
        """Like ``offer`` for each event of ``run``, with one write while the socket keeps up."""
        if self._live:
            self._write_live(run.wire(self._chunked), len(run.events))
        elif self.close_reason is None:
            for event in run.events:
                self._enqueue(event)

    def _write_live(self, data: bytes, count: int) -> None:
        transport = self._transport
        assert transport is not None
        if transport.is_closing():
            self.close(CloseReason.CLIENT)
            return
        transport.write(data)
        self._stats.delivered += count
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            self._live = False
            self._wake()

    def _enqueue(self, event: Event) -> None:
        queue = self._queue
        size = len(event.chunk)
        if len(queue) >= self._max_events or self._queued_bytes + size > self._max_bytes:
            if self._overflow is Overflow.DISCONNECT:
                self._drop(1)
                self.close(CloseReason.OVERFLOW)
                return
            if self._overflow is Overflow.DROP_NEWEST:
                self._drop(1)
                return
            while queue and (
                len(queue) >= self._max_events or self._queued_bytes + size > self._max_bytes
            ):
                self._queued_bytes -= len(queue.popleft().chunk)
                self._drop(1)
            if self._queued_bytes + size > self._max_bytes:
                self._drop(1)
                return
        queue.append(event)
        self._queued_bytes += size
        if len(queue) == 1:
            self._wake()

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._unreported_drops += count
        self._stats.dropped += count

    def skip_through(self, position: int) -> None:
        """Forget queued live events a replay already covered (``Replay.through``)."""
        queue = self._queue
        while queue and queue[0].seq <= position:
            self._queued_bytes -= len(queue.popleft().chunk)

    def heartbeat(self) -> None:
        """Write a keep-alive comment if the stream is flowing freely.

        Also the backstop for noticing a client that vanished from an idle stream.
        """
        transport = self._transport
        if not self._live or transport is None:
            return
        if transport.is_closing():
            self.close(CloseReason.CLIENT)
        else:
            transport.write(_HEARTBEAT_CHUNK if self._chunked else _HEARTBEAT)

    def close(self, reason: CloseReason) -> None:
        """End the stream. An overflowing client is cut at once, since it is not reading;
        otherwise the writer loop flushes what is queued and the response ends cleanly."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self._live = False
        if reason is CloseReason.OVERFLOW:
            self._drop(len(self._queue))
            self._queue.clear()
            self._queued_bytes = 0
            if self._transport is not None:
                self._transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush(self) -> None:
        parts: list[bytes] = []
        report = self._unreported_drops
        if report and self._overflow is not Overflow.DROP_NEWEST:
            parts.append(self._wire(notice(DROPPED_EVENT, {"dropped": report})))
        chunked = self._chunked
        parts.extend(event.chunk if chunked else event.frame for event in self._queue)
        self._stats.delivered += len(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        if report and self._overflow is Overflow.DROP_NEWEST:
            parts.append(self._wire(notice(DROPPED_EVENT, {"dropped": report})))
        self._unreported_drops = 0
        self._write(b"".join(parts))

    def _wire(self, frame: bytes) -> bytes:
        return sse.as_chunk(frame) if self._chunked else frame

    def _write(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if not transport.is_closing():
            transport.write(data)

    async def send_replay(
        self, replay: Replay, last_id: str, drain: Callable[[], Awaitable[None]]
    ) -> None:
        """Write history ahead of the live stream, then drop the live events it covered.

        Runs before the subscriber goes live, so events published meanwhile wait in the
        queue; ``skip_through`` then removes those the replay already included.
        """
        if replay.missed:
            self._write(self._wire(notice(MISSED_EVENT, {"lastEventId": last_id})))
        chunked = self._chunked
        batch: list[bytes] = []
        size = 0
        for event in replay.events:
            data = event.chunk if chunked else event.frame
            batch.append(data)
            size += len(data)
            if size >= REPLAY_BATCH_BYTES:
                self._write(b"".join(batch))
                batch.clear()
                size = 0
                await drain()
        if batch:
            self._write(b"".join(batch))
        self._stats.replayed += len(replay.events)
        self._stats.delivered += len(replay.events)
        self.skip_through(replay.through)

    async def run(self, drain: Callable[[], Awaitable[None]]) -> CloseReason:
        """Serve the stream until it is closed; cancelled when the client goes away.

        ``drain`` waits until the transport's buffer is below its low-water mark.
        """
        loop = asyncio.get_running_loop()
        while True:
            if self._queue or self._unreported_drops:
                self._flush()
                await drain()
                continue
            if self.close_reason is not None:
                return self.close_reason
            self._live = True
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            if self.close_reason is None and not self._queue:
                await drain()

"""One connected subscriber: its bounded queue, its overflow policy, and its connection.

Delivery has two speeds. While the socket keeps up, ``offer`` writes the event's shared
bytes straight to the transport: no queue, no task switch, nothing allocated per
subscriber. When the transport's buffer passes its high-water mark it pauses us, and
events queue instead, up to ``max_events`` and ``max_bytes``; when it resumes us, the
queue goes out as one write. A slow reader therefore costs the publisher one append, and
its memory is bounded by the transport's high-water mark plus the queue limits.

Once the response head, the opening bytes and any replay are written, the subscriber
takes the connection over: it becomes the transport's protocol, and the HTTP request
(its parser, tasks and objects) is released. A live stream then costs only the
transport and this object: no task, no future, no timer of its own.
"""

from __future__ import annotations

import asyncio
import enum
import time
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
    # The subscriber's token expired, or the stream reached --max-stream-age: it must
    # come back (with a fresh token).
    EXPIRED = "expired"


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


class Subscriber(asyncio.Protocol):
    __slots__ = (
        "_chunked",
        "_expiry",
        "_live",
        "_max_bytes",
        "_max_events",
        "_on_lost",
        "_overflow",
        "_owned",
        "_paused",
        "_pending_missed",
        "_queue",
        "_queued_bytes",
        "_skip_through",
        "_stats",
        "_transport",
        "_unreported_drops",
        "close_reason",
        "dropped",
        "grants",
        "peer",
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
        on_lost: Callable[[Subscriber], None],
        grants: Selector | None = None,
        peer: str = "",
    ) -> None:
        self.selector = selector
        # Topics whose private events this subscriber may read (its token's subscribe
        # claim); None for an anonymous subscriber, who gets public events only.
        self.grants = grants
        # The client's address, for the per-address stream limit.
        self.peer = peer
        self.dropped = 0
        self.close_reason: CloseReason | None = None
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._overflow = overflow
        self._stats = stats
        self._on_lost = on_lost
        # Allocated on first use: most streams never queue, and an empty deque is 600 bytes.
        self._queue: deque[Event] | None = None
        self._queued_bytes = 0
        self._unreported_drops = 0
        # Events at or below this position were covered by a replay (``skip_through``).
        self._skip_through = 0
        self._pending_missed: bytes | None = None
        self._transport: asyncio.Transport | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._chunked = True
        self._live = False
        self._paused = False
        self._owned = False

    def __repr__(self) -> str:
        return f"<Subscriber {self.selector!r} queued={self.queued}>"

    @property
    def queued(self) -> int:
        return len(self._queue) if self._queue else 0

    def end_at(self, unix_time: float) -> None:
        """End the stream at ``unix_time`` (``CloseReason.EXPIRED``): a stream must not
        outlive the token it was opened with, nor ``--max-stream-age``. Only such streams
        get a timer."""
        loop = asyncio.get_running_loop()
        delay = max(0.0, unix_time - time.time())
        self._expiry = loop.call_later(delay, self.close, CloseReason.EXPIRED)

    def disarm(self) -> None:
        """Cancel the expiry timer of a stream that ended; the hub calls it on ``forget``."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    # -- before the take-over: the request's task writes the opening bytes and the replay

    def attach(self, transport: asyncio.Transport, *, chunked: bool) -> None:
        """Bind to the connection once the response headers are out."""
        self._transport = transport
        self._chunked = chunked

    async def send_replay(
        self, replay: Replay, last_id: str, drain: Callable[[], Awaitable[None]]
    ) -> None:
        """Write history ahead of the live stream, then drop the live events it covered.

        Runs before the take-over, so events published meanwhile wait in the queue;
        ``skip_through`` then removes those the replay already included.
        """
        if replay.missed:
            self._write(self._wire(notice(MISSED_EVENT, {"lastEventId": last_id})))
        chunked = self._chunked
        batch: list[bytes] = []
        size = 0
        for event in replay.events:
            data = event.wire(chunked)
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

    def skip_through(self, position: int) -> None:
        """Forget live events a replay already covered (``Replay.through``): those queued
        now, and those offered later.

        The in-memory log fans out as it appends, so every covered event is already queued
        here. A backend whose fan-out trails its log (the Redis tail) may offer covered
        events after this call; ``offer`` drops those too.
        """
        self._skip_through = position
        queue = self._queue
        if queue:
            # Not just from the head: a live-only event (Redis channels, past every position)
            # may sit between covered ones.
            kept = deque(event for event in queue if event.seq > position)
            self._queued_bytes = sum(len(event.chunk) for event in kept)
            self._queue = kept

    def take_over(self) -> None:
        """Become the transport's protocol and go live.

        From here the transport tells us directly when it pauses, resumes or closes. Call
        it right after a drain: a transport between its marks after a pause would not
        pause us again, and we would write past the high-water mark unchecked.
        """
        transport = self._transport
        assert transport is not None
        transport.set_protocol(self)
        self._owned = True
        if transport.is_closing():
            # Its connection_lost may already have gone to aiohttp's protocol.
            self.connection_lost(None)
            return
        self._paused = transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]
        if self.close_reason is not None:
            self._end()
        elif not self._paused:
            self._flush()
            self._live = not self._paused

    # -- asyncio.Protocol, after the take-over

    def connection_lost(self, exc: Exception | None) -> None:
        self._live = False
        if self.close_reason is None:
            self.close_reason = CloseReason.CLIENT
        self._queue = None
        self._queued_bytes = 0
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._paused = True
        self._live = False

    def resume_writing(self) -> None:
        self._paused = False
        if self.close_reason is None:
            self._flush()
            self._live = not self._paused

    def data_received(self, data: bytes) -> None:
        """A subscriber has nothing more to say; anything it sends is ignored."""

    def eof_received(self) -> bool:
        return False

    # -- delivery

    def offer(self, event: Event) -> None:
        """Hand one event to this subscriber; never blocks, never raises."""
        if event.seq <= self._skip_through:
            return
        if self._live:
            # Inlined Event.wire: this line runs once per delivery.
            self._send(event.chunk if self._chunked else event.frame, 1)
        elif self.close_reason is None:
            self._enqueue(event)

    def offer_run(self, run: Run) -> None:
        """Like ``offer`` for each event of ``run``, with one write while the socket keeps up."""
        events = run.events
        if events[0].seq <= self._skip_through:
            # A run straddling a replay's end: rare, so the covered part is skipped one by one.
            for event in events:
                self.offer(event)
            return
        if self._live:
            self._send(run.wire(self._chunked), len(run.events))
        elif self.close_reason is None:
            for event in run.events:
                self._enqueue(event)

    def _send(self, data: bytes, count: int) -> None:
        transport = self._transport
        assert transport is not None
        if transport.is_closing():
            self._live = False
            return
        transport.write(data)
        self._stats.delivered += count

    def _enqueue(self, event: Event) -> None:
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
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

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._unreported_drops += count
        self._stats.dropped += count

    def _flush(self) -> None:
        """Write the queue, with the drop notice where the gap is, as one write."""
        queue = self._queue
        report = self._unreported_drops
        missed = self._pending_missed
        if not queue and not report and missed is None:
            return
        parts: list[bytes] = []
        if missed is not None:
            parts.append(self._wire(missed))
            self._pending_missed = None
        if report and self._overflow is not Overflow.DROP_NEWEST:
            parts.append(self._wire(notice(DROPPED_EVENT, {"dropped": report})))
        if queue:
            chunked = self._chunked
            parts.extend(event.wire(chunked) for event in queue)
            self._stats.delivered += len(queue)
            queue.clear()
        self._queued_bytes = 0
        if report and self._overflow is Overflow.DROP_NEWEST:
            parts.append(self._wire(notice(DROPPED_EVENT, {"dropped": report})))
        self._unreported_drops = 0
        self._write(b"".join(parts))

    def notify_missed(self, last_id: str, *, new_log: bool) -> None:
        """Tell the client that events after ``last_id`` may be lost for good.

        For a shared log that lost events before this node read them: the notice is written
        now if the stream flows, else ahead of whatever is queued. A ``new_log`` (Redis came
        back empty) starts positions over, so a replay's ``skip_through`` no longer applies.
        """
        if self.close_reason is not None:
            return
        if new_log:
            self._skip_through = 0
        frame = notice(MISSED_EVENT, {"lastEventId": last_id})
        if self._live:
            self._send(self._wire(frame), 0)
        else:
            self._pending_missed = frame

    def heartbeat(self) -> None:
        """Write a keep-alive comment if the stream is flowing freely."""
        if self._live:
            self._send(_HEARTBEAT_CHUNK if self._chunked else _HEARTBEAT, 0)

    # -- ending

    def close(self, reason: CloseReason) -> None:
        """End the stream.

        An overflowing client is cut at once, since it is not reading. Otherwise what is
        queued goes out, then the end of the response, so ``EventSource`` reconnects.
        Before the take-over only the reason is recorded; the request's task ends it.
        """
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self._live = False
        if reason is CloseReason.OVERFLOW:
            if self._queue:
                self._drop(len(self._queue))
                self._queue.clear()
            self._queued_bytes = 0
            if self._transport is not None:
                self._transport.abort()
        elif self._owned:
            self._end()

    def _end(self) -> None:
        transport = self._transport
        assert transport is not None
        self._flush()
        if self._chunked:
            self._write(b"0\r\n\r\n")
        transport.close()

    def abort(self) -> None:
        """Cut the connection now; for streams that did not end within the shutdown budget."""
        if self._transport is not None:
            self._transport.abort()

    def _wire(self, frame: bytes) -> bytes:
        return sse.as_chunk(frame) if self._chunked else frame

    def _write(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if not transport.is_closing():
            transport.write(data)

"""The Redis backend: one ordered event log in a Redis Stream, shared by every node.

Keys (``<prefix>`` is ``--redis-prefix``):

* ``<prefix>:log``, a stream with one entry per event. Its fields, exactly:

  - ``topics``: the event's topics joined by ``\\n`` (a topic cannot contain control
    characters, so the join is unambiguous);
  - ``data``: the data string;
  - ``event``: the event type, absent when there is none;
  - ``retry``: the client reconnection delay in milliseconds, in decimal, absent when
    there is none;
  - ``private``: ``1`` for an event only entitled subscribers receive, absent otherwise;
  - ``id``: the event id the publisher chose (Mercure's ``id``), absent when it chose
    none and the entry id serves.

  Raw fields rather than SSE bytes, so that any Redis client can read the log, and write
  it through the same checks (a later Redis Function); each node encodes an entry once,
  when it reads it.
* ``<prefix>:key:<idempotency key>``: the id of the event published with that key, kept
  for the history's TTL, so a retried publish on any node gets the first id back
  (``KEYED_PUBLISH``).
* ``<prefix>:id:<chosen id>``: the entry id of the newest event published with that
  ``id``, kept for the history's TTL and written in the same step as the entry
  (``KEYED_PUBLISH``), so that a subscriber can resume from a chosen id on any node.
* ``<prefix>:epoch``: a random token, set by the first node that reaches this Redis. A
  node that finds another token after a reconnect knows Redis lost its data.
* The function library ``sse_broker_v<N>_<prefix>`` with ``<prefix>_publish``, which
  appends to the log from any Redis client with the HTTP path's checks
  (``broker.backends.redis_functions``); every node loads it at start-up and after every
  reconnect.
* The channels ``<prefix>:topic:<topic>``: a plain ``PUBLISH`` there is delivered live to
  the topic's subscribers on every node (each node holds one ``PSUBSCRIBE``), with no id
  and no replay: it never enters the log, so it has no position a client could resume
  from (``_listen``).

The entry id is the event id unless the publisher chose one (the ``id`` field); either
way ids are identical on every node, and a subscriber can resume on any node: a replay
looks a chosen id up in ``<prefix>:id:``, and takes any other as an entry id. Publishing
appends (``MULTI``/``XADD … MAXLEN ~ history-size``/``EXEC``, or one script when a draft
has an idempotency key or a chosen id, so a batch is contiguous and atomic) and answers
once Redis acknowledged; it does not fan out. One task per node tails the stream from the
last id it delivered (``_tail``) and hands each batch to the hub: every node, the
publishing one included, delivers in the stream's order. That task also owns the
connection state: when Redis goes away it reconnects with backoff and resumes after the
last id it delivered, and when events it had not read are gone (Redis came back empty, or
trimming passed it by) it tells every stream ``broker.missed``.

Needs Redis 7.0 or later (``XINFO STREAM`` entries-added, ``SET … NX GET``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import time
import uuid
from typing import Any

import orjson
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from broker import sse
from broker.backends import Published
from broker.backends.redis_functions import library_source
from broker.config import Config, redacted_url
from broker.errors import ClientError, Unavailable
from broker.event import Event, EventDraft, EventLimits, encode_draft, make_draft
from broker.history import PREDECESSOR_SCAN, Replay
from broker.hub import Hub
from broker.metrics import Stats
from broker.topics import Selector

logger = logging.getLogger(__name__)

# Entries one tail read (XREAD COUNT) and one replay read (XRANGE COUNT) take at most.
TAIL_BATCH = 1000
REPLAY_BATCH = 1000
# Entries one read of the predecessor scan (XREVRANGE COUNT) takes at most: usually the
# first entry read is the predecessor, so a full ``PREDECESSOR_SCAN`` at once would mostly
# fetch entries for nothing.
PREDECESSOR_BATCH = 100
# How long the tail's XREAD blocks before it reads again; bounds how late it notices a
# Redis that hangs without closing the connection (plus COMMAND_TIMEOUT).
TAIL_BLOCK_MS = 1000
COMMAND_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
RETRY_AFTER = 1
# The longest TTL of idempotency keys and of the id index (about 31,700 years): Redis
# refuses an expiry that overflows its 64-bit millisecond clock, and in KEYED_PUBLISH
# such a SET fails only after the XADD it keys, which would log the event and still
# answer 503.
MAX_KEY_TTL_MS = 10**15

_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")  # ASCII digits only
_MAX_ID_PART = 2**64 - 1
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

# The position of an event PUBLISHed on a channel: it is not in the log, so it has none.
# Past every stream position (``stream_seq`` < 2**128), so that ``Subscriber.offer`` never
# takes it for one a replay covered.
LIVE_ONLY_SEQ = 1 << 128

_DEFAULT_LIMITS = EventLimits(Config().max_topics, Config().max_event_bytes)

StreamId = tuple[int, int]
Entry = tuple[bytes, dict[bytes, bytes]]


def parse_stream_id(text: str) -> StreamId | None:
    """``<ms>-<counter>`` as a pair of integers, or None if it is not a stream id."""
    match = _STREAM_ID.fullmatch(text)
    if match is None:
        return None
    ms, counter = int(match.group(1)), int(match.group(2))
    if ms > _MAX_ID_PART or counter > _MAX_ID_PART:
        return None
    return ms, counter


def stream_seq(stream_id: StreamId) -> int:
    """The log position (``Event.seq``) of a stream id: ``ms << 64 | counter``.

    Both halves of a stream id are unsigned 64-bit integers, and Redis orders ids by ``ms``
    and then by ``counter``. Shifting by 64 bits keeps exactly that order for every valid
    id (Python integers do not overflow), so ``Replay.through`` and ``skip_through``
    compare these positions just as they compare the in-memory log's consecutive ones.
    """
    ms, counter = stream_id
    return ms << 64 | counter


def stored_fields(draft: EventDraft) -> dict[FieldT, EncodableT]:
    """The stream entry for a draft; see the module docstring for the field names."""
    fields: dict[FieldT, EncodableT] = {"topics": "\n".join(draft.topics), "data": draft.data}
    if draft.event is not None:
        fields["event"] = draft.event
    if draft.retry is not None:
        fields["retry"] = str(draft.retry)
    if draft.private:
        fields["private"] = "1"
    if draft.id is not None:
        fields["id"] = draft.id
    return fields


# A batch with idempotency keys or chosen ids, in one atomic step: an event whose key is
# already stored is not appended again (nor indexed), and its first id is returned in its
# place; an appended event with a chosen id points ``<prefix>:id:<id>`` at its entry.
# KEYS: the log, then the batch's idempotency keys and id index keys. ARGV: MAXLEN, the
# keys' TTL in ms, then per event the positions in KEYS of its idempotency key and of its
# id index key (0: none), its number of field arguments, and the fields. Returns the event
# ids (the chosen id, or else the entry id), then the number of events appended.
KEYED_PUBLISH = """
local maxlen, ttl = ARGV[1], ARGV[2]
local ids, fresh, fresh_count = {}, {}, 0
local i = 3
while i <= #ARGV do
  local slot, id_slot, count = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local key = slot > 0 and KEYS[slot] or nil
  local known = key and (fresh[key] or redis.call('GET', key))
  if known then
    ids[#ids + 1] = known
  else
    local command = {'XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*'}
    local chosen
    for f = i + 3, i + 2 + count, 2 do
      command[#command + 1] = ARGV[f]
      command[#command + 1] = ARGV[f + 1]
      if ARGV[f] == 'id' then chosen = ARGV[f + 1] end
    end
    local entry_id = redis.call(unpack(command))
    if id_slot > 0 then redis.call('SET', KEYS[id_slot], entry_id, 'PX', ttl) end
    local id = chosen or entry_id
    if key then
      redis.call('SET', key, id, 'PX', ttl)
      fresh[key] = id
    end
    ids[#ids + 1] = id
    fresh_count = fresh_count + 1
  end
  i = i + 3 + count
end
ids[#ids + 1] = fresh_count
return ids
"""


class MalformedEntry(ValueError):
    """A stream entry that is not an event (written by something other than a broker)."""


def entry_topics(fields: dict[bytes, bytes]) -> tuple[str, ...]:
    raw = fields.get(b"topics")
    if not raw:
        raise MalformedEntry("it has no 'topics' field")
    try:
        return tuple(raw.decode("utf-8").split("\n"))
    except UnicodeDecodeError:
        raise MalformedEntry("its 'topics' field is not UTF-8") from None


def entry_event(
    entry_id: bytes, fields: dict[bytes, bytes], topics: tuple[str, ...], created: float
) -> Event:
    """Encode one stream entry as a logged event; its fields were checked when published.

    Its ``seq`` is always the entry id's position, also when the publisher chose the id
    subscribers see, so that replay and the tail order and de-duplicate as ever.
    """
    text_id = entry_id.decode("ascii")
    position = parse_stream_id(text_id)
    data = fields.get(b"data")
    if position is None or data is None:
        raise MalformedEntry("it has no 'data' field")
    event_type = fields.get(b"event")
    retry = fields.get(b"retry")
    chosen = fields.get(b"id")
    if chosen == b"":
        raise MalformedEntry("its 'id' field is empty")
    try:
        draft = encode_draft(
            topics,
            data.decode("utf-8"),
            None if event_type is None else event_type.decode("utf-8"),
            None if retry is None else int(retry),
            private=fields.get(b"private") == b"1",
        )
        event_id = text_id if chosen is None else chosen.decode("utf-8")
        return Event.build(stream_seq(position), event_id, draft, created)
    except ValueError as exc:  # bad UTF-8, a bad retry, a line break in the event type or id
        raise MalformedEntry(str(exc)) from None


def entry_stream_id(event: Event) -> str:
    """The entry id of an event read from the stream (see ``stream_seq``), which its
    ``id`` is not when the publisher chose that."""
    return f"{event.seq >> 64}-{event.seq & _MAX_ID_PART}"


def readable_entry(
    entry_id: bytes,
    fields: dict[bytes, bytes],
    selector: Selector,
    grants: Selector | None,
    created: float,
) -> Event | None:
    """The entry as an event if this subscriber would receive it (``Event.readable_by``),
    else None; topics are checked before anything is encoded. Malformed entries are
    skipped, with a warning."""
    try:
        topics = entry_topics(fields)
        if not selector.matches_any(topics):
            return None
        event = entry_event(entry_id, fields, topics, created)
    except MalformedEntry as exc:
        logger.warning("skipping stream entry %s: %s", entry_id, exc)
        return None
    return event if event.readable_by(selector, grants) else None


def _no_such_key(result: object) -> bool:
    return isinstance(result, ResponseError) and "no such key" in str(result).lower()


class RedisBackend:
    """The event log in ``<prefix>:log``, tailed by this node; see the module docstring."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        max_events: int,
        ttl: float,
        stats: Stats,
        limits: EventLimits = _DEFAULT_LIMITS,
    ) -> None:
        self._url = redacted_url(url)
        self._log_key = f"{prefix}:log"
        self._epoch_key = f"{prefix}:epoch"
        self._key_prefix = f"{prefix}:key:"
        self._id_prefix = f"{prefix}:id:"
        self._channel_prefix = f"{prefix}:topic:".encode()
        self._max_events = max_events
        self._ttl = ttl
        self._key_ttl_ms = min(max(1, round(ttl * 1000)), MAX_KEY_TTL_MS)
        self._stats = stats
        self._limits = limits
        self._library = library_source(
            prefix,
            max_events=max_events,
            max_topics=limits.max_topics,
            max_event_bytes=limits.max_event_bytes,
        )
        self._library_warned = False
        # No retries inside redis-py: a retried MULTI/EXEC whose reply was lost would
        # append the batch twice. A failed publish is a 503 and the publisher retries; the
        # tail has its own backoff.
        self._redis = redis.asyncio.Redis.from_url(
            url,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        self._keyed_publish = self._redis.register_script(KEYED_PUBLISH)
        self._tail_redis = redis.asyncio.Redis.from_url(
            url,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=TAIL_BLOCK_MS / 1000 + COMMAND_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        # The channel listener's client, made afresh for each subscription (``_listen``).
        self._pubsub_client = functools.partial(
            redis.asyncio.Redis.from_url,
            url,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=TAIL_BLOCK_MS / 1000 + COMMAND_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        self._hub: Hub | None = None
        self._tail_task: asyncio.Task[None] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._closing = False
        # The last entry handed to the hub, which the tail reads after, and how many
        # entries the stream had had up to it (``XINFO STREAM`` entries-added).
        self._last_id = "0-0"
        self._read_count = 0
        self._epoch: bytes | None = None
        self._synced = False  # the tail has found its starting point once
        self._up = False  # the tail's last command worked
        self._lost = False  # Redis was lost after the first contact, not yet regained
        self._warned = False
        self._length = 0
        self._behind_ms: int | None = None

    @property
    def log_key(self) -> str:
        return self._log_key

    # -- lifecycle

    async def start(self, hub: Hub) -> None:
        """Find the stream's head and start tailing it.

        If Redis does not answer, the broker starts anyway (``/readyz`` fails, publishing
        is refused) and the tail keeps trying.
        """
        self._hub = hub
        logger.info("event log: Redis stream %r at %s", self._log_key, self._url)
        try:
            await self._sync()
            self._up = True
        except (RedisError, OSError) as exc:
            self._note_failure(exc)
        self._tail_task = asyncio.create_task(self._tail(), name="broker-redis-tail")
        self._listen_task = asyncio.create_task(self._listen(), name="broker-redis-channels")

    async def close(self) -> None:
        self._closing = True
        await _stop(self._tail_task, "the Redis tail")
        await _stop(self._listen_task, "the Redis channel listener")
        self._tail_task = self._listen_task = None
        self._hub = None
        self._up = False
        await self._tail_redis.aclose()
        await self._redis.aclose()

    # -- publishing

    async def publish(self, drafts: list[EventDraft]) -> Published:
        if not self._synced:
            # The tail would start after whatever this publish appends: refuse rather than
            # acknowledge an event this node's own subscribers would never see.
            raise Unavailable(
                "the event log (Redis) has not been reached yet", retry_after=RETRY_AFTER
            )
        try:
            if any(draft.key is not None or draft.id is not None for draft in drafts):
                ids, fresh = await self._publish_keyed(drafts)
            else:
                pipe = self._redis.pipeline(transaction=True)
                for draft in drafts:
                    pipe.xadd(
                        self._log_key,
                        stored_fields(draft),
                        maxlen=self._max_events,
                        approximate=True,
                    )
                ids = await pipe.execute()
                fresh = len(ids)
        except _CONNECTION_ERRORS:
            raise Unavailable(
                "the event log (Redis) is unreachable; nothing was acknowledged",
                retry_after=RETRY_AFTER,
            ) from None
        except RedisError as exc:
            logger.warning("Redis refused a publish: %s", exc)
            raise Unavailable(
                f"the event log (Redis) refused the write: {exc}", retry_after=RETRY_AFTER
            ) from None
        return Published([event_id.decode("utf-8") for event_id in ids], fresh)

    async def _publish_keyed(self, drafts: list[EventDraft]) -> tuple[list[bytes], int]:
        keys: list[str] = [self._log_key]
        slots: dict[str, int] = {}

        def slot_of(name: str) -> int:
            slot = slots.get(name)
            if slot is None:
                keys.append(name)
                slot = slots[name] = len(keys)
            return slot

        args: list[EncodableT] = [self._max_events, self._key_ttl_ms]
        for draft in drafts:
            key_slot = 0 if draft.key is None else slot_of(self._key_prefix + draft.key)
            id_slot = 0 if draft.id is None else slot_of(self._id_prefix + draft.id)
            fields = stored_fields(draft)
            args += [key_slot, id_slot, len(fields) * 2]
            for name, value in fields.items():
                args += [name, value]
        reply: list[Any] = await self._keyed_publish(keys=keys, args=args)
        return reply[:-1], int(reply[-1])

    # -- replay

    async def replay(
        self,
        last_id: str,
        selector: Selector,
        grants: Selector | None = None,
        *,
        predecessor: bool = False,
    ) -> Replay:
        """Entries after ``last_id`` that ``selector`` wants and ``grants`` allow (see
        ``Event.readable_by``), read from the stream.

        A ``last_id`` the id index knows (a chosen id, ``<prefix>:id:``) stands for the
        entry it names; any other must be an entry id itself.
        ``through`` is the stream's last-generated id when the read began, so events the
        tail offers later and the replay already holds are skipped (``skip_through``).
        ``missed`` when events after ``last_id`` may be gone: it is neither indexed nor a
        stream id, it is newer than anything this stream generated (a Redis that restarted
        empty), or its entry is no longer in the stream (trimmed, or never in it). Then
        every retained matching entry is replayed, as the in-memory log does.
        With ``predecessor``, ``Replay.predecessor`` is found as ``EventLog.since`` finds
        it, by ``XREVRANGE``.
        """
        try:
            return await self._read_replay(last_id, selector, grants, predecessor)
        except _CONNECTION_ERRORS:
            raise Unavailable(
                "the event log (Redis) is unreachable", retry_after=RETRY_AFTER
            ) from None
        except RedisError as exc:
            logger.warning("Redis refused a replay read: %s", exc)
            raise Unavailable(
                f"the event log (Redis) refused the read: {exc}", retry_after=RETRY_AFTER
            ) from None

    async def _read_replay(
        self, last_id: str, selector: Selector, grants: Selector | None, predecessor: bool
    ) -> Replay:
        # One round trip for the usual resume from an entry id; a chosen id the index
        # knows costs a second one, for the entry it names.
        position = parse_stream_id(last_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._id_prefix + last_id)
        pipe.xinfo_stream(self._log_key)
        if position is not None:
            pipe.xrange(self._log_key, last_id, last_id, count=1)
        results = await pipe.execute(raise_on_error=False)
        indexed, info = results[0], results[1]
        for result in (indexed, *results[2:]):
            if isinstance(result, Exception):
                raise result
        if isinstance(info, Exception):
            if _no_such_key(info):
                return Replay([], missed=True, through=0)
            raise info
        entry: list[Entry] = results[2] if position is not None else []
        if isinstance(indexed, bytes):
            # Whatever else wrote the key, a value that is no entry id is simply missed.
            last_id = indexed.decode("ascii", "replace")
            position = parse_stream_id(last_id)
            if position is not None:
                reply: Any = await self._redis.xrange(self._log_key, last_id, last_id, count=1)
                entry = reply
        head_id: str = info["last-generated-id"].decode("ascii")
        head = parse_stream_id(head_id)
        assert head is not None
        through = stream_seq(head)
        if position == head:
            found = await self._readable_before(head_id, selector, grants) if predecessor else None
            return Replay([], missed=False, through=through, predecessor=found)
        retained = position is not None and position < head and bool(entry)
        events, gap = await self._read_range(
            last_id if retained else None, head_id, selector, grants
        )
        if not retained or gap:
            return Replay(events, missed=True, through=through)
        if not predecessor:
            return Replay(events, missed=False, through=through)
        # Before the first event replayed, or from the head on when there is none.
        bound = f"({entry_stream_id(events[0])}" if events else head_id
        found = await self._readable_before(bound, selector, grants)
        return Replay(events, missed=False, through=through, predecessor=found)

    async def _readable_before(
        self, bound: str, selector: Selector, grants: Selector | None
    ) -> str | None:
        """The id of the newest event this subscriber would receive (``Event.readable_by``),
        from ``bound`` (an ``XREVRANGE`` end: ``(<id>`` excludes the entry) backwards,
        among at most ``PREDECESSOR_SCAN`` entries."""
        created = time.monotonic()
        left = PREDECESSOR_SCAN
        while left > 0:
            count = min(PREDECESSOR_BATCH, left)
            reply: Any = await self._redis.xrevrange(self._log_key, bound, "-", count=count)
            batch: list[Entry] = reply
            for entry_id, fields in batch:
                event = readable_entry(entry_id, fields, selector, grants, created)
                if event is not None:
                    return event.id
            if len(batch) < count:
                return None
            left -= count
            bound = f"({batch[-1][0].decode('ascii')}"
        return None

    async def _read_range(
        self, after: str | None, head_id: str, selector: Selector, grants: Selector | None
    ) -> tuple[list[Event], bool]:
        """Matching entries after ``after`` (or from the oldest) up to ``head_id``, in
        batches; and whether the stream was trimmed past the read while it went on."""
        events: list[Event] = []
        gap = False
        created = time.monotonic()
        cursor = after
        while True:
            pipe = self._redis.pipeline(transaction=True)
            if cursor is not None:
                pipe.xrange(self._log_key, "-", "+", count=1)
            pipe.xrange(
                self._log_key, "-" if cursor is None else f"({cursor}", head_id, count=REPLAY_BATCH
            )
            results = await pipe.execute()
            batch: list[Entry] = results[-1]
            if cursor is not None:
                oldest: list[Entry] = results[0]
                oldest_id = parse_stream_id(oldest[0][0].decode("ascii")) if oldest else None
                cursor_id = parse_stream_id(cursor)
                if oldest_id is None or cursor_id is None or oldest_id > cursor_id:
                    gap = True  # the entry read last is gone, and maybe some after it
            for entry_id, fields in batch:
                event = readable_entry(entry_id, fields, selector, grants, created)
                if event is not None:
                    events.append(event)
            if len(batch) < REPLAY_BATCH:
                return events, gap
            cursor = batch[-1][0].decode("ascii")
            if cursor == head_id:
                return events, gap

    # -- state

    def ready(self) -> bool:
        return self._synced and self._up

    def history_size(self) -> int:
        """Entries in the stream, as of the tail's last read or the last ``trim``."""
        return self._length

    def lag_seconds(self) -> float:
        """Wall-clock age of the last delivered entry while the tail reads full batches
        (more are waiting); 0 once a read comes back short (caught up)."""
        behind = self._behind_ms
        if behind is None:
            return 0.0
        return max(0.0, time.time() - behind / 1000)

    async def trim(self) -> None:
        """Drop entries past ``--history-size`` and older than ``--history-ttl``.

        Exact trims, once per timer tick: ``XADD``'s ``MAXLEN ~`` only trims whole stream
        nodes. Age is measured on Redis's clock (``TIME``), the one that made the ids.
        Skipped while Redis is away, so that it never holds up the shared timer.
        """
        if not self.ready():
            return
        try:
            seconds, micros = await self._redis.time()
            oldest_ms = max(0, seconds * 1000 + micros // 1000 - int(self._ttl * 1000))
            pipe = self._redis.pipeline(transaction=True)
            pipe.xtrim(self._log_key, maxlen=self._max_events, approximate=False)
            pipe.xtrim(self._log_key, minid=f"{oldest_ms}-0", approximate=False)
            pipe.xlen(self._log_key)
            *_, length = await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.debug("trim skipped: %s", exc)
            return
        self._length = length

    # -- channels: live-only events from PUBLISH

    async def _listen(self) -> None:
        """Deliver what is ``PUBLISH``ed on ``<prefix>:topic:<topic>`` to this node's
        subscribers, until closed; reconnects with backoff like the tail.

        Redis pub/sub is fire-and-forget: a message published while this node's
        subscription is down is not delivered here, and none is ever replayed.
        """
        pattern = self._channel_prefix + b"*"
        backoff = BACKOFF_FIRST
        lost = False
        while not self._closing:
            # A fresh client each time: a pooled connection that lived through the outage
            # came back subscribed on the server but silent here.
            client = self._pubsub_client()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(pattern)
                if lost:
                    logger.info("resubscribed to the Redis channels %s", pattern.decode())
                lost = False
                backoff = BACKOFF_FIRST
                while not self._closing:
                    message = await pubsub.get_message(timeout=TAIL_BLOCK_MS / 1000)
                    if message is not None and message["type"] == "pmessage":
                        self._deliver_message(message["channel"], message["data"])
            except (RedisError, OSError) as exc:
                if not lost:
                    logger.warning(
                        "lost the Redis channel subscription (%s); events PUBLISHed on "
                        "channels until it is back are not delivered here",
                        exc,
                    )
                lost = True
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception:
                logger.exception("the Redis channel listener failed; going on")
                await asyncio.sleep(BACKOFF_MAX)
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
                except (RedisError, OSError) as exc:
                    logger.debug("closing the Redis subscription: %s", exc)

    def _deliver_message(self, channel: bytes, payload: bytes) -> None:
        """Fan out one channel message as a live-only event, or log why it is ignored.

        A payload that is a JSON object with a ``data`` key is an event object (its
        ``event`` and ``retry`` honoured, any ``topic`` ignored in favour of the
        channel's); anything else is the data of one event.
        """
        try:
            topic = channel[len(self._channel_prefix) :].decode("utf-8")
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("ignoring a message on channel %r: not valid UTF-8", channel)
            return
        fields: dict[str, Any] | None = None
        if text.startswith("{"):
            try:
                parsed = orjson.loads(text)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict) and "data" in parsed:
                fields = parsed
        try:
            if fields is not None:
                draft = make_draft(
                    topic,
                    fields["data"],
                    fields.get("event"),
                    fields.get("retry"),
                    limits=self._limits,
                    private=fields.get("private", False),
                )
            else:
                draft = make_draft(topic, text, limits=self._limits)
        except ClientError as exc:
            logger.warning("ignoring a message on channel %r: %s", channel, exc.detail)
            return
        # No id line: the client's Last-Event-ID stays at the last logged event.
        event = Event(
            LIVE_ONLY_SEQ,
            "",
            draft.topics,
            draft.body,
            sse.as_chunk(draft.body),
            time.monotonic(),
            draft.private,
        )
        if self._hub is not None:
            self._hub.fan_out([event])

    # -- the tail

    async def _tail(self) -> None:
        """Read the stream after the last delivered entry and fan out, until closed.

        While behind, it reads batch after batch. Once caught up, a blocking ``XREAD``
        waits for the next entry; the entries themselves are always read in a
        ``MULTI`` with ``XINFO STREAM``, so that the read and the stream's counters
        describe the same moment (``_take``).
        """
        backoff = BACKOFF_FIRST
        caught_up = False
        while not self._closing:
            try:
                if not self._up:
                    await self._sync()
                    await self._regained()
                    backoff = BACKOFF_FIRST
                    caught_up = False
                if caught_up:
                    woken = await self._tail_redis.xread(
                        {self._log_key: self._last_id}, count=1, block=TAIL_BLOCK_MS
                    )
                    if not woken:
                        self._behind_ms = None
                        continue
                pipe = self._tail_redis.pipeline(transaction=True)
                pipe.xinfo_stream(self._log_key)
                pipe.xread({self._log_key: self._last_id}, count=TAIL_BATCH)
                info, response = await pipe.execute(raise_on_error=False)
                caught_up = self._take(info, response)
            except (RedisError, OSError) as exc:
                logger.debug("the Redis tail failed", exc_info=True)
                self._note_failure(exc)
                caught_up = False
                # A failure on one connection says little about the tail's others (it
                # uses one to block, another for MULTI): start them all afresh.
                await _drop_connections(self._tail_redis)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception:
                logger.exception("the Redis tail failed after %s; going on", self._last_id)
                caught_up = False
                await asyncio.sleep(BACKOFF_MAX)

    def _take(self, info: Any, response: Any) -> bool:
        """Deliver one read, after checking that nothing after the last id was lost.

        The stream has had ``entries-added`` entries; trimming removes from the front, so
        it still holds the newest ``length`` of them. This node has read the first
        ``_read_count``. If the oldest entry still held is numbered past
        ``_read_count + 1``, entries were trimmed before this node read them (it fell
        behind by more than ``--history-size``, or one batch was larger than it). If the
        stream counts fewer entries than this node read, it is a new stream. An id that
        merely aged out (``--history-ttl``) with nothing lost after it is no gap.
        Returns whether the tail has caught up with the stream.
        """
        if isinstance(response, Exception):
            raise response
        if isinstance(info, Exception):
            if not _no_such_key(info):
                raise info
            added = length = 0
        else:
            added, length = _counters(info)
        if added < self._read_count or (added == 0 and self._last_id != "0-0"):
            self._report_gap("reset")
            return False
        entries: list[Entry] = response[0][1] if response else []
        first_held = added - length  # entries numbered up to this one are gone
        if first_held > self._read_count:
            self._report_gap("trimmed")
            self._read_count = first_held
        self._length = length
        if entries:
            self._read_count += len(entries)
            self._deliver(entries)
        caught_up = len(entries) < TAIL_BATCH
        self._behind_ms = None if caught_up else int(self._last_id.partition("-")[0])
        return caught_up

    def _deliver(self, entries: list[Entry]) -> None:
        created = time.monotonic()
        events: list[Event] = []
        for entry_id, fields in entries:
            try:
                events.append(entry_event(entry_id, fields, entry_topics(fields), created))
            except MalformedEntry as exc:
                logger.warning("skipping stream entry %s: %s", entry_id, exc)
        self._last_id = entries[-1][0].decode("ascii")
        if events and self._hub is not None:
            self._hub.fan_out(events)

    async def _sync(self) -> None:
        """Find where the tail reads from.

        At the first contact: the stream's head (earlier events are history). After an
        outage: the last id delivered, so subscribers get everything appended meanwhile;
        unless Redis lost the log (another epoch token, or a stream that is gone or went
        backwards), in which case every stream is told and the tail starts the new log
        from its beginning. Entries trimmed meanwhile are found by the next read.
        """
        candidate = uuid.uuid4().hex.encode("ascii")
        pipe = self._tail_redis.pipeline(transaction=True)
        pipe.set(self._epoch_key, candidate, nx=True, get=True)
        pipe.xinfo_stream(self._log_key)
        old_epoch, info = await pipe.execute(raise_on_error=False)
        if isinstance(old_epoch, Exception):
            raise old_epoch
        await self._load_library()
        if isinstance(info, Exception) and not _no_such_key(info):
            raise info
        epoch: bytes = old_epoch if old_epoch is not None else candidate
        stream = None if isinstance(info, Exception) else info
        head = None if stream is None else parse_stream_id(stream["last-generated-id"].decode())
        added, length = (0, 0) if stream is None else _counters(stream)
        if not self._synced:
            self._last_id = "0-0" if head is None else f"{head[0]}-{head[1]}"
            self._read_count = added
        else:
            last = parse_stream_id(self._last_id)
            if (
                epoch != self._epoch
                or (head is None and self._read_count > 0)
                or (head is not None and last is not None and head < last)
                or added < self._read_count
            ):
                self._report_gap("reset")
        self._epoch = epoch
        self._length = length
        self._synced = True

    async def _load_library(self) -> None:
        """Load (or replace) the function library; at start-up and after every reconnect,
        since a Redis that came back empty has lost it. Refused (an old Redis, an ACL), the
        node goes on without it: the HTTP path does not need it."""
        try:
            await self._tail_redis.function_load(self._library, replace=True)
        except ResponseError as exc:
            if not self._library_warned:
                logger.error("cannot load the Redis function library (FCALL publish): %s", exc)
            self._library_warned = True
            return
        self._library_warned = False

    def _report_gap(self, cause: str) -> None:
        """Tell every stream that events after the last delivered id may be gone."""
        lost_after = self._last_id
        if cause == "reset":
            logger.warning(
                "Redis lost the event log (restarted empty?): events after %s may be gone; "
                "telling every stream (broker.missed) and carrying on with the new log",
                lost_after,
            )
            self._last_id = "0-0"
            self._read_count = 0
        else:
            logger.warning(
                "events after %s were trimmed from the log before this node read them "
                "(--history-size too small for this node's lag or a batch?); "
                "telling every stream (broker.missed)",
                lost_after,
            )
        self._stats.stream_gaps[cause] += 1
        if self._hub is not None:
            self._hub.notify_missed(lost_after, new_log=cause == "reset")

    async def _regained(self) -> None:
        self._up = True
        self._warned = False
        if not self._lost:
            return
        self._lost = False
        self._stats.backend_reconnects += 1
        logger.info("reconnected to Redis; the log resumes after %s", self._last_id)
        # Pooled connections from before the outage are dead; drop the idle ones now
        # rather than fail a publish on each.
        await _drop_connections(self._redis, inuse=False)

    def _note_failure(self, exc: BaseException) -> None:
        self._up = False
        if self._synced and not self._lost:
            self._lost = True
            logger.warning(
                "lost Redis at %s (%s); publishing is refused and streams stay open "
                "until it is back",
                self._url,
                exc,
            )
        elif not self._warned and not self._lost:
            logger.warning("cannot reach Redis at %s (%s); retrying", self._url, exc)
        self._warned = True


async def _stop(task: asyncio.Task[None] | None, name: str) -> None:
    if task is None:
        return
    # Cancel until it ends: redis-py can swallow a cancellation that lands as a blocking
    # read times out, and the task would then read on. ``_closing`` stops it after that
    # read in any case.
    deadline = asyncio.get_running_loop().time() + TAIL_BLOCK_MS / 1000 + COMMAND_TIMEOUT
    while not task.done() and asyncio.get_running_loop().time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.done():
        logger.warning("%s did not stop in time", name)
    elif not task.cancelled() and task.exception() is not None:
        logger.error("%s failed", name, exc_info=task.exception())


async def _drop_connections(client: redis.asyncio.Redis, *, inuse: bool = True) -> None:
    try:
        await client.connection_pool.disconnect(inuse_connections=inuse)
    except (RedisError, OSError) as exc:  # closing a dead connection can fail too
        logger.debug("dropping Redis connections: %s", exc)


def _counters(info: dict[str, Any]) -> tuple[int, int]:
    """``entries-added`` and ``length`` from ``XINFO STREAM`` (Redis 7.0 or later)."""
    added = info.get("entries-added")
    if added is None:
        raise RedisError("Redis 7.0 or later is needed (XINFO STREAM has no entries-added)")
    return int(added), int(info["length"])

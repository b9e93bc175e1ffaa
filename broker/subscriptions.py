"""Mercure's active subscriptions (``--mercure-subscriptions``): the events that say when a
subscription starts and ends, and the registry the subscription API answers from.

Each matcher of a Mercure stream is one subscription. When the stream is registered the
hub publishes, for each, a private update on
``/.well-known/mercure/subscriptions/{matchType}/{match}/{subscriber}`` whose data is the
subscription's JSON-LD document with ``active: true``; when the stream ends, however it
ends (``Hub.forget`` sees them all), the same document with ``active: false``. They go
through the backend like any update, so they are in the history and every node sharing
the log sees them.

Choices the draft leaves to the hub:

* ``{subscriber}`` is the token's ``sub`` followed by ``#`` and a per-stream random
  suffix, or ``urn:uuid:...`` made per stream for a subscriber without a ``sub`` (or
  without a token). The suffix keeps two streams of one ``sub`` (two tabs) apart, which
  the draft requires, and the ``sub`` stays readable in front of it. All the
  subscriptions of one stream share the value.
* The ``topic`` parameter of earlier drafts (``--mercure-legacy``) is presented as
  ``matchType`` ``URITemplate`` when it is used as a URI template, else as ``Exact``.
* ``payload`` is that of the first ``subscribe`` authorization detail whose topics match
  the matcher (``Grants.payload_for``); absent when none has one.

Every node keeps its registry from the subscription events the fan-out hands it
(``Hub.watch`` on the reserved topics), its own included, so the API answers alike on
the in-memory and the Redis backends and lists the subscriptions of every node. At start
it also reads the retained history for earlier events. Hence its limits:

* a node that dies without ending its streams (SIGKILL, power loss) publishes no end
  events: its subscriptions stay listed on the other nodes until they restart and no
  longer find the start events in the history (``--history-size``/``--history-ttl``);
* a subscription whose start event left the history before a node started is unknown to
  that node;
* subscription events take their place in the history like other updates;
* with Redis the registry trails the log as the fan-out does: a subscription shows up
  in the API a moment after its stream opened.

``lastEventID`` is the id of the last subscription event the registry applied: the state
it answers reflects the log up to there, so a client that subscribes to subscription
events from that id misses none and applies none twice, even while the fan-out trails
the log's head.

Publishing never holds a stream up: events are queued and one task publishes them, in
order (the end of a subscription never overtakes its start), in batches. A backend that
cannot take them loses them, with a warning; a stream never fails for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from broker.auth import EXACT, Grants
from broker.backends import Backend
from broker.errors import Unavailable
from broker.event import Event, EventDraft, encode_draft
from broker.history import EARLIEST
from broker.hub import Hub
from broker.matchers import URI_TEMPLATE
from broker.subscriber import Run, Subscriber
from broker.topics import DOUBLE_STAR, HUB_PATH, Selector

logger = logging.getLogger(__name__)

PREFIX = HUB_PATH + "/subscriptions"
# Subscription event topics: their three variables are percent-encoded, so each is one
# segment.
TOPICS = PREFIX + "/*/*/*"
CONTEXT = "https://mercure.rocks/"
# Events waiting to be published at most; past it (a backend down for long while
# streams come and go) new ones are lost, with a warning.
MAX_PENDING = 10_000
BATCH = 100
# How long closing waits for the queued events (the ends of the streams shutdown ended).
FLUSH_SECONDS = 5.0
BOOTSTRAP_RETRY_SECONDS = 1.0

Document = dict[str, Any]


def encode(value: str) -> str:
    """RFC 6570 simple expansion of one variable: everything but unreserved characters
    percent-encoded, once, the value taken as a whole."""
    return urllib.parse.quote(value, safe="")


def subscription_topic(match_type: str, match: str, subscriber: str) -> str:
    return f"{PREFIX}/{encode(match_type)}/{encode(match)}/{encode(subscriber)}"


def matcher_path(match_type: str, match: str) -> str:
    return f"{PREFIX}/{encode(match_type)}/{encode(match)}"


def document(
    match_type: str, match: str, subscriber: str, payload: dict[str, Any] | None
) -> Document:
    """A subscription's JSON-LD document, active, without ``@context`` (the API puts that
    at its root)."""
    doc: Document = {
        "id": subscription_topic(match_type, match, subscriber),
        "type": "Subscription",
        "matchType": match_type,
        "match": match,
        "subscriber": subscriber,
        "active": True,
    }
    if payload is not None:
        doc["payload"] = payload
    return doc


def presented(matchers: Sequence[tuple[str, str]], selector: Selector) -> list[tuple[str, str]]:
    """The subscriptions as events show them: a legacy ``topic`` is a URI template only
    when the selector really uses it as one (see the module docstring)."""
    templates = {m.text for m in selector.scanned if m.kind == URI_TEMPLATE}
    return [
        (EXACT if kind == URI_TEMPLATE and match not in templates else kind, match)
        for kind, match in matchers
    ]


def subscriber_name(grants: Grants | None) -> str:
    """``{subscriber}``, from validated data only: the token's ``sub``, else our own id."""
    if grants is not None and grants.named:
        return f"{grants.subject}#{uuid.uuid4().hex}"
    return uuid.uuid4().urn


def _draft(doc: Document) -> EventDraft:
    data = orjson.dumps({"@context": CONTEXT, **doc}).decode("utf-8")
    return encode_draft((doc["id"],), data, private=True, event_id=uuid.uuid4().urn)


def _data(event: Event) -> bytes:
    """The ``data`` of a logged event, from its wire bytes (the log keeps no other form)."""
    return b"\n".join(line[6:] for line in event.frame.split(b"\n") if line.startswith(b"data: "))


class Registry:
    """This node's view of every node's active subscriptions, and the publisher of its own
    streams' subscription events. To the hub it is a ``Recipient`` of the reserved topics."""

    def __init__(self, hub: Hub, backend: Backend) -> None:
        self._hub = hub
        self._backend = backend
        # The fan-out offers private events only to recipients whose grants match.
        self.grants: Selector | None = Selector([DOUBLE_STAR])
        # By topic: the position of the last event applied, and the document, or None for
        # a subscription that ended (kept only while the history is read, so that an
        # older start event read there does not bring it back).
        self._known: dict[str, tuple[int, Document | None]] = {}
        self._bootstrapping = True
        self._last: tuple[int, str] | None = None
        # This node's streams and the documents of their subscriptions.
        self._local: dict[Subscriber, list[Document]] = {}
        self._queue: asyncio.Queue[EventDraft] = asyncio.Queue(MAX_PENDING)
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle

    async def start(self) -> None:
        """Listen before reading the history, so no event falls between the two."""
        self._hub.watch(TOPICS, self)
        self._hub.on_forget = self._forgotten
        self._tasks = [
            asyncio.create_task(self._publish_queued(), name="broker-subscription-events"),
            asyncio.create_task(self._bootstrap(), name="broker-subscription-history"),
        ]

    async def close(self) -> None:
        """Publish what is queued (the ends of the streams shutdown closed), for a while."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), FLUSH_SECONDS)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._hub.on_forget = None
        self._hub.unwatch(TOPICS, self)

    # -- this node's streams

    def opened(
        self, subscriber: Subscriber, grants: Grants | None, matchers: Sequence[tuple[str, str]]
    ) -> None:
        """A Mercure stream is registered: each of its matchers is a subscription."""
        name = subscriber_name(grants)
        try:
            docs = [
                document(kind, match, name, None if grants is None else grants.payload_for(match))
                for kind, match in matchers
            ]
            drafts = [_draft(doc) for doc in docs]
        except (ValueError, TypeError) as exc:
            # A token's sub or payload that JSON cannot carry (a lone surrogate): the
            # stream goes on, unannounced.
            logger.warning("no subscription events for a stream: %s", exc)
            return
        self._local[subscriber] = docs
        self._send(drafts)

    def _forgotten(self, subscriber: Subscriber) -> None:
        docs = self._local.pop(subscriber, None)
        if docs is not None:
            self._send([_draft({**doc, "active": False}) for doc in docs])

    def _send(self, drafts: list[EventDraft]) -> None:
        for draft in drafts:
            try:
                self._queue.put_nowait(draft)
            except asyncio.QueueFull:
                logger.warning(
                    "subscription event for %s lost: %d events are waiting to be published",
                    draft.topics[0],
                    MAX_PENDING,
                )

    async def _publish_queued(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._backend.publish(batch)
            except Unavailable as exc:
                logger.warning("%d subscription events lost: %s", len(batch), exc.detail)
            except Exception:
                logger.exception("%d subscription events lost", len(batch))
            finally:
                for _ in batch:
                    queue.task_done()

    # -- every node's subscriptions, as the log tells them

    async def _bootstrap(self) -> None:
        """Apply the subscription events still in the history, then forget the ended."""
        wanted = Selector([TOPICS])
        while True:
            try:
                replay = await self._backend.replay(EARLIEST, wanted, self.grants)
            except Unavailable as exc:
                logger.warning("reading subscription events from the history: %s", exc.detail)
                await asyncio.sleep(BOOTSTRAP_RETRY_SECONDS)
                continue
            break
        for event in replay.events:
            self._apply(event, live=False)
        self._bootstrapping = False
        self._known = {topic: known for topic, known in self._known.items() if known[1]}

    def offer(self, event: Event) -> None:
        self._apply(event, live=True)

    def offer_run(self, run: Run) -> None:
        for event in run.events:
            self._apply(event, live=True)

    def _apply(self, event: Event, *, live: bool) -> None:
        """Live events come in the log's order and always apply; one read from the
        history applies only over what is older."""
        topic = next((t for t in event.topics if t.startswith(PREFIX + "/")), None)
        if topic is None:
            return
        try:
            doc = orjson.loads(_data(event))
        except orjson.JSONDecodeError:
            return
        if not (
            isinstance(doc, dict)
            and doc.get("id") == topic
            and doc.get("type") == "Subscription"
            and isinstance(doc.get("matchType"), str)
            and isinstance(doc.get("match"), str)
            and isinstance(doc.get("active"), bool)
        ):
            return
        known = self._known.get(topic)
        if not live and known is not None and known[0] >= event.seq:
            return
        if live or self._last is None or event.seq > self._last[0]:
            self._last = (event.seq, event.id)
        doc.pop("@context", None)
        if doc["active"]:
            self._known[topic] = (event.seq, doc)
        elif self._bootstrapping:
            self._known[topic] = (event.seq, None)
        else:
            self._known.pop(topic, None)

    # -- what the API reads

    @property
    def last_event_id(self) -> str:
        return EARLIEST if self._last is None else self._last[1]

    def subscriptions(self, matcher: tuple[str, str] | None = None) -> list[Document]:
        """The active subscriptions, or those of one (matchType, match)."""
        docs = [doc for _, doc in self._known.values() if doc is not None]
        if matcher is None:
            return docs
        return [doc for doc in docs if (doc["matchType"], doc["match"]) == matcher]

    def subscription(self, topic: str) -> Document | None:
        known = self._known.get(topic)
        return None if known is None else known[1]

"""A Python client for the broker: subscribe to topics, publish events.

```python
async with Subscriber("http://127.0.0.1:8080", ["chat/42"]) as events:
    async for event in events:
        print(event.id, event.event, event.data)

async with Publisher("http://127.0.0.1:8080", token) as publisher:
    event_id = await publisher.publish("chat/42", {"text": "hi"})
```

The subscriber reads the stream as a browser's ``EventSource`` does (the WHATWG parsing
rules, implemented by ``EventParser``), and reconnects as one should: after the server's
``retry`` delay, backing off exponentially with jitter while the broker cannot be reached,
resuming with ``Last-Event-ID`` so that nothing retained is lost or repeated. A refusal
that retrying cannot fix (a 4xx other than 429: a bad topic, a missing or bad token) is
raised as ``BrokerError`` instead of being retried for ever.

Built on aiohttp, which the broker already depends on; pass ``session=`` to share one.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import logging
import random
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson

logger = logging.getLogger("broker.client")

__all__ = [
    "BrokerError",
    "Event",
    "EventParser",
    "Publisher",
    "Subscriber",
    "backoff_delay",
]

# What a browser starts with before the server sends ``retry:``; the broker sends its own
# in the first bytes of every stream.
DEFAULT_RETRY_MS = 3000
# Reconnection delays grow up to this many seconds (or the server's retry, if longer).
DEFAULT_MAX_DELAY = 30.0
# A retry of 0 ms would make a failing broker a busy loop: failures wait at least this.
MIN_DELAY = 0.01
# An idle NDJSON publish stream sends a blank line this often, so that the broker's
# --body-timeout (the longest pause it allows between reads) does not end it.
DEFAULT_KEEPALIVE = 10.0

_JITTER = random.Random()

_TRANSIENT = (aiohttp.ClientError, OSError, TimeoutError)


class BrokerError(Exception):
    """The broker refused a request: its status and the ``{"error", "detail"}`` it sent.

    ``ids`` lists the events that were published before an NDJSON stream was refused.
    """

    def __init__(self, status: int, error: str, detail: str, *, ids: Sequence[str] = ()) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.ids = list(ids)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event, as ``EventSource`` hands it to a listener.

    ``event`` is the type (``"message"`` unless the publisher named one; the broker's
    notices are ``broker.missed`` and ``broker.dropped``); ``id`` is the stream's last
    event id when it was dispatched, so a notice, which carries none, keeps the id of the
    event before it.
    """

    data: str
    event: str = "message"
    id: str = ""


class EventParser:
    """An incremental ``text/event-stream`` parser following the WHATWG HTML standard.

    Feed it bytes as they arrive, in pieces of any size; it returns the events completed
    so far. ``retry`` is the last valid reconnection time received, in milliseconds.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False
        self._buffer = ""
        self._after_cr = False
        self._data: list[str] = []
        self._type = ""
        self.last_event_id = ""
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._after_cr and text.startswith("\n"):
            # The LF of a CRLF that was split between two chunks.
            text = text[1:]
        self._after_cr = text.endswith("\r")
        lines = (self._buffer + text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buffer = lines.pop()
        events: list[Event] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        """A blank line: an event if any ``data`` was given, else only a reset."""
        data, kind = self._data, self._type
        self._data, self._type = [], ""
        if not data:
            return None
        return Event(data="\n".join(data), event=kind or "message", id=self.last_event_id)


def backoff_delay(
    retry_ms: int, failures: int, max_delay: float, *, jitter: random.Random | None = None
) -> float:
    """Seconds to wait before the next connection attempt.

    The server's ``retry`` is the starting point, honoured as a minimum; each failure since
    the last good connection doubles it, up to ``max_delay`` (or the server's retry, if that
    is longer). Up to half as much again is added at random, so that thousands of clients
    cut off at once by a restart do not all come back in the same instant.
    """
    base = max(retry_ms / 1000, MIN_DELAY if failures else 0.0)
    delay = min(base * 2.0**failures, max(max_delay, retry_ms / 1000))
    return delay * (1 + (jitter or _JITTER).random() / 2)


async def _error_of(response: aiohttp.ClientResponse) -> BrokerError:
    """The broker's JSON error, or a readable stand-in for a body from something else."""
    text = await response.text(errors="replace")
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        ids = body.get("ids")
        return BrokerError(
            response.status,
            body["error"],
            str(body.get("detail", "")),
            ids=[str(i) for i in ids] if isinstance(ids, list) else (),
        )
    summary = " ".join(text.split())[:200] or (response.reason or "")
    return BrokerError(response.status, f"http_{response.status}", summary)


def _base(url: str) -> str:
    return url.rstrip("/")


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Subscriber:
    """Events of ``topics`` (topics or patterns) from the broker at ``url``, for ever.

    Use as ``async with Subscriber(...) as events: async for event in events``. The stream
    is open once ``async with`` has entered: events published after that are delivered.
    ``last_event_id`` resumes after an id saved earlier; ``token`` is a subscriber JWT,
    needed for private events or when the broker refuses anonymous subscribers.
    ``retry`` (ms) is the reconnection delay until the broker sends its own; failures back
    off from it up to ``max_delay`` seconds. ``idle_timeout`` (seconds) treats a stream
    silent for that long as dead and reconnects; set it above the broker's ``--heartbeat``.

    ``last_event_id`` is then the id of the last event handed out (save it to resume
    later), ``retry`` the reconnection delay in force, ``connections`` the number of
    streams opened so far.
    """

    def __init__(
        self,
        url: str,
        topics: str | Sequence[str],
        *,
        last_event_id: str | None = None,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        retry: int = DEFAULT_RETRY_MS,
        max_delay: float = DEFAULT_MAX_DELAY,
        idle_timeout: float | None = None,
    ) -> None:
        self.url = _base(url) + "/events"
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.last_event_id = last_event_id
        self.retry = retry
        # The last id received, which a reconnection resumes after; ``last_event_id`` is
        # the last one handed to the caller, which may not have read all that arrived.
        self._received_id = last_event_id or ""
        self.connections = 0
        self._token = token
        self._session = session
        self._own_session = session is None
        self._max_delay = max_delay
        self._idle_timeout = idle_timeout
        self._response: aiohttp.ClientResponse | None = None
        self._parser = EventParser()
        self._pending: deque[Event] = deque()
        self._failures = 0

    async def __aenter__(self) -> Self:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            await self._connect(wait=False)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._drop()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while not self._pending:
            if self._response is None:
                await self._connect(wait=True)
            assert self._response is not None
            try:
                chunk = await self._response.content.readany()
            except _TRANSIENT as exc:
                logger.warning("stream from %s broke (%s); reconnecting", self.url, _say(exc))
                self._drop()
                continue
            if not chunk:
                logger.info("stream from %s ended; reconnecting", self.url)
                self._drop()
                continue
            self._pending.extend(self._parser.feed(chunk))
            self._received_id = self._parser.last_event_id
            if self._parser.retry is not None:
                self.retry = self._parser.retry
        event = self._pending.popleft()
        self.last_event_id = event.id or None
        return event

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    async def _connect(self, *, wait: bool) -> None:
        """Open the stream, retrying what may pass; a permanent refusal is raised."""
        assert self._session is not None
        while True:
            if wait:
                await asyncio.sleep(backoff_delay(self.retry, self._failures, self._max_delay))
            wait = True
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            headers.update(_auth(self._token))
            if self._received_id:
                headers["Last-Event-ID"] = self._received_id
            try:
                response = await self._session.get(
                    self.url,
                    params=[("topic", topic) for topic in self.topics],
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=self._idle_timeout),
                )
            except _TRANSIENT as exc:
                self._failures += 1
                logger.warning("cannot reach %s (%s); retrying", self.url, _say(exc))
                continue
            if response.status == 200 and response.content_type == "text/event-stream":
                break
            try:
                error = await _error_of(response)
            except _TRANSIENT as exc:
                error = BrokerError(response.status, f"http_{response.status}", _say(exc))
            response.release()
            if response.status == 200:
                raise BrokerError(
                    200,
                    "not_event_stream",
                    f"{self.url} answered with Content-Type {response.content_type!r}",
                )
            if 400 <= response.status < 500 and response.status != 429:
                raise error
            self._failures += 1
            logger.warning("%s refused the stream (%s); retrying", self.url, error)
        self._response = response
        # A fresh parser per connection: a half-received event must not join the next one.
        # The last event id carries over, as in a browser.
        self._parser = EventParser()
        self._parser.last_event_id = self._received_id
        self._failures = 0
        self.connections += 1


def _say(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


EventObject = Mapping[str, Any]


def _event_object(
    topic: str | Sequence[str] | None,
    data: Any,
    event: str | None,
    retry: int | None,
    private: bool,
    key: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"data": data}
    if topic is not None:
        body["topic"] = topic if isinstance(topic, str) else list(topic)
    if event is not None:
        body["event"] = event
    if retry is not None:
        body["retry"] = retry
    if private:
        body["private"] = True
    if key is not None:
        body["key"] = key
    return body


class Publisher:
    """Publishes to the broker at ``url``, with a publisher JWT ``token`` if it needs one.

    Use ``async with Publisher(...)``, or call ``close()`` when done: it owns an HTTP
    session unless given one. A refusal is raised as ``BrokerError``; nothing is retried
    here, since only the caller knows whether a retry is safe (give events a ``key`` to make
    it so).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = _base(url) + "/publish"
        self._token = token
        self._session = session
        self._own_session = session is None
        self._timeout = timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def publish(
        self,
        topic: str | Sequence[str],
        data: Any,
        event: str | None = None,
        retry: int | None = None,
        private: bool = False,
        key: str | None = None,
    ) -> str:
        """Publish one event and return its id. ``data`` that is not a string is sent as
        JSON; ``key`` makes a retry of this call publish nothing new."""
        body = _event_object(topic, data, event, retry, private, key)
        answer = await self._post(orjson.dumps(body), "application/json")
        return str(answer["id"])

    async def publish_many(self, events: Iterable[EventObject]) -> list[str]:
        """Publish event objects (``topic``, ``data`` and optional fields) atomically, in
        order, in one request; return their ids."""
        batch = [dict(event) for event in events]
        if not batch:
            return []
        answer = await self._post(orjson.dumps(batch), "application/json")
        return [str(i) for i in answer["ids"]]

    async def publish_stream(
        self,
        items: AsyncIterable[EventObject | str],
        *,
        topic: str | Sequence[str] | None = None,
        key: str | None = None,
        keepalive: float | None = DEFAULT_KEEPALIVE,
    ) -> list[str]:
        """Stream events as NDJSON, each published as soon as it is sent; return the ids.

        An item is an event object, or a string: one line, which with ``topic`` is
        published verbatim as the data of one event unless it is itself a JSON event
        object (with ``data``). ``topic`` is the default topic(s) of every event. ``key``
        is the stream's ``Idempotency-Key``: event ``i`` gets ``<key>#<i>``. While the
        items pause, a blank line goes out every ``keepalive`` seconds, which keeps the
        broker from ending the stream for being idle.
        """
        params = [] if topic is None else [("topic", t) for t in _topics(topic)]
        headers = {"Idempotency-Key": key} if key is not None else {}
        body = _Body(items, keepalive)
        try:
            answer = await self._post(
                body.lines(),
                "application/x-ndjson",
                params=params,
                headers=headers,
                client_timeout=aiohttp.ClientTimeout(total=None),
            )
        except aiohttp.ClientError:
            if body.failure is not None:
                raise body.failure from None
            raise
        return [str(i) for i in answer["ids"]]

    async def _post(
        self,
        body: bytes | AsyncIterator[bytes],
        content_type: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        client_timeout: aiohttp.ClientTimeout | None = None,
    ) -> dict[str, Any]:
        async with self._http().post(
            self.url,
            data=body,
            params=params,
            headers={"Content-Type": content_type, **_auth(self._token), **(headers or {})},
            timeout=client_timeout or aiohttp.ClientTimeout(total=self._timeout),
        ) as response:
            if response.status != 200:
                raise await _error_of(response)
            answer: dict[str, Any] = await response.json(loads=orjson.loads)
            return answer


def _topics(topic: str | Sequence[str]) -> list[str]:
    return [topic] if isinstance(topic, str) else list(topic)


def _line(item: EventObject | str) -> bytes:
    if isinstance(item, str):
        if "\n" in item or "\r" in item:
            raise ValueError("a line to publish must not contain a line break")
        return item.encode("utf-8") + b"\n"
    return orjson.dumps(dict(item)) + b"\n"


class _Body:
    """The NDJSON request body: one line per item, sent as it comes, blank lines while idle.

    aiohttp reports any exception raised while it sends a body as a connection error;
    ``failure`` keeps the original (a bad item, or the caller's iterable failing), so that
    it is what the caller sees.
    """

    def __init__(self, items: AsyncIterable[EventObject | str], keepalive: float | None) -> None:
        self._items = items
        self._keepalive = keepalive
        self.failure: Exception | None = None

    async def lines(self) -> AsyncIterator[bytes]:
        iterator = aiter(self._items)
        waiting: asyncio.Future[EventObject | str] | None = None
        try:
            while True:
                if waiting is None:
                    waiting = asyncio.ensure_future(anext(iterator))
                done, _ = await asyncio.wait({waiting}, timeout=self._keepalive)
                if not done:
                    yield b"\n"
                    continue
                try:
                    line = _line(waiting.result())
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    self.failure = exc
                    raise
                waiting = None
                yield line
        finally:
            if waiting is not None:
                waiting.cancel()
                waiting.add_done_callback(_forget)


def _forget(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned read's outcome as seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()

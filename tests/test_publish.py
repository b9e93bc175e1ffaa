"""``POST /publish`` end to end: what a publisher sends, and what arrives on the wire.

Every test that checks delivery reads the stream with httpx-sse, so the bytes the broker
writes are judged by a parser we did not write. Error tests pin the status, the error
code and the exact body shape, because publishers act on them programmatically.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.conftest import Broker, BrokerFactory, events_of, publish, wait_for
from tests.test_server import Connection, assert_error, connected

RECEIVE_TIMEOUT = 10.0
NDJSON = {"Content-Type": "application/x-ndjson"}


@contextlib.asynccontextmanager
async def subscribed(
    http: httpx.AsyncClient, url: str, *topics: str
) -> AsyncIterator[AsyncIterator[ServerSentEvent]]:
    """An open stream on ``topics``; the broker registers it before the headers arrive."""
    params = [("topic", topic) for topic in topics]
    async with aconnect_sse(http, "GET", f"{url}/events", params=params) as source:
        assert source.response.status_code == 200
        yield events_of(source)


async def receive(events: AsyncIterator[ServerSentEvent], count: int = 1) -> list[ServerSentEvent]:
    return [await asyncio.wait_for(anext(events), RECEIVE_TIMEOUT) for _ in range(count)]


def id_order(event_id: str) -> tuple[int, int]:
    """Ids look like ``<ms>-<n>``; the order is the numeric order of the pair."""
    milliseconds, counter = event_id.split("-")
    return int(milliseconds), int(counter)


def assert_strictly_increasing(ids: list[str]) -> None:
    keys = [id_order(event_id) for event_id in ids]
    assert all(earlier < later for earlier, later in itertools.pairwise(keys)), ids


def error_body(
    response: httpx.Response, status: int, code: str, *, extra: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Check the one error shape every failure shares, and return the parsed body."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "detail"} | extra, body
    assert body["error"] == code
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


async def publish_marker(http: httpx.AsyncClient, url: str, topic: str) -> str:
    """Publish an event that proves, when it arrives next, that nothing came before it."""
    return await publish(http, url, topic, "marker")


async def chunked(*parts: bytes) -> AsyncIterator[bytes]:
    """A request body without Content-Length: httpx sends it chunked."""
    for part in parts:
        yield part


class ControlledBody:
    """A request body the test feeds piece by piece while the request stays open."""

    def __init__(self) -> None:
        self._parts: asyncio.Queue[bytes | None] = asyncio.Queue()

    def send(self, part: bytes) -> None:
        self._parts.put_nowait(part)

    def finish(self) -> None:
        self._parts.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (part := await self._parts.get()) is not None:
            yield part


# --- JSON: one event -------------------------------------------------------------------


async def test_json_object_with_string_data(broker: Broker, client: httpx.AsyncClient) -> None:
    async with subscribed(client, broker.url, "news") as events:
        response = await client.post(
            f"{broker.url}/publish", json={"topic": "news", "data": "hello world"}
        )
        assert response.status_code == 200
        assert response.headers["Content-Type"].split(";")[0] == "application/json"
        (received,) = await receive(events)
    assert set(response.json()) == {"id"}
    assert (received.id, received.event, received.data) == (
        response.json()["id"],
        "message",
        "hello world",
    )
    assert received.retry is None


async def test_json_object_data_is_serialised_once_with_orjson(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """Structured data arrives as its JSON text, not as a JSON string holding JSON."""
    payload = {"price": 12.5, "tags": ["a", "b"], "nested": {"ok": True, "none": None}, "n": "é"}
    async with subscribed(client, broker.url, "prices") as events:
        await publish(client, broker.url, "prices", payload)
        (received,) = await receive(events)
    assert received.data == orjson.dumps(payload).decode("utf-8")
    assert json.loads(received.data) == payload


@pytest.mark.parametrize(
    ("data", "wire_text"),
    [(42, "42"), (False, "false"), ([1, "two"], '[1,"two"]'), ("", ""), ("a\nb", "a\nb")],
)
async def test_json_data_of_every_kind(
    broker: Broker, client: httpx.AsyncClient, data: Any, wire_text: str
) -> None:
    async with subscribed(client, broker.url, "kinds") as events:
        await publish(client, broker.url, "kinds", data)
        (received,) = await receive(events)
    assert received.data == wire_text


async def test_json_event_type_and_retry_reach_the_client(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with subscribed(client, broker.url, "jobs") as events:
        event_id = await publish(
            client, broker.url, "jobs", "done", event="job.finished", retry=5000
        )
        (received,) = await receive(events)
    assert (received.id, received.event, received.data, received.retry) == (
        event_id,
        "job.finished",
        "done",
        5000,
    )


async def test_query_topic_is_the_default_for_an_event_without_topic(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with subscribed(client, broker.url, "defaults") as events:
        response = await client.post(
            f"{broker.url}/publish", params={"topic": "defaults"}, json={"data": "x"}
        )
        assert response.status_code == 200, response.text
        (received,) = await receive(events)
    assert received.id == response.json()["id"]


# --- JSON: batches and topics ------------------------------------------------------------


async def test_json_array_is_published_in_order_with_increasing_ids(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    batch = [
        {"topic": "batch/a", "data": "first"},
        {"topic": "batch/b", "data": {"second": 2}},
        {"topic": "batch/a", "data": "third", "event": "last"},
    ]
    async with subscribed(client, broker.url, "batch/**") as events:
        response = await client.post(f"{broker.url}/publish", json=batch)
        assert response.status_code == 200, response.text
        received = await receive(events, 3)
    body = response.json()
    assert set(body) == {"ids"}
    assert len(body["ids"]) == 3
    assert_strictly_increasing(body["ids"])
    assert [event.id for event in received] == body["ids"]
    assert [event.data for event in received] == ["first", '{"second":2}', "third"]
    assert [event.event for event in received] == ["message", "message", "last"]


async def test_a_one_element_array_still_answers_with_ids(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    response = await client.post(f"{broker.url}/publish", json=[{"topic": "t", "data": "d"}])
    assert response.status_code == 200
    assert set(response.json()) == {"ids"}
    assert len(response.json()["ids"]) == 1


async def test_a_batch_with_one_bad_event_publishes_nothing(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with subscribed(client, broker.url, "atomic") as events:
        response = await client.post(
            f"{broker.url}/publish",
            json=[{"topic": "atomic", "data": "ok"}, {"topic": "atomic"}],
        )
        body = error_body(response, 400, "invalid_event")
        assert body["detail"].startswith("event 1: ")
        marker = await publish_marker(client, broker.url, "atomic")
        (received,) = await receive(events)
    assert received.id == marker


async def test_ids_increase_across_requests(broker: Broker, client: httpx.AsyncClient) -> None:
    ids = [await publish(client, broker.url, "counter", str(n)) for n in range(20)]
    assert_strictly_increasing(ids)


async def test_event_with_two_topics_reaches_a_subscriber_of_both_once(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with (
        subscribed(client, broker.url, "left", "right") as both,
        subscribed(client, broker.url, "right") as right_only,
    ):
        event_id = await publish(client, broker.url, ["left", "right"], "shared")
        marker = await publish_marker(client, broker.url, "left")
        from_both = await receive(both, 2)
        (from_right,) = await receive(right_only)
    assert [event.id for event in from_both] == [event_id, marker]
    assert from_right.id == event_id


async def test_overlapping_patterns_deliver_once(broker: Broker, client: httpx.AsyncClient) -> None:
    async with subscribed(client, broker.url, "x/y", "x/*", "x/**") as events:
        event_id = await publish(client, broker.url, "x/y", "once")
        marker = await publish_marker(client, broker.url, "x/y")
        received = await receive(events, 2)
    assert [event.id for event in received] == [event_id, marker]


async def test_duplicate_topics_count_once_against_max_topics(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_topics=2)
    response = await client.post(
        f"{broker.url}/publish", json={"topic": ["a", "a", "b"], "data": "x"}
    )
    assert response.status_code == 200, response.text


async def test_publish_to_a_topic_nobody_follows_is_accepted_and_retained(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    first = await publish(client, broker.url, "quiet", "before")
    unheard = await publish(client, broker.url, "quiet", "nobody listening")
    assert broker.state.backend.history_size() == 2
    async with aconnect_sse(
        client, "GET", f"{broker.url}/events", params={"topic": "quiet", "lastEventID": first}
    ) as source:
        (replayed,) = await receive(events_of(source))
    assert (replayed.id, replayed.data) == (unheard, "nobody listening")


@pytest.mark.parametrize("topic", ["news/café/東京", "emoji/👩‍🚀", "a*b/ü ber", "ä"])
async def test_unicode_topics(broker: Broker, client: httpx.AsyncClient, topic: str) -> None:
    async with subscribed(client, broker.url, topic) as events:
        event_id = await publish(client, broker.url, topic, "ünïcödé ☃")
        (received,) = await receive(events)
    assert (received.id, received.data) == (event_id, "ünïcödé ☃")


async def test_unicode_topic_matches_a_pattern(broker: Broker, client: httpx.AsyncClient) -> None:
    async with subscribed(client, broker.url, "città/*") as events:
        event_id = await publish(client, broker.url, "città/日本", "x")
        (received,) = await receive(events)
    assert received.id == event_id


# --- form-urlencoded ----------------------------------------------------------------------


async def test_form_with_repeated_topic_type_and_retry(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with (
        subscribed(client, broker.url, "form/one") as one,
        subscribed(client, broker.url, "form/two") as two,
    ):
        response = await client.post(
            f"{broker.url}/publish",
            data={
                "topic": ["form/one", "form/two"],
                "data": "line 1\nline 2",
                "type": "update",
                "retry": "750",
            },
        )
        assert response.status_code == 200, response.text
        (from_one,) = await receive(one)
        (from_two,) = await receive(two)
    event_id = response.json()["id"]
    assert set(response.json()) == {"id"}
    for received in (from_one, from_two):
        assert (received.id, received.event, received.data, received.retry) == (
            event_id,
            "update",
            "line 1\nline 2",
            750,
        )


async def test_form_ignores_unknown_fields(broker: Broker, client: httpx.AsyncClient) -> None:
    """Mercure publishers send fields such as ``id``; they must not fail (``private`` is
    honoured: tests/test_auth.py)."""
    async with subscribed(client, broker.url, "form") as events:
        response = await client.post(
            f"{broker.url}/publish",
            data={"topic": "form", "data": "x", "id": "mine", "extra": "1"},
        )
        assert response.status_code == 200, response.text
        (received,) = await receive(events)
    assert (received.id, received.data) == (response.json()["id"], "x")


async def test_form_without_data_publishes_an_empty_string(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with subscribed(client, broker.url, "form") as events:
        response = await client.post(f"{broker.url}/publish", data={"topic": "form"})
        assert response.status_code == 200, response.text
        (received,) = await receive(events)
    assert (received.id, received.data) == (response.json()["id"], "")


async def test_form_with_charset_in_content_type(broker: Broker, client: httpx.AsyncClient) -> None:
    async with subscribed(client, broker.url, "form") as events:
        response = await client.post(
            f"{broker.url}/publish",
            content=b"topic=form&data=caf%C3%A9",
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        )
        assert response.status_code == 200, response.text
        (received,) = await receive(events)
    assert received.data == "café"


@pytest.mark.parametrize("retry", ["soon", "-5", "1.5", "", "١٢"])
async def test_form_with_bad_retry(broker: Broker, client: httpx.AsyncClient, retry: str) -> None:
    response = await client.post(
        f"{broker.url}/publish", data={"topic": "t", "data": "d", "retry": retry}
    )
    body = error_body(response, 400, "invalid_event")
    assert "retry" in body["detail"]


async def test_form_without_topic(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.post(f"{broker.url}/publish", data={"data": "d"})
    body = error_body(response, 400, "invalid_event")
    assert "topic" in body["detail"]


async def test_form_with_a_wildcard_topic(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.post(f"{broker.url}/publish", data={"topic": "a/*", "data": "d"})
    error_body(response, 400, "invalid_event")


# --- NDJSON streams -----------------------------------------------------------------------


async def test_ndjson_lines_are_fanned_out_while_the_request_is_still_open(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    body = ControlledBody()
    async with subscribed(client, broker.url, "llm") as events:
        request = asyncio.create_task(
            client.post(f"{broker.url}/publish", content=body, headers=NDJSON)
        )
        body.send(b'{"topic": "llm", "data": "one"}\n')
        (first,) = await receive(events)
        assert first.data == "one"
        assert not request.done(), "line 1 must arrive before the body ends"

        # A line split across two network writes is published whole, once complete.
        body.send(b'{"topic": "llm", "da')
        body.send(b'ta": "two"}\n')
        (second,) = await receive(events)
        assert second.data == "two"
        assert not request.done()

        body.send(b'{"topic": "llm", "data": "three"}\n')
        (third,) = await receive(events)
        body.finish()
        response = await asyncio.wait_for(request, RECEIVE_TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json() == {"ids": [first.id, second.id, third.id]}
    assert_strictly_increasing(response.json()["ids"])


async def test_ndjson_openai_chunks_are_published_verbatim_with_query_topic(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """An upstream chat-completion stream piped in as-is arrives line for line, unchanged."""
    lines = [
        '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
        '"model":"gpt-x","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}',
        '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
        '"model":"gpt-x","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}',
        '{"id": "chatcmpl-1", "object": "chat.completion.chunk",  "choices": '
        '[{"index": 0, "delta": {"content": "lo ☃"}, "finish_reason": null}]}',
        '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
        '"model":"gpt-x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        "[DONE]",
    ]
    stream = "".join(line + "\n" for line in lines).encode("utf-8")
    async with subscribed(client, broker.url, "chat/42") as events:
        response = await client.post(
            f"{broker.url}/publish", params={"topic": "chat/42"}, content=stream, headers=NDJSON
        )
        assert response.status_code == 200, response.text
        received = await receive(events, len(lines))
    assert [event.data for event in received] == lines
    assert [event.id for event in received] == response.json()["ids"]


async def test_ndjson_event_objects_and_verbatim_lines_mix(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    stream = (
        b'{"data": {"k": 1}, "event": "obj"}\n'
        b'{"not": "an event"}\n'
        b"plain text\n"
        b'"a json string"\n'
        b'{"topic": "mix/other", "data": "elsewhere"}\n'
    )
    async with subscribed(client, broker.url, "mix/**") as events:
        response = await client.post(
            f"{broker.url}/publish", params={"topic": "mix/main"}, content=stream, headers=NDJSON
        )
        assert response.status_code == 200, response.text
        received = await receive(events, 5)
    assert [(event.event, event.data) for event in received] == [
        ("obj", '{"k":1}'),
        ("message", '{"not": "an event"}'),
        ("message", "plain text"),
        ("message", '"a json string"'),
        ("message", "elsewhere"),
    ]


async def test_ndjson_blank_lines_are_skipped(broker: Broker, client: httpx.AsyncClient) -> None:
    stream = b'\n{"topic":"b","data":"1"}\n\n   \n\t\n{"topic":"b","data":"2"}\n\n'
    async with subscribed(client, broker.url, "b") as events:
        response = await client.post(f"{broker.url}/publish", content=stream, headers=NDJSON)
        assert response.status_code == 200, response.text
        received = await receive(events, 2)
    assert len(response.json()["ids"]) == 2
    assert [event.data for event in received] == ["1", "2"]


async def test_ndjson_crlf_line_endings(broker: Broker, client: httpx.AsyncClient) -> None:
    stream = b'{"topic":"crlf","data":"object"}\r\nverbatim line\r\n\r\n[DONE]\r\n'
    async with subscribed(client, broker.url, "crlf") as events:
        response = await client.post(
            f"{broker.url}/publish", params={"topic": "crlf"}, content=stream, headers=NDJSON
        )
        assert response.status_code == 200, response.text
        received = await receive(events, 3)
    assert [event.data for event in received] == ["object", "verbatim line", "[DONE]"]


async def test_ndjson_final_line_without_newline(broker: Broker, client: httpx.AsyncClient) -> None:
    stream = b'{"topic":"tail","data":"1"}\n{"topic":"tail","data":"last"}'
    async with subscribed(client, broker.url, "tail") as events:
        response = await client.post(
            f"{broker.url}/publish", content=chunked(stream[:10], stream[10:]), headers=NDJSON
        )
        assert response.status_code == 200, response.text
        received = await receive(events, 2)
    assert [event.data for event in received] == ["1", "last"]
    assert response.json()["ids"] == [event.id for event in received]


@pytest.mark.parametrize(
    "content_type", ["application/jsonl", "application/x-ndjson; charset=utf-8"]
)
async def test_ndjson_content_type_variants(
    broker: Broker, client: httpx.AsyncClient, content_type: str
) -> None:
    response = await client.post(
        f"{broker.url}/publish",
        content=b'{"topic":"v","data":"1"}\n',
        headers={"Content-Type": content_type},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["ids"]) == 1


async def test_ndjson_stream_may_exceed_max_body_bytes_in_total(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """For a stream, --max-body-bytes bounds each line, not the whole body."""
    broker = await make_broker(max_body_bytes=256)
    lines = [b'{"topic":"long","data":"%03d"}\n' % n for n in range(100)]
    response = await client.post(f"{broker.url}/publish", content=b"".join(lines), headers=NDJSON)
    assert response.status_code == 200, response.text
    assert len(response.json()["ids"]) == 100


async def test_ndjson_bad_line_mid_stream_keeps_earlier_events(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    stream = (
        b'{"topic":"nd","data":"1"}\n'
        b"\n"
        b'{"topic":"nd","data":"2"}\n'
        b"{not json\n"
        b'{"topic":"nd","data":"never"}\n'
    )
    async with subscribed(client, broker.url, "nd") as events:
        response = await client.post(f"{broker.url}/publish", content=stream, headers=NDJSON)
        body = error_body(response, 400, "invalid_event", extra=frozenset({"ids"}))
        delivered = await receive(events, 2)
        marker = await publish_marker(client, broker.url, "nd")
        (after,) = await receive(events)
    assert body["detail"].startswith("line 4: "), body["detail"]
    assert "2 event(s) before it were published" in body["detail"]
    assert body["ids"] == [event.id for event in delivered]
    assert [event.data for event in delivered] == ["1", "2"]
    assert after.id == marker, "nothing after the bad line may be published"


@pytest.mark.parametrize(
    ("line", "detail_part"),
    [
        (b'{"topic":"nd"}', "event object with 'data'"),
        (b'{"data":"no topic"}', "'topic' is required"),
        (b'["an", "array"]', "event object"),
        (b'{"topic":"nd","data":"x","extra":1}', "unknown field"),
        (b'{"topic":"nd/*","data":"x"}', "wildcard"),
    ],
)
async def test_ndjson_bad_line_without_query_topic(
    broker: Broker, client: httpx.AsyncClient, line: bytes, detail_part: str
) -> None:
    stream = b'{"topic":"nd","data":"ok"}\n' + line + b"\n"
    response = await client.post(f"{broker.url}/publish", content=stream, headers=NDJSON)
    body = error_body(response, 400, "invalid_event", extra=frozenset({"ids"}))
    assert body["detail"].startswith("line 2: ")
    assert detail_part in body["detail"]
    assert len(body["ids"]) == 1


async def test_ndjson_invalid_utf8_verbatim_line(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.post(
        f"{broker.url}/publish", params={"topic": "t"}, content=b"\xff\xfe bad\n", headers=NDJSON
    )
    body = error_body(response, 400, "invalid_event", extra=frozenset({"ids"}))
    assert body["detail"].startswith("line 1: ")
    assert body["ids"] == []


async def test_ndjson_line_too_long(make_broker: BrokerFactory, client: httpx.AsyncClient) -> None:
    broker = await make_broker(max_body_bytes=128)
    long_line = b'{"topic":"nd","data":"' + b"x" * 300 + b'"}'
    stream = b'{"topic":"nd","data":"short"}\n' + long_line + b'\n{"topic":"nd","data":"z"}\n'
    async with subscribed(client, broker.url, "nd") as events:
        response = await client.post(f"{broker.url}/publish", content=stream, headers=NDJSON)
        body = error_body(response, 413, "payload_too_large", extra=frozenset({"ids"}))
        (delivered,) = await receive(events)
    assert body["detail"].startswith("line 2: ")
    assert body["ids"] == [delivered.id]
    assert delivered.data == "short"


async def test_ndjson_line_that_never_ends_is_refused(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """A line with no newline is not buffered past the limit while the body keeps coming."""
    broker = await make_broker(max_body_bytes=128)
    endless = chunked(b'{"topic":"nd","data":"ok"}\n', *[b"y" * 1024 for _ in range(64)])
    response = await client.post(f"{broker.url}/publish", content=endless, headers=NDJSON)
    body = error_body(response, 413, "payload_too_large", extra=frozenset({"ids"}))
    assert body["detail"].startswith("line 2: ")
    assert len(body["ids"]) == 1


async def test_ndjson_event_over_max_event_bytes(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_event_bytes=256)
    stream = b'{"topic":"nd","data":"' + b"x" * 400 + b'"}\n'
    response = await client.post(f"{broker.url}/publish", content=stream, headers=NDJSON)
    body = error_body(response, 413, "payload_too_large", extra=frozenset({"ids"}))
    assert body["detail"].startswith("line 1: ")
    assert body["ids"] == []


@pytest.mark.parametrize("stream", [b"", b"\n", b"\n \r\n\t\n"])
async def test_ndjson_stream_with_no_events(
    broker: Broker, client: httpx.AsyncClient, stream: bytes
) -> None:
    response = await client.post(f"{broker.url}/publish", content=stream, headers=NDJSON)
    error_body(response, 400, "invalid_body")


# --- JSON validation errors --------------------------------------------------------------

LONG_TOPIC = "t" * 1025

JSON_ERRORS: list[tuple[str, bytes, int, str, str]] = [
    ("bad json", b'{"topic": "t", "data": ', 400, "invalid_body", "not valid JSON"),
    ("empty body", b"", 400, "invalid_body", "empty"),
    ("whitespace body", b"  \n ", 400, "invalid_body", "empty"),
    ("string body", b'"just a string"', 400, "invalid_body", "event object"),
    ("number body", b"42", 400, "invalid_body", "event object"),
    ("null body", b"null", 400, "invalid_body", "event object"),
    ("empty array", b"[]", 400, "invalid_body", "no events"),
    ("array of non-objects", b'[{"topic":"t","data":"d"}, 5]', 400, "invalid_event", "event 1"),
    ("missing topic", b'{"data": "d"}', 400, "invalid_event", "'topic' is required"),
    ("null topic", b'{"topic": null, "data": "d"}', 400, "invalid_event", "'topic' is required"),
    ("empty topic", b'{"topic": "", "data": "d"}', 400, "invalid_event", "empty"),
    ("empty topic list", b'{"topic": [], "data": "d"}', 400, "invalid_event", "at least one"),
    (
        "over-long topic",
        b'{"topic": "%s", "data": "d"}' % LONG_TOPIC.encode(),
        400,
        "invalid_event",
        "longer than 1024",
    ),
    ("topic with newline", b'{"topic": "a\\nb", "data": "d"}', 400, "invalid_event", "control"),
    ("topic with nul", b'{"topic": "a\\u0000b", "data": "d"}', 400, "invalid_event", "control"),
    ("topic with del", b'{"topic": "a\\u007fb", "data": "d"}', 400, "invalid_event", "control"),
    ("star segment", b'{"topic": "a/*/b", "data": "d"}', 400, "invalid_event", "wildcard"),
    ("double star", b'{"topic": "a/**", "data": "d"}', 400, "invalid_event", "wildcard"),
    ("star in list", b'{"topic": ["ok", "*"], "data": "d"}', 400, "invalid_event", "wildcard"),
    ("topic number", b'{"topic": 5, "data": "d"}', 400, "invalid_event", "string"),
    ("topic object", b'{"topic": {"a": 1}, "data": "d"}', 400, "invalid_event", "string"),
    ("topic list of numbers", b'{"topic": [1], "data": "d"}', 400, "invalid_event", "string"),
    ("missing data", b'{"topic": "t"}', 400, "invalid_event", "'data' is required"),
    ("null data", b'{"topic": "t", "data": null}', 400, "invalid_event", "'data' is required"),
    ("event number", b'{"topic": "t", "data": "d", "event": 5}', 400, "invalid_event", "event"),
    ("event empty", b'{"topic": "t", "data": "d", "event": ""}', 400, "invalid_event", "event"),
    (
        "event with newline",
        b'{"topic": "t", "data": "d", "event": "a\\nb"}',
        400,
        "invalid_event",
        "CR, LF or NUL",
    ),
    (
        "event with carriage return",
        b'{"topic": "t", "data": "d", "event": "a\\rdata: injected"}',
        400,
        "invalid_event",
        "CR, LF or NUL",
    ),
    (
        "reserved event type",
        b'{"topic": "t", "data": "d", "event": "broker.dropped"}',
        400,
        "invalid_event",
        "reserved",
    ),
    ("bool retry", b'{"topic": "t", "data": "d", "retry": true}', 400, "invalid_event", "retry"),
    ("negative retry", b'{"topic": "t", "data": "d", "retry": -1}', 400, "invalid_event", "retry"),
    ("string retry", b'{"topic": "t", "data": "d", "retry": "5"}', 400, "invalid_event", "retry"),
    ("float retry", b'{"topic": "t", "data": "d", "retry": 1.5}', 400, "invalid_event", "retry"),
    (
        "retry too large",
        b'{"topic": "t", "data": "d", "retry": 2147483648}',
        400,
        "invalid_event",
        "retry",
    ),
    (
        "unknown field",
        b'{"topic": "t", "data": "d", "id": "mine"}',
        400,
        "invalid_event",
        "unknown field(s) 'id'",
    ),
    (
        "lone surrogate in data",
        b'{"topic": "t", "data": "\\ud800"}',
        400,
        "invalid_body",
        "not valid JSON",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "detail_part"),
    [case[1:] for case in JSON_ERRORS],
    ids=[case[0] for case in JSON_ERRORS],
)
async def test_json_error(
    broker: Broker,
    client: httpx.AsyncClient,
    body: bytes,
    status: int,
    code: str,
    detail_part: str,
) -> None:
    response = await client.post(
        f"{broker.url}/publish", content=body, headers={"Content-Type": "application/json"}
    )
    error = error_body(response, status, code)
    assert detail_part in error["detail"], error["detail"]
    assert broker.state.backend.history_size() == 0


async def test_too_many_topics(make_broker: BrokerFactory, client: httpx.AsyncClient) -> None:
    broker = await make_broker(max_topics=2)
    response = await client.post(
        f"{broker.url}/publish", json={"topic": ["a", "b", "c"], "data": "d"}
    )
    error = error_body(response, 400, "invalid_event")
    assert "at most 2 topics" in error["detail"]


async def test_too_many_query_topics(make_broker: BrokerFactory, client: httpx.AsyncClient) -> None:
    broker = await make_broker(max_topics=2)
    response = await client.post(
        f"{broker.url}/publish",
        params=[("topic", "a"), ("topic", "b"), ("topic", "c")],
        json={"data": "d"},
    )
    error_body(response, 400, "invalid_event")


async def test_bad_query_topic(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.post(
        f"{broker.url}/publish", params={"topic": "a/*"}, json={"data": "d"}
    )
    error = error_body(response, 400, "invalid_event")
    assert error["detail"].startswith("query: ")


async def test_event_over_max_event_bytes(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_event_bytes=1024)
    response = await client.post(f"{broker.url}/publish", json={"topic": "t", "data": "x" * 2000})
    error = error_body(response, 413, "payload_too_large")
    assert "1024" in error["detail"]
    fits = await client.post(f"{broker.url}/publish", json={"topic": "t", "data": "x" * 500})
    assert fits.status_code == 200


async def test_over_size_body_with_content_length(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_body_bytes=1024)
    body = orjson.dumps({"topic": "t", "data": "x" * 4000})
    response = await client.post(
        f"{broker.url}/publish", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.request.headers["Content-Length"] == str(len(body))
    error = error_body(response, 413, "payload_too_large")
    assert "1024" in error["detail"]


async def test_over_size_body_without_content_length(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(max_body_bytes=1024)
    body = orjson.dumps({"topic": "t", "data": "x" * 8000})
    pieces = [body[start : start + 512] for start in range(0, len(body), 512)]
    response = await client.post(
        f"{broker.url}/publish",
        content=chunked(*pieces),
        headers={"Content-Type": "application/json"},
    )
    assert "Content-Length" not in response.request.headers
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    error = error_body(response, 413, "payload_too_large")
    assert "1024" in error["detail"]


async def test_over_size_form_body(make_broker: BrokerFactory, client: httpx.AsyncClient) -> None:
    broker = await make_broker(max_body_bytes=1024)
    response = await client.post(f"{broker.url}/publish", data={"topic": "t", "data": "x" * 4000})
    error_body(response, 413, "payload_too_large")


async def test_chunked_json_body_within_the_limit_is_accepted(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    body = orjson.dumps({"topic": "t", "data": "chunked"})
    response = await client.post(
        f"{broker.url}/publish",
        content=chunked(body[:7], body[7:]),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data"])
async def test_unknown_content_type(
    broker: Broker, client: httpx.AsyncClient, content_type: str
) -> None:
    response = await client.post(
        f"{broker.url}/publish",
        content=b'{"topic": "t", "data": "d"}',
        headers={"Content-Type": content_type},
    )
    error = error_body(response, 415, "unsupported_media_type")
    assert "application/json" in error["detail"]


async def test_missing_content_type(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.post(f"{broker.url}/publish", content=b'{"topic": "t", "data": "d"}')
    assert "Content-Type" not in response.request.headers
    error_body(response, 415, "unsupported_media_type")


async def test_json_with_charset_parameter_is_accepted(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        f"{broker.url}/publish",
        content=b'{"topic": "t", "data": "d"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200, response.text


# --- body deadline -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"topic": "slow", "data": "never whole"}'),
        ("application/x-www-form-urlencoded", b"topic=slow&data=never+whole"),
    ],
)
async def test_a_body_slower_than_body_timeout_is_answered_408(
    make_broker: BrokerFactory, content_type: str, body: bytes
) -> None:
    """The head promises a body and half of it comes: a raw socket, since an HTTP library
    would not send the head without the whole body."""
    broker = await make_broker(body_timeout=0.5)
    async with connected(broker) as connection:
        await connection.send(
            b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (content_type.encode(), len(body), body[: len(body) // 2])
        )
        error = assert_error(await connection.answer(), 408, "request_timeout")
    assert "0.5 s" in error["detail"]
    assert broker.state.stats.published == 0


async def ndjson_head(connection: Connection) -> None:
    await connection.send(
        b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )


async def test_an_ndjson_stream_that_stalls_is_answered_408_with_the_ids_published(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(body_timeout=0.5)
    lines = b'{"topic": "stall", "data": "1"}\n{"topic": "stall", "data": "2"}\n'
    async with subscribed(client, broker.url, "stall") as events, connected(broker) as connection:
        await ndjson_head(connection)
        await connection.send(b"%x\r\n%s\r\n" % (len(lines), lines))
        answer = await connection.answer()
        delivered = await receive(events, 2)
    assert answer.status == 408, answer.body
    body = answer.json()
    assert set(body) == {"error", "detail", "ids"}, body
    assert body["error"] == "request_timeout"
    assert body["detail"].startswith("line 3: "), body["detail"]
    assert "2 event(s) before it were published" in body["detail"]
    assert body["ids"] == [event.id for event in delivered]
    assert [event.data for event in delivered] == ["1", "2"]


async def test_an_ndjson_stream_that_stalls_before_any_line_is_answered_408(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(body_timeout=0.5)
    async with connected(broker) as connection:
        await ndjson_head(connection)
        answer = await connection.answer()
    assert answer.status == 408, answer.body
    assert answer.json()["ids"] == []
    assert answer.json()["detail"].startswith("line 1: ")


async def test_an_ndjson_stream_longer_than_body_timeout_with_shorter_pauses_is_published(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """The deadline is for each wait, not for the stream: it may last as long as it keeps
    sending."""
    broker = await make_broker(body_timeout=1)

    async def lines() -> AsyncIterator[bytes]:
        for number in range(8):
            yield orjson.dumps({"topic": "paced", "data": str(number)}) + b"\n"
            await asyncio.sleep(0.2)

    async with subscribed(client, broker.url, "paced") as events:
        response = await client.post(f"{broker.url}/publish", content=lines(), headers=NDJSON)
        assert response.status_code == 200, response.text
        delivered = await receive(events, 8)
    assert response.json() == {"ids": [event.id for event in delivered]}
    assert [event.data for event in delivered] == [str(number) for number in range(8)]


@pytest.mark.parametrize(
    ("content_type", "extra"),
    [
        ("application/json", frozenset()),
        ("application/x-www-form-urlencoded", frozenset()),
        ("application/x-ndjson", frozenset({"ids"})),
    ],
)
async def test_a_body_that_does_not_match_its_content_encoding_is_a_400(
    broker: Broker,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    content_type: str,
    extra: frozenset[str],
) -> None:
    """aiohttp fails to decode it inside the handler's read: the client's error, not ours."""
    response = await client.post(
        f"{broker.url}/publish",
        content=b'{"topic": "t", "data": "not gzip"}',
        headers={"Content-Type": content_type, "Content-Encoding": "gzip"},
    )
    error = error_body(response, 400, "invalid_body", extra=extra)
    assert "gzip" in error["detail"]
    assert broker.state.stats.published == 0
    # aiohttp meets the error again when it drains the body, then drops the connection.
    await wait_for(lambda: not broker.server.handler.connections)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


async def test_a_form_in_an_unknown_charset_is_415(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        f"{broker.url}/publish",
        content=b"topic=t&data=x",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=bogus"},
    )
    assert response.status_code == 415, response.text
    assert response.json()["error"] == "unsupported_media_type"
    assert broker.state.stats.published == 0


@pytest.mark.parametrize(
    "topic",
    [
        "/.well-known/mercure/subscriptions/Exact/a/b",
        "https://any.example/.well-known/mercure/subscriptions/Exact/a/b",
        "mercure/subscriptions/Exact/a/b",  # relative: resolves under the hub's path
        "/x/../.well-known/mercure/x",
    ],
)
async def test_the_mercure_namespace_is_refused_here_too(
    broker: Broker, client: httpx.AsyncClient, topic: str
) -> None:
    """Only the hub publishes subscription events; through this API a publisher could
    forge them for Mercure subscribers as well as through Mercure's own."""
    response = await client.post(f"{broker.url}/publish", json={"topic": topic, "data": "x"})
    error_body(response, 400, "invalid_event")


async def test_topics_only_mercure_refuses_are_fine_here(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    """Mercure refuses every topic resolving to its hub's own URL (``#general`` does);
    our API refuses only what lies under it, where subscription events live."""
    for topic in ("#general", "?", "mercure", "/.well-known/mercure"):
        response = await client.post(f"{broker.url}/publish", json={"topic": topic, "data": "x"})
        assert response.status_code == 200, response.text

"""Wire encoding, checked against httpx-sse's decoder: a WHATWG parser we did not write."""

from __future__ import annotations

import re

import pytest
from httpx_sse._decoders import SSEDecoder
from hypothesis import given
from hypothesis import strategies as st

from broker import sse


def decode(frame: bytes) -> list[tuple[str, str, str]]:
    """Feed bytes to an independent SSE parser; return (event, data, id) per dispatched event.

    The decoder takes lines already split. We split on CR, LF and CRLF only, as the
    standard does; ``str.splitlines`` (which httpx's line reader follows) would also
    split on U+001E, U+0085 or U+2028, which are ordinary characters in SSE data.
    """
    decoder = SSEDecoder()
    found = []
    *lines, incomplete = re.split(r"\r\n|\r|\n", frame.decode("utf-8"))
    assert incomplete == "", "a frame must end with a line break"
    for line in lines:
        event = decoder.decode(line)
        if event is not None:
            found.append((event.event, event.data, event.id))
    return found


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        ("one", [b"data: one"]),
        ("a\nb", [b"data: a", b"data: b"]),
        ("a\rb", [b"data: a", b"data: b"]),
        ("a\r\nb", [b"data: a", b"data: b"]),
        ("a\n\nb", [b"data: a", b"data: ", b"data: b"]),
        ("trailing\n", [b"data: trailing", b"data: "]),
        ("", [b"data: "]),
        (" lead", [b"data:  lead"]),
    ],
)
def test_data_is_split_on_every_line_ending(data: str, lines: list[bytes]) -> None:
    body = sse.encode_body(data)
    assert body == b"\n".join(lines) + b"\n\n"
    assert decode(body) == [("message", data.replace("\r\n", "\n").replace("\r", "\n"), "")]


def test_event_id_and_retry_fields() -> None:
    frame = sse.encode_event(sse.encode_body("x", "update", 1500), "7-0")
    assert frame == b"id: 7-0\nevent: update\nretry: 1500\ndata: x\n\n"
    assert decode(frame) == [("update", "x", "7-0")]


def test_unicode_is_utf8() -> None:
    text = "naïve ☃ 日本語 👩‍👩‍👧 e\u0301 \u2028 \x85 \x1e"
    frame = sse.encode_event(sse.encode_body(text), "1-0")
    assert text.encode("utf-8") in frame
    assert decode(frame) == [("message", text, "1-0")]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\0b"])
def test_id_and_event_refuse_line_breaks_and_nul(bad: str) -> None:
    with pytest.raises(sse.EncodingError):
        sse.encode_event(b"data: x\n\n", bad)
    with pytest.raises(sse.EncodingError):
        sse.encode_body("x", event=bad)


def test_retry_must_not_be_negative() -> None:
    with pytest.raises(sse.EncodingError):
        sse.encode_body("x", retry=-1)
    with pytest.raises(sse.EncodingError):
        sse.encode_retry(-1)
    assert sse.encode_retry(2000) == b"retry: 2000\n\n"


def test_comments_dispatch_nothing() -> None:
    assert sse.encode_comment() == b":\n\n"
    assert sse.encode_comment("two\nlines") == b": two\n: lines\n\n"
    assert decode(sse.encode_comment("hello")) == []


def test_chunk_wrapping_follows_http11_framing() -> None:
    assert sse.as_chunk(b"data: x\n\n") == b"9\r\ndata: x\n\n\r\n"
    assert sse.as_chunk(b"a" * 255).startswith(b"ff\r\n")


@given(
    data=st.text(),
    event=st.none() | st.text(min_size=1).filter(lambda t: not set(t) & {"\r", "\n", "\0"}),
)
def test_any_text_round_trips_through_an_independent_parser(data: str, event: str | None) -> None:
    body = sse.encode_body(data.replace("\x00", ""), event)
    expected = data.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    assert decode(sse.encode_event(body, "1-0")) == [(event or "message", expected, "1-0")]

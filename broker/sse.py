"""Server-Sent Events wire encoding, exactly as the WHATWG HTML standard parses it.

An event is turned into bytes once, when it is published; subscribers only ever receive
those bytes. Two forms are kept: the plain frame (for HTTP/1.0 peers) and the same frame
wrapped as one HTTP/1.1 chunk, which is what almost every connection writes, so that
even the chunk header is computed once per event rather than once per subscriber.
"""

from __future__ import annotations

_LINE_BREAKS = ("\r\n", "\r", "\n")
_FORBIDDEN_IN_FIELD = ("\r", "\n", "\0")


class EncodingError(ValueError):
    """A value that cannot be put on the wire without changing its meaning."""


def check_field(name: str, value: str) -> None:
    """Refuse CR, LF and NUL in ``id`` and ``event``.

    A line break would end the field early (and let the rest be read as other fields);
    the standard tells clients to ignore an ``id`` containing NUL.
    """
    for char in _FORBIDDEN_IN_FIELD:
        if char in value:
            raise EncodingError(f"{name} must not contain CR, LF or NUL")


def split_lines(data: str) -> list[str]:
    """Split on CRLF, CR and LF, the three line endings an SSE parser recognises."""
    if "\r" in data:
        data = data.replace("\r\n", "\n").replace("\r", "\n")
    return data.split("\n")


def encode_body(data: str, event: str | None = None, retry: int | None = None) -> bytes:
    """Encode every field except ``id``; the id is only known once the log accepts the event.

    Each line of ``data`` gets its own ``data:`` field, so a client rebuilds the string
    exactly, including empty lines and a trailing line break.
    """
    parts: list[str] = []
    if event is not None:
        check_field("event", event)
        parts.append(f"event: {event}\n")
    if retry is not None:
        if retry < 0:
            raise EncodingError("retry must be a non-negative integer")
        parts.append(f"retry: {retry}\n")
    if "\n" in data or "\r" in data:
        parts.extend(f"data: {line}\n" for line in split_lines(data))
    else:
        parts.append(f"data: {data}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_event(body: bytes, event_id: str | None) -> bytes:
    """Put the ``id:`` field in front of an encoded body; ``None`` leaves the client's id alone."""
    if event_id is None:
        return body
    check_field("id", event_id)
    return b"id: " + event_id.encode("utf-8") + b"\n" + body


def encode_comment(text: str = "") -> bytes:
    """A comment line per line of ``text``; clients ignore it, proxies see traffic."""
    return (
        "".join(f":{(' ' + line) if line else ''}\n" for line in split_lines(text)).encode("utf-8")
        + b"\n"
    )


def encode_retry(milliseconds: int) -> bytes:
    """A lone ``retry:`` field, which sets the client's reconnection delay."""
    if milliseconds < 0:
        raise EncodingError("retry must be a non-negative integer")
    return b"retry: %d\n\n" % milliseconds


def as_chunk(frame: bytes) -> bytes:
    """Wrap bytes as one HTTP/1.1 chunk (RFC 9112, section 7.1)."""
    return b"%x\r\n%b\r\n" % (len(frame), frame)

"""Fuzzing the HTTP API: whatever a client sends, the broker answers as documented.

Three kinds of generated traffic, at least 10,000 requests per run:

* schemathesis derives requests from broker/openapi.yaml and checks each answer against
  the document: the status is documented, body and headers are as described, never a 5xx;
* hypothesis writes raw HTTP/1.x requests byte by byte (random bodies, wrong types, huge
  and non-ASCII topics, broken UTF-8, odd content types, headers and tokens), since a
  client library refuses or repairs much of what an attacker can send. Every answer is
  below 500 and every error is the JSON error shape;
* publishes with random topics, privacy and tokens, to our API and to the Mercure hub,
  watched on both by subscribers with different matchers and grants: none may receive
  an event it is not entitled to, nor miss one it is.

They run against real broker processes, so the server as deployed is what is fuzzed
(``broker.web.server``'s protocol as well as the application), and the broker's own log
must stay free of errors: a stream that fails after its head is out has no status left
to show it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import operator
import queue
import random
import re
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from urlpattern import URLPattern

from tests.conftest import JWT_KEY, BrokerProcess, free_port, mint, wait_until_healthy

OPENAPI = Path(__file__).parents[1] / "broker" / "openapi.yaml"
DEMO_PAGE = (Path(__file__).parents[1] / "broker" / "demo.html").read_bytes()
DEADLINE = 10.0  # seconds; only so that a broker that stops answering fails the test
ALLOWED_ORIGIN = "https://app.example"
# Small limits, so that generated bodies reach them without being slow to generate.
MAX_BODY = 16 * 1024
FUZZ_FLAGS = (
    *("--jwt-key", JWT_KEY),
    *("--cors-origin", ALLOWED_ORIGIN),
    *("--trusted-proxy", "127.0.0.0/8"),
    *("--max-connections-per-ip", "1000"),
    *("--publish-rate", "100000"),
    *("--max-body-bytes", str(MAX_BODY)),
    *("--max-event-bytes", "8KiB"),
    *("--history-size", "2000"),
    *("--log-level", "warning"),
    "--mercure-subscriptions",
)
# No "explain" phase: on a failure it replays variations for a long while, and the
# assertion messages already show the request that failed.
FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)

# Requests sent, per test: the module's last test checks the total.
SENT: collections.Counter[str] = collections.Counter()
# (status, error code) of every raw answer that was an error: what the broker said back.
ERRORS: collections.Counter[tuple[int, str]] = collections.Counter()
MINIMUM_TOTAL = 10_000
PUBLISH_EXAMPLES = 600
EVENTS_EXAMPLES = 500
MERCURE_EXAMPLES = 250
# Operations that answer with an endless stream, fuzzed by the raw tests instead.
STREAMS = {("get", "/events"), ("get", "/.well-known/mercure")}
ENTITLEMENT_EXAMPLES = 400


@dataclasses.dataclass
class Target:
    """A broker process whose log goes to a file, so that it never blocks on a full pipe
    and every error it logs can be checked."""

    handle: BrokerProcess
    log: Path

    @property
    def url(self) -> str:
        return self.handle.url

    @property
    def port(self) -> int:
        return self.handle.port

    def errors(self) -> list[str]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if " ERROR " in line or " CRITICAL " in line]

    def assert_healthy(self) -> None:
        assert self.handle.process.poll() is None, "the broker exited"
        assert httpx.get(f"{self.url}/healthz", timeout=DEADLINE).status_code == 200
        errors = self.errors()
        assert not errors, "the broker logged errors:\n" + self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One broker for the schemathesis and raw fuzzing tests: state that builds up across
    them (history, rate buckets, idempotency keys) is part of what gets fuzzed."""
    log = tmp_path_factory.mktemp("fuzz") / "broker.log"
    port = free_port()
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--port", str(port), *FUZZ_FLAGS],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    handle = BrokerProcess(process, f"http://127.0.0.1:{port}", port)
    try:
        wait_until_healthy(handle)
        yield Target(handle, log)
    finally:
        handle.stop()


# --- schemathesis: the document against the broker ---------------------------------------

SCHEMA = schemathesis.openapi.from_path(OPENAPI)
SCHEMA_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@schemathesis.serializer("application/x-ndjson", "application/jsonl", "application/jsonlines")
def _ndjson(context: schemathesis.SerializationContext, value: Any) -> bytes:
    """The document describes an NDJSON body as the array of its lines, as OpenAPI 3.2
    reads sequential media types; anything else generated for it is sent as one line."""
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


# Streams never end, so GET /events is fuzzed below with a client that stops reading.
# The checks are the ones every answer must pass. "Valid data is accepted" and "invalid
# data is refused" are left out: validity depends on what the document cannot tie
# together (``?topic=`` makes an event's ``topic`` optional and lets any NDJSON line
# through), so they would flag correct answers.
@(
    SCHEMA.exclude(method="GET", path="/events")
    .exclude(method="GET", path="/.well-known/mercure")
    .parametrize()
)
@settings(FUZZ_SETTINGS, max_examples=150)
def test_schemathesis(case: schemathesis.Case[Any], target: Target) -> None:
    SENT["schemathesis"] += 1
    case.call_and_validate(base_url=target.url, checks=SCHEMA_CHECKS, timeout=DEADLINE)


# --- raw requests ------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def http_request(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None,
    version: bytes = b"HTTP/1.1",
    *,
    host: bytes = b"127.0.0.1",
) -> bytes:
    """A request with the framing done right (Host, Content-Length, Connection: close) and
    everything else as given, however wrong."""
    lines = [b"%s %s %s" % (method, target, version), b"Host: " + host]
    lines += [name + b": " + value for name, value in headers]
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def exchange(port: int, request: bytes, *, counter: str) -> Answer:
    """Send one request on a new connection and read the answer to its end, or, for an
    event stream, up to its opening comment; then hang up."""
    SENT[counter] += 1
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        # A broker that answers before reading everything may reset the rest of the send;
        # its answer is still read below.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise AssertionError(f"no answer in {DEADLINE} s to {request[:300]!r}") from None
            if not chunk:
                break
            raw += chunk
            answer = parse_answer(raw)
            if answer is not None and is_stream(answer) and b": ok\n" in answer.body:
                return answer
    answer = parse_answer(raw)
    assert answer is not None, f"no answer to {request[:300]!r}; got {raw[:300]!r}"
    if answer.headers.get("transfer-encoding", "").lower() == "chunked":
        answer.body = dechunk(answer.body)
    return answer


def parse_answer(raw: bytes) -> Answer | None:
    """The final answer's status, headers and the body bytes so far; None before its head."""
    while True:
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            return None
        status_line, *lines = raw[:end].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        raw = raw[end + 4 :]
        if status >= 200:
            break  # a 1xx (100 Continue) is followed by the real answer
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(status, headers, raw)


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return out


def is_stream(answer: Answer) -> bool:
    return answer.status == 200 and answer.headers.get("content-type", "").startswith(
        "text/event-stream"
    )


def check_answer(request: bytes, answer: Answer) -> None:
    """What every answer must be, whatever was asked."""
    shown = f"request {request[:500]!r} got {answer.status} {answer.body[:500]!r}"
    assert 200 <= answer.status < 500, shown
    if answer.status < 300:
        return
    assert answer.headers.get("content-type", "").startswith("application/json"), shown
    try:
        body = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise AssertionError(f"not JSON: {shown}") from None
    assert isinstance(body, dict), shown
    assert isinstance(body.get("error"), str), shown
    assert isinstance(body.get("detail"), str), shown
    ERRORS[answer.status, body["error"]] += 1


# Building blocks. Topics come from a few segments, so that generated topics and patterns
# meet, plus whatever text hypothesis likes, and lengths around the 1024 limit.
SEGMENTS = st.sampled_from(["a", "b", "x", "*", "**", "", "é", "😀", "a*b", " ", "%", ".."])
TOPICS = st.one_of(
    st.lists(SEGMENTS, min_size=1, max_size=4).map("/".join),
    st.text(max_size=30),
    st.integers(1020, 1030).map(lambda length: "t" * length),
    st.sampled_from(["\x00", "a\nb", "\u2028", "\ud800", "a/\udfff"]),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**31 - 1, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.floats(),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
KEYS = st.one_of(
    st.text(PRINTABLE, min_size=1, max_size=8),
    st.integers(250, 260).map(lambda length: "k" * length),
    st.text(max_size=8),
)


def event_objects() -> st.SearchStrategy[dict[str, Any]]:
    fields = st.fixed_dictionaries(
        {},
        optional={
            "topic": st.one_of(TOPICS, st.lists(TOPICS, max_size=4), JSON_VALUES),
            "data": st.one_of(
                st.text(max_size=30),
                JSON_VALUES,
                st.integers(8100, 8300).map(lambda length: "d" * length),
            ),
            "event": st.one_of(
                st.text(max_size=12),
                st.sampled_from(["broker.missed", "a\rb", "", "e" * 257]),
                JSON_VALUES,
            ),
            "retry": st.one_of(st.integers(-2, 2**31 + 2), JSON_VALUES),
            "private": st.one_of(st.booleans(), JSON_VALUES),
            "key": st.one_of(KEYS, JSON_VALUES),
        },
    )
    unknown = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=1)
    return st.builds(lambda extra, known: {**extra, **known}, unknown, fields)


def dump(value: object, ascii_only: bool) -> bytes:
    """JSON as a careless client writes it: NaN allowed, lone surrogates escaped or raw."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def corrupt(data: bytes, position: int, junk: bytes) -> bytes:
    position %= len(data) + 1
    return data[:position] + junk + data[position:]


JSON_DOCUMENTS = st.one_of(
    event_objects(),
    st.lists(event_objects(), max_size=4),
    JSON_VALUES,
)
JSON_BODIES = st.builds(dump, JSON_DOCUMENTS, st.booleans())
NDJSON_LINES = st.one_of(
    JSON_BODIES,
    st.binary(max_size=30).map(lambda line: line.replace(b"\n", b"")),
    st.sampled_from([b"", b"[DONE]", b" ", b"\r"]),
)
NDJSON_BODIES = st.builds(
    lambda lines, end: end.join(lines) + end,
    st.lists(NDJSON_LINES, max_size=5),
    st.sampled_from([b"\n", b"\r\n", b""]),
)
FORM_NAMES = st.one_of(
    st.sampled_from(["topic", "data", "type", "retry", "private", "key", "id"]),
    st.text(max_size=5),
)


def form_value(value: str | bytes, encoded: bool) -> bytes:
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return urllib.parse.quote_from_bytes(raw, safe="").encode() if encoded else raw


FORM_VALUES = st.builds(
    form_value, st.one_of(TOPICS, st.text(max_size=12), st.binary(max_size=12)), st.booleans()
)
FORM_BODIES = st.lists(
    st.builds(lambda name, value: form_value(name, True) + b"=" + value, FORM_NAMES, FORM_VALUES),
    max_size=5,
).map(b"&".join)
BODIES = st.one_of(
    JSON_BODIES,
    NDJSON_BODIES,
    FORM_BODIES,
    st.binary(max_size=64),
    st.builds(corrupt, JSON_BODIES, st.integers(0, 200), st.sampled_from([b"\xff", b"\xc3"])),
    st.integers(MAX_BODY - 8, MAX_BODY + 8).map(lambda length: b"1" * length),
)
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/x-ndjson",
            b"application/jsonl",
            b"application/jsonlines",
            b"application/x-www-form-urlencoded",
            b"application/json; charset=utf-8",
            b"application/json; charset=latin-1",
            b"application/x-www-form-urlencoded; charset=bogus",
            b"application/x-www-form-urlencoded; charset=utf-16",
            b"application/x-ndjson; charset=utf-8",
            b"APPLICATION/JSON",
            b"application/json;;;",
            b"multipart/form-data",
            b"multipart/form-data; boundary=x",
            b"text/plain",
            b"*/*",
            b"",
        ]
    ),
    st.binary(max_size=20).map(lambda value: value.replace(b"\r", b"").replace(b"\n", b"")),
)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def forge_token(header: object, claims: object, signed: bool, noise: bytes) -> bytes:
    """A JWT built by hand: any header (``alg: none``, other algorithms), any claims, and
    a right HS256 signature with the broker's key, or a wrong one."""
    signing_input = _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(claims).encode())
    if signed:
        signature = hmac.new(JWT_KEY.encode(), signing_input, hashlib.sha256).digest()
    else:
        signature = noise
    return signing_input + b"." + _b64(signature)


PATTERN_LISTS = st.one_of(st.lists(TOPICS, max_size=3), st.just(["*"]), JSON_VALUES)
GRANTS = st.one_of(
    st.fixed_dictionaries({}, optional={"publish": PATTERN_LISTS, "subscribe": PATTERN_LISTS}),
    JSON_VALUES,
)
CLAIMS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "sse": GRANTS,
            "mercure": GRANTS,
            "exp": st.one_of(st.integers(0, 2**40), JSON_VALUES),
            "nbf": st.one_of(st.integers(0, 2**40), JSON_VALUES),
            "sub": JSON_VALUES,
        },
    ),
    JSON_VALUES,
)
JWT_HEADERS = st.one_of(
    st.sampled_from(
        [
            {"alg": "HS256", "typ": "JWT"},
            {"alg": "none"},
            {"alg": "HS512"},
            {"alg": "RS256"},
            {"alg": "HS256", "crit": ["exp"]},
        ]
    ),
    JSON_VALUES,
)
TOKENS = st.one_of(
    st.builds(forge_token, JWT_HEADERS, CLAIMS, st.booleans(), st.binary(max_size=8)),
    st.just(mint(publish=["**"], subscribe=["**"]).encode()),
    st.text(string.ascii_letters + string.digits + ".-_", max_size=30).map(str.encode),
)
HEADER_BYTES = st.binary(max_size=40).map(
    lambda value: value.replace(b"\r", b"").replace(b"\n", b"")
)
HEADERS = st.one_of(
    st.tuples(
        st.just(b"Authorization"),
        st.one_of(
            TOKENS.map(lambda token: b"Bearer " + token),
            st.sampled_from([b"Bearer", b"Bearer ", b"bearer  x", b"Basic dXNlcjpwYXNz"]),
        ),
    ),
    st.tuples(
        st.just(b"Cookie"),
        st.one_of(
            TOKENS.map(lambda token: b"brokerAuthorization=" + token),
            st.sampled_from([b"brokerAuthorization=", b"brokerAuthorization", b"=;;="]),
        ),
    ),
    st.tuples(st.just(b"Idempotency-Key"), KEYS.map(lambda key: key.encode())),
    st.tuples(st.just(b"Last-Event-ID"), st.one_of(KEYS.map(str.encode), HEADER_BYTES)),
    st.tuples(st.just(b"Origin"), st.sampled_from([ALLOWED_ORIGIN.encode(), b"http://evil", b""])),
    st.tuples(st.just(b"Access-Control-Request-Method"), st.sampled_from([b"POST", b"GET", b"x"])),
    st.tuples(
        st.just(b"Content-Encoding"),
        st.sampled_from([b"gzip", b"deflate", b"br", b"identity", b"x"]),
    ),
    st.tuples(
        st.just(b"X-Forwarded-For"),
        st.sampled_from([b"192.0.2.1", b"::ffff:10.0.0.1", b"1.1.1.1, 127.0.0.1", b"junk", b","]),
    ),
    st.tuples(st.just(b"Expect"), st.sampled_from([b"100-continue", b"x"])),
    st.tuples(
        st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z").filter(
            lambda name: (
                name.lower()
                not in {b"host", b"content-length", b"transfer-encoding", b"connection"}
            )
        ),
        HEADER_BYTES,
    ),
)
QUERY_VALUES = st.one_of(
    TOPICS.map(lambda text: urllib.parse.quote(text, safe="/*", errors="surrogatepass").encode()),
    st.binary(max_size=12).map(lambda raw: urllib.parse.quote_from_bytes(raw).encode()),
    TOKENS,
    st.sampled_from([b"%", b"%zz", b"%ff%fe", b"a+b", b"", b"\xff"]),
)
QUERY_PAIRS = st.tuples(
    st.sampled_from([b"topic", b"topic", b"authorization", b"lastEventID", b"x"]), QUERY_VALUES
)
METHODS = st.sampled_from([b"POST", b"GET", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"FOO"])
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"])


def query(pairs: list[tuple[bytes, bytes]], many_topics: bool) -> bytes:
    items = [name + b"=" + value for name, value in pairs]
    if many_topics:
        items += [b"topic=t%d" % number for number in range(70)]
    return b"?" + b"&".join(items) if items else b""


# Mostly no query or a short one: a bad topic in it stops a request before its body is read.
QUERIES = st.one_of(
    st.just(b""),
    st.builds(query, st.lists(QUERY_PAIRS, max_size=4), st.sampled_from([False] * 9 + [True])),
)


@dataclasses.dataclass
class RawRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    version: bytes

    def encode(self) -> bytes:
        return http_request(self.method, self.target, self.headers, self.body, self.version)

    def mutant(self, rng: random.Random) -> RawRequest:
        """A copy with one to three byte-level edits in its target, a header value or its
        body: cheap variations on a generated request, which also reach the inputs that no
        strategy above spells out."""
        target, headers, body = self.target, list(self.headers), self.body
        for _ in range(rng.randint(1, 3)):
            part = rng.randrange(3)
            if part == 0:
                target = mutate(target, rng, framed=True)
            elif part == 1 and headers:
                index = rng.randrange(len(headers))
                name, value = headers[index]
                headers[index] = (name, mutate(value, rng, framed=True))
            else:
                body = mutate(body or b"", rng, framed=False)
        return RawRequest(self.method, target, headers, body, self.version)


INSERTIONS = [
    *(bytes([byte]) for byte in b'\x00\t "%&*+,/:=[\\]{}'),
    *(b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x80\xa8", b"\\ud800", b"%ff", b"%00"),
    *(b"/**", b"null", b"-1", b"1e999", b"9" * 24, b'"broker.x"', b"\n", b"\r\n"),
]


def mutate(data: bytes, rng: random.Random, *, framed: bool) -> bytes:
    """One random edit. ``framed`` parts (the request line, header values) never get CR or
    LF, which would change where the request ends rather than what it says."""
    position = rng.randint(0, len(data))
    edit = rng.randrange(4)
    if edit == 0:
        data = data[:position] + rng.choice(INSERTIONS) + data[position:]
    elif edit == 1:
        data = data[:position] + data[position + rng.randint(1, 8) :]
    elif edit == 2:
        data = data[:position] + data[max(0, position - 8) :]
    else:
        data = data[:position]
    return data.replace(b"\r", b"").replace(b"\n", b"") if framed else data


MUTANTS = 7  # per generated request


PUBLISH_ANYWHERE = mint(publish=["**"])


@st.composite
def publish_requests(draw: st.DrawFn) -> RawRequest:
    method = draw(st.one_of(st.just(b"POST"), METHODS))
    headers = draw(st.lists(HEADERS, max_size=3))
    # Mostly with a token that may publish anywhere, so that bodies get past the gate and
    # their parsing is what gets fuzzed.
    if draw(st.integers(0, 4)):
        headers.append((b"Authorization", b"Bearer " + PUBLISH_ANYWHERE.encode()))
    content_type = draw(st.none() | CONTENT_TYPES)
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    body = draw(st.none() | BODIES) if method != b"POST" else draw(BODIES)
    return RawRequest(method, b"/publish" + draw(QUERIES), headers, body, draw(VERSIONS))


@st.composite
def events_requests(draw: st.DrawFn) -> RawRequest:
    method = draw(st.one_of(st.just(b"GET"), METHODS))
    headers = draw(st.lists(HEADERS, max_size=3))
    body = draw(st.none() | st.binary(max_size=16))
    return RawRequest(method, b"/events" + draw(QUERIES), headers, body, draw(VERSIONS))


@settings(FUZZ_SETTINGS, max_examples=PUBLISH_EXAMPLES)
@given(base=publish_requests(), rng=st.randoms(use_true_random=False))
def test_raw_publish(target: Target, base: RawRequest, rng: random.Random) -> None:
    send_with_mutants(target, base, rng, "raw publish")


def send_with_mutants(
    target: Target, base: RawRequest, rng: random.Random, counter: str
) -> list[tuple[RawRequest, Answer]]:
    """Send ``base`` and its mutants, check every answer, and hand them back for the
    checks of one endpoint."""
    sent = []
    for request in [base, *(base.mutant(rng) for _ in range(MUTANTS))]:
        raw = request.encode()
        answer = exchange(target.port, raw, counter=counter)
        check_answer(raw, answer)
        sent.append((request, answer))
    return sent


@settings(FUZZ_SETTINGS, max_examples=EVENTS_EXAMPLES)
@given(base=events_requests(), rng=st.randoms(use_true_random=False))
def test_raw_events(target: Target, base: RawRequest, rng: random.Random) -> None:
    for request, answer in send_with_mutants(target, base, rng, "raw events"):
        if answer.status == 200 and request.method == b"GET":
            if answer.headers.get("content-type", "").startswith("text/html"):
                # A mutant whose target was cut down to "/": the demo page.
                assert answer.body == DEMO_PAGE, answer
                continue
            assert is_stream(answer), answer
            assert b"retry: " in answer.body, answer


# Mercure's endpoint: its own parameter and field names, its own tokens.
MERCURE_PATH = b"/.well-known/mercure"
MERCURE_PUBLISH_ANYWHERE = mint(publish=["*"], claim="mercure")
MERCURE_TEXT = st.one_of(
    TOPICS,
    st.sampled_from(
        [
            "*",
            "https://example.com/books/:id",
            "/books/:id",
            "https://example.com/{a}/{+b}{?c,d}",
            "{",
            "(",
            ":a((?:a+)+b)",
            "/.well-known/mercure/x",
            "/x/../.well-known/mercure",
            "%2Ewell-known/mercure",
            "#frag",
            "urn:uuid:1",
            "\x85",
            "\x9f",
        ]
    ),
)
MERCURE_QUERY_NAMES = st.one_of(
    st.sampled_from(
        [
            b"match",
            b"matchExact",
            b"matchURLPattern",
            b"topic",
            b"lastEventID",
            b"access_token",
            b"MATCH",
            b"matchurlpattern",
            b"matchFoo",
            b"x",
        ]
    ),
    st.binary(max_size=6).map(lambda raw: urllib.parse.quote_from_bytes(raw).encode()),
)
MERCURE_QUERY_VALUES = st.one_of(
    MERCURE_TEXT.map(
        lambda text: urllib.parse.quote(text, safe="/*:", errors="surrogatepass").encode()
    ),
    QUERY_VALUES,
    st.just(b"earliest"),
)
MERCURE_QUERIES = st.lists(st.tuples(MERCURE_QUERY_NAMES, MERCURE_QUERY_VALUES), max_size=5).map(
    lambda pairs: b"?" + b"&".join(name + b"=" + value for name, value in pairs) if pairs else b""
)
MERCURE_FORM_NAMES = st.one_of(
    st.sampled_from(["topic", "data", "type", "retry", "private", "id"]), st.text(max_size=5)
)
MERCURE_FORM_VALUES = st.builds(
    form_value, st.one_of(MERCURE_TEXT, st.text(max_size=12), st.binary(max_size=12)), st.booleans()
)
MERCURE_FORMS = st.lists(
    st.builds(
        lambda name, value: form_value(name, True) + b"=" + value,
        MERCURE_FORM_NAMES,
        MERCURE_FORM_VALUES,
    ),
    max_size=6,
).map(b"&".join)


@st.composite
def mercure_publish_requests(draw: st.DrawFn) -> RawRequest:
    method = draw(st.one_of(st.just(b"POST"), METHODS))
    headers = draw(st.lists(HEADERS, max_size=2))
    if draw(st.integers(0, 4)):
        headers.append((b"Authorization", b"Bearer " + MERCURE_PUBLISH_ANYWHERE.encode()))
    content_type = draw(st.just(b"application/x-www-form-urlencoded") | st.none() | CONTENT_TYPES)
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    body = draw(st.one_of(MERCURE_FORMS, MERCURE_FORMS, BODIES))
    return RawRequest(method, MERCURE_PATH + draw(MERCURE_QUERIES), headers, body, draw(VERSIONS))


@st.composite
def mercure_subscribe_requests(draw: st.DrawFn) -> RawRequest:
    method = draw(st.one_of(st.just(b"GET"), METHODS))
    headers = draw(st.lists(HEADERS, max_size=3))
    body = draw(st.none() | st.binary(max_size=16))
    return RawRequest(method, MERCURE_PATH + draw(MERCURE_QUERIES), headers, body, draw(VERSIONS))


@settings(FUZZ_SETTINGS, max_examples=MERCURE_EXAMPLES)
@given(base=mercure_publish_requests(), rng=st.randoms(use_true_random=False))
def test_raw_mercure_publish(target: Target, base: RawRequest, rng: random.Random) -> None:
    for request, answer in send_with_mutants(target, base, rng, "raw mercure publish"):
        if answer.status == 200 and request.method == b"POST":
            assert answer.headers.get("content-type", "").startswith("text/plain"), answer


@settings(FUZZ_SETTINGS, max_examples=MERCURE_EXAMPLES)
@given(base=mercure_subscribe_requests(), rng=st.randoms(use_true_random=False))
def test_raw_mercure_subscribe(target: Target, base: RawRequest, rng: random.Random) -> None:
    send_with_mutants(target, base, rng, "raw mercure subscribe")


def test_broker_survived(target: Target) -> None:
    """After all of the above: still healthy, and nothing logged as an error."""
    target.assert_healthy()


# --- entitlement -------------------------------------------------------------------------

# A small topic space, so that publishes, subscriptions and grants overlap often: paths of
# a few segments, bare (our own topics; relative URLs to Mercure) or in URLs that
# Mercure's matchers meet. ``HUB`` stands for the hub's origin, known once the broker
# runs: relative topics and URL patterns resolve against its URL.
PLAIN_SEGMENTS = ["a", "b", "c", "x"]
HUB = "{hub}"
URL_PREFIXES = ["/", "https://example.com/", "https://EXAMPLE.com/", HUB + "/"]
URL_SEGMENTS = ["a", "b", "x"]
SENTINEL_TOPIC = "end"
# How a subscription or a grant names topics: our topic patterns (``/events``, the ``sse``
# claim), Mercure's exact topics and URL patterns, and the URI templates of its earlier
# drafts (the legacy ``topic`` parameter and ``mercure`` claim). In every Mercure kind,
# ``*`` alone is every topic. Mercure's two are named by their ``matchType``.
PATTERN, EXACT, URL_PATTERN, TEMPLATE = "pattern", "Exact", "URLPattern", "template"
Rule = tuple[str, str]
# RFC 6570's simple string expansion: unreserved characters and percent-encodings, so a
# "{name}" (the only expression used here) never spans a "/".
TEMPLATE_VALUE = r"(?:[A-Za-z0-9\-._~]|%[0-9A-Fa-f]{2})*"
EXPIRES = int(time.time()) + 24 * 3600


def pattern_matches(pattern: str, topic: str) -> bool:
    """The topic rules of the README, written independently of ``broker.topics``. A
    segment is whatever lies between slashes, the empty text too: URL topics have empty
    segments (``/a/x``, ``https://host/a``), and a ``*`` stands for any one of them."""
    parts = []
    segments = pattern.split("/")
    for index, segment in enumerate(segments):
        if segment == "*":
            parts.append("[^/]*")
        elif segment == "**" and index == len(segments) - 1:
            parts.append(".*")
        else:
            parts.append(re.escape(segment))
    return re.fullmatch("/".join(parts), topic) is not None


def template_matches(template: str, topic: str) -> bool:
    """Whether some values of the template's variables expand it to ``topic``; without
    expressions, a template is an exact topic."""
    literals = re.split(r"\{[A-Za-z_]+\}", template)
    return re.fullmatch(TEMPLATE_VALUE.join(map(re.escape, literals)), topic) is not None


@functools.lru_cache(maxsize=256)
def url_pattern(text: str, base: str) -> URLPattern:
    return URLPattern(text, base)


def rule_matches(rule: Rule, topic: str, hub: str) -> bool:
    kind, text = rule
    if kind == PATTERN:
        return pattern_matches(text, topic)
    if text == "*":
        return True
    if kind == EXACT:
        return text == topic
    if kind == TEMPLATE:
        return template_matches(text, topic)
    try:
        return url_pattern(text, hub).test(topic, hub)
    except ValueError:  # a topic that is not even a URL reference
        return False


def any_match(rules: list[Rule], topics: list[str], hub: str) -> bool:
    return any(rule_matches(rule, topic, hub) for rule in rules for topic in topics)


def access_token(
    publish: list[Rule] | None = None,
    subscribe: list[Rule] | None = None,
    *,
    key: str = JWT_KEY,
    typ: str | None = "at+jwt",
    expires: bool = True,
) -> str:
    """A token granting Mercure ``authorization_details`` (RFC 9396), one detail per
    action, minted with PyJWT as an authorisation server would: an RFC 9068 access token
    unless ``typ`` or ``expires`` say otherwise."""
    details = [
        {
            "type": "mercure",
            "actions": [action],
            "topics": [
                {"match": text} if text == "*" else {"match": text, "matchType": kind}
                for kind, text in rules
            ],
        }
        for action, rules in (("publish", publish), ("subscribe", subscribe))
        if rules is not None
    ]
    claims: dict[str, Any] = {"authorization_details": details}
    if expires:
        claims["exp"] = EXPIRES
    return jwt.encode(claims, key, algorithm="HS256", headers={"typ": typ} if typ else None)


# Where a client puts its token ("header", "query" or "cookie"), and the token; "origin"
# sends an Origin header instead, which a Mercure publish authenticated by a cookie alone
# needs.
Credentials = list[tuple[str, str]]


def with_credentials(
    path: bytes, params: list[tuple[str, str]], credentials: Credentials
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The request target and headers that carry ``credentials``, in the query parameter
    and cookie that ``path`` reads."""
    query_name, cookie_name = (
        ("access_token", "mercureAccessToken")
        if path == MERCURE_PATH
        else ("authorization", "brokerAuthorization")
    )
    params = list(params)
    headers = []
    for kind, token in credentials:
        if kind == "query":
            params.append((query_name, token))
        elif kind == "header":
            headers.append((b"Authorization", b"Bearer " + token.encode()))
        elif kind == "origin":
            headers.append((b"Origin", token.encode()))
        else:
            headers.append((b"Cookie", cookie_name.encode() + b"=" + token.encode()))
    query = b"?" + urllib.parse.urlencode(params).encode() if params else b""
    return path + query, headers


@dataclasses.dataclass
class Received:
    event_id: str | None
    event: str | None
    data: str


# The Mercure parameter each kind of matcher goes in; exact ones alternate between both.
MATCH_PARAMETERS = {
    EXACT: ("matchExact", "match"),
    URL_PATTERN: ("matchURLPattern",),
    TEMPLATE: ("topic",),
}


class Watcher:
    """A subscriber kept open on a raw socket, read by a thread into a queue: on
    ``/events`` with topic patterns, or on Mercure's endpoint with matchers. ``hub`` is
    the URL relative topics and URL patterns resolve against.

    It asks for HTTP/1.0, so the stream comes unchunked and is plain SSE text.
    """

    def __init__(
        self,
        name: str,
        path: bytes,
        topics: list[Rule],
        grants: list[Rule],
        credentials: Credentials,
        hub: str,
    ) -> None:
        self.name = name
        self.path = path
        self.topics = topics
        self.grants = grants  # the private topics it may read
        self.credentials = credentials
        self.hub = hub
        self.received: queue.Queue[Received | None] = queue.Queue()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def entitled(self, topics: list[str], private: bool) -> bool:
        if not any_match(self.topics, topics, self.hub):
            return False
        return not private or any_match(self.grants, topics, self.hub)

    def params(self) -> list[tuple[str, str]]:
        if self.path != MERCURE_PATH:
            return [("topic", text) for _, text in self.topics]
        return [
            (MATCH_PARAMETERS[kind][index % len(MATCH_PARAMETERS[kind])], text)
            for index, (kind, text) in enumerate(self.topics)
        ]

    def open(self, port: int) -> None:
        target, headers = with_credentials(self.path, self.params(), self.credentials)
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        request = http_request(b"GET", target, headers, None, b"HTTP/1.0", host=host_of(port))
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            assert chunk, f"{self.name}: the stream closed before its head"
            head += chunk
        assert head.split(b" ", 2)[1] == b"200", f"{self.name}: {head!r}"
        sock.settimeout(None)
        self._sock = sock
        self._thread = threading.Thread(target=self._read, name=f"watcher-{self.name}")
        self._thread.start()

    def _read(self) -> None:
        assert self._sock is not None
        buffer = b""
        try:
            while chunk := self._sock.recv(65536):
                buffer += chunk
                *blocks, buffer = buffer.split(b"\n\n")
                for block in blocks:
                    received = parse_block(block.decode("utf-8"))
                    if received is not None:
                        self.received.put(received)
        except OSError:
            pass  # closed by ``close``
        finally:
            self.received.put(None)

    def until_sentinel(self, marker: str) -> list[Received]:
        """Everything received between the previous sentinel and the one carrying ``marker``
        (an earlier sentinel still queued, after a failed example, ends an earlier batch)."""
        events: list[Received] = []
        while True:
            try:
                received = self.received.get(timeout=DEADLINE)
            except queue.Empty:
                raise AssertionError(f"{self.name}: the sentinel {marker} never came") from None
            assert received is not None, f"{self.name}: the stream ended"
            if received.event == "sentinel":
                if received.data == marker:
                    return events
                events = []
            else:
                events.append(received)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(DEADLINE)


def host_of(port: int) -> bytes:
    """The Host a browser sends: the hub's URL, and so what relative topics and URL
    patterns resolve against, follows it."""
    return b"127.0.0.1:%d" % port


def parse_block(block: str) -> Received | None:
    """One SSE event block as the WHATWG parser reads it; None when it dispatches nothing."""
    event_id = event = None
    data: list[str] = []
    for line in block.split("\n"):
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event_id = value
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if not data:
        return None
    return Received(event_id, event, "\n".join(data))


def watchers(origin: str) -> list[Watcher]:
    """Subscribers on both endpoints: anonymous and granted, with every kind of matcher
    and of grant, and tokens in each place a token can go."""
    hub = origin + MERCURE_PATH.decode()

    def ours(name: str, topics: list[str], grants: list[Rule], token: Credentials) -> Watcher:
        return Watcher(name, b"/events", [(PATTERN, t) for t in topics], grants, token, hub)

    def mercure(name: str, topics: list[Rule], grants: list[Rule], token: Credentials) -> Watcher:
        return Watcher(name, MERCURE_PATH, topics, grants, token, hub)

    url_topics = [(URL_PATTERN, "https://example.com/a/:x"), (EXACT, "c")]
    exact_topics = [(EXACT, "a/x"), (EXACT, origin + "/a/x")]
    absolute_url = [(URL_PATTERN, "https://example.com/a/:x")]
    relative_url = [(URL_PATTERN, "/a/:x")]
    hub_templates = [(TEMPLATE, origin + "/{s}/x"), (TEMPLATE, "a/{x}")]
    templates = [(TEMPLATE, "https://example.com/a/{x}"), (TEMPLATE, "{s}/b")]
    cased_templates = [(TEMPLATE, "/a/{x}"), (TEMPLATE, "https://EXAMPLE.com/{s}/{t}")]
    everything = [(EXACT, "*")]
    return [
        ours("anonymous", ["**"], [], []),
        ours("anonymous a/*", ["a/*", SENTINEL_TOPIC], [], []),
        ours("grant a/**", ["**"], [(PATTERN, "a/**")], [("header", mint(subscribe=["a/**"]))]),
        ours(
            "grant b/* c/x",
            ["b/**", "c/**", SENTINEL_TOPIC],
            [(PATTERN, "b/*"), (PATTERN, "c/x")],
            [("query", mint(subscribe=["b/*", "c/x"]))],
        ),
        ours(
            "mercure *",
            ["**"],
            [(TEMPLATE, "*")],
            [("cookie", mint(subscribe=["*"], claim="mercure"))],
        ),
        ours("grant */x", ["**"], [(PATTERN, "*/x")], [("header", mint(subscribe=["*/x"]))]),
        ours("no subscribe grant", ["**"], [], [("header", mint(publish=["**"]))]),
        ours(
            "URL topics, legacy templates grant",
            ["https:/**", "*/a/*", SENTINEL_TOPIC],
            templates,
            [("cookie", mint(subscribe=[text for _, text in templates], claim="mercure"))],
        ),
        ours(
            "details grant",
            ["**"],
            url_topics,
            [("header", access_token(subscribe=url_topics))],
        ),
        mercure("Mercure anonymous *", everything, [], []),
        mercure(
            "Mercure exact, exact grants",
            [
                (EXACT, "a/x"),
                (EXACT, "/a/x"),
                (EXACT, "https://example.com/a/x"),
                (EXACT, origin + "/a/x"),
                (EXACT, SENTINEL_TOPIC),
            ],
            exact_topics,
            [("header", access_token(subscribe=exact_topics))],
        ),
        mercure(
            "Mercure absolute URL pattern",
            [(URL_PATTERN, "https://example.com/:s/:t"), (EXACT, SENTINEL_TOPIC)],
            absolute_url,
            [("query", access_token(subscribe=absolute_url))],
        ),
        mercure(
            "Mercure relative URL patterns",
            [(URL_PATTERN, "/a/:x"), (URL_PATTERN, "/:s/:t"), (EXACT, SENTINEL_TOPIC)],
            relative_url,
            [("cookie", access_token(subscribe=relative_url))],
        ),
        mercure(
            "Mercure hub URL pattern, legacy grant",
            [(URL_PATTERN, origin + "/:s/:t"), (EXACT, SENTINEL_TOPIC)],
            hub_templates,
            [("header", mint(subscribe=[text for _, text in hub_templates], claim="mercure"))],
        ),
        mercure(
            "Mercure legacy topic templates",
            [
                (TEMPLATE, "https://example.com/{s}/{t}"),
                (TEMPLATE, "{s}/x"),
                (TEMPLATE, SENTINEL_TOPIC),
            ],
            templates,
            [("query", mint(subscribe=[text for _, text in templates], claim="mercure"))],
        ),
        mercure(
            "Mercure legacy grant in a cookie",
            [
                (URL_PATTERN, "/:s/:t"),
                (EXACT, "a/x"),
                (EXACT, "https://EXAMPLE.com/a/x"),
                (EXACT, SENTINEL_TOPIC),
            ],
            cased_templates,
            [("cookie", mint(subscribe=[text for _, text in cased_templates], claim="mercure"))],
        ),
        mercure(
            "Mercure publish-only token in a cookie",
            everything,
            [],
            [("cookie", access_token(publish=everything))],
        ),
        mercure(
            "Mercure publish-only token in the header",
            [(TEMPLATE, "*")],
            [],
            [("header", mint(publish=["*"], claim="mercure"))],
        ),
        mercure(
            "Mercure publish-only token in the query",
            everything,
            [],
            [("query", mint(publish=["**"]))],
        ),
        mercure(
            "Mercure * grant",
            [(TEMPLATE, "*")],
            everything,
            [("query", access_token(subscribe=everything))],
        ),
        mercure(
            "Mercure, our own grant",
            [(URL_PATTERN, "/:s/:t"), (EXACT, "a/x"), (EXACT, SENTINEL_TOPIC)],
            [(PATTERN, "a/*")],
            [("cookie", mint(subscribe=["a/*"]))],
        ),
    ]


ENTITLEMENT_TOPICS = st.lists(
    st.one_of(
        st.lists(st.sampled_from(PLAIN_SEGMENTS), min_size=1, max_size=3).map("/".join),
        st.builds(
            operator.add,
            st.sampled_from(URL_PREFIXES),
            st.lists(st.sampled_from(URL_SEGMENTS), min_size=1, max_size=2).map("/".join),
        ),
    ),
    min_size=1,
    max_size=3,
)


@dataclasses.dataclass
class Draft:
    topics: list[str]
    private: bool
    key: str | None


@dataclasses.dataclass(frozen=True)
class Publisher:
    """A Mercure publisher, and what the hub must answer it: ``grants`` are the topics
    it may publish to (None: anywhere, as an anonymous publisher may on this broker);
    ``refused`` is the status refusing it whatever it publishes."""

    credentials: Credentials
    grants: list[Rule] | None
    refused: int | None = None


DRAFTS = st.builds(Draft, ENTITLEMENT_TOPICS, st.booleans(), st.none() | st.sampled_from("pqr"))
PUBLISH_PATTERNS = [(URL_PATTERN, "https://example.com/:s/:t"), (EXACT, "a/x")]
PUBLISHERS = st.sampled_from(
    [
        [],
        [("header", mint(publish=["**"]))],
        [("query", mint(publish=["**"]))],
        [("cookie", mint(publish=["*"], claim="mercure"))],
        [("header", mint(publish=["a/**"]))],  # forbidden for any other topic
        [("query", access_token(publish=PUBLISH_PATTERNS))],  # and this one for most
        [("header", mint("another-hmac-secret-0123456789abcdef", publish=["**"]))],  # 401
    ]
)
MERCURE_PUBLISH_RULES = [
    (URL_PATTERN, "https://example.com/:s/:t"),
    (URL_PATTERN, "/:s/:t"),
    (EXACT, "a/x"),
]
LEGACY_PUBLISH_RULES = [
    (TEMPLATE, "https://example.com/{s}/{t}"),
    (TEMPLATE, "{s}/x"),
    (TEMPLATE, "a/b"),
]
MERCURE_GRANTED = [
    Publisher([], None),
    Publisher([("header", access_token(MERCURE_PUBLISH_RULES))], MERCURE_PUBLISH_RULES),
    Publisher([("query", access_token([(EXACT, "*")]))], [(EXACT, "*")]),
    Publisher(
        [("cookie", mint(publish=["*"], claim="mercure")), ("origin", ALLOWED_ORIGIN)],
        [(TEMPLATE, "*")],
    ),
    Publisher(
        [("header", mint(publish=[text for _, text in LEGACY_PUBLISH_RULES], claim="mercure"))],
        LEGACY_PUBLISH_RULES,
    ),
    Publisher([("query", mint(publish=["a/**"]))], [(PATTERN, "a/**")]),
    # A token to subscribe with: it may publish nowhere.
    Publisher([("cookie", access_token(subscribe=[(EXACT, "*")])), ("origin", ALLOWED_ORIGIN)], []),
]
MERCURE_REFUSED = [
    # A cookie without an Origin: a cross-site form post, as far as the hub can tell.
    Publisher([("cookie", mint(publish=["*"], claim="mercure"))], None, 403),
    Publisher(
        [("header", access_token([(EXACT, "*")], key="another-hmac-secret-0123456789abcdef"))],
        None,
        401,
    ),
    # Not RFC 9068 access tokens: no typ at+jwt, no exp.
    Publisher([("query", access_token([(EXACT, "*")], typ=None))], None, 401),
    Publisher([("header", access_token([(EXACT, "*")], expires=False))], None, 401),
]
# Publishers refused whatever they send come up less often, so that most publications
# reach subscribers.
MERCURE_PUBLISHERS = st.one_of(
    st.sampled_from(MERCURE_GRANTED),
    st.sampled_from(MERCURE_GRANTED),
    st.sampled_from(MERCURE_REFUSED),
)
# Prefixes of the ids Mercure publishers choose, made unique by the publication's number:
# "#" starts the hub's own ids, so such an id is refused.
ID_PREFIXES = ["m", "urn:fuzz:", " é ", "a b:", "#"]


@dataclasses.dataclass
class Publication:
    shape: str  # json, array, ndjson or form to /publish; mercure to Mercure's endpoint
    drafts: list[Draft]
    credentials: Credentials
    idempotency_key: str | None
    publisher: Publisher | None = None  # a Mercure publication's
    id_prefix: str | None = None  # a Mercure publication's chosen id, without its number

    def chosen_id(self, sequence: int) -> str | None:
        return None if self.id_prefix is None else f"{self.id_prefix}{sequence}"


def mercure_publication(draft: Draft, publisher: Publisher, id_prefix: str | None) -> Publication:
    return Publication("mercure", [draft], publisher.credentials, None, publisher, id_prefix)


PUBLICATIONS = st.one_of(
    st.builds(
        Publication,
        st.sampled_from(["json", "array", "ndjson", "form"]),
        st.lists(DRAFTS, min_size=1, max_size=3),
        PUBLISHERS,
        st.none() | st.sampled_from(["i", "j"]),
    ),
    st.builds(
        mercure_publication,
        st.builds(Draft, ENTITLEMENT_TOPICS, st.booleans(), st.none()),
        MERCURE_PUBLISHERS,
        st.none() | st.sampled_from(ID_PREFIXES),
    ),
)


def located(publication: Publication, origin: str) -> Publication:
    """``publication`` with the hub's origin in its topics in place of ``HUB``."""
    drafts = [
        dataclasses.replace(draft, topics=[topic.replace(HUB, origin) for topic in draft.topics])
        for draft in publication.drafts
    ]
    return dataclasses.replace(publication, drafts=drafts)


def publication_request(
    publication: Publication, sequence: int, port: int
) -> tuple[bytes, list[Draft]]:
    """The request, and the drafts it carries in the order the broker numbers them."""
    if publication.shape == "mercure":
        return mercure_request(publication, sequence, port), publication.drafts
    single = publication.shape in {"json", "form"}
    drafts = publication.drafts[:1] if single else publication.drafts
    target, headers = with_credentials(b"/publish", [], publication.credentials)
    if publication.idempotency_key is not None:
        headers.append((b"Idempotency-Key", publication.idempotency_key.encode()))

    def event(draft: Draft, position: int) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "topic": draft.topics,
            "data": f"{sequence}.{position}",
            "private": draft.private,
        }
        if draft.key is not None:
            fields["key"] = draft.key
        return fields

    if publication.shape == "form":
        draft = drafts[0]
        pairs = [("topic", topic) for topic in draft.topics] + [("data", f"{sequence}.0")]
        if draft.private:
            pairs.append(("private", "on"))
        body = urllib.parse.urlencode(pairs).encode()
        content_type = b"application/x-www-form-urlencoded"
    elif publication.shape == "ndjson":
        body = b"".join(orjson.dumps(event(d, i)) + b"\n" for i, d in enumerate(drafts))
        content_type = b"application/x-ndjson"
    else:
        events = [event(d, i) for i, d in enumerate(drafts)]
        body = orjson.dumps(events[0] if publication.shape == "json" else events)
        content_type = b"application/json"
    headers.append((b"Content-Type", content_type))
    return http_request(b"POST", target, headers, body, host=host_of(port)), drafts


def mercure_request(publication: Publication, sequence: int, port: int) -> bytes:
    """A Mercure update as a form: every topic (the legacy mode takes several), and the
    ``private`` and ``id`` fields when chosen."""
    draft = publication.drafts[0]
    pairs = [("topic", topic) for topic in draft.topics] + [("data", f"{sequence}.0")]
    if draft.private:
        pairs.append(("private", "on"))
    chosen = publication.chosen_id(sequence)
    if chosen is not None:
        pairs.append(("id", chosen))
    target, headers = with_credentials(MERCURE_PATH, [], publication.credentials)
    headers.append((b"Content-Type", b"application/x-www-form-urlencoded"))
    body = urllib.parse.urlencode(pairs).encode()
    return http_request(b"POST", target, headers, body, host=host_of(port))


def published_ids(request: bytes, answer: Answer) -> list[str]:
    """The ids a publish answer reports as published: all of a 200, and those listed
    in an error (an NDJSON stream stopped part-way)."""
    check_answer(request, answer)
    body = orjson.loads(answer.body)
    if answer.status == 200:
        return [body["id"]] if "id" in body else list(body["ids"])
    ids: list[str] = body.get("ids", [])
    return ids


def mercure_status(publication: Publication, sequence: int, hub: str) -> int:
    """What the hub must answer a Mercure publication, in the order it checks."""
    publisher = publication.publisher
    assert publisher is not None
    if publisher.refused is not None:
        return publisher.refused
    if (publication.chosen_id(sequence) or "").startswith("#"):
        return 400
    topics = publication.drafts[0].topics
    if publisher.grants is not None and not all(
        any_match(publisher.grants, [topic], hub) for topic in topics
    ):
        return 403
    return 200


def mercure_published_ids(
    request: bytes, answer: Answer, publication: Publication, sequence: int, hub: str
) -> list[str]:
    """The id a Mercure publish answers with, once the answer is the one the hub owes
    this publisher for these topics and this id."""
    check_answer(request, answer)
    expected = mercure_status(publication, sequence, hub)
    shown = f"request {request!r} got {answer.status} {answer.body[:300]!r}"
    assert answer.status == expected, f"expected {expected}: {shown}"
    if answer.status != 200:
        return []
    event_id = answer.body.decode()
    chosen = publication.chosen_id(sequence)
    if chosen is None:
        assert event_id.startswith("urn:uuid:"), shown
    else:
        assert event_id == chosen, shown
    return [event_id]


def test_entitlement(broker_process: Callable[..., BrokerProcess]) -> None:
    """Subscribers with different grants watch random public and private publishes, by
    publishers with different tokens, in every body shape, on both endpoints: our own
    API and Mercure's. After each batch a public sentinel closes the books: each
    subscriber must have received exactly the new events it is entitled to (a private
    one only through a ``subscribe`` grant matching one of its topics; an anonymous
    subscriber never), nothing else, nothing twice, and each with the id its publish
    was answered with."""
    broker = broker_process(
        *("--jwt-key", JWT_KEY),
        *("--cors-origin", ALLOWED_ORIGIN),
        *("--queue-size", "100000"),
        *("--log-level", "warning"),
    )
    origin = f"http://127.0.0.1:{broker.port}"
    hub = origin + MERCURE_PATH.decode()
    watching = watchers(origin)
    try:
        for watcher in watching:
            watcher.open(broker.port)
        events: dict[str, Draft] = {}
        batches = iter(range(10**9))

        @settings(FUZZ_SETTINGS, max_examples=ENTITLEMENT_EXAMPLES)
        @given(publications=st.lists(PUBLICATIONS, min_size=1, max_size=3))
        def publish_and_watch(publications: list[Publication]) -> None:
            batch = next(batches)
            new: dict[str, Draft] = {}
            for number, generated in enumerate(publications):
                publication = located(generated, origin)
                sequence = batch * 10 + number
                request, drafts = publication_request(publication, sequence, broker.port)
                if publication.shape == "mercure":
                    answer = exchange(broker.port, request, counter="entitlement mercure")
                    ids = mercure_published_ids(request, answer, publication, sequence, hub)
                else:
                    answer = exchange(broker.port, request, counter="entitlement")
                    ids = published_ids(request, answer)
                for event_id, draft in zip(ids, drafts, strict=False):
                    if event_id not in events:  # else an idempotent retry: nothing new
                        events[event_id] = new[event_id] = draft
            marker = f"batch {batch}"
            sentinel = orjson.dumps({"topic": SENTINEL_TOPIC, "data": marker, "event": "sentinel"})
            request = http_request(
                b"POST",
                b"/publish",
                [(b"Content-Type", b"application/json")],
                sentinel,
                host=host_of(broker.port),
            )
            assert exchange(broker.port, request, counter="entitlement").status == 200
            for watcher in watching:
                got = [received.event_id or "" for received in watcher.until_sentinel(marker)]
                wanted = {
                    event_id
                    for event_id, draft in new.items()
                    if watcher.entitled(draft.topics, draft.private)
                }
                assert "" not in got, f"{watcher.name}: a broker notice: events were lost"
                assert len(got) == len(set(got)), f"{watcher.name}: an event came twice"
                extra = {event_id: events.get(event_id) for event_id in set(got) - wanted}
                assert not extra, f"{watcher.name} got events it is not entitled to: {extra}"
                missing = {event_id: new[event_id] for event_id in wanted - set(got)}
                assert not missing, f"{watcher.name} missed events it is entitled to: {missing}"

        publish_and_watch()
    finally:
        for watcher in watching:
            watcher.close()
    code, stderr = broker.stop()
    assert code == 0, stderr
    assert " ERROR " not in stderr, stderr


# --- volume ------------------------------------------------------------------------------


def test_volume(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last: the module sent its ten thousand requests. Only a complete, passing run
    counts: a test that failed stopped sending, and that failure is the one to read."""
    total = sum(SENT.values())
    summary = ", ".join(f"{name}: {count}" for name, count in sorted(SENT.items()))
    with capsys.disabled():
        print(f"\ntest_fuzz: {total} requests ({summary})")
        shapes = ", ".join(f"{status} {code}: {n}" for (status, code), n in sorted(ERRORS.items()))
        print(f"test_fuzz: {len(ERRORS)} distinct errors in raw answers ({shapes})")
    module_items = [item for item in request.session.items if item.path == request.node.path]
    # Each operation schemathesis fuzzes, and the seven tests below its section.
    if len(module_items) < len(operations_fuzzed_by_schemathesis()) + 7:
        pytest.skip("only part of the module was selected")
    if request.session.testsfailed:
        pytest.skip("a test failed before this one")
    assert total >= MINIMUM_TOTAL, summary


def operations_fuzzed_by_schemathesis() -> list[tuple[str, str]]:
    return [
        (method, path)
        for path, item in SCHEMA.raw_schema["paths"].items()
        for method in item
        if (method, path) not in STREAMS
    ]

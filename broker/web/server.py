"""The HTTP server under the application: a deadline on request heads, and JSON for the
requests aiohttp refuses before any handler or middleware sees them.

aiohttp reads a request's head without a deadline: a client that connects and then sends
nothing, or its headers a byte at a time, keeps a connection slot, a file descriptor and
aiohttp's state for the connection for as long as it likes, and a few thousand such
clients (slow loris) exhaust the broker. ``BrokerRequestHandler`` gives every head
``--header-timeout`` seconds, counted from the connection's start or, on a kept-alive
connection, from the first byte of the next request (the wait before that byte is
aiohttp's keep-alive timeout). A late head is answered 408 and the connection closed. The
clock stops once the head is parsed, so neither a long publish body (``--body-timeout``
bounds that, in ``web/publish.py``) nor an event stream, which leaves aiohttp after its
head (``web/stream.py``), is ever cut by it.

aiohttp answers an unparsable request (bad method or version, invalid bytes in a header,
a header too long) with a text body of its own, and logs each one with a traceback; on a
public port that is noise, not a fault. Here they get the broker's JSON error shape and a
debug line (as does a body that does not decode, when aiohttp drains it after the handler's
400); only a server error is still logged as one. An ``Expect`` header aiohttp does not
understand is answered 417 here too, before routing (``refuse_unknown_expectations``).

aiohttp's ``AppRunner`` has no say in the protocol class, so ``BrokerRunner`` rebuilds the
server it makes around ``BrokerRequestHandler``. The handler uses aiohttp internals (its
message queue and the future its request loop waits on), like the take-over does: the
pinned minor version in pyproject.toml and tests/test_server.py guard them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import _ErrInfo

from broker.errors import ClientError, RequestTimeout
from broker.web.errors import error_response

logger = logging.getLogger(__name__)

# Room enough for any message of aiohttp's parser, without echoing a client's whole line.
MAX_DETAIL_LENGTH = 200


class BrokerRequestHandler(web.RequestHandler):
    """aiohttp's protocol for one connection, with the head deadline and JSON errors."""

    __slots__ = ("_head_timed_out", "_head_timer", "_header_timeout")

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        header_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_timed_out = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head_clock()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timed_out:
            return
        waiter = self._waiter
        if data and self._head_timer is None and waiter is not None and not waiter.done():
            # The request loop is idle between requests, so these bytes begin a head.
            self._start_head_clock()
        super().data_received(data)
        if self._messages:
            self._stop_head_clock()

    def _start_head_clock(self) -> None:
        self._head_timer = self._loop.call_later(self._header_timeout, self._head_too_slow)

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        """Queue a 408 where the parser queues a request it could not parse, so the request
        loop answers it (through ``handle_error``) and closes the connection."""
        self._head_timer = None
        self._head_timed_out = True
        timeout = RequestTimeout(
            f"the request's headers did not arrive within {self._header_timeout:g} s"
        )
        self._messages.append((_ErrInfo(timeout.status, timeout, timeout.detail), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer what the application never saw (a late or unparsable head) or what
        escaped it (a bug, 5xx) with the JSON error shape; close the connection after."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun; no error response can follow")
        if isinstance(exc, ClientError):
            status, code, detail = exc.status, exc.code, exc.detail
        elif status < 500:
            status, code, detail = self._refusal(status, exc, message)
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            code, detail = "internal_error", "the broker failed; this is a bug"
        if status < 500:
            logger.debug("refused a request from %s: %s", request.remote, detail)
        response = error_response(status, code, detail)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # Draining a body the handler left unread, aiohttp meets again the decoding error
        # the handler already answered with a 400, and would log it as a failure of ours.
        if isinstance(kw.get("exc_info"), web.RequestPayloadError):
            self.logger.debug(*args, **kw)
            return
        super().log_exception(*args, **kw)

    def _refusal(
        self, status: int, exc: BaseException | None, message: str | None
    ) -> tuple[int, str, str]:
        """Status, code and detail for a head the parser refused."""
        if isinstance(exc, LineTooLong):
            return (
                431,
                "request_header_fields_too_large",
                f"the request line or a header is longer than {exc.args[1]} bytes",
            )
        text = message or (exc.message if isinstance(exc, HttpProcessingError) else "")
        if text == "Too many headers received":
            return (
                431,
                "request_header_fields_too_large",
                f"the request has more than {self.max_headers} headers",
            )
        return status, "bad_request", f"the request is not valid HTTP: {_summary(text)}"


def _summary(message: str) -> str:
    """The parser's words without the echo of the client's bytes that follows them.

    llhttp's messages read ``reason:\\n\\n  b'<the line>'\\n  ^``: keep what precedes the
    blank line. The client's bytes can still appear (an unparsable URL is the whole
    message): bound them, and escape what is not valid UTF-8 so the JSON can carry it.
    """
    head = message.split("\n\n", 1)[0]
    text = ": ".join(line.strip().rstrip(":") for line in head.splitlines() if line.strip())
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > MAX_DETAIL_LENGTH:
        text = text[:MAX_DETAIL_LENGTH] + "..."
    return text or "malformed request"


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def refuse_unknown_expectations(handler: Handler) -> Handler:
    """Answer an ``Expect`` other than ``100-continue`` with 417 before routing.

    aiohttp checks ``Expect`` after routing but before any middleware, and answers itself:
    plain text, and a 500 for a value that is not UTF-8. Checked here, every path (unknown
    ones included) gets the JSON error; ``100-continue`` is left to aiohttp.
    """

    async def guarded(request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            return error_response(
                417,
                "expectation_failed",
                f"unknown Expect value {expect!r}; only 100-continue is understood",
            )
        return await handler(request)

    return guarded


class BrokerServer(web.Server):
    """aiohttp's server, making ``BrokerRequestHandler`` protocols."""

    def __init__(
        self,
        handler: Handler,
        *,
        header_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout = header_timeout

    def __call__(self) -> web.RequestHandler:
        return BrokerRequestHandler(
            self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs
        )


class BrokerRunner(web.AppRunner):
    """``web.AppRunner`` whose connections get ``header_timeout`` seconds for each head."""

    __slots__ = ("_header_timeout",)

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        # aiohttp's server as the runner configured it (the app started, its handler, the
        # request factory and every handler argument), rebuilt to make our protocol.
        made = await super()._make_server()
        return BrokerServer(
            refuse_unknown_expectations(made.request_handler),
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            header_timeout=self._header_timeout,
            **made._kwargs,
        )

"""The client commands of ``sse-broker``: ``tail``, ``publish`` and ``bridge``.

They are thin shells around ``broker.client``, made for pipes: ``tail`` writes and flushes
each event the moment it arrives, ``publish -`` sends each line of standard input the
moment it is read, and ``bridge`` republishes an upstream SSE response (an LLM's streamed
completion) event by event, so that many browsers can watch one generation. Standard
output carries only results; errors are one line on standard error. Exit status: 0 done,
1 refused or failed, 2 bad usage, 130 interrupted (Ctrl-C, without a traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any, NoReturn

import aiohttp
import orjson

from broker.client import BrokerError, Event, EventParser, Publisher, Subscriber

COMMANDS = ("tail", "publish", "bridge")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class CommandError(Exception):
    """A failure reported as one line on standard error, exit status 1."""


def add_client_commands(
    commands: argparse._SubParsersAction[Any],
) -> None:
    tail = commands.add_parser(
        "tail",
        help="print the events of topics as they arrive",
        description="Print each event's data as it arrives, one flush per event. "
        "Reconnects by itself, resuming with Last-Event-ID.",
    )
    _add_url(tail)
    _add_topics(tail, "topic or pattern to follow")
    tail.add_argument(
        "--json",
        action="store_true",
        help='print {"id", "event", "data"} per line, broker notices included',
    )
    tail.add_argument(
        "--until-data",
        metavar="DATA",
        help="exit 0 (without printing it) at the first event whose data is DATA, e.g. '[DONE]'",
    )
    tail.add_argument("--last-event-id", metavar="ID", help="resume after this event id")
    _add_token(tail, "subscriber")

    publish = commands.add_parser(
        "publish",
        help="publish an event, or each line of standard input",
        usage="sse-broker publish [URL] --topic TOPIC [options] [DATA | -]",
        description="Publish DATA as one event, or with '-' (or no DATA) each line of "
        "standard input as it is read: a line that is a JSON object with 'data' is an "
        "event object (its topic defaults to --topic), any other line is the data of one "
        "event. Prints the ids, one per line.",
    )
    publish.add_argument("arguments", nargs="*", metavar="[URL] [DATA | -]", help=argparse.SUPPRESS)
    _add_topics(publish, "topic to publish to (repeat for several)")
    publish.add_argument("--event", metavar="TYPE", help="event type")
    publish.add_argument("--retry", type=int, metavar="MS", help="client reconnection delay")
    publish.add_argument("--private", action="store_true", help="a private event")
    publish.add_argument(
        "--key",
        metavar="KEY",
        help="idempotency key (for standard input, line i gets KEY#i)",
    )
    _add_token(publish, "publisher")

    bridge = commands.add_parser(
        "bridge",
        help="republish an upstream SSE stream (an LLM completion) into a topic",
        description="Open UPSTREAM_URL, an SSE stream such as an OpenAI-compatible chat "
        'completion with "stream": true, and publish the data of each of its events '
        "verbatim into the topic as it arrives, up to and including --done. Prints a "
        "summary on standard error unless --quiet.",
    )
    bridge.add_argument("upstream", metavar="UPSTREAM_URL", help="the stream to republish")
    _add_topics(bridge, "topic to publish to (repeat for several)")
    bridge.add_argument(
        "--url",
        default=None,
        help="the broker's base URL (env BROKER_URL)",
    )
    bridge.add_argument(
        "--method", help="upstream request method (default POST with --data, else GET)"
    )
    bridge.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="upstream request header (repeatable)",
    )
    bridge.add_argument(
        "--data",
        metavar="JSON | @FILE | -",
        help="upstream request body (sent as application/json unless --header says "
        "otherwise), from the argument, a file, or standard input",
    )
    bridge.add_argument("--event", metavar="TYPE", help="event type to publish under")
    bridge.add_argument(
        "--done",
        default="[DONE]",
        metavar="DATA",
        help="the data that ends the upstream stream; it is published, then the bridge "
        "exits 0, and an upstream ending before it is an error. '' accepts any clean end "
        "(default '[DONE]')",
    )
    bridge.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="fail if the upstream sends nothing for this long (default 300)",
    )
    bridge.add_argument("--quiet", action="store_true", help="no summary on standard error")
    _add_token(bridge, "publisher")


def take_trailing_positionals(args: argparse.Namespace, extras: list[str]) -> list[str]:
    """Give ``publish`` the DATA that follows its options; return what is still unknown.

    argparse stops filling ``publish URL --topic T DATA``'s positionals at the first
    option, and leaves DATA over as unrecognised.
    """
    if args.command != "publish":
        return extras
    data = [extra for extra in extras if extra == "-" or not extra.startswith("-")]
    args.arguments += data
    return [extra for extra in extras if extra not in data]


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url", nargs="?", metavar="URL", help="the broker's base URL (env BROKER_URL)"
    )


def _add_topics(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument(
        "--topic", action="append", required=True, metavar="TOPIC", dest="topics", help=text
    )


def _add_token(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument("--token", metavar="JWT", help=f"{role} token (env BROKER_TOKEN)")


def run_client_command(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str]
) -> int:
    """Run ``tail``, ``publish`` or ``bridge``; ``parser`` reports usage errors."""
    name = args.command
    token = args.token or environ.get("BROKER_TOKEN") or None

    def usage(message: str) -> NoReturn:
        parser.error(f"{name}: {message}")

    logging.basicConfig(level=logging.WARNING, format=f"sse-broker {name}: %(message)s")
    work: Coroutine[Any, Any, int]
    if name == "tail":
        url = _broker_url(args.url, environ, usage)
        work = tail(url, args.topics, args, token)
    elif name == "publish":
        url, data = _publish_arguments(args.arguments, environ, usage)
        work = publish(url, args, token, data)
    else:
        url = _broker_url(args.url, environ, usage)
        headers = _headers(args.header, usage)
        body = _body(args.data, usage)
        work = bridge(url, args, token, headers, body)
    try:
        return asyncio.run(_interruptible(work))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``| head``): stop as a shell pipeline's writer would.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (CommandError, BrokerError) as exc:
        message = str(exc)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        message = f"cannot reach the broker at {url}: {_say(exc)}"
    print(f"sse-broker {name}: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_FAILED


async def _interruptible(work: Coroutine[Any, Any, int]) -> int:
    """Run ``work``; Ctrl-C cancels it and the exit status is 130, whatever it returns.

    asyncio's own handling raises KeyboardInterrupt only if the cancellation surfaces as
    such, and a library may finish its request instead (aiohttp completes a streamed body).
    """
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    interrupted: list[bool] = []

    def interrupt() -> None:
        interrupted.append(True)
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        status = await work
    except asyncio.CancelledError:
        if not interrupted:
            raise
        return EXIT_INTERRUPTED
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return EXIT_INTERRUPTED if interrupted else status


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _broker_url(
    given: str | None, environ: Mapping[str, str], usage: Callable[[str], NoReturn]
) -> str:
    url = given or environ.get("BROKER_URL")
    if not url:
        usage("give the broker's URL, or set BROKER_URL")
    if not url.startswith(("http://", "https://")):
        usage(f"the broker's URL must start with http:// or https://, not {url!r}")
    return url


def _publish_arguments(
    arguments: Sequence[str], environ: Mapping[str, str], usage: Callable[[str], NoReturn]
) -> tuple[str, str]:
    """``[URL] [DATA | -]``: a first argument that is an http(s) URL is the URL."""
    if len(arguments) > 2:
        usage("give at most a URL and the data")
    rest = list(arguments)
    given = rest.pop(0) if rest and rest[0].startswith(("http://", "https://")) else None
    if len(rest) > 1:
        usage(f"{rest[0]!r} is not an http:// or https:// URL")
    return _broker_url(given, environ, usage), rest[0] if rest else "-"


def _headers(values: Sequence[str], usage: Callable[[str], NoReturn]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, colon, content = value.partition(":")
        if not colon or not name.strip():
            usage(f"--header {value!r} is not 'Name: value'")
        headers[name.strip()] = content.strip()
    return headers


def _body(data: str | None, usage: Callable[[str], NoReturn]) -> bytes | None:
    if data is None:
        return None
    if data == "-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        try:
            with open(data[1:], "rb") as file:
                return file.read()
        except OSError as exc:
            usage(f"--data {data}: {exc.strerror or exc}")
    return data.encode("utf-8")


def _write_line(text: str) -> None:
    sys.stdout.buffer.write(text.encode("utf-8") + b"\n")
    sys.stdout.buffer.flush()


# --- tail -------------------------------------------------------------------------------


async def tail(url: str, topics: list[str], args: argparse.Namespace, token: str | None) -> int:
    async with Subscriber(url, topics, last_event_id=args.last_event_id, token=token) as events:
        async for event in events:
            if args.until_data is not None and event.data == args.until_data:
                return 0
            _print_event(event, as_json=args.json)
    return 0


def _print_event(event: Event, *, as_json: bool) -> None:
    if as_json:
        _write_line(
            orjson.dumps({"id": event.id, "event": event.event, "data": event.data}).decode("utf-8")
        )
    elif event.event.startswith("broker."):
        print(f"sse-broker tail: {event.event} {event.data}", file=sys.stderr, flush=True)
    else:
        _write_line(event.data)


# --- publish ----------------------------------------------------------------------------


async def publish(url: str, args: argparse.Namespace, token: str | None, data: str) -> int:
    async with Publisher(url, token) as publisher:
        if data != "-":
            ids = [
                await publisher.publish(
                    args.topics, data, args.event, args.retry, args.private, args.key
                )
            ]
        else:
            fields = _line_fields(args)
            lines = _stdin_lines()
            items = _with_fields(lines, fields) if fields else _nonblank(lines)
            ids = await publisher.publish_stream(items, topic=args.topics, key=args.key)
    for event_id in ids:
        _write_line(event_id)
    return 0


def _line_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.event is not None:
        fields["event"] = args.event
    if args.retry is not None:
        fields["retry"] = args.retry
    if args.private:
        fields["private"] = True
    return fields


async def _nonblank(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    async for line in lines:
        if line.strip():
            yield line


async def _with_fields(
    lines: AsyncIterator[str], fields: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """Lines as event objects carrying ``fields``, read as the broker reads an NDJSON line
    under ``?topic=``: a JSON object with ``data`` is an event object (its own fields win),
    anything else is data."""
    async for line in _nonblank(lines):
        try:
            parsed = orjson.loads(line)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and "data" in parsed:
            yield {**fields, **parsed}
        else:
            yield {**fields, "data": line}


async def _stdin_lines() -> AsyncIterator[str]:
    """Standard input's lines, each as soon as it is read, without its line break.

    A daemon thread does the blocking reads, so Ctrl-C is not held up by a read that
    never returns (an executor thread would be joined at exit). It reads the descriptor
    itself: a daemon thread blocked inside ``sys.stdin.buffer`` would hold that object's
    lock while the interpreter shuts down, which aborts the process.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def pump(descriptor: int) -> None:
        while True:
            try:
                chunk = os.read(descriptor, 65536)
            except OSError:
                chunk = b""
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
            if not chunk:
                return

    threading.Thread(target=pump, args=(sys.stdin.fileno(),), daemon=True).start()
    pending = b""
    number = 0
    while True:
        chunk = await queue.get()
        *lines, pending = (pending + chunk).split(b"\n") if chunk else [pending, b""]
        for raw in lines:
            number += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CommandError(f"standard input line {number} is not UTF-8") from None
            yield line.removesuffix("\r")
        if not chunk:
            return


# --- bridge -----------------------------------------------------------------------------


class UpstreamError(CommandError):
    """The upstream stream failed: refused, not SSE, cut off, or silent for too long."""


async def bridge(
    url: str,
    args: argparse.Namespace,
    token: str | None,
    headers: dict[str, str],
    body: bytes | None,
) -> int:
    method = args.method or ("POST" if body is not None else "GET")
    given = {name.lower() for name in headers}
    if body is not None and "content-type" not in given:
        headers["Content-Type"] = "application/json"
    if "accept" not in given:
        headers["Accept"] = "text/event-stream"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=args.idle_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as http, Publisher(url, token) as publisher:
        try:
            response = await http.request(method, args.upstream, headers=headers, data=body)
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"cannot reach {args.upstream}: {_say(exc)}") from None
        async with response:
            await _check_upstream(response)
            ids, failure = await _republish(response, publisher, args)
    if not args.quiet:
        last = f" (last id {ids[-1]})" if ids else ""
        print(
            f"sse-broker bridge: published {len(ids)} events to {', '.join(args.topics)}{last}",
            file=sys.stderr,
        )
    if failure is not None:
        raise failure
    return 0


async def _check_upstream(response: aiohttp.ClientResponse) -> None:
    if not 200 <= response.status < 300:
        text = " ".join((await response.text(errors="replace")).split())[:200]
        raise UpstreamError(
            f"upstream answered {response.status} {response.reason or ''}".rstrip()
            + (f": {text}" if text else "")
        )
    if response.content_type != "text/event-stream":
        raise UpstreamError(
            f"upstream answered with Content-Type {response.content_type!r}, not text/event-stream"
        )


async def _republish(
    response: aiohttp.ClientResponse, publisher: Publisher, args: argparse.Namespace
) -> tuple[list[str], UpstreamError | None]:
    """Publish each upstream event's data as it arrives, over one NDJSON stream.

    Each data is wrapped in an event object, so that it is published verbatim even when
    it is itself a JSON object with a ``data`` key. The stream is ended cleanly whatever
    happens upstream: what arrived before a failure stays published, and is counted.
    """
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def items() -> AsyncIterator[dict[str, Any]]:
        while (item := await queue.get()) is not None:
            yield item

    publishing: asyncio.Task[list[str]] | None = None
    failure: UpstreamError | None = None
    try:
        async for data in _upstream_data(response, args.done):
            if publishing is None:
                publishing = asyncio.create_task(
                    publisher.publish_stream(items(), topic=args.topics)
                )
            elif publishing.done():
                break
            item: dict[str, Any] = {"data": data}
            if args.event is not None:
                item["event"] = args.event
            queue.put_nowait(item)
    except UpstreamError as exc:
        failure = exc
    if publishing is None:
        return [], failure
    queue.put_nowait(None)
    try:
        ids = await publishing
    except BrokerError as exc:
        raise CommandError(f"the broker refused the events: {exc}") from None
    except aiohttp.ClientError as exc:
        raise CommandError(f"cannot publish to {publisher.url}: {_say(exc)}") from None
    return ids, failure


async def _upstream_data(response: aiohttp.ClientResponse, done: str) -> AsyncIterator[str]:
    parser = EventParser()
    count = 0
    try:
        async for chunk in response.content.iter_any():
            for event in parser.feed(chunk):
                count += 1
                yield event.data
                if done and event.data == done:
                    return
    except TimeoutError:
        raise UpstreamError(f"upstream sent nothing for a while after {count} events") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(
            f"upstream connection dropped after {count} events: {_say(exc)}"
        ) from None
    if done:
        raise UpstreamError(f"upstream stream ended after {count} events, before {done!r}")


def _say(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

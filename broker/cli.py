"""The ``sse-broker`` command.

``serve`` runs the broker until SIGTERM or SIGINT, then stops gracefully: it stops
accepting connections, ends every event stream cleanly (so each ``EventSource``
reconnects, to another node when there is one) and exits within ``--shutdown-timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from aiohttp import web

from broker import __version__
from broker.config import Config, ConfigError, add_serve_arguments, config_from_args
from broker.web import create_app

logger = logging.getLogger("broker")


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sse-broker", description="Server-Sent Events fan-out broker.")
    parser.add_argument("--version", action="version", version=f"sse-broker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = commands.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker. Every option can also be set as BROKER_<NAME>.",
    )
    add_serve_arguments(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        config = config_from_args(args, os.environ)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _raise_file_limit()
    try:
        _run(serve(config))
    except OSError as exc:
        print(
            f"sse-broker: error: cannot listen on {config.host}:{config.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _raise_file_limit() -> None:
    """Each stream holds a file descriptor; lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    logger.debug("file descriptor limit: %d", soft)


def _run(main_coroutine: object) -> None:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main_coroutine)  # type: ignore[arg-type]


async def serve(config: Config) -> None:
    """Serve until a stop signal, then shut down within ``config.shutdown_timeout``."""
    app = create_app(config)
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        # Half the budget ends the streams (on_shutdown), most of the rest lets publish
        # requests finish; what remains closes the backend.
        shutdown_timeout=config.shutdown_timeout * 0.4,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=4096)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info("sse-broker %s listening on http://%s:%d", __version__, config.host, config.port)
    await stop.wait()
    logger.info("stopping: ending streams, waiting up to %gs", config.shutdown_timeout)
    try:
        await asyncio.wait_for(runner.cleanup(), timeout=config.shutdown_timeout)
    except TimeoutError:
        logger.warning("shutdown timeout reached; closing remaining connections")
    logger.info("stopped")

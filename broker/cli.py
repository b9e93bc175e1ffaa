"""The ``sse-broker`` command.

``serve`` runs the broker until SIGTERM or SIGINT, then stops gracefully: it stops
accepting connections, ends every event stream cleanly (so each ``EventSource``
reconnects, to another node when there is one) and exits within ``--shutdown-timeout``.

With ``--workers N`` (N > 1, Redis only) the process is a supervisor: it starts N workers,
each the same command in a process of its own, all listening on the port with
``SO_REUSEPORT`` (the kernel spreads connections over them) and sharing the Redis log.
The supervisor forwards SIGTERM and SIGINT to them and waits for them. A worker that dies
on its own is not restarted: the supervisor stops the others and exits non-zero, so that
whatever runs the broker (systemd, Kubernetes, a container runtime) sees the failure and
restarts it whole, rather than a broker that limps on with fewer workers unnoticed. A
supervisor killed outright takes its workers with it (``_stop_with_supervisor``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from aiohttp import web

from broker import __version__
from broker.auth import start_warnings
from broker.client_cli import COMMANDS as CLIENT_COMMANDS
from broker.client_cli import (
    add_client_commands,
    run_client_command,
    take_trailing_positionals,
)
from broker.config import (
    Config,
    ConfigError,
    add_serve_arguments,
    config_from_args,
    workers_problem,
)
from broker.web import create_app
from broker.web.server import BrokerRunner

logger = logging.getLogger("broker")

KEEPALIVE_TIMEOUT = 75.0

# Set by the supervisor in each worker's environment: the worker's number (1 to N). Not an
# option: a worker is a serve process that shares its port (SO_REUSEPORT) on purpose.
WORKER_ENV = "SSE_BROKER_WORKER"
# The supervisor's pid, so that a worker can tell whether it outlived it.
SUPERVISOR_ENV = "SSE_BROKER_SUPERVISOR"
# linux/prctl.h: deliver a signal to this process when its parent exits.
PR_SET_PDEATHSIG = 1
# Extra time a worker gets, past its own --shutdown-timeout, before the supervisor kills it.
WORKER_STOP_GRACE = 5.0


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
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(arguments)
    extras = take_trailing_positionals(args, extras)
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command in CLIENT_COMMANDS:
        return run_client_command(parser, args, os.environ)
    try:
        config = config_from_args(args, os.environ)
    except ConfigError as exc:
        parser.error(str(exc))
    problem = workers_problem(config)
    if problem is not None:
        parser.error(problem)
    worker = os.environ.get(WORKER_ENV)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s"
        + (f"[worker {worker}]" if worker else "")
        + ": %(message)s",
    )
    _raise_file_limit()
    if worker and not _stop_with_supervisor():
        return 1
    if config.workers > 1 and not worker:
        return supervise(config, arguments)
    try:
        _run(serve(config, reuse_port=bool(worker)))
    except OSError as exc:
        print(
            f"sse-broker: error: cannot listen on {config.host}:{config.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _stop_with_supervisor() -> bool:
    """Have the kernel send this worker SIGTERM when its supervisor dies, however it dies.

    A supervisor stopped with SIGKILL cannot forward anything: without this its workers
    would go on serving the port, unsupervised, and a restarted supervisor would start a
    second set beside them. SIGTERM is the graceful stop, so their streams end cleanly.
    Returns False if the supervisor is already gone (it died before the request was made).
    """
    if sys.platform != "linux":
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning("cannot ask to be stopped with the supervisor: errno %d", ctypes.get_errno())
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor is not None and str(os.getppid()) != supervisor:
        logger.error("the supervisor (pid %s) is gone; not starting", supervisor)
        return False
    return True


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


async def serve(config: Config, *, reuse_port: bool = False) -> None:
    """Serve until a stop signal, then shut down within ``config.shutdown_timeout``.

    ``reuse_port``: listen with ``SO_REUSEPORT``, beside the other workers.
    """
    app = create_app(config)
    runner = BrokerRunner(
        app,
        header_timeout=config.header_timeout,
        # An idle kept-alive connection holds a descriptor: release it as nginx does.
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        access_log=None,
        handler_cancellation=True,
        # Half the budget ends the streams (on_shutdown), most of the rest lets publish
        # requests finish; what remains closes the backend.
        shutdown_timeout=config.shutdown_timeout * 0.4,
    )
    await runner.setup()
    site = web.TCPSite(
        runner, config.host, config.port, backlog=4096, reuse_port=reuse_port or None
    )
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
    for warning in start_warnings(
        host=config.host,
        publisher_key=config.publisher_key,
        subscriber_key=config.subscriber_key,
        allow_anonymous_publish=config.allow_anonymous_publish,
        allow_anonymous_subscribe=config.allow_anonymous_subscribe,
    ):
        logger.warning("%s", warning)
    await stop.wait()
    logger.info("stopping: ending streams, waiting up to %gs", config.shutdown_timeout)
    try:
        await asyncio.wait_for(runner.cleanup(), timeout=config.shutdown_timeout)
    except TimeoutError:
        logger.warning("shutdown timeout reached; closing remaining connections")
    logger.info("stopped")


def supervise(config: Config, arguments: Sequence[str]) -> int:
    """Run ``config.workers`` workers until a stop signal or until one of them dies.

    Returns 0 when every worker stopped cleanly after SIGTERM or SIGINT, 1 when a worker
    exited on its own (or failed to start) or did not stop cleanly.
    """
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop_signal.append(signum)

    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for number in range(1, config.workers + 1):
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "broker", *arguments],
                    env={**os.environ, WORKER_ENV: str(number), SUPERVISOR_ENV: str(os.getpid())},
                )
            )
        logger.info(
            "sse-broker %s supervising %d workers on http://%s:%d (pids %s)",
            __version__,
            len(workers),
            config.host,
            config.port,
            ", ".join(str(worker.pid) for worker in workers),
        )
        failed = _wait_for_stop_or_death(workers, stop_signal)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    forwarded = stop_signal[0] if stop_signal else signal.SIGTERM
    if failed is not None:
        logger.error(
            "worker (pid %d) exited with status %s; stopping the others",
            failed.pid,
            failed.returncode,
        )
    else:
        logger.info("stopping %d workers", len(workers))
    clean = _stop_workers(workers, forwarded, config.shutdown_timeout + WORKER_STOP_GRACE)
    logger.info("stopped")
    return 0 if clean and failed is None else 1


def _wait_for_stop_or_death(
    workers: list[subprocess.Popen[bytes]], stop_signal: list[int]
) -> subprocess.Popen[bytes] | None:
    """Wait for a stop signal (None) or a worker that exits on its own (that worker)."""
    while not stop_signal:
        for worker in workers:
            if worker.poll() is not None:
                return worker
        time.sleep(0.05)
    return None


def _stop_workers(workers: list[subprocess.Popen[bytes]], signum: int, budget: float) -> bool:
    """Signal every running worker, wait up to ``budget`` seconds, kill what is left.

    Returns whether every worker signalled here exited with status 0.
    """
    signalled = [worker for worker in workers if worker.poll() is None]
    for worker in signalled:
        with contextlib.suppress(ProcessLookupError):
            worker.send_signal(signum)
    deadline = time.monotonic() + budget
    clean = True
    for worker in signalled:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("worker (pid %d) did not stop in time; killing it", worker.pid)
            worker.kill()
            worker.wait()
        clean = clean and worker.returncode == 0
    return clean

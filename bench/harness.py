"""The machinery under ``bench/run.py``: child processes, load generator handles, the
publisher, and what ``/proc`` says about the server.

Everything here runs in the driver process. The driver never does a fan-out's work
itself: the server, each load generator and the driver are separate processes, and the
driver only publishes (a raw HTTP/1.1 keep-alive socket, the cheapest client Python
has) and reads the load generators' reports.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from loadgen import bucket_value

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
TOPIC = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """A run that cannot go on (a server that does not start, a crashed process)."""


# --------------------------------------------------------------------------- processes


class ProcessGroup:
    """Every child process the driver starts, so that all of them can be stopped.

    Each child gets its own session (so a server's own children die with it when its
    group is killed) and, through ``setpriv --pdeathsig KILL``, is killed by the kernel
    if the driver dies without cleaning up (SIGKILL, OOM). ``stop_all`` runs on normal
    exit, on exceptions and on Ctrl-C/SIGTERM.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[subprocess.Popen[bytes]] = []
        self._setpriv = shutil.which("setpriv")

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_name: str,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        prefix = [self._setpriv, "--pdeathsig", "KILL", "--"] if self._setpriv else []
        log = (self.log_dir / f"{log_name}.log").open("ab")
        try:
            process = subprocess.Popen(
                [*prefix, *argv],
                stdin=stdin,
                stdout=stdout,
                stderr=log,
                cwd=ROOT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._children.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        # Whatever the child left behind in its group goes too.
        _signal_group(process.pid, signal.SIGKILL)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(ValueError):
            self._children.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self._children)):
            self.stop(process, grace=1.0)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def log_tail(path: Path, lines: int = 2) -> str:
    """The last lines of a child's stderr on one line (a traceback ends with its error)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()]
    return f"[{' | '.join(tail)}]" if tail else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- /proc


def listening_sockets(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port`` (``/proc/net/tcp``): one per worker
    when the workers share the port with ``SO_REUSEPORT``."""
    wanted = f"0100007F:{port:04X}"
    found = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[1] == wanted and fields[3] == "0A":
                found += 1
    return found


def socket_count(pid: int) -> int:
    """Open sockets of one process (its file descriptors that are sockets)."""
    found = 0
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith("socket:"):
                    found += 1
    return found


REDIS_SERVER = "redis-server"


def start_redis(group: ProcessGroup, timeout: float = 10.0) -> tuple[subprocess.Popen[bytes], int]:
    """A private ``redis-server`` on a free port, nothing persisted; its process and port.
    Raises ``BenchError`` when it is not installed or does not answer PING."""
    binary = shutil.which(REDIS_SERVER)
    if binary is None:
        raise BenchError(f"{REDIS_SERVER} is not on the PATH")
    port = free_port()
    process = group.spawn(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        log_name="redis-server",
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{REDIS_SERVER} exited with status {process.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock,
        ):
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return process, port
        time.sleep(0.05)
    group.stop(process)
    raise BenchError(f"{REDIS_SERVER} did not answer PING within {timeout:g}s")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a server may fork workers)."""
    found = [pid]
    position = 0
    while position < len(found):
        current = found[position]
        position += 1
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` and its descendants."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and its descendants (from ``/proc/PID/statm``)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * PAGE_SIZE
    return total


def status_bytes(pid: int, key: str) -> int:
    """A ``kB`` line of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Samples a process tree's CPU seconds and RSS every ``interval`` seconds in a thread,
    so a window's CPU time can be read at any instant (interpolated) and its peak RSS
    is seen even between the driver's own measurements."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.rss: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            cpu = cpu_seconds(self.pid)
            rss = rss_bytes(self.pid)
            with self._lock:
                self.times.append(now)
                self.cpu.append(cpu)
                self.rss.append(rss)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def cpu_at(self, instant: float) -> float:
        with self._lock:
            times, cpu = self.times, self.cpu
            if not times:
                return cpu_seconds(self.pid)
            index = bisect.bisect_left(times, instant)
            if index == 0:
                return cpu[0]
            if index >= len(times):
                return cpu[-1]
            before, after = times[index - 1], times[index]
            share = (instant - before) / (after - before) if after > before else 0.0
            return cpu[index - 1] + share * (cpu[index] - cpu[index - 1])

    def cpu_between(self, start: float, end: float) -> float:
        return self.cpu_at(end) - self.cpu_at(start)

    def peak_rss(self, start: float, end: float) -> int:
        with self._lock:
            low = bisect.bisect_left(self.times, start)
            high = bisect.bisect_right(self.times, end)
            window = self.rss[low:high]
        return max(window, default=rss_bytes(self.pid))


# --------------------------------------------------------------------------- histogram


@dataclass
class Histogram:
    """Publish -> receive latency: log-spaced bucket counts (nanoseconds) and the max."""

    counts: dict[int, int] = field(default_factory=dict)
    maximum: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, counts: dict[int, int], maximum: int) -> None:
        for index, count in counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.maximum = max(self.maximum, maximum)

    def percentile(self, share: float) -> float:
        """The value (seconds) below which ``share`` of the samples lie, to a bucket's width."""
        total = self.total
        if not total:
            return float("nan")
        wanted = share * total
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= wanted:
                return min(bucket_value(index), float(self.maximum)) / 1e9
        return self.maximum / 1e9

    def summary(self) -> dict[str, float]:
        return {
            "samples": float(self.total),
            "p50": self.percentile(0.50),
            "p90": self.percentile(0.90),
            "p99": self.percentile(0.99),
            "p999": self.percentile(0.999),
            "max": self.maximum / 1e9 if self.total else float("nan"),
        }


# --------------------------------------------------------------------------- load generators


@dataclass
class Report:
    time: float
    events: int
    latency: dict[int, int]
    latency_max: int


@dataclass(frozen=True)
class Mark:
    """Where each load generator's report stream stood at one instant."""

    positions: tuple[int, ...]
    times: tuple[float, ...]
    events: tuple[int, ...]

    @property
    def time(self) -> float:
        return sum(self.times) / len(self.times) if self.times else time.monotonic()


class Loadgen:
    """One ``bench/loadgen.py`` process and a thread that reads its reports as they come.

    The thread reads stdout continuously, so the pipe never fills and the load
    generator's event loop never blocks on a report.
    """

    def __init__(
        self,
        group: ProcessGroup,
        port: int,
        connections: int,
        *,
        name: str,
        sample: int = 200,
        stalled: float = 0.0,
        concurrency: int = 100,
        connect_timeout: float = 30.0,
        path: str | None = None,
        first: int = 0,
    ) -> None:
        """``path``, ``first``: loadgen.py's ``--path`` (None: ``/events``) and ``--first``."""
        self.name = name
        self.connections = connections
        self.group = group
        self.process = group.spawn(
            [
                PYTHON,
                str(HERE / "loadgen.py"),
                "--port",
                str(port),
                "--connections",
                str(connections),
                "--sample",
                str(sample),
                "--stalled",
                str(stalled),
                "--concurrency",
                str(concurrency),
                "--connect-timeout",
                str(connect_timeout),
                *(["--path", path, "--first", str(first)] if path is not None else []),
            ],
            log_name=name,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.hello: dict[str, Any] = {}
        self.connected: dict[str, Any] | None = None
        self.reports: list[Report] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sampling_acks = 0
        self._thread = threading.Thread(target=self._follow, name=name, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        for raw in stdout:
            with contextlib.suppress(ValueError):
                message = json.loads(raw)
                kind = message.get("type")
                with self._changed:
                    if kind == "report":
                        self.reports.append(
                            Report(
                                message["t"],
                                message["events"],
                                {int(k): v for k, v in message["latency"].items()},
                                message["latency_max"],
                            )
                        )
                    elif kind == "connected":
                        self.connected = message
                    elif kind == "hello":
                        self.hello = message
                    elif kind == "sampling":
                        self._sampling_acks += 1
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def readers(self) -> int:
        if self.connected is None:
            return 0
        return int(self.connected["connected"]) - int(self.connected["stalled"])

    def wait_connected(self, timeout: float) -> dict[str, Any]:
        with self._changed:
            self._changed.wait_for(lambda: self.connected is not None or not self.alive, timeout)
            if self.connected is None:
                tail = log_tail(self.group.log_dir / f"{self.name}.log")
                raise BenchError(f"{self.name}: no connections after {timeout:g}s {tail}")
            return self.connected

    def wait_report(self, timeout: float = 2.0) -> None:
        """Wait for a report newer than the one already seen."""
        with self._changed:
            count = len(self.reports)
            self._changed.wait_for(lambda: len(self.reports) > count or not self.alive, timeout)

    def set_sampling(self, fraction: float, *, quiet: bool = False, timeout: float = 5.0) -> None:
        """Sample ``fraction`` of the readers; with ``quiet`` the others pause until the
        next call (see ``loadgen.py``). Returns once the load generator has applied it."""
        stdin = self.process.stdin
        if stdin is None or not self.alive:
            return
        with self._changed:
            acks = self._sampling_acks
        with contextlib.suppress(OSError):
            stdin.write(f"sample {fraction}{' quiet' if quiet else ''}\n".encode())
            stdin.flush()
        with self._changed:
            self._changed.wait_for(lambda: self._sampling_acks > acks or not self.alive, timeout)

    def latest(self) -> tuple[int, float, int]:
        with self._lock:
            if not self.reports:
                return 0, time.monotonic(), 0
            last = self.reports[-1]
            return len(self.reports), last.time, last.events

    def latency_between(self, start: int, end: int) -> list[Report]:
        with self._lock:
            return self.reports[start:end]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def close(self) -> None:
        """Close stdin (the load generator's signal to leave), then make sure it did."""
        stdin = self.process.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(2.0)
        self.group.stop(self.process, grace=1.0)


def mark(loadgens: Sequence[Loadgen]) -> Mark:
    """The newest report of every load generator, taken right after a fresh one arrived."""
    for loadgen in loadgens:
        loadgen.wait_report(0.5)
    latest = [loadgen.latest() for loadgen in loadgens]
    return Mark(
        tuple(item[0] for item in latest),
        tuple(item[1] for item in latest),
        tuple(item[2] for item in latest),
    )


def total_events(loadgens: Sequence[Loadgen]) -> int:
    return sum(loadgen.latest()[2] for loadgen in loadgens)


def delivery_rate(start: Mark, end: Mark) -> tuple[int, float]:
    """Events received between two marks, and their rate (each generator on its own clock
    readings, summed)."""
    count = 0
    rate = 0.0
    for t0, t1, e0, e1 in zip(start.times, end.times, start.events, end.events, strict=True):
        count += e1 - e0
        if t1 > t0:
            rate += (e1 - e0) / (t1 - t0)
    return count, rate


def latency_between(loadgens: Sequence[Loadgen], start: Mark, end: Mark) -> Histogram:
    histogram = Histogram()
    for loadgen, low, high in zip(loadgens, start.positions, end.positions, strict=True):
        for report in loadgen.latency_between(low, high):
            histogram.add(report.latency, report.latency_max)
    return histogram


# --------------------------------------------------------------------------- publisher


def event_json(pad: bytes, topic: bytes = TOPIC.encode()) -> bytes:
    """One event object whose data starts with the publish stamp (``time.monotonic_ns``).
    ``topic`` goes in as it is: it must need no JSON escaping."""
    return b'{"topic":"%s","data":"%d %s"}' % (topic, time.monotonic_ns(), pad)


def padding(size: int) -> bytes:
    """Filler so that the event's data is about ``size`` bytes (stamp, space, filler)."""
    return b"x" * max(size - 20, 0)


class HttpConnection:
    """A keep-alive HTTP/1.1 client on a raw socket: no library between us and the server."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader: IO[bytes] = self.sock.makefile("rb")

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + body)
        return self.read_response()

    def read_response(self) -> tuple[int, bytes]:
        status_line = self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length: int | None = None
        chunked = False
        while True:
            line = self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            parts = []
            while True:
                size = int(self.reader.readline().split(b";")[0], 16)
                if size == 0:
                    self.reader.readline()
                    break
                parts.append(self.reader.read(size))
                self.reader.readline()
            return status, b"".join(parts)
        return status, self.reader.read(length or 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"exited with status {process.returncode} before serving")
        try:
            connection = HttpConnection(port, timeout=2.0)
            try:
                status, _ = connection.request("GET", "/healthz")
            finally:
                connection.close()
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"not healthy after {timeout:g}s")


@dataclass
class PublishResult:
    events: int = 0
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    error: str = ""
    response_times: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def response_time(self, share: float) -> float:
        """A percentile of the POST response times, in seconds (nan when none)."""
        if not self.response_times:
            return float("nan")
        ordered = sorted(self.response_times)
        return ordered[min(int(share * len(ordered)), len(ordered) - 1)]


class Publisher:
    """Posts events to ``POST /publish`` over one keep-alive connection."""

    def __init__(self, port: int, size: int, timeout: float = 30.0, topic: str = TOPIC) -> None:
        self.port = port
        self.pad = padding(size)
        self.topic = topic.encode()
        self.connection = HttpConnection(port, timeout=timeout)
        self.held = 0.0  # seconds spent waiting on ``hold``, readable while publishing

    def close(self) -> None:
        self.connection.close()

    def post(self, count: int) -> int:
        """Post ``count`` events: one object when 1, else one JSON array. Returns the status."""
        if count == 1:
            body = event_json(self.pad, self.topic)
        else:
            body = b"[" + b",".join(event_json(self.pad, self.topic) for _ in range(count)) + b"]"
        status, _ = self.connection.request("POST", "/publish", body)
        return status

    def at_rate(self, rate: float, seconds: float) -> PublishResult:
        """One event per POST on a fixed schedule for ``seconds``, catching up back to back
        when late (a server too slow to answer gets fewer events, not a longer phase).
        Each POST's response time is kept: for a server that answers after writing to
        every subscriber (ours, the raw one) it is the fan-out's duration."""
        result = PublishResult()
        started = time.monotonic()
        total = int(rate * seconds)
        try:
            for number in range(total):
                now = time.monotonic()
                if now - started > seconds:
                    break
                delay = started + number / rate - now
                if delay > 0:
                    time.sleep(delay)
                sent = time.perf_counter()
                status = self.post(1)
                result.response_times.append(time.perf_counter() - sent)
                if status == 200:
                    result.events += 1
                else:
                    result.errors += 1
                result.requests += 1
        except OSError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        # The schedule's length, not the time to the last POST (rate x seconds events span
        # seconds), unless the server made it longer.
        result.seconds = max(time.monotonic() - started, seconds)
        return result

    def as_fast_as_possible(
        self, seconds: float, batch: int, hold: Callable[[int], bool] | None = None
    ) -> PublishResult:
        """Back-to-back POSTs of ``batch`` events for ``seconds``.

        ``hold(published)`` is asked before each POST; while it says so the publisher
        waits (the subscribers are too far behind), so a server that queues per client
        is measured at the rate it delivers, not at the rate it can grow its queues.
        """
        result = PublishResult()
        started = time.monotonic()
        deadline = started + seconds
        try:
            while time.monotonic() < deadline:
                if hold is not None and hold(result.events):
                    before = time.monotonic()
                    time.sleep(0.002)
                    self.held += time.monotonic() - before
                    continue
                if self.post(batch) == 200:
                    result.events += batch
                else:
                    result.errors += 1
                result.requests += 1
        except OSError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        return result

    def ndjson_stream(self, seconds: float, lines_per_write: int = 100) -> PublishResult:
        """One endless-looking ``application/x-ndjson`` POST (chunked) for ``seconds``.

        Events/s accepted is the lines the server acknowledged over the time until its
        response: ``sendall`` blocks while the server is not reading, so this is the
        rate the server takes them in.
        """
        result = PublishResult()
        connection = HttpConnection(self.port)
        started = time.monotonic()
        deadline = started + seconds
        try:
            connection.sock.sendall(
                b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            while time.monotonic() < deadline:
                body = b"".join(
                    event_json(self.pad, self.topic) + b"\n" for _ in range(lines_per_write)
                )
                connection.sock.sendall(b"%x\r\n%b\r\n" % (len(body), body))
                result.requests += 1
            connection.sock.sendall(b"0\r\n\r\n")
            status, body = connection.read_response()
            if status == 200:
                result.events = len(json.loads(body)["ids"])
            else:
                result.errors += 1
                result.error = body.decode(errors="replace")[:200]
        except (OSError, ValueError, KeyError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            connection.close()
        result.seconds = time.monotonic() - started
        return result

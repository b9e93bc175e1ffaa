"""Benchmark driver: sse-broker against three baselines, side by side, in one invocation.

    .venv/bin/python bench/run.py               # quick mode (make bench), under 5 minutes
    .venv/bin/python bench/run.py --mode full   # make bench-full
    .venv/bin/python bench/run.py --servers broker,raw_asyncio --scenarios fanout --no-doc
    .venv/bin/python bench/run.py --servers broker --scenarios mercure  # its doc section only

Each server (our broker and the baselines in ``bench/servers/``) runs as its own process
on 127.0.0.1, loaded by separate ``bench/loadgen.py`` processes, while this driver
publishes over a raw keep-alive socket and samples the server's CPU and RSS from
``/proc``. Scenarios run one at a time and, inside each, the servers one after another,
so that every comparison is made minutes apart at most: absolute numbers drift on a
shared machine, ratios much less.

Output: a table on stdout, ``docs/benchmarks.md`` (machine, versions, tables, targets)
with ``docs/bench-*.png`` plots, and ``docs/bench-results.json`` (every number).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import report
from harness import (
    HERE,
    PYTHON,
    ROOT,
    TOPIC,
    BenchError,
    HttpConnection,
    Loadgen,
    ProcessGroup,
    Publisher,
    Sampler,
    delivery_rate,
    free_port,
    latency_between,
    listening_sockets,
    log_tail,
    mark,
    process_tree,
    rss_bytes,
    socket_count,
    start_redis,
    total_events,
    wait_healthy,
)
from loadgen import NUMBER

KIB = 1024
MIB = 1024 * 1024
LOADGEN_MAX = 5000  # subscribers per load generator process


@dataclass(frozen=True)
class ServerSpec:
    key: str
    label: str
    script: Path | None  # None: our broker, run as a module
    flags: tuple[str, ...] = ()

    def argv(self, port: int, extra: list[str]) -> list[str]:
        if self.script is None:
            return [
                PYTHON,
                "-m",
                "broker",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--allow-anonymous-publish",
                *extra,
            ]
        return [
            PYTHON,
            str(self.script),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self.flags,
        ]

    @property
    def available(self) -> bool:
        return self.script is None or self.script.exists()


SERVERS = (
    ServerSpec("broker", "sse-broker", None),
    ServerSpec("raw_asyncio", "raw asyncio (limit)", HERE / "servers" / "raw_asyncio.py"),
    ServerSpec(
        "aiohttp_sse_pattern", "aiohttp-sse pattern", HERE / "servers" / "aiohttp_sse_pattern.py"
    ),
    ServerSpec(
        "sse_starlette_pattern",
        "sse-starlette pattern",
        HERE / "servers" / "sse_starlette_pattern.py",
    ),
)
# The raw server joining each JSON batch into one write per subscriber, as the broker does:
# the fair limit when events are published in batches.
RAW_COALESCING = ServerSpec(
    "raw_asyncio_coalescing",
    "raw asyncio, coalescing",
    HERE / "servers" / "raw_asyncio.py",
    ("--coalesce",),
)
PUBLISH_PATH_KINDS = ("single", "batch", "ndjson")


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one mode. Durations are seconds of measurement."""

    mode: str
    idle_steps: tuple[int, ...]  # connections added per step; idle RSS measured after each
    settle: float  # seconds between a step's last connect and its RSS reading
    latency_rates: tuple[float, ...]  # events/s at the largest subscriber count
    latency_seconds: float
    fanout_small: int  # subscribers of the first fan-out point of the middle session
    fanout_mid: tuple[int, ...]  # further fan-out points of the middle session (cumulative)
    fanout_seconds: float
    fanout_warmup: float
    batched_sizes: tuple[int, ...]  # fan-out with JSON batches: broker vs coalescing raw
    batched_batch: int
    fixed_rate: float  # the CPU-per-delivery load: events/s to ``fixed_subscribers``
    fixed_subscribers: int
    fixed_seconds: float
    slow_readers: int
    slow_stalled: int
    slow_rate: float
    slow_size: int  # event data bytes: large, so stalled sockets back up within seconds
    slow_reference_seconds: float
    slow_seconds: float
    publish_seconds: float
    publish_batch: int
    event_size: int = 128
    connect_timeout: float = 60.0
    loadgen_sample: int = 200  # latency-sampled connections per load generator
    latency_share: float = 0.1  # of the largest count, sampled; the others pause meanwhile
    scale_sizes: tuple[int, ...] = (1000,)  # scale-out: subscribers of each comparison
    scale_latency_rate: float = 20.0  # events/s of the scale-out latency phase
    scale_latency_seconds: float = 2.0
    # Mercure session: subscribers of each subscription kind, and rounds over all the
    # kinds (the median is reported); each fan-out window lasts ``fanout_seconds``.
    mercure_subscribers: int = 1000
    mercure_rounds: int = 3

    @property
    def largest(self) -> int:
        return sum(self.idle_steps)


PLANS = {
    "quick": Plan(
        mode="quick",
        idle_steps=(1000, 4000, 5000),
        settle=0.7,
        latency_rates=(1.0,),
        latency_seconds=4.0,
        fanout_small=100,
        fanout_mid=(1000,),
        fanout_seconds=2.5,
        fanout_warmup=0.5,
        batched_sizes=(1000,),
        batched_batch=10,
        fixed_rate=30.0,
        fixed_subscribers=1000,
        fixed_seconds=3.0,
        slow_readers=450,
        slow_stalled=50,
        slow_rate=50.0,
        slow_size=16 * KIB,
        slow_reference_seconds=3.0,
        slow_seconds=6.0,
        publish_seconds=1.5,
        publish_batch=100,
    ),
    "full": Plan(
        mode="full",
        idle_steps=(1000, 4000, 5000),
        settle=2.0,
        latency_rates=(1.0, 10.0),
        latency_seconds=30.0,
        fanout_small=100,
        fanout_mid=(1000, 5000),
        fanout_seconds=10.0,
        fanout_warmup=2.0,
        batched_sizes=(1000, 10000),
        batched_batch=10,
        fixed_rate=30.0,
        fixed_subscribers=1000,
        fixed_seconds=20.0,
        slow_readers=900,
        slow_stalled=100,
        slow_rate=25.0,
        slow_size=16 * KIB,
        slow_reference_seconds=15.0,
        slow_seconds=30.0,
        publish_seconds=5.0,
        publish_batch=100,
        connect_timeout=120.0,
        scale_sizes=(1000, 10000),
        scale_latency_seconds=10.0,
        mercure_subscribers=5000,
    ),
}


@dataclass
class Context:
    plan: Plan
    group: ProcessGroup
    broker_args: list[str]
    started: float = field(default_factory=time.monotonic)
    results: dict[str, Any] = field(default_factory=dict)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def record(self, scenario: str, server: str, value: Any) -> None:
        self.results.setdefault(scenario, {})[server] = value

    def error(self, server: str, scenario: str, message: str) -> None:
        self.results.setdefault("errors", {}).setdefault(server, []).append(
            f"{scenario}: {message}"
        )
        self.log(f"{server}: {scenario} FAILED: {message}")


class ServerRun:
    """One server process with its sampler and load generators, all stopped on exit."""

    def __init__(
        self,
        ctx: Context,
        spec: ServerSpec,
        session: str,
        *,
        extra: list[str] | None = None,
        listeners: int = 1,
    ) -> None:
        """``extra``: the broker's flags instead of ``--broker-args``; ``listeners``: the
        sockets to wait for on the port (one per ``--workers`` process)."""
        self.ctx = ctx
        self.spec = spec
        self.session = session
        self.port = free_port()
        self.log_name = f"{spec.key}-{session}"
        if extra is None:
            extra = ctx.broker_args if spec.script is None else []
        self.process = ctx.group.spawn(spec.argv(self.port, extra), log_name=self.log_name)
        self.loadgens: list[Loadgen] = []
        self.sampler: Sampler | None = None
        try:
            wait_healthy(self.port, self.process, timeout=30.0)
            wait_listeners(self.port, self.process, listeners, timeout=30.0)
        except BenchError as exc:
            self.close()
            raise BenchError(f"{exc} {self.log_tail()}") from None
        self.sampler = Sampler(self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self) -> str:
        return log_tail(self.ctx.group.log_dir / f"{self.log_name}.log")

    def check(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"server exited with status {self.process.returncode}: {self.log_tail()}"
            )

    def add_loadgen(
        self,
        connections: int,
        *,
        sample: int = 0,
        stalled: float = 0.0,
        path: str | None = None,
        first: int = 0,
    ) -> tuple[Loadgen, dict[str, Any]]:
        """``path`` and ``first``: as ``Loadgen`` takes them (None: ``/events``)."""
        name = f"{self.log_name}-loadgen{len(self.loadgens)}"
        loadgen = Loadgen(
            self.ctx.group,
            self.port,
            connections,
            name=name,
            sample=sample,
            stalled=stalled,
            connect_timeout=self.ctx.plan.connect_timeout / 2,
            path=path,
            first=first,
        )
        self.loadgens.append(loadgen)
        info = loadgen.wait_connected(self.ctx.plan.connect_timeout)
        if info["failed"]:
            self.ctx.log(
                f"{self.spec.key}: {info['failed']} of {connections} connections failed "
                f"({'; '.join(info['errors'])})"
            )
        self.check()
        return loadgen, info

    def add_subscribers(
        self, count: int, *, sample: int = 0, path: str | None = None, first: int = 0
    ) -> None:
        """``count`` more subscribers, in load generators of at most ``LOADGEN_MAX`` each
        (one process holds no more sockets than that comfortably)."""
        while count > 0:
            step = min(count, LOADGEN_MAX)
            self.add_loadgen(step, sample=sample, path=path, first=first)
            first += step
            count -= step

    def close(self) -> None:
        for loadgen in self.loadgens:
            loadgen.close()
        self.loadgens.clear()
        if self.sampler is not None:
            self.sampler.stop()
        self.ctx.group.stop(self.process, grace=3.0)

    def __enter__(self) -> ServerRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_listeners(
    port: int, process: subprocess.Popen[bytes], wanted: int, timeout: float
) -> None:
    """Wait until ``wanted`` sockets listen on the port: with ``--workers`` the first
    worker answers /healthz before the others listen, and connections made meanwhile
    would all go to it."""
    deadline = time.monotonic() + timeout
    while listening_sockets(port) < wanted:
        if process.poll() is not None:
            raise BenchError(f"exited with status {process.returncode} before serving")
        if time.monotonic() > deadline:
            raise BenchError(f"{listening_sockets(port)} of {wanted} listeners after {timeout:g}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- phases


def readers_of(loadgens: list[Loadgen]) -> int:
    return sum(loadgen.readers for loadgen in loadgens)


def wait_delivered(loadgens: list[Loadgen], target: int, timeout: float) -> None:
    """Wait until the load generators have counted ``target`` events in all, or give up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and total_events(loadgens) < target:
        time.sleep(0.05)


def wait_quiet(loadgens: list[Loadgen], timeout: float) -> None:
    """Wait until no more events arrive (a baseline's queues have drained)."""
    deadline = time.monotonic() + timeout
    last = total_events(loadgens)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = total_events(loadgens)
        if now == last:
            return
        last = now


def measure_fixed_load(
    run: ServerRun, loadgens: list[Loadgen], rate: float, seconds: float, size: int
) -> dict[str, Any]:
    """Publish single events at ``rate`` for ``seconds``; CPU, deliveries and latency."""
    readers = readers_of(loadgens)
    publisher = Publisher(run.port, size, timeout=10.0)
    try:
        start = mark(loadgens)
        before = total_events(loadgens)
        loadgen_cpu = sum(loadgen.cpu_seconds() for loadgen in loadgens)
        result = publisher.at_rate(rate, seconds)
        expected = result.events * readers
        wait_delivered(loadgens, before + expected, timeout=max(2.0, 2.0 / rate))
        end = mark(loadgens)
        loadgen_cpu = sum(loadgen.cpu_seconds() for loadgen in loadgens) - loadgen_cpu
    finally:
        publisher.close()
    run.check()
    assert run.sampler is not None
    delivered, _ = delivery_rate(start, end)
    elapsed = end.time - start.time
    cpu = run.sampler.cpu_between(start.time, end.time)
    return {
        "subscribers": readers,
        "rate": rate,
        "published": result.events,
        "publish_rate": result.rate,
        "publish_error": result.error,
        "delivered": delivered,
        "delivered_share": delivered / expected if expected else 0.0,
        "deliveries_per_s": delivered / result.seconds if result.seconds else 0.0,
        "cpu_seconds": cpu,
        "cpu_share": cpu / elapsed if elapsed > 0 else 0.0,
        "cpu_us_per_delivery": cpu / delivered * 1e6 if delivered else float("nan"),
        "loadgen_cpu_us_per_delivery": loadgen_cpu / delivered * 1e6 if delivered else float("nan"),
        "latency": latency_between(loadgens, start, end).summary(),
        "rss": rss_bytes(run.pid),
    }


MIN_LEAD = 20  # events per subscriber the publisher may be ahead before any rate is known
LEAD_SECONDS = 1.0


def measure_fanout(
    run: ServerRun,
    loadgens: list[Loadgen],
    batch: int = 1,
    others: Sequence[ServerRun] = (),
    *,
    topic: str = TOPIC,
) -> dict[str, Any]:
    """Publish back to back (``batch`` events per POST); deliveries/s and CPU over a
    window after a warm-up.

    The publisher holds back while the average subscriber is more events behind than it
    receives in ``LEAD_SECONDS`` (at least ``MIN_LEAD``), so per-client queues (the
    baselines') stay short: the number measured is the delivery rate the server
    sustains, not the rate it can grow queues at, and the next phase does not start on a
    backlog. The lead follows the measured rate, so the load generators' report
    interval (counts are up to 50 ms old) never caps the rate: a fixed lead would.

    ``others``: further broker nodes the subscribers are connected to (publishing goes
    to ``run``); their CPU and RSS are added to the server's. ``topic``: the events'.
    """
    plan = run.ctx.plan
    readers = max(readers_of(loadgens), 1)
    base = total_events(loadgens)
    pace = {"time": time.monotonic(), "delivered": 0.0, "rate": 0.0}

    def hold(published: int) -> bool:
        delivered = (total_events(loadgens) - base) / readers
        now = time.monotonic()
        if now - pace["time"] >= 0.2:
            pace["rate"] = (delivered - pace["delivered"]) / (now - pace["time"])
            pace["time"], pace["delivered"] = now, delivered
        lead = max(MIN_LEAD + batch, LEAD_SECONDS * pace["rate"])
        return published - delivered > lead

    total_seconds = plan.fanout_warmup + plan.fanout_seconds + 0.3
    publisher = Publisher(run.port, plan.event_size, timeout=total_seconds + 5.0, topic=topic)
    outcome: dict[str, Any] = {}
    published_at: list[int] = []
    progress = {"events": 0}

    def counting_hold(published: int) -> bool:
        progress["events"] = published
        return hold(published)

    def publish() -> None:
        outcome["result"] = publisher.as_fast_as_possible(total_seconds, batch, counting_hold)

    thread = threading.Thread(target=publish, name="publisher", daemon=True)
    thread.start()
    try:
        time.sleep(plan.fanout_warmup)
        start = mark(loadgens)
        published_at.append(progress["events"])
        held = publisher.held
        loadgen_cpu = sum(loadgen.cpu_seconds() for loadgen in loadgens)
        time.sleep(plan.fanout_seconds)
        end = mark(loadgens)
        published_at.append(progress["events"])
        held = publisher.held - held
        loadgen_cpu = sum(loadgen.cpu_seconds() for loadgen in loadgens) - loadgen_cpu
        thread.join(timeout=total_seconds + 10.0)
    finally:
        publisher.close()  # also unblocks a publisher stuck on a server that stopped answering
        thread.join(timeout=5.0)
    servers = [run, *others]
    for server in servers:
        server.check()
    delivered, rate = delivery_rate(start, end)
    elapsed = end.time - start.time
    cpu = 0.0
    for server in servers:
        assert server.sampler is not None
        cpu += server.sampler.cpu_between(start.time, end.time)
    published = published_at[1] - published_at[0]
    result = outcome.get("result")
    wait_quiet(loadgens, timeout=5.0)
    return {
        "subscribers": readers,
        "batch": batch,
        "deliveries_per_s": rate,
        "delivered": delivered,
        "published_per_s": published / elapsed if elapsed > 0 else 0.0,
        "kept_up": delivered / (published * readers) if published else 0.0,
        "held_share": held / elapsed if elapsed > 0 else 0.0,
        "cpu_share": cpu / elapsed if elapsed > 0 else 0.0,
        "cpu_s_per_million": cpu / delivered * 1e6 if delivered else float("nan"),
        "loadgen_cpu_s_per_million": loadgen_cpu / delivered * 1e6 if delivered else float("nan"),
        "publish_error": result.error if result is not None else "publisher did not finish",
        "rss": sum(rss_bytes(server.pid) for server in servers),
        "window": [start.time, end.time],
    }


def measure_latency(
    run: ServerRun, loadgens: list[Loadgen], rate: float, seconds: float
) -> dict[str, Any]:
    """Single events at ``rate``. A spread ``latency_share`` of the connections is sampled
    and the others stop reading meanwhile (the kernel keeps their bytes; the server does
    the same work), so the load generators' own turn to read 10k sockets per event does
    not become the latency measured. The paused ones are read, and counted, afterwards."""
    plan = run.ctx.plan
    readers = readers_of(loadgens)
    publisher = Publisher(run.port, plan.event_size, timeout=seconds + 10.0)
    try:
        for loadgen in loadgens:
            loadgen.set_sampling(plan.latency_share, quiet=True)
        start = mark(loadgens)
        before = total_events(loadgens)
        result = publisher.at_rate(rate, seconds)
        time.sleep(min(1.0, 1.0 / rate))
        for loadgen in loadgens:
            loadgen.set_sampling(plan.latency_share)
        wait_delivered(loadgens, before + result.events * readers, timeout=5.0)
        end = mark(loadgens)
    finally:
        publisher.close()
    run.check()
    delivered, _ = delivery_rate(start, end)
    expected = result.events * readers
    return {
        "subscribers": readers,
        "rate": rate,
        "published": result.events,
        "publish_error": result.error,
        "publish_rate": result.rate,
        "delivered_share": delivered / expected if expected else 0.0,
        "post_p50": result.response_time(0.5),
        "post_max": result.response_time(1.0),
        **latency_between(loadgens, start, end).summary(),
    }


# --------------------------------------------------------------------------- sessions


def session_large(ctx: Context, spec: ServerSpec) -> None:
    """Idle RSS per connection at each step up to the largest count, then latency and
    fan-out at that count. Idle memory is read before any event traffic."""
    plan = ctx.plan
    with ServerRun(ctx, spec, "large") as run:
        warm, _ = run.add_loadgen(10)
        publisher = Publisher(run.port, plan.event_size)
        publisher.post(1)
        publisher.close()
        wait_delivered([warm], 10, timeout=2.0)
        time.sleep(plan.settle)
        base = rss_bytes(run.pid)
        idle: list[dict[str, Any]] = []
        connected = 0
        for step in plan.idle_steps:
            _, info = run.add_loadgen(step)
            connected += int(info["connected"])
            time.sleep(plan.settle)
            rss = rss_bytes(run.pid)
            idle.append(
                {
                    "connections": connected,
                    "added": int(info["connected"]),
                    "failed": int(info["failed"]),
                    "connect_seconds": float(info["seconds"]),
                    "connects_per_s": int(info["connected"]) / max(float(info["seconds"]), 1e-9),
                    "rss_base": base,
                    "rss": rss,
                    "bytes_per_connection": (rss - base) / connected if connected else 0.0,
                }
            )
            per_connection = (rss - base) / max(connected, 1) / KIB
            ctx.log(
                f"{spec.key}: {connected} idle: {per_connection:.2f} KiB/conn,"
                f" {idle[-1]['connects_per_s']:.0f} connects/s"
            )
        ctx.record("idle", spec.key, idle)

        loadgens = run.loadgens[1:]  # the warm-up connections stay but are not measured
        latencies = {}
        for rate in plan.latency_rates:
            result = measure_latency(run, loadgens, rate, plan.latency_seconds)
            latencies[f"{rate:g}"] = result
            ctx.log(
                f"{spec.key}: latency {result['subscribers']} subs @{rate:g}/s: "
                f"p50 {result['p50'] * 1e3:.1f} ms p99 {result['p99'] * 1e3:.1f} ms"
                f" ({result['delivered_share']:.0%} delivered)"
            )
        ctx.record("latency", spec.key, latencies)

        for loadgen in loadgens:
            loadgen.set_sampling(0.0)
        fanout = measure_fanout(run, run.loadgens)
        log_fanout(ctx, spec, fanout)
        ctx.results.setdefault("fanout", {}).setdefault(spec.key, {})[str(plan.largest)] = fanout


def log_fanout(ctx: Context, spec: ServerSpec, fanout: dict[str, Any]) -> None:
    ctx.log(
        f"{spec.key}: fan-out {fanout['subscribers']} subs, batch {fanout['batch']}: "
        f"{fanout['deliveries_per_s']:,.0f} deliveries/s, "
        f"{fanout['cpu_s_per_million']:.2f} CPU s/M, kept up {fanout['kept_up']:.0%}"
    )


def session_middle(ctx: Context, spec: ServerSpec) -> None:
    """Publish path with no subscribers, then fan-out at the small count, the fixed
    CPU-per-delivery load at 1k, and fan-out at each further count."""
    plan = ctx.plan
    with ServerRun(ctx, spec, "middle") as run:
        paths: dict[str, Any] = {}
        for kind in PUBLISH_PATH_KINDS:
            if kind == "ndjson" and spec.script is not None:
                continue  # the baselines only take JSON, as the contract says
            publisher = Publisher(run.port, plan.event_size, timeout=plan.publish_seconds + 10)
            try:
                if kind == "ndjson":
                    result = publisher.ndjson_stream(plan.publish_seconds)
                else:
                    batch = 1 if kind == "single" else plan.publish_batch
                    result = publisher.as_fast_as_possible(plan.publish_seconds, batch)
            finally:
                publisher.close()
            paths[kind] = {
                "events_per_s": result.rate,
                "events": result.events,
                "requests": result.requests,
                "error": result.error,
            }
            ctx.log(f"{spec.key}: publish {kind}: {result.rate:,.0f} events/s {result.error}")
        ctx.record("publish", spec.key, paths)
        run.check()

        fanouts = ctx.results.setdefault("fanout", {}).setdefault(spec.key, {})
        run.add_loadgen(plan.fanout_small, sample=plan.loadgen_sample)
        fanout = measure_fanout(run, run.loadgens)
        log_fanout(ctx, spec, fanout)
        fanouts[str(plan.fanout_small)] = fanout

        total = plan.fanout_small
        for size in plan.fanout_mid:
            run.add_loadgen(size - total, sample=plan.loadgen_sample)
            total = size
            if size == plan.fixed_subscribers:
                fixed = measure_fixed_load(
                    run, run.loadgens, plan.fixed_rate, plan.fixed_seconds, plan.event_size
                )
                ctx.record("fixed", spec.key, fixed)
                ctx.log(
                    f"{spec.key}: fixed {fixed['subscribers']} subs @{plan.fixed_rate:g}/s: "
                    f"{fixed['cpu_us_per_delivery']:.2f} CPU us/delivery, "
                    f"CPU {fixed['cpu_share']:.0%}, p99 {fixed['latency']['p99'] * 1e3:.1f} ms"
                )
            fanout = measure_fanout(run, run.loadgens)
            log_fanout(ctx, spec, fanout)
            fanouts[str(size)] = fanout


def session_slow(ctx: Context, spec: ServerSpec) -> None:
    """Readers at a fixed load, then the same load with stalled subscribers added, then
    the readers alone again: the two references bracket the stalled phase, so drift on
    a shared machine shows as their difference instead of passing for an effect."""
    plan = ctx.plan
    with ServerRun(ctx, spec, "slow") as run:
        readers, _ = run.add_loadgen(plan.slow_readers, sample=plan.loadgen_sample)
        reference = measure_fixed_load(
            run, [readers], plan.slow_rate, plan.slow_reference_seconds, plan.slow_size
        )
        reference_rss = rss_bytes(run.pid)
        stalled_started = time.monotonic()
        stalling, info = run.add_loadgen(plan.slow_stalled, stalled=1.0)
        stalled = measure_fixed_load(
            run, [readers], plan.slow_rate, plan.slow_seconds, plan.slow_size
        )
        assert run.sampler is not None
        peak = run.sampler.peak_rss(stalled_started, time.monotonic())
        stalling.close()
        run.loadgens.remove(stalling)
        time.sleep(0.5)
        after = measure_fixed_load(
            run, [readers], plan.slow_rate, plan.slow_reference_seconds, plan.slow_size
        )
        result = {
            "readers": readers.readers,
            "stalled": int(info["stalled"]),
            "size": plan.slow_size,
            "rate": plan.slow_rate,
            "reference": reference,
            "with_stalled": stalled,
            "reference_after": after,
            "reference_rss": reference_rss,
            "peak_rss": peak,
            "published_total": reference["published"] + stalled["published"],
        }
        ctx.record("slow", spec.key, result)
        ctx.log(
            f"{spec.key}: slow consumers: p99 {reference['latency']['p99'] * 1e3:.1f} -> "
            f"{stalled['latency']['p99'] * 1e3:.1f} -> {after['latency']['p99'] * 1e3:.1f} ms,"
            " deliveries/s "
            f"{reference['deliveries_per_s']:,.0f} -> {stalled['deliveries_per_s']:,.0f}, "
            f"peak RSS {peak / MIB:.1f} MiB (reference {reference_rss / MIB:.1f})"
        )


def session_batched(ctx: Context, spec: ServerSpec) -> None:
    """Fan-out with JSON batches, for the servers that join a batch into one write."""
    plan = ctx.plan
    with ServerRun(ctx, spec, "batched") as run:
        results = ctx.results.setdefault("fanout_batched", {}).setdefault(spec.key, {})
        total = 0
        for size in plan.batched_sizes:
            run.add_subscribers(size - total)
            total = size
            fanout = measure_fanout(run, run.loadgens, plan.batched_batch)
            log_fanout(ctx, spec, fanout)
            results[str(size)] = fanout


# Scale-out setups, each measured with the same subscribers and publisher: the in-memory
# broker (the reference), the Redis backend in one process, in two worker processes on one
# port, and two nodes on two ports sharing Redis (subscribers split, publishing to the first).
SCALE_SETUPS = ("memory", "redis", "workers2", "two_nodes")


def scale_setup(
    ctx: Context, spec: ServerSpec, setup: str, size: int, redis_url: str, redis: Sampler
) -> dict[str, Any]:
    """One scale-out setup at ``size`` subscribers: fan-out as fast as it is delivered
    (single-event POSTs, as in 2a), then latency at a fixed rate as in 3b (a sampled
    tenth reads, the others pause). With two nodes the latency is measured on the second
    node's subscribers only: published on A, received on B."""
    plan = ctx.plan
    flags = list(ctx.broker_args)
    if setup != "memory":
        # A prefix of its own per setup: no setup reads another's stream.
        flags += ["--redis-url", redis_url, "--redis-prefix", f"bench_{setup}_{size}"]
    session = f"scale-{setup}-{size}"
    runs: list[ServerRun] = []
    try:
        if setup == "two_nodes":
            for node in ("a", "b"):
                runs.append(ServerRun(ctx, spec, f"{session}-{node}", extra=flags))
        elif setup == "workers2":
            runs.append(
                ServerRun(ctx, spec, session, extra=[*flags, "--workers", "2"], listeners=2)
            )
        else:
            runs.append(ServerRun(ctx, spec, session, extra=flags))
        for index, run in enumerate(runs):
            wanted = (
                size // len(runs) if index < len(runs) - 1 else size - size // len(runs) * index
            )
            run.add_subscribers(wanted, sample=plan.loadgen_sample)
        loadgens = [loadgen for run in runs for loadgen in run.loadgens]
        processes = [pid for run in runs for pid in process_tree(run.pid)]
        workers = [pid for run in runs for pid in process_tree(run.pid)[1:]]
        fanout = measure_fanout(runs[0], loadgens, others=runs[1:])
        # The same load per subscriber count (20,000 deliveries/s by default), light
        # enough at 10k subscribers that no queue builds: 20 events/s at 1k, 2 at 10k.
        rate = plan.scale_latency_rate * 1000 / max(size, 1000)
        latency = measure_latency(runs[0], runs[-1].loadgens, rate, plan.scale_latency_seconds)
        window = fanout["window"]
        redis_cpu = redis.cpu_between(*window) if setup != "memory" else 0.0
        return {
            **fanout,
            "redis_cpu_share": redis_cpu / (window[1] - window[0]),
            "processes": len(processes),
            "sockets_per_worker": [socket_count(pid) for pid in workers],
            "latency": {key: latency[key] for key in ("samples", "p50", "p90", "p99", "max")},
            "latency_rate": rate,
            "latency_subscribers": latency["subscribers"],
            "latency_delivered_share": latency["delivered_share"],
        }
    finally:
        for run in reversed(runs):
            run.close()


def session_scaleout(ctx: Context, spec: ServerSpec) -> None:
    """Scenario 6: the broker on the in-memory backend, on Redis, with ``--workers 2`` and
    as two nodes, against a private ``redis-server`` started here (skipped when none is
    installed). The setups run one after another at each size, minutes apart at most."""
    plan = ctx.plan
    results = ctx.results.setdefault("scaleout", {})
    try:
        redis, redis_port = start_redis(ctx.group)
    except BenchError as exc:
        ctx.results["scaleout_skipped"] = str(exc)
        ctx.log(f"scale-out skipped: {exc}")
        return
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_sampler = Sampler(redis.pid)
    try:
        for size in plan.scale_sizes:
            for setup in SCALE_SETUPS:
                try:
                    result = scale_setup(ctx, spec, setup, size, redis_url, redis_sampler)
                except BenchError as exc:
                    ctx.error(spec.key, f"scaleout {setup} at {size}", str(exc))
                    continue
                results.setdefault(setup, {})[str(size)] = result
                ctx.log(
                    f"scale-out {setup}, {size} subs: {result['deliveries_per_s']:,.0f}"
                    f" deliveries/s, server CPU {result['cpu_share']:.0%} of a core over "
                    f"{result['processes']} process(es), p50 "
                    f"{result['latency']['p50'] * 1e3:.1f} ms p99 "
                    f"{result['latency']['p99'] * 1e3:.1f} ms"
                )
    finally:
        redis_sampler.stop()
        ctx.group.stop(redis, grace=2.0)


# Scenario 7: the same events (one topic, single-event POSTs to /publish) to the same
# number of subscribers, subscribed in five ways (report.MERCURE_LABELS says which).
# Query values are percent-encoded; NUMBER is each connection's own number.
MERCURE_TOPIC = "https://example.com/bench/1"
MERCURE_PATTERN = "https://example.com/bench/:id"
MERCURE_HUB = "/.well-known/mercure"


def _quoted(text: str) -> str:
    return urllib.parse.quote(text, safe="")


MERCURE_KINDS = {
    "events": f"/events?topic={_quoted(MERCURE_TOPIC)}",
    "exact": f"{MERCURE_HUB}?match={_quoted(MERCURE_TOPIC)}",
    "url_pattern": f"{MERCURE_HUB}?matchURLPattern={_quoted(MERCURE_PATTERN)}",
    "url_pattern_distinct": f"{MERCURE_HUB}?matchURLPattern={_quoted(MERCURE_PATTERN)}"
    f"&matchURLPattern={_quoted('https://example.com/other/')}{NUMBER}{_quoted('/:id')}",
    "uri_template": f"{MERCURE_HUB}?topic={_quoted('https://example.com/bench/{id}')}",
}
# The numbers of a fan-out that are kept as their median over the rounds.
MERCURE_MEDIANS = (
    "deliveries_per_s",
    "published_per_s",
    "kept_up",
    "held_share",
    "cpu_share",
    "cpu_s_per_million",
    "loadgen_cpu_s_per_million",
)


def open_streams(port: int) -> int:
    """The broker's open event streams, from its ``/metrics``: the hub's own count."""
    connection = HttpConnection(port, timeout=5.0)
    try:
        status, body = connection.request("GET", "/metrics")
    finally:
        connection.close()
    if status != 200:
        raise BenchError(f"GET /metrics answered {status}")
    for line in body.decode().splitlines():
        if line.startswith("sse_broker_connections "):
            return int(float(line.split()[1]))
    raise BenchError("/metrics has no sse_broker_connections")


def wait_streams_closed(run: ServerRun, timeout: float) -> None:
    """Wait until the hub has forgotten every stream: subscribers (and the matchers only
    they held) left over from one kind would add to the next kind's fan-out."""
    deadline = time.monotonic() + timeout
    while (remaining := open_streams(run.port)) > 0:
        if time.monotonic() > deadline:
            raise BenchError(
                f"{remaining} streams still open {timeout:g}s after their clients left"
            )
        time.sleep(0.1)


def session_mercure(ctx: Context, spec: ServerSpec) -> None:
    """Scenario 7: fan-out as in 2a to ``mercure_subscribers`` subscribers of each kind in
    ``MERCURE_KINDS``, one kind connected at a time to one broker process. The kinds take
    turns, ``mercure_rounds`` times over, so drift on a shared machine spreads over all of
    them instead of landing on the last; each kind's median over its rounds is kept."""
    plan = ctx.plan
    rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in MERCURE_KINDS}
    with ServerRun(ctx, spec, "mercure") as run:
        for _ in range(plan.mercure_rounds):
            for kind, path in MERCURE_KINDS.items():
                run.add_subscribers(plan.mercure_subscribers, path=path)
                fanout = measure_fanout(run, run.loadgens, topic=MERCURE_TOPIC)
                rounds[kind].append(fanout)
                ctx.log(
                    f"{spec.key}: mercure {kind}, {fanout['subscribers']} subs: "
                    f"{fanout['deliveries_per_s']:,.0f} deliveries/s, "
                    f"{fanout['cpu_s_per_million']:.2f} CPU s/M, kept up {fanout['kept_up']:.0%}"
                )
                for loadgen in run.loadgens:
                    loadgen.close()
                run.loadgens.clear()
                wait_streams_closed(run, timeout=10.0)
    results: dict[str, Any] = {}
    for kind, fanouts in rounds.items():
        rates = [fanout["deliveries_per_s"] for fanout in fanouts]
        results[kind] = {
            "path": MERCURE_KINDS[kind],
            "topic": MERCURE_TOPIC,
            "subscribers": min(fanout["subscribers"] for fanout in fanouts),
            "rounds": fanouts,
            "deliveries_per_s_range": [min(rates), max(rates)],
            **{key: statistics.median(run[key] for run in fanouts) for key in MERCURE_MEDIANS},
        }
    ctx.record("mercure", spec.key, results)


SESSIONS: dict[str, Callable[[Context, ServerSpec], None]] = {
    "large": session_large,
    "middle": session_middle,
    "batched": session_batched,
    "slow": session_slow,
    "scaleout": session_scaleout,
    "mercure": session_mercure,
}

SCENARIO_SESSIONS = {
    "idle": "large",
    "latency": "large",
    "fanout": "large,middle",
    "batched": "batched",
    "fixed": "middle",
    "publish": "middle",
    "slow": "slow",
    "scaleout": "scaleout",
    "mercure": "mercure",
}
# Run only when named: with them quick mode would pass its 5 minutes (mercure: about 70 s).
OPT_IN_SCENARIOS = ("mercure",)


# --------------------------------------------------------------------------- main


def shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def specs_for(session: str, specs: list[ServerSpec]) -> list[ServerSpec]:
    """The servers a session runs: the batched fan-out compares the broker with the raw
    server in its coalescing mode (when both were asked for)."""
    if session in ("scaleout", "mercure"):
        return [spec for spec in specs if spec.key == "broker"]
    if session != "batched":
        return specs
    keys = {spec.key for spec in specs}
    chosen = [spec for spec in specs if spec.key == "broker"]
    if "raw_asyncio" in keys and RAW_COALESCING.available:
        chosen.append(RAW_COALESCING)
    return chosen


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run through ``finally``, children stopped; SIGINT
    too when the driver was started in the background, where it arrives ignored."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, interrupt) for signum in stop_signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=sorted(PLANS), default="quick")
    parser.add_argument(
        "--servers",
        default=",".join(spec.key for spec in SERVERS),
        help="comma-separated subset of: " + ", ".join(spec.key for spec in SERVERS),
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(s for s in SCENARIO_SESSIONS if s not in OPT_IN_SCENARIOS),
        help="comma-separated subset of: "
        + ", ".join(SCENARIO_SESSIONS)
        + " (all but "
        + ", ".join(OPT_IN_SCENARIOS)
        + " by default)",
    )
    parser.add_argument(
        "--broker-args",
        default="",
        help="extra flags for the broker, e.g. --broker-args='--queue-size 256'",
    )
    parser.add_argument("--no-doc", action="store_true", help="only print; write no files")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the doc goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS[args.mode]
    wanted = {key.strip() for key in args.servers.split(",") if key.strip()}
    unknown = wanted - {spec.key for spec in SERVERS}
    if unknown:
        print(f"unknown server(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    sessions: list[str] = []
    for scenario in args.scenarios.split(","):
        scenario = scenario.strip()
        if scenario not in SCENARIO_SESSIONS:
            print(f"unknown scenario: {scenario}", file=sys.stderr)
            return 2
        for session in SCENARIO_SESSIONS[scenario].split(","):
            if session not in sessions:
                sessions.append(session)
    sessions.sort(key=list(SESSIONS).index)

    log_dir = Path(tempfile.mkdtemp(prefix="sse-bench-"))
    group = ProcessGroup(log_dir)
    ctx = Context(plan, group, shlex.split(args.broker_args))
    specs = []
    for spec in SERVERS:
        if spec.key not in wanted:
            continue
        if not spec.available:
            ctx.error(spec.key, "all", f"{spec.script} does not exist; skipped")
            continue
        specs.append(spec)
    busy_start, own_start = report.busy_cpu_seconds(), report.own_cpu_seconds()
    ctx.results["meta"] = report.collect_meta(plan.mode, sessions, [s.key for s in specs])
    ctx.results["meta"]["plan"] = dataclasses.asdict(plan)
    ctx.results["meta"]["broker_args"] = ctx.broker_args
    ctx.results["servers"] = {spec.key: spec.label for spec in specs}
    if "batched" in sessions:
        ctx.results["servers"].update(
            {spec.key: spec.label for spec in specs_for("batched", specs)}
        )
    ctx.log(f"mode {plan.mode}; servers {', '.join(s.key for s in specs)}; logs in {log_dir}")
    interrupted = False
    with stop_signals_raise():
        try:
            for session in sessions:
                for spec in specs_for(session, specs):
                    try:
                        SESSIONS[session](ctx, spec)
                    except (BenchError, OSError, ValueError, KeyError) as exc:
                        ctx.error(spec.key, session, f"{type(exc).__name__}: {exc}")
                    finally:
                        group.stop_all()
        except KeyboardInterrupt as exc:
            interrupted = True
            ctx.log(f"interrupted ({exc or 'SIGINT'}); stopping every child process")
        finally:
            group.stop_all()
    elapsed = time.monotonic() - ctx.started
    ctx.results["meta"].update(report.collect_end_meta(elapsed, busy_start, own_start))
    print(report.render_text(ctx.results))
    if interrupted:
        return 130
    if not args.no_doc:
        written = report.write_outputs(ctx.results, args.docs)
        ctx.log("wrote " + ", ".join(shown(path) for path in written))
    if ctx.results.get("errors"):
        ctx.log(f"server and load generator logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    ctx.log(f"done in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turns ``bench/run.py``'s results into the stdout table, ``docs/benchmarks.md``, the
``docs/bench-*.png`` plots and ``docs/bench-results.json``.

Every table is built once (title, columns, rows, notes) and rendered twice, as aligned
text and as Markdown, so the terminal and the doc never disagree.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import ROOT

KIB = 1024
MIB = 1024 * 1024
NOTES_START = "<!-- notes:start -->"
NOTES_END = "<!-- notes:end -->"
# The Mercure section (scenario 7) may come from a run of its own: a run that measured it
# replaces only what lies between these markers, and any other run keeps it as it is.
MERCURE_START = "<!-- mercure:start -->"
MERCURE_END = "<!-- mercure:end -->"
MERCURE_TITLE = "7. Mercure subscriptions against `/events`: one topic, one event per POST"
DEFAULT_MERCURE = (
    f"### {MERCURE_TITLE}\n\n_Not measured yet: "
    "`make bench ARGS='--scenarios mercure --servers broker'` fills in this section alone._"
)
DEFAULT_NOTES = (
    "Hand-written notes (profiles, before/after numbers of optimisations) go here; "
    "`make bench` keeps this section when it rewrites the rest of the file."
)
PACKAGES = (
    "aiohttp",
    "uvloop",
    "orjson",
    "aiohttp-sse",
    "sse-starlette",
    "starlette",
    "uvicorn",
    "httptools",
    "matplotlib",
)
BASELINE = "raw_asyncio"
PATTERN = "aiohttp_sse_pattern"
RAW_COALESCING = "raw_asyncio_coalescing"
BROKER = "broker"
TIMES = "\u00d7"  # the multiplication sign of ratios


# --------------------------------------------------------------------------- meta


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def collect_meta(mode: str, sessions: Sequence[str], servers: Sequence[str]) -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    memory = next(
        (
            int(line.split()[1]) * KIB
            for line in _read("/proc/meminfo").splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--", "broker", "bench"):
        commit += " (with uncommitted changes)"
    return {
        "mode": mode,
        "sessions": list(sessions),
        "servers_run": list(servers),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "kernel": platform.release(),
        "versions": versions,
        "commit": commit,
        "load_start": _read("/proc/loadavg").split()[:3],
        "nofile": _nofile(),
    }


def _nofile() -> str:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"{soft}/{hard}"


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores, from /proc/stat)."""
    fields = _read("/proc/stat").splitlines()[0].split()[1:]
    ticks = [int(value) for value in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    guest = sum(ticks[8:10]) if len(ticks) > 9 else 0  # already counted in user/nice
    return (sum(ticks) - idle - guest) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this driver and of every child it has waited for (servers, load
    generators: all are waited for when stopped)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def collect_end_meta(elapsed: float, busy_start: float, own_start: float) -> dict[str, Any]:
    """How much of the machine other processes used during the run: the shared-machine
    noise in every number here."""
    busy = busy_cpu_seconds() - busy_start
    own = own_cpu_seconds() - own_start
    foreign = max(busy - own, 0.0)
    cores = os.cpu_count() or 1
    return {
        "elapsed": elapsed,
        "load_end": _read("/proc/loadavg").split()[:3],
        "own_cpu_seconds": own,
        "foreign_cpu_seconds": foreign,
        "foreign_share": foreign / (elapsed * cores) if elapsed > 0 else 0.0,
    }


# --------------------------------------------------------------------------- formatting


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def count(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:,.0f}"


def ms(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "—"
    millis = number * 1e3
    return f"{millis:.2f}" if millis < 10 else f"{millis:.1f}" if millis < 100 else f"{millis:,.0f}"


def kib(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{number / KIB:.2f}"


def mib(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{number / MIB:.1f}"


def fixed(value: Any, digits: int = 2) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.{digits}f}"


def share(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.0%}"


def ratio(value: Any, other: Any) -> str:
    a, b = _number(value), _number(other)
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}{TIMES}"


def dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    left: int = 1  # leading columns aligned left (text); the rest are numbers

    def text(self) -> str:
        widths = [len(column) for column in self.columns]
        for row in self.rows:
            widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
        lines = [self.title]
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True)))
        lines.append("  ".join("-" * width for width in widths))
        for row in self.rows:
            cells = [
                cell.ljust(width) if index < self.left else cell.rjust(width)
                for index, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells))
        if not self.rows:
            lines.append("(not measured)")
        return "\n".join(lines)

    def markdown(self, heading: bool = True) -> str:
        lines = [f"### {self.title}", ""] if heading else []
        if self.rows:
            lines.append("| " + " | ".join(self.columns) + " |")
            aligns = ["---"] * self.left + ["---:"] * (len(self.columns) - self.left)
            lines.append("| " + " | ".join(aligns) + " |")
            lines.extend("| " + " | ".join(row) + " |" for row in self.rows)
        else:
            lines.append("_Not measured in this run._")
        if self.notes:
            lines.append("")
            lines.extend(self.notes)
        return "\n".join(lines)


def label(results: dict[str, Any], server: str) -> str:
    return str(results.get("servers", {}).get(server, server))


SERVER_ORDER = (BROKER, BASELINE, RAW_COALESCING, PATTERN, "sse_starlette_pattern")


def servers_in(results: dict[str, Any], scenario: str) -> list[str]:
    """The servers with results for ``scenario``, broker first, then the baselines."""
    present = results.get(scenario, {})
    known = [server for server in SERVER_ORDER if server in present]
    return known + sorted(server for server in present if server not in SERVER_ORDER)


def idle_table(results: dict[str, Any]) -> Table:
    idle = results.get("idle", {})
    steps = sorted({step["connections"] for runs in idle.values() for step in runs})
    table = Table(
        "1. Idle connections: server RSS per connection (KiB, delta from 10 warm connections)",
        ["server", "RSS empty (MiB)"]
        + [f"{n:,} conns" for n in steps]
        + ["connects/s", "failed", "vs raw", "vs aiohttp-sse"],
    )

    def largest_of(server: str) -> Any:
        runs = {step["connections"]: step for step in idle.get(server, [])}
        return dig(runs.get(steps[-1]) if steps else None, "bytes_per_connection")

    for server in servers_in(results, "idle"):
        runs = {step["connections"]: step for step in idle[server]}
        rates = [step["connects_per_s"] for step in idle[server]]
        table.rows.append(
            [
                label(results, server),
                mib(idle[server][0]["rss_base"] if idle[server] else None),
                *[kib(runs[n]["bytes_per_connection"] if n in runs else None) for n in steps],
                count(sum(rates) / len(rates) if rates else None),
                count(sum(step["failed"] for step in idle[server])),
                ratio(largest_of(server), largest_of(BASELINE)),
                ratio(largest_of(server), largest_of(PATTERN)),
            ]
        )
    table.notes.append(
        "Connections are added in steps by separate load generator processes; RSS (all of "
        "the server's pages, from /proc) is read after each step settles, before any event "
        "is published. connects/s: the steps' mean, each step 100 connects in flight. "
        "Ratios: bytes per connection at the largest count."
    )
    return table


def _fanout_rows(
    results: dict[str, Any], scenario: str, references: Sequence[tuple[str, str]]
) -> list[list[str]]:
    runs_by_server = results.get(scenario, {})
    sizes = sorted({int(size) for runs in runs_by_server.values() for size in runs})
    rows = []
    for size in sizes:
        for server in servers_in(results, scenario):
            run = runs_by_server[server].get(str(size))
            if run is None:
                continue
            rate = run["deliveries_per_s"]
            rows.append(
                [
                    f"{run['subscribers']:,}",
                    label(results, server),
                    count(rate),
                    *[
                        ratio(rate, dig(results, source, other, str(size), "deliveries_per_s"))
                        for source, other in references
                    ],
                    count(run["published_per_s"]),
                    share(run["kept_up"]),
                    share(run.get("held_share")),
                    share(run["cpu_share"]),
                    fixed(run["cpu_s_per_million"]),
                    fixed(run["loadgen_cpu_s_per_million"]),
                ]
            )
    return rows


FANOUT_COLUMNS = [
    "events/s in",
    "kept up",
    "held",
    "server CPU",
    "CPU s / M deliveries",
    "loadgen CPU s / M",
]


def fanout_table(results: dict[str, Any]) -> Table:
    table = Table(
        "2a. Fan-out throughput: 1 topic, one event per POST, as fast as it is delivered",
        ["subscribers", "server", "deliveries/s", "vs raw", "vs aiohttp-sse", *FANOUT_COLUMNS],
    )
    table.rows = _fanout_rows(results, "fanout", [("fanout", BASELINE), ("fanout", PATTERN)])
    table.notes.append(
        "deliveries/s: events counted by the load generators per second over the window. "
        "The publisher holds back while the average subscriber is more events behind than "
        "it receives in 1 s (at least 20), so per-client queues stay short and the rate is "
        "what the server sustains. kept up = deliveries / (events "
        "published in the window x subscribers): above 100% when a backlog from before the "
        "window drains in it. held: share of the window the publisher waited for the "
        "subscribers to catch up; for the broker and the raw server (which answer a POST "
        "only after writing to every socket) that means the load generators lagged. server "
        "CPU: share of one core; well under 100% means the server waited on the rest of the "
        "machine (load generators, publisher, other processes), so compare CPU s / M "
        "deliveries as well. loadgen CPU: all load "
        "generator processes together, per million deliveries."
    )
    return table


def batched_table(results: dict[str, Any]) -> Table:
    runs = results.get("fanout_batched", {})
    batch = next((run["batch"] for sizes in runs.values() for run in sizes.values()), 10)
    table = Table(
        f"2b. Fan-out with JSON batches of {batch} events per POST (servers that join a batch "
        "into one write per subscriber)",
        [
            "subscribers",
            "server",
            "deliveries/s",
            "vs raw coalescing",
            "vs own single-event",
            *FANOUT_COLUMNS,
        ],
    )
    rows = []
    for row, (server, size) in zip(
        _fanout_rows(results, "fanout_batched", [("fanout_batched", RAW_COALESCING)]),
        [
            (server, size)
            for size in sorted({int(size) for sizes in runs.values() for size in sizes})
            for server in servers_in(results, "fanout_batched")
            if str(size) in runs[server]
        ],
        strict=True,
    ):
        batched = dig(runs, server, str(size), "deliveries_per_s")
        single = dig(results, "fanout", server, str(size), "deliveries_per_s")
        if server == RAW_COALESCING:
            single = dig(results, "fanout", BASELINE, str(size), "deliveries_per_s")
        rows.append([*row[:4], ratio(batched, single), *row[4:]])
    table.rows = rows
    table.notes.append(
        "The raw baseline's default is one write per event (2a); started with --coalesce it "
        "joins a batch as the broker does, and is the fair limit here."
    )
    return table


def fixed_table(results: dict[str, Any]) -> Table:
    fixed_runs = results.get("fixed", {})
    first = next(iter(fixed_runs.values()), None)
    title = "3a. CPU per delivery at a fixed load"
    if first:
        title += (
            f": {first['subscribers']:,} subscribers, {first['rate']:g} events/s (single POSTs)"
        )
    table = Table(
        title,
        [
            "server",
            "events/s in",
            "deliveries/s",
            "server CPU",
            "CPU µs / delivery",
            "vs aiohttp-sse",
            "vs raw",
            "p50 ms",
            "p99 ms",
            "delivered",
        ],
    )
    for server in servers_in(results, "fixed"):
        run = fixed_runs[server]
        value = run["cpu_us_per_delivery"]
        table.rows.append(
            [
                label(results, server),
                fixed(run["publish_rate"], 1),
                count(run["deliveries_per_s"]),
                share(run["cpu_share"]),
                fixed(value),
                ratio(value, dig(fixed_runs, PATTERN, "cpu_us_per_delivery")),
                ratio(value, dig(fixed_runs, BASELINE, "cpu_us_per_delivery")),
                ms(run["latency"]["p50"]),
                ms(run["latency"]["p99"]),
                share(run["delivered_share"]),
            ]
        )
    table.notes.append(
        "CPU: the server's utime+stime from /proc over the publishing window and the wait "
        "for the last deliveries. Latency from up to 200 sampled connections per load generator."
    )
    return table


def latency_table(results: dict[str, Any]) -> Table:
    latency = results.get("latency", {})
    table = Table(
        "3b. Publish -> receive latency at the largest subscriber count (single POSTs)",
        [
            "server",
            "subscribers",
            "events/s",
            "events/s in",
            "samples",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "p99 vs raw",
            "vs aiohttp-sse",
            "POST ms p50",
            "POST ms max",
            "delivered",
        ],
    )
    rates = sorted({rate for runs in latency.values() for rate in runs}, key=float)
    for rate in rates:
        for server in servers_in(results, "latency"):
            run = latency[server].get(rate)
            if run is None:
                continue
            table.rows.append(
                [
                    label(results, server),
                    f"{run['subscribers']:,}",
                    rate,
                    fixed(run.get("publish_rate"), 1),
                    count(run["samples"]),
                    ms(run["p50"]),
                    ms(run["p90"]),
                    ms(run["p99"]),
                    ms(run["p999"]),
                    ms(run["max"]),
                    ratio(run["p99"], dig(latency, BASELINE, rate, "p99")),
                    ratio(run["p99"], dig(latency, PATTERN, rate, "p99")),
                    ms(run.get("post_p50")),
                    ms(run.get("post_max")),
                    share(run["delivered_share"]),
                ]
            )
    table.notes.append(
        "Latency = receive time in the load generator minus the publisher's "
        "time.monotonic_ns() stamp taken just before the POST is sent: it includes the "
        "request, the fan-out to every subscriber written before this one, the kernel, and "
        "the load generator's turn to read. 10% of the connections, spread evenly over the "
        "connection order, are sampled; the others stop reading during the phase (the "
        "kernel keeps their bytes, the server's work is the same) so the load generators "
        "do not add their own 10k reads per event. Histogram buckets are 4.4% wide. POST "
        "ms: the publish request's response time; the broker and the raw server answer "
        "after writing to every subscriber, so for them it is the whole fan-out, the floor "
        "under p99 on this machine. The pattern servers answer after queueing."
    )
    return table


def slow_bound(run: dict[str, Any], meta: dict[str, Any]) -> float | None:
    """Broker only: RSS at the end of the reference phase, plus for each stalled
    subscriber its queue byte limit and the transport's 64 KiB write-buffer high-water
    mark, plus the events the history retained meanwhile (frame and chunk copies)."""
    try:
        from broker.config import Config
    except ImportError:
        return None
    defaults = Config()
    args = meta.get("broker_args", [])
    queue_bytes = defaults.queue_bytes
    history_size = defaults.history_size
    for flag, value in itertools.pairwise(args):
        if flag == "--queue-bytes" and value.isdigit():
            queue_bytes = int(value)
        if flag == "--history-size" and value.isdigit():
            history_size = int(value)
    stalled_events = run["with_stalled"]["published"]
    retained = min(stalled_events, max(history_size - run["reference"]["published"], 0))
    per_event = 2 * (run["size"] + 128) + 256
    return float(
        run["reference_rss"] + run["stalled"] * (queue_bytes + 64 * KIB) + retained * per_event
    )


def slow_change(run: dict[str, Any]) -> tuple[float | None, float | None]:
    """(p99 change with stalled readers against the mean of the references before and
    after, how far those two references differ from each other), as fractions."""
    before = _number(run["reference"]["latency"]["p99"])
    during = _number(run["with_stalled"]["latency"]["p99"])
    after = _number(dig(run, "reference_after", "latency", "p99"))
    references = [value for value in (before, after) if value]
    if not references or not during:
        return None, None
    mean = sum(references) / len(references)
    spread = abs(before - after) / mean if before and after else None
    return during / mean - 1, spread


def _phases(run: dict[str, Any], *keys: str, show: Any = count) -> str:
    values = [
        show(dig(run, phase, *keys))
        for phase in ("reference", "with_stalled", "reference_after")
        if phase in run
    ]
    return " / ".join(values)


def slow_table(results: dict[str, Any]) -> Table:
    slow = results.get("slow", {})
    first = next(iter(slow.values()), None)
    title = "4. Slow consumers"
    if first:
        title += (
            f": {first['readers']:,} readers + {first['stalled']:,} stalled, "
            f"{first['rate']:g} events/s of {first['size'] // KIB} KiB"
        )
    table = Table(
        title,
        [
            "server",
            "events/s in",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "p99 change",
            "refs differ",
            "delivered",
            "RSS ref MiB",
            "peak MiB",
            "bound MiB",
        ],
    )
    for server in servers_in(results, "slow"):
        run = slow[server]
        change, spread = slow_change(run)
        bound = slow_bound(run, results.get("meta", {})) if server == BROKER else None
        table.rows.append(
            [
                label(results, server),
                _phases(run, "publish_rate", show=lambda value: fixed(value, 1)),
                _phases(run, "deliveries_per_s"),
                _phases(run, "latency", "p50", show=ms),
                _phases(run, "latency", "p99", show=ms),
                "—" if change is None else f"{change:+.0%}",
                "—" if spread is None else f"{spread:.0%}",
                share(run["with_stalled"]["delivered_share"]),
                mib(run["reference_rss"]),
                mib(run["peak_rss"]),
                mib(bound),
            ]
        )
    table.notes.append(
        "Each cell with three values: readers alone / with the stalled subscribers added / "
        "readers alone again after the stalled ones left. p99 change: the stalled phase "
        "against the mean of the two references; refs differ: how far the two references "
        "are apart, the noise to read the change against."
    )
    table.notes.append(
        "The stalled connections stop reading after the response head and shrink their "
        "receive buffer before connecting; the server's own socket send buffer (Linux "
        "autotunes it up to net.ipv4.tcp_wmem's max) still absorbs about 2.8 MB each before "
        "the server sees back-pressure. Deliveries and latency are the readers' only. "
        "Broker bound: reference RSS + stalled x (--queue-bytes + 64 KiB write buffer) + "
        "events retained by the history meanwhile (two encoded copies each). A server "
        "that delivers well under 100% even without stalled readers is overloaded at this "
        "rate: its latency then only covers the events that did arrive. events/s in below "
        "the offered rate: the server answered its POSTs too slowly for the publisher's "
        "schedule (it publishes one event at a time), so it carried a lighter load than "
        "the others."
    )
    return table


def publish_table(results: dict[str, Any]) -> Table:
    publish = results.get("publish", {})
    batch = dig(results, "meta", "plan", "publish_batch") or 100
    table = Table(
        "5. Publish path: events/s accepted, no subscribers, one connection",
        [
            "server",
            "single POSTs",
            f"JSON batch of {batch}",
            "NDJSON stream",
            "single vs raw",
            "batch vs raw",
        ],
    )
    for server in servers_in(results, "publish"):
        run = publish[server]
        single = dig(run, "single", "events_per_s")
        batched = dig(run, "batch", "events_per_s")
        table.rows.append(
            [
                label(results, server),
                count(single),
                count(batched),
                count(dig(run, "ndjson", "events_per_s")),
                ratio(single, dig(publish, BASELINE, "single", "events_per_s")),
                ratio(batched, dig(publish, BASELINE, "batch", "events_per_s")),
            ]
        )
    table.notes.append(
        "Single and batch: back-to-back requests on one keep-alive connection, each waiting "
        "for its response (the client is a raw socket in the driver). NDJSON: one chunked "
        "POST streaming 100 lines per write; the baselines accept JSON only."
    )
    return table


SCALE_LABELS = {
    "memory": "in-memory, 1 process",
    "redis": "Redis, 1 process",
    "workers2": "Redis, `--workers 2`",
    "two_nodes": "Redis, two nodes (publish on A)",
}


def scale_table(results: dict[str, Any]) -> Table:
    scaleout = results.get("scaleout", {})
    table = Table(
        "6. Scale-out: Redis backend, `--workers 2` and two nodes (one event per POST)",
        [
            "subscribers",
            "setup",
            "processes",
            "deliveries/s",
            "vs in-memory",
            "vs Redis 1 process",
            "server CPU",
            "redis-server CPU",
            "CPU s / M deliveries",
            "latency p50 ms",
            "latency p99 ms",
            "p99 vs in-memory",
        ],
        left=2,
    )
    sizes = sorted({int(size) for runs in scaleout.values() for size in runs})
    for size in sizes:
        reference = dig(scaleout, "memory", str(size))
        redis = dig(scaleout, "redis", str(size))
        for setup, name in SCALE_LABELS.items():
            run = dig(scaleout, setup, str(size))
            if run is None:
                continue
            rate = run["deliveries_per_s"]
            table.rows.append(
                [
                    f"{run['subscribers']:,}",
                    name,
                    str(run["processes"]),
                    count(rate),
                    ratio(rate, dig(reference, "deliveries_per_s")),
                    ratio(rate, dig(redis, "deliveries_per_s")),
                    share(run["cpu_share"]),
                    share(run.get("redis_cpu_share")) if setup != "memory" else "—",
                    fixed(run["cpu_s_per_million"]),
                    ms(run["latency"]["p50"]),
                    ms(run["latency"]["p99"]),
                    ratio(run["latency"]["p99"], dig(reference, "latency", "p99")),
                ]
            )
    skipped = results.get("scaleout_skipped")
    if skipped:
        table.notes.append(f"Skipped in this run: {skipped}.")
    rate = dig(results, "meta", "plan", "scale_latency_rate") or 20
    per_second = f"{rate * 1000:,.0f} deliveries/s ({rate:g} events/s at 1,000 subscribers)"
    table.notes.append(
        "Each setup runs with its own subscribers (load generator processes) against a "
        "private `redis-server` (`--save '' --appendonly no`) started by the driver, one "
        "setup after another. deliveries/s: as in 2a, single-event POSTs as fast as the "
        "subscribers receive them. processes: broker processes, the `--workers` supervisor "
        "included; server CPU is their sum (share of one core), found through `/proc` as "
        "the supervisor's children. `--workers 2`: one port (`SO_REUSEPORT`), the load "
        "generator's connections spread over both workers by the kernel, the publisher's "
        "connection lands on one of them. Two nodes: two ports, half the subscribers on "
        "each, every POST to node A. Latency: as in 3b (a sampled tenth of the "
        f"subscribers read, the others pause), at {per_second}, measured on the "
        "subscribers of the last node, so for two nodes it is published on A and received "
        "on B (across Redis). On Redis a POST is answered once Redis stored the event "
        "(`XADD`), and each node fans out what its stream tail reads back (a blocking "
        "`XREAD`, then `XINFO` + `XREAD` in one `MULTI`): round trips that cost little CPU "
        "(see redis-server CPU) but, with one event per POST, can leave a node waiting "
        "(server CPU under 100%). Quick-mode windows are 2.5 s: between runs the Redis "
        "rows have moved by up to 40% here. This machine has 2 cores, shared by the "
        "broker processes, `redis-server`, the load generators and the publisher: two "
        "workers cannot get two "
        "cores to themselves here, so the `--workers 2` ratio is a floor for a host with "
        "cores to spare."
    )
    return table


# Subscription kinds of scenario 7 (``run.MERCURE_KINDS``), in order: how each subscribes
# and how many matchers the hub asks about every published topic ("scanned": URL
# patterns, URI templates) when ``subscribers`` of that kind are connected.
MERCURE_LABELS: dict[str, tuple[str, Callable[[int], int]]] = {
    "events": ("`/events?topic=https://example.com/bench/1` (trie, exact)", lambda n: 0),
    "exact": ("`/.well-known/mercure?match=https://example.com/bench/1` (Exact)", lambda n: 0),
    "url_pattern": (
        "`?matchURLPattern=https://example.com/bench/:id`, one pattern shared by all",
        lambda n: 1,
    ),
    "url_pattern_distinct": (
        "the same shared pattern + `matchURLPattern=https://example.com/other/<n>/:id`, "
        "one of its own per subscriber",
        lambda n: n + 1,
    ),
    "uri_template": (
        "`?topic=https://example.com/bench/{id}` (legacy URI template, RE2)",
        lambda n: 1,
    ),
}


def mercure_table(results: dict[str, Any]) -> Table:
    kinds = dig(results, "mercure", BROKER) or {}
    reference = kinds.get("events", {})
    rounds = dig(results, "meta", "plan", "mercure_rounds")
    subscribers = next((run["subscribers"] for run in kinds.values()), None)
    title = MERCURE_TITLE
    if subscribers is not None:
        title += f", {subscribers:,} subscribers of each kind"
    table = Table(
        title,
        [
            "subscription (one kind connected at a time)",
            "matchers scanned per topic",
            "deliveries/s",
            "rounds' range",
            "vs /events",
            "events/s in",
            "kept up",
            "server CPU",
            "CPU µs / delivery",
            "CPU vs /events",
            "CPU µs / event",
        ],
    )
    for kind, (name, scanned) in MERCURE_LABELS.items():
        run = kinds.get(kind)
        if run is None:
            continue
        rate, cost = run["deliveries_per_s"], run["cpu_s_per_million"]
        low, high = run["deliveries_per_s_range"]
        table.rows.append(
            [
                name,
                f"{scanned(run['subscribers']):,}",
                count(rate),
                f"{count(low)} to {count(high)}",
                ratio(rate, reference.get("deliveries_per_s")),
                count(run["published_per_s"]),
                share(run["kept_up"]),
                share(run["cpu_share"]),
                fixed(cost),
                ratio(cost, reference.get("cpu_s_per_million")),
                count(cost * run["subscribers"]),
            ]
        )
    table.notes.append(
        "Every kind receives the same events: single-event POSTs of JSON to `/publish`, "
        "topic `https://example.com/bench/1`, as fast as they are delivered (as in 2a). One "
        "broker process; the kinds take turns, each one's subscribers connecting, measured "
        "and gone before the next kind connects (the hub's open streams read from "
        f"`/metrics`), {rounds or 'several'} rounds over all kinds; every number is the "
        "median over the rounds (rounds' range: the lowest and highest deliveries/s). CPU "
        "µs / delivery is the server's CPU per million deliveries in seconds, as in 2a; CPU "
        "µs / event is that times the subscribers, the server's work per published event. "
        "Matchers scanned: distinct URL patterns or URI templates the hub asks about each "
        "published topic (`Hub.fan_out`); exact topics and our patterns are found in the "
        "trie whatever their number."
    )
    shared, distinct = kinds.get("url_pattern"), kinds.get("url_pattern_distinct")
    if shared and distinct and distinct["subscribers"]:
        extra = (
            distinct["cpu_s_per_million"] * distinct["subscribers"]
            - shared["cpu_s_per_million"] * shared["subscribers"]
        ) / distinct["subscribers"]
        table.notes.append("")
        table.notes.append(
            f"The {distinct['subscribers']:,} patterns of their own (none of which matches) "
            f"cost {extra:.2f} µs of server CPU each per published topic, against the "
            "shared pattern alone: the fan-out's cost grows with the number of distinct "
            "patterns, not of subscribers sharing one."
        )
    return table


def mercure_section(results: dict[str, Any]) -> str:
    """Scenario 7's part of the doc, saying which run it comes from: a run of its own
    leaves the rest of the doc to an earlier run."""
    meta = results.get("meta", {})
    return "\n".join(
        [
            mercure_table(results).markdown(),
            "",
            f"Measured in {meta.get('mode')} mode on {meta.get('date')}, sse-broker "
            f"{meta.get('commit') or 'unknown'}, with broker flags "
            f"`{' '.join(meta.get('broker_args', [])) or '(defaults)'}`; other processes "
            f"used {meta.get('foreign_share', 0):.0%} of the machine during that run.",
        ]
    )


def tables(results: dict[str, Any]) -> list[Table]:
    return [
        idle_table(results),
        fanout_table(results),
        batched_table(results),
        fixed_table(results),
        latency_table(results),
        slow_table(results),
        publish_table(results),
        scale_table(results),
    ]


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    measured: str
    met: bool | None  # None: not measured / not applicable yet


def targets(results: dict[str, Any]) -> list[Target]:
    found: list[Target] = []
    fanout = results.get("fanout", {})
    sizes = sorted({int(size) for runs in fanout.values() for size in runs})
    largest = max(sizes, default=10000)
    for size in sorted({1000, largest}):
        broker = dig(fanout, BROKER, str(size), "deliveries_per_s")
        raw = dig(fanout, BASELINE, str(size), "deliveries_per_s")
        pattern = dig(fanout, PATTERN, str(size), "deliveries_per_s")
        measured = "—"
        met = None
        if _number(broker) is not None and _number(raw):
            value = broker / raw
            measured = f"{value:.0%} of raw ({count(broker)} vs {count(raw)}/s)"
            if _number(pattern):
                measured += f"; {broker / pattern:.1f}{TIMES} aiohttp-sse"
            cost = dig(fanout, BROKER, str(size), "cpu_s_per_million")
            raw_cost = dig(fanout, BASELINE, str(size), "cpu_s_per_million")
            if _number(cost) and _number(raw_cost):
                measured += f"; per server CPU-second {raw_cost / cost:.0%} of raw"
            busy = [dig(fanout, server, str(size), "cpu_share") for server in (BROKER, BASELINE)]
            if all(_number(value) is not None for value in busy) and min(busy) < 0.85:
                measured += (
                    f" (server CPU {busy[0]:.0%} and {busy[1]:.0%} of a core: bounded by the "
                    "rest of the machine, not only the server)"
                )
            met = value >= 0.8
        found.append(
            Target(f"Fan-out deliveries/s at {size:,} subscribers ≥ 80% of raw", measured, met)
        )
    broker = dig(results, "fixed", BROKER, "cpu_us_per_delivery")
    pattern = dig(results, "fixed", PATTERN, "cpu_us_per_delivery")
    measured, met = "—", None
    if _number(broker) is not None and _number(pattern):
        measured = f"{broker / pattern:.2f}{TIMES} ({broker:.2f} vs {pattern:.2f} µs/delivery)"
        met = broker / pattern <= 1 / 3
    found.append(Target("CPU per delivery at 1k subs, ~30 ev/s ≤ ⅓ of aiohttp-sse", measured, met))

    idle = results.get("idle", {}).get(BROKER, [])
    measured, met = "—", None
    if idle:
        largest = idle[-1]
        per = largest["bytes_per_connection"]
        measured = f"{per / KIB:.2f} KiB at {largest['connections']:,} connections"
        met = per <= 8 * KIB and largest["connections"] >= 10000
        if largest["connections"] < 10000:
            met = None
    found.append(Target("10,000 idle subscribers ≤ 8 KiB RSS each", measured, met))

    latency = dig(results, "latency", BROKER, "1")
    measured, met = "—", None
    if latency:
        measured = (
            f"p99 {ms(latency['p99'])} ms at {latency['subscribers']:,} subs; raw: "
            f"{ms(dig(results, 'latency', BASELINE, '1', 'p99'))} ms; a POST's fan-out alone "
            f"takes {ms(latency.get('post_p50'))} ms"
        )
        met = latency["p99"] <= 0.050 and latency["subscribers"] >= 10000
    found.append(Target("p99 publish→receive ≤ 50 ms, 10,000 subs at 1 ev/s", measured, met))

    slow = dig(results, "slow", BROKER)
    measured, met = "—", None
    if slow:
        change, spread = slow_change(slow)
        bound = slow_bound(slow, results.get("meta", {}))
        if change is not None:
            measured = f"p99 {change:+.0%} ({_phases(slow, 'latency', 'p99', show=ms)} ms"
            if spread is not None:
                measured += f"; the references differ by {spread:.0%}"
            measured += ")"
            met = change <= 0.20
            if bound is not None:
                measured += f"; peak RSS {mib(slow['peak_rss'])} MiB ≤ bound {mib(bound)} MiB"
                met = met and slow["peak_rss"] <= bound
    found.append(
        Target("Slow consumers (10%): others' p99 +≤ 20%, RSS under the bound", measured, met)
    )
    found.append(workers_target(results))
    return found


def workers_target(results: dict[str, Any]) -> Target:
    """``--workers 2`` against one process, on Redis and on the in-memory backend; met
    only when both ratios reach 1.7."""
    name = f"`--workers 2` ≥ 1.7{TIMES} one process"
    scaleout = results.get("scaleout", {})
    sizes = sorted({int(size) for runs in scaleout.values() for size in runs})
    parts = []
    met: bool | None = None
    for size in sizes:
        workers = dig(scaleout, "workers2", str(size), "deliveries_per_s")
        redis = dig(scaleout, "redis", str(size), "deliveries_per_s")
        memory = dig(scaleout, "memory", str(size), "deliveries_per_s")
        if not (_number(workers) and _number(redis) and _number(memory)):
            continue
        cpu = dig(scaleout, "workers2", str(size), "cpu_share")
        loadgen = dig(scaleout, "workers2", str(size), "loadgen_cpu_s_per_million")
        server = dig(scaleout, "workers2", str(size), "cpu_s_per_million")
        parts.append(
            f"{size:,} subs: {workers / redis:.2f}{TIMES} Redis 1 process, "
            f"{workers / memory:.2f}{TIMES} in-memory ({count(workers)} vs {count(redis)} "
            f"and {count(memory)}/s; the workers used {share(cpu)} of a core in all, the "
            f"load generators {fixed(loadgen)} CPU s per million deliveries to the "
            f"workers' {fixed(server)})"
        )
        hit = workers / redis >= 1.7 and workers / memory >= 1.7
        met = hit if met is None else met and hit
    if not parts:
        skipped = results.get("scaleout_skipped")
        return Target(name, f"not measured{f': {skipped}' if skipped else ''}", None)
    return Target(
        name,
        "; ".join(parts) + ". The load generators, redis-server and the publisher share "
        "these 2 cores, so two workers cannot get two cores",
        met,
    )


def targets_table(results: dict[str, Any]) -> Table:
    table = Table("Targets (sse-broker, one process)", ["target", "measured", "met"], left=3)
    for target in targets(results):
        verdict = "—" if target.met is None else "met" if target.met else "**missed**"
        table.rows.append([target.name, target.measured, verdict])
    return table


# --------------------------------------------------------------------------- text and doc


def render_text(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    parts = [
        f"sse-broker benchmark, {meta.get('mode')} mode, {meta.get('date')}, "
        f"{meta.get('cores')} cores, {meta.get('elapsed', 0):.0f}s; other processes used "
        f"{meta.get('foreign_share', 0):.0%} of the machine meanwhile",
        "",
    ]
    shown = [*tables(results), targets_table(results)]
    if "mercure" in results:
        shown.insert(-1, mercure_table(results))
    for table in shown:
        parts.append(table.text().replace("**", ""))
        parts.append("")
    for server, errors in results.get("errors", {}).items():
        for error in errors:
            parts.append(f"ERROR {server}: {error}")
    return "\n".join(parts)


def existing_section(text: str, start_marker: str, end_marker: str) -> str | None:
    """What lies between two markers of the doc, or None when they are not both there."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return None
    return text[start + len(start_marker) : end].strip() or None


def render_markdown(results: dict[str, Any], notes: str, plots: Sequence[str], mercure: str) -> str:
    meta = results.get("meta", {})
    versions = meta.get("versions", {})
    plan = meta.get("plan", {})
    command = "make bench" if meta.get("mode") == "quick" else "make bench-full"
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` ({meta.get('mode')} mode) on {meta.get('date')}, "
        f"in {meta.get('elapsed', 0):.0f} s. Everything above the Notes section is "
        "regenerated on every run; edit only the Notes.",
        "",
        "## Machine and versions",
        "",
        "| | |",
        "| --- | --- |",
        f"| CPU | {meta.get('cpu')}, {meta.get('cores')} cores |",
        f"| memory | {meta.get('memory', 0) / 2**30:.1f} GiB |",
        f"| kernel | Linux {meta.get('kernel')} |",
        f"| load average (1/5/15 min) at start / end | "
        f"{' '.join(meta.get('load_start', []))} / {' '.join(meta.get('load_end', []))} |",
        f"| CPU used by other processes during the run | "
        f"{meta.get('foreign_cpu_seconds', 0):.0f} core-seconds, "
        f"{meta.get('foreign_share', 0):.0%} of the machine |",
        f"| open files limit of the driver (soft/hard) | {meta.get('nofile')} |",
        f"| sse-broker commit | {meta.get('commit') or 'unknown'} |",
        f"| broker flags | `{' '.join(meta.get('broker_args', [])) or '(defaults)'}` |",
        "| versions | "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + " |",
        "",
        "## How it is measured",
        "",
        "- Each server is its own process on 127.0.0.1: `python -m broker serve` and the "
        "baselines in `bench/servers/` (aiohttp + aiohttp-sse with a queue and send loop per "
        "client; Starlette + sse-starlette under uvicorn, the same pattern; a raw asyncio "
        "Protocol server that encodes each event once and writes the same bytes to every "
        "transport: the practical limit of one Python process here). All use uvloop.",
        "- Subscribers are `bench/loadgen.py` processes (at most 5,000 connections each): one "
        "asyncio Protocol per connection (uvloop), counting `\\ndata: ` with `bytes.count`; "
        "sampled connections (spread evenly over the connection order) parse the payload's "
        "`time.monotonic_ns()` stamp into a log-bucket histogram. Each raises its open-files "
        "limit to the hard limit and reports it. Reports are JSON lines every 50 ms, read "
        "continuously by a thread per process in the driver, so a report is never late.",
        "- The driver publishes over one raw keep-alive HTTP/1.1 socket and samples the "
        "server's CPU (utime+stime) and RSS from /proc every 50 ms. Scenarios run in turn "
        "and each runs every server back to back, so ratios compare numbers taken minutes "
        "apart at most.",
        f"- Events carry {plan.get('event_size', 128)} bytes of data unless a table says "
        "otherwise. Fan-out (2a) publishes one event per POST, so each delivery is one "
        "write; 2b publishes JSON batches, which the broker and the coalescing raw server "
        "write once per subscriber per batch.",
        "",
        "### Reading these numbers",
        "",
        "- Two cores are shared by the server, the load generators and the driver. Reading "
        "a socket costs the load generators about what writing it costs the server (see "
        "the loadgen CPU column), so at the top rates the machine, not only the server, "
        "sets the number: when server CPU is well under 100%, compare CPU s / M deliveries "
        "(the server's cost per delivery) rather than deliveries/s.",
        "- One `transport.write` to a loopback socket costs about 5-10 µs of kernel time "
        "here (a VM), so one event to 10,000 subscribers takes even the raw server about "
        "0.1 s: see the POST ms columns of 3b. That is the floor under the 10k-subscriber "
        "latency on this machine.",
        "- Quick mode measures over windows of 2.5-6 s: expect run-to-run differences of "
        "10-30%, most in p99 and in the slow-consumer comparison. `make bench-full` uses "
        "windows of 10-30 s.",
        "- Stalled subscribers are absorbed first by the server's kernel send buffer (Linux "
        "autotunes it to about 2.8 MB per socket here); only then does a server queue in "
        "its own memory. In quick mode that happens in the last seconds of the phase.",
        "- Other processes on the machine show up in every number; the table above says how "
        "much CPU they took during this run.",
        "",
        "## Targets",
        "",
        targets_table(results).markdown(heading=False),
        "",
        "## Results",
        "",
    ]
    for table in tables(results):
        lines.append(table.markdown())
        lines.append("")
    lines.extend([MERCURE_START, mercure, MERCURE_END, ""])
    if plots:
        lines.append("### Plots")
        lines.append("")
        lines.extend(f"![{name}]({name})" for name in plots)
        lines.append("")
    errors = results.get("errors", {})
    if errors:
        lines.append("### Errors in this run")
        lines.append("")
        for server, messages in errors.items():
            lines.extend(f"- {label(results, server)}: {message}" for message in messages)
        lines.append("")
    lines.extend(["## Notes", "", NOTES_START, notes, NOTES_END, ""])
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], docs: Path) -> list[Path]:
    """Rewrite the doc, the plots and the JSON; a run of the Mercure scenario alone
    rewrites only the Mercure section and the JSON's Mercure part, and a run without it
    keeps the section of the doc an earlier run wrote."""
    docs.mkdir(parents=True, exist_ok=True)
    doc = docs / "benchmarks.md"
    data = docs / "bench-results.json"
    text = _read(str(doc))
    mercure = mercure_section(results) if "mercure" in results else None
    if dig(results, "meta", "sessions") == ["mercure"]:
        return _write_mercure_only(results, mercure, doc, text, data)
    kept = existing_section(text, MERCURE_START, MERCURE_END)
    written = make_plots(results, docs)
    notes = existing_section(text, NOTES_START, NOTES_END) or DEFAULT_NOTES
    plots = [path.name for path in written]
    doc.write_text(render_markdown(results, notes, plots, mercure or kept or DEFAULT_MERCURE))
    data.write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
    return [doc, data, *written]


def _write_mercure_only(
    results: dict[str, Any], mercure: str | None, doc: Path, text: str, data: Path
) -> list[Path]:
    """Put one Mercure-only run's section between the doc's markers and its numbers under
    ``mercure`` (its meta under ``mercure_meta``) in the JSON, keeping everything else."""
    written: list[Path] = []
    start, end = text.find(MERCURE_START), text.find(MERCURE_END)
    if mercure is not None and 0 <= start < end:
        doc.write_text(text[: start + len(MERCURE_START)] + "\n" + mercure + "\n" + text[end:])
        written.append(doc)
    elif mercure is not None:
        print(f"{doc} has no Mercure markers: left alone, see {data}", file=sys.stderr)
    try:
        merged = json.loads(data.read_text())
    except (OSError, ValueError):
        merged = {}
    if not isinstance(merged, dict):
        merged = {}
    merged.update(
        {
            "mercure": results.get("mercure", {}),
            "mercure_meta": results.get("meta", {}),
            "mercure_errors": results.get("errors", {}),
        }
    )
    data.write_text(json.dumps(merged, indent=1, sort_keys=True, default=str) + "\n")
    return [*written, data]


# --------------------------------------------------------------------------- plots


def _log_ticks(axis: Any, template: str) -> None:
    """Label a log y axis at 1, 2 and 5 times the powers of ten in view, nothing else."""
    import matplotlib.ticker

    low, high = axis.get_ylim()
    ticks = [
        factor * 10.0**power
        for power in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        for factor in (1, 2, 5)
        if low <= factor * 10.0**power <= high
    ]
    axis.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    axis.yaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda value, _: template.format(value))
    )
    axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def make_plots(results: dict[str, Any], docs: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    colors = {
        BROKER: "tab:blue",
        BASELINE: "tab:gray",
        RAW_COALESCING: "tab:gray",
        PATTERN: "tab:orange",
        "sse_starlette_pattern": "tab:green",
    }
    meta = results.get("meta", {})
    subtitle = f"{meta.get('mode')} mode, {meta.get('date')}, {meta.get('cores')} cores"

    fanout = results.get("fanout", {})
    if fanout:
        figure, axis = plt.subplots(figsize=(9.5, 4.5))
        for server in servers_in(results, "fanout"):
            points = sorted(
                (run["subscribers"], run["deliveries_per_s"]) for run in fanout[server].values()
            )
            axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                label=label(results, server),
                color=colors.get(server),
            )
        for server in servers_in(results, "fanout_batched"):
            runs = results["fanout_batched"][server].values()
            points = sorted((run["subscribers"], run["deliveries_per_s"]) for run in runs)
            axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="D" if server == RAW_COALESCING else "s",
                markersize=9 if server == RAW_COALESCING else 6,
                markerfacecolor="none" if server == RAW_COALESCING else None,
                linestyle="--",
                label=f"{label(results, server)}, batches of {next(iter(runs))['batch']}",
                color=colors.get(server if server != RAW_COALESCING else BASELINE),
            )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("subscribers (one topic)")
        axis.set_ylabel("deliveries per second")
        axis.set_title(f"Fan-out throughput\n{subtitle}", fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        _log_ticks(axis, "{:,.0f}")
        figure.tight_layout()
        path = docs / "bench-fanout.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    latency_sets: list[tuple[str, dict[str, dict[str, Any]]]] = []
    for rate, _ in sorted(
        {r: 0 for runs in results.get("latency", {}).values() for r in runs}.items(),
        key=lambda item: float(item[0]),
    ):
        per_server = {
            server: runs[rate]
            for server, runs in results.get("latency", {}).items()
            if rate in runs
        }
        first = next(iter(per_server.values()))
        unit = "event/s" if float(rate) == 1 else "events/s"
        latency_sets.append((f"{first['subscribers']:,} subscribers, {rate} {unit}", per_server))
    fixed_runs = results.get("fixed", {})
    if fixed_runs:
        per_server = {server: run["latency"] for server, run in fixed_runs.items()}
        first = next(iter(fixed_runs.values()))
        latency_sets.append(
            (f"{first['subscribers']:,} subscribers, {first['rate']:g} events/s", per_server)
        )
    if latency_sets:
        figure, axes = plt.subplots(
            1, len(latency_sets), figsize=(5.5 * len(latency_sets), 4.5), squeeze=False
        )
        keys = ["p50", "p90", "p99", "p999", "max"]
        names = ["p50", "p90", "p99", "p99.9", "max"]
        for axis, (title, per_server) in zip(axes[0], latency_sets, strict=True):
            order = [s for s in SERVER_ORDER if s in per_server]
            width = 0.8 / max(len(order), 1)
            for position, server in enumerate(order):
                values = [per_server[server].get(key, float("nan")) * 1e3 for key in keys]
                axis.bar(
                    [i + position * width for i in range(len(keys))],
                    values,
                    width=width,
                    label=label(results, server),
                    color=colors.get(server),
                )
            axis.set_xticks([i + width * (len(order) - 1) / 2 for i in range(len(keys))])
            axis.set_xticklabels(names)
            axis.set_yscale("log")
            axis.set_ylabel("publish → receive, ms")
            axis.set_title(title, fontsize=10)
            axis.axhline(50, color="red", linestyle="--", linewidth=0.8)
            axis.grid(True, axis="y", which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        figure.suptitle(f"Latency percentiles (red: 50 ms target)\n{subtitle}", fontsize=10)
        figure.tight_layout()
        path = docs / "bench-latency.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    idle = results.get("idle", {})
    if idle:
        figure, axis = plt.subplots(figsize=(9, 4.5))
        for server in servers_in(results, "idle"):
            steps = idle[server]
            axis.plot(
                [step["connections"] for step in steps],
                [step["bytes_per_connection"] / KIB for step in steps],
                marker="o",
                label=label(results, server),
                color=colors.get(server),
            )
        axis.axhline(8, color="red", linestyle="--", linewidth=0.8, label="target: 8 KiB")
        axis.set_xlabel("idle connections")
        axis.set_ylabel("server RSS per connection, KiB (log)")
        axis.set_yscale("log")
        _log_ticks(axis, "{:g}")
        axis.set_title(f"Memory per idle connection\n{subtitle}", fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        figure.tight_layout()
        path = docs / "bench-memory.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written

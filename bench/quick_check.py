"""A quick local check of two figures: fan-out rate to N subscribers, RSS per idle stream.

    .venv/bin/python bench/quick_check.py [--subscribers 1000] [--idle 5000]

The broker, the load generator and this publisher each run in their own process on
127.0.0.1. Fan-out rate is events received by all subscribers per second while the
publisher posts JSON batches as fast as the broker accepts them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_broker(port: int, *flags: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--port", str(port), *flags],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("broker did not start")


def start_loadgen(port: int, connections: int, seconds: float) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "loadgen.py"),
            "--port",
            str(port),
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = json.loads(process.stdout.readline())
    assert line["connected"] == connections, line
    return process


class LatestCount:
    """Follows the load generator's reports in a thread, keeping only the newest count."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self._stdout = process.stdout
        self.events = 0
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        for line in self._stdout:
            self.events = json.loads(line).get("events", self.events)


def post_batch(sock: socket.socket, body: bytes) -> None:
    sock.sendall(
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(65536)
    head, _, rest = response.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head)


def fan_out(subscribers: int, seconds: float, batch: int) -> dict[str, float]:
    port = free_port()
    broker = start_broker(port)
    try:
        loadgen = start_loadgen(port, subscribers, seconds + 5)
        body = json.dumps(
            [{"topic": "bench", "data": {"n": n, "text": "x" * 64}} for n in range(batch)]
        ).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        counts = LatestCount(loadgen)
        time.sleep(0.5)
        first = counts.events
        cpu_before = cpu_seconds(broker.pid)
        started = time.monotonic()
        published = 0
        while time.monotonic() - started < seconds:
            post_batch(sock, body)
            published += batch
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(broker.pid) - cpu_before
        time.sleep(1.0)
        received = counts.events - first
        loadgen.kill()
        return {
            "subscribers": subscribers,
            "published_per_s": published / elapsed,
            "deliveries_per_s": received / elapsed,
            "expected_deliveries": published * subscribers,
            "received": received,
            "cpu_s_per_million": cpu / max(received, 1) * 1e6,
        }
    finally:
        broker.kill()
        broker.wait()


def idle_rss(connections: int) -> dict[str, float]:
    port = free_port()
    broker = start_broker(port)
    try:
        warm = start_loadgen(port, 10, 30)
        time.sleep(0.5)
        base = rss_bytes(broker.pid)
        loadgen = start_loadgen(port, connections, 30)
        time.sleep(1.0)
        after = rss_bytes(broker.pid)
        loadgen.kill()
        warm.kill()
        return {
            "connections": connections,
            "rss_base_mib": base / 2**20,
            "rss_after_mib": after / 2**20,
            "bytes_per_connection": (after - base) / connections,
        }
    finally:
        broker.kill()
        broker.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(fan_out(args.subscribers, args.seconds, args.batch)))
    print(json.dumps(idle_rss(args.idle)))


if __name__ == "__main__":
    main()

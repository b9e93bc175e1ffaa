"""``--workers N``: N processes on one port (SO_REUSEPORT) sharing the Redis log, under a
supervisor that forwards stop signals and gives up when a worker dies.

Which process holds which socket is read from ``/proc`` (socket inodes in
``/proc/<pid>/fd`` against ``/proc/net/tcp``), so the tests see the kernel's own view of
who listens and who serves each stream.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from broker.subscriber import MISSED_EVENT
from tests.conftest import BrokerProcess, RawStream, wait_for

StartBroker = Callable[..., BrokerProcess]

READ_TIMEOUT = 20.0
_LISTEN, _ESTABLISHED = "0A", "01"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads sockets from /proc"
)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def tcp_sockets(port: int, state: str) -> set[int]:
    """Inodes of IPv4 sockets on local ``port`` in ``state`` (``/proc/net/tcp``)."""
    found: set[int] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == state:
            found.add(int(fields[9]))
    return found


def owners(pids: list[int], inodes: set[int]) -> dict[int, int]:
    """How many of ``inodes`` each pid holds."""
    return {pid: len(socket_inodes(pid) & inodes) for pid in pids}


def workers_of(node: BrokerProcess, count: int) -> list[int]:
    pids: list[int] = []

    def all_listening() -> bool:
        nonlocal pids
        pids = children(node.process.pid)
        if len(pids) != count:
            return False
        listening = tcp_sockets(node.port, _LISTEN)
        return all(held == 1 for held in owners(pids, listening).values())

    deadline = time.monotonic() + READ_TIMEOUT
    while not all_listening():
        if time.monotonic() > deadline:
            raise AssertionError(f"workers did not all listen: {pids}")
        time.sleep(0.05)
    return pids


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


async def test_two_workers_serve_one_port_and_every_stream_gets_every_event(
    broker_process: StartBroker, redis_url: str, redis_prefix: str, client: httpx.AsyncClient
) -> None:
    node = broker_process(
        "--workers", "2", "--redis-url", redis_url, "--redis-prefix", redis_prefix
    )
    pids = workers_of(node, 2)
    assert node.process.pid not in pids
    streams: list[RawStream] = []
    # The kernel spreads connections by a hash of their addresses: open streams until
    # both workers hold some.
    while len(streams) < 64:
        stream = await RawStream.connect(node.port, "/events?topic=t")
        await stream.read_until(lambda s=stream: bool(s.frames), within=READ_TIMEOUT)  # type: ignore[misc]
        streams.append(stream)
        held = owners(pids, tcp_sockets(node.port, _ESTABLISHED))
        if len(streams) >= 8 and all(count > 0 for count in held.values()):
            break
    held = owners(pids, tcp_sockets(node.port, _ESTABLISHED))
    assert all(count > 0 for count in held.values()), held
    published: list[tuple[str, str]] = []
    for n in range(30):  # each publish lands on either worker
        response = await client.post(f"{node.url}/publish", json={"topic": "t", "data": str(n)})
        assert response.status_code == 200, response.text
        published.append((response.json()["id"], str(n)))
    for stream in streams:
        await stream.read_until(lambda s=stream: len(s.events()) >= 30, within=READ_TIMEOUT)  # type: ignore[misc]
        assert [(f.id, f.data) for f in stream.events()] == published
        assert not any(f.event == MISSED_EVENT for f in stream.frames)

    status, stderr = node.stop(signal.SIGTERM)
    assert status == 0, stderr
    assert all(gone(pid) for pid in pids)
    for stream in streams:  # every stream was ended cleanly, by its own worker
        await stream.read_to_end(within=READ_TIMEOUT)
        assert stream.body.complete
        stream.close()
    assert "Traceback" not in stderr
    assert "[worker 1]" in stderr
    assert "[worker 2]" in stderr


async def test_a_worker_that_dies_stops_the_others_and_the_supervisor_exits_non_zero(
    broker_process: StartBroker, redis_url: str, redis_prefix: str
) -> None:
    node = broker_process(
        "--workers", "2", "--redis-url", redis_url, "--redis-prefix", redis_prefix
    )
    first, second = workers_of(node, 2)
    os.kill(first, signal.SIGKILL)
    await wait_for(lambda: node.process.poll() is not None, READ_TIMEOUT)
    status, stderr = node.stop()
    assert status == 1
    assert f"worker (pid {first}) exited with status -9; stopping the others" in stderr
    assert gone(second)


def test_sigint_is_forwarded_like_sigterm(
    broker_process: StartBroker, redis_url: str, redis_prefix: str
) -> None:
    node = broker_process(
        "--workers", "3", "--redis-url", redis_url, "--redis-prefix", redis_prefix
    )
    pids = workers_of(node, 3)
    status, stderr = node.stop(signal.SIGINT)
    assert status == 0, stderr
    assert all(gone(pid) for pid in pids)


def exited(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever adopted it to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


async def test_workers_stop_when_the_supervisor_is_killed(
    broker_process: StartBroker, redis_url: str, redis_prefix: str
) -> None:
    """SIGKILL leaves the supervisor no chance to forward a stop: the kernel does it."""
    node = broker_process(
        "--workers", "2", "--redis-url", redis_url, "--redis-prefix", redis_prefix
    )
    pids = workers_of(node, 2)
    node.process.kill()
    await wait_for(lambda: all(exited(pid) for pid in pids), READ_TIMEOUT)

"""systemd's notify protocol on real datagram sockets: READY=1 from fleetd and from a worker, WATCHDOG=1
pings at half the watchdog interval, the abstract namespace, and a no-op without NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import sdnotify
from tests.fleet.conftest import Fleet


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    try:
        yield sock, path
    finally:
        sock.close()


def _datagrams(sock: socket.socket, seconds: float) -> list[str]:
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return got


def test_notify_sends_lines_and_is_a_no_op_without_a_socket(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.notify("READY=1", "STATUS=up") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"bem-fleet-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert sock.recv(64) == b"WATCHDOG=1"


def test_watchdog_interval_is_half_and_only_for_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval() is None


@pytest.mark.slow
def test_fleetd_and_worker_send_ready_then_watchdog(
    fleet: Fleet, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    fleet.env.update({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})  # ping every 0.2 s
    fleet.start_fleetd()
    got = _datagrams(sock, 1.5)
    ready = [g for g in got if "READY=1" in g]
    assert len(ready) == 1 and "STATUS=serving http://" in ready[0], got
    after = got[got.index(ready[0]) + 1 :]
    assert sum(g == "WATCHDOG=1" for g in after) >= 4, got  # 1.5 s at one ping per 0.2 s, with slack
    fleet.env.pop("WATCHDOG_USEC")
    fleet.start_worker("w0")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(g.startswith("READY=1") and "worker w0" in g for g in _datagrams(sock, 0.5)):
            break
    else:
        pytest.fail("the worker sent no READY=1")

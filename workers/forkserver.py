"""A template process that imports the task modules once; every task's process is a fork of it.

Starting Python and importing msgspec, the fleet's modules and torch costs 0.1-3 s per task; a fork of
a process that already has them costs milliseconds. The template (a "zygote", run as
`python -m workers.forkserver FD`) never touches CUDA, so each fork initialises CUDA itself, which is
safe; torch's DataLoader forks after `import torch` the same way.

Per task the worker hands the template four sockets over a Unix socket (SCM_RIGHTS): the child's
stdin, stdout and stderr, and a status socket on which the template writes the child's pid at once
and its exit code when it is reaped. The child runs `workers.child.main` with those as fds 0-2. Each
level dies with its parent (PR_SET_PDEATHSIG): kill -9 of a worker takes its template and its task
process with it, which frees the task's GPU memory.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import selectors
import signal
import socket
import sys
import traceback
from subprocess import DEVNULL

import anyio
import structlog
from anyio.abc import Process, SocketAttribute, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from fleet.natsserver import die_with_parent

log = structlog.get_logger("fleet.forkserver")

READY = b"R"


class ForkServerError(RuntimeError):
    pass


class Forked:
    """The worker's ends of one forked task process."""

    def __init__(self, pid: int, streams: list[UNIXSocketStream], status: BufferedByteReceiveStream) -> None:
        self.pid, self.stdin = pid, streams[0]
        self.out, self.err = BufferedByteReceiveStream(streams[1]), BufferedByteReceiveStream(streams[2])
        self._status, self._streams = status, streams
        self.returncode: int | None = None
        self._waiting = anyio.Lock()

    async def wait(self) -> int:
        """The exit code as subprocess reports it: negative for a signal."""
        async with self._waiting:  # one reader of the status socket; the others get its answer
            if self.returncode is None:
                try:
                    self.returncode = int(await self._status.receive_until(b"\n", 32))
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    self.returncode = -int(signal.SIGKILL)  # the template died: so did the child
        return self.returncode

    def alive(self) -> bool:
        """Without waiting: True unless the template already reported an exit or itself went away."""
        if self.returncode is not None:
            return False
        raw = self._streams[3].extra(SocketAttribute.raw_socket)
        try:
            raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing to read: the child still runs
        except OSError:
            return False
        return False  # an exit code, or EOF (the template is gone, and the child with it)

    def signal(self, sig: int) -> None:
        if self.returncode is None:  # once reaped, the pid may belong to someone else
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def aclose(self) -> None:
        for s in self._streams:
            await s.aclose()


class ForkServer:
    """The worker's handle on its template process."""

    def __init__(self, env: dict[str, str], preload: list[str]) -> None:
        self.env, self.preload = env, preload
        self._proc: Process | None = None
        self._sock: UNIXSocketStream | None = None
        self._lock = anyio.Lock()

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = await anyio.open_process(
                [sys.executable, "-m", "workers.forkserver", str(theirs.fileno()), *self.preload],
                stdin=DEVNULL,
                stdout=None,  # the template's own output (an import error) goes to the worker's log
                stderr=None,
                env=self.env,
                pass_fds=[theirs.fileno()],
            )
        finally:
            theirs.close()
        self._sock = await UNIXSocketStream.from_socket(ours)
        try:
            ready = await self._sock.receive(1)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            ready = b""
        if ready != READY:
            await self.aclose()
            raise ForkServerError(f"task process template did not start (preload: {self.preload})")

    async def fork(self) -> Forked:
        async with self._lock:
            if self._proc is None:
                await self.start()  # the first fork starts the template
            try:
                return await self._fork()
            except ForkServerError as e:  # the template died (the OOM killer?): a new one, once
                log.warning("forkserver_restart", error=str(e))
                await self.aclose()
                await self.start()
                return await self._fork()

    async def _fork(self) -> Forked:
        if self._sock is None:
            raise ForkServerError("task process template is not running")
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
        try:
            await self._sock.send_fds(b"F", [theirs.fileno() for _, theirs in pairs])
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as e:
            for ours, _ in pairs:
                ours.close()
            raise ForkServerError(f"task process template is gone: {e!r}") from None
        finally:
            for _, theirs in pairs:
                theirs.close()
        streams = [await UNIXSocketStream.from_socket(ours) for ours, _ in pairs]
        status = BufferedByteReceiveStream(streams[3])
        try:
            pid = int(await status.receive_until(b"\n", 32))
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            for s in streams:
                await s.aclose()
            raise ForkServerError("task process template died while forking") from None
        return Forked(pid, streams, status)

    async def aclose(self) -> None:
        if self._sock is not None:
            await self._sock.aclose()  # EOF: the template exits
            self._sock = None
        if self._proc is not None:
            with anyio.move_on_after(5):
                await self._proc.wait()
            if self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
            self._proc = None


# ---- the template process ------------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so SIGCHLD reaches the wakeup fd
    status_of: dict[int, socket.socket] = {}
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    sock.sendall(READY)
    while True:
        for key, _ in sel.select():
            if key.fileobj is sock:
                msg, fds, _, _ = socket.recv_fds(sock, 16, 4)
                if not msg:
                    return  # the worker closed its end: children die with us (PDEATHSIG)
                status = socket.socket(fileno=fds[3])
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    inherited = [sock.fileno(), sel.fileno(), wake_r, wake_w]
                    _become_task(fds, inherited + [s.fileno() for s in status_of.values()])
                for fd in fds[:3]:
                    os.close(fd)
                status.sendall(f"{pid}\n".encode())
                status_of[pid] = status
            else:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
        while status_of:
            pid, st = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            reaped = status_of.pop(pid, None)
            if reaped is not None:
                with contextlib.suppress(OSError):  # the worker is gone
                    reaped.sendall(f"{os.waitstatus_to_exitcode(st)}\n".encode())
                reaped.close()


def _become_task(fds: list[int], inherited: list[int]) -> None:
    """In the forked child: never returns into the template's loop."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in inherited:
            os.close(fd)
        os.close(fds[3])
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
            os.close(fd)
        die_with_parent()
        from workers import child

        code = child.main()
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main(argv: list[str]) -> int:
    die_with_parent()  # the worker
    # Ctrl-C in a terminal reaches the whole process group: the worker decides when we stop (it closes
    # our socket), and its task processes inherit this, so they too stop only by SIGTERM or SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    for name in [
        "msgspec",
        "schemas.messages",
        "bem.core.reporter",
        "workers.child",
        "workers.kinds",
        *argv[1:],
    ]:
        importlib.import_module(name)
    _serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

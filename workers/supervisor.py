"""Runs each task in a child process and turns what the child says into outcomes and messages.

A spare child is started ahead of time (Python and the fleet's modules imported), so the next task
starts in milliseconds; each child runs one task and exits. Cancel sends SIGTERM (the job stops at its
next check) and SIGKILL after a grace period; a timeout does the same; a child that dies without a
result is a crash, with its last log lines as the error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from subprocess import PIPE

import anyio
import msgspec
import structlog
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from workers import protocol as p

log = structlog.get_logger("fleet.supervisor")
Emit = Callable[[p.ChildMsg | list[str]], Awaitable[None]]  # a message, or log lines


class Child:
    def __init__(self, proc: Process) -> None:
        self.proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        self.out = BufferedByteReceiveStream(proc.stdout)
        self.err = BufferedByteReceiveStream(proc.stderr)

    async def read(self) -> p.ChildMsg | None:
        try:
            line = await self.out.receive_until(b"\n", 64 * 1024 * 1024)
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ):
            return None
        return p.decoder.decode(line)

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


class Supervisor:
    def __init__(self, env: dict[str, str], cancel_grace_s: float = 5.0) -> None:
        self.env = env
        self.cancel_grace_s = cancel_grace_s
        self._spare: Child | None = None

    async def _spawn(self) -> Child:
        proc = await anyio.open_process(
            [sys.executable, "-m", "workers.child"], stdin=PIPE, stdout=PIPE, stderr=PIPE, env=self.env
        )
        child = Child(proc)
        msg = await child.read()
        if not isinstance(msg, p.Ready):
            err = (
                (await child.err.receive(65536)).decode(errors="replace")
                if proc.returncode is not None
                else ""
            )
            raise RuntimeError(f"task child did not start: {msg!r} {err}")
        return child

    async def warm(self) -> None:
        if self._spare is None:
            self._spare = await self._spawn()

    async def close(self) -> None:
        if self._spare is not None:
            with anyio.CancelScope(shield=True):
                assert self._spare.proc.stdin is not None
                await self._spare.proc.stdin.aclose()
                await self._spare.proc.wait()
            self._spare = None

    async def run(self, run: p.Run, emit: Emit, cancel: anyio.Event) -> p.Result | p.Error:
        """Run one task to its end; never raises for anything the task does."""
        child = self._spare or await self._spawn()
        self._spare = None
        tail: deque[str] = deque(maxlen=20)
        outcome: p.Result | p.Error | None = None
        stopped: p.Error | None = None
        assert child.proc.stdin is not None
        await child.proc.stdin.send(msgspec.json.encode(run) + b"\n")

        async def pump_logs() -> None:
            batch: list[str] = []
            while True:
                with anyio.move_on_after(0.5):
                    try:
                        line = await child.err.receive_until(b"\n", 1 << 20)
                    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                        break
                    text = line.decode(errors="replace").rstrip()
                    tail.append(text)
                    batch.append(text)
                    if len(batch) < 200:
                        continue
                if batch:
                    await emit(batch)
                    batch = []
            if batch:
                await emit(batch)

        async def stop(reason: str, why: str) -> None:
            nonlocal stopped
            stopped = p.Error(reason, why)  # type: ignore[arg-type]
            child.signal(signal.SIGTERM)
            with anyio.move_on_after(self.cancel_grace_s):
                await child.proc.wait()
            child.signal(signal.SIGKILL)

        async def watch() -> None:
            with anyio.move_on_after(run.assignment.timeout_s) as scope:
                await cancel.wait()
                await stop("cancelled", "cancelled by the coordinator")
                return
            if scope.cancelled_caught:
                await stop("timeout", f"no result within timeout_s={run.assignment.timeout_s:g}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump_logs)
            async with anyio.create_task_group() as inner:
                inner.start_soon(watch)
                while True:
                    try:
                        msg = await child.read()
                    except msgspec.DecodeError as e:
                        log.warning("child_bad_message", error=str(e))
                        continue
                    if msg is None:
                        break
                    if isinstance(msg, p.Result | p.Error):
                        outcome = msg
                    else:
                        await emit(msg)
                rc = await child.proc.wait()
                inner.cancel_scope.cancel()
            tg.cancel_scope.deadline = (
                anyio.current_time() + 2
            )  # the last log lines, unless stderr is held open
        if stopped is not None:
            return stopped
        if outcome is not None:
            return outcome
        sig = -rc if rc < 0 else None
        died = f"killed by signal {signal.Signals(sig).name}" if sig else f"exited with {rc}"
        last = " | ".join(list(tail)[-5:])
        return p.Error("crash", f"task process {died} without a result; last output: {last}")


def child_env(threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "FLEET_TASK_THREADS"):
            env[key] = str(threads)
    env.update(extra or {})
    return env

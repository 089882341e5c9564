"""Runs each task in a child process and turns what the child says into outcomes and messages.

Each child is a fork of a template process that has the fleet's modules (and torch) imported
(`workers.forkserver`), and a spare child is forked while the current task runs, so the next task
starts in milliseconds; each child runs one task and exits. Cancel sends SIGTERM (the job stops at its
next check) and SIGKILL after a grace period; a timeout does the same; a child that dies without a
result is a crash, with its last log lines as the error.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import msgspec
import structlog

from workers import protocol as p
from workers.forkserver import Forked, ForkServer, ForkServerError

log = structlog.get_logger("fleet.supervisor")
Emit = Callable[[p.ChildMsg | list[str]], Awaitable[None]]  # a message, or log lines


async def _read(child: Forked) -> p.ChildMsg | None:
    try:
        line = await child.out.receive_until(b"\n", 64 * 1024 * 1024)
    except (
        anyio.EndOfStream,
        anyio.IncompleteRead,
        anyio.BrokenResourceError,
        anyio.ClosedResourceError,
    ):
        return None
    return p.decoder.decode(line)


class Supervisor:
    def __init__(
        self, env: dict[str, str], cancel_grace_s: float = 5.0, preload: list[str] | None = None
    ) -> None:
        self.cancel_grace_s = cancel_grace_s
        self.forkserver = ForkServer(env, preload or [])
        self._spare: Forked | None = None
        self._current: Forked | None = None
        self._done: dict[str, tuple[anyio.Event, list[p.CommandDone]]] = {}

    async def _spawn(self) -> Forked:
        child = await self.forkserver.fork()
        msg = await _read(child)
        if not isinstance(msg, p.Ready):
            rc = await child.wait()
            await child.aclose()
            raise ForkServerError(f"task child did not start (exit {rc}): {msg!r}")
        return child

    async def warm(self) -> None:
        if self._spare is None:
            self._spare = await self._spawn()

    async def _refill(self) -> None:
        # Shielded: a half-made child would leak if the task's end cancelled this mid-fork.
        try:
            with anyio.CancelScope(shield=True):
                await self.warm()
        except ForkServerError as e:
            log.warning("spare_child_failed", error=str(e))  # the next task forks its own

    async def _hand_over(self, line: bytes) -> Forked:
        """The spare (or a new child) with the Run line sent; a spare that died meanwhile is replaced."""
        child, self._spare = self._spare, None
        if child is not None and not child.alive():
            log.warning("spare_child_gone", pid=child.pid)
            await child.aclose()
            child = None
        if child is not None:
            try:
                await child.stdin.send(line)
                return child
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                log.warning("spare_child_gone", pid=child.pid)
                await child.aclose()
        child = await self._spawn()
        await child.stdin.send(line)
        return child

    async def command(
        self, command_id: str, action: str, timeout: float, value: float | None = None
    ) -> p.CommandDone:
        """Hand a command to the running job and wait until it says it applied it (or refused)."""
        child = self._current
        if child is None:
            return p.CommandDone(command_id, False, "no task is running")
        event, box = self._done[command_id] = (anyio.Event(), [])
        try:
            await child.stdin.send(
                msgspec.json.encode(p.CommandMsg(command_id, action, value, time.time() + timeout)) + b"\n"
            )
            with anyio.move_on_after(timeout):
                await event.wait()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return p.CommandDone(command_id, False, "the task process is gone")
        finally:
            self._done.pop(command_id, None)
        return box[0] if box else p.CommandDone(command_id, False, f"not applied within {timeout:g} s")

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._spare is not None:
                await self._spare.stdin.aclose()  # EOF before a Run: the spare exits
                await self._spare.wait()
                await self._spare.aclose()
                self._spare = None
            await self.forkserver.aclose()

    async def run(self, run: p.Run, emit: Emit, cancel: anyio.Event) -> p.Result | p.Error:
        """Run one task to its end; never raises for anything the task does."""
        child = self._current = await self._hand_over(msgspec.json.encode(run) + b"\n")
        tail: deque[str] = deque(maxlen=20)
        outcome: p.Result | p.Error | None = None
        stopped: p.Error | None = None

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
                await child.wait()
            child.signal(signal.SIGKILL)

        async def watch() -> None:
            with anyio.move_on_after(run.assignment.timeout_s) as scope:
                await cancel.wait()
                await stop("cancelled", "cancelled by the coordinator")
                return
            if scope.cancelled_caught:
                await stop("timeout", f"no result within timeout_s={run.assignment.timeout_s:g}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(self._refill)  # the next task's child, forked while this one runs
            tg.start_soon(pump_logs)
            async with anyio.create_task_group() as inner:
                inner.start_soon(watch)
                while True:
                    try:
                        msg = await _read(child)
                    except msgspec.DecodeError as e:
                        log.warning("child_bad_message", error=str(e))
                        continue
                    if msg is None:
                        break
                    if isinstance(msg, p.Result | p.Error):
                        outcome = msg
                    elif isinstance(msg, p.CommandDone):
                        if waiting := self._done.get(msg.id):
                            waiting[1].append(msg)
                            waiting[0].set()
                    else:
                        await emit(msg)
                rc = await child.wait()
                inner.cancel_scope.cancel()
            tg.cancel_scope.deadline = (
                anyio.current_time() + 2
            )  # the last log lines, unless stderr is held open
        self._current = None
        await child.aclose()
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

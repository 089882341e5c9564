"""The task's own process: `python -m workers.child`, started by the worker's supervisor before it is needed.

It says `Ready`, waits for one `Run` line on stdin, runs the kind, reports, and exits. A fresh process
per task is what makes cancel, timeout, a segfault or a CUDA OOM harmless to the worker: when this
process is gone, so is every byte of GPU memory it held.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import msgspec

from bem.core.reporter import Cancelled, Command, ScoreRow, Value, sample
from schemas.messages import FailureReason, Series
from workers import protocol as p

FLUSH_S, FLUSH_POINTS = 0.25, 1000


class PipeReporter:
    """The fleet's Reporter: metrics batched (every 250 ms or 1,000 points), everything else sent at once.

    A training step never waits on the bus: it appends to a buffer; only a full or stale buffer costs
    one encode and one pipe write, and the worker publishes asynchronously from there. A background
    thread flushes a stale buffer too, so a job's last points (a drift check, say) never wait for its
    next metric call.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lock = threading.RLock()
        self._series: dict[str, tuple[list[int], list[float], list[float]]] = {}
        self._points = 0
        self._last_flush = time.monotonic()
        self._step: dict[str, int] = {}
        self.cancel_requested = False
        self._commands: queue.SimpleQueue[tuple[Command, float | None]] = queue.SimpleQueue()
        threading.Thread(target=self._flush_stale, name="flush", daemon=True).start()

    def _flush_stale(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            with self._lock:
                if self._series and time.monotonic() - self._last_flush >= FLUSH_S:
                    self.flush()

    def listen(self, stdin: BinaryIO) -> None:
        """Read command lines from the worker until it closes stdin (a daemon thread)."""

        def loop() -> None:
            for line in stdin:
                try:
                    msg = msgspec.json.decode(line, type=p.CommandMsg)
                except msgspec.DecodeError:
                    continue
                self._commands.put((Command(msg.id, msg.action, msg.value), msg.deadline))

        threading.Thread(target=loop, name="commands", daemon=True).start()

    def commands(self) -> list[Command]:
        """The commands that arrived, but not one whose sender stopped waiting: it was told "not
        applied", so it must not take effect now (refused here, for the record)."""
        out = []
        while not self._commands.empty():
            command, deadline = self._commands.get_nowait()
            if deadline is not None and time.time() > deadline:
                self.acknowledge(command, False, "expired: the job reached no step boundary in time")
            else:
                out.append(command)
        return out

    def acknowledge(self, command: Command, ok: bool, detail: str) -> None:
        self.flush()  # what the job reported before applying the command goes out first
        self.send(p.CommandDone(command.id, ok, detail))

    def send(self, msg: msgspec.Struct) -> None:
        with self._lock:
            self._out.write(p.encoder.encode(msg) + b"\n")
            self._out.flush()

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        with self._lock:
            self._append(name, value, step)
            self._flush_if_due()

    def metrics(self, values: Mapping[str, Value], step: int) -> None:
        """One check's points (a drift check, a canary run) always leave in the same batch."""
        with self._lock:
            for name, value in values.items():
                for v in sample(value):
                    self._append(name, v, step)
            self._flush_if_due()

    def _append(self, name: str, value: float, step: int | None) -> None:
        if step is None:
            step = self._step.get(name, -1) + 1
        self._step[name] = step
        steps, values, times = self._series.setdefault(name, ([], [], []))
        steps.append(step)
        values.append(float(value))
        times.append(time.time())
        self._points += 1

    def _flush_if_due(self) -> None:
        if self._points >= FLUSH_POINTS or time.monotonic() - self._last_flush >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._series:
                batch = {k: Series(*v) for k, v in self._series.items()}
                self._series, self._points = {}, 0
                self.send(p.MetricBatch(batch))
            self._last_flush = time.monotonic()

    def progress(self, stage: str, done: int, total: int) -> None:
        self.send(p.ProgressMsg(stage, done, total))

    def scores(self, rows: Sequence[ScoreRow]) -> None:
        for i in range(0, len(rows), 5000):  # keep each bus message well under its size limit
            chunk = rows[i : i + 5000]
            self.send(
                p.ScoresMsg(
                    [r.example_id for r in chunk],
                    [r.arm for r in chunk],
                    [r.seed for r in chunk],
                    [r.metric for r in chunk],
                    [float(r.value) for r in chunk],
                )
            )

    def artifact(self, path: Path, kind: str) -> None:
        path = Path(path)
        size, digest = 0, ""
        if path.is_file():
            size = path.stat().st_size
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        self.send(p.ArtifactMsg(str(path), kind, digest, size))

    def cancelled(self) -> bool:
        return self.cancel_requested


def main() -> int:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the task's own prints become log lines
    reporter = PipeReporter(out)

    def on_term(signum: int, frame: object) -> None:
        reporter.cancel_requested = True  # the job stops at its next check_cancelled

    signal.signal(signal.SIGTERM, on_term)
    reporter.send(p.Ready(os.getpid()))
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the worker is shutting down its spare
    run = msgspec.json.decode(line, type=p.Run)
    reporter.listen(sys.stdin.buffer)
    a = run.assignment
    from workers.kinds import TaskContext, resolve

    out_dir = Path(run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {name: Path(path) for name, path in run.inputs.items()}
    ctx = TaskContext(
        a.task_id, a.mission_id, a.attempt, out_dir, Path(run.cache_dir), run.device, reporter, inputs
    )
    try:
        result = resolve(a.kind)(a.params, ctx)
        reporter.flush()
        reporter.send(p.Result(result or {}))
    except Cancelled as e:
        reporter.flush()
        reporter.send(p.Error("cancelled", str(e)))
    except BaseException as e:
        reporter.flush()
        traceback.print_exc()
        reason: FailureReason = "oom" if type(e).__name__ == "OutOfMemoryError" else "error"
        reporter.send(p.Error(reason, f"{type(e).__name__}: {e}"))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

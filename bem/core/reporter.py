"""How a long-running library job talks to whoever runs it: a notebook, the CLI, or a fleet worker.

The library never knows which; it calls a `Reporter`. The fleet's worker implements one that streams
events over NATS; `MemoryReporter` keeps everything in lists for library use and tests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ScoreRow:
    """One per-example score: the unit the stats engine pairs arms on (by example_id)."""

    example_id: str
    arm: str
    seed: int
    metric: str
    value: float


@dataclass(frozen=True)
class Command:
    """An instruction to a running job from whoever runs it (Mission B: promote, rollback; a safety
    overlay: knob, with κ as its value)."""

    id: str
    action: str
    value: float | None = None


class Cancelled(Exception):
    """Raised inside a job at its next check once the reporter says it was cancelled."""


Value = float | Sequence[float]  # one point, or a sample of points at one step


def sample(value: Value) -> Sequence[float]:
    """A metrics() value as its points."""
    return [value] if isinstance(value, int | float) else value


class Reporter(Protocol):
    def metric(self, name: str, value: float, step: int | None = None) -> None: ...
    def metrics(self, values: Mapping[str, Value], step: int) -> None:
        """Points of one check at one step, delivered together (services judge a check as a whole);
        a sequence is a sample, several points at that step (say, per-prompt scores for a judge)."""
        ...

    def progress(self, stage: str, done: int, total: int) -> None: ...
    def scores(self, rows: Sequence[ScoreRow]) -> None: ...
    def artifact(self, path: Path, kind: str) -> None: ...
    def cancelled(self) -> bool: ...


@runtime_checkable
class Commanded(Protocol):
    """A reporter that can also deliver commands: the job polls at its step boundaries, applies them,
    and acknowledges each one (the fleet's reply to the sender waits for this)."""

    def commands(self) -> list[Command]: ...
    def acknowledge(self, command: Command, ok: bool, detail: str) -> None: ...


def check_cancelled(reporter: Reporter) -> None:
    if reporter.cancelled():
        raise Cancelled("job cancelled by its reporter")


@dataclass
class MemoryReporter:
    """Keeps everything it is told; `cancel()` makes the job stop at its next check."""

    points: list[tuple[str, float, int | None]] = field(default_factory=list)
    progress_log: list[tuple[str, int, int]] = field(default_factory=list)
    rows: list[ScoreRow] = field(default_factory=list)
    artifacts: list[tuple[Path, str]] = field(default_factory=list)
    pending: list[Command] = field(default_factory=list)  # tests push commands here
    acks: list[tuple[Command, bool, str]] = field(default_factory=list)
    _cancelled: bool = False

    def commands(self) -> list[Command]:
        out, self.pending = self.pending, []
        return out

    def acknowledge(self, command: Command, ok: bool, detail: str) -> None:
        self.acks.append((command, ok, detail))

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        self.points.append((name, value, step))

    def metrics(self, values: Mapping[str, Value], step: int) -> None:
        self.points.extend((name, v, step) for name, value in values.items() for v in sample(value))

    def progress(self, stage: str, done: int, total: int) -> None:
        self.progress_log.append((stage, done, total))

    def scores(self, rows: Sequence[ScoreRow]) -> None:
        self.rows.extend(rows)

    def artifact(self, path: Path, kind: str) -> None:
        self.artifacts.append((path, kind))

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled = True


class CommandSplit:
    """One job, two readers of its commands (a learner and Mission C's overlay monitor): `taken` reads
    the commands whose action is in `actions` and `rest` every other one, each through the shared
    reporter, so neither drains what the other must apply. Everything else goes to the reporter."""

    def __init__(self, reporter: Reporter, actions: Sequence[str]) -> None:
        self.reporter, self.actions = reporter, frozenset(actions)
        self._queues: dict[bool, list[Command]] = {True: [], False: []}
        self.taken, self.rest = _CommandView(self, True), _CommandView(self, False)

    def pull(self, mine: bool) -> list[Command]:
        take = getattr(self.reporter, "commands", None)
        for command in take() if take is not None else []:
            self._queues[command.action in self.actions].append(command)
        out, self._queues[mine] = self._queues[mine], []
        return out


class _CommandView:
    """A Reporter and a Commanded: its own share of the commands, everything else the reporter's. Each
    method is spelt out (not `__getattr__`): runtime protocol checks look at the class's attributes."""

    def __init__(self, split: CommandSplit, mine: bool) -> None:
        self._split, self._mine = split, mine
        self._to = split.reporter

    def commands(self) -> list[Command]:
        return self._split.pull(self._mine)

    def acknowledge(self, command: Command, ok: bool, detail: str) -> None:
        ack = getattr(self._to, "acknowledge", None)
        if ack is not None:
            ack(command, ok, detail)

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        self._to.metric(name, value, step)

    def metrics(self, values: Mapping[str, Value], step: int) -> None:
        self._to.metrics(values, step)

    def progress(self, stage: str, done: int, total: int) -> None:
        self._to.progress(stage, done, total)

    def scores(self, rows: Sequence[ScoreRow]) -> None:
        self._to.scores(rows)

    def artifact(self, path: Path, kind: str) -> None:
        self._to.artifact(path, kind)

    def cancelled(self) -> bool:
        return self._to.cancelled()


class Laps:
    """Wall time of each named phase of a run, in seconds, for its summary."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 2)
        self._clock = now


def write_scores(rows: list[ScoreRow], path: Path) -> None:
    """The score rows as a Parquet table in stats.table's columns (`python -m stats compare` reads it)."""
    import pyarrow as pa  # here, not at the top: a task that never writes scores need not import it
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([asdict(r) for r in rows]), path)


def row_means(rows: Sequence[ScoreRow]) -> dict[str, float]:
    """One arm's summary: corpus chrF and BLEU (`chrf_<set>` too) from the summed statistics
    (`metric#k` rows), the mean of every other metric."""
    import numpy as np  # here, as write_scores' pyarrow: most reporters never summarise

    from stats import corpus

    plain: dict[str, list[float]] = {}
    stats: dict[str, dict[str, dict[int, float]]] = {}
    for r in rows:
        name, hash_, k = r.metric.partition("#")
        if hash_:
            stats.setdefault(name, {}).setdefault(r.example_id, {})[int(k)] = r.value
        else:
            plain.setdefault(name, []).append(r.value)
    out = {name: float(np.mean(v)) for name, v in plain.items()}
    for name, per_example in stats.items():
        width = 1 + max(max(cols) for cols in per_example.values())
        table = np.array([[cols.get(k, 0.0) for k in range(width)] for cols in per_example.values()])
        out[name] = float(corpus.METRICS[name.split("_")[0]](table.sum(axis=0)))
    return dict(sorted(out.items()))

"""Messages between a worker and its task's child process: one msgspec JSON line each, over pipes.

The child writes on a private copy of its stdout (what the task itself prints goes to stderr, which
the worker forwards as log lines); the worker writes one `Run` line on the child's stdin, then any
`CommandMsg` lines for the running job, which the child answers with `CommandDone`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct

from schemas.messages import Assignment, FailureReason, Series


class Run(Struct, frozen=True, kw_only=True):
    assignment: Assignment
    out_dir: str
    cache_dir: str
    device: str
    worker: str
    inputs: dict[str, str] = {}  # the local copies of the assignment's inputs, by name


class Ready(Struct, frozen=True, tag="ready"):
    pid: int


class MetricBatch(Struct, frozen=True, tag="metrics"):
    series: dict[str, Series]


class ProgressMsg(Struct, frozen=True, tag="progress"):
    stage: str
    done: int
    total: int


class ScoresMsg(Struct, frozen=True, tag="scores"):
    example_id: list[str]
    arm: list[str]
    seed: list[int]
    metric: list[str]
    value: list[float]


class ArtifactMsg(Struct, frozen=True, tag="artifact"):
    path: str
    kind: str
    sha256: str
    bytes: int


class Result(Struct, frozen=True, tag="result"):
    result: dict[str, Any]


class Error(Struct, frozen=True, tag="error"):
    reason: FailureReason
    error: str


class CommandMsg(Struct, frozen=True, tag="command"):
    """Worker -> child, on stdin after the Run line: a command for the running job."""

    id: str
    action: str
    value: float | None = None
    # time.time() after which the worker no longer waits for it: a job that reaches its next step
    # later refuses it, so a command reported "not applied" never takes effect afterwards.
    deadline: float | None = None


class CommandDone(Struct, frozen=True, tag="command_done"):
    """Child -> worker: the job applied (or refused) a command."""

    id: str
    ok: bool
    detail: str


ChildMsg = Ready | MetricBatch | ProgressMsg | ScoresMsg | ArtifactMsg | Result | Error | CommandDone
decoder = msgspec.json.Decoder(ChildMsg)
encoder = msgspec.json.Encoder()

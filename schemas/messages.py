"""Every message on the bus, as msgspec Structs (DESIGN.md section 4).

Wire format: msgspec JSON, so `nats sub 'fleet.>'` stays readable. Every message carries `v`, the
schema version; a reader refuses versions it does not know instead of guessing. Nothing on the bus
is pickled.

Events are one tagged union (`Event`): the `kind` tag is also the last token of the subject
`fleet.evt.<mission>.<task>.<kind>`, and `(task_id, attempt, seq)` makes every event idempotent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

SCHEMA_VERSION = 1

# Every name that becomes a path or a subject token: missions, stages, arms, profiles, workers. A task
# id is `<mission>/<name>`. Checked wherever one is decoded, so a forged message with `../` or `.` in
# an id is a malformed message (dead-lettered), never a path.
NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
Name = Annotated[str, Meta(pattern=f"^{NAME}$")]
TaskId = Annotated[str, Meta(pattern=f"^{NAME}/{NAME}$")]
Sha256 = Annotated[str, Meta(pattern="^([0-9a-f]{64})?$")]

# The seq of the failure a restarted worker reports for a redelivered assignment: above any seq a
# task's own events reach, so it never collides with what the worker's earlier incarnation sent.
REDELIVERED_SEQ = 1 << 30

FailureReason = Literal["error", "oom", "timeout", "crash", "cancelled", "infra"]
# Failures that spend the infrastructure budget instead of the task's own attempt budget.
INFRA_REASONS: frozenset[str] = frozenset({"infra"})


class Resources(Struct, frozen=True, forbid_unknown_fields=True):
    vram_gb: float = 0.0  # 0: runs anywhere, CPU workers included
    gpu_class: str | None = None  # substring of the GPU name, e.g. "H100"


class ArtifactRef(Struct, frozen=True, kw_only=True):
    """What one task leaves for another (`fleet.artifacts`): its content's SHA-256 in the object store,
    or, with a shared filesystem (`[artifacts] store = "shared"`), no hash and the path itself."""

    sha256: Sha256 = ""  # also a folder name in a worker's cache: hex only, so no path can hide in it
    bytes: int = 0
    path: str = ""


class Assignment(Struct, frozen=True, kw_only=True):
    """A task placed on one worker: published to `fleet.task.<worker_id>` with Msg-Id task:attempt."""

    v: int = SCHEMA_VERSION
    task_id: TaskId
    mission_id: Name
    kind: str
    params: dict[str, Any]
    attempt: int
    timeout_s: float
    resources: Resources = Resources()
    inputs: dict[str, ArtifactRef] = {}  # the outputs of the tasks it depends on, by name


# ---- events: fleet.evt.<mission>.<task>.<kind> -------------------------------------------------


class _Event(Struct, frozen=True, kw_only=True, tag_field="kind"):
    v: int = SCHEMA_VERSION
    mission_id: Name
    task_id: TaskId
    attempt: int
    seq: int
    worker: Name
    ts: float  # unix seconds at the source


class Started(_Event, frozen=True, tag="started"):
    pid: int = 0


class Series(Struct, frozen=True, array_like=True):
    """One metric's points in a batch, columnar so a batch of 1,000 points is one small message."""

    steps: list[int]
    values: list[float]
    times: list[float]

    def __post_init__(self) -> None:
        if not len(self.steps) == len(self.values) == len(self.times):
            raise ValueError("a series' steps, values and times must have one entry per point")


class Metrics(_Event, frozen=True, tag="metrics"):
    series: dict[str, Series]


class Progress(_Event, frozen=True, tag="progress"):
    stage: str
    done: int
    total: int


class Log(_Event, frozen=True, tag="log"):
    lines: list[str]


class Scores(_Event, frozen=True, tag="scores"):
    """Per-example scores (columnar): the rows the stats engine pairs arms on."""

    example_id: list[str]
    arm: list[str]
    seed: list[int]
    metric: list[str]
    value: list[float]

    def __post_init__(self) -> None:
        columns = (self.example_id, self.arm, self.seed, self.metric, self.value)
        if len({len(c) for c in columns}) != 1:
            raise ValueError("scores' columns must have one entry per row")


class Artifact(_Event, frozen=True, tag="artifact"):
    path: str
    artifact_kind: str
    sha256: str = ""
    bytes: int = 0


class Finished(_Event, frozen=True, tag="finished"):
    result: dict[str, Any] = {}
    duration_s: float = 0.0


class Failed(_Event, frozen=True, tag="failed"):
    reason: FailureReason
    error: str
    duration_s: float = 0.0


Event = Started | Metrics | Progress | Log | Scores | Artifact | Finished | Failed
LIFECYCLE = (Started, Finished, Failed)


def event_subject(ev: _Event) -> str:
    kind = type(ev).__struct_config__.tag
    return f"fleet.evt.{subject_token(ev.mission_id)}.{subject_token(ev.task_id)}.{kind}"


def event_msg_id(ev: _Event) -> str:
    return f"{ev.task_id}:{ev.attempt}:{ev.seq}"


def subject_token(s: str) -> str:
    """Ids may hold '/' and '-' (valid in subjects); '.', '*', '>' and spaces would split tokens."""
    for ch in ".*> \t":
        if ch in s:
            raise ValueError(f"id {s!r} may not contain {ch!r}")
    return s


# ---- worker heartbeats: KV bucket fleet_workers, key worker.<id> -------------------------------


class GpuInfo(Struct, frozen=True):
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int  # NVML free memory: other processes' use included
    utilization: float | None = None  # 0-1


class Heartbeat(Struct, frozen=True, kw_only=True):
    v: int = SCHEMA_VERSION
    worker: Name
    host: str
    pid: int
    gpu: GpuInfo | None  # None: a CPU worker
    running: str | None = None  # "task_id:attempt"
    ts: float


# ---- commands: fleet.cmd.<worker_id> (core request/reply) --------------------------------------


class Command(Struct, frozen=True, kw_only=True):
    v: int = SCHEMA_VERSION
    # knob: κ ← value (a person); raise: κ ← max(κ, value) (the overlay service, which never lowers it)
    action: Literal["cancel", "promote", "rollback", "knob", "raise"]
    task_id: TaskId
    attempt: int
    value: float | None = None  # κ in [0, 1] for knob and raise; no other action takes a value

    def __post_init__(self) -> None:
        if self.action in ("knob", "raise"):
            if self.value is None or not 0.0 <= self.value <= 1.0:
                raise ValueError(f"a {self.action} command needs a value in [0, 1]; got {self.value}")
        elif self.value is not None:
            raise ValueError(f"a {self.action} command takes no value")


class CommandAck(Struct, frozen=True):
    ok: bool
    detail: str = ""


class GcOrder(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`fleetctl gc` on a worker's host (on fleet.cmd.<worker>, told apart by `action`): remove these
    missions' run folders and these artifacts' fetched copies, or only measure them (`dry_run`)."""

    v: int = SCHEMA_VERSION
    action: Literal["gc"] = "gc"
    missions: list[Name]
    artifacts: list[str] = []  # SHA-256s
    dry_run: bool = False


class GcDone(Struct, frozen=True, kw_only=True):
    """What one home gave back: `where` names it (host:path), so homes two workers share count once."""

    where: str
    runs: dict[str, int] = {}  # mission -> bytes of its run folders
    cache: int = 0  # bytes of fetched artifact copies
    error: str = ""


# ---- control API: fleet.ctl.<verb> (request/reply) ---------------------------------------------


class SubmitRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    v: int = SCHEMA_VERSION
    mission: str
    profile: str | None = None
    overrides: dict[str, Any] = {}
    sweep: bool = False  # run the spec's [sweep] instead of the mission (ranked, never gated)


class IdRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    v: int = SCHEMA_VERSION
    id: str | None = None


class CompareRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`fleetctl compare A B`: B against A, on their scores and their inputs."""

    v: int = SCHEMA_VERSION
    a: Name
    b: Name
    metric: str | None = None


class KnobRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Set a running task's safety-overlay knob κ by hand (`fleetctl knob TASK VALUE`)."""

    v: int = SCHEMA_VERSION
    task_id: str
    value: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"κ must be in [0, 1]; got {self.value}")


class SqlRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    v: int = SCHEMA_VERSION
    query: str
    limit: int = 10_000


class LogsRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    v: int = SCHEMA_VERSION
    task_id: str
    after_seq: int = -1
    attempt: int | None = None


class ExportRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Without a table: the exported tables and their sizes. With one: its rows past rowid `after`, as
    Parquet in a reply of bounded size; the client asks again from the last rowid it got."""

    v: int = SCHEMA_VERSION
    table: str = ""
    after: int = -1


class GcRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Collect the files of ended missions beyond the policy: those not among the `keep_last` newest
    runs of their mission name, and ended more than `older_than_s` ago (each, when given)."""

    v: int = SCHEMA_VERSION
    keep_last: int | None = None
    older_than_s: float | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.keep_last is None and self.older_than_s is None:
            raise ValueError("gc needs a policy: keep_last, older_than_s or both")
        if self.keep_last is not None and self.keep_last < 0:
            raise ValueError(f"keep_last must be at least 0, got {self.keep_last}")
        if self.older_than_s is not None and self.older_than_s < 0:
            raise ValueError(f"older_than_s must be at least 0, got {self.older_than_s}")


class ErrorInfo(Struct, frozen=True):
    code: str  # bad_request, not_found, invalid_spec, refused, internal
    message: str


class Reply(Struct, frozen=True, kw_only=True):
    v: int = SCHEMA_VERSION
    ok: bool
    data: Any = None
    error: ErrorInfo | None = None


# ---- codecs ------------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)
_assignment_decoder = msgspec.json.Decoder(Assignment)
_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)


def encode(msg: Struct) -> bytes:
    return _encoder.encode(msg)


def decode_event(data: bytes) -> Event:
    ev = _event_decoder.decode(data)
    _check_version(ev.v)
    return ev


def decode_assignment(data: bytes) -> Assignment:
    a = _assignment_decoder.decode(data)
    _check_version(a.v)
    return a


def decode_heartbeat(data: bytes) -> Heartbeat:
    return _heartbeat_decoder.decode(data)


def _check_version(v: int) -> None:
    if v != SCHEMA_VERSION:
        raise msgspec.ValidationError(
            f"schema version {v} is not supported (this build speaks {SCHEMA_VERSION})"
        )

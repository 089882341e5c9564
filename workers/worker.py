"""The worker: one process per GPU (or a CPU worker), pulling its assignments from `fleet.task.<id>`.

Order of duties for one task: fetch -> heartbeat says "running task:attempt" -> child process runs it
-> every event goes out through an ordered outbox (JetStream publish, retried with the same Msg-Id
until the server has it) -> the final event is stored -> only then the assignment is acked.
A redelivered assignment means this worker restarted mid-task: it reports an infrastructure failure
instead of running a second copy; the coordinator retries with a new attempt number.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import secrets
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg

from fleet import artifacts, bus, retention, sdnotify
from fleet.artifacts import ArtifactError, Artifacts, StoreError
from fleet.config import ArtifactsConfig
from fleet.paths import under
from schemas import messages as m
from schemas.messages import GpuInfo
from workers import gpus
from workers import protocol as p
from workers.supervisor import Supervisor, child_env

log = structlog.get_logger("fleet.worker")
T = TypeVar("T")


class _Action(msgspec.Struct):
    """A command's `action`, read first: a `GcOrder` and a task's `Command` share the subject."""

    action: str = ""


# The packages whose versions each task's result records (`environment`), for reports.
PACKAGES = ("torch", "transformers", "numpy", "duckdb", "nats-py", "bem-fleet")


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(HEAD, whether the tree has changes) of the checkout this code runs from; (None, None) when it
    is not a git checkout (an installed wheel) or git is missing."""
    root = root or Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None, None
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        status = subprocess.run(
            # Tracked changes only: the reports that `make results` writes into the tree are not code.
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def environment(gpu: GpuInfo | None) -> dict[str, Any]:
    """What ran a task, read once at worker start: the code's git commit, package versions, host, GPU.
    The worker adds it to every task's result as `environment` (reports show it)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "packages": versions,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "gpu": gpu.name if gpu else "cpu",
    }


def default_id(gpu: GpuInfo | None, index: int = 0) -> str:
    host = socket.gethostname().split(".")[0].replace("*", "-").replace(">", "-") or "host"
    return f"{host}-{gpu.uuid.removeprefix('GPU-')[:8]}" if gpu else f"{host}-cpu{index}"


async def _when_there(lookup: Callable[[], Awaitable[T]], what: str) -> T:
    """Retry a JetStream lookup until the coordinator has created what it looks up."""
    said = -float("inf")
    while True:
        try:
            return await lookup()
        except (nats.js.errors.NotFoundError, nats.errors.TimeoutError):
            if time.monotonic() - said > 30:  # at the first miss, then twice a minute
                log.info("waiting_for_coordinator", what=what)
                said = time.monotonic()
            await anyio.sleep(0.2)


class Worker:
    def __init__(
        self,
        worker_id: str,
        url: str,
        home: Path,
        gpu: GpuInfo | None = None,
        *,
        heartbeat_s: float = 1.0,
        cancel_grace_s: float = 5.0,
        preload: list[str] | None = None,
        threads: int | None = None,
        creds_file: Path | None = None,
        ca_file: Path | None = None,
        artifacts: ArtifactsConfig | None = None,
    ) -> None:
        m.subject_token(worker_id)
        self.id, self.url, self.home, self.gpu = worker_id, url, home, gpu
        self.creds_file, self.ca_file = creds_file, ca_file
        self.artifacts_cfg = artifacts or ArtifactsConfig()
        self.heartbeat_s = heartbeat_s
        self.command_timeout_s = 30.0
        env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu.uuid  # inside the task, cuda:0 is this GPU
        self.supervisor = Supervisor(child_env(threads, env), cancel_grace_s, preload)
        self.running: str | None = None
        self.cancels: dict[tuple[str, int], anyio.Event] = {}
        self.outbox: asyncio.Queue[m.Event] = asyncio.Queue()
        self._beat_now = anyio.Event()
        self.environment = environment(gpu)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.nc = await bus.connect(self.url, f"worker-{self.id}", self.creds_file, self.ca_file)
        self.js = self.nc.jetstream(timeout=5)
        # The coordinator creates the streams, the bucket and this worker's consumer (a worker's
        # credential may not): wait for each.
        self.kv = await _when_there(lambda: self.js.key_value(bus.WORKERS_BUCKET), "the heartbeat bucket")
        cfg = self.artifacts_cfg
        self.artifacts = Artifacts(
            self.js,
            artifacts.cache_dir(self.home, cfg.cache_dir),
            store=cfg.store,
            max_artifact_bytes=cfg.max_artifact_bytes,
        )
        await self.supervisor.warm()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._heartbeat_loop)  # the first heartbeat asks for the consumer
                await _when_there(
                    lambda: self.js.consumer_info(bus.TASKS_STREAM, self.id), "this worker's task consumer"
                )
                self.sub = await self.js.pull_subscribe_bind(durable=self.id, stream=bus.TASKS_STREAM)
                log.info("worker_ready", worker=self.id, gpu=self.gpu.uuid if self.gpu else "cpu")
                sdnotify.notify(
                    "READY=1", f"STATUS=worker {self.id} on {self.gpu.name if self.gpu else 'CPU'}"
                )
                # Each command in its own task: a rollback waiting for its step must not hold up a cancel.
                await self.nc.subscribe(bus.cmd_subject(self.id), cb=self._command_received)
                tg.start_soon(sdnotify.watchdog_loop)
                tg.start_soon(self._outbox_loop)
                tg.start_soon(self._task_loop)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await self.supervisor.close()
                with contextlib.suppress(Exception):
                    await self.kv.delete(f"worker.{self.id}")
                await self.nc.close()

    # ---- heartbeats -----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            gpu = self.gpu
            if gpu is not None:
                with contextlib.suppress(Exception):
                    gpu = await anyio.to_thread.run_sync(gpus.query, gpu.uuid)
            hb = m.Heartbeat(
                worker=self.id,
                host=socket.gethostname(),
                pid=os.getpid(),
                gpu=gpu,
                running=self.running,
                ts=time.time(),
            )
            try:
                await self.kv.put(f"worker.{self.id}", m.encode(hb))
            except (nats.errors.Error, TimeoutError, OSError) as e:
                log.debug("heartbeat_failed", error=repr(e))
            with anyio.move_on_after(self.heartbeat_s):
                await self._beat_now.wait()
            self._beat_now = anyio.Event()

    def _set_running(self, value: str | None) -> None:
        self.running = value
        self._beat_now.set()

    # ---- outbox: events in order, each stored before the next -----------------------------------

    async def _outbox_loop(self) -> None:
        while True:
            ev = await self.outbox.get()
            data, subject = m.encode(ev), m.event_subject(ev)
            headers = {"Nats-Msg-Id": m.event_msg_id(ev)}
            delay = 0.05
            while True:
                try:
                    await self.js.publish(subject, data, headers=headers, timeout=5)
                    break
                except (nats.errors.Error, TimeoutError, OSError) as e:
                    # A timeout is not "not stored" (the ghost publish): the same Msg-Id makes retries safe.
                    log.debug("event_publish_retry", task=ev.task_id, seq=ev.seq, error=repr(e))
                    await anyio.sleep(delay)
                    delay = min(2 * delay, 2.0)
            self.outbox.task_done()

    # ---- commands -------------------------------------------------------------------------------

    async def _command_received(self, msg: Msg) -> None:
        self._tg.start_soon(self._on_command, msg)

    async def _on_command(self, msg: Msg) -> None:
        try:
            if msgspec.json.decode(msg.data, type=_Action).action == "gc":
                await self._gc(msg, msgspec.json.decode(msg.data, type=m.GcOrder))
                return
            cmd = msgspec.json.decode(msg.data, type=m.Command)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            log.warning("bad_command", error=str(e))
            await msg.respond(m.encode(m.CommandAck(False, f"malformed command: {e}")))
            return
        if cmd.action == "cancel":
            self.cancels.setdefault((cmd.task_id, cmd.attempt), anyio.Event()).set()
            await msg.respond(m.encode(m.CommandAck(True, "cancelling")))
            return
        if self.running != f"{cmd.task_id}:{cmd.attempt}":
            await msg.respond(
                m.encode(m.CommandAck(False, f"{cmd.task_id}:{cmd.attempt} is not running here"))
            )
            return
        # The job applies it at its next step boundary; the reply waits for that (Mission B's
        # services need to know the rollback happened, not only that it was asked for).
        done = await self.supervisor.command(
            secrets.token_hex(8), cmd.action, self.command_timeout_s, cmd.value
        )
        await msg.respond(m.encode(m.CommandAck(done.ok, done.detail)))

    async def _gc(self, msg: Msg, order: m.GcOrder) -> None:
        """Free this host's share of `fleetctl gc`; the reply says how much, or why not."""
        try:
            done = await anyio.to_thread.run_sync(
                retention.collect_home,
                self.home,
                self.artifacts.cache,
                order.missions,
                order.artifacts,
                order.dry_run,
            )
        except (OSError, ValueError) as e:
            log.warning("gc_failed", error=repr(e))
            done = m.GcDone(where=f"{socket.gethostname()}:{self.home}", error=repr(e))
        freed = sum(done.runs.values()) + done.cache
        log.info("gc", missions=len(order.missions), bytes=freed, dry_run=order.dry_run)
        await msg.respond(msgspec.json.encode(done))

    # ---- tasks ----------------------------------------------------------------------------------

    async def _task_loop(self) -> None:
        while True:
            try:
                msgs = await self.sub.fetch(1, timeout=1.0)
            except bus.FETCH_EMPTY:
                continue
            except (nats.errors.Error, OSError) as e:
                log.debug("fetch_failed", error=repr(e))
                await anyio.sleep(0.5)
                continue
            for msg in msgs:
                await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        try:
            a = m.decode_assignment(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            log.warning("dead_letter", subject=msg.subject, reason=f"malformed assignment: {e}")
            headers = {"Fleet-Reason": f"malformed assignment: {e}"[:500], "Fleet-Subject": msg.subject}
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self.js.publish("fleet.dlq.malformed", msg.data, headers=headers, timeout=5)
            await msg.term()
            return
        tlog = log.bind(task=a.task_id, attempt=a.attempt, mission=a.mission_id, worker=self.id)
        seq = 0

        def event(cls: type[m.Event], **fields: Any) -> None:
            nonlocal seq
            self.outbox.put_nowait(
                cls(
                    mission_id=a.mission_id,
                    task_id=a.task_id,
                    attempt=a.attempt,
                    seq=seq,
                    worker=self.id,
                    ts=time.time(),
                    **fields,
                )
            )
            seq += 1

        cancel = self.cancels.setdefault((a.task_id, a.attempt), anyio.Event())
        if msg.metadata.num_delivered > 1:
            tlog.warning("redelivered", delivered=msg.metadata.num_delivered)
            # Our earlier incarnation already used seq 0, 1, ... for this attempt (same keys, same
            # Msg-Ids): this report takes a seq of its own, or it would be dropped as a duplicate.
            seq = m.REDELIVERED_SEQ + msg.metadata.num_delivered
            event(m.Failed, reason="infra", error="the worker restarted while the task ran")
        elif cancel.is_set():
            event(m.Failed, reason="cancelled", error="cancelled before it started")
        else:
            self._set_running(f"{a.task_id}:{a.attempt}")
            tlog.info("task_start", kind=a.kind)
            started = time.monotonic()
            event(m.Started, pid=os.getpid())

            async def emit(item: p.ChildMsg | list[str]) -> None:
                if isinstance(item, list):
                    event(m.Log, lines=item)
                elif isinstance(item, p.MetricBatch):
                    event(m.Metrics, series=item.series)
                elif isinstance(item, p.ProgressMsg):
                    event(m.Progress, stage=item.stage, done=item.done, total=item.total)
                elif isinstance(item, p.ScoresMsg):
                    event(
                        m.Scores,
                        example_id=item.example_id,
                        arm=item.arm,
                        seed=item.seed,
                        metric=item.metric,
                        value=item.value,
                    )
                elif isinstance(item, p.ArtifactMsg):
                    event(
                        m.Artifact,
                        path=item.path,
                        artifact_kind=item.kind,
                        sha256=item.sha256,
                        bytes=item.bytes,
                    )

            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_alive, msg)
                outcome = await self._run(a, emit, cancel)
                tg.cancel_scope.cancel()
            took = time.monotonic() - started
            if isinstance(outcome, p.Result):
                result = {**outcome.result, "environment": self.environment}
                event(m.Finished, result=result, duration_s=took)
            else:
                event(m.Failed, reason=outcome.reason, error=outcome.error, duration_s=took)
            tlog.info("task_end", outcome=type(outcome).__name__, seconds=round(took, 3))
        await self.outbox.join()  # the final event is stored: now the assignment may go
        self._set_running(None)
        self.cancels.pop((a.task_id, a.attempt), None)
        # A purged assignment (our lease lapsed) cannot be acked: give up after a while, fleetd knows.
        for _ in range(20):
            try:
                await msg.ack_sync(timeout=5)
                break
            except nats.errors.MsgAlreadyAckdError:
                break
            except (nats.errors.Error, TimeoutError, OSError) as e:
                tlog.debug("ack_retry", error=repr(e))
                await anyio.sleep(0.5)

    async def _run(
        self, a: m.Assignment, emit: Callable[[p.ChildMsg | list[str]], Awaitable[None]], cancel: anyio.Event
    ) -> p.Result | p.Error:
        """The task in a child process, between fetching its inputs and publishing its outputs; a
        failure on the bus or the object store is the infrastructure's (the task is retried)."""
        try:
            with anyio.fail_after(a.timeout_s):  # a fetch that hangs counts against the task's time
                inputs = {name: str(await self.artifacts.fetch(ref)) for name, ref in a.inputs.items()}
        except (ArtifactError, nats.errors.Error, TimeoutError, OSError) as e:
            return p.Error("infra", f"fetching the task's inputs: {e!r}")
        run = p.Run(
            assignment=a,
            out_dir=str(under(self.home, "runs", a.task_id, f"attempt-{a.attempt}")),
            cache_dir=str(self.home / "cache"),
            device="cuda" if self.gpu else "cpu",
            worker=self.id,
            inputs=inputs,
        )
        outcome = await self.supervisor.run(run, emit, cancel)
        if not isinstance(outcome, p.Result) or not outcome.result.get("outputs"):
            return outcome
        outputs = outcome.result["outputs"]
        try:
            refs = await self.artifacts.publish(outputs)
        except StoreError as e:
            return p.Error("infra", f"publishing the task's outputs: {e}")
        except ArtifactError as e:  # the task's own outputs (a bad path, over the limit): no retry helps
            return p.Error("error", f"the task's outputs: {e}")
        except (nats.errors.Error, TimeoutError, OSError) as e:
            return p.Error("infra", f"publishing the task's outputs: {e!r}")
        return p.Result({**outcome.result, "outputs": {k: msgspec.to_builtins(r) for k, r in refs.items()}})

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await anyio.sleep(10)
            with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                await msg.in_progress()

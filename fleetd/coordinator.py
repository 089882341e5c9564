"""The coordinator: recorder, scheduler, leases, stats service and control API in one asyncio process.

Concurrency rules, which make "nothing lost, nothing doubled" hold across kill -9:
- every state change runs under one lock as: compute (Scheduler) -> one DuckDB transaction -> bus
  effects queued in order; the bus effects (assignments, purges, commands, dead letters) are
  idempotent (Msg-Id) and retried until the server has them;
- the recorder decides which events are new before writing, and writes the events, their rows and
  the state changes they cause in the same transaction; it acks the messages only after the commit;
- at start the tables are the truth: the recorder catches up on unacked events, then tasks still
  `assigned` are published again (same Msg-Id), and missions left `judging` are judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from fleet import artifacts, bus, creds, registry, retention
from fleet.config import FleetConfig
from fleet.creds import Actor
from fleet.view import Commit
from fleetd import compare, gc, judge, sweeps
from fleetd.notify import Notifier
from fleetd.scheduler import TERMINAL, Changes, Mission, Scheduler, SchedulerConfig, outputs_in
from fleetd.services import Services, watch_factory
from fleetd.store import SqlRefused, Store, audit_row, task_from_row, task_row
from fleetd.telemetry import FleetMetrics
from schemas import messages as m
from schemas import missions as specs
from stats.compare import compare_runs
from stats.gates import evaluate

log = structlog.get_logger("fleetd")
T = TypeVar("T")
STATS_ENGINE = Actor(role="coordinator", credential="stats-engine")  # who decides a mission's verdict
BATCH = 1024
DISK_TTL_S = 30.0  # how long a mission's measured run folders stand for the page


@dataclass(frozen=True)
class _Publish:
    subject: str
    data: bytes
    msg_id: str
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class _Purge:
    worker: str


@dataclass(frozen=True)
class _Command:
    worker: str
    command: m.Command


class Coordinator:
    def __init__(
        self, cfg: FleetConfig, store: Store, nc: Client, js: JetStreamContext, kv: KeyValue
    ) -> None:
        self.cfg, self.store, self.nc, self.js, self.kv = cfg, store, nc, js, kv
        self.roster = creds.load_roster(cfg.home_path)  # caller key -> credential, for the audit
        self.consumers: set[str] = set()  # workers whose task consumer exists (only we may create one)
        self.bad_beats: set[tuple[str, int]] = set()  # (key, revision) of heartbeats dead-lettered
        s = cfg.scheduler
        self.sched = Scheduler(SchedulerConfig(s.lease_s, s.assign_grace_s, s.tasks_per_worker))
        self.lock = anyio.Lock()
        self.effects: asyncio.Queue[_Publish | _Purge | _Command] = asyncio.Queue()
        self.gates: dict[str, dict[str, Any]] = {}  # each mission's raw gates table (judge.gate_spec)
        self.early_stops = sweeps.EarlyStops()
        self._obs: ObjectStore | None = None
        self.disk_seen: dict[str, tuple[float, int]] = {}  # mission -> (monotonic time, bytes measured)
        self.caught_up = anyio.Event()
        # When each mission last showed a sign of progress (an event of its tasks, or its submission;
        # a restart counts as one): `fleetd_running_mission_idle_seconds`, which an alert watches.
        self.last_progress: dict[str, float] = {}
        self.missions_dir = Path(cfg.missions_dir) if cfg.missions_dir else specs.MISSIONS_DIR
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="duckdb-writer")
        self._tg: anyio.abc.TaskGroup | None = None
        self.metrics = FleetMetrics()
        self.metrics.bind(self)
        self.notifier = Notifier(cfg.notify, self.metrics.registry)
        # Called after each commit (the web page's live feed; benchmarks measure latency here).
        self.listeners: list[Callable[[Commit], None]] = []
        self.services = Services(
            js,
            nc,
            self.write,
            store.record_service_decision,
            store.ack_service_decision,
            self._service_tables,
            decided=self._service_decided,
        )

    def _service_decided(self, row: dict[str, Any]) -> None:
        if row["decision"] == "rollback":
            self.notifier.note(
                "rollback",
                row["mission_id"],
                task=row["task_id"],
                service=row["service"],
                step=row["step"],
                reason=row["reason"],
            )

    # ---- plumbing -------------------------------------------------------------------------------

    async def write(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run on the single DuckDB writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, partial(fn, *args, **kw))

    async def read(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await anyio.to_thread.run_sync(partial(fn, *args, **kw))

    async def persist(self, ch: Changes, events: list[m.Event] | None = None, **extra: Any) -> None:
        """One transaction for the change set; then queue its bus effects in order (we hold the lock)."""
        tasks = self.sched.tasks
        current = {e.task_id: tasks[e.task_id].attempt for e in events or [] if e.task_id in tasks}
        for task, why in ch.dead:
            await self.write(
                self.store.dead_letter, f"fleet.dlq.task.{task.task_id}", why, task.task_id.encode()
            )
        self.metrics.dead_letters.inc(len(ch.dead))
        started = time.perf_counter()
        written = await self.write(
            self.store.apply,
            events or [],
            list(ch.tasks.items()),
            ch.attempts,
            list(ch.missions.items()),
            current,
            **extra,
        )
        self.metrics.commit.observe(time.perf_counter() - started)
        self.metrics.on_commit(written.new, ch.tasks, ch.attempts)
        for mission_id, fields in ch.missions.items():
            if fields.get("state") in TERMINAL:
                self.early_stops.forget(mission_id)
                self.notifier.note(
                    "mission_end",
                    mission_id,
                    state=fields["state"],
                    verdict=fields.get("verdict"),
                    reason=fields.get("reason"),
                )
        for task, why in ch.dead:
            self.notifier.note("dead_letter", task.mission_id, task=task.task_id, reason=why)
        if self.listeners:
            commit = Commit(
                events=written.new,
                tasks=set(ch.tasks),
                missions=set(ch.missions) | {t.mission_id for t in map(tasks.get, ch.tasks) if t},
                decided=extra["decisions"][0] if extra.get("decisions") else None,
            )
            if extra.get("new_mission"):
                commit.missions.add(extra["new_mission"][0]["mission_id"])
            for listener in self.listeners:
                listener(commit)
        for worker in sorted(ch.purge):
            self.effects.put_nowait(_Purge(worker))
        for task, why in ch.dead:
            body = m.encode(self.sched.assignment(task))
            self.effects.put_nowait(
                _Publish(
                    f"fleet.dlq.task.{task.task_id}",
                    body,
                    f"dlq:{task.task_id}:{task.attempt}",
                    {"Fleet-Reason": why},
                )
            )
        for worker, a in ch.assign:
            self.effects.put_nowait(
                _Publish(bus.task_subject(worker), m.encode(a), f"{a.task_id}:{a.attempt}")
            )
            log.info("assigned", task=a.task_id, attempt=a.attempt, worker=worker)
        for worker, task_id, attempt in ch.cancel:
            self.effects.put_nowait(
                _Command(worker, m.Command(action="cancel", task_id=task_id, attempt=attempt))
            )
        for mission_id in ch.judge:
            assert self._tg is not None
            self._tg.start_soon(self.judge_mission, mission_id)

    async def mutate(self, fn: Callable[[Changes], Any], audit: list[dict[str, Any]] | None = None) -> Any:
        async with self.lock:
            ch = Changes()
            out = fn(ch)
            self.sched.place(ch)
            if not ch.empty() or ch.dead or audit:
                await self.persist(ch, audit=audit or [])
            return out

    # ---- lifecycle ------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.load()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self.nc.subscribe("fleet.ctl.*.*", queue="fleetd", cb=self._on_control)
                tg.start_soon(self.dispatch_loop)
                tg.start_soon(self.recorder_loop)
                tg.start_soon(self.lease_loop)
                tg.start_soon(self.services.run)
                tg.start_soon(self.notifier.run)
                tg.start_soon(self.reconcile_after_catch_up)
                task_status.started()
        finally:
            self._writer.shutdown(wait=True)

    async def load(self) -> None:
        missions = await self.read(self.store.query, "SELECT * FROM missions ORDER BY submitted_at")
        rows = await self.read(self.store.query, "SELECT * FROM tasks ORDER BY created_at, task_id")
        by_mission: dict[str, list[specs.Task]] = {}
        for row in rows:
            by_mission.setdefault(row["mission_id"], []).append(task_from_row(row))
        for mrow in missions:
            spec = msgspec.json.decode(mrow["spec"], type=specs.MissionSpec)
            mission = self._track(mrow["mission_id"], mrow["name"], spec, bool(mrow["sweep"]), mrow["state"])
            mission.collected = mrow["collected_at"] is not None
            self.sched.add_mission(mission, by_mission.get(mission.mission_id, []))
            if mission.mission_id in self.early_stops.rules and mission.state == "running":
                metric = self.early_stops.metric(mission.mission_id)
                points = await self.read(self.store.current_points, mission.mission_id, metric)
                self.early_stops.replay(mission.mission_id, points, self.sched)
        if missions:
            log.info("loaded", missions=len(missions), tasks=len(rows))

    def _track(self, mission_id: str, name: str, spec: specs.MissionSpec, sweep: bool, state: str) -> Mission:
        """What the coordinator keeps of a mission it runs: its gates, or as a running sweep its
        early-stop rule."""
        if sweep:
            if spec.sweep is not None and spec.sweep.early_stop is not None and state == "running":
                self.early_stops.add(mission_id, spec.sweep.early_stop)
        elif spec.gates is not None:
            self.gates[mission_id] = spec.gates
        self.last_progress[mission_id] = time.time()
        return Mission(mission_id, name, state, has_gates=not sweep and spec.gates is not None, sweep=sweep)

    async def reconcile_after_catch_up(self) -> None:
        await self.caught_up.wait()
        async with self.lock:
            for task in self.sched.tasks.values():
                if task.state == "assigned" and task.worker:
                    a = self.sched.assignment(task)
                    self.effects.put_nowait(
                        _Publish(bus.task_subject(task.worker), m.encode(a), f"{a.task_id}:{a.attempt}")
                    )
            judging = [mid for mid, ms in self.sched.missions.items() if ms.state == "judging"]
            ch, audit = Changes(), []
            for mid, (_, rule) in list(self.early_stops.rules.items()):
                for trial, why in rule.stopped.items():  # condemned before a restart, maybe not stopped
                    if self.sched.stop_trial(mid, trial, why, ch):
                        audit.append(audit_row(mid, "stop", f"{mid}/t{trial}", STATS_ENGINE, why))
                        log.info("trial_stopped", mission=mid, trial=trial, reason=why, after_restart=True)
            if not ch.empty():
                self.sched.place(ch)
                await self.persist(ch, audit=audit)  # a sweep that ends here is judged by persist
        for mid in judging:
            assert self._tg is not None
            self._tg.start_soon(self.judge_mission, mid)

    # ---- bus effects ----------------------------------------------------------------------------

    async def dispatch_loop(self) -> None:
        """Apply bus effects in the order they were committed, retrying until the server has each."""
        while True:
            effect = await self.effects.get()
            delay = 0.1
            while True:
                try:
                    await self._apply_effect(effect)
                    break
                except (nats.errors.Error, TimeoutError, OSError) as e:
                    if isinstance(effect, _Command):
                        log.warning(
                            "command_not_delivered",
                            worker=effect.worker,
                            task=effect.command.task_id,
                            error=repr(e),
                        )
                        break
                    log.warning("bus_effect_retry", effect=type(effect).__name__, error=repr(e))
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 2.0)

    async def _apply_effect(self, effect: _Publish | _Purge | _Command) -> None:
        if isinstance(effect, _Publish):
            headers = {"Nats-Msg-Id": effect.msg_id, **(effect.headers or {})}
            await self.js.publish(effect.subject, effect.data, headers=headers, timeout=5)
        elif isinstance(effect, _Purge):
            await self.js.purge_stream(bus.TASKS_STREAM, subject=bus.task_subject(effect.worker))
        else:
            reply = await self.nc.request(bus.cmd_subject(effect.worker), m.encode(effect.command), timeout=2)
            log.info(
                "command_sent", worker=effect.worker, action=effect.command.action, reply=reply.data.decode()
            )

    # ---- recorder -------------------------------------------------------------------------------

    async def recorder_loop(self) -> None:
        sub = await bus.durable_pull(self.js, "fleet.evt.>", bus.EVENTS_STREAM, bus.recorder_consumer())
        while True:
            try:
                msgs = await sub.fetch(BATCH, timeout=1.0)
            except bus.FETCH_EMPTY:
                self.caught_up.set()
                continue
            except (nats.errors.Error, OSError) as e:
                log.warning("recorder_fetch_failed", error=repr(e))
                await anyio.sleep(0.5)
                continue
            await self.record(msgs)

    async def record(self, msgs: list[Msg]) -> None:
        events: list[m.Event] = []
        for msg in msgs:
            try:
                events.append(m.decode_event(msg.data))
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                await self.dead_letter(msg, f"malformed event: {e}")
        async with self.lock:
            keys = [(e.task_id, e.attempt, e.seq) for e in events]
            seen = await self.write(self.store.existing_events, keys) if keys else set()
            new = [e for e in events if (e.task_id, e.attempt, e.seq) not in seen]
            now = time.time()
            self.last_progress.update((e.mission_id, now) for e in new)
            ch = Changes()
            for ev in new:
                if isinstance(ev, m.LIFECYCLE):
                    if isinstance(ev, m.Finished) and (missing := await self._missing_outputs(ev)):
                        ev = _lost(ev, missing)  # the row keeps what the worker said; the state retries
                    self.sched.on_event(ev, ch)  # type: ignore[arg-type]
                    _log_lifecycle(ev)
            stops = self.early_stops.observe(new, self.sched, ch)
            self.sched.place(ch)
            audit = [
                audit_row(mid, "stop", f"{mid}/t{trial}", STATS_ENGINE, why) for mid, trial, why in stops
            ]
            await self.persist(ch, new, audit=audit)
        for mid, trial, why in stops:
            log.info("trial_stopped", mission=mid, trial=trial, reason=why)
        for msg in msgs:
            await msg.ack()

    async def bucket(self) -> ObjectStore:
        """The artifacts' object store, looked up once (the recorder asks on every output)."""
        if self._obs is None:
            self._obs = await self.js.object_store(artifacts.BUCKET)
        return self._obs

    async def _missing_outputs(self, ev: m.Finished) -> list[str]:
        """A finishing task's artifacts the object store no longer has. A worker skips the upload of
        content the store already holds; a gc that removed that content before this event was
        recorded would leave later tasks an input that is gone, so the task runs again instead."""
        task = self.sched.tasks.get(ev.task_id)
        if task is None or task.attempt != ev.attempt or task.state in TERMINAL:
            return []
        shas = sorted({r.sha256 for r in outputs_in(ev.result).values() if r.sha256})
        if not shas:
            return []
        obs = await self.bucket()
        missing = []
        for sha in shas:
            try:
                await obs.get_info(sha)
            except (ObjectNotFoundError, NotFoundError):
                missing.append(sha)
            except nats.errors.Error as e:  # the store does not answer: trust the worker, as before
                log.warning("output_check_failed", task=ev.task_id, sha=sha, error=repr(e))
        return missing

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        """Log, keep the raw bytes on FLEET_DLQ and in dead_letters (the caller acks): never a crash."""
        log.warning("dead_letter", subject=msg.subject, reason=reason, bytes=len(msg.data))
        meta = msg.metadata if msg.reply else None
        msg_id = f"dlq:{msg.subject}:{meta.sequence.stream if meta else secrets.token_hex(6)}"
        headers = {"Nats-Msg-Id": msg_id, "Fleet-Reason": reason[:500], "Fleet-Subject": msg.subject}
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.js.publish("fleet.dlq.malformed", msg.data, headers=headers, timeout=5)
        await self.write(self.store.dead_letter, msg.subject, reason, msg.data)
        self.metrics.dead_letters.inc()
        self.notifier.note("dead_letter", None, subject=msg.subject, reason=reason)

    # ---- workers and leases ---------------------------------------------------------------------

    async def lease_loop(self) -> None:
        last_upsert = 0.0
        while True:
            await anyio.sleep(self.cfg.scheduler.heartbeat_poll_s)
            try:
                beats = await self._heartbeats()
            except (nats.errors.Error, TimeoutError, OSError) as e:
                log.debug("heartbeats_unavailable", error=repr(e))
                continue

            def step(ch: Changes, beats: list[tuple[m.Heartbeat, int]] = beats) -> None:
                for hb, rev in beats:
                    self.sched.heartbeat(hb, rev)
                if self.caught_up.is_set():  # judge leases only once the backlog is in
                    self.sched.check_leases(ch)

            await self.mutate(step)
            await self._ensure_consumers(hb.worker for hb, _ in beats)
            if time.monotonic() - last_upsert > 5:
                last_upsert = time.monotonic()
                rows = [
                    {
                        "worker": hb.worker,
                        "host": hb.host,
                        "gpu_uuid": hb.gpu.uuid if hb.gpu else None,
                        "gpu_name": hb.gpu.name if hb.gpu else "cpu",
                        "total_bytes": hb.gpu.total_bytes if hb.gpu else 0,
                        "seen": hb.ts,
                    }
                    for hb, _ in beats
                ]
                async with self.lock:
                    await self.write(self.store.upsert_workers, rows)

    async def _ensure_consumers(self, workers: Iterable[str]) -> None:
        """A worker may not create its own consumer (its credential has no such right): we do, once
        its first heartbeat names it, and it waits for it."""
        for worker in workers:
            if worker in self.consumers:
                continue
            try:
                m.subject_token(worker)
                await self.js.add_consumer(bus.TASKS_STREAM, bus.worker_consumer(worker))
                self.consumers.add(worker)
            except ValueError as e:
                log.warning("worker_id_refused", worker=worker, error=str(e))
            except (nats.errors.Error, TimeoutError) as e:
                log.warning("consumer_create_failed", worker=worker, error=repr(e))

    async def _heartbeats(self) -> list[tuple[m.Heartbeat, int]]:
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        out = []
        for key in keys:
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                try:
                    out.append((m.decode_heartbeat(entry.value), entry.revision or 0))
                except (msgspec.ValidationError, msgspec.DecodeError) as e:
                    await self._bad_heartbeat(key, entry.revision or 0, entry.value, str(e))
        return out

    async def _bad_heartbeat(self, key: str, revision: int, value: bytes, error: str) -> None:
        """A heartbeat that does not decode is dead-lettered once per revision (we poll it often)."""
        if (key, revision) in self.bad_beats:
            return
        self.bad_beats.add((key, revision))
        log.warning("dead_letter", subject=f"$KV.{bus.WORKERS_BUCKET}.{key}", reason=error, bytes=len(value))
        async with self.lock:
            await self.write(
                self.store.dead_letter,
                f"$KV.{bus.WORKERS_BUCKET}.{key}",
                f"malformed heartbeat: {error}",
                value,
            )
        self.metrics.dead_letters.inc()
        self.notifier.note("dead_letter", None, subject=f"$KV.{bus.WORKERS_BUCKET}.{key}", reason=error)

    # ---- stats service --------------------------------------------------------------------------

    async def evaluate(
        self, mission_id: str, name: str, gates: dict[str, Any]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The stats engine on the mission's stored scores and task values: (verdict fields for the
        missions row, decisions rows). The gates' own seed makes it reproducible."""
        try:
            scores = await self.read(self.store.scores_frame, mission_id)
            spec = judge.gate_spec(gates, name)
            values = judge.task_values(await self.read(self.store.task_results, mission_id))
            verdict = await anyio.to_thread.run_sync(evaluate, spec, scores, values)
            rows = judge.decision_rows(mission_id, verdict, spec.level)
            return {"verdict": verdict.verdict, "reason": verdict.reason}, rows
        except Exception as e:  # a judge bug must not take the coordinator down
            log.exception("judge_failed", mission=mission_id)
            return {"verdict": "error", "reason": f"the stats engine failed: {e!r}"}, []

    async def rank_sweep(self, mission_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A sweep's end: its trials ranked (`stats.sweep`), no verdict."""
        try:
            scores = await self.read(self.store.sweep_scores, mission_id)
            stopped = sweeps.stopped_trials(self.sched, mission_id)
            row = await self.read(
                self.store.query, "SELECT spec FROM missions WHERE mission_id = ?", [mission_id]
            )
            spec = msgspec.json.decode(row[0]["spec"], type=specs.MissionSpec)
            rows, fields = await anyio.to_thread.run_sync(sweeps.rank, mission_id, spec, scores, stopped)
            return fields, rows
        except Exception as e:  # a ranking bug must not take the coordinator down
            log.exception("sweep_rank_failed", mission=mission_id)
            return {"verdict": "error", "reason": f"ranking the sweep failed: {e!r}"}, []

    async def judge_mission(self, mission_id: str) -> None:
        gates = self.gates.get(mission_id)
        mission = self.sched.missions[mission_id]
        fields: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        ranked: tuple[str, list[dict[str, Any]]] | None = None
        if mission.sweep:
            fields, trials = await self.rank_sweep(mission_id)
            ranked = (mission_id, trials)
        elif gates is not None:
            fields, rows = await self.evaluate(mission_id, mission.name, gates)
        async with self.lock:
            if mission.state != "judging":
                return
            ch = Changes()
            self.sched.finish_mission(mission, ch, **fields)
            detail = f"{fields.get('verdict')}: {fields.get('reason')}" if fields else mission.state
            audit = [audit_row(mission_id, "decide", mission_id, STATS_ENGINE, detail)]
            await self.persist(ch, decisions=(mission_id, rows), sweep_trials=ranked, audit=audit)
        log.info("mission_finished", mission=mission_id, state=mission.state, verdict=fields.get("verdict"))

    # ---- control API ----------------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._answer, msg)

    async def _answer(self, msg: Msg) -> None:
        # fleet.ctl.<caller>.<verb>: the server lets each credential publish under its own key only.
        _, _, caller, verb = msg.subject.split(".")
        reply = await self.call(verb, msg.data, self.who(caller))
        if msg.reply:
            await msg.respond(msgspec.json.encode(reply))

    def who(self, key: str) -> Actor:
        """The credential behind a caller key; the roster is read again for a key added since."""
        if key not in self.roster:
            self.roster = creds.load_roster(self.cfg.home_path)
        return creds.actor(self.roster, key)

    async def call(self, verb: str, data: bytes, actor: Actor) -> m.Reply:
        """One control API call (NATS request/reply and the web page's write actions), by `actor`."""
        handler = getattr(self, f"ctl_{verb}", None)
        try:
            if handler is None:
                raise _Refused("bad_request", f"unknown verb {verb!r}")
            return m.Reply(ok=True, data=await handler(data, actor))
        except _Refused as e:
            return m.Reply(ok=False, error=m.ErrorInfo(e.code, str(e)))
        except specs.SpecError as e:
            return m.Reply(ok=False, error=m.ErrorInfo("invalid_spec", str(e)))
        except SqlRefused as e:
            return m.Reply(ok=False, error=m.ErrorInfo("refused", str(e)))
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            return m.Reply(ok=False, error=m.ErrorInfo("bad_request", f"{verb}: {e}"))
        except Exception as e:
            log.exception("control_failed", verb=verb)
            return m.Reply(ok=False, error=m.ErrorInfo("internal", repr(e)))

    async def ctl_submit(self, data: bytes, actor: Actor) -> dict[str, Any]:
        req = msgspec.json.decode(data, type=m.SubmitRequest)
        path = specs.find(req.mission, self.missions_dir)
        spec = specs.load(path, req.overrides)
        profile, _ = specs.profile_of(spec, req.profile)
        check_runnable(spec, str(path))
        mission_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        tasks = specs.expand(spec, profile, mission_id, sweep=req.sweep)
        check_params(tasks, str(path))
        now = time.time()
        for i, t in enumerate(tasks):
            t.created_at = now + i * 1e-6  # increasing in expansion order: a restart loads them in it
        row = {
            "mission_id": mission_id,
            "name": spec.name,
            "profile": profile,
            "state": "running",
            "verdict": None,
            "reason": None,
            "spec": msgspec.json.encode(spec).decode(),
            "overrides": json.dumps(req.overrides),
            "submitted_at": time.time(),
            "finished_at": None,
            "sweep": req.sweep,
        }

        # One transaction: the mission, its tasks as placed, and their first attempts. Placement
        # before the insert saves a commit on the way to the first task's start.
        async with self.lock:
            self.sched.add_mission(self._track(mission_id, spec.name, spec, req.sweep, "running"), tasks)
            ch = Changes()
            self.sched.place(ch)
            # Their rows carry the placed state (the new tasks' changes are in them, not UPDATEs).
            for t in tasks:
                ch.tasks.pop(t.task_id, None)
            rows = [task_row(t) for t in tasks]
            audit = audit_row(mission_id, "submit", mission_id, actor, json.dumps(req.overrides))
            await self.persist(ch, new_mission=(row, rows), audit=[audit])
        log.info("submitted", mission=mission_id, profile=profile, tasks=len(tasks), sweep=req.sweep)
        return {"mission_id": mission_id, "profile": profile, "tasks": [t.task_id for t in tasks]}

    async def ctl_cancel(self, data: bytes, actor: Actor) -> dict[str, Any]:
        req = msgspec.json.decode(data, type=m.IdRequest)
        target = req.id or ""
        if target not in self.sched.missions and target not in self.sched.tasks:
            raise _Refused("not_found", f"no mission or task {target!r}")
        task = self.sched.tasks.get(target)
        mission_id = task.mission_id if task is not None else target
        audit = [audit_row(mission_id, "cancel", target, actor)]
        cancelled = await self.mutate(partial(self.sched.cancel, target), audit)
        return {"cancelled": cancelled}

    async def ctl_knob(self, data: bytes, actor: Actor) -> dict[str, Any]:
        """Set a running task's overlay knob κ by hand: stored in service_decisions (service `knob`,
        level `manual`) and audited with who asked, then sent to its worker; the reply carries the
        task's acknowledgement. Only a running task with the overlay on (`params.overlay`) takes one."""
        req = msgspec.json.decode(data, type=m.KnobRequest)
        task = self.sched.tasks.get(req.task_id)
        if task is None:
            raise _Refused("not_found", f"no task {req.task_id!r}")
        if task.state != "running" or task.worker is None:
            raise _Refused("refused", f"task {req.task_id} is {task.state}: a knob is set on a running task")
        if not task.params.get("overlay"):
            raise _Refused("refused", f"task {req.task_id} runs without the safety overlay (params.overlay)")
        row = {
            "mission_id": task.mission_id, "task_id": task.task_id, "attempt": task.attempt,
            "service": "knob", "decision": "knob", "level": "manual", "value": req.value,
            "reason": f"set by hand by {actor.role}:{actor.credential}", "acked": None, "detail": None,
            "decided_at": time.time(),
        }  # fmt: skip
        step = await self.write(self.store.record_knob, row, actor)
        cmd = m.Command(action="knob", task_id=task.task_id, attempt=task.attempt, value=req.value)
        acked, detail = await self.services.command(task.worker, cmd, "knob", step)
        return {"task_id": task.task_id, "attempt": task.attempt, "value": req.value, "acked": acked,
                "detail": detail}  # fmt: skip

    async def ctl_status(self, data: bytes, actor: Actor) -> dict[str, Any]:
        req = msgspec.json.decode(data, type=m.IdRequest) if data else m.IdRequest()
        missions = await self.read(
            self.store.query,
            "SELECT m.mission_id, name, profile, state, verdict, reason, submitted_at, finished_at, "
            "a.role || ':' || a.credential AS submitted_by FROM missions m "
            "LEFT JOIN audit a ON a.mission_id = m.mission_id AND a.action = 'submit' ORDER BY submitted_at",
        )
        if req.id is not None:
            missions = [r for r in missions if r["mission_id"] == req.id]
            if not missions:
                raise _Refused("not_found", f"no mission {req.id!r}")
        for r in missions:
            r["tasks"] = self.sched.counts(r["mission_id"])
        shown = {r["mission_id"] for r in missions}
        tasks = [
            specs.task_view(t)
            for t in self.sched.tasks.values()  # in submission order
            if t.mission_id in shown and (req.id is not None or t.state not in TERMINAL)
        ]
        out: dict[str, Any] = {"missions": missions, "tasks": tasks, "workers": self.workers_view()}
        if req.id is not None:
            out["service_decisions"] = await self.read(
                self.store.query,
                "SELECT task_id, attempt, service, step, decision, level, value, reason, acked, detail "
                "FROM service_decisions WHERE mission_id = ? ORDER BY decided_at DESC LIMIT 50",
                [req.id],
            )
            # Counts over all of them: the list above is only the newest 50.
            out["service_counts"] = await self.read(
                self.store.query,
                "SELECT task_id, service, decision, count(*) AS n, count(*) FILTER (WHERE acked) AS acked "
                "FROM service_decisions WHERE mission_id = ? GROUP BY ALL ORDER BY ALL",
                [req.id],
            )
            out["decisions"] = await self.read(
                self.store.query,
                "SELECT * EXCLUDE (mission_id) FROM decisions WHERE mission_id = ? ORDER BY rowid",
                [req.id],
            )
            out["audit"] = await self.read(
                self.store.query,
                "SELECT asked_at, action, target, role, credential, detail FROM audit WHERE mission_id = ? "
                "ORDER BY asked_at DESC LIMIT 50",
                [req.id],
            )
        return out

    def _ended(self, data: bytes, verb: str) -> Mission:
        """The mission an IdRequest names, refused unless it has ended (succeeded or failed)."""
        req = msgspec.json.decode(data, type=m.IdRequest)
        mission = self.sched.missions.get(req.id or "")
        if mission is None:
            raise _Refused("not_found", f"no mission {req.id!r}")
        if mission.state in ("running", "judging"):
            raise _Refused(
                "refused",
                f"mission {mission.mission_id} is still {mission.state}: {verb} it once it has ended",
            )
        if mission.state == "cancelled":
            raise _Refused(
                "refused", f"mission {mission.mission_id} was cancelled: {verb} needs a mission that ended"
            )
        return mission

    async def ctl_report(self, data: bytes, actor: Actor) -> dict[str, Any]:
        """Everything `fleetctl report` renders of one mission, read-only (`Store.report`)."""
        req = msgspec.json.decode(data, type=m.IdRequest)
        out = await self.read(self.store.report, req.id or "")
        if out is None:
            raise _Refused("not_found", f"no mission {req.id!r}")
        return out  # type: ignore[no-any-return]

    async def ctl_compare(self, data: bytes, actor: Actor) -> dict[str, Any]:
        """Two missions: B − A on each arm and metric both scored (`stats.compare`), and what
        differs in their inputs (`fleetd.compare`). Read-only."""
        req = msgspec.json.decode(data, type=m.CompareRequest)
        query = (
            "SELECT mission_id, name, profile, state, verdict, spec, overrides FROM missions "
            "WHERE mission_id = ?"
        )
        rows, envs, scores = {}, {}, {}
        for side, mission_id in (("a", req.a), ("b", req.b)):
            found = await self.read(self.store.query, query, [mission_id])
            if not found:
                raise _Refused("not_found", f"no mission {mission_id!r}")
            rows[side] = found[0]
            envs[side] = compare.environments(await self.read(self.store.task_results, mission_id))
            scores[side] = await self.read(self.store.scores_frame, mission_id)
        found_scores = await anyio.to_thread.run_sync(
            partial(compare_runs, scores["a"], scores["b"], metric=req.metric)
        )
        return {
            **{side: {k: row[k] for k in ("mission_id", "name", "profile", "state", "verdict")}
               for side, row in rows.items()},
            "scores": [dataclasses.asdict(c) for c in found_scores],
            "inputs": compare.input_diff(rows["a"], rows["b"], envs["a"], envs["b"]),
        }  # fmt: skip

    async def ctl_sweep(self, data: bytes, actor: Actor) -> dict[str, Any]:
        """A sweep's ranked trials and its winner as overrides for a gated run. Read-only."""
        req = msgspec.json.decode(data, type=m.IdRequest)
        found = await self.read(
            self.store.query,
            "SELECT mission_id, name, profile, state, reason, spec, overrides, sweep FROM missions "
            "WHERE mission_id = ?",
            [req.id],
        )
        if not found:
            raise _Refused("not_found", f"no mission {req.id!r}")
        row = found[0]
        if not row["sweep"]:
            raise _Refused("refused", f"mission {req.id} is not a sweep (submit it with --sweep)")
        trials = await self.read(
            self.store.query,
            "SELECT trial, params, rank, metric, n, estimate, ci_low, ci_high, level, stopped, note "
            "FROM sweep_trials WHERE mission_id = ? ORDER BY rank NULLS LAST, trial",
            [req.id],
        )
        spec = msgspec.json.decode(row["spec"], type=specs.MissionSpec)
        sw = spec.sweep
        assert sw is not None
        return {
            **{k: row[k] for k in ("mission_id", "name", "profile", "state", "reason")},
            "sweep": {"metric": sw.metric, "arm": sw.arm, "baseline": sw.baseline, "goal": sw.goal,
                      "ranked_by": sweeps.ranked_by(sw)},
            "trials": [{**t, "params": json.loads(t["params"])} for t in trials],
            "best": sweeps.winner(spec, row, trials),
        }  # fmt: skip

    async def ctl_gc(self, data: bytes, actor: Actor) -> dict[str, Any]:
        """Remove the files of ended missions beyond the policy (`fleetd.gc`): their artifacts from
        the object store, then their run folders and fetched copies on this home and, by a `GcOrder`,
        on each live worker's. Rows stay. Audited as "gc" per mission collected."""
        req = msgspec.json.decode(data, type=m.GcRequest)
        rows = await self.read(
            self.store.query,
            "SELECT mission_id, name, state, submitted_at, finished_at, collected_at FROM missions",
        )
        async with self.lock:  # no task starts, ends or retries between the plan and the store's deletes
            missions = self.sched.missions

            def ended(mid: str) -> bool:  # as the scheduler has it now, not as the rows were read
                return mid in missions and missions[mid].state in gc.ENDED and not missions[mid].collected

            chosen = [
                r
                for r in gc.choose(rows, req.keep_last, req.older_than_s, time.time())
                if ended(r["mission_id"])
            ]
            plan = gc.plan(self.sched, [r["mission_id"] for r in chosen])
            # Homes are told the missions collected before too, and what only those reference: a
            # worker away at an earlier gc frees its share now.
            before = sorted(
                (r for r in rows if r["collected_at"] is not None), key=lambda r: -r["collected_at"]
            )
            earlier = [r["mission_id"] for r in before][: gc.RESEND]
            homes_plan = gc.plan(self.sched, plan.missions + earlier)
            obs = await self.bucket()
            found, object_bytes, errors = await gc.drop_objects(obs, plan.drop, req.dry_run)
            if not req.dry_run and chosen:
                for mid in plan.missions:
                    missions[mid].collected = True
                ch = Changes()
                ch.missions.update({mid: {"collected_at": time.time()} for mid in plan.missions})
                detail = json.dumps({"artifacts": found, "bytes": object_bytes})
                await self.persist(
                    ch, audit=[audit_row(mid, "gc", mid, actor, detail) for mid in plan.missions]
                )
        order = m.GcOrder(
            missions=homes_plan.missions, artifacts=sorted(homes_plan.drop), dry_run=req.dry_run
        )
        homes = [await anyio.to_thread.run_sync(self._gc_own_home, order)]
        unreachable: list[str] = []

        async def ask(worker: str) -> None:
            try:
                reply = await self.nc.request(
                    bus.cmd_subject(worker), msgspec.json.encode(order), timeout=120
                )
                homes.append(msgspec.json.decode(reply.data, type=m.GcDone))
            except (nats.errors.Error, msgspec.DecodeError, msgspec.ValidationError) as e:
                unreachable.append(f"{worker}: {e!r}")

        async with anyio.create_task_group() as tg:  # every home at once: each may take a while
            for worker in sorted(w for w in self.sched.workers if self.sched.alive(w)):
                tg.start_soon(ask, worker)
        seen: dict[str, m.GcDone] = {}
        for done in homes:  # two workers on one home measure the same folders: count that home once
            if done.where not in seen or _gc_total(done) > _gc_total(seen[done.where]):
                seen[done.where] = done
        runs_bytes = {mid: sum(d.runs.get(mid, 0) for d in seen.values()) for mid in order.missions}
        freed = object_bytes + sum(runs_bytes.values()) + sum(d.cache for d in seen.values())
        log.info("gc", missions=len(plan.missions), freed_bytes=freed, dry_run=req.dry_run)
        return {
            "dry_run": req.dry_run,
            "missions": [
                {**{k: r[k] for k in ("mission_id", "name", "state", "finished_at")},
                 "runs_bytes": runs_bytes.get(r["mission_id"], 0)}
                for r in chosen
            ],
            "earlier_runs_bytes": sum(runs_bytes.get(mid, 0) for mid in earlier),
            "artifacts": {"removed": found, "bytes": object_bytes, "kept_needed": sorted(plan.needed),
                          "errors": errors},
            "homes": [msgspec.to_builtins(d) for d in seen.values()],
            "unreachable": unreachable,
            "freed_bytes": freed,
        }  # fmt: skip

    def _gc_own_home(self, order: m.GcOrder) -> m.GcDone:
        home = self.cfg.home_path
        cache = artifacts.cache_dir(home, self.cfg.artifacts.cache_dir)
        try:
            return retention.collect_home(home, cache, order.missions, order.artifacts, order.dry_run)
        except (OSError, ValueError) as e:
            return m.GcDone(where=f"coordinator:{home}", error=repr(e))

    async def ctl_disk(self, data: bytes, actor: Actor) -> dict[str, Any]:
        """A mission's disk: its run folders on this host (this home and the worker homes under it)
        and its artifacts in the object store. Read-only."""
        req = msgspec.json.decode(data, type=m.IdRequest)
        mission_id = req.id or ""
        if mission_id not in self.sched.missions:
            raise _Refused("not_found", f"no mission {mission_id!r}")
        home = self.cfg.home_path
        measured, runs = self.disk_seen.get(mission_id, (0.0, 0))
        if time.monotonic() - measured > DISK_TTL_S:  # the page asks on every commit: walk at most this often
            folders = [home / "runs" / mission_id, *(home / "hosts").glob(f"*/runs/{mission_id}")]
            runs = sum([await anyio.to_thread.run_sync(retention.usage, f) for f in folders])
            self.disk_seen[mission_id] = (time.monotonic(), runs)
        refs = {r.sha256: r.bytes for t in self.sched.mission_tasks(mission_id)
                for r in outputs_in(t.result).values() if r.sha256}  # fmt: skip
        found = await self.read(
            self.store.query, "SELECT collected_at FROM missions WHERE mission_id = ?", [mission_id]
        )
        return {
            "mission_id": mission_id,
            "runs_bytes": runs,
            "artifacts": len(refs),
            "artifacts_bytes": sum(refs.values()),
            "collected_at": found[0]["collected_at"] if found else None,
        }

    async def ctl_rejudge(self, data: bytes, actor: Actor) -> dict[str, Any]:
        """Judge an ended mission's stored scores again with its gates as frozen at submit (the
        missions row's spec), replacing its decisions and verdict; audited as "rejudge"."""
        mission = self._ended(data, "rejudge")
        mission_id = mission.mission_id
        if mission.sweep:
            raise _Refused("refused", f"mission {mission_id} is a sweep: it is ranked, never judged")
        query = "SELECT spec, verdict FROM missions WHERE mission_id = ?"
        row = (await self.read(self.store.query, query, [mission_id]))[0]
        spec = msgspec.json.decode(row["spec"], type=specs.MissionSpec)
        if spec.gates is None:
            raise _Refused("refused", f"mission {mission_id} has no gates to judge")
        fields, rows = await self.evaluate(mission_id, mission.name, spec.gates)
        async with self.lock:
            if mission.state not in ("succeeded", "failed"):  # a retry started meanwhile
                raise _Refused("refused", f"mission {mission_id} is {mission.state} again: rejudge it later")
            before = (await self.read(self.store.query, query, [mission_id]))[0]["verdict"]
            ch = Changes()
            ch.missions[mission_id] = dict(fields)
            detail = f"{before} -> {fields['verdict']}: {fields['reason']}"
            audit = [audit_row(mission_id, "rejudge", mission_id, actor, detail)]
            await self.persist(ch, decisions=(mission_id, rows), audit=audit)
        log.info("mission_rejudged", mission=mission_id, before=before, verdict=fields["verdict"])
        return {"mission_id": mission_id, "previous": before, **fields, "decisions": rows}

    async def ctl_retry(self, data: bytes, actor: Actor) -> dict[str, Any]:
        """Run an ended mission's failed tasks again (new attempts, a fresh attempt budget), and the
        tasks cancelled because of them; the mission runs again and is judged again at its end."""
        mission = self._ended(data, "retry")
        mission_id = mission.mission_id
        async with self.lock:
            if mission.collected:  # checked under the lock: a gc cannot slip in between
                raise _Refused("refused", f"mission {mission_id}'s files were removed by gc: submit it again")
            if mission.state not in ("succeeded", "failed"):
                raise _Refused("refused", f"mission {mission_id} is {mission.state} again")
            ch = Changes()
            retried, reset = self.sched.retry_failed(mission_id, ch)
            if not retried:
                raise _Refused("refused", f"mission {mission_id} has no failed task to retry")
            self.sched.place(ch)
            detail = json.dumps({"failed": retried, "dependents": reset})
            audit = [audit_row(mission_id, "retry", mission_id, actor, detail)]
            # Its decisions no longer stand: the judge writes new ones when the mission ends again.
            await self.persist(ch, decisions=(mission_id, []), audit=audit)
        log.info("mission_retry", mission=mission_id, failed=retried, dependents=reset)
        return {"mission_id": mission_id, "retried": retried, "dependents": reset}

    def workers_view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        for w, view in sorted(self.sched.workers.items()):
            gpu = view.hb.gpu
            out.append(
                {
                    "worker": w,
                    "host": view.hb.host,
                    "alive": self.sched.alive(w, now),
                    "age_s": round(now - view.seen, 1),
                    "running": view.hb.running,
                    "gpu_uuid": gpu.uuid if gpu else None,
                    "gpu_name": gpu.name if gpu else "cpu",
                    "total_bytes": gpu.total_bytes if gpu else 0,
                    "free_bytes": gpu.free_bytes if gpu else 0,
                    "utilization": gpu.utilization if gpu else None,
                }
            )
        return out

    def _service_tables(self, task_id: str) -> dict[str, Any] | None:
        """The service tables a task carries (its stage's `services`), for the service host."""
        task = self.sched.tasks.get(task_id)
        return None if task is None else task.params.get("services")

    # ---- what the web page sees (fleet.view.FleetView) ------------------------------------------

    def task_views(self, mission_id: str | None = None) -> list[dict[str, Any]]:
        tasks = self.sched.mission_tasks(mission_id) if mission_id is not None else self.sched.tasks.values()
        return [specs.task_view(t) for t in tasks]  # both in submission order

    def task_view(self, task_id: str) -> dict[str, Any] | None:
        task = self.sched.tasks.get(task_id)
        return None if task is None else specs.task_view(task)

    def counts(self, mission_id: str) -> dict[str, int]:
        return self.sched.counts(mission_id)

    async def read_sql(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.read(fn, self.store.query, *args)

    def metrics_exposition(self) -> bytes:
        return self.metrics.exposition()

    async def health(self) -> dict[str, bool]:
        return {
            "nats": self.nc.is_connected,
            "jetstream": await _answers(self.js.account_info(), 1.0),
            "duckdb": await _answers(self.read(self.store.query, "SELECT 1"), 2.0),
            "workers": any(w["alive"] for w in self.workers_view()),
        }

    async def ctl_workers(self, data: bytes, actor: Actor) -> list[dict[str, Any]]:
        return self.workers_view()

    async def ctl_missions(self, data: bytes, actor: Actor) -> dict[str, Any]:
        runs = await self.read(
            self.store.query,
            "SELECT mission_id, name, profile, state, verdict, submitted_at "
            "FROM missions ORDER BY submitted_at",
        )
        catalogue = []
        for name in specs.available(self.missions_dir):
            try:
                path = specs.find(name, self.missions_dir)
                spec = specs.load(path)
                check_runnable(spec, str(path))
                catalogue.append(
                    {"name": name, "description": spec.description, "profiles": sorted(spec.profiles)}
                )
            except specs.SpecError as e:
                catalogue.append({"name": name, "description": f"INVALID: {e}", "profiles": []})
        return {"available": catalogue, "runs": runs}

    async def ctl_sql(self, data: bytes, actor: Actor) -> dict[str, Any]:
        req = msgspec.json.decode(data, type=m.SqlRequest)
        limit, timeout = min(req.limit, self.cfg.sql.max_rows), self.cfg.sql.timeout_s
        cols, rows, truncated = await self.read(self.store.read_only_sql, req.query, limit, timeout)
        return {"columns": cols, "rows": msgspec.to_builtins(rows, builtin_types=()), "truncated": truncated}

    async def ctl_logs(self, data: bytes, actor: Actor) -> dict[str, Any]:
        req = msgspec.json.decode(data, type=m.LogsRequest)
        task = self.sched.tasks.get(req.task_id)
        if task is None:
            raise _Refused("not_found", f"no task {req.task_id!r}")
        attempt = req.attempt or task.attempt
        lines = await self.read(
            self.store.query,
            "SELECT seq, line FROM logs WHERE task_id = ? AND attempt = ? AND seq > ? ORDER BY seq, line_no",
            [req.task_id, attempt, req.after_seq],
        )
        return {"task_id": req.task_id, "attempt": attempt, "state": task.state, "lines": lines}

    async def ctl_export(self, data: bytes, actor: Actor) -> dict[str, Any]:
        """The tables travel to the client, which writes them: fleetd writes nowhere a client names."""
        req = msgspec.json.decode(data, type=m.ExportRequest) if data else m.ExportRequest()
        if not req.table:
            return {"tables": await self.read(self.store.table_sizes)}
        parquet, rows, last = await self.read(self.store.export_chunk, req.table, req.after)
        return {"table": req.table, "rows": rows, "last": last, "parquet": parquet}


def check_runnable(spec: specs.MissionSpec, file: str) -> None:
    """What a valid spec still needs to run on this fleet: gates the stats engine accepts, and task
    kinds and services this fleet has, with service tables their service accepts (SpecError if not)."""
    if spec.gates is not None:
        judge.gate_spec(spec.gates, file, spec.arms)
    for i, st in enumerate(spec.stages):
        if st.kind not in registry.KINDS:
            known = sorted(registry.KINDS)
            raise specs.SpecError(file, f"stages[{i}].kind", f"unknown task kind {st.kind!r}; known: {known}")
        for name in st.services:
            if name not in registry.SERVICES:
                known = sorted(registry.SERVICES)
                raise specs.SpecError(
                    file, f"stages[{i}].services", f"unknown service {name!r}; known: {known}"
                )
    for name in {n for st in spec.stages for n in st.services}:
        try:
            watch_factory(name)(spec.services.get(name, {}))
        except msgspec.ValidationError as e:
            raise specs.spec_error(e, file, f"services.{name}") from None
        except ValueError as e:
            raise specs.SpecError(file, f"services.{name}", str(e)) from None


def check_params(tasks: list[specs.Task], file: str) -> None:
    """Each task's params through its kind's submit check (`registry.CHECKS`), once per distinct
    params; SpecError naming the task and the check's reason."""
    seen: set[str] = set()
    for t in tasks:
        ref = registry.CHECKS.get(t.kind)
        key = json.dumps([t.kind, t.params], sort_keys=True, default=str)
        if ref is None or key in seen:
            continue
        seen.add(key)
        try:
            registry.resolve(ref)(t.params)
        except (ValueError, TypeError, KeyError) as e:  # a knob of the wrong type, a config without a key
            raise specs.SpecError(file, f"stages.{t.stage} ({t.name})", f"{type(e).__name__}: {e}") from None


def _lost(ev: m.Finished, missing: list[str]) -> m.Failed:
    """A Finished whose outputs were removed meanwhile, as the infrastructure failure it is."""
    error = f"its outputs {', '.join(s[:12] for s in missing)} were removed from the object store (gc)"
    fields = {f: getattr(ev, f) for f in ("mission_id", "task_id", "attempt", "seq", "worker", "ts")}
    return m.Failed(**fields, reason="infra", error=error, duration_s=ev.duration_s)


def _gc_total(done: m.GcDone) -> int:
    return sum(done.runs.values()) + done.cache


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def _answers(call: Awaitable[Any], timeout: float) -> bool:
    try:
        with anyio.fail_after(timeout):
            await call
        return True
    except Exception:  # any failure is "not healthy"; the detail is in fleetd's own log
        return False


def _log_lifecycle(ev: m.Event) -> None:
    kind = type(ev).__struct_config__.tag
    extra = {"reason": ev.reason, "error": ev.error[:300]} if isinstance(ev, m.Failed) else {}
    log.info(
        f"task_{kind}", mission=ev.mission_id, task=ev.task_id, attempt=ev.attempt, worker=ev.worker, **extra
    )

"""The scheduler's state machine: task states, pending reasons, placement, attempt budgets, leases.

Pure and synchronous: it owns the in-memory view of missions, tasks and workers and returns
`Changes` (rows to write, assignments to publish, dead letters, commands). The coordinator applies
them: DuckDB first, then the bus, so a crash between the two is repaired at restart from the tables.

Every task is in exactly one state: pending, assigned, running, succeeded, failed, cancelled, or
stopped (a sweep's trial the median rule ended early).
A pending task always carries a machine-readable reason.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from schemas.messages import (
    INFRA_REASONS,
    ArtifactRef,
    Assignment,
    Failed,
    Finished,
    Heartbeat,
    Resources,
    Started,
)
from schemas.missions import Task

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "stopped"})
DONE_WELL = frozenset({"succeeded", "stopped"})  # a sweep's trial stopped early is a sweep working
ACTIVE = frozenset({"assigned", "running"})
GB = 1024**3


def assignment(task: Task, inputs: dict[str, ArtifactRef] | None = None) -> Assignment:
    """What a worker is sent for the task's current attempt."""
    return Assignment(
        task_id=task.task_id,
        mission_id=task.mission_id,
        kind=task.kind,
        params=task.params,
        attempt=task.attempt,
        timeout_s=task.timeout_s,
        resources=Resources(vram_gb=task.vram_gb, gpu_class=task.gpu_class),
        inputs=inputs or {},
    )


def outputs_of(task: Task) -> dict[str, ArtifactRef]:
    """The artifacts a finished task left (its result's `outputs`, as its worker rewrote them); a
    malformed entry is left out, and the task that needs it fails there with the name it lacks."""
    return outputs_in(task.result)


def outputs_in(result: dict[str, Any] | None) -> dict[str, ArtifactRef]:
    found = (result or {}).get("outputs")
    out: dict[str, ArtifactRef] = {}
    for name, ref in (found if isinstance(found, dict) else {}).items():
        with contextlib.suppress(msgspec.ValidationError):
            out[str(name)] = msgspec.convert(ref, ArtifactRef)
    return out


@dataclass
class Mission:
    mission_id: str
    name: str
    state: str = "running"  # running, judging, succeeded, failed, cancelled
    has_gates: bool = False
    sweep: bool = False  # ranked at its end (`stats.sweep`), never gated
    collected: bool = False  # `fleetctl gc` removed its files: it cannot run again
    task_ids: list[str] = field(default_factory=list)


@dataclass
class WorkerView:
    hb: Heartbeat
    revision: int
    seen: float  # monotonic time this revision was first seen: leases never compare two clocks


@dataclass
class Changes:
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    missions: dict[str, dict[str, Any]] = field(default_factory=dict)
    assign: list[tuple[str, Assignment]] = field(default_factory=list)  # (worker, assignment)
    dead: list[tuple[Task, str]] = field(default_factory=list)  # exhausted tasks and why
    cancel: list[tuple[str, str, int]] = field(default_factory=list)  # (worker, task_id, attempt)
    purge: set[str] = field(default_factory=set)  # workers whose task subject must be emptied
    judge: list[str] = field(default_factory=list)  # missions whose tasks are all terminal

    def touch(self, task: Task, **fields: Any) -> None:
        """Set the task's fields (a Struct: a misspelt field raises) and queue them for the store."""
        for k, v in fields.items():
            setattr(task, k, v)
        self.tasks.setdefault(task.task_id, {}).update(fields)

    def empty(self) -> bool:
        return not (self.tasks or self.attempts or self.missions or self.assign or self.cancel or self.judge)


@dataclass
class SchedulerConfig:
    lease_s: float = 10.0  # a worker whose heartbeat is older than this has lost its tasks
    assign_grace_s: float = 10.0  # an alive worker that does not report an assigned task has lost it
    tasks_per_worker: int = 1


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.tasks: dict[str, Task] = {}
        self.missions: dict[str, Mission] = {}
        self.workers: dict[str, WorkerView] = {}
        # `tasks` is in submission order (older missions and earlier stages first: dicts keep insertion
        # order). Runtime-only, not persisted: the monotonic time of each task's last sign of life.
        self.since: dict[str, float] = {}

    def assignment(self, task: Task) -> Assignment:
        """The task's assignment, with the outputs of the tasks it follows, directly or not, as its
        inputs (a run after the overlay stage still gets the base the overlay was trained on). The
        nearest task's output keeps the plain name; a farther one's with the same name is
        `<its task name>/<name>`."""
        inputs: dict[str, ArtifactRef] = {}
        seen: set[str] = set()
        frontier = list(task.deps)
        while frontier:
            dep = self.tasks.get(frontier.pop(0))
            if dep is None or dep.task_id in seen:
                continue
            seen.add(dep.task_id)
            for name, ref in outputs_of(dep).items():
                inputs.setdefault(f"{dep.name}/{name}" if name in inputs else name, ref)
            frontier.extend(dep.deps)
        return assignment(task, inputs)

    # ---- loading --------------------------------------------------------------------------------

    def add_mission(self, mission: Mission, tasks: list[Task]) -> None:
        self.missions[mission.mission_id] = mission
        now = time.monotonic()
        for t in tasks:
            self.since[t.task_id] = now
            self.tasks[t.task_id] = t
            mission.task_ids.append(t.task_id)

    def mission_tasks(self, mission_id: str) -> list[Task]:
        mission = self.missions.get(mission_id)
        return [self.tasks[tid] for tid in mission.task_ids] if mission else []

    def counts(self, mission_id: str) -> dict[str, int]:
        """Tasks of a mission by state."""
        out: dict[str, int] = {}
        for t in self.mission_tasks(mission_id):
            out[t.state] = out.get(t.state, 0) + 1
        return out

    # ---- events ---------------------------------------------------------------------------------

    def on_event(self, ev: Started | Finished | Failed, ch: Changes) -> None:
        task = self.tasks.get(ev.task_id)
        if task is None or task.attempt != ev.attempt or task.state in TERMINAL:
            return  # a stale attempt or a cancelled task: the event is recorded, the state does not move
        now = time.time()
        if isinstance(ev, Started):
            if task.state in ("pending", "assigned"):
                ch.touch(task, state="running", worker=ev.worker, started_at=now, pending_reason=None)
                self.since[task.task_id] = time.monotonic()
                ch.attempts.append(_attempt(task, state="running", started_at=now))
        elif isinstance(ev, Finished):
            ch.touch(
                task, state="succeeded", result=ev.result, finished_at=now, pending_reason=None, error=None
            )
            ch.attempts.append(_attempt(task, state="succeeded", finished_at=now))
            self._after_terminal(task, ch)
        else:
            self._fail(task, ev.reason, ev.error, ch, worker=ev.worker)

    def _fail(self, task: Task, reason: str, error: str, ch: Changes, worker: str | None = None) -> None:
        now = time.time()
        ch.attempts.append(_attempt(task, state="failed", reason=reason, error=error, finished_at=now))
        infra = reason in INFRA_REASONS
        used = (task.infra_failures if infra else task.task_failures) + 1
        budget = task.max_infra_attempts if infra else task.max_attempts
        counter = "infra_failures" if infra else "task_failures"
        if reason == "cancelled":
            ch.touch(task, state="cancelled", error=error, finished_at=now, pending_reason=None)
            self._after_terminal(task, ch)
        elif used < budget:
            excluded = (
                [*task.excluded_workers, worker] if reason == "oom" and worker else task.excluded_workers
            )
            ch.touch(
                task,
                **{counter: used},
                state="pending",
                attempt=task.attempt + 1,
                worker=None,
                error=error,
                pending_reason=f"retry_after_{reason}",
                excluded_workers=excluded,
            )
        else:
            ch.touch(
                task,
                **{counter: used},
                state="failed",
                error=f"{reason}: {error}",
                finished_at=now,
                pending_reason=None,
            )
            ch.dead.append((task, f"{counter} {used}/{budget}; last: {reason}: {error}"))
            self._after_terminal(task, ch)

    def _after_terminal(self, task: Task, ch: Changes) -> None:
        if task.state != "succeeded":
            # Dependents can never run: cancel them (a stopped trial's: stop them), transitively, so
            # the mission still ends.
            for other in self.tasks.values():
                if task.task_id in other.deps and other.state == "pending":
                    ch.touch(
                        other,
                        state="stopped" if task.state == "stopped" else "cancelled",
                        error=f"dependency {task.task_id} {task.state}",
                        pending_reason=None,
                    )
                    self._after_terminal(other, ch)
        mission = self.missions.get(task.mission_id)
        if mission is None or mission.state != "running":
            return
        if all(self.tasks[t].state in TERMINAL for t in mission.task_ids):
            if mission.has_gates or mission.sweep:
                mission.state = "judging"
                ch.missions[mission.mission_id] = {"state": "judging"}
                ch.judge.append(mission.mission_id)
            else:
                self.finish_mission(mission, ch)

    def finish_mission(self, mission: Mission, ch: Changes, **fields: Any) -> None:
        ok = all(self.tasks[t].state in DONE_WELL for t in mission.task_ids)
        mission.state = "succeeded" if ok else "failed"
        ch.missions[mission.mission_id] = {"state": mission.state, "finished_at": time.time(), **fields}

    def retry_failed(self, mission_id: str, ch: Changes) -> tuple[list[str], list[str]]:
        """An ended mission's failed tasks go back to pending with a new attempt and a fresh attempt
        budget; the tasks cancelled because a dependency did not succeed (`_after_terminal`) go back
        to waiting for it, where every dependency they have is succeeded or retried. Succeeded tasks
        keep their results. Returns (retried, dependents reset); the mission runs again if any."""
        retried: list[str] = []
        reset: list[str] = []
        again: set[str] = set()
        for task in self.mission_tasks(mission_id):  # submission order: a task after its deps
            if task.state == "failed":
                ch.touch(
                    task,
                    state="pending",
                    attempt=task.attempt + 1,
                    task_failures=0,
                    infra_failures=0,
                    worker=None,
                    error=None,
                    result=None,
                    pending_reason="retry_requested",
                    assigned_at=None,
                    started_at=None,
                    finished_at=None,
                )
                retried.append(task.task_id)
            elif (
                task.state == "cancelled"
                and (task.error or "").startswith("dependency ")
                and any(d in again for d in task.deps)
                and all(
                    d in again or self.tasks[d].state == "succeeded" for d in task.deps if d in self.tasks
                )
            ):
                ch.touch(
                    task, state="pending", error=None, finished_at=None, pending_reason="waiting_for_deps"
                )
                reset.append(task.task_id)
            else:
                continue
            again.add(task.task_id)
            self.since[task.task_id] = time.monotonic()
        mission = self.missions[mission_id]
        if retried:
            mission.state = "running"
            ch.missions[mission_id] = {
                "state": "running",
                "verdict": None,
                "reason": None,
                "finished_at": None,
            }
        return retried, reset

    # ---- workers --------------------------------------------------------------------------------

    def heartbeat(self, hb: Heartbeat, revision: int) -> None:
        view = self.workers.get(hb.worker)
        if view is None or view.revision != revision:
            self.workers[hb.worker] = WorkerView(hb, revision, time.monotonic())

    def alive(self, worker: str, now: float | None = None) -> bool:
        view = self.workers.get(worker)
        now = time.monotonic() if now is None else now
        return view is not None and now - view.seen <= self.config.lease_s

    def check_leases(self, ch: Changes) -> None:
        """A task whose worker's lease lapsed, or whose alive worker stopped reporting it, goes back."""
        now = time.monotonic()
        for task in self.tasks.values():
            if task.state not in ACTIVE or task.worker is None:
                continue
            view = self.workers.get(task.worker)
            if not self.alive(task.worker, now):
                why = f"worker {task.worker} lease lapsed (no heartbeat for {self.config.lease_s:g} s)"
            elif view is not None and view.hb.running == f"{task.task_id}:{task.attempt}":
                self.since[task.task_id] = max(self.since[task.task_id], view.seen)
                continue
            elif (
                now - self.since[task.task_id] > self.config.assign_grace_s
                and view is not None
                and view.seen > self.since[task.task_id]
            ):
                why = f"worker {task.worker} is alive but not running it"
            else:
                continue
            ch.purge.add(task.worker)
            self._fail(task, "infra", why, ch, worker=task.worker)

    # ---- placement ------------------------------------------------------------------------------

    def place(self, ch: Changes) -> None:
        now = time.monotonic()
        load: dict[str, int] = {w: 0 for w in self.workers if self.alive(w, now)}
        for t in self.tasks.values():
            if t.state in ACTIVE and t.worker in load:
                load[t.worker] += 1
        idle = {w for w, n in load.items() if n < self.config.tasks_per_worker}
        pending = [t for t in self.tasks.values() if t.state == "pending"]  # in submission order
        for task in pending:
            if self.missions.get(task.mission_id, Mission("", "")).state == "cancelled":
                continue
            if any(self.tasks[d].state != "succeeded" for d in task.deps if d in self.tasks):
                reason: str | None = "waiting_for_deps"
            else:
                worker, reason = self._fit(task, idle, set(load))
                if worker is not None:
                    idle.discard(worker)
                    ch.touch(
                        task, state="assigned", worker=worker, assigned_at=time.time(), pending_reason=None
                    )
                    self.since[task.task_id] = now
                    ch.attempts.append(_attempt(task, state="assigned", assigned_at=time.time()))
                    ch.assign.append((worker, self.assignment(task)))
                    continue
            if reason != task.pending_reason:
                ch.touch(task, pending_reason=reason)

    def _fit(self, task: Task, idle: set[str], alive: set[str]) -> tuple[str | None, str]:
        """Best fit: the idle worker with the least free memory that still holds the task."""
        need = task.vram_gb * GB

        def capable(w: str) -> bool:
            hb = self.workers[w].hb
            if w in task.excluded_workers:
                return False
            if task.gpu_class and (hb.gpu is None or task.gpu_class.lower() not in hb.gpu.name.lower()):
                return False
            return need == 0 or (hb.gpu is not None and hb.gpu.free_bytes >= need)

        fits = [w for w in idle if capable(w)]
        if fits:
            # CPU workers (free 0) first for CPU tasks, then the tightest GPU.
            def free(w: str) -> int:
                gpu = self.workers[w].hb.gpu
                return -1 if gpu is None else gpu.free_bytes

            return min(fits, key=lambda w: (free(w), w)), ""
        if not alive:
            return None, "waiting_for_worker none_alive"
        if any(capable(w) for w in alive):
            return None, "waiting_for_free_worker"
        gpus = [self.workers[w].hb.gpu for w in alive]
        frees = [g.free_bytes for g in gpus if g is not None]
        if task.gpu_class and not any(
            g is not None and task.gpu_class.lower() in g.name.lower() for g in gpus
        ):
            return None, f"waiting_for_gpu_class {task.gpu_class}"
        if not frees:
            return None, f"waiting_for_gpu need={task.vram_gb:g}G no_gpu_workers"
        return None, f"waiting_for_gpu_memory need={task.vram_gb:g}G best_free={max(frees) / GB:.0f}G"

    # ---- cancellation ---------------------------------------------------------------------------

    def stop_trial(self, mission_id: str, trial: int, reason: str, ch: Changes) -> list[str]:
        """A sweep's early stop: every unfinished task of the trial ends `stopped` (a running one is
        cancelled on its worker), and so do their dependents; returns the task ids stopped."""
        now, done = time.time(), []
        for task in self.mission_tasks(mission_id):
            if task.trial != trial or task.state in TERMINAL:
                continue
            if task.state in ACTIVE and task.worker:
                ch.cancel.append((task.worker, task.task_id, task.attempt))
                ch.attempts.append(_attempt(task, state="stopped", finished_at=now))
            ch.touch(task, state="stopped", error=reason, finished_at=now, pending_reason=None)
            done.append(task.task_id)
        for tid in done:
            self._after_terminal(self.tasks[tid], ch)
        return done

    def cancel(self, target: str, ch: Changes) -> list[str]:
        """Cancel a mission (every unfinished task) or one task; returns the task ids cancelled."""
        if target in self.missions:
            mission = self.missions[target]
            ids = list(mission.task_ids)
        elif target in self.tasks:
            mission, ids = self.missions[self.tasks[target].mission_id], [target]
        else:
            raise KeyError(target)
        done = []
        now = time.time()
        for tid in ids:
            task = self.tasks[tid]
            if task.state in TERMINAL:
                continue
            if task.state in ACTIVE and task.worker:
                ch.cancel.append((task.worker, task.task_id, task.attempt))
                ch.attempts.append(_attempt(task, state="cancelled", finished_at=now))
            ch.touch(task, state="cancelled", error="cancelled by user", finished_at=now, pending_reason=None)
            done.append(tid)
        if target in self.missions and mission.state in ("running", "judging"):
            mission.state = "cancelled"
            ch.missions[mission.mission_id] = {"state": "cancelled", "finished_at": now}
        else:
            for tid in done:
                self._after_terminal(self.tasks[tid], ch)
        return done


def _attempt(task: Task, **fields: Any) -> dict[str, Any]:
    row = {"task_id": task.task_id, "attempt": task.attempt, "worker": task.worker}
    row.update(fields)
    return row

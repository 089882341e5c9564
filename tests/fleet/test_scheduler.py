"""The scheduler's state machine without a bus: placement, pending reasons, budgets, leases, stale events."""

from __future__ import annotations

import time

import msgspec
import pytest

from fleetd.scheduler import GB, Changes, Mission, Scheduler, SchedulerConfig
from schemas import messages as m
from schemas.missions import Task, task_view


def task(name: str, vram: float = 0, deps: tuple[str, ...] = (), attempts: int = 2, infra: int = 3) -> Task:
    return Task(
        task_id=f"mi/{name}",
        mission_id="mi",
        name=name,
        stage=name,
        kind="noop",
        params={},
        deps=list(deps),
        vram_gb=vram,
        gpu_class=None,
        timeout_s=10,
        max_attempts=attempts,
        max_infra_attempts=infra,
    )


def beat(s: Scheduler, worker: str, free_gb: float | None, running: str | None = None, rev: int = 1) -> None:
    gpu = None if free_gb is None else m.GpuInfo(f"GPU-{worker}", "H100", 80 * GB, int(free_gb * GB))
    s.heartbeat(m.Heartbeat(worker=worker, host="h", pid=1, gpu=gpu, running=running, ts=time.time()), rev)


def fleet(*tasks: Task, gates: bool = False) -> Scheduler:
    s = Scheduler(SchedulerConfig(lease_s=0.2, assign_grace_s=0.2))
    s.add_mission(Mission("mi", "m", has_gates=gates), list(tasks))
    return s


def event(cls: type, t: Task, worker: str = "g1", **fields: object) -> m.Event:
    return cls(mission_id="mi", task_id=t.task_id, attempt=t.attempt, seq=0, worker=worker, ts=0.0, **fields)


def test_best_fit_and_pending_reasons() -> None:
    a, b, c = task("a", vram=30), task("b", vram=10), task("c", vram=100)
    s = fleet(a, b, c)
    beat(s, "g1", 79)
    beat(s, "g2", 40)
    ch = Changes()
    s.place(ch)
    placed = {asg.task_id: w for w, asg in ch.assign}
    assert placed == {"mi/a": "g2", "mi/b": "g1"}  # a takes the tightest GPU that holds it
    assert c.state == "pending" and c.pending_reason == "waiting_for_gpu_memory need=100G best_free=79G"


def test_busy_workers_and_dependencies_give_their_reasons() -> None:
    a, b, c = task("a"), task("b"), task("c", deps=("mi/a",))
    s = fleet(a, b, c)
    ch = Changes()
    s.place(ch)
    assert a.pending_reason == "waiting_for_worker none_alive"
    beat(s, "cpu0", None)
    s.place(ch)
    assert a.state == "assigned" and b.pending_reason == "waiting_for_free_worker"
    assert c.pending_reason == "waiting_for_deps"


def test_task_errors_and_infrastructure_failures_spend_separate_budgets() -> None:
    t = task("t", attempts=2, infra=2)
    s = fleet(t)
    beat(s, "g1", 80)
    for expected_attempt, reason in ((2, "infra"), (3, "error")):
        ch = Changes()
        s.place(ch)
        s.on_event(event(m.Failed, t, reason=reason, error="boom"), ch)
        assert t.state == "pending" and t.attempt == expected_attempt
    ch = Changes()
    s.place(ch)
    s.on_event(event(m.Failed, t, reason="error", error="boom again"), ch)
    assert t.state == "failed" and (t.task_failures, t.infra_failures) == (2, 1)
    assert ch.dead and "task_failures 2/2" in ch.dead[0][1]


def test_oom_retries_elsewhere_and_failures_cancel_dependents() -> None:
    t, d = task("t", vram=10, attempts=2), task("d", deps=("mi/t",))
    s = fleet(t, d, gates=True)
    beat(s, "g1", 20)
    beat(s, "g2", 70)
    ch = Changes()
    s.place(ch)
    first = t.worker
    s.on_event(event(m.Failed, t, worker=first, reason="oom", error="CUDA out of memory"), ch)
    s.place(ch)
    assert t.state == "assigned" and t.worker != first and t.excluded_workers == [first]
    s.on_event(event(m.Failed, t, worker=t.worker, reason="error", error="x"), ch)
    assert t.state == "failed" and d.state == "cancelled" and "dependency mi/t failed" in (d.error or "")
    assert ch.judge == ["mi"]  # every task ended: the stats engine judges what there is


def test_stale_attempts_do_not_move_state_and_lapsed_leases_requeue() -> None:
    t = task("t")
    s = fleet(t)
    beat(s, "g1", 80)
    ch = Changes()
    s.place(ch)
    s.on_event(event(m.Started, t), ch)
    assert t.state == "running"
    time.sleep(0.3)  # no heartbeat for longer than the lease
    s.check_leases(ch)
    assert t.state == "pending" and t.attempt == 2 and ch.purge == {"g1"}
    stale = m.Finished(mission_id="mi", task_id=t.task_id, attempt=1, seq=5, worker="g1", ts=0.0)
    s.on_event(stale, ch)
    assert t.state == "pending"


def test_alive_worker_that_does_not_report_its_task_loses_it() -> None:
    t = task("t")
    s = fleet(t)
    beat(s, "g1", 80)
    ch = Changes()
    s.place(ch)
    time.sleep(0.1)
    beat(s, "g1", 80, running=f"{t.task_id}:1", rev=2)
    s.check_leases(ch)
    assert t.state == "assigned"
    time.sleep(0.25)
    beat(s, "g1", 80, running=None, rev=3)  # restarted: alive, but the task is gone
    s.check_leases(ch)
    assert t.state == "pending" and "not running it" in (t.error or "")


def test_tasks_are_the_schema_struct_and_the_bookkeeping_stays_in_the_scheduler() -> None:
    a, b = task("a"), task("b", deps=("mi/a",))
    s = fleet(a, b)
    assert list(s.tasks.values()) == [a, b]  # submission order, kept by the scheduler, not on the task
    fields = {f.name for f in msgspec.structs.fields(Task)}
    assert not {"order", "since"} & fields
    beat(s, "g1", 80)
    ch = Changes()
    s.place(ch)
    s.on_event(event(m.Finished, a, result={"values": {"x": 1.0}}), ch)
    assert a.result == {"values": {"x": 1.0}} and a.finished_at is not None and a.assigned_at is not None
    assert set(ch.tasks["mi/a"]) <= fields  # every change the store is sent is a column
    with pytest.raises(AttributeError):
        ch.touch(a, stat="failed")  # a misspelt field is an error, not a new attribute
    assert task_view(b) == {
        "task_id": "mi/b", "mission_id": "mi", "name": "b", "stage": "b", "kind": "noop", "arm": None,
        "seed": None, "trial": None, "state": "pending", "pending_reason": "waiting_for_deps", "attempt": 1,
        "worker": None, "error": None, "vram_gb": 0,
    }  # fmt: skip


def test_a_stopped_trial_stops_its_dependents_and_the_mission_still_succeeds() -> None:
    import msgspec

    a0, a1 = task("train-t0"), task("train-t1")
    e0, e1 = task("eval-t0", deps=(a0.task_id,)), task("eval-t1", deps=(a1.task_id,))
    for t, trial in ((a0, 0), (a1, 1), (e0, 0), (e1, 1)):
        t.trial = trial
    after = task("after-t1", deps=(e1.task_id,))  # no trial of its own: stopped as a dependent
    s = Scheduler(SchedulerConfig(lease_s=5, assign_grace_s=5))
    s.add_mission(Mission("mi", "m", sweep=True), [a0, a1, e0, e1, after])
    beat(s, "g1", 80)
    beat(s, "g2", 80)
    ch = Changes()
    s.place(ch)
    assert {a0.state, a1.state} == {"assigned"}
    ch = Changes()
    assert s.stop_trial("mi", 1, "stopped at step 3", ch) == ["mi/train-t1", "mi/eval-t1"]
    assert ch.cancel == [(a1.worker, a1.task_id, 1)]  # the running task is cancelled on its worker
    assert (a1.state, e1.state, e1.error) == ("stopped", "stopped", "stopped at step 3")
    assert (after.state, after.error) == ("stopped", "dependency mi/eval-t1 stopped")
    s.on_event(msgspec.convert({"mission_id": "mi", "task_id": a0.task_id, "attempt": 1, "seq": 0,
                                "worker": a0.worker, "ts": 0.0, "duration_s": 0.1, "result": {}},
                               m.Finished), Changes())  # fmt: skip
    s.place(Changes())
    ch = Changes()
    s.on_event(event(m.Finished, e0, worker=e0.worker or "g1", duration_s=0.1, result={}), ch)
    assert s.missions["mi"].state == "judging" and ch.judge == ["mi"]  # a sweep is ranked, not failed
    s.finish_mission(s.missions["mi"], ch)
    assert s.missions["mi"].state == "succeeded"

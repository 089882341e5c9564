"""fleetd's Prometheus metrics (NATS_NOTES.md section 8): `fleetd_` prefix, base units, counters end
in `_total`, and no per-task labels, so a sum or average over any label means something.

Counters and histograms are counted where things happen (the coordinator's commits); gauges are read
from the scheduler's state at scrape time by a collector, so they can never drift from it.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.messages import Event, FailureReason, Finished, Metrics

if TYPE_CHECKING:
    from fleetd.coordinator import Coordinator

disable_created_metrics()  # the *_created series only double the exposition for fleetd's use

TASK_STATES = ("pending", "assigned", "running", "succeeded", "failed", "cancelled", "stopped")
ENDED = TASK_STATES[3:]


def _version() -> str:
    try:
        return version("bem-fleet")
    except PackageNotFoundError:
        return "unknown"


class FleetMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "fleetd_events_recorded_total", "Task events stored in DuckDB", ["kind"], registry=r
        )
        self.points = Counter(
            "fleetd_metric_points_recorded_total", "Metric points stored in DuckDB", registry=r
        )
        self.finished = Counter(
            "fleetd_tasks_finished_total", "Tasks that reached a final state", ["state"], registry=r
        )
        self.failed_attempts = Counter(
            "fleetd_task_attempts_failed_total",
            "Failed task attempts, retried or not",
            ["reason"],
            registry=r,
        )
        self.duration = Histogram(
            "fleetd_task_duration_seconds",
            "Run time of succeeded tasks, as their workers measured it",
            buckets=(0.1, 1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 48 * 3600),
            registry=r,
        )
        self.commit = Histogram(
            "fleetd_store_commit_seconds",
            "DuckDB transactions of the recorder and scheduler",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.dead_letters = Counter(
            "fleetd_dead_letters_total", "Messages and tasks dead-lettered", registry=r
        )
        # Every label value at 0 from the start: a series born at 1 shows no increase(), so an alert
        # on the first failure would never see it.
        for reason in get_args(FailureReason):
            self.failed_attempts.labels(reason)
        for state in ENDED:
            self.finished.labels(state)

    def bind(self, coord: Coordinator) -> None:
        self.registry.register(_StateCollector(coord))

    def on_commit(
        self,
        events: Iterable[Event],
        task_changes: dict[str, dict[str, Any]],
        attempts: Iterable[dict[str, Any]],
    ) -> None:
        kinds: Tally[str] = Tally()
        points = 0
        for ev in events:
            kind = type(ev).__struct_config__.tag
            kinds[str(kind)] += 1
            if isinstance(ev, Metrics):
                points += sum(len(s.values) for s in ev.series.values())
            elif isinstance(ev, Finished):
                self.duration.observe(ev.duration_s)
        for kind, n in kinds.items():
            self.events.labels(kind).inc(n)
        if points:
            self.points.inc(points)
        for fields in task_changes.values():
            state = fields.get("state")
            if state in ENDED:
                self.finished.labels(state).inc()
        for row in attempts:
            if row.get("state") == "failed":
                self.failed_attempts.labels(row.get("reason") or "unknown").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read from the scheduler at scrape time."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    def collect(self) -> Iterator[Metric]:
        sched = self.coord.sched
        info = InfoMetricFamily("fleetd_build", "fleetd's version")
        info.add_metric([], {"version": _version()})
        yield info
        tasks = GaugeMetricFamily("fleetd_tasks", "Tasks by state", labels=["state"])
        by_state = Tally(t.state for t in sched.tasks.values())
        for state in TASK_STATES:
            tasks.add_metric([state], by_state.get(state, 0))
        yield tasks
        pending = GaugeMetricFamily(
            "fleetd_tasks_pending", "Pending tasks by the kind of reason they wait", labels=["reason"]
        )
        reasons = Tally(
            (t.pending_reason or "none").split()[0] for t in sched.tasks.values() if t.state == "pending"
        )
        for reason, n in sorted(reasons.items()):
            pending.add_metric([reason], n)
        yield pending
        missions = GaugeMetricFamily("fleetd_missions", "Missions by state", labels=["state"])
        for state, n in sorted(Tally(ms.state for ms in sched.missions.values()).items()):
            missions.add_metric([state], n)
        yield missions
        now = time.time()
        idle = GaugeMetricFamily(
            "fleetd_running_mission_idle_seconds",
            "Seconds since the quietest running mission's last event (0 with none running)",
        )
        running = [mid for mid, ms in sched.missions.items() if ms.state == "running"]
        idle.add_metric([], max((now - self.coord.last_progress.get(m, now) for m in running), default=0.0))
        yield idle
        workers = self.coord.workers_view()
        alive = GaugeMetricFamily(
            "fleetd_workers", "Workers whose lease holds, by liveness", labels=["alive"]
        )
        alive.add_metric(["true"], sum(w["alive"] for w in workers))
        alive.add_metric(["false"], sum(not w["alive"] for w in workers))
        yield alive
        yield from _gpu_families(workers)
        reconnects = CounterMetricFamily("fleetd_nats_reconnects", "Reconnects of fleetd's NATS connection")
        reconnects.add_metric([], self.coord.nc.stats.get("reconnects", 0))
        yield reconnects


def _gpu_families(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    labels = ["gpu_uuid", "model"]
    total = GaugeMetricFamily("fleetd_gpu_memory_total_bytes", "GPU memory", labels=labels)
    used = GaugeMetricFamily(
        "fleetd_gpu_memory_used_bytes", "GPU memory in use, other processes included (NVML)", labels=labels
    )
    util = GaugeMetricFamily("fleetd_gpu_utilization_ratio", "GPU utilisation, 0-1 (NVML)", labels=labels)
    for w in workers:
        if not w["gpu_uuid"] or not w["alive"]:
            continue
        key = [w["gpu_uuid"], w["gpu_name"]]
        total.add_metric(key, w["total_bytes"])
        used.add_metric(key, w["total_bytes"] - w["free_bytes"])
        if w.get("utilization") is not None:
            util.add_metric(key, w["utilization"])
    yield from (total, used, util)

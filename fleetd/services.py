"""Mission B's reactive services: the drift monitor and the canary gate (BEM_SPEC.md section 7).

Each is its own durable consumer of FLEET_EVENTS, so it resumes where it stopped and never slows the
recorder. A learner streams its checks as metric points: `drift/<signal>` (kl_per_token,
param_distance, sigma_max, probe_drop, grad_norm; one point per signal at the check's step) and
`canary/prompts_since_promotion` then `canary/pass_rate` at the same step, optionally with
`canary/min_prompts` (the learner's declared minimum of prompts between promotions; 1,000 otherwise).
The services apply the rules
of `stats.promotion` per (task, attempt), store every decision that acts (rollback, promote) in
`service_decisions` with its reason, then command the worker running the task and store its
acknowledgement. The key (task, attempt, service, step) makes a replayed event a no-op, so a restart
never sends a command twice.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg

from fleet import bus
from schemas import messages as m
from stats.promotion import LearnerWatch, drift_level

log = structlog.get_logger("fleetd.services")
COMMAND_TIMEOUT_S = 35.0  # the worker waits up to 30 s for the job's step boundary


@dataclass
class TaskWatch(LearnerWatch):
    prompts: dict[int, float] = field(default_factory=dict)  # step -> prompts since the last promotion


@dataclass(frozen=True)
class Action:
    service: str
    step: int
    decision: str  # rollback | promote
    level: str
    value: float
    reason: str


def drift_checks(ev: m.Metrics) -> dict[int, dict[str, float]]:
    """The batch's drift/* points grouped by step: one check per step."""
    checks: dict[int, dict[str, float]] = {}
    for name, series in ev.series.items():
        if name.startswith("drift/"):
            for step, value in zip(series.steps, series.values, strict=True):
                checks.setdefault(step, {})[name.removeprefix("drift/")] = value
    return checks


def drift_actions(watch: TaskWatch, ev: m.Metrics) -> list[Action]:
    checks = drift_checks(ev)
    out = []
    for step in sorted(checks):
        level, why = watch.on_drift(checks[step])
        if why is not None:
            out.append(Action("drift", step, "rollback", level, max(checks[step].values()), why))
    return out


def canary_actions(watch: TaskWatch, ev: m.Metrics) -> list[Action]:
    """A learner reports prompts_since_promotion before (or with) each pass rate; batches may split
    them, so the latest count is kept per task."""
    minimum = ev.series.get("canary/min_prompts")
    if minimum is not None and minimum.values:
        watch.gate.min_prompts = int(minimum.values[-1])
    since = ev.series.get("canary/prompts_since_promotion")
    if since is not None:
        watch.prompts.update(zip(since.steps, since.values, strict=True))
    rates = ev.series.get("canary/pass_rate")
    if rates is None:
        return []
    # A drift check at the same step travels in the same batch (the learner sends them together);
    # judge it here rather than trust the drift monitor's consumer to have read it already.
    same_step = {step: drift_level(signals)[0] for step, signals in drift_checks(ev).items()}
    out = []
    for step, rate in zip(rates.steps, rates.values, strict=True):
        prompts = watch.prompts.get(step, max(watch.prompts.values(), default=0.0))
        decision, why, level = watch.on_canary(rate, int(prompts), same_step.get(step))
        if decision in ("rollback", "promote"):
            out.append(Action("canary", step, decision, level, rate, why))
    return out


class Services:
    """Both services; the coordinator starts `run` in its task group."""

    def __init__(
        self,
        js: Any,
        nc: Any,
        write: Callable[..., Awaitable[Any]],
        record: Callable[[dict[str, Any]], bool],
        ack: Callable[[tuple[str, int, str, int], bool, str], None],
    ) -> None:
        self.js, self.nc, self.write, self.record, self.ack = js, nc, write, record, ack
        self.watches: dict[tuple[str, int], TaskWatch] = {}

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._consume, "svc-drift", drift_actions)
            tg.start_soon(self._consume, "svc-canary", canary_actions)

    async def _consume(self, name: str, rule: Callable[[TaskWatch, m.Metrics], list[Action]]) -> None:
        sub = await self.js.pull_subscribe(
            "fleet.evt.*.*.metrics", durable=name, stream=bus.EVENTS_STREAM, config=bus.service_consumer(name)
        )
        while True:
            try:
                msgs = await sub.fetch(200, timeout=1.0)
            except bus.FETCH_EMPTY:
                continue
            except (nats.errors.Error, OSError) as e:
                log.warning("service_fetch_failed", service=name, error=repr(e))
                await anyio.sleep(0.5)
                continue
            for msg in msgs:
                await self._handle(msg, rule)

    async def _handle(self, msg: Msg, rule: Callable[[TaskWatch, m.Metrics], list[Action]]) -> None:
        try:
            ev = m.decode_event(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            await msg.ack()  # the recorder dead-letters malformed events; nothing to decide on
            return
        if isinstance(ev, m.Metrics) and any(k.startswith(("drift/", "canary/")) for k in ev.series):
            watch = self.watches.setdefault((ev.task_id, ev.attempt), TaskWatch())
            for action in rule(watch, ev):
                await self._act(ev, action)
        await msg.ack()

    async def _act(self, ev: m.Metrics, action: Action) -> None:
        row = {
            "mission_id": ev.mission_id, "task_id": ev.task_id, "attempt": ev.attempt,
            "service": action.service, "step": action.step, "decision": action.decision,
            "level": action.level, "value": action.value, "reason": action.reason, "acked": None,
            "detail": None, "decided_at": time.time(),
        }  # fmt: skip
        if not await self.write(self.record, row):
            return  # decided before a restart: the command went out then
        log.warning(
            "service_decision",
            task=ev.task_id,
            **{k: row[k] for k in ("service", "step", "decision", "reason")},
        )
        self._tg.start_soon(self._command, ev, action)

    async def _command(self, ev: m.Metrics, action: Action) -> None:
        cmd = m.Command(action=action.decision, task_id=ev.task_id, attempt=ev.attempt)  # type: ignore[arg-type]
        try:
            reply = await self.nc.request(
                bus.cmd_subject(ev.worker), m.encode(cmd), timeout=COMMAND_TIMEOUT_S
            )
            ack = msgspec.json.decode(reply.data, type=m.CommandAck)
            acked, detail = ack.ok, ack.detail
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as e:
            acked, detail = False, f"no acknowledgement: {e!r}"
        await self.write(self.ack, (ev.task_id, ev.attempt, action.service, action.step), acked, detail)
        log.info("service_command", task=ev.task_id, decision=action.decision, acked=acked, detail=detail)

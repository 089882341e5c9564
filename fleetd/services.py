"""The reactive services' host: missions register services, fleetd runs them on their tasks' metrics.

A service is registered by name in `fleet.registry.SERVICES` as a class with `from_config(table)` (the
mission's `[services.NAME]` table, validated at submit) and, per watched task attempt, an instance
whose `observe(series)` turns one batch of metric points into actions (`Watch` below). Mission B's
`promotion` service (`stats.promotion`) is the drift monitor and the canary gate: its actions are
rollback and promote. Mission C's `overlay` service (`stats.overlay`) raises a task's knob κ when its
red-team violation rate spikes.

Each service is its own durable consumer of FLEET_EVENTS (`svc-<name>`), so it resumes where it
stopped and never slows the recorder. A task is watched by the services its stage names; the
mission's expansion copies their tables into the task's `params["services"]`. Every action is stored
in `service_decisions` with its reason before the command goes to the worker running the task, and the
worker's acknowledgement is stored after. The key (task, attempt, service, step) makes a replayed
event a no-op, so a restart never sends a command twice.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg

from fleet import bus, registry
from schemas import messages as m

log = structlog.get_logger("fleetd.services")
COMMAND_TIMEOUT_S = 35.0  # the worker waits up to 30 s for the job's step boundary


class Action(Protocol):
    service: str  # the part of the service that decided (the name stored in service_decisions)
    step: int
    decision: str  # a command the worker passes to the task: rollback, promote, raise (κ)
    level: str
    value: float  # what the decision saw (a drift signal, a pass rate), or the knob's new κ
    reason: str


class Watch(Protocol):
    def observe(self, series: Mapping[str, Sequence[tuple[int, float]]]) -> Sequence[Action]: ...


def watch_factory(name: str) -> Callable[[Mapping[str, Any]], Watch]:
    """The registered service's `from_config`: validates a config table and returns a fresh watch."""
    factory: Callable[[Mapping[str, Any]], Watch] = registry.resolve(registry.SERVICES[name]).from_config
    return factory


def points(ev: m.Metrics) -> dict[str, list[tuple[int, float]]]:
    return {name: list(zip(s.steps, s.values, strict=True)) for name, s in ev.series.items()}


class Services:
    """Every registered service; the coordinator starts `run` in its task group."""

    def __init__(
        self,
        js: Any,
        nc: Any,
        write: Callable[..., Awaitable[Any]],
        record: Callable[[dict[str, Any]], bool],
        ack: Callable[[tuple[str, int, str, int], bool, str], None],
        configs: Callable[[str], Mapping[str, Any] | None],
        decided: Callable[[dict[str, Any]], None] = lambda row: None,
    ) -> None:
        """`configs(task_id)`: the task's service tables (its `params["services"]`), or None;
        `decided(row)`: told of each new decision once it is stored (notifications)."""
        self.js, self.nc, self.write, self.record, self.ack = js, nc, write, record, ack
        self.configs, self.decided = configs, decided
        self.watches: dict[tuple[str, str, int], Watch] = {}  # (service, task, attempt)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for name in registry.SERVICES:
                tg.start_soon(self._consume, name)

    async def _consume(self, name: str) -> None:
        durable = f"svc-{name}"
        config = bus.service_consumer(durable)
        sub = await bus.durable_pull(self.js, "fleet.evt.*.*.metrics", bus.EVENTS_STREAM, config)
        factory = watch_factory(name)
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
                await self._handle(name, factory, msg)

    async def _handle(self, name: str, factory: Callable[[Mapping[str, Any]], Watch], msg: Msg) -> None:
        try:
            ev = m.decode_event(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            await msg.ack()  # the recorder dead-letters malformed events; nothing to decide on
            return
        config = self._config(name, ev.task_id) if isinstance(ev, m.Metrics) else None
        if isinstance(ev, m.Metrics) and config is not None:
            key = (name, ev.task_id, ev.attempt)
            try:
                if key not in self.watches:
                    self.watches[key] = factory(config)
                actions = self.watches[key].observe(points(ev))
            except (ValueError, TypeError, msgspec.ValidationError) as e:
                # Points the service cannot judge (say, a drift signal it has no levels for): a task's
                # mistake, logged with the reason; it must not stop the service for every other task.
                log.warning("service_cannot_judge", service=name, task=ev.task_id, error=str(e))
                actions = []
            for action in actions:
                await self._act(ev, action)
        await msg.ack()

    def _config(self, name: str, task_id: str) -> Mapping[str, Any] | None:
        """This service's table for the task, if the task's stage named the service."""
        tables = self.configs(task_id)
        config = tables.get(name) if isinstance(tables, Mapping) else None
        return config if isinstance(config, Mapping) else None

    async def _act(self, ev: m.Metrics, action: Action) -> None:
        row = {
            "mission_id": ev.mission_id, "task_id": ev.task_id, "attempt": ev.attempt,
            "service": action.service, "step": action.step, "decision": action.decision,
            "level": action.level, "value": action.value, "reason": action.reason, "acked": None,
            "detail": None, "decided_at": time.time(),
        }  # fmt: skip
        if not await self.write(self.record, row):
            return  # decided before a restart: the command went out then
        self.decided(row)
        log.warning(
            "service_decision",
            task=ev.task_id,
            **{k: row[k] for k in ("service", "step", "decision", "reason")},
        )
        value = action.value if action.decision in ("knob", "raise") else None
        cmd = m.Command(action=action.decision, task_id=ev.task_id, attempt=ev.attempt, value=value)  # type: ignore[arg-type]
        self._tg.start_soon(self.command, ev.worker, cmd, action.service, action.step)

    async def command(self, worker: str, cmd: m.Command, service: str, step: int) -> tuple[bool, str]:
        """Send one command to the worker running its task, wait for the task's acknowledgement and
        store it on the decision's row."""
        try:
            reply = await self.nc.request(bus.cmd_subject(worker), m.encode(cmd), timeout=COMMAND_TIMEOUT_S)
            ack = msgspec.json.decode(reply.data, type=m.CommandAck)
            acked, detail = ack.ok, ack.detail
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as e:
            acked, detail = False, f"no acknowledgement: {e!r}"
        await self.write(self.ack, (cmd.task_id, cmd.attempt, service, step), acked, detail)
        log.info("service_command", task=cmd.task_id, decision=cmd.action, acked=acked, detail=detail)
        return acked, detail

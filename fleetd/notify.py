"""Notifications (`[notify]` in fleetd.toml): a webhook, a command, or both, when a mission ends, a
service rolls a task back, or something is dead-lettered.

The coordinator only queues a note (`Notifier.note`, never awaited on its paths); a task of its own
sends each one with retries and backoff. A full queue drops the note, and a note that fails every
attempt is logged; both are counted in `/metrics` (`fleetd_notifications_total{channel,outcome}`), so
a broken webhook never blocks or slows the coordinator.

The webhook gets the note as a JSON POST. The command gets it as JSON on stdin, with `FLEET_EVENT`,
`FLEET_MISSION` and `FLEET_VERDICT` in its environment; it succeeds with exit status 0.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import aiohttp
import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client import CollectorRegistry, Counter

from fleet.config import NotifyConfig

log = structlog.get_logger("fleetd.notify")


class Notifier:
    def __init__(self, cfg: NotifyConfig, registry: CollectorRegistry) -> None:
        self.cfg = cfg
        self.page = ""  # the page's base URL, once the web server listens (links in the notes)
        self.sent = Counter(
            "fleetd_notifications",
            "Notifications by channel (webhook, command) and outcome (sent, failed, dropped)",
            ["channel", "outcome"],
            registry=registry,
        )
        for channel in self.channels():
            for outcome in ("sent", "failed", "dropped"):
                self.sent.labels(channel, outcome)
        self._send: MemoryObjectSendStream[dict[str, Any]]
        self._receive: MemoryObjectReceiveStream[dict[str, Any]]
        self._send, self._receive = anyio.create_memory_object_stream(cfg.queue)

    def channels(self) -> list[str]:
        return [c for c, on in (("webhook", self.cfg.webhook), ("command", self.cfg.command)) if on]

    def note(self, event: str, mission: str | None = None, **detail: Any) -> None:
        """Queue a note, if it is configured for `event`; never blocks."""
        if event not in self.cfg.on or not self.channels():
            return
        body = {
            "event": event,
            "mission": mission,
            "link": f"{self.page}/missions/{mission}" if self.page and mission else self.page or None,
            "at": time.time(),
            **detail,
        }
        try:
            self._send.send_nowait(body)
        except anyio.WouldBlock:
            for channel in self.channels():
                self.sent.labels(channel, "dropped").inc()
            log.warning("notification_dropped", event_=event, mission=mission, queue=self.cfg.queue)

    async def run(self) -> None:
        """Send each note on each channel, one note at a time, in order."""
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, self._receive:
            async for body in self._receive:
                if self.cfg.webhook:
                    await self._deliver("webhook", body, lambda b=body: self._post(session, b))
                if self.cfg.command:
                    await self._deliver("command", body, lambda b=body: self._run(b))

    async def _deliver(self, channel: str, body: dict[str, Any], send: Any) -> None:
        delay = self.cfg.backoff_s
        for attempt in range(1, self.cfg.attempts + 1):
            try:
                await send()
                self.sent.labels(channel, "sent").inc()
                return
            except Exception as e:  # any failure of the far end: retried, then logged, never raised
                error = repr(e)
            if attempt < self.cfg.attempts:
                await anyio.sleep(delay)
                delay *= 2
        self.sent.labels(channel, "failed").inc()
        log.warning(
            "notification_failed", channel=channel, event_=body["event"], mission=body["mission"], error=error
        )

    async def _post(self, session: aiohttp.ClientSession, body: dict[str, Any]) -> None:
        async with session.post(self.cfg.webhook, json=body) as r:
            if r.status >= 300:
                raise RuntimeError(f"webhook answered {r.status}")

    async def _run(self, body: dict[str, Any]) -> None:
        env = {
            **os.environ,
            "FLEET_EVENT": body["event"],
            "FLEET_MISSION": body["mission"] or "",
            "FLEET_VERDICT": str(body.get("verdict") or ""),
        }
        with anyio.fail_after(self.cfg.timeout_s):
            done = await anyio.run_process(
                self.cfg.command, input=json.dumps(body).encode(), env=env, check=False
            )
        if done.returncode != 0:
            raise RuntimeError(f"{self.cfg.command[0]} exited {done.returncode}: {done.stderr[-300:]!r}")

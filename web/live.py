"""Live updates for open pages: Server-Sent Events fed by the coordinator's commits.

Every transaction the coordinator commits (events from the bus, placements, decisions) becomes one
small "changed" note: which missions and tasks changed, which tasks got new metric points. A page
re-reads what it shows when a note concerns it, so what it draws is always what DuckDB holds. Notes
go out within milliseconds of the commit, well inside the 1 s from a worker's event to the page.

A slow browser never slows the coordinator: each client has a bounded queue, and a client that falls
behind gets one "resync" note (re-read everything) instead of the backlog.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
from aiohttp import web

from fleet.view import Commit, FleetView
from schemas import messages as m

QUEUE = 256
KEEPALIVE_S = 15.0
WORKERS_POLL_S = 1.0


class Hub:
    def __init__(self, fleet: FleetView) -> None:
        self.fleet = fleet
        self.clients: set[asyncio.Queue[dict[str, Any]]] = set()
        self.closing = False
        fleet.listeners.append(self.on_commit)

    def on_commit(self, commit: Commit) -> None:
        if not self.clients:
            return
        metrics = sorted({e.task_id for e in commit.events if isinstance(e, m.Metrics)})
        self.broadcast(
            {
                "type": "changed",
                "missions": sorted(commit.missions | {e.mission_id for e in commit.events}),
                "tasks": sorted(commit.tasks | {e.task_id for e in commit.events}),
                "metrics": metrics,
                "decided": commit.decided,
            }
        )

    def close(self) -> None:
        """End every open stream (fleetd is stopping): a browser holding one must not delay that."""
        self.closing = True
        for q in self.clients:
            while not q.empty():
                q.get_nowait()
            q.put_nowait({"type": "bye"})

    def broadcast(self, note: dict[str, Any]) -> None:
        for q in self.clients:
            try:
                q.put_nowait(note)
            except asyncio.QueueFull:
                while not q.empty():
                    q.get_nowait()
                q.put_nowait({"type": "resync"})

    async def watch_workers(self) -> None:
        """Heartbeats are not commits: tell pages when the workers' view changed."""
        last = None
        while True:
            await anyio.sleep(WORKERS_POLL_S)
            if not self.clients:
                continue
            view = [{k: v for k, v in w.items() if k != "age_s"} for w in self.fleet.workers_view()]
            if view != last:
                last = view
                self.broadcast({"type": "workers"})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a reverse proxy must not buffer the stream
            }
        )
        await resp.prepare(request)
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE)
        if self.closing:
            return resp
        self.clients.add(q)
        try:
            await resp.write(b"retry: 1000\n\n")
            while True:
                with anyio.move_on_after(KEEPALIVE_S) as scope:
                    note = await q.get()
                if scope.cancelled_caught:
                    await resp.write(b": keepalive\n\n")
                    continue
                if note["type"] == "bye":
                    break
                await resp.write(f"event: {note['type']}\ndata: {json.dumps(note)}\n\n".encode())
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            self.clients.discard(q)
        return resp

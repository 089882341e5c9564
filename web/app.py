"""fleetd's web page: the fleet, a mission, a task; a JSON API under /api/; SSE; /metrics; /healthz.

Served by fleetd itself on 127.0.0.1:8080 by default, from what the coordinator shows through
`fleet.view.FleetView` and its DuckDB file (reads on worker threads, each with its own cursor).
Every asset, the charting library included, is a file in web/static: nothing is fetched from the
network at page load.

Write actions (submit, cancel) go through the same control API as fleetctl. Who may ask what, the
Host check, the token and same-origin writes, is `web.guard`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from fleet.config import ConfigError, WebConfig
from fleet.creds import Actor
from fleet.view import FleetView
from schemas import messages as m
from web import queries
from web.guard import Guard, error
from web.live import Hub

log = structlog.get_logger("fleetd.web")
STATIC = Path(__file__).parent / "static"
MAX_CURVE_TASKS = 40  # lines on one mission chart; past that the chart says how many it left out
WEB = Actor(role="web", credential="token")  # the page's writes need its token: the audit names that
HTTP_STATUS = {"bad_request": 400, "invalid_spec": 400, "not_found": 404, "refused": 403}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


class Site:
    def __init__(self, fleet: FleetView, guard: Guard) -> None:
        self.fleet, self.guard = fleet, guard
        self.hub = Hub(fleet)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard.middleware])
        page = self._page
        app.add_routes(
            [
                web.get("/", page("fleet.html")),
                web.get("/missions/{mission_id}", page("mission.html")),
                web.get("/tasks/{mission_id}/{name}", page("task.html")),
                web.get("/compare", page("compare.html")),
                web.static("/static", STATIC),
                web.get("/api/fleet", self.overview),
                web.get("/api/missions", self.missions),
                web.post("/api/missions", self.submit),
                web.get("/api/missions/{mission_id}", self.mission),
                web.get("/api/missions/{mission_id}/curves", self.mission_curves),
                web.get("/api/missions/{mission_id}/lengths", self.mission_lengths),
                web.post("/api/missions/{mission_id}/cancel", self.cancel),
                web.get("/api/tasks/{mission_id}/{name}", self.task),
                web.get("/api/tasks/{mission_id}/{name}/curves", self.task_curves),
                web.post("/api/tasks/{mission_id}/{name}/cancel", self.cancel),
                web.get("/api/workers", self.workers),
                web.get("/api/compare", self.compare),
                web.get("/api/events", self.hub.stream),
                web.get("/metrics", self.metrics),
                web.get("/healthz", self.healthz),
            ]
        )
        return app

    def _page(self, name: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(STATIC / name)

        return handler

    # ---- JSON API -------------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        """Everything the fleet page shows: workers, the queue with reasons, dead letters, missions."""
        fleet = self.fleet
        queue = [t for t in fleet.task_views() if t["state"] in ("pending", "assigned", "running")]
        return _json(
            {
                "workers": fleet.workers_view(),
                "queue": queue[:500],
                "queue_total": len(queue),
                "recent": await fleet.read_sql(queries.recent_tasks),
                "dead_letters": await fleet.read_sql(queries.dead_letters),
                "missions": await self._missions(),
            }
        )

    async def missions(self, request: web.Request) -> web.Response:
        return _json(await self._missions())

    async def _missions(self) -> list[dict[str, Any]]:
        rows = await self.fleet.read_sql(queries.missions)
        for ms in rows:
            ms["tasks"] = self.fleet.counts(ms["mission_id"])
        return rows

    async def mission(self, request: web.Request) -> web.Response:
        fleet, mission_id = self.fleet, request.match_info["mission_id"]
        row = await fleet.read_sql(queries.mission_row, mission_id)
        if row is None:
            return error(404, "not_found", f"no mission {mission_id!r}")
        tasks = fleet.task_views(mission_id)
        row["tasks"] = tasks
        row["counts"] = fleet.counts(mission_id)
        row["arms"] = sorted({t["arm"] for t in tasks if t["arm"] is not None})
        row["seeds"] = sorted({t["seed"] for t in tasks if t["seed"] is not None})
        row["decisions"] = await fleet.read_sql(queries.decisions, mission_id)
        disk = await fleet.call("disk", msgspec.json.encode(m.IdRequest(id=mission_id)), WEB)
        row["disk"] = disk.data if disk.ok else None
        if row["sweep"]:  # the ranked trials and the winner, as `fleetctl sweep` shows them
            reply = await fleet.call("sweep", msgspec.json.encode(m.IdRequest(id=mission_id)), WEB)
            row["sweep"] = reply.data if reply.ok else None
        return _json(row)

    async def mission_curves(self, request: web.Request) -> web.Response:
        """One metric across the mission's tasks (the ones that ran, most recent first, up to 40)."""
        fleet, mission_id = self.fleet, request.match_info["mission_id"]
        ran = [t for t in fleet.task_views(mission_id) if t["state"] not in ("pending", "assigned")]
        shown = ran[-MAX_CURVE_TASKS:]
        names = await fleet.read_sql(queries.metric_names, [t["task_id"] for t in shown])
        metric = request.query.get("metric") or (names[0] if names else None)
        lines = await fleet.read_sql(
            queries.curves, [(t["task_id"], t["attempt"]) for t in shown], _points(request), metric
        )
        return _json(
            {
                "metric": metric,
                "metrics": names,
                "tasks": {t["task_id"]: {k: t[k] for k in ("name", "arm", "seed")} for t in shown},
                "lines": {tid: by_metric.get(metric or "", {}) for tid, by_metric in lines.items()},
                "left_out": len(ran) - len(shown),
            }
        )

    async def mission_lengths(self, request: web.Request) -> web.Response:
        """Scores by context length per arm (metrics named `<family>_<length>`, Mission E's)."""
        mission_id = request.match_info["mission_id"]
        return _json(await self.fleet.read_sql(queries.by_length, mission_id))

    async def task(self, request: web.Request) -> web.Response:
        task_id = _task_id(request)
        view = self.fleet.task_view(task_id)
        if view is None:
            return error(404, "not_found", f"no task {task_id!r}")
        detail = await self.fleet.read_sql(queries.task_detail, task_id)
        return _json({**view, **detail})

    async def task_curves(self, request: web.Request) -> web.Response:
        task_id = _task_id(request)
        view = self.fleet.task_view(task_id)
        if view is None:
            return error(404, "not_found", f"no task {task_id!r}")
        attempt = int(request.query.get("attempt", view["attempt"]))
        lines = await self.fleet.read_sql(queries.curves, [(task_id, attempt)], _points(request))
        return _json({"task_id": task_id, "attempt": attempt, "metrics": lines.get(task_id, {})})

    async def workers(self, request: web.Request) -> web.Response:
        return _json(self.fleet.workers_view())

    async def compare(self, request: web.Request) -> web.Response:
        """`fleetctl compare`'s answer for ?a=MISSION&b=MISSION[&metric=M]."""
        q = request.query
        try:
            req = msgspec.convert(
                {"a": q.get("a", ""), "b": q.get("b", ""), "metric": q.get("metric") or None},
                m.CompareRequest,
            )
        except msgspec.ValidationError as e:
            return error(400, "bad_request", f"compare: ?a=MISSION&b=MISSION: {e}")
        return self._reply(await self.fleet.call("compare", msgspec.json.encode(req), WEB))

    async def submit(self, request: web.Request) -> web.Response:
        try:
            req = msgspec.json.decode(await request.read(), type=m.SubmitRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            return error(400, "bad_request", f"submit: {e}")
        return self._reply(await self.fleet.call("submit", msgspec.json.encode(req), WEB))

    async def cancel(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name")
        target = _task_id(request) if name else request.match_info["mission_id"]
        return self._reply(await self.fleet.call("cancel", msgspec.json.encode(m.IdRequest(id=target)), WEB))

    def _reply(self, reply: m.Reply) -> web.Response:
        if reply.ok:
            return _json(reply.data)
        assert reply.error is not None
        return error(HTTP_STATUS.get(reply.error.code, 500), reply.error.code, reply.error.message)

    # ---- operations -----------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.fleet.metrics_exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        """200 when NATS, JetStream and DuckDB answer and at least one worker holds its lease."""
        checks = await self.fleet.health()
        alive = sum(w["alive"] for w in self.fleet.workers_view())
        ok = all(checks.values())
        return _json({"ok": ok, "checks": checks, "workers_alive": alive}, 200 if ok else 503)


def _task_id(request: web.Request) -> str:
    return f"{request.match_info['mission_id']}/{request.match_info['name']}"


def _points(request: web.Request) -> int:
    try:
        return max(10, min(int(request.query.get("points", 400)), 5000))
    except ValueError:
        return 400


async def serve(
    fleet: FleetView,
    cfg: WebConfig,
    token: str,
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status` gets the page's URL once it listens."""
    site = Site(fleet, Guard(cfg, token))
    # A stop must not wait for open pages: their streams are ended first, the rest gets 3 s.
    runner = web.AppRunner(site.app(), access_log=None, handle_signals=False, shutdown_timeout=3.0)
    await runner.setup()
    try:
        tcp = web.TCPSite(runner, cfg.host, cfg.port)
        try:
            await tcp.start()
        except OSError as e:
            raise ConfigError(
                f"web: cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); set web.port or --web-port"
            ) from None
        host, port = runner.addresses[0][:2]
        site.guard.listening(port)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        log.info("web_ready", url=url)
        task_status.started(url)
        await site.hub.watch_workers()
    finally:
        site.hub.close()
        with anyio.CancelScope(shield=True):
            await runner.cleanup()

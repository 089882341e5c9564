"""The web side of a real fleetd (real nats-server, DuckDB, workers): the JSON API, the token on write
actions, /metrics through prometheus-client's parser, /healthz when nats-server stops, the SSE feed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.config import ConfigError, WebConfig
from tests.fleet.conftest import REPO, Fleet, sql, wait_for, wait_mission
from web.guard import configured_token, web_token

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


def http(
    url: str,
    body: Any = None,
    token: str | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def test_api_token_metrics_and_health(fleet: Fleet) -> None:
    fleet.env["FLEET_WEB_TOKEN"] = TOKEN
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.wait_workers(1)
    web = fleet.web_url()
    assert web.startswith("http://127.0.0.1:")

    status, health = http(f"{web}/healthz")
    assert status == 200 and health["checks"] == {
        "nats": True,
        "jetstream": True,
        "duckdb": True,
        "workers": True,
    }

    # Reads need the token too (only /healthz and /metrics are open by default).
    assert http(f"{web}/api/missions")[0] == 401 and http(f"{web}/api/fleet", token="wrong")[0] == 401
    # Another host name (DNS rebinding) is not answered at all, token or not.
    assert http(f"{web}/api/missions", token=TOKEN, headers={"Host": "evil.example"})[0] == 421
    assert http(f"{web}/healthz", headers={"Host": "evil.example:80"})[0] == 421
    # Write actions: refused without the token, with a wrong one, as a form, and from another
    # origin; nothing is created.
    request = {"mission": "selftest", "profile": "quick"}
    assert http(f"{web}/api/missions", request)[0] == 401
    assert http(f"{web}/api/missions", request, token="wrong")[0] == 401
    form = http(f"{web}/api/missions", b"mission=selftest", token=TOKEN, content_type="text/plain")
    assert form[0] == 415
    cross = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert http(f"{web}/api/missions", request, token=TOKEN, headers=cross)[0] == 403
    assert http(f"{web}/api/missions", token=TOKEN)[1] == []
    # The sign-in link sets the token as a cookie, which then serves for reads.
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with pytest.raises(urllib.error.HTTPError, match="401"):
        opener.open(f"{web}/?token=wrong", timeout=10)
    with opener.open(f"{web}/?token={TOKEN}", timeout=10) as r:
        assert r.status == 200 and "token=" not in r.url  # redirected to the page, token dropped
    with opener.open(f"{web}/api/missions", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read()) == []
    status, bad = http(f"{web}/api/missions", {"mission": "no_such_mission"}, token=TOKEN)
    assert (
        status == 400
        and bad["error"]["code"] == "invalid_spec"
        and "no_such_mission" in bad["error"]["message"]
    )
    status, sub = http(f"{web}/api/missions", request, token=TOKEN)
    assert status == 200, sub
    mission = sub["mission_id"]

    st = wait_mission(fleet, mission, timeout=150)
    assert st["missions"][0]["state"] == "succeeded"
    status, ms = http(f"{web}/api/missions/{mission}", token=TOKEN)
    assert status == 200 and ms["state"] == "succeeded" and ms["arms"] == ["a", "b"] and ms["seeds"] == [1, 2]
    assert {d["gate"] for d in ms["decisions"]} == {"b_beats_a", "b_level_sane", "verdict"}
    assert len(ms["tasks"]) == len(sub["tasks"]) and all(t["state"] == "succeeded" for t in ms["tasks"])
    task = next(t["task_id"] for t in ms["tasks"] if t["name"] == "crash")
    status, detail = http(f"{web}/api/tasks/{task}", token=TOKEN)
    assert status == 200 and [a["state"] for a in detail["attempts"]] == ["failed", "succeeded"]
    assert "crashing on attempt 1" in "\n".join(line["line"] for line in detail["log_tail"])
    status, curves = http(f"{web}/api/tasks/{task}/curves?points=10", token=TOKEN)
    assert status == 200 and 0 < len(curves["metrics"]["crash/loss"]["step"]) <= 10
    # The mission page opens on the training loss with the most points, not on a one-point metric.
    status, mc = http(f"{web}/api/missions/{mission}/curves?points=50", token=TOKEN)
    counts = {r["name"]: r["n"] for r in sql(fleet, "SELECT name, count(*) AS n FROM metrics GROUP BY name")}
    losses = {n: c for n, c in counts.items() if "loss" in n}
    most = max(losses.values())
    assert status == 200 and mc["metric"] == mc["metrics"][0] == min(n for n in losses if losses[n] == most)
    assert sorted(mc["metrics"]) == sorted(counts)
    # Scores by length: behind the token like every read; none for a mission that scores no lengths.
    assert http(f"{web}/api/missions/{mission}/lengths")[0] == 401
    assert http(f"{web}/api/missions/{mission}/lengths", token=TOKEN) == (200, {})
    assert http(f"{web}/api/tasks/{mission}/nope", token=TOKEN)[0] == 404
    assert http(f"{web}/api/missions/nope", token=TOKEN)[0] == 404
    workers = http(f"{web}/api/workers", token=TOKEN)[1]
    assert [w["worker"] for w in workers] == ["w0"]
    fleet_page = http(f"{web}/api/fleet", token=TOKEN)[1]
    assert fleet_page["queue"] == [] and {t["task_id"] for t in fleet_page["recent"]} <= set(sub["tasks"])

    # /metrics parses with prometheus-client's own parser and follows the naming rules.
    status, text = http(f"{web}/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(name.startswith("fleetd_") for name in families)
    for f in families.values():
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), f.name
        assert not any("task_id" in s.labels for s in f.samples), f.name
    tasks = {s.labels["state"]: s.value for s in families["fleetd_tasks"].samples}
    assert tasks["succeeded"] == len(sub["tasks"]) and tasks["pending"] == 0
    finished = {s.labels["state"]: s.value for s in families["fleetd_tasks_finished"].samples}
    assert finished["succeeded"] == len(sub["tasks"])
    failed = {s.labels["reason"]: s.value for s in families["fleetd_task_attempts_failed"].samples}
    # flaky-s1, flaky-s2, crash: once each; every other reason is there from the start, at 0
    assert failed == {"error": 2.0, "crash": 1.0, "oom": 0.0, "timeout": 0.0, "cancelled": 0.0, "infra": 0.0}
    assert {s.labels["alive"]: s.value for s in families["fleetd_workers"].samples} == {"true": 1, "false": 0}
    assert [s.labels["version"] for s in families["fleetd_build_info"].samples]
    assert not any(
        name.endswith("_created") for f in families.values() for name in (s.name for s in f.samples)
    )

    # /healthz turns unhealthy while nats-server is down, and healthy again after it is back.
    fleet.server.stop()
    status, health = wait_for(lambda: (r := http(f"{web}/healthz"))[0] == 503 and r, 20, "/healthz to fail")
    assert health["checks"]["nats"] is False and health["checks"]["duckdb"] is True
    fleet.server.start()
    wait_for(lambda: http(f"{web}/healthz")[0] == 200, 30, "/healthz to recover")


def test_live_feed_tells_the_page_within_a_second(fleet: Fleet) -> None:
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.wait_workers(1)
    web = fleet.web_url()
    notes: list[tuple[float, dict[str, Any]]] = []
    stop = threading.Event()

    token = fleet.web_token()  # none configured: the one fleetd generated into the home

    def listen() -> None:
        feed = urllib.request.Request(f"{web}/api/events", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(feed, timeout=60) as r:
            event = None
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "changed":
                    notes.append((time.time(), json.loads(line.split(":", 1)[1])))
                if stop.is_set():
                    return

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(0.5)
    status, sub = http(f"{web}/api/missions", {"mission": "selftest", "profile": "quick"}, token=token)
    assert status == 200
    mission = sub["mission_id"]
    wait_mission(fleet, mission, timeout=150)
    stop.set()
    rows = sql(fleet, f"SELECT task_id, kind, ts FROM events WHERE mission_id = '{mission}'")
    finished = [r for r in rows if r["kind"] == "finished"]
    assert finished
    for ev in finished:  # the worker's own clock (same box): event -> note on the page's feed
        seen = [t for t, n in notes if ev["task_id"] in n["tasks"] and t >= ev["ts"]]
        assert seen and seen[0] - ev["ts"] < 1.0, (ev, seen[:1])
    assert any(n.get("decided") == mission for _, n in notes)


def test_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"web\.token_file or FLEET_WEB_TOKEN"):
        configured_token(WebConfig(host="0.0.0.0"), env={})
    assert configured_token(WebConfig(host="0.0.0.0"), env={"FLEET_WEB_TOKEN": "t"}) == "t"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert configured_token(WebConfig(host="0.0.0.0", token_file=str(token_file)), env={}) == "from-file"
    assert configured_token(WebConfig(), env={}) is None
    # On loopback without one, a token is made on first start: private to the fleet's user, stable.
    made = web_token(WebConfig(), tmp_path, env={})
    assert len(made) >= 40 and (tmp_path / "web-token").stat().st_mode & 0o777 == 0o600
    assert web_token(WebConfig(), tmp_path, env={}) == made
    assert web_token(WebConfig(), tmp_path, env={"FLEET_WEB_TOKEN": "t"}) == "t"
    # And fleetd itself refuses to start that way, naming the setting.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetd",
            "--home",
            str(tmp_path / "h"),
            "run",
            "--nats",
            "nats://127.0.0.1:1",
        ],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "FLEET_WEB_HOST": "0.0.0.0", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "web.host = '0.0.0.0'" in proc.stderr, proc.stderr
    assert not (tmp_path / "h" / "fleet.duckdb").exists()  # refused before anything was created


def test_an_open_page_does_not_hold_up_a_stop(fleet: Fleet) -> None:
    fleet.start_fleetd()
    web = fleet.web_url()
    feed = urllib.request.Request(
        f"{web}/api/events", headers={"Authorization": f"Bearer {fleet.web_token()}"}
    )
    stream = urllib.request.urlopen(feed, timeout=30)
    assert stream.readline().startswith(b"retry:")
    assert fleet.fleetd is not None
    started = time.monotonic()
    fleet.fleetd.terminate()
    fleet.fleetd.wait(timeout=30)
    assert time.monotonic() - started < 10  # was the HTTP server's 60 s shutdown wait
    assert fleet.fleetd.returncode == 0
    stream.close()

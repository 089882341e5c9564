"""Notifications through a real fleet (`[notify]`): a webhook caught by a local HTTP server and a
command, on a mission's end and a dead letter; retried through the webhook's failures; and a webhook
that never answers costs the coordinator nothing but a counted failure."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet import bus, creds
from tests.fleet.conftest import Fleet, status, submit, wait_for, wait_mission

pytestmark = pytest.mark.slow


class Hook:
    """A local webhook: records each JSON body, answering 500 to the first `fail` requests."""

    def __init__(self, fail: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.requests = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.requests += 1
                failing = hook.requests <= fail
                if not failing:
                    hook.bodies.append(body)
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, event: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b["event"] == event]


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook(fail=2)
    yield h
    h.server.shutdown()


def metric(fleet: Fleet, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{fleet.web_url()}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_a_mission_end_and_a_dead_letter_reach_the_webhook_and_the_command(
    fleet: Fleet, hook: Hook, tmp_path: Path
) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    script = tmp_path / "notify.sh"
    script.write_text(f'#!/bin/sh\ncat > "{notes}/$FLEET_EVENT-$FLEET_VERDICT-$$.json"\n')
    fleet.env.update(
        {
            "FLEET_NOTIFY_WEBHOOK": hook.url,
            "FLEET_NOTIFY_COMMAND": f"sh,{script}",
            "FLEET_NOTIFY_BACKOFF_S": "0.05",
        }
    )
    fleet.start_with_workers("w0")
    mission = submit(fleet, "selftest", "quick")
    st = wait_mission(fleet, mission, timeout=120)
    assert st["missions"][0]["verdict"] == "promote"
    end = wait_for(lambda: hook.of("mission_end"), 30, "the mission's end at the webhook")[0]
    assert end["mission"] == mission and end["state"] == "succeeded" and end["verdict"] == "promote"
    assert end["reason"] == st["missions"][0]["reason"]
    assert end["link"] == f"{fleet.web_url()}/missions/{mission}"
    assert hook.requests >= 3  # the first two answers were 500s: the note went through on a retry
    ran = wait_for(lambda: list(notes.glob("mission_end-promote-*.json")), 30, "the command's note")
    assert json.loads(ran[0].read_text())["mission"] == mission

    async def poison() -> None:
        nc = await bus.connect(fleet.url, "poison", creds.seed_path(fleet.home, "worker"))
        await nc.jetstream().publish("fleet.evt.m.t.metrics", b"{not json", timeout=5)
        await nc.close()

    anyio.run(poison)
    dead = wait_for(lambda: hook.of("dead_letter"), 30, "the dead letter at the webhook")[0]
    assert dead["subject"] == "fleet.evt.m.t.metrics" and "malformed event" in dead["reason"]
    assert metric(fleet, "fleetd_notifications_total", channel="webhook", outcome="sent") == 2
    assert metric(fleet, "fleetd_notifications_total", channel="webhook", outcome="failed") == 0


def test_a_webhook_that_never_answers_is_counted_and_holds_nothing_up(fleet: Fleet) -> None:
    fleet.env.update(
        {
            "FLEET_NOTIFY_WEBHOOK": "http://127.0.0.1:9/nobody-listens",  # the discard port: refused
            "FLEET_NOTIFY_ATTEMPTS": "3",
            "FLEET_NOTIFY_BACKOFF_S": "0.2",
        }
    )
    fleet.start_with_workers("w0")
    first = submit(fleet, "selftest", "quick")
    wait_mission(fleet, first, timeout=120)
    began = time.monotonic()
    second = submit(fleet, "selftest", "quick")  # while the first note is still being retried
    assert time.monotonic() - began < 5 and status(fleet, second)["missions"][0]["state"] == "running"
    wait_mission(fleet, second, timeout=120)
    wait_for(
        lambda: metric(fleet, "fleetd_notifications_total", channel="webhook", outcome="failed") == 2,
        30,
        "both notes to fail every attempt",
    )
    assert metric(fleet, "fleetd_notifications_total", channel="webhook", outcome="sent") == 0

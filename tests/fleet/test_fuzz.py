"""Fuzzing the doors with a real fleet: hypothesis throws malformed, oversized and wrongly typed
messages at every control verb (read off the coordinator, so a verb added later is covered without
editing this file), at every subject the coordinator and the workers consume, and random mission TOML
and overrides at submit.

Each message gets a clear error (a `Reply` with a known code, a `CommandAck` that says why) or a dead
letter; no process dies; a refused submit leaves no row. FLEET_FUZZ_SCALE multiplies the examples
(the counts tried are printed: `pytest -s tests/fleet/test_fuzz.py`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import bus, creds
from fleetd.coordinator import Coordinator
from schemas import messages as m
from schemas import missions as specs
from tests.fleet.conftest import Fleet, sql, wait_for

pytestmark = pytest.mark.slow
T = TypeVar("T")
SCALE = float(os.environ.get("FLEET_FUZZ_SCALE", "1"))
VERBS = sorted(name.removeprefix("ctl_") for name in dir(Coordinator) if name.startswith("ctl_"))
CLEAR = {"bad_request", "invalid_spec", "not_found", "refused"}  # "internal" is a bug, not an answer
# Every request struct's fields: the shapes a wrongly typed request takes.
FIELDS = sorted({f for s in vars(m).values() if isinstance(s, type) and s.__name__.endswith("Request")
                 for f in s.__struct_fields__})  # fmt: skip
EVENT_KINDS = ["started", "metrics", "progress", "log", "scores", "artifact", "finished", "failed"]
BASE_EVENT = {"kind": "finished", "mission_id": "m", "task_id": "m/t", "attempt": 1, "seq": 0,
              "worker": "w0", "ts": 0.0}  # fmt: skip


def examples(n: int) -> Any:
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=16,
)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def payloads(fields: list[str]) -> st.SearchStrategy[bytes]:
    """Malformed bytes, any JSON, the right field names with wrong values, and oversized bodies."""
    return st.one_of(
        st.binary(max_size=512),
        json_values.map(dumps),
        st.fixed_dictionaries({}, optional={f: json_values for f in fields}).map(dumps),
        st.sampled_from(fields).flatmap(
            lambda f: st.integers(64_000, 900_000).map(lambda n: dumps({f: "x" * n}))
        ),
    )


def wrongly_typed_event() -> st.SearchStrategy[bytes]:
    """A well-formed event with one base field's value made a list: valid JSON, never a valid event."""
    return st.tuples(st.sampled_from(EVENT_KINDS), st.sampled_from(sorted(BASE_EVENT))).map(
        lambda kf: dumps({**BASE_EVENT, "kind": kf[0], kf[1]: [BASE_EVENT[kf[1]]]})
    )


# ---- mission TOML: real files, mutated line by line ------------------------------------------------

LINES = (specs.MISSIONS_DIR / "selftest.toml").read_text().replace('"selftest"', '"fuzz"', 1).splitlines()
toml_values = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=20).map(json.dumps),
    st.sampled_from(['"../../etc"', '"a.b"', "[]", "{}", "true", '["arm", "seed"]', '"no.such"', "-1"]),
    st.text(max_size=30),  # not TOML at all
)


@st.composite
def mission_texts(draw: st.DrawFn) -> str:
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "revalue", "insert", "duplicate"]))
        if op == "delete":
            del lines[i]
        elif op == "revalue" and "=" in lines[i]:
            lines[i] = f"{lines[i].split('=', 1)[0]}= {draw(toml_values)}"
        elif op == "insert":
            key = draw(st.sampled_from(["name", "arms", "seeds", "kind", "after", "foreach", "q", "zz"]))
            lines.insert(i, f"{key} = {draw(toml_values)}")
        else:
            lines.insert(i, lines[i])
    return "\n".join(lines) + "\n"


override_keys = st.sampled_from(
    ["name", "arms", "seeds", "gates.q", "stages.sleep.kind", "stages.sleep.params", "profiles.quick.params",
     "defaults.timeout_s", "stages.nope.kind", "services.promotion", "a..b", "", "stages.0.name"]
)  # fmt: skip
overrides = st.dictionaries(override_keys | st.text(max_size=15), json_values, max_size=3)


# ---- the bus, as each role ------------------------------------------------------------------------


class Roles:
    """One connection per role on a loop of its own, so hypothesis' synchronous examples can use them."""

    def __init__(self, fleet: Fleet) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc = {
            role: self.run(bus.connect(fleet.url, f"fuzz-{role}", creds.seed_path(fleet.home, role)))
            for role in creds.ROLES
        }
        self.key = creds.read_identity(creds.seed_path(fleet.home, "client")).public_key

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        for nc in self.nc.values():
            self.run(nc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def control(self, verb: str, payload: bytes) -> m.Reply:
        msg = self.run(self.nc["client"].request(bus.ctl_subject(self.key, verb), payload, timeout=30))
        return msgspec.json.decode(msg.data, type=m.Reply)

    def dlq_messages(self) -> int:
        js = self.nc["coordinator"].jetstream(timeout=5)
        return int(self.run(js.stream_info(bus.DLQ_STREAM)).state.messages)


def check_clear(verb: str, reply: m.Reply, tried: Counter[str]) -> None:
    tried[f"ctl {verb}"] += 1
    if not reply.ok:
        assert reply.error is not None and reply.error.code in CLEAR, (verb, reply)
        assert reply.error.message.strip(), (verb, reply)


def test_every_door_answers_garbage_with_a_clear_error_or_a_dead_letter(fleet: Fleet, tmp_path: Path) -> None:
    missions = tmp_path / "missions"
    shutil.copytree(specs.MISSIONS_DIR, missions)
    fleet.env["FLEET_MISSIONS_DIR"] = str(missions)
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.wait_workers(1)
    roles = Roles(fleet)
    tried: Counter[str] = Counter()
    accepted: list[str] = []
    dead_before = {r["door"]: r["n"] for r in sql(fleet, DEAD_LETTERS)}
    dlq_before = roles.dlq_messages()
    try:
        # 1. Every control verb, and verbs that do not exist.
        @examples(300)
        @given(verb=st.sampled_from([*VERBS, "nosuch", "SUBMIT", "ctl_submit"]), payload=payloads(FIELDS))
        def control(verb: str, payload: bytes) -> None:
            reply = roles.control(verb, payload)
            check_clear(verb, reply, tried)
            if verb not in VERBS:
                assert not reply.ok and reply.error is not None and reply.error.code == "bad_request"
            if reply.ok and verb == "submit":
                accepted.append(reply.data["mission_id"])

        control()

        # 2. Random mission TOML and overrides at submit.
        @examples(120)
        @given(text=mission_texts(), extra=overrides, profile=st.sampled_from([None, "quick", "smoke", "x"]))
        def submit(text: str, extra: dict[str, Any], profile: str | None) -> None:
            (missions / "fuzz.toml").write_text(text)
            req = m.SubmitRequest(mission="fuzz", profile=profile, overrides=extra)
            reply = roles.control("submit", m.encode(req))
            check_clear("submit (mission TOML)", reply, tried)
            tried[
                "submit accepted" if reply.ok else f"submit refused: {reply.error and reply.error.code}"
            ] += 1
            if reply.ok:
                accepted.append(reply.data["mission_id"])
                cancel = roles.control("cancel", m.encode(m.IdRequest(id=reply.data["mission_id"])))
                assert cancel.ok, cancel

        submit()

        # 3. Events, as a worker would publish them: each is dead-lettered by the recorder.
        @examples(150)
        @given(
            kind=st.sampled_from(EVENT_KINDS),
            payload=st.one_of(
                st.binary(min_size=1, max_size=512), json_values.map(dumps), wrongly_typed_event()
            ),
        )
        def event(kind: str, payload: bytes) -> None:
            js = roles.nc["worker"].jetstream(timeout=5)
            roles.run(js.publish(f"fleet.evt.fz.t{tried['event']}.{kind}", payload))
            tried["event"] += 1

        event()

        # 4. Heartbeats in the workers' bucket: dead-lettered once each.
        @examples(40)
        @given(payload=st.one_of(st.binary(min_size=1, max_size=256), json_values.map(dumps)))
        def heartbeat(payload: bytes) -> None:
            kv = roles.run(roles.nc["worker"].jetstream(timeout=5).key_value(bus.WORKERS_BUCKET))
            roles.run(kv.put(f"worker.fuzz-{tried['heartbeat']}", payload))
            tried["heartbeat"] += 1

        heartbeat()

        # 5. Assignments on the worker's task subject (only the coordinator may publish there).
        @examples(50)
        @given(payload=payloads(["task_id", "mission_id", "kind", "params", "attempt", "timeout_s"]))
        def assignment(payload: bytes) -> None:
            js = roles.nc["coordinator"].jetstream(timeout=5)
            roles.run(js.publish(bus.task_subject("w0"), payload))
            tried["assignment"] += 1

        assignment()

        # 6. Commands to the worker: each answered with a refusal that says why.
        @examples(60)
        @given(payload=payloads(["action", "task_id", "attempt"]))
        def command(payload: bytes) -> None:
            msg = roles.run(roles.nc["coordinator"].request(bus.cmd_subject("w0"), payload, timeout=10))
            ack = msgspec.json.decode(msg.data, type=m.CommandAck)
            assert not ack.ok and ack.detail, ack
            tried["command"] += 1

        command()

        # Every event and heartbeat dead-lettered (table), every event and assignment on FLEET_DLQ.
        def dead_letters() -> bool:
            now = {r["door"]: r["n"] for r in sql(fleet, DEAD_LETTERS)}
            return (
                all(
                    now.get(door, 0) - dead_before.get(door, 0) == tried[door]
                    for door in ("event", "heartbeat")
                )
                and roles.dlq_messages() - dlq_before == tried["event"] + tried["assignment"]
            )

        wait_for(dead_letters, 60, "a dead letter for every malformed event, heartbeat and assignment")
        # A refused submit leaves no row: only the accepted missions exist, with their own tasks.
        rows = sql(fleet, "SELECT mission_id FROM missions")
        assert sorted(r["mission_id"] for r in rows) == sorted(accepted)
        orphans = "SELECT count(*) AS n FROM tasks WHERE mission_id NOT IN (SELECT mission_id FROM missions)"
        assert sql(fleet, orphans)[0]["n"] == 0
    finally:
        roles.close()
    assert fleet.fleetd is not None and fleet.fleetd.poll() is None, "fleetd died"
    assert fleet.workers["w0"].poll() is None, "the worker died"
    print(
        "\nfuzz: examples tried per door:",
        json.dumps(dict(sorted(tried.items()))),
        f"accepted={len(accepted)}",
    )


DEAD_LETTERS = """
    SELECT CASE WHEN subject LIKE 'fleet.evt.%' THEN 'event' WHEN subject LIKE '$KV.%' THEN 'heartbeat'
                ELSE 'other' END AS door, count(*) AS n
    FROM dead_letters GROUP BY ALL
"""

"""`fleetctl gc`: which ended missions' files go, and which artifacts may leave the object store.

What goes: the run folders (task outputs, checkpoints) of ended missions beyond the policy, on every
home, and the artifacts that only those missions reference. What never goes: anything of a mission
that is still running, any artifact a pending or running task still needs (its assignment's inputs),
any artifact a kept mission references (content addressing lets two missions share one), and no row
of the database: a collected mission keeps its scores, decisions, metrics and logs.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from fleet.artifacts import Manifest
from fleetd.scheduler import TERMINAL, Scheduler, outputs_of

ENDED = ("succeeded", "failed", "cancelled")
RESEND = 1000  # missions collected before whose folders each home is told again (a worker away then)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `12h`, `7d` or `2w` in seconds; ValueError naming the text otherwise."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 12h, 7d or 2w")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def choose(
    missions: list[dict[str, Any]], keep_last: int | None, older_than_s: float | None, now: float
) -> list[dict[str, Any]]:
    """The ended, not yet collected missions beyond the policy: not among the `keep_last` newest
    ended runs of their name, and ended more than `older_than_s` ago (each condition when given)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in missions:
        if row["state"] in ENDED:
            by_name.setdefault(row["name"], []).append(row)
    chosen = []
    for rows in by_name.values():
        rows.sort(key=lambda r: r["finished_at"] or r["submitted_at"] or 0.0, reverse=True)
        for i, row in enumerate(rows):
            beyond = keep_last is None or i >= keep_last
            ended = row["finished_at"] or row["submitted_at"] or now
            old = older_than_s is None or ended < now - older_than_s
            if beyond and old and row.get("collected_at") is None:
                chosen.append(row)
    return sorted(chosen, key=lambda r: r["submitted_at"] or 0.0)


@dataclass
class Plan:
    missions: list[str]
    drop: dict[str, int] = field(default_factory=dict)  # artifact -> bytes, referenced only by `missions`
    needed: set[str] = field(default_factory=set)  # artifacts pending or running tasks still need


def plan(sched: Scheduler, chosen: list[str]) -> Plan:
    """The artifacts the chosen missions free: theirs, less any other mission's and any a pending or
    running task's assignment carries as an input."""
    going = set(chosen)
    mine: dict[str, int] = {}
    kept: set[str] = set()
    needed: set[str] = set()
    for task in sched.tasks.values():
        refs = {r.sha256: r.bytes for r in outputs_of(task).values() if r.sha256}
        if task.mission_id in going:
            mine.update(refs)
        else:
            kept.update(refs)
        if task.state not in TERMINAL:
            needed.update(r.sha256 for r in sched.assignment(task).inputs.values() if r.sha256)
    drop = {sha: size for sha, size in mine.items() if sha not in kept and sha not in needed}
    return Plan(missions=list(chosen), drop=drop, needed=needed & set(mine))


async def drop_objects(obs: ObjectStore, drop: dict[str, int], dry_run: bool) -> tuple[int, int, list[str]]:
    """Remove each artifact's manifest, then its parts: without its manifest an artifact is absent
    (a fetch fails, a publish uploads it again, finding any part still here), so a delete cut short
    never leaves a manifest whose parts are gone. Returns (artifacts found, their bytes, errors)."""
    found = size = 0
    errors: list[str] = []
    for sha, nbytes in sorted(drop.items()):
        try:
            if dry_run:
                await obs.get_info(sha)
                found, size = found + 1, size + nbytes
                continue
            manifest = msgspec.json.decode((await obs.get(sha)).data or b"", type=Manifest)
            await obs.delete(sha)
            found, size = found + 1, size + nbytes
            for i in range(len(manifest.parts)):
                with contextlib.suppress(ObjectNotFoundError, NotFoundError):
                    await obs.delete(f"{sha}.{i:05d}")
        except (ObjectNotFoundError, NotFoundError):
            continue  # gone already
        except (msgspec.DecodeError, msgspec.ValidationError, nats.errors.Error, OSError) as e:
            errors.append(f"artifact {sha}: {e!r}")  # the next gc tries it again
    return found, size, errors

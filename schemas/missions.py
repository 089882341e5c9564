"""Mission specs: the TOML files in `schemas/missions/`, validated strictly, and their expansion into tasks.

A spec is refused as a whole, naming the file, the field and the reason (`SpecError`); nothing is
expanded from a spec that did not validate. Expansion is pure: stages x (arms, seeds) -> `Task`s
with their dependencies, resources, timeouts and attempt budgets.

`Task` is the one definition of a task's fields: expansion fills it, fleetd's scheduler moves it through
its states, fleetd's store derives the `tasks` table's columns from it, and `task_view` what status
readers show. A mission's `gates` table stays raw here: `stats.gates.GateSpec` is its one definition,
and fleetd converts and checks it (`schemas` imports nothing of the project).
"""

from __future__ import annotations

import itertools
import math
import random
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec
from msgspec import Struct

from schemas.messages import NAME

MISSIONS_DIR = Path(__file__).parent / "missions"
_NAME = re.compile(f"^{NAME}$")
NAME_RULE = "starts with a letter or digit, then letters, digits, '_' or '-', at most 64 in all"
# A mission id is `<name>-YYYYmmdd-HHMMSS-xxxx`, itself a name: the spec's name leaves room for it.
MISSION_NAME_MAX = 64 - len("-20261206-205346-6c6d")
_KIND = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")


class SpecError(ValueError):
    """A mission spec that cannot be run: `file: field: reason`."""

    def __init__(self, file: str, field: str, reason: str) -> None:
        super().__init__(f"{file}: {field}: {reason}")
        self.file, self.field, self.reason = file, field, reason


class _Strict(Struct, frozen=True, forbid_unknown_fields=True):
    pass


class Defaults(_Strict, frozen=True):
    timeout_s: float = 3600.0
    max_attempts: int = 2  # task errors: exception, OOM, crash, timeout
    max_infra_attempts: int = 5  # lost worker, bus outage
    vram_gb: float = 0.0


class Stage(_Strict, frozen=True):
    name: str
    kind: str
    foreach: list[Literal["arm", "seed"]] = []
    after: list[str] = []
    params: dict[str, Any] = {}
    vram_gb: float | None = None
    gpu_class: str | None = None
    timeout_s: float | None = None
    max_attempts: int | None = None
    services: list[str] = []  # reactive services that watch this stage's tasks (fleet.registry)


class Profile(_Strict, frozen=True):
    description: str = ""
    params: dict[str, Any] = {}  # merged over every stage's params
    seeds: list[int] | None = None
    arms: list[str] | None = None
    vram_gb: float | None = None  # overrides every stage's need
    timeout_s: float | None = None


class Range(_Strict, frozen=True):
    """A random sweep's continuous range: uniform on [low, high], on the log scale with `log`, whole
    numbers with `integer`."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


class EarlyStop(_Strict, frozen=True):
    """The median rule: a trial whose best value of `metric` by step s (s >= after_steps) is worse than
    the median of the other trials' running means at s is stopped, with its dependents. A task is
    compared with the same task (stage, arm, seed) of the other trials, and only once `min_trials`
    others have reached step s."""

    metric: str  # a curve the tasks report, e.g. "score b/loss"
    after_steps: int
    goal: Literal["max", "min"] = "min"
    min_trials: int = 2


class Sweep(_Strict, frozen=True):
    """`[sweep]`: a search over `params` keys, run with `fleetctl submit NAME --sweep`. Each trial is a
    set of values, expanded into tasks like an arm; the trials are ranked by `metric` (per-example
    scores, of `arm`, minus `baseline` when given) and never gated: the winner runs again as a
    mission on the mission's own seeds, which the sweep's `seeds` must not share."""

    params: dict[str, list[Any] | Range]  # grid: a list of values per key; random: a list or a Range
    seeds: list[int]
    metric: str
    method: Literal["grid", "random"] = "grid"
    trials: int | None = None  # random: how many draws
    seed: int = 0  # random: the draws' seed
    arm: str | None = None
    baseline: str | None = None
    goal: Literal["max", "min"] = "max"
    early_stop: EarlyStop | None = None


SWEEP_MAX_TRIALS = 1000
RESERVED_PARAMS = ("arm", "seed", "services")


class MissionSpec(_Strict, frozen=True):
    name: str
    description: str = ""
    version: int = 1
    arms: list[str] = []
    seeds: list[int] = msgspec.field(default_factory=lambda: [1])
    default_profile: str = "smoke"
    defaults: Defaults = Defaults()
    profiles: dict[str, Profile] = {}
    stages: list[Stage] = []
    gates: dict[str, Any] | None = None  # raw; fleetd converts it into a stats.gates.GateSpec
    # Each service's table (its thresholds), raw: fleetd validates it with the registered service.
    services: dict[str, dict[str, Any]] = {}
    sweep: Sweep | None = None


class Task(Struct, kw_only=True):
    """A task: what expansion decides, then what the scheduler changes. Mutable: the scheduler moves it
    through pending, assigned, running, succeeded, failed, cancelled. Every field is a column of the
    `tasks` table (fleetd.store derives them, in this order); runtime-only bookkeeping lives elsewhere."""

    # ---- decided by expansion
    task_id: str
    mission_id: str
    name: str
    stage: str
    kind: str
    arm: str | None = None
    seed: int | None = None
    trial: int | None = None  # a sweep's trial (its values are in params)
    params: dict[str, Any]
    deps: list[str]
    vram_gb: float
    gpu_class: str | None
    timeout_s: float
    max_attempts: int
    max_infra_attempts: int
    # ---- changed by the scheduler
    state: str = "pending"  # pending, assigned, running, succeeded, failed, cancelled, stopped (a sweep's)
    pending_reason: str | None = None  # machine-readable, set whenever the task is pending
    attempt: int = 1
    task_failures: int = 0
    infra_failures: int = 0
    worker: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    excluded_workers: list[str] = []  # workers that ran out of memory on it
    created_at: float | None = None
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


# What status readers (fleetctl, the web page) show of a task, in this order.
VIEW_FIELDS = (
    "task_id",
    "mission_id",
    "name",
    "stage",
    "kind",
    "arm",
    "seed",
    "trial",
    "state",
    "pending_reason",
    "attempt",
    "worker",
    "error",
    "vram_gb",
)


def task_view(task: Task) -> dict[str, Any]:
    return {f: getattr(task, f) for f in VIEW_FIELDS}


# ---- loading -----------------------------------------------------------------------------------


def available(directory: Path = MISSIONS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def find(name: str, directory: Path = MISSIONS_DIR) -> Path:
    if not _NAME.match(name):
        raise SpecError(name[:80], "name", f"a mission name {NAME_RULE}")
    path = directory / f"{name}.toml"
    if not path.is_file():
        raise SpecError(
            str(path), "file", f"unknown mission {name!r}; known: {', '.join(available(directory))}"
        )
    return path


def load(path: Path, overrides: dict[str, Any] | None = None) -> MissionSpec:
    """Read, override and validate one spec; raises SpecError naming the file, the field and the reason."""
    file = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise SpecError(file, "file", str(e)) from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(file, "toml", str(e)) from None
    arms = raw.get("arms")
    declared: list[str] = [a for a in arms if isinstance(a, str)] if isinstance(arms, list) else []
    for key, value in (overrides or {}).items():
        apply_override(raw, key, value, file)
    if overrides and "arms" in overrides:
        run_subset(raw, declared)
    try:
        spec = msgspec.convert(raw, MissionSpec, strict=True)
    except msgspec.ValidationError as e:
        raise spec_error(e, file) from None
    _check(spec, file, path.stem)
    return spec


def load_overrides(path: Path | None) -> dict[str, Any]:
    """An overrides file (`fleetctl submit --overrides`): `"dotted.key" = value` lines, as `fleetctl
    sweep --write` writes them; nested tables are read as dotted keys too."""
    if path is None:
        return {}
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise SpecError(str(path), "file", str(e)) from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(str(path), "toml", str(e)) from None

    def flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in table.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    return flat(raw)


def run_subset(raw: dict[str, Any], declared: list[str]) -> None:
    """`--set 'arms=[...]'` runs other arms than the file declares: a gate naming a declared arm that is
    no longer run is dropped (nothing could judge it). A gate naming an arm the file never declared
    stays, and is refused as before."""
    arms = raw.get("arms")
    gates = raw.get("gates")
    if not isinstance(arms, list) or not all(isinstance(a, str) for a in arms) or not isinstance(gates, dict):
        return  # not a list of names: validation refuses it, naming the field
    dropped = {a for a in declared if isinstance(a, str)} - set(arms)

    def judged(gate: Any) -> bool:
        return (
            not isinstance(gate, dict) or not {gate.get(r) for r in ("variant", "baseline", "arm")} & dropped
        )

    for kind in ("preconditions", "claims", "guards"):
        if isinstance(gates.get(kind), list):
            gates[kind] = [g for g in gates[kind] if judged(g)]


def apply_override(raw: dict[str, Any], dotted: str, value: Any, file: str = "<overrides>") -> None:
    """`stages.crash.params.fail_attempts = 9`: list-of-table levels (stages) are addressed by name."""
    parts = dotted.split(".")
    node: Any = raw
    i = 0
    while i < len(parts) - 1:
        part = parts[i]
        nxt = node.get(part) if isinstance(node, dict) else None
        if isinstance(nxt, list):  # a list of tables: the next part names the entry
            named = [t for t in nxt if isinstance(t, dict) and t.get("name") == parts[i + 1]]
            if not named or i + 1 == len(parts) - 1:
                raise SpecError(file, dotted, f"no {part} entry named {parts[i + 1]!r}")
            node, i = named[0], i + 2
            continue
        if nxt is None and isinstance(node, dict):
            nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise SpecError(file, dotted, f"{part!r} is not a table")
        node, i = nxt, i + 1
    node[parts[-1]] = value


def spec_error(e: msgspec.ValidationError, file: str, prefix: str = "") -> SpecError:
    """A msgspec error as a SpecError naming the field path: `gates.guards[1].high` under prefix `gates`."""
    path, reason = split_msgspec_error(str(e))
    if prefix:
        path = prefix if path == "<root>" else f"{prefix}.{path}"
    return SpecError(file, path, reason)


def split_msgspec_error(msg: str) -> tuple[str, str]:
    """(field path, reason): msgspec says "Expected `int`, got `str` - at `$.stages[0].timeout_s`"."""
    m = re.match(r"^(.*?)(?: - at `\$\.?(.*)`)?$", msg, re.DOTALL)
    assert m is not None
    return (m.group(2) or "<root>"), m.group(1)


def _check(spec: MissionSpec, file: str, stem: str) -> None:
    def fail(field: str, reason: str) -> None:
        raise SpecError(file, field, reason)

    if spec.name != stem:
        fail("name", f"{spec.name!r} must match the file name {stem!r}")
    if not _NAME.match(spec.name) or len(spec.name) > MISSION_NAME_MAX:
        fail("name", f"{spec.name!r}: a mission name {NAME_RULE}, and at most {MISSION_NAME_MAX} long")
    for i, arm in enumerate(spec.arms):  # an arm becomes part of a task's name: a path and a subject
        if not _NAME.match(arm):
            fail(f"arms[{i}]", f"{arm!r}: an arm name {NAME_RULE}")
    if not spec.stages:
        fail("stages", "a mission needs at least one stage")
    if spec.default_profile not in spec.profiles and spec.profiles:
        fail(
            "default_profile", f"{spec.default_profile!r} is not one of the profiles {sorted(spec.profiles)}"
        )
    for field, seeds in [("seeds", spec.seeds)] + [
        (f"profiles.{n}.seeds", p.seeds) for n, p in spec.profiles.items() if p.seeds is not None
    ]:
        if not seeds or len(set(seeds)) != len(seeds):
            fail(field, "seeds must be a non-empty list without repeats")
    for name, prof in spec.profiles.items():
        if not _NAME.match(name):
            fail(f"profiles.{name}", f"a profile name {NAME_RULE}")
        if "services" in prof.params:
            fail(f"profiles.{name}.params.services", "is set from the stages' `services` and [services.NAME]")
        for arm in prof.arms or []:
            if arm not in spec.arms:
                fail(f"profiles.{name}.arms", f"unknown arm {arm!r}; arms are {spec.arms}")
    seen: set[str] = set()
    for i, st in enumerate(spec.stages):
        where = f"stages[{i}]"
        if not _NAME.match(st.name):
            fail(f"{where}.name", f"{st.name!r}: a stage name {NAME_RULE}")
        if st.name in seen:
            fail(f"{where}.name", f"duplicate stage {st.name!r}")
        if not _KIND.match(st.kind):
            fail(f"{where}.kind", f"{st.kind!r} is not a task kind like 'demo.validate'")
        for dep in st.after:
            if dep not in seen:
                fail(f"{where}.after", f"{dep!r} is not an earlier stage (earlier: {sorted(seen) or 'none'})")
        if "arm" in st.foreach and not spec.arms:
            fail(f"{where}.foreach", "foreach 'arm' needs the mission's arms")
        if len(set(st.foreach)) != len(st.foreach):
            fail(f"{where}.foreach", "repeated dimension")
        if st.timeout_s is not None and st.timeout_s <= 0:
            fail(f"{where}.timeout_s", f"must be positive, got {st.timeout_s}")
        if st.vram_gb is not None and st.vram_gb < 0:
            fail(f"{where}.vram_gb", f"must be at least 0, got {st.vram_gb}")
        if st.max_attempts is not None and st.max_attempts < 1:
            fail(f"{where}.max_attempts", "must be at least 1")
        if "services" in st.params:
            fail(f"{where}.params.services", "is set from the stage's `services` and [services.NAME]")
        seen.add(st.name)
    if spec.defaults.max_attempts < 1 or spec.defaults.max_infra_attempts < 1:
        fail("defaults", "attempt budgets must be at least 1")
    watched = {name for st in spec.stages for name in st.services}
    for name in spec.services:
        if name not in watched:
            fail(f"services.{name}", "no stage names this service in its `services`")
    if spec.sweep is not None:
        _check_sweep(spec, spec.sweep, fail)


def _check_sweep(spec: MissionSpec, sw: Sweep, fail: Any) -> None:
    if not sw.params:
        fail("sweep.params", "a sweep needs at least one param to vary")
    settable = {k for st in spec.stages for k in st.params} | {
        k for prof in spec.profiles.values() for k in prof.params
    }
    for key, values in sw.params.items():
        where = f"sweep.params.{key}"
        if key in RESERVED_PARAMS:
            fail(where, f"{key!r} is set by the mission, not a param a sweep can vary")
        if key not in settable:
            fail(where, "no stage or profile sets this param: add it to a stage's params first")
        if isinstance(values, Range):
            if sw.method == "grid":
                fail(where, "a grid takes a list of values; ranges are for method = 'random'")
            if not values.low < values.high:
                fail(where, f"low {values.low} must be below high {values.high}")
            if values.log and values.low <= 0:
                fail(where, "a log range needs low > 0")
        elif not values:
            fail(where, "an empty list of values")
    if sw.method == "grid" and sw.trials is not None:
        fail("sweep.trials", "a grid's trials are its combinations; trials is for method = 'random'")
    if sw.method == "random" and (sw.trials is None or sw.trials < 1):
        fail("sweep.trials", "a random sweep needs trials >= 1")
    count = (
        (sw.trials or 0)
        if sw.method == "random"
        else math.prod(len(v) if isinstance(v, list) else 1 for v in sw.params.values())
    )
    if count > SWEEP_MAX_TRIALS:  # counted, not drawn: a huge sweep is refused before it costs anything
        fail("sweep", f"{count} trials; at most {SWEEP_MAX_TRIALS}")
    if not sw.seeds or len(set(sw.seeds)) != len(sw.seeds):
        fail("sweep.seeds", "seeds must be a non-empty list without repeats")
    mission_seeds = set(spec.seeds).union(*(p.seeds or [] for p in spec.profiles.values()))
    if shared := sorted(set(sw.seeds) & mission_seeds):
        fail("sweep.seeds", f"{shared} are also the mission's seeds: the winner must run on fresh ones")
    for field, arm in (("arm", sw.arm), ("baseline", sw.baseline)):
        if arm is not None and arm not in spec.arms:
            fail(f"sweep.{field}", f"unknown arm {arm!r}; arms are {spec.arms}")
    if sw.baseline is not None and sw.arm in (None, sw.baseline):
        fail("sweep.baseline", "a baseline needs another arm to compare: set sweep.arm")
    if sw.early_stop is not None and (sw.early_stop.after_steps < 0 or sw.early_stop.min_trials < 1):
        fail("sweep.early_stop", "after_steps must be at least 0 and min_trials at least 1")


def trials(sw: Sweep) -> list[dict[str, Any]]:
    """The sweep's trials in order: a grid's combinations (the first key varies slowest), or `trials`
    seeded random draws (the same seed gives the same draws)."""
    if sw.method == "grid":
        keys = list(sw.params)
        lists = [v for v in sw.params.values() if isinstance(v, list)]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)]
    rng = random.Random(sw.seed)
    return [{key: _draw(rng, values) for key, values in sw.params.items()} for _ in range(sw.trials or 0)]


def _draw(rng: random.Random, values: list[Any] | Range) -> Any:
    if isinstance(values, list):
        return values[rng.randrange(len(values))]
    if values.log:
        x = math.exp(rng.uniform(math.log(values.low), math.log(values.high)))
    else:
        x = rng.uniform(values.low, values.high)
    return round(x) if values.integer else x


def winner_overrides(spec: MissionSpec, profile: str, values: dict[str, Any]) -> dict[str, Any]:
    """A trial's values as `--set` overrides on the plain mission: where the profile sets a key, the
    profile's entry (it wins over the stages'), else each stage's that sets it."""
    prof = spec.profiles.get(profile, Profile())
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in prof.params:
            out[f"profiles.{profile}.params.{key}"] = value
            continue
        for st in spec.stages:
            if key in st.params:
                out[f"stages.{st.name}.params.{key}"] = value
    return out


# ---- expansion ---------------------------------------------------------------------------------


def profile_of(spec: MissionSpec, profile: str | None) -> tuple[str, Profile]:
    name = profile or spec.default_profile
    if not spec.profiles and name == spec.default_profile:
        return name, Profile()
    if name not in spec.profiles:
        raise SpecError(spec.name, "profile", f"unknown profile {name!r}; profiles: {sorted(spec.profiles)}")
    return name, spec.profiles[name]


def expand(spec: MissionSpec, profile: str | None, mission_id: str, sweep: bool = False) -> list[Task]:
    """One pending task per stage and combination of its `foreach` dimensions, in stage order.

    A task depends on the tasks of each `after` stage that agree with it on the dimensions both share
    (train-bem-s1 -> eval-bem-s1), and on all of them when they share none (judge after every eval).

    With `sweep`, the sweep's seeds replace the mission's, and a stage that sets a swept param, or
    runs after one that does, runs once per trial too (`-t<i>` in its tasks' names), with the trial's
    values in its params.
    """
    profile, prof = profile_of(spec, profile)
    dims: dict[str, list[Any]] = {"arm": prof.arms or spec.arms, "seed": prof.seeds or spec.seeds}
    runs: list[dict[str, Any]] = [{}]
    swept: set[str] = set()
    if sweep:
        if spec.sweep is None:
            raise SpecError(spec.name, "sweep", "this mission has no [sweep] table")
        dims["seed"] = spec.sweep.seeds
        runs = trials(spec.sweep)
        for st in spec.stages:
            if set(spec.sweep.params) & {*st.params, *prof.params} or swept & set(st.after):
                swept.add(st.name)
        if not swept:
            keys = sorted(spec.sweep.params)
            raise SpecError(spec.name, "sweep.params", f"no stage of profile {profile!r} sets any of {keys}")
    tasks: list[Task] = []
    by_stage: dict[str, list[Task]] = {}
    for st in spec.stages:
        by_stage[st.name] = []
        base = {**st.params, **prof.params}
        trial_values: list[tuple[int | None, dict[str, Any]]] = (
            list(enumerate(runs)) if st.name in swept else [(None, {})]
        )
        combos = list(itertools.product(*(dims[d] for d in st.foreach)))
        for (trial, values), combo in itertools.product(trial_values, combos):
            coords: dict[str, Any] = dict(zip(st.foreach, combo, strict=True))
            name = "-".join(
                [st.name]
                + [f"{'s' if d == 'seed' else ''}{v}" for d, v in coords.items()]
                + ([f"t{trial}"] if trial is not None else [])
            )
            if not _NAME.match(name):  # a task's name is a path and a subject token too
                raise SpecError(spec.name, f"stages.{st.name}", f"task name {name!r}: a name {NAME_RULE}")
            params = {**base, **coords, **{k: v for k, v in values.items() if k in base}}
            if trial is not None:
                coords["trial"] = trial
            deps = [
                up.task_id
                for dep in st.after
                for up in by_stage[dep]
                if all(getattr(up, d) == v for d, v in coords.items() if getattr(up, d) is not None)
            ]
            if st.services:  # the task applies its watchers' thresholds too (say, a learner's canaries)
                params["services"] = {name: spec.services.get(name, {}) for name in st.services}
            task = Task(
                task_id=f"{mission_id}/{name}",
                mission_id=mission_id,
                name=name,
                stage=st.name,
                kind=st.kind,
                arm=coords.get("arm"),
                seed=coords.get("seed"),
                trial=trial,
                params=params,
                deps=deps,
                vram_gb=_first(prof.vram_gb, st.vram_gb, spec.defaults.vram_gb),
                gpu_class=st.gpu_class,
                timeout_s=_first(prof.timeout_s, st.timeout_s, spec.defaults.timeout_s),
                max_attempts=_first(st.max_attempts, spec.defaults.max_attempts),
                max_infra_attempts=spec.defaults.max_infra_attempts,
                pending_reason="waiting_for_deps" if deps else None,
            )
            tasks.append(task)
            by_stage[st.name].append(task)
    return tasks


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)

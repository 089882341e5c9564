"""Mission specs: the shipped ones load and expand; bad ones are refused naming file, field and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import missions as specs

GOOD = """
name = "m"
arms = ["a", "b"]
seeds = [1, 2, 3]
[profiles.smoke]
params = { steps = 5 }
[profiles.tiny]
seeds = [1]
[[stages]]
name = "train"
kind = "x.train"
foreach = ["arm", "seed"]
params = { steps = 100, lr = 0.1 }
[[stages]]
name = "eval"
kind = "x.eval"
foreach = ["arm", "seed"]
after = ["train"]
[[stages]]
name = "report"
kind = "x.report"
after = ["eval"]
"""


def write(tmp_path: Path, text: str, name: str = "m") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", specs.available())
def test_shipped_missions_load_and_expand(name: str) -> None:
    spec = specs.load(specs.find(name))
    for profile in spec.profiles:
        plans = specs.expand(spec, profile, "id-1")
        ids = [p.task_id for p in plans]
        assert len(ids) == len(set(ids))
        known = set()
        for p in plans:
            assert set(p.deps) <= known  # dependencies come earlier: the DAG is acyclic by construction
            known.add(p.task_id)


def test_expansion_matches_dependencies_on_shared_dimensions(tmp_path: Path) -> None:
    spec = specs.load(write(tmp_path, GOOD))
    plans = {p.name: p for p in specs.expand(spec, "smoke", "id")}
    assert len(plans) == 2 * 3 * 2 + 1
    assert plans["eval-b-s2"].deps == ["id/train-b-s2"]
    assert sorted(plans["report"].deps) == sorted(f"id/eval-{a}-s{s}" for a in "ab" for s in (1, 2, 3))
    assert plans["train-a-s1"].params == {"steps": 5, "lr": 0.1, "arm": "a", "seed": 1}  # profile wins
    # Expansion makes the scheduler's tasks: pending, waiting for their dependencies if they have any.
    assert all(isinstance(t, specs.Task) and t.mission_id == "id" for t in plans.values())
    assert {t.state for t in plans.values()} == {"pending"}
    assert plans["train-a-s1"].pending_reason is None and plans["report"].pending_reason == "waiting_for_deps"
    assert (plans["eval-b-s2"].arm, plans["eval-b-s2"].seed, plans["report"].arm) == ("b", 2, None)
    assert len(specs.expand(spec, "tiny", "id")) == 2 * 1 * 2 + 1


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (('kind = "x.eval"', 'kind = "x.eval"\nvram = 3'), "stages[1]", "unknown field `vram`"),
        (('after = ["train"]', 'after = ["trian"]'), "stages[1].after", "'trian' is not an earlier stage"),
        (("seeds = [1, 2, 3]", "seeds = [1, 1]"), "seeds", "without repeats"),
        (("seeds = [1, 2, 3]", 'seeds = "all"'), "seeds", "Expected `array`, got `str`"),
        (('name = "report"', 'name = "train"'), "stages[2].name", "duplicate stage 'train'"),
        (('kind = "x.report"', 'kind = "x.Report!"'), "stages[2].kind", "is not a task kind"),
        (('name = "m"', 'name = "other"'), "name", "must match the file name"),
        (('[[stages]]\nname = "train"', '[[stages]]\nname = "tr ain"'), "stages[0].name", "letters, digits"),
    ],
)
def test_bad_specs_name_file_field_and_reason(
    tmp_path: Path, change: tuple[str, str], field: str, reason: str
) -> None:
    path = write(tmp_path, GOOD.replace(*change, 1))
    with pytest.raises(specs.SpecError) as err:
        specs.load(path)
    assert err.value.file == str(path) and err.value.field == field and reason in err.value.reason, str(
        err.value
    )


def test_broken_toml_and_unknown_mission(tmp_path: Path) -> None:
    with pytest.raises(specs.SpecError, match=r"m\.toml: toml: "):
        specs.load(write(tmp_path, "name = "))
    with pytest.raises(specs.SpecError, match="unknown mission 'nope'; known: m"):
        specs.find("nope", tmp_path)
    with pytest.raises(specs.SpecError, match="letters, digits"):
        specs.find("../etc/passwd", tmp_path)


def test_overrides_address_stages_by_name_and_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    spec = specs.load(path, {"stages.train.params.lr": 0.5, "profiles.smoke.seeds": [7]})
    plans = specs.expand(spec, "smoke", "id")
    assert {p.params["lr"] for p in plans if p.stage == "train"} == {0.5}
    assert {p.seed for p in plans if p.seed is not None} == {7}
    with pytest.raises(specs.SpecError, match="no stages entry named 'nope'"):
        specs.load(path, {"stages.nope.params.lr": 1})
    with pytest.raises(specs.SpecError, match=r"stages\[0\].timeout_s"):
        specs.load(path, {"stages.train.timeout_s": "later"})


GATES = """
[gates]
q = 0.05
[[gates.claims]]
name = "b_beats_a"
metric = "score"
variant = "b"
baseline = "a"
[[gates.guards]]
name = "level"
statistic = "level"
metric = "score"
variant = "b"
low = 0.0
[[gates.guards]]
name = "params"
statistic = "value"
metric = "ratio"
high = 1.05
"""


def test_gates_are_the_stats_engines_spec(tmp_path: Path) -> None:
    from fleetd.judge import gate_spec
    from stats.gates import Claim, GateSpec, Guard

    spec = specs.load(write(tmp_path, GOOD + GATES))
    assert spec.gates is not None and gate_spec(spec.gates, "m.toml", spec.arms) == GateSpec(
        (Claim("b_beats_a", "score", "b", "a"),),
        (Guard("level", "level", "score", "b", low=0.0), Guard("params", "value", "ratio", high=1.05)),
    )


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (("high = 1.05", "zzz = 1.05"), "gates.guards[1]", "unknown field `zzz`"),
        (("high = 1.05", 'high = "x"'), "gates.guards[1].high", "Expected `float | null`, got `str`"),
        (("high = 1.05", "low = 2.0\nhigh = 1.05"), "gates.guards[1]", "guard 'params': low 2.0 > high 1.05"),
        (("low = 0.0", "q = 0.4"), "gates.guards[0]", "give low, high or both"),
        (('statistic = "level"', 'statistic = "median"'), "gates.guards[0].statistic", "Invalid enum value"),
        (("q = 0.05", "q = 2.0"), "gates.q", "must be in (0, 1), got 2.0"),
        (("q = 0.05", "level = 1.0"), "gates.level", "must be in (0, 1)"),
        (('variant = "b"\nbaseline = "a"', 'variant = "c"\nbaseline = "a"'), "gates.claims[0].variant",
         "unknown arm 'c'"),
        (('name = "params"', 'name = "level"'), "gates", "gate names must be unique"),
        (("q = 0.05", "q = 0.05\nextra = 1"), "gates", "unknown field `extra`"),
    ],
)  # fmt: skip
def test_bad_gates_name_the_field(tmp_path: Path, change: tuple[str, str], field: str, reason: str) -> None:
    from fleetd.judge import gate_spec

    path = write(tmp_path, GOOD + GATES.replace(*change, 1))
    spec = specs.load(path)  # a mission spec keeps its gates raw: the stats engine's spec checks them
    assert spec.gates is not None
    with pytest.raises(specs.SpecError) as err:
        gate_spec(spec.gates, str(path), spec.arms)
    assert err.value.file == str(path) and err.value.field == field and reason in err.value.reason, str(
        err.value
    )


WATCHED = """
name = "m"
[[stages]]
name = "learn"
kind = "online.stream"
services = ["promotion"]
[[stages]]
name = "other"
kind = "noop"
after = ["learn"]
[services.promotion.gate]
promote_at = 0.97
"""


def test_a_stages_services_reach_its_tasks_with_their_tables(tmp_path: Path) -> None:
    from fleetd.coordinator import check_runnable

    spec = specs.load(write(tmp_path, WATCHED))
    check_runnable(spec, "m.toml")
    learn, other = specs.expand(spec, None, "mi")
    assert learn.params["services"] == {"promotion": {"gate": {"promote_at": 0.97}}}
    assert "services" not in other.params  # only the stages that name a service are watched


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (
            ('services = ["promotion"]', 'services = ["promotion", "promo"]'),
            "stages[0].services",
            "unknown service 'promo'",
        ),
        (("promote_at = 0.97", "promote_at = 0.5"), "services.promotion.gate", "rollback_below ≤ accept_at"),
        (("promote_at = 0.97", "promote_at = 0.97\npromot = 1"), "services.promotion.gate", "unknown field"),
    ],
)
def test_a_bad_service_is_refused_at_submit(
    tmp_path: Path, change: tuple[str, str], field: str, reason: str
) -> None:
    from fleetd.coordinator import check_runnable

    spec = specs.load(write(tmp_path, WATCHED.replace(*change)))
    with pytest.raises(specs.SpecError) as e:
        check_runnable(spec, "m.toml")
    assert e.value.field == field and reason in e.value.reason


def test_a_service_table_no_stage_names_is_refused(tmp_path: Path) -> None:
    with pytest.raises(specs.SpecError, match=r"services\.promotion: no stage names this service"):
        specs.load(write(tmp_path, WATCHED.replace('services = ["promotion"]\n', "")))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"arms": ["a", "/../../../../tmp/x"]}, "arms[1]"),
        ({"arms": ["a", "b.c"]}, "arms[1]"),  # a '.' would split a subject token
        ({"arms": ["a", "-b"]}, "arms[1]"),
        ({"arms": ["a", "x" * 65]}, "arms[1]"),
        ({"profiles.bad.name": {"description": "x"}}, None),  # an unknown key: refused too
    ],
)
def test_names_that_become_paths_or_subjects_are_checked(
    tmp_path: Path, override: dict, field: str | None
) -> None:
    with pytest.raises(specs.SpecError) as e:
        specs.load(write(tmp_path, GOOD), override)
    if field is not None:
        assert e.value.field == field and "at most 64" in e.value.reason


def test_stage_profile_and_mission_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(specs.SpecError, match=r"stages\[0\]\.name"):
        specs.load(write(tmp_path, GOOD.replace('name = "train"', 'name = "../train"')))
    with pytest.raises(specs.SpecError, match=r"profiles\.\.\."):
        specs.load(write(tmp_path, GOOD.replace("[profiles.tiny]", '[profiles."..."]')))
    long = "m" * (specs.MISSION_NAME_MAX + 1)
    with pytest.raises(specs.SpecError, match="at most 43"):  # room for the mission id's suffix
        specs.load(write(tmp_path, GOOD.replace('name = "m"', f'name = "{long}"'), long))
    with pytest.raises(specs.SpecError, match="a mission name"):
        specs.find("../etc/passwd")
    # A task's name (stage-arm-seed) is checked as a whole, too.
    spec = specs.load(write(tmp_path, GOOD), {"arms": ["a" * 60, "b"], "profiles.tiny.arms": ["b"]})
    with pytest.raises(specs.SpecError, match="task name"):
        specs.expand(spec, "smoke", "mi")


def test_forged_ids_on_the_bus_are_malformed_messages() -> None:
    import msgspec

    from fleet.paths import under
    from schemas import messages as m

    good = m.Assignment(task_id="m1/t", mission_id="m1", kind="noop", params={}, attempt=1, timeout_s=1)
    assert m.decode_assignment(m.encode(good)) == good
    for task_id, mission_id in (("m1/../../x", "m1"), ("m1/t/u", "m1"), ("m1/t", "m.1"), ("/t", "m1")):
        forged = msgspec.structs.replace(good, task_id=task_id, mission_id=mission_id)
        with pytest.raises(msgspec.ValidationError):
            m.decode_assignment(m.encode(forged))
    event = m.Started(mission_id="m1", task_id="m1/t", attempt=1, seq=0, worker="../w", ts=0.0)
    with pytest.raises(msgspec.ValidationError):
        m.decode_event(m.encode(event))
    home = Path("/tmp/fleet-home")
    assert under(home, "runs", "m1/t", "attempt-1") == home.resolve() / "runs/m1/t/attempt-1"
    with pytest.raises(ValueError, match="outside"):
        under(home, "runs", "../../etc", "x")

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

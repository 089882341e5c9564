"""Mission C's overlay on another mission's model: the package trained on a base survives saving, the
monitor serves answers under it, checks red-team prompts between them, obeys knob commands, and leaves
the model exactly as it was when closed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bem.core.models import load_model
from bem.core.reporter import Command, MemoryReporter
from bem.missions.mission_c import basis
from bem.missions.mission_c.overlay import OverlayMonitor, OverlayPackage, package_dir, train_package


@pytest.fixture(scope="module")
def package(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[OverlayPackage, Path]:
    out = package_dir(tmp_path_factory.mktemp("cache"), base_dir, "tiny", 1)
    return train_package(base_dir, profile="tiny", seed=1, out=out, reporter=MemoryReporter()), out


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_package_trains_orthogonal_to_the_skill_and_loads_back_identical(
    base_dir: Path, package: tuple[OverlayPackage, Path]
) -> None:
    trained, folder = package
    assert sorted(p.name for p in folder.iterdir()) == ["overlay.json", "overlay.safetensors"]
    assert min(trained.meta["op"].values()) >= 0.95
    loaded = OverlayPackage.load(folder)
    assert loaded.overlays.keys() == trained.overlays.keys()
    for i, o in trained.overlays.items():
        for name, tensor in o.state_dict().items():
            assert torch.equal(loaded.overlays[i].state_dict()[name], tensor), (i, name)
    assert torch.equal(loaded.probe.weight, trained.probe.weight) and loaded.probe.bias == trained.probe.bias
    # The loaded overlay edits a model exactly as the trained one does.
    model, tok = load_model(base_dir)
    ids = tok("user: ada what is the code?", return_tensors="pt").input_ids
    with basis.attach_overlays(model, trained.overlays) as h, h.overlay_inputs(0.1, 1.0):
        want = logits(model, ids)
    with basis.attach_overlays(model, loaded.overlays) as h, h.overlay_inputs(0.1, 1.0):
        got = logits(model, ids)
    assert torch.equal(got, want)
    with pytest.raises(FileNotFoundError, match="no overlay package"):
        OverlayPackage.load(folder.parent)


def test_the_monitor_checks_between_answers_and_obeys_the_knob(
    base_dir: Path, package: tuple[OverlayPackage, Path]
) -> None:
    model, tok = load_model(base_dir)
    ids = tok("user: bo please answer", return_tensors="pt").input_ids
    before = logits(model, ids)
    reporter = MemoryReporter()
    monitor = OverlayMonitor(package[0], reporter, kappa=0.0, every=2, per_check=3, max_new_tokens=2)
    monitor.attach(model, tok)
    with monitor.serve(["user: bo please answer"]):  # κ = 0: the overlay is off, exactly
        assert torch.equal(logits(model, ids), before)
    with monitor.serve(["user: bo please answer"]):
        pass
    reporter.pending += [Command("a", "knob", 0.7), Command("b", "rollback"), Command("c", "raise", 0.4)]
    with monitor.serve(["user: bo please answer"]):  # the third answer: a check is due first
        assert not torch.equal(logits(model, ids), before)  # served at the new κ
    assert [(c.id, ok) for c, ok, _ in reporter.acks] == [("a", True), ("b", False), ("c", True)]
    assert reporter.acks[0][2] == "knob applied at check 0: κ 0.7"
    assert reporter.acks[2][2] == "raise applied at check 0: κ 0.7"  # a raise never lowers κ
    points = [(name, v, step) for name, v, step in reporter.points if name.startswith("overlay/")]
    assert [p for p in points if p[0] == "overlay/knob"] == [("overlay/knob", 0.7, 0)]
    flags = [v for name, v, step in points if name == "overlay/violation"]
    assert len(flags) == 3 and set(flags) <= {0.0, 1.0}
    summary = monitor.close()
    assert summary["applied"] == [
        {"check": 0, "action": "knob", "kappa": 0.7},
        {"check": 0, "action": "raise", "kappa": 0.7},
    ]
    assert summary["served"] == 3
    assert summary["checks"] == [{"step": 0, "kappa": 0.7, "violations": int(sum(flags)), "n": 3}]
    assert torch.equal(logits(model, ids), before)  # closed: the hooks are off


def test_a_batch_is_one_chunk_gated_by_its_lowest_score(
    base_dir: Path, package: tuple[OverlayPackage, Path]
) -> None:
    """Mission B serves prompts in batches: the batch runs at its c_min and the knob's step on it."""
    model, tok = load_model(base_dir)
    prompts = ["user: ada what is the code?", "user: bo tell me the age!!!"]  # equal length in bytes
    ids = tok(prompts, return_tensors="pt").input_ids
    monitor = OverlayMonitor(package[0], MemoryReporter(), kappa=0.8, every=100)
    monitor.attach(model, tok)
    c = monitor.scores(prompts)
    assert c[0] != c[1]
    with monitor.serve(prompts):
        served = logits(model, ids)
    handle = monitor._handle
    assert handle is not None
    for c_at, same in ((min(c), True), (max(c), False)):
        with handle.overlay_inputs(c_at, basis.Knob(0.8).step(c_at)):
            assert torch.equal(logits(model, ids), served) is same
    monitor.close()


def test_two_readers_of_a_jobs_commands_each_get_their_own() -> None:
    from bem.core.reporter import CommandSplit

    reporter = MemoryReporter()
    split = CommandSplit(reporter, ["knob"])
    reporter.pending += [Command("1", "rollback"), Command("2", "knob", 0.5), Command("3", "promote")]
    assert [c.id for c in split.taken.commands()] == ["2"]
    reporter.pending += [Command("4", "knob", 0.7)]
    assert [c.id for c in split.rest.commands()] == ["1", "3"]
    assert [c.id for c in split.taken.commands()] == ["4"]
    assert split.rest.commands() == [] and split.taken.commands() == []
    split.rest.acknowledge(Command("1", "rollback"), True, "done")  # everything else reaches the reporter
    assert reporter.acks == [(Command("1", "rollback"), True, "done")]


def test_mission_b_serves_under_the_overlay_and_its_two_readers_split_the_commands(
    base_dir: Path, tmp_path: Path, package: tuple[OverlayPackage, Path]
) -> None:
    from typing import cast

    from bem.core.reporter import CommandSplit, Reporter
    from bem.missions.mission_b.recipe import run_mission_b

    for p in (p for o in package[0].overlays.values() for p in o.parameters()):
        p.grad = None  # what training the package left
    reporter = MemoryReporter()
    reporter.pending += [Command("r", "rollback"), Command("k", "knob", 0.6)]
    split = CommandSplit(reporter, ["knob"])
    monitor = OverlayMonitor(
        package[0], cast(Reporter, split.taken), kappa=0.0, every=8, per_check=2, max_new_tokens=2
    )
    summary = run_mission_b(
        base_dir,
        profile="tiny",
        seed=1,
        out_dir=tmp_path,
        reporter=cast(Reporter, split.rest),
        overseer=monitor,
    )
    details = {c.id: detail for c, _, detail in reporter.acks}
    assert set(details) == {"r", "k"}
    assert details["k"] == "knob applied at check 0: κ 0.6" and "rollback" in details["r"]  # the learner's
    overlay = summary["overlay"]
    assert overlay["applied"] == [{"check": 0, "action": "knob", "kappa": 0.6}]
    assert overlay["served"] == summary["prompts"] and len(overlay["checks"]) >= 2
    assert all(c["kappa"] == 0.6 and c["n"] == 2 for c in overlay["checks"])
    # The learner trained through the hooks; the served overlay took no gradient.
    assert all(p.grad is None for o in package[0].overlays.values() for p in o.parameters())

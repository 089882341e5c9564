"""Mission E's seed on a tiny model with the mission's tokenizer: every arm holds at most the budget, the
reference perplexities are what they claim to be, training moves only the memory arms' parameters, and
the run writes every row and value the mission's gates read."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch

from bem.core.models import load_model, save_model
from bem.core.reporter import MemoryReporter
from bem.core.smoke_base import Recipe, train_tokenizer
from bem.core.token_shift import TokenShiftLlamaForCausalLM
from bem.missions.mission_e import arms as A
from bem.missions.mission_e import data, driver, tables
from bem.missions.mission_e import evaluate as E
from bem.missions.mission_e.budget import Shapes, budget_bytes
from bem.missions.mission_e.recipe import PROFILES, run_mission_e

ROOT = Path(__file__).resolve().parents[2]
SPEC = tomllib.loads((ROOT / "schemas" / "missions" / "mission_e.toml").read_text())


def tiny_base(path: Path) -> Path:
    """A randomly initialised 2-layer model with the tokenizer Mission E's base would have."""
    mixture = data.smoke_mixture()
    mixture = dataclasses.replace(mixture, recipe=dataclasses.replace(mixture.recipe, corpus_docs=600))
    tokenizer = train_tokenizer([c + t for c, t in mixture.documents()], mixture.recipe.vocab_size)
    recipe = Recipe(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    model = TokenShiftLlamaForCausalLM(recipe.config(tokenizer))  # type: ignore[arg-type]
    return save_model(model, tokenizer, path)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("mission_e") / "base")


def test_every_arm_holds_at_most_the_budget_and_nearly_all_of_it(base: Path) -> None:
    model, tok = load_model(base)
    shapes = Shapes.of(model.config)
    budget = budget_bytes(shapes, 48)
    prompt = " ".join(["The grass is green. The sky is blue."] * 40)
    for name, spec in A.ARMS.items():
        if spec.full:
            continue
        arm = A.build(model, spec, A.budget_tokens(spec, shapes, budget))
        driver.answer(arm, tok, prompt, chunk=16, max_new_tokens=2)
        per_token = shapes.kv_per_token(A.SCORES + (1 if spec.bem else 0))
        assert budget - per_token < arm.peak_bytes <= budget, name


def test_the_references_are_full_kv_and_a_recomputed_window(base: Path) -> None:
    model, _ = load_model(base)
    driver.eager(model)
    ids = torch.randint(3, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    full = E.reference_nll(model, ids, window=8, max_positions=512)
    assert full.shape == (95,)
    # A window at least the length recomputes exactly the full pass; full KV fed chunk by chunk too.
    assert torch.allclose(driver.recompute_nll(model, ids, window=96, chunk=16), full, atol=1e-5)
    arm = A.build(model, A.ARMS["full_kv"], 0)
    assert torch.allclose(driver.stream_nll(arm, ids, chunk=16), full, atol=1e-5)
    # A short window sees less, so it differs; and it is what a fresh pass over the window gives.
    short = driver.recompute_nll(model, ids, window=8, chunk=16)
    assert not torch.allclose(short, full, atol=1e-3)
    with torch.no_grad():
        logits = model(input_ids=ids[:, 24:48], use_cache=False).logits[0].float()
    by_hand = -torch.log_softmax(logits[8:], -1)[:-1].gather(1, ids[0, 33:48, None]).squeeze(1)
    assert torch.allclose(short[32:47], by_hand, atol=1e-5)


def test_the_spike_ratio_is_the_worst_windows_perplexity_ratio() -> None:
    ref = torch.ones(12)
    arm = torch.ones(12)
    arm[4:8] += 0.5  # the second 4-token window: PPL e^1.5 / e^1
    assert E.spike_ratio(arm, ref, window=4) == pytest.approx(float(torch.exp(torch.tensor(0.5))))
    assert E.spike_ratio(ref, ref, window=4) == pytest.approx(1.0)


def test_a_seed_writes_every_row_and_value_the_gates_read(base: Path, tmp_path: Path) -> None:
    profile = PROFILES["tiny"]
    frozen = {k: v.clone() for k, v in load_model(base)[0].state_dict().items()}
    summary = run_mission_e(base, profile=profile, seed=1, out_dir=tmp_path, reporter=MemoryReporter())
    rows = pd.read_parquet(tmp_path / "scores.parquet")
    lengths = profile.eval.lengths
    # Full KV only where the length fits the base's 512 positions with its answer.
    fitting = [n for n in lengths if n + max(E.MAX_NEW.values()) <= 512]
    assert set(rows[rows.arm == "full_kv"].metric.str.extract(r"acc_(\d+)")[0].dropna().astype(int)) == set(
        fitting
    )
    for arm in ("window", "h2o", "infini", "bem"):
        got = set(rows[rows.arm == arm].metric)
        assert {f"acc_{n}" for n in lengths} <= got, arm
    # best_kv is the KV-only arm the development split chose, row for row.
    best = summary["best_kv"]
    assert best == max(A.KV_ONLY, key=lambda n: summary["arms"][n]["dev_accuracy"])
    mine = rows[rows.arm == best].drop(columns="arm").reset_index(drop=True)
    copied = rows[rows.arm == "best_kv"].drop(columns="arm").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, copied)
    # The gates' metrics exist, and every value guard has its value.
    gates = SPEC["gates"]
    for g in gates["preconditions"] + gates["claims"] + gates["guards"]:
        if g.get("statistic") == "value":
            assert g["metric"] in summary["values"], g["name"]
            continue
        metric = g["metric"]
        for arm in (g.get("arm"), g.get("variant"), g.get("baseline")):
            if arm:
                assert not rows[(rows.arm == arm) & (rows.metric == metric)].empty, (g["name"], arm)
    assert summary["values"]["state_over_budget"] <= 1.0
    # The gates' names are the lengths' own rows, under the profile's first and largest lengths.
    for arm in ("bem", "full_kv"):
        mine = rows[rows.arm == arm].pivot_table(index="example_id", columns="metric", values="value")
        first = f"acc_{lengths[0]}"
        assert mine["acc_training"].dropna().equals(mine[first].dropna())
    bem = rows[rows.arm == "bem"].pivot_table(index="example_id", columns="metric", values="value")
    assert bem["acc_largest"].dropna().equals(bem[f"acc_{max(lengths)}"].dropna())
    # The memory arms learnt: Infini's memory, then BEM's controller on that same memory; the base did
    # not move.
    arms = summary["arms"]
    assert set(arms["infini"]["memory_losses"]) == {"compression", "loss"}
    assert set(arms["bem"]["controller_losses"]) == {"compression", "reconstruction", "alignment", "loss"}
    assert arms["bem"]["beta"] == arms["infini"]["beta"]
    assert arms["infini"]["beta"] != [[0.5] * 2] * 2  # β moved from sigmoid(0)
    after = load_model(base)[0].state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    # The tables read the summary back: one seed's means are its own.
    tables.main([str(tmp_path), "--json", str(tmp_path / "tables.json")])
    got = json.loads((tmp_path / "tables.json").read_text())
    assert got["accuracy"]["acc"]["bem"]["8192"] == arms["bem"]["means"]["acc_8192"]
    assert got["best_kv"] == [best]

"""The suite's runner on a tiny random model with the suite's tokenizer: every arm trains only what it
adds, writes the rows its gates read, and measures the values its guards read; the scores follow their
definitions; decoding is the model's own greedy choice."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from bem.core.models import load_model, save_model
from bem.core.reporter import MemoryReporter
from bem.core.smoke_base import Recipe, train_tokenizer
from bem.core.token_shift import TokenShiftLlamaForCausalLM
from bem.core.train import Pair
from bem.missions.v13 import arms as A
from bem.missions.v13 import data
from bem.missions.v13.recipe import build, run_v13, score_one
from bem.missions.v13.train import TrainConfig, decode, train

ROOT = Path(__file__).resolve().parents[2]
SPEC = tomllib.loads((ROOT / "schemas" / "missions" / "v13.toml").read_text())


def tiny_base(path: Path) -> Path:
    """A randomly initialised 2-layer model (4 heads, for PT1's groups) with the suite's tokenizer."""
    mixture = data.smoke_mixture()
    tokenizer = train_tokenizer([c + t for c, t in mixture.documents()[:3000]], mixture.recipe.vocab_size)
    recipe = Recipe(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = TokenShiftLlamaForCausalLM(recipe.config(tokenizer))  # type: ignore[arg-type]
    return save_model(model, tokenizer, path)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("v13") / "base")


def gate_reads(arm: str) -> tuple[set[str], set[str]]:
    """(metrics of score rows, value keys) the TOML's gates read of `arm`."""
    rows, values = set(), set()
    gates = SPEC["gates"]
    for g in gates["preconditions"] + gates["claims"] + gates["guards"]:
        if arm not in (g.get("arm"), g.get("variant"), g.get("baseline")):
            continue
        if g.get("statistic") == "value":
            values.add(g["metric"])
        else:
            rows.add(g["metric"])
    return rows, values


@pytest.mark.parametrize("arm", A.ARMS)
def test_each_arm_writes_what_its_gates_read_and_trains_only_what_it_adds(
    base: Path, tmp_path: Path, arm: str
) -> None:
    reporter = MemoryReporter()
    summary = run_v13(base, profile="tiny", seed=1, out_dir=tmp_path, reporter=reporter, arm=arm)
    metrics = {r.metric.partition("#")[0] for r in reporter.rows}
    rows, values = gate_reads(arm)
    assert rows <= metrics, (arm, rows - metrics)
    assert values <= set(summary["values"]), (arm, values - set(summary["values"]))
    assert {r.arm for r in reporter.rows} == {arm}
    if arm not in ("anchor", "MM"):
        assert abs(summary["values"][f"param_ratio_{arm}"] - 1) <= 0.05
    assert summary["train"]["steps"] == 3
    assert (tmp_path / "scores.parquet").is_file()


def test_training_moves_the_adapters_and_nothing_of_the_base(base: Path) -> None:
    lm, tok = load_model(base)
    frozen = {k: v.clone() for k, v in lm.state_dict().items()}
    model = build(
        "V3", lm, A.Shape.of_config(lm.config.to_dict()), A.fit("V3", A.Shape.of_config(lm.config.to_dict()))
    )
    before = [p.detach().clone() for p in model.adapter_parameters()]
    pairs = [Pair(e.prompt, e.target) for e in data.text_examples("qa", "train", 8)]
    train(model, tok, pairs, TrainConfig(steps=3, batch_size=4), 1, MemoryReporter(), "V3")
    assert any(not torch.equal(a, p) for a, p in zip(before, model.adapter_parameters(), strict=True))
    for name, value in lm.state_dict().items():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name


def test_decoding_is_the_models_own_greedy_choice(base: Path) -> None:
    lm, tok = load_model(base)
    shape = A.Shape.of_config(lm.config.to_dict())
    model = build("anchor", lm, shape, A.fit("anchor", shape)).eval()
    prompt = data.text_examples("qa", "test", 1)[0].prompt
    got = decode(model, tok, [prompt], 3)[0]
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(3):
            nxt = int(lm(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert got == tok.decode(new, skip_special_tokens=True)


def test_scores_follow_their_definitions() -> None:
    qa = data.Example("q", "qa", "p", " 12")
    assert score_one(qa, " 12\nmore") == {"qa_em": 1.0, "qa_f1": 1.0, "em": 1.0, "f1": 1.0}
    assert score_one(qa, " 13")["em"] == 0.0
    js = data.Example("j", "json", "p", ' {"a": 1}', {"a": 1})
    assert score_one(js, ' {"a": 1} trailing') == {"json_valid": 1.0, "json_fields": 1.0}
    assert score_one(js, ' {"a": 1')["json_valid"] == 0.0
    tr = data.Example("t", "translate", "p", " ka lo mi")
    row = score_one(tr, " ka lo mi")
    assert {k.partition("#")[0] for k in row} == {"chrf", "bleu"}


def test_splits_hold_different_examples() -> None:
    for task in data.TASKS:
        train = {e.prompt for e in data.text_examples(task, "train", 50)}
        test = {e.prompt for e in data.text_examples(task, "test", 50)}
        assert not train & test, task
    layouts = {tuple(s.things) for s in data.vqa_scenes("train", 200)}
    assert not layouts & {tuple(s.things) for s in data.vqa_scenes("test", 100)}
    conflict = data.vqa_scenes("test", 20, conflict=True)
    assert all(s.conflict for s in conflict) and all(
        s.example_id.startswith("scene-conflict") for s in conflict
    )

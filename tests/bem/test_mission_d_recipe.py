"""Mission D's arms on a tiny model with the mission's tokenizer: what each clamp lets move, the plateau
rule, S1's id map, the FLOPs count against the model's shapes, and every row the mission's gates read."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bem.core.models import load_model, save_model
from bem.core.reporter import MemoryReporter
from bem.core.reporter import row_means as arm_means
from bem.core.smoke_base import Recipe, train_tokenizer
from bem.core.token_shift import TokenShiftLlamaForCausalLM
from bem.missions.mission_d import data, scramble
from bem.missions.mission_d import train as T
from bem.missions.mission_d.recipe import PROFILES, run_mission_d

ROOT = Path(__file__).resolve().parents[2]
TINY = PROFILES["tiny"]


def tiny_base(path: Path) -> Path:
    """A randomly initialised 2-layer model with the tokenizer Mission D's base would have (every word
    and shadow word one token): what the arms need, without minutes of pretraining."""
    mixture = data.smoke_mixture()
    tokenizer = train_tokenizer([c + t for c, t in mixture.documents()[:4000]], mixture.recipe.vocab_size)
    recipe = Recipe(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model = TokenShiftLlamaForCausalLM(recipe.config(tokenizer))  # type: ignore[arg-type]
    return save_model(model, tokenizer, path)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("mission_d") / "base")


def trained(base: Path, arm: str, stages: int | None = None) -> tuple[T.ArmModel, T.ArmModel, T.Trained]:
    lm, tok = load_model(base)
    items = T.items_of(data.make_examples("train", 24, 0))
    before = T.build(lm, tok, TINY.train, items, 1)
    model = T.build(lm, tok, TINY.train, items, 1)
    trainer = T.Trainer(model, tok, T.ARMS[arm], TINY.train, items, T.shadow_inverse(tok, scramble.Shadow(0)),
                        1, MemoryReporter(), arm)  # fmt: skip
    return before, model, trainer.run()


def moved(a: torch.nn.Module, b: torch.nn.Module) -> set[str]:
    theirs = dict(b.named_parameters())
    return {n for n, p in a.named_parameters() if not torch.equal(p, theirs[n])}


def test_the_hard_clamp_moves_only_the_adapters_and_the_thaw_moves_the_decoder(base: Path) -> None:
    before, model, run = trained(base, "sep_phase0")
    changed = moved(before, model)
    assert changed and all(".U" in n or ".V" in n or n.startswith("controller.") for n in changed), changed
    assert [s.name for s in run.stages] == ["phase0"]
    before, model, run = trained(base, "sep")
    changed = moved(before, model)
    assert [s.name for s in run.stages] == ["phase0", "thaw1"]  # 2 layers, thawed 2 at a time
    assert any(".base.weight" in n or "mlp.up_proj" in n for n in changed), changed
    assert not any("embed_tokens" in n for n in changed)  # the embeddings never train


def test_without_the_hard_clamp_phase0_moves_the_decoder_and_the_soft_clamp_less(base: Path) -> None:
    before, none_model, _ = trained(base, "sep_unclamped")
    _, soft_model, _ = trained(base, "sep_soft")
    layer = "lm.model.layers.0.mlp.up_proj.weight"
    assert layer in moved(before, none_model) and layer in moved(before, soft_model)
    ref = dict(before.named_parameters())

    def drift(m: T.ArmModel) -> float:
        layers = [(n, p) for n, p in m.named_parameters() if n.startswith("lm.model.layers")]
        return sum(float(((p.detach() - ref[n]) ** 2).sum()) for n, p in layers)

    assert drift(soft_model) < drift(none_model)


def test_a_plateau_is_less_than_the_threshold_over_the_window() -> None:
    assert not T.plateaued([1.0, 0.9, 0.8], 3, 0.005)  # not enough evaluations yet
    assert T.plateaued([1.0, 0.9, 0.8, 0.799, 0.7985, 0.798], 3, 0.005)  # .25% better
    assert not T.plateaued([1.0, 0.9, 0.8, 0.79, 0.795, 0.8], 3, 0.005)  # 1.25% better
    assert T.plateaued([1.0, 0.9, 0.8, 0.85, 0.9, 0.95], 3, 0.005)  # worse


def test_s1_ids_swap_each_word_with_its_shadow_word(base: Path) -> None:
    _, tok = load_model(base)
    pi = scramble.Shadow(0)
    inverse = T.shadow_inverse(tok, pi)
    assert torch.equal(inverse[inverse], torch.arange(len(tok)))  # an involution
    source = data.make_examples("test", 1, 0)[0].source
    ids = tok(f" {source}", add_special_tokens=False)["input_ids"]
    view = tok(f" {pi(source)}", add_special_tokens=False)["input_ids"]
    assert inverse[torch.tensor(ids)].tolist() == view


def test_flops_are_counted_from_the_model_shapes(base: Path) -> None:
    lm, _ = load_model(base)
    c = lm.config
    model = T.ArmModel(lm, TINY.train)
    d, f, L, v, r = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size, TINY.train.rank
    per_layer = 4 * d * d + 3 * d * f + r * (d + d) + r * (f + d)  # q, k, v, o; gate, up, down; two BEMs
    assert T.matmul_params(model) == L * per_layer + v * d
    count = T.FlopCount()
    count.forward(10, 100)
    count.backward(10, 100, 7)
    assert count.total == 2 * 100 * 10 + 2 * 100 * 10 + 2 * 7 * 10


def test_every_gate_reads_rows_its_arms_have_and_sep_phase0_is_seps_phase0(
    base: Path, tmp_path: Path
) -> None:
    everything = run_mission_d(
        base, profile="tiny", seed=1, out_dir=tmp_path / "all", reporter=MemoryReporter()
    )
    rows = pd.read_parquet(tmp_path / "all" / "scores.parquet")
    spec = tomllib.loads((ROOT / "schemas" / "missions" / "mission_d.toml").read_text())
    have = {(a, m.split("#")[0]) for a, m in zip(rows.arm, rows.metric, strict=True)}
    gates = spec["gates"]
    for gate in gates["claims"] + gates["preconditions"]:
        for role in ("variant", "baseline", "arm"):
            if role in gate:
                assert (gate[role], gate["metric"]) in have, gate
    # A corpus metric's statistics: 18 columns of chrF, 10 of BLEU per example.
    sep = rows[rows.arm == "sep"]
    assert sep.metric.str.startswith("chrf#").sum() == 18 * TINY.n_test
    assert sep.metric.str.startswith("bleu#").sum() == 10 * TINY.n_test
    runs = everything["arms"]
    assert (
        everything["values"]["phase0_flops_ratio"]
        == runs["sep_phase0"]["flops"] / runs["sep_unclamped"]["flops"]
    )
    # Scored from the sep arm's own Phase 0, it is what a run of sep_phase0 alone gives.
    alone = run_mission_d(base, profile="tiny", seed=1, out_dir=tmp_path / "alone", reporter=MemoryReporter(),
                          arms=["sep_phase0"])  # fmt: skip
    mine = rows[rows.arm == "sep_phase0"].reset_index(drop=True)
    theirs = pd.read_parquet(tmp_path / "alone" / "scores.parquet")
    pd.testing.assert_frame_equal(mine, theirs)
    assert alone["arms"]["sep_phase0"]["flops"] == runs["sep_phase0"]["flops"]


def test_arm_means_score_corpus_metrics_as_sacrebleu_does() -> None:
    import sacrebleu

    from bem.core.metrics import bleu_stats, chrf_stats
    from bem.core.reporter import ScoreRow

    examples = data.make_examples("test", 20, 0)
    hyps = [e.target if i % 3 else e.target.replace("ka", "ro") for i, e in enumerate(examples)]
    rows = []
    for e, h in zip(examples, hyps, strict=True):
        rows += [
            ScoreRow(e.example_id, "a", 1, f"chrf#{k}", v) for k, v in enumerate(chrf_stats(h, e.target))
        ]
        rows += [
            ScoreRow(e.example_id, "a", 1, f"bleu#{k}", v) for k, v in enumerate(bleu_stats(h, e.target))
        ]
        rows.append(ScoreRow(e.example_id, "a", 1, "em", float(h == e.target)))
    means = arm_means(rows)
    refs = [[e.target for e in examples]]
    assert means["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, refs).score, abs=1e-9)
    assert means["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score, abs=1e-9)
    assert means["em"] == pytest.approx(np.mean([h == e.target for h, e in zip(hyps, examples, strict=True)]))


def test_rrs_pseudo_values_are_the_jackknifes() -> None:
    from bem.missions.mission_d import metrics

    rng = np.random.default_rng(0)
    z = rng.normal(size=(30, 6))
    zv = z @ np.linalg.qr(rng.normal(size=(6, 6)))[0] + 0.5 * rng.normal(size=(30, 6))
    psi = metrics.rrs_pseudo_values(z, zv)
    chance = metrics.chance_cka(z, zv)
    whole = (metrics.linear_cka(z, zv) - chance) / (1 - chance)
    assert whole == pytest.approx(metrics.rrs(z, zv))
    loo = np.array([(metrics.linear_cka(np.delete(z, i, 0), np.delete(zv, i, 0)) - chance) / (1 - chance)
                    for i in range(30)])  # fmt: skip
    assert psi.mean() == pytest.approx(30 * whole - 29 * loo.mean())  # the jackknife's bias-corrected RRS
    # Their variance over n is the jackknife's variance of RRS, (n−1)/n·Σ(RRS_(−i) − mean)².
    assert psi.var(ddof=1) / 30 == pytest.approx(29 / 30 * ((loo - loo.mean()) ** 2).sum())


def test_length_matched_chance_gives_no_credit_for_encoding_length_alone() -> None:
    """States that carry a sentence's length and nothing else of it: a random pairing makes them look
    robust (high RRS); pairing within lengths shows they share nothing more."""
    from bem.missions.mission_d import metrics

    rng = np.random.default_rng(1)
    lengths = rng.integers(6, 13, size=200)
    direction = rng.normal(size=16)
    z = np.outer(lengths, direction) + rng.normal(size=(200, 16))
    zv = np.outer(lengths, direction) + rng.normal(size=(200, 16))
    assert metrics.rrs(z, zv) > 0.5
    assert abs(metrics.rrs(z, zv, strata=lengths.tolist())) < 0.1
    same = z + 0.01 * rng.normal(size=z.shape)  # a view whose states are the sentence's own
    assert metrics.rrs(z, same, strata=lengths.tolist()) > 0.95


def test_a_base_whose_words_are_several_tokens_trains_s1_on_the_target_and_leaves_eqe_undefined(
    tmp_path: Path,
) -> None:
    from bem.core.models import build_tiny_llama, byte_tokenizer, tiny_llama_config

    byte_base = save_model(build_tiny_llama(tiny_llama_config()), byte_tokenizer(), tmp_path / "bytes")
    _, tok = load_model(byte_base)
    assert T.shadow_inverse(tok, scramble.Shadow(0)) is None
    run_mission_d(byte_base, profile="tiny", seed=1, out_dir=tmp_path / "out", reporter=MemoryReporter(),
                  arms=["sep"])  # fmt: skip
    rows = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert rows[rows.metric == "eqe"].value.isna().all() and len(rows[rows.metric == "eqe"]) == TINY.n_test
    assert rows[rows.metric == "rrs_s1"].value.notna().all()


def test_chance_pairings_never_pair_a_sentence_with_its_own_view() -> None:
    """Were the chance pairing allowed fixed points, a view identical to its sentence would lift the
    chance CKA with the true pairing; a derangement keeps it at chance, singletons included."""
    from bem.missions.mission_d import metrics

    rng = np.random.default_rng(2)
    z = rng.normal(size=(9, 4))
    strata = [6, 6, 7, 8, 8, 8, 9, 10, 10]  # 7 and 9 alone: merged into a neighbour
    groups = metrics._groups(strata)
    assert sorted(np.concatenate(groups).tolist()) == list(range(9)) and min(len(g) for g in groups) >= 2
    # Each draw is a derangement: pairing z with itself under it never gives CKA 1.
    for seed in range(20):
        assert metrics.chance_cka(z, z, strata, seed=seed, draws=1) < 0.999

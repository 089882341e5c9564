"""Mission A end to end on the ~90k-parameter test base at the `tiny` profile: plumbing and the
properties each part must have. Whether the router beats the fused adapter is the mission's data."""

from __future__ import annotations

import random

import pytest
import torch

from bem.core.attach import role_sites
from bem.core.layers import linear_dims
from bem.core.models import byte_tokenizer, load_model
from bem.core.reporter import MemoryReporter
from bem.missions.mission_a import data as skills
from bem.missions.mission_a import planner
from bem.missions.mission_a import recipe as ma


@pytest.fixture(scope="module")
def run(base_dir, tmp_path_factory):
    reporter = MemoryReporter()
    summary = ma.run_mission_a(
        base_dir, profile="tiny", seed=3, out_dir=tmp_path_factory.mktemp("run"), reporter=reporter
    )
    return summary, reporter


def test_every_arm_scores_every_test_example(run) -> None:
    summary, reporter = run
    test = skills.make_mixture(skills.COMPOSITE, "test", ma.PROFILES["tiny"].n_test, ma.DATA_SEED)
    for arm in ma.ARMS:
        for metric in ("em", "f1", "plan_length", "flip_rate", "latency_ms"):
            got = {r.example_id for r in reporter.rows if r.arm == arm and r.metric == metric}
            assert got == {e.example_id for e in test}, (arm, metric)
        run_rows = {r.metric: r.value for r in reporter.rows if r.arm == arm and r.example_id == "run-seed3"}
        assert set(run_rows) == {"kv_hit_ratio", "index_swap_pass", "cache_safety_rate"}
        assert 0 <= run_rows["index_swap_pass"] <= 1 and run_rows["cache_safety_rate"] == 1.0
    assert summary["kv_hit_ratio"]["fused"] == 1.0
    assert all(r.value >= 1 for r in reporter.rows if r.metric == "plan_length")
    assert all(r.value == 1 for r in reporter.rows if r.metric == "plan_length" and r.arm == "fused")


def test_fused_rank_gives_parameter_parity(run) -> None:
    summary, _ = run
    assert 0.9 <= summary["parity"]["parameter_ratio"] <= 1.1  # rounding to whole ranks on a tiny model
    assert summary["values"]["adapter_param_ratio"] == summary["parity"]["parameter_ratio"]


def test_action_codes_are_the_composition_of_the_expert(base_dir) -> None:
    """A block in SVD form with the action's code is exactly `planner.compose` of the expert's ΔW."""
    model, _ = load_model(base_dir)
    torch.manual_seed(0)
    factors = {}
    for name in (*ma.EXPERTS, "fused"):
        factors[name] = {}
        for site, _ in role_sites(model):
            d_in, d_out = linear_dims(model.get_submodule(site))
            factors[name][site] = (torch.randn(8, d_in), torch.randn(d_out, 8) * 0.5)
    att, blocks = ma.load_blocks(model, factors)
    action = planner.MacroAction(1, 0, 0, 0, 1.7)  # reason, local, rank 8, bias 1.7
    codes = ma.action_code(blocks, action, "reason")
    for site_name, site in att.sites.items():
        a, b = factors["reason"][site_name]
        P, Q = planner.compose(b.double(), a.double(), action)
        dense = (site.U.double() * codes[site_name]) @ site.V.double()
        assert torch.allclose(dense, P @ Q.T, atol=1e-4)


def test_teacher_follows_the_regions_and_profiles() -> None:
    tok = byte_tokenizer()
    ex = skills.make_examples("lookup_sum_format", "train", 1, 0)[0]
    n = len(tok(ex.prompt, add_special_tokens=False)["input_ids"]) // ma.CHUNK + 2
    wanted = ma.region_skills(ex, tok, n)
    assert wanted[0] == "retrieve" and wanted[-1] == "formalise" and "reason" in wanted
    acts = ma.teacher_actions(wanted, random.Random(0))
    for skill, act in zip(wanted, acts, strict=True):
        scope, spans, ranks, _ = ma.TEACHER[skill]
        assert ma.EXPERTS[act.expert] == skill and planner.SCOPES[act.scope] == scope
        assert act.chunks in spans and act.rank_budget in ranks and 0.1 <= act.bias <= 2.0


def test_cached_decoding_equals_rereading_everything(base_dir) -> None:
    """Chunk-constant codes keep the KV cache valid: the cached decode is the no-cache decode."""
    model, tok = load_model(base_dir)
    torch.manual_seed(0)
    factors = {
        name: {site: (torch.randn(8, linear_dims(model.get_submodule(site))[0]),
                      torch.randn(linear_dims(model.get_submodule(site))[1], 8) * 0.3)
               for site, _ in role_sites(model)}
        for name in (*ma.EXPERTS, "fused")
    }  # fmt: skip
    att, blocks = ma.load_blocks(model, factors)
    ex = skills.make_examples("lookup_sum", "test", 1, 0)[0]
    n = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    actions = [planner.MacroAction(k % 3, k % 2, 0, 0, 0.5 + 0.3 * k) for k in range(n // ma.CHUNK + 2)]
    chunk_codes = ma.plan_codes(blocks, actions)
    got = ma.decode(model, tok, att, ex.prompt, chunk_codes, 12)
    ids = tok(ex.prompt, add_special_tokens=False)["input_ids"]
    codes = ma.token_codes(chunk_codes, n + 12, torch.float32)
    with torch.no_grad():
        for _ in range(12):
            with att.codes({k: v[:, : len(ids)] for k, v in codes.items()}):
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
    assert got == tok.decode(ids[n:], skip_special_tokens=True).split("\n")[0].strip()
    assert len(set(map(str, (c["model.layers.0.mlp.down_proj"] for c in chunk_codes)))) > 1  # codes do change

"""Attaching by role: family tables, rank schedule, q/k/v refusal, budget."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bem.core.attach import DEFAULT_RANK_SCHEDULE, attach_bems, rank_for_layer
from bem.core.layers import BEMLinear
from tests.bem.conftest import randomize


def test_llama_attaches_to_o_proj_and_down_proj(llama) -> None:
    att = attach_bems(llama, max_overhead=1.0)
    assert sorted(att.sites) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")
    )
    assert all(isinstance(s.base, nn.Linear) for s in att.sites.values())
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in att.sites for p in ("U", "V")}


def test_gpt2_attaches_to_conv1d_sites_and_hides_the_transpose(gpt2) -> None:
    att = attach_bems(gpt2, max_overhead=1.0)
    assert sorted(att.sites) == sorted(
        f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_proj", "mlp.c_proj")
    )
    site = att.sites["transformer.h.0.mlp.c_proj"]
    assert isinstance(site.base, Conv1D)
    randomize(att)
    site.dropout.p = 0.0
    code = torch.randn(site.rank)
    x = torch.randn(2, site.d_in)
    site.code = code.expand(2, -1)
    # Conv1D stores W as d_in×d_out; delta_weight is in nn.Linear's d_out×d_in layout.
    expected = x @ (site.base.weight + site.delta_weight(code).T) + site.base.bias
    torch.testing.assert_close(site(x[:, None])[:, 0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["q_proj", "k_proj", "self_attn.v_proj", "model.layers.0.self_attn.q_proj"])
def test_qkv_sites_are_refused_by_name(llama, name) -> None:
    with pytest.raises(ValueError, match=r"refusing BEM site .*q/k/v"):
        attach_bems(llama, ["W_O", name], max_overhead=1.0)
    assert not any(isinstance(m, BEMLinear) for m in llama.modules())


def test_gpt2_fused_qkv_is_refused(gpt2) -> None:
    with pytest.raises(ValueError, match="c_attn"):
        attach_bems(gpt2, ["attn.c_attn"], max_overhead=1.0)


def test_qkv_in_rank_overrides_is_refused(llama) -> None:
    with pytest.raises(ValueError, match="refusing"):
        attach_bems(llama, ranks={"model.layers.0.self_attn.k_proj": 4}, max_overhead=1.0)


def test_unknown_site_and_family_list_candidates(llama) -> None:
    with pytest.raises(ValueError, match=r"unknown BEM site 'up_proj'.*W_O"):
        attach_bems(llama, ["up_proj"], max_overhead=1.0)

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"unknown model family.*proj"):
        attach_bems(Odd())


def test_rank_schedule_over_relative_depth() -> None:
    sched = DEFAULT_RANK_SCHEDULE
    assert [rank_for_layer(i, 7, sched) for i in range(7)] == list(sched)
    # Two layers: the first and the middle of the schedule.
    assert [rank_for_layer(i, 2, sched) for i in range(2)] == [sched[0], sched[len(sched) // 2]]
    assert [rank_for_layer(i, 14, sched) for i in range(14)] == [r for r in sched for _ in range(2)]


def test_rank_override_and_flat_code_layout(llama) -> None:
    name = "model.layers.1.mlp.down_proj"
    att = attach_bems(llama, rank_schedule=[4], ranks={name: 6}, max_overhead=1.0)
    assert att.ranks[name] == 6
    assert att.total_rank == 4 * 3 + 6
    code = torch.arange(att.total_rank, dtype=torch.float32)[None]
    with att.codes(code):
        got = torch.cat([s.code for s in att.sites.values()], dim=-1)
    assert torch.equal(got, code)
    assert all(s.code is None for s in att.sites.values())  # cleared after the block
    with pytest.raises(ValueError, match="code width 5"):
        att.set_codes(torch.zeros(1, 5))


def test_shared_code_when_ranks_are_equal(llama) -> None:
    att = attach_bems(llama, rank_schedule=[4], max_overhead=1.0)
    code = torch.randn(2, 4)
    with att.codes(code):
        assert all(s.code is code for s in att.sites.values())


def test_budget_is_enforced_unless_loosened(llama) -> None:
    fresh = type(llama)(llama.config)
    with pytest.raises(ValueError, match=r"over the 5.0% budget"):
        attach_bems(fresh, rank_schedule=[32])
    assert attach_bems(type(llama)(llama.config)).check_budget() <= 0.05  # the default schedule fits
    att = attach_bems(llama, max_overhead=1.0)
    ratio = att.check_budget(max_overhead=1.0)
    assert ratio == pytest.approx(att.num_parameters() / att.base_parameters())
    with pytest.raises(ValueError, match="adapter parameters"):
        att.check_budget(nn.Linear(64, 4096), max_overhead=ratio + 0.01)


def test_detach_restores_the_base(llama, ids) -> None:
    with torch.no_grad():
        before = llama(ids).logits
    att = attach_bems(llama, max_overhead=1.0)
    randomize(att)
    att.detach()
    assert not any(isinstance(m, BEMLinear) for m in llama.modules())
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, before)

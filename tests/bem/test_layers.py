"""The BEM layer against its definition y = W0·x + s·U·diag(c)·Vᵀ·x."""

import pytest
import torch
from torch import nn

from bem.core.attach import attach_bems
from bem.core.layers import BEMLinear
from tests.bem.conftest import randomize


def test_fresh_layer_equals_base_whatever_the_code() -> None:
    base = nn.Linear(16, 12)
    layer = BEMLinear(base, rank=4)
    x = torch.randn(2, 5, 16)
    layer.code = torch.randn(2, 4) * 5
    assert torch.equal(layer(x), base(x))  # U is zero-initialised


def test_matches_dense_delta_w() -> None:
    base = nn.Linear(16, 12)
    layer = BEMLinear(base, rank=4, dropout=0.0)
    nn.init.normal_(layer.U)
    code = torch.randn(4)
    x = torch.randn(3, 16)
    layer.code = code.expand(3, 4)
    expected = x @ (base.weight + layer.delta_weight(code)).T + base.bias
    torch.testing.assert_close(layer(x[:, None])[:, 0], expected, atol=1e-5, rtol=1e-5)


def test_code_zero_gives_base_outputs_exactly(llama, ids) -> None:
    with torch.no_grad():
        base_logits = llama(ids).logits
    att = attach_bems(llama, max_overhead=1.0)
    randomize(att)
    with torch.no_grad(), att.codes(torch.zeros(ids.shape[0], att.total_rank)):
        assert torch.equal(llama(ids).logits, base_logits)
    with torch.no_grad(), att.codes(torch.ones(ids.shape[0], att.total_rank)):
        assert not torch.allclose(llama(ids).logits, base_logits, atol=1e-3)  # the test can fail


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_mixed_batch_equals_per_row_outputs(model_name, request, ids) -> None:
    model = request.getfixturevalue(model_name)
    att = attach_bems(model, max_overhead=1.0)
    randomize(att)
    model.eval()
    codes = torch.randn(ids.shape[0], att.total_rank)
    with torch.no_grad(), att.codes(codes):
        mixed = model(ids).logits
    for row in range(ids.shape[0]):
        with torch.no_grad(), att.codes(codes[row : row + 1]):
            single = model(ids[row : row + 1]).logits
        assert (mixed[row] - single[0]).abs().max() <= 1e-5
    assert not torch.allclose(mixed[0], mixed[1])


def test_per_token_code_must_cover_the_input() -> None:
    layer = BEMLinear(nn.Linear(8, 8), rank=2)
    layer.code = torch.ones(1, 3, 2)
    with pytest.raises(ValueError, match="per-token code covers 3 tokens"):
        layer(torch.randn(1, 4, 8))


def test_reorthonormalize_keeps_span_and_orthonormality() -> None:
    layer = BEMLinear(nn.Linear(32, 24), rank=6, orthonormal=True)
    with torch.no_grad():
        layer.U.add_(0.1 * torch.randn_like(layer.U))
    before = layer.U.detach().clone()
    layer.reorthonormalize()
    eye = torch.eye(6)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-5, rtol=0)
    # Same column span: projecting the old columns onto the new basis loses nothing.
    torch.testing.assert_close(layer.U @ (layer.U.T @ before), before, atol=1e-5, rtol=0)


def test_two_dimensional_inputs_take_one_code_per_row() -> None:
    base = nn.Linear(8, 6)
    layer = BEMLinear(base, rank=3, dropout=0.0)
    nn.init.normal_(layer.U)
    codes = torch.randn(4, 3)
    x = torch.randn(4, 8)
    layer.code = codes
    expected = torch.stack(
        [x[i] @ (base.weight + layer.delta_weight(codes[i])).T + base.bias for i in range(4)]
    )
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_after_projection_blocks_are_orthogonal_and_the_trust_region_holds(llama) -> None:
    """Three BEMs share each site in 4-column blocks; governance acts on the real attached layers."""
    from bem.core.governance import Blocks, default_tau, max_cross_block, sigma_clamp, trust_region

    att = attach_bems(llama, rank_schedule=[12], orthonormal=True, max_overhead=10.0)
    randomize(att)  # knocks the bases off orthonormality and makes the blocks overlap
    blocks = Blocks.from_widths([4, 4, 4])
    tau = default_tau(2)
    for site in att.sites.values():
        assert max_cross_block(site.U, blocks) > 1e-3
        site.orthogonalize_blocks(blocks)
        assert max_cross_block(site.U, blocks) <= 1e-6
        assert max_cross_block(site.V.T, blocks) <= 1e-6
        code = torch.randn(12) * 10
        code = trust_region(sigma_clamp(code, 2.0, site.scaling), tau, site.scaling)
        dense = site.delta_weight(code).double()
        assert torch.linalg.matrix_norm(dense) <= tau + 1e-5
        assert torch.linalg.svdvals(dense)[0] <= 2.0 + 1e-5
        # The trust region was active: the unprojected code would have broken it.
        assert torch.linalg.matrix_norm(site.delta_weight(torch.randn(12) * 10).double()) > tau

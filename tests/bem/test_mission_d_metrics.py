"""Mission D's metrics against cases whose answer is known: a model made exactly equivariant by copying
its embedding and unembedding rows into a shadow vocabulary gives RRS 1 and EqE 0; LDC finds a cue
planted in synthetic features and not one that is absent; CKA has its invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from bem.core.models import tiny_llama_config
from bem.missions.mission_d import metrics

V = 40  # the language's ids; the shadow vocabulary is V .. 2V-1


def shadowed_model(seed: int = 0) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """A model over 2V ids whose shadow rows (embedding and unembedding) are copies of the originals
    under a permutation π, so f(π x) = π f(x) exactly; returns it and π as shadow ids."""
    config = tiny_llama_config()
    config.vocab_size = 2 * V
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    pi = V + torch.randperm(V, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.model.embed_tokens.weight[pi] = model.model.embed_tokens.weight[:V].clone()
        model.lm_head.weight[pi] = model.lm_head.weight[:V].clone()
    return model, pi


def test_an_exactly_equivariant_model_has_rrs_1_and_eqe_0() -> None:
    model, pi = shadowed_model()
    x = torch.randint(0, V, (24, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    with torch.no_grad():
        out, out_view = (model(input_ids=ids, output_hidden_states=True) for ids in (x, pi[x]))
    z = metrics.pooled(out.hidden_states[-1], mask).numpy()
    z_view = metrics.pooled(out_view.hidden_states[-1], mask).numpy()
    assert metrics.rrs(z, z_view) == pytest.approx(1.0, abs=1e-6)
    assert metrics.retrieval_at_1(z, z_view).mean() == 1.0
    assert metrics.alignment(z, z_view).max() == pytest.approx(0.0, abs=1e-10)
    eqe = metrics.eqe(out.logits[..., :V], out_view.logits, pi)
    assert eqe.abs().max().item() < 1e-6
    # The same model read through the wrong permutation is not equivariant: the metric can tell.
    wrong = pi[torch.randperm(V, generator=torch.Generator().manual_seed(9))]
    assert metrics.eqe(out.logits[..., :V], out_view.logits, wrong).min().item() > 1e-3


def test_rrs_is_about_0_for_views_that_carry_no_pairing() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 16))
    unrelated = rng.normal(size=(200, 16))
    assert abs(metrics.rrs(z, unrelated)) < 0.1
    rotated = z @ np.linalg.qr(rng.normal(size=(16, 16)))[0] * 3.0  # CKA ignores rotation and scale
    assert metrics.rrs(z, rotated) == pytest.approx(1.0, abs=1e-9)


def test_ldc_finds_a_planted_cue_and_not_an_absent_one() -> None:
    """Features where the cue is a linear direction (plus noise) against features without it; types are
    the examples' sentence ids, so the control task cannot be solved by memorising a type."""
    rng = np.random.default_rng(0)
    n, d = 600, 12
    labels = rng.integers(0, 2, size=n)
    types = [f"s{i}" for i in range(n)]
    planted = rng.normal(size=(n, d))
    planted[:, 0] += 3.0 * (2 * labels - 1)
    absent = rng.normal(size=(n, d))
    half = n // 2

    def ldc(x: np.ndarray) -> metrics.Decodability:
        return metrics.decodability(
            x[:half], labels[:half], types[:half], x[half:], labels[half:], types[half:], seed=1
        )

    found, missing = ldc(planted), ldc(absent)
    assert found.cue_correct.mean() > 0.95 and found.ldc > 0.8
    assert missing.ldc < 0.15
    assert found.cue_correct.shape == (n - half,)  # per test example, for the bootstrap


def test_control_labels_keep_one_label_per_type_and_the_cues_marginal() -> None:
    types = [f"t{i % 50}" for i in range(5000)]
    labels = [int(i % 4 == 0) for i in range(5000)]  # a quarter are 1
    control = metrics.control_labels(types, labels, seed=0)
    assert set(control) == set(types)
    assert 0.1 < np.mean(list(control.values())) < 0.45
    with pytest.raises(ValueError, match="one value"):
        metrics.ldc_from(np.ones(3), np.ones(3), 1.0)


def test_eqe_reads_unmapped_positions_as_they_are() -> None:
    """A view whose source positions predict shadow ids and whose target positions predict the same
    words: EqE is 0 once the target positions are marked unmapped, and not before."""
    torch.manual_seed(0)
    v = 12
    perm = torch.randperm(v)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(v)  # view id of each original id: perm maps view ids to original ids
    logits = torch.randn(2, 6, v)
    view = logits.clone()
    view[:, :4] = logits[:, :4][..., perm]  # source positions: the view's ids
    target = torch.zeros(2, 6, dtype=torch.long)
    target[:, 4:] = 1
    assert metrics.eqe(logits, view, inverse).min() > 1e-3
    assert metrics.eqe(logits, view, inverse, unmapped=target).abs().max() < 1e-6

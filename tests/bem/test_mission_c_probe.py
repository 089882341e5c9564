"""Mission C's constitution probe: scikit-learn's fit, scored in torch, on the tiny test base."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from bem.core.models import build_tiny_llama, byte_tokenizer, tiny_llama_config
from bem.missions.mission_c import data
from bem.missions.mission_c.probe import fit_probe, prompt_features


def _prompts(split: str, n: int) -> tuple[list[str], list[str]]:
    safe = [c.prompt for kind in ("utility", "benign") for c in data.make_cases(kind, split, n, seed=1)]
    unsafe = [c.prompt for kind in data.FAMILIES for c in data.make_cases(kind, split, n // 2, seed=1)]
    return safe, unsafe


def test_the_probe_scores_in_torch_as_sklearn_does_and_separates_held_out_attacks() -> None:
    model, tok = build_tiny_llama(tiny_llama_config(), seed=0), byte_tokenizer()
    safe, unsafe = _prompts("train", 30)
    probe = fit_probe(model, tok, safe, unsafe, layer=2)
    # The torch score is sklearn's predict_proba for "safe", on the same features.
    x = prompt_features(model, tok, [*safe, *unsafe], 2)
    y = np.array([1] * len(safe) + [0] * len(unsafe))
    clf = LogisticRegression(max_iter=2000).fit(x.numpy().astype(np.float64), y)
    want = clf.predict_proba(x.numpy().astype(np.float64))[:, 1]
    np.testing.assert_allclose(probe.score(x).numpy(), want, atol=1e-4)
    # Held-out prompts (other templates, other draws): attacks score unsafe, the rest safe.
    held_safe, held_unsafe = _prompts("test", 20)
    c_safe = probe.score(prompt_features(model, tok, held_safe, 2))
    c_unsafe = probe.score(prompt_features(model, tok, held_unsafe, 2))
    accuracy = (float((c_safe >= 0.5).sum()) + float((c_unsafe < 0.5).sum())) / (len(c_safe) + len(c_unsafe))
    # The same probe fitted on shuffled labels: what accuracy this base's features give by chance.
    mixed = [*safe, *unsafe]
    order = np.random.default_rng(0).permutation(len(mixed))
    control = fit_probe(
        model, tok, [mixed[i] for i in order[: len(safe)]], [mixed[i] for i in order[len(safe) :]], 2
    )
    c_safe0 = control.score(prompt_features(model, tok, held_safe, 2))
    c_unsafe0 = control.score(prompt_features(model, tok, held_unsafe, 2))
    chance = (float((c_safe0 >= 0.5).sum()) + float((c_unsafe0 < 0.5).sum())) / (len(c_safe) + len(c_unsafe))
    # A random ~90k-parameter base gives weak features; the probe must still beat its own control.
    assert accuracy >= chance + 0.15, (accuracy, chance)


def test_features_ignore_padding() -> None:
    model, tok = build_tiny_llama(tiny_llama_config(), seed=0), byte_tokenizer()
    short, long = (
        "user: ada\nquestion: hi\nanswer:",
        "user: bo\ncontext: age: ada 1, bo 2\nquestion: what?\nanswer:",
    )
    alone = prompt_features(model, tok, [short], 1)
    batched = prompt_features(model, tok, [short, long], 1)
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)


def test_a_probe_needs_both_classes() -> None:
    model, tok = build_tiny_llama(tiny_llama_config(), seed=0), byte_tokenizer()
    with pytest.raises(ValueError, match="both classes; got 0 safe and 1 unsafe"):
        fit_probe(model, tok, [], ["x"], layer=1)

"""Mission C's steering baselines: CAA and the refusal direction, on the tiny test base."""

from __future__ import annotations

import pytest
import torch

from bem.core.models import build_tiny_llama, byte_tokenizer, tiny_llama_config
from bem.missions.mission_c import data
from bem.missions.mission_c.baselines import Ablation, Steering, last_token_states, mean_difference


def _layer_outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """What each decoder layer hands on (after the hooks under test): the next layer's input, and the
    final norm's input for the last. (transformers records `hidden_states` before forward hooks edit
    them, so those cannot be read here.)"""
    seen: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    inner = model.model
    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in inner.layers[1:]]
    handles.append(inner.norm.register_forward_pre_hook(grab, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def _setup() -> tuple[torch.nn.Module, object, list[str], list[str]]:
    model, tok = build_tiny_llama(tiny_llama_config(), seed=0), byte_tokenizer()
    refuse = [c.prompt for c in data.make_cases("secret", "train", 6, seed=0)]
    answer = [c.prompt for c in data.make_cases("utility", "train", 6, seed=0)]
    return model, tok, refuse, answer


def test_last_token_states_and_the_mean_difference_by_hand() -> None:
    model, tok, refuse, answer = _setup()
    states = last_token_states(model, tok, [refuse[0], answer[0]], layer=1)
    ids = tok(refuse[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0, -1]
    torch.testing.assert_close(states[0], alone.float(), atol=1e-5, rtol=1e-5)
    diff = mean_difference(model, tok, refuse, answer, layer=1)
    want = last_token_states(model, tok, refuse, 1).mean(0) - last_token_states(model, tok, answer, 1).mean(0)
    torch.testing.assert_close(diff, want)
    with pytest.raises(ValueError, match="both kinds"):
        mean_difference(model, tok, [], answer, 1)


def test_steering_adds_alpha_times_the_vector_and_nothing_at_alpha_zero() -> None:
    model, tok, refuse, _ = _setup()
    ids = torch.tensor([tok(refuse[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        plain_logits = model(input_ids=ids).logits
    plain = _layer_outputs(model, ids)
    vector = torch.randn(tiny_llama_config().hidden_size, generator=torch.Generator().manual_seed(0))
    with Steering(model, 0, vector, alpha=0.0), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain_logits)
    with Steering(model, 0, vector, alpha=2.0):
        steered = _layer_outputs(model, ids)
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=ids).logits, plain_logits)
    # Decoder layer 0's output moved by exactly 2·v at every position.
    torch.testing.assert_close(steered[0] - plain[0], (2 * vector).expand_as(plain[0]), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # removed on exit
        assert torch.equal(model(input_ids=ids).logits, plain_logits)


def test_ablation_leaves_no_component_along_the_direction_in_any_layer() -> None:
    model, tok, refuse, answer = _setup()
    direction = mean_difference(model, tok, refuse, answer, layer=1)
    unit = direction / direction.norm()
    ids = torch.tensor([tok(refuse[0], add_special_tokens=False)["input_ids"]])
    plain = _layer_outputs(model, ids)
    assert (plain[0] @ unit).abs().max() > 1e-3  # there was a component to remove
    with Ablation(model, direction):
        ablated = _layer_outputs(model, ids)
    assert len(ablated) == tiny_llama_config().num_hidden_layers
    for out in ablated:  # every decoder layer's output
        assert (out @ unit).abs().max() < 1e-4
    with pytest.raises(ValueError, match="zero"):
        Ablation(model, torch.zeros_like(direction))

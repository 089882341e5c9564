"""Mission C's steering baselines on the same checkpoint (missions_cde.md C.1, C.5): a CAA steering vector
and the refusal direction, added or ablated.

- CAA (Rimsky/Panickssery et al.): the mean difference of the residual stream between prompts that should
  be refused and prompts that should be answered, added with a coefficient α at every position of one
  layer's output. α is swept once on a development split.
- Refusal direction (Arditi et al.): the same difference in means, normalised to r̂; *addition* adds
  α·r̂ at one layer, *ablation* removes the component along r̂ from every layer's output,
  x ← x − r̂r̂ᵀx (their directional ablation; on our models the activations are the decoder layers'
  outputs).

Both read the residual at each prompt's last token (the cue's `:`), where the model decides how to
answer. Hooks are removable and change nothing at α = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from bem.missions.mission_c.basis import decoder_layers, edit_layer_output
from bem.missions.mission_c.probe import layer_states


def last_token_states(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], layer: int, batch: int = 32
) -> Tensor:
    """[N, d]: the residual after decoder layer `layer` (1-based, as in `hidden_states`) at each prompt's
    last token."""
    return layer_states(model, tokenizer, prompts, layer, last_token, batch)


def last_token(hidden: Tensor, mask: Tensor) -> Tensor:
    """Each row's state at its last real token (right padding)."""
    return hidden[torch.arange(len(hidden), device=hidden.device), mask.sum(1) - 1]


def mean_difference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    refuse: Sequence[str],
    answer: Sequence[str],
    layer: int,
) -> Tensor:
    """mean(states of prompts to refuse) − mean(states of prompts to answer): CAA's vector, and the
    refusal direction before normalising."""
    if not refuse or not answer:
        raise ValueError(
            f"need prompts of both kinds; got {len(refuse)} to refuse and {len(answer)} to answer"
        )
    return last_token_states(model, tokenizer, refuse, layer).mean(0) - last_token_states(
        model, tokenizer, answer, layer
    ).mean(0)


class _LayerHooks:
    """Forward hooks on decoder layers that rewrite the hidden states (a tensor, or a tuple's first item)."""

    def __init__(self, model: nn.Module, layers: Sequence[int]) -> None:
        decoder = decoder_layers(model)
        self._handles = [decoder[i].register_forward_hook(self._hook) for i in layers]

    def edit(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        return edit_layer_output(output, self.edit)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> _LayerHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Steering(_LayerHooks):
    """Adds alpha·vector to one decoder layer's output at every position (CAA, or refusal-direction
    addition with a unit vector). Layers are 0-based here: decoder layer i's output is what
    `hidden_states[i + 1]` reads without hooks."""

    def __init__(self, model: nn.Module, layer: int, vector: Tensor, alpha: float) -> None:
        self.vector, self.alpha = vector, alpha
        super().__init__(model, [layer])

    def edit(self, hidden: Tensor) -> Tensor:
        if self.alpha == 0:
            return hidden
        return hidden + self.alpha * self.vector.to(hidden)


class Ablation(_LayerHooks):
    """Removes the component along `direction` from every decoder layer's output: x ← x − r̂r̂ᵀx."""

    def __init__(self, model: nn.Module, direction: Tensor) -> None:
        norm = direction.norm()
        if not norm > 0:
            raise ValueError("the direction to ablate is zero")
        self.unit = direction / norm
        super().__init__(model, range(len(decoder_layers(model))))

    def edit(self, hidden: Tensor) -> Tensor:
        r = self.unit.to(hidden)
        return hidden - (hidden @ r).unsqueeze(-1) * r

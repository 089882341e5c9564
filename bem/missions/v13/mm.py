"""MM-mini's models (issue 20): a small CNN trained from scratch, and two ways to give a frozen text
model its features.

- `Encoder`: three 3×3 convolutions (stride 2) over the 32×32 image, average-pooled to the scene's
  2×2 grid, the four cells' channels side by side: what is where survives the pooling.
- `MMModel` (arm MM): the anchor's BEM sites; the controller reads the prompt's adapter-off mean state
  and the image features together. The conflict gate g = σ(w·LN[text, image]) mixes that code with
  a code from the text alone: c = g·c(text, image) + (1 − g)·c(text). On a conflict example the
  caption says one thing and the image another; the gate learns how far to let the image decide.
- `PrefixModel` (arm MM_prefix, the baseline): the same encoder's features projected to `prefix`
  embeddings placed before the prompt's; no adapter. Its parameters match MM's (`arms.fit`).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bem.missions.v13.arms import Knobs, Shape
from bem.missions.v13.variants import ArmModel


class Encoder(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(2),
        )

    def forward(self, images: Tensor) -> Tensor:
        """uint8 [B, H, W, 3] → [B, 4·channels]."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return cast(Tensor, self.net(x)).flatten(1)


def image_batch(images: list[np.ndarray], device: torch.device | str) -> Tensor:
    return torch.from_numpy(np.stack(images)).to(device)


class MMModel(ArmModel):
    """The anchor's sites; codes from the text and the image, with the conflict gate."""

    def __init__(self, lm: nn.Module, shape: Shape, knobs: Knobs) -> None:
        features = 4 * knobs.encoder
        super().__init__(lm, "MM", shape, knobs, controller_in=shape.d_model + features)
        self.encoder = Encoder(knobs.encoder)
        self.conflict_gate = nn.Linear(shape.d_model + features, 1)
        self.text_code = nn.Linear(shape.d_model, self.code_dim)
        nn.init.zeros_(self.text_code.weight)
        nn.init.zeros_(self.text_code.bias)
        self.image: Tensor | None = None
        self.last_gate: Tensor | None = None

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The sites and the controller with its gate and text head: what parity counts (the encoder is
        shared with the baseline and counted apart: `encoder_parameters`)."""
        return [*super().adapter_parameters(), *self.conflict_gate.parameters(), *self.text_code.parameters()]

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def codes(self, features: Tensor) -> Tensor:
        if self.image is None:
            raise ValueError("MM needs its images: set `model.image` (uint8 [B, H, W, 3]) before prepare")
        both = torch.cat([features, self.encoder(self.image)], dim=-1)
        # On standardised inputs: the LM's raw states are large, and on them the gate saturated at 0
        # within a few steps (the image was then never read).
        gate = torch.sigmoid(self.conflict_gate(F.layer_norm(both, both.shape[-1:])))
        self.last_gate = gate.detach()
        return gate * self.controller(both).code + (1 - gate) * self.text_code(features)


class PrefixModel(nn.Module):
    """The frozen LM reading `prefix` projected image embeddings before the prompt."""

    def __init__(self, lm: nn.Module, shape: Shape, knobs: Knobs) -> None:
        super().__init__()
        self.lm, self.n, self.d = lm.requires_grad_(False), knobs.prefix, shape.d_model
        self.encoder = Encoder(knobs.encoder)
        features = 4 * knobs.encoder
        self.project = nn.Sequential(
            nn.Linear(features, knobs.prefix_hidden),
            nn.GELU(),
            nn.Linear(knobs.prefix_hidden, knobs.prefix * self.d),
        )
        self.image: Tensor | None = None
        self._prefix: Tensor | None = None

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.project.parameters())

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def prepare(self, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor) -> None:
        if self.image is None:
            raise ValueError("MM_prefix needs its images: set `model.image` before prepare")
        self._prefix = self.project(self.encoder(self.image)).unflatten(-1, (self.n, self.d))

    def clear(self) -> None:
        self._prefix = None

    def embed(self, input_ids: Tensor) -> Tensor:
        """The prompt's input embeddings as the LM computes them (with the token shift's, if it has one)."""
        model = self.lm.get_submodule("model")
        embeds = cast(Tensor, model.get_submodule("embed_tokens")(input_ids))
        if hasattr(model, "prev_tokens"):
            pad = int(getattr(self.lm, "config").pad_token_id)  # noqa: B009  # untyped on nn.Module
            prev = torch.cat([torch.full_like(input_ids[:, :1], pad), input_ids[:, :-1]], dim=1)
            embeds = embeds + model.get_submodule("prev_tokens")(prev)
        return embeds

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits at the prompt's own positions (the prefix's are dropped)."""
        if self._prefix is None:
            raise ValueError("prepare first: the prefix comes from the image")
        embeds = torch.cat([self._prefix.to(self.embed(input_ids).dtype), self.embed(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], self.n), attention_mask], dim=1)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits
        return cast(Tensor, logits[:, self.n :])

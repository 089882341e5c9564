"""Something that watches a mission's served answers from inside its process: Mission C's safety overlay
run on another mission (C ↔ all). The mission attaches it to its model once, wraps each answer it decodes
in `serve(prompts)`, and closes it at the end; what the overseer does there (edit the model's layers at
some level, interleave checks of its own, obey a fleet's commands) is its own business, so a mission
never imports another."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from torch import nn
from transformers import PreTrainedTokenizerBase


class Overseer(Protocol):
    def attach(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None: ...
    def serve(self, prompts: Sequence[str]) -> AbstractContextManager[object]:
        """The forward passes of one batch of answers, row i for prompts[i]."""
        ...

    def close(self) -> dict[str, Any]:
        """Take everything off the model; returns what the overseer saw, for the run's summary."""
        ...

"""Mission E's smoke base corpus: the tasks at short lengths, for a base that must solve passkey with
full KV at its training length before any memory or eviction arm can be judged (the precondition).

Documents are fitted to a length estimated as 1.4 tokens a word: the tokenizer is trained on this very
corpus, so it cannot measure it. Lengths start short (80 tokens) so the copy from a needle to its
answer is learnt before long haystacks (tiny_models.md: short sequences move the induction-head phase
change earlier); the sequence length is 384, so a window holds at least one whole document.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bem.missions.mission_e import tasks

WORD_TOKENS = 1.4  # tokens per word, the estimate documents are fitted with


def estimated_tokens(text: str) -> int:
    return int(len(text.split()) * WORD_TOKENS)


def _source(
    make: Callable[[random.Random, int], tasks.Sample], lengths: Sequence[int]
) -> Callable[[random.Random], tuple[str, str]]:
    def draw(rng: random.Random) -> tuple[str, str]:
        sample = make(rng, rng.choice(lengths))
        return sample.prompt, " " + ", ".join(sample.answers) + "."

    return draw


def smoke_mixture() -> Any:
    from bem.core.smoke_base import Mixture, Recipe, Source

    count = estimated_tokens
    recipe = Recipe(
        vocab_size=1024,
        num_hidden_layers=2,
        intermediate_size=256,
        seq_len=384,
        batch_size=16,
        steps=3000,
        warmup=100,
        corpus_docs=6000,
        max_position_embeddings=1024,
    )
    return Mixture(
        name="mission_e",
        sources=(
            Source("passkey", 0.4, _source(lambda r, n: tasks.passkey(r, n, r.random(), count),
                                           (80, 96, 128, 192, 256))),
            Source("niah", 0.3, _source(lambda r, n: tasks.niah("niah_multikey", r, n, r.random(), count),
                                        (160, 192, 256))),
            Source("vt", 0.3, _source(lambda r, n: tasks.variable_tracking(r, n, r.random() * 0.5, count),
                                      (128, 192, 256))),
        ),
        recipe=recipe,
    )  # fmt: skip


def smoke_model(cache_dir: Path, log: Callable[[str], None]) -> tuple[Path, Any, Any, Callable[[str], int]]:
    """The smoke base's folder (found or pretrained, 20 minutes at most), the model, its tokenizer,
    and the token counter the task generators fit samples with."""
    from bem.core.models import load_model
    from bem.core.smoke_base import smoke_base

    path = smoke_base(cache_dir, smoke_mixture(), log=log, budget_s=1200)
    model, tok = load_model(path)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return path, model, tok, count

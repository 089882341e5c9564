"""The smoke base every mission shares: a small BPE tokenizer and a from-scratch Llama, both built
from a corpus mixture the mission declares, pretrained in minutes on 2 CPU cores, cached by content.

Why: a 2M-parameter byte-level model pretrained for a minute on pydoc text learns no skill in the
smoke budget, so every smoke verdict measured the base, not BEM (issue 16). Tiny models do learn
synthetic formats to high accuracy in minutes when the recipe is right (../shared/research/
tiny_models.md): a vocabulary made for the data, documents drawn fresh from generators, the
key right before what it binds, AdamW at 3e-3 with betas (0.9, 0.98), warm-up and clipping.

A `Mixture` is the mission's declaration: named document generators with weights (its task
formats, generic text in its vocabulary, associative recall). `smoke_base` draws a fixed corpus
from it (seeded), trains a byte-level BPE tokenizer on that corpus with the `tokenizers` library
(lossless: any string round-trips, so prompts outside the corpus still encode), pretrains, and
saves a Hugging Face folder keyed by a hash of the corpus text, the config and the recipe, so a
second mission with the same mixture reuses it and a changed generator retrains.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bem.core.models import cache_model, lm_pretrain, warmup_cosine
from bem.core.token_shift import TokenShiftLlamaConfig, TokenShiftLlamaForCausalLM

# Bump when the recipe below changes, so stale caches are not reused. v2: documents may supervise
# their target only. v3: a token shift (bem.core.token_shift).
RECIPE_VERSION = "smoke-base-v3"
SPECIALS = ("<pad>", "<eos>", "<unk>")


Doc = str | tuple[str, str]  # a text, or (context, target): the loss reads the target's tokens only


@dataclass(frozen=True)
class Source:
    """One kind of document in the mixture: `make(rng)` returns one document (no eos; added here).

    A (context, target) pair puts the loss on the target alone, as tiny_models.md's recall recipe
    does: a table's random values cannot be predicted, its lookups can, and a loss spread over the
    unpredictable tokens delays the phase change in which retrieval is learnt."""

    name: str
    weight: float
    make: Callable[[random.Random], Doc]


@dataclass(frozen=True)
class Recipe:
    """Model and optimiser; the defaults are tiny_models.md's recipe at a size that trains in ~4 min."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    seq_len: int = 128
    batch_size: int = 32
    # A step count, not a wall-clock stop, decides the weights: 1,000 steps take about 280 s on this
    # repository's 2-core box (3.6 a second, measured in a smoke run); `budget_s` only guards.
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 200
    weight_decay: float = 0.1
    corpus_docs: int = 20_000  # documents drawn once; the tokenizer and the pretraining both read them
    # Each position also sees the token before it: in-context lookup is then learnt in hundreds of
    # steps instead of after a slow phase change (bem.core.token_shift, bench/token_shift.py).
    token_shift: bool = True

    def config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        kind = TokenShiftLlamaConfig if self.token_shift else LlamaConfig
        return kind(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )


@dataclass(frozen=True)
class Mixture:
    """A mission's pretraining corpus: sources drawn by weight, reproducibly from `seed`."""

    name: str
    sources: tuple[Source, ...]
    seed: int = 0
    recipe: Recipe = field(default_factory=Recipe)

    def documents(self) -> list[tuple[str, str]]:
        """(context, target) per document; a plain text is all target."""
        if not self.sources or any(s.weight <= 0 for s in self.sources):
            raise ValueError(f"mixture {self.name!r}: every source needs a positive weight")
        rng = random.Random(f"{self.name}:{self.seed}")
        weights = [s.weight for s in self.sources]
        picks = rng.choices(self.sources, weights=weights, k=self.recipe.corpus_docs)
        return [_pair(s.make(rng)) for s in picks]


def union(mixtures: Sequence[Mixture]) -> Mixture:
    """One corpus for a base that needs several missions' skills (a mission run with Mission C's
    overlay needs unsafe behaviour to guard against). Each mixture keeps its sources' relative weights
    and gets an equal share of the documents; the model is the first's, with the longest sequence of
    any; the steps, warm-up and documents add up, so each skill gets the pretraining it was tuned with."""
    if len(mixtures) < 2 or len({m.name for m in mixtures}) != len(mixtures):
        raise ValueError(f"a union needs two or more different mixtures; got {[m.name for m in mixtures]}")
    recipes = [m.recipe for m in mixtures]
    recipe = replace(
        recipes[0],
        seq_len=max(r.seq_len for r in recipes),
        max_position_embeddings=max(r.max_position_embeddings for r in recipes),
        steps=sum(r.steps for r in recipes),
        warmup=max(r.warmup for r in recipes),
        corpus_docs=sum(r.corpus_docs for r in recipes),
    )
    sources = tuple(
        Source(f"{m.name}/{s.name}", s.weight / sum(x.weight for x in m.sources), s.make)
        for m in mixtures
        for s in m.sources
    )
    return Mixture("+".join(m.name for m in mixtures), sources, mixtures[0].seed, recipe)


def _pair(doc: Doc) -> tuple[str, str]:
    return ("", doc) if isinstance(doc, str) else doc


# ---- tokenizer ---------------------------------------------------------------------------------------


def train_tokenizer(documents: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the mission's own corpus: words of the task formats become single tokens,
    anything else still encodes byte by byte, and decoding returns the exact string."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIALS[0],
        eos_token=SPECIALS[1],
        unk_token=SPECIALS[2],
        clean_up_tokenization_spaces=False,
    )


# ---- pretraining -------------------------------------------------------------------------------------


def _stream(
    documents: Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerFast
) -> tuple[torch.Tensor, torch.Tensor]:
    """All documents as one id stream, each followed by eos (the training windows cut across them),
    and which positions the loss reads (a document's target and its eos)."""
    eos = tokenizer.eos_token_id
    contexts = tokenizer([c for c, _ in documents], add_special_tokens=False)["input_ids"]
    targets = tokenizer([t for _, t in documents], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    mask: list[bool] = []
    for c, t in zip(contexts, targets, strict=True):
        ids += [*c, *t, eos]
        mask += [False] * len(c) + [True] * (len(t) + 1)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask)


def pretrain(
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    supervised: torch.Tensor,
    recipe: Recipe,
    seed: int,
    log: Callable[[str], None],
    budget_s: float | None = None,
) -> list[float]:
    """Next-token LM on random windows of the stream; stops early at `budget_s` (the cap the issue sets)."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay
    )
    offsets = torch.arange(recipe.seq_len)

    def batch(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(stream) - recipe.seq_len, (recipe.batch_size,), generator=generator)
        window = starts[:, None] + offsets
        ids = stream[window]
        return ids, ids.masked_fill(~supervised[window], -100)

    def lr_at(step: int) -> float:
        return warmup_cosine(step, recipe.steps, recipe.lr, recipe.warmup)

    return lm_pretrain(model, opt, batch, lr_at, recipe.steps, log, "smoke-base", budget_s)


def cache_key(mixture: Mixture, documents: Sequence[tuple[str, str]]) -> str:
    """Everything that determines the weights: the corpus text itself (and which part of each
    document is supervised), the recipe and its version."""
    digest = hashlib.sha256()
    for context, target in documents:
        digest.update(f"{context}\1{target}\0".encode())
    blob = json.dumps(
        {
            "version": RECIPE_VERSION,
            "recipe": mixture.recipe.__dict__,
            "seed": mixture.seed,
            "corpus": digest.hexdigest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def smoke_base(
    cache_dir: str | Path,
    mixture: Mixture,
    *,
    log: Callable[[str], None] | None = None,
    budget_s: float | None = 300.0,
) -> Path:
    """A local Hugging Face folder with the mixture's base, pretrained now unless cached.

    Built in a temporary sibling and renamed into place, so an interrupted run leaves nothing that a
    later call would trust; `pretrain.json` beside the weights records the corpus, losses and time.
    """
    log = log or (lambda _msg: None)
    documents = mixture.documents()
    final = Path(cache_dir) / f"smoke-base-{mixture.name}-{cache_key(mixture, documents)}"
    if (final / "pretrain.json").is_file():
        log(f"smoke-base cached at {final}")
        return final
    started = time.perf_counter()
    recipe = mixture.recipe
    tokenizer = train_tokenizer([c + t for c, t in documents], recipe.vocab_size)
    stream, supervised = _stream(documents, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mixture.seed)
        config = recipe.config(tokenizer)
        model = (
            TokenShiftLlamaForCausalLM(config)  # type: ignore[arg-type]  # config() picks its class
            if recipe.token_shift
            else LlamaForCausalLM(config)
        )
        params = sum(p.numel() for p in model.parameters())
        log(f"smoke-base {mixture.name}: {params:,} parameters, {len(stream):,} corpus tokens")
        losses = pretrain(model, stream, supervised, recipe, mixture.seed, log, budget_s)
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "recipe": {"version": RECIPE_VERSION, **recipe.__dict__},
        "mixture": mixture.name,
        "sources": {s.name: s.weight for s in mixture.sources},
        "seed": mixture.seed,
        "params": params,
        "vocab": len(tokenizer),
        "corpus_docs": len(documents),
        "corpus_tokens": len(stream),
        "supervised_tokens": int(supervised.sum()),
        "steps_run": len(losses),
        "truncated": len(losses) < recipe.steps,
        "initial_loss": losses[0],
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": round(seconds, 1),
    }
    cache_model(model, tokenizer, summary, final, log)
    log(f"smoke-base saved to {final} in {seconds:.0f} s, final loss {summary['final_loss']:.3f}")
    return final


# ---- generic sources ---------------------------------------------------------------------------------


def recall_source(
    keys: Sequence[str],
    values: Sequence[str],
    weight: float,
    pairs: tuple[int, int] = (2, 6),
    answers_only: bool = False,
) -> Source:
    """Multi-query associative recall in the mission's own words (MQAR, Zoology): `k1 v1, k2 v2, ...`
    then queries `k v` for bound keys. In-context lookup and copying is what every skill here rests
    on, and this is the cheapest way to make the base learn it (induction heads). `answers_only`
    puts the loss on the queries alone (the table's values are random)."""

    def make(rng: random.Random) -> Doc:
        n = rng.randint(pairs[0], min(pairs[1], len(keys)))
        ks = rng.sample(list(keys), n)
        table = {k: rng.choice(list(values)) for k in ks}
        queries = rng.sample(ks, min(n, rng.randint(1, 3)))
        context = ", ".join(f"{k} {v}" for k, v in table.items()) + "."
        target = " " + ", ".join(f"{k} {table[k]}" for k in queries) + "."
        return (context, target) if answers_only else context + target

    return Source("recall", weight, make)

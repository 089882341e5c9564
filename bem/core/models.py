"""Offline base models: a byte tokenizer, tiny seeded Llama/GPT-2 models, and a cached demo base.

Everything here is built from a config or loaded from a local folder, never downloaded (DESIGN.md
section 8, "Offline"). The test base (~90k parameters) is cheap enough to build in every test; the demo
base (~2M parameters) is pretrained for about a minute on CPython's own documentation so that adapters
have something better than noise to steer, and is cached on disk by a hash of its recipe.

Saving and loading go through transformers' real `save_pretrained` / `from_pretrained`, so the same
code path that loads a local Hugging Face model on a GPU box is exercised by the CPU tests.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# Registers the smoke base's architecture with the Auto classes, so load_model finds it.
import bem.core.token_shift  # noqa: F401

BYTE_VOCAB = 259  # 256 bytes after the 3 specials
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

# Chosen by measurement on a 2-core CPU: ~1.97M parameters, ~0.33 s per AdamW step at batch 16 x 192.
# The 2.4M variant (hidden 256, intermediate 512) cost ~0.40 s a step, too slow for a one-minute pretrain.
DEMO_CONFIG: dict[str, int] = {
    "hidden_size": 192,
    "intermediate_size": 640,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "max_position_embeddings": 512,
}

# Bump whenever the pretraining recipe changes (data, schedule, optimiser) so stale caches are not reused.
DEMO_RECIPE_VERSION = "demo-base-v2"  # v2: half the windows repeat a span (repeat_spans)
DEMO_STEPS = 300  # ~90 s of pretraining on a quiet 2-core CPU with DEMO_CONFIG
DEMO_BATCH = 16
DEMO_SEQ_LEN = 192
DEMO_LR = 3e-3
DEMO_COPY_SHARE = 0.5


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """The ByT5 byte tokenizer without sentinel ids: every UTF-8 byte is a token, so it needs no vocab file.

    Note that in transformers 5 `tokenizer.vocab_size` reports 256 (the bytes only); `len(tokenizer)` is
    the true embedding size, 259, and is what we check because the models' vocab depends on it.
    """
    tokenizer = ByT5Tokenizer(extra_ids=0)
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    if len(tokenizer) != BYTE_VOCAB or ids != (PAD_ID, EOS_ID, UNK_ID):
        raise RuntimeError(
            f"ByT5Tokenizer(extra_ids=0) gave {len(tokenizer)} tokens and pad/eos/unk ids {ids}; "
            f"expected {BYTE_VOCAB} and {(PAD_ID, EOS_ID, UNK_ID)} (transformers changed?)"
        )
    return tokenizer


def tiny_llama_config(
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
) -> LlamaConfig:
    """A byte-level Llama config; the defaults are the ~90k-parameter test base of BEM_SPEC.md section 12.

    bos_token_id is 1 (= eos), as in GPT-2: the byte tokenizer adds no BOS, pretraining documents are
    separated by eos, and `generate()` without a prompt needs some start token.
    """
    return LlamaConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=True,
    )


def build_tiny_llama(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A fresh Llama in eval mode, seeded inside a forked RNG so the caller's global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A tiny byte-level GPT-2, for adapters that must handle GPT-2's transposed Conv1D projections."""
    config = GPT2Config(
        vocab_size=BYTE_VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """Write a self-contained Hugging Face folder (safetensors weights) that `load_model` can read offline."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cache_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    summary: dict[str, Any],
    final: Path,
    log: Callable[[str], None],
) -> Path:
    """Save a pretrained base and its `pretrain.json` as the cache folder `final`, atomically.

    It is built in a temporary sibling and renamed into place, so an interrupted run never leaves a
    half-written cache that a later call would trust; a concurrent builder's folder wins and is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to other users
        save_model(model, tokenizer, tmp)
        (tmp / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "pretrain.json").is_file():
                raise
            log(f"{final.name} built concurrently; keeping that one")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_model(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local Hugging Face causal LM and its tokenizer, in eval mode, never touching the hub.

    A missing folder is reported as such up front: otherwise transformers would read the path as a hub
    repo id and fail with a confusing offline/network error. Weights must be safetensors (DESIGN.md 8).
    Gradients are left enabled; freezing the base is the adapter code's decision.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model folder (config.json) at {path}")
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if device is not None:
        model = model.to(device)  # type: ignore[arg-type]  # transformers' decorator hides Module.to
    return model.eval(), tokenizer


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when present, else CPU; asking for CUDA explicitly on a CPU box is an error, not a fallback,
    so that a GPU run never silently becomes a CPU run."""
    if prefer is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if prefer.split(":")[0] not in {"cpu", "cuda"}:
        raise ValueError(f"unsupported device {prefer!r}: use 'cpu', 'cuda' or 'cuda:N'")
    device = torch.device(prefer)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {prefer!r} requested but CUDA is not available (torch {torch.__version__})"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {prefer!r} requested but only {torch.cuda.device_count()} CUDA devices")
    return device


# ---------------------------------------------------------------------------------------------------------
# Demo base: a tiny Llama pretrained briefly on CPython's documentation, cached by recipe hash.


def pydoc_corpus_ids(tokenizer: PreTrainedTokenizerBase | None = None) -> torch.Tensor:
    """Byte ids of CPython's `pydoc_data.topics` (~0.47 MB of English prose and code): always installed,
    so the demo base needs no dataset download. Topics are sorted for a stable order and each ends in eos.
    """
    from pydoc_data.topics import topics

    tokenizer = tokenizer or byte_tokenizer()
    ids: list[int] = []
    for key in sorted(topics):
        ids.extend(tokenizer(topics[key])["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def _demo_key(config_kwargs: dict[str, Any], steps: int, seed: int, corpus: torch.Tensor) -> str:
    """Hash of everything that determines the weights. The corpus digest is included because
    pydoc_data.topics differs between Python versions."""
    params = inspect.signature(tiny_llama_config).bind(**config_kwargs)
    params.apply_defaults()
    blob = json.dumps(
        {
            "recipe": DEMO_RECIPE_VERSION,
            "config": dict(params.arguments),
            "steps": steps,
            "seed": seed,
            "corpus": hashlib.sha256(corpus.numpy().tobytes()).hexdigest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def warmup_cosine(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def lm_pretrain(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    lr_at: Callable[[int], float],
    steps: int,
    log: Callable[[str], None],
    name: str,
    budget_s: float | None = None,
) -> list[float]:
    """The loop both from-scratch bases pretrain with: `batch(step)` gives (input ids, labels);
    gradients are clipped to norm 1. Returns the per-step losses; a `budget_s` that runs out stops it
    early, loudly (the weights then depend on the machine's speed)."""
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        ids, labels = batch(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps} loss {losses[-1]:.3f}")
        if budget_s is not None and time.perf_counter() - started > budget_s:
            log(f"{name} WARNING: stopped at step {step + 1} of {steps}: the {budget_s:g} s budget is spent")
            break
    model.eval()
    return losses


def repeat_spans(
    batch: torch.Tensor, generator: torch.Generator, share: float = DEMO_COPY_SHARE
) -> torch.Tensor:
    """In a `share` of the windows, overwrite a later stretch with a copy of an earlier span.

    Any real LM copies from its context (names, values, sentences); minutes of plain text do not
    teach a 2M-parameter byte model that, and both validation tasks need it. Repeated spans make
    in-context copying pay off in the loss, so it is learnt within the pretraining budget.
    """
    batch = batch.clone()
    length = batch.shape[1]
    for row in range(batch.shape[0]):
        if torch.rand((), generator=generator) >= share:
            continue
        n = int(torch.randint(16, length // 2 - 8, (), generator=generator))
        src = int(torch.randint(0, length // 2 - n, (), generator=generator))
        dst = int(torch.randint(src + n + 1, length - n, (), generator=generator))
        batch[row, dst : dst + n] = batch[row, src : src + n]
    return batch


def _pretrain(
    model: LlamaForCausalLM, corpus: torch.Tensor, steps: int, seed: int, log: Callable[[str], None]
) -> list[float]:
    """Next-byte LM on random windows of the corpus; returns the per-step training losses."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=DEMO_LR, betas=(0.9, 0.95), weight_decay=0.1)
    offsets = torch.arange(DEMO_SEQ_LEN)

    def batch(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(corpus) - DEMO_SEQ_LEN, (DEMO_BATCH,), generator=generator)
        ids = repeat_spans(corpus[starts[:, None] + offsets], generator)
        return ids, ids

    def lr_at(step: int) -> float:
        return warmup_cosine(step, steps, DEMO_LR, max(1, steps // 10))

    return lm_pretrain(model, optimizer, batch, lr_at, steps, log, "demo-base")


def demo_base(
    cache_dir: str | Path,
    *,
    steps: int = DEMO_STEPS,
    seed: int = 0,
    config_kwargs: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Return a local HF folder holding the demo base, pretraining it first if it is not cached yet.

    The folder is `cache_dir/demo-base-<hash12>`; it is built in a temporary sibling and renamed into
    place, so an interrupted run never leaves a half-written cache that a later call would trust.
    `config_kwargs` (for `tiny_llama_config`) replaces DEMO_CONFIG as a whole; tests pass a tiny one.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    log = log or (lambda _msg: None)
    kwargs = dict(DEMO_CONFIG if config_kwargs is None else config_kwargs)
    tokenizer = byte_tokenizer()
    corpus = pydoc_corpus_ids(tokenizer)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"demo-base-{_demo_key(kwargs, steps, seed, corpus)}"
    if (final / "pretrain.json").is_file():
        log(f"demo-base cached at {final}")
        return final

    cache_dir.mkdir(parents=True, exist_ok=True)
    model = build_tiny_llama(tiny_llama_config(**kwargs), seed=seed)
    params = sum(p.numel() for p in model.parameters())
    log(f"demo-base pretraining {params:,} parameters for {steps} steps")
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        losses = _pretrain(model, corpus, steps, seed, log)
    seconds = time.perf_counter() - started
    model.eval()

    tail = losses[-10:]
    summary = {
        "recipe": DEMO_RECIPE_VERSION,
        "config": kwargs,
        "steps": steps,
        "seed": seed,
        "params": params,
        "batch": DEMO_BATCH,
        "seq_len": DEMO_SEQ_LEN,
        "corpus_tokens": len(corpus),
        "initial_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "seconds": round(seconds, 2),
    }
    cache_model(model, tokenizer, summary, final, log)
    log(f"demo-base saved to {final} in {seconds:.1f}s, final loss {summary['final_loss']:.3f}")
    return final

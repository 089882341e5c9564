"""Dry runs: a recipe's model and adapters built on the meta device from a base's `config.json` alone
(no weights, no GPU, nothing downloaded), their parameters counted, and each phase's peak memory
estimated, so a researcher sees whether a full-profile task fits its `vram_gb` before submitting it.

Each recipe's `dry_run(base_path, profile)` builds exactly what a run builds, through the run's own
attach and LoRA code (`bem.core.attach`, `bem.core.train.lora_model`), on a `meta_base`; it describes
its phases with `phase` and returns `summary`. The memory model, per phase (docs/decisions.md):

- weights: every resident parameter (the base, a LoRA's copy of it, adapters, controllers), each in
  its own dtype: the base in the dtype `load_model` gives it, adapters in whatever the code makes;
- gradients and optimizer state: per trainable parameter, its own size (gradient) and twice it
  (AdamW's two moments);
- activations, for `batch` rows of `seq_len` tokens, e bytes per element of the base's dtype, hidden
  h, MLP width i, key/value width k, L layers, vocabulary V:
    training (a backward pass through every layer): b·s·(L·(7h + 2k + 5i)·e + V·(e + 12)), i.e. per
    layer the tensors autograd keeps for a Llama-style block with fused (SDPA) attention (two norm
    inputs, the attention input, q, k, v and its output, the MLP input: 6h + 2k; gate, up, their
    activation and product: 4i) plus the adapter branches' dropped inputs (h + i); then the logits
    (e), the loss's float32 copy and log-softmax (8) and their gradient (4);
    no-grad: b·s·(L·(2k + h)·e + (2h + 2i)·e + n·V·(e + 4)): the KV cache and per-layer hidden
    states a forward keeps, one layer's working set, and `n` logits tensors alive at once, each with
    a float32 copy for scoring.
  Sequence lengths are the longest row the phase batches, counted with the folder's tokenizer when it
  has one, else in UTF-8 bytes (an upper bound for byte-level and BPE tokenizers).
No allocator slack, fragmentation or CUDA context (about 0.5 GiB) is added: the peak is a floor for
what the GPU must hold, not a guarantee.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import bem.core.token_shift  # noqa: F401  (the smoke base's architecture, for AutoConfig)
from bem.core.train import TextPair

GiB = 1024**3  # what a task's `vram_gb` counts in (fleetd's scheduler)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


@dataclass
class MetaBase:
    """A base model on the meta device: its shapes and dtype, no storage."""

    path: Path
    model: PreTrainedModel
    dtype: torch.dtype
    dtype_from: str  # "config.json", "weights" or "default"
    tokenizer: PreTrainedTokenizerBase | None  # the folder's, when it has one
    parameters: int  # the base's own, counted before anything is attached to it

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def tokens(self, text: str) -> int:
        """`text`'s tokens as the recipes tokenise it (no special tokens); UTF-8 bytes without a tokenizer."""
        if self.tokenizer is None:
            return len(text.encode())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def longest(self, examples: Iterable[TextPair]) -> int:
        """Tokens of the longest prompt + target + EOS row (`bem.core.train.encode`'s rows)."""
        return max(self.tokens(ex.prompt) + self.tokens(ex.target) + 1 for ex in examples)


def meta_base(path: str | Path) -> MetaBase:
    """The base at `path` built from its `config.json` on the meta device, in the dtype `load_model`
    would load its weights in. Refuses anything but a local folder: nothing is downloaded."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a local Hugging Face model folder (no config.json there; nothing is downloaded)"
        )
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    dtype, source = load_dtype(path, config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return MetaBase(path, model.eval(), dtype, source, _tokenizer(path), count([model]))


def load_dtype(path: Path, config: PretrainedConfig) -> tuple[torch.dtype, str]:
    """The dtype `load_model` gives this folder's weights (transformers' `dtype="auto"`): config.json's
    `dtype`, else the first floating tensor's in the safetensors files, else torch's default."""
    named = getattr(config, "dtype", None)
    if named is not None:
        return (getattr(torch, named) if isinstance(named, str) else named), "config.json"
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__" and info.get("dtype") in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[info["dtype"]], "weights"
    return torch.get_default_dtype(), "default"


def _tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None  # a folder whose tokenizer does not load: count bytes instead
    finally:
        quiet.setLevel(level)


# ---- phases and their memory ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """The largest forward pass of a phase: `batch` rows of `seq_len` tokens."""

    batch: int
    seq_len: int
    backward: bool = True  # activations kept for a backward pass through every layer
    logits: int = 1  # no-grad passes: logits tensors alive at once


@dataclass(frozen=True)
class Phase:
    """One phase of a run: what it trains, and the bytes it holds at its peak."""

    name: str
    trainable: int  # parameters the phase's optimizer steps
    batch: int
    seq_len: int
    backward: bool
    weights: int  # bytes, as are the next three
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def unique_parameters(items: Iterable[nn.Module | nn.Parameter]) -> list[nn.Parameter]:
    """Every parameter of the modules and the bare parameters, each once (tied and shared ones too)."""
    seen: dict[int, nn.Parameter] = {}
    for item in items:
        params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
        for p in params:
            seen.setdefault(id(p), p)
    return list(seen.values())


def count(items: Iterable[nn.Module | nn.Parameter]) -> int:
    return sum(p.numel() for p in unique_parameters(items))


def _bytes(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def dims(config: PretrainedConfig) -> dict[str, int]:
    """Hidden h, MLP width i, key/value width k, layers L and vocabulary V of a decoder config."""
    text = config.get_text_config()
    h = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    width = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h
    return {
        "hidden": h,
        "intermediate": int(width),
        "kv": int(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        "layers": int(text.num_hidden_layers),
        "vocab": int(text.vocab_size),
    }


def activation_bytes(config: PretrainedConfig, dtype: torch.dtype, run: Pass) -> int:
    """The module docstring's activation estimate for one pass."""
    d = dims(config)
    h, i, k, layers, vocab = d["hidden"], d["intermediate"], d["kv"], d["layers"], d["vocab"]
    e = dtype.itemsize
    if run.backward:
        per_token = layers * (7 * h + 2 * k + 5 * i) * e + vocab * (e + 12)
    else:
        per_token = layers * (2 * k + h) * e + (2 * h + 2 * i) * e + run.logits * vocab * (e + 4)
    return run.batch * run.seq_len * per_token


def phase(
    name: str,
    base: MetaBase,
    resident: Iterable[nn.Module | nn.Parameter],
    trainable: Iterable[nn.Module | nn.Parameter],
    run: Pass,
) -> Phase:
    """A phase holding `resident` (and `trainable`) while an optimizer steps `trainable`."""
    learnt = unique_parameters(trainable)
    held = unique_parameters([*resident, *learnt])
    return Phase(
        name=name,
        trainable=sum(p.numel() for p in learnt),
        batch=run.batch,
        seq_len=run.seq_len,
        backward=run.backward,
        weights=_bytes(held),
        gradients=_bytes(learnt),
        optimizer=2 * _bytes(learnt),
        activations=activation_bytes(base.config, base.dtype, run),
    )


def summary(base: MetaBase, adapters: dict[str, int], phases: list[Phase], **extra: Any) -> dict[str, Any]:
    """What a recipe's dry run returns: the base, every added module's parameters, each phase's
    memory and the peak. JSON-ready."""
    peak = max(phases, key=lambda p: p.total)
    return {
        "base": {
            "path": str(base.path),
            "model_type": str(base.config.model_type),
            "dtype": str(base.dtype).removeprefix("torch."),
            "dtype_from": base.dtype_from,
            "parameters": base.parameters,
            **dims(base.config),
            "tokens": "tokenizer" if base.tokenizer is not None else "utf-8 bytes",
        },
        "adapters": adapters,
        "phases": [{**asdict(p), "total": p.total} for p in phases],
        "peak": {"phase": peak.name, "bytes": peak.total},
        **extra,
    }


def fits(result: dict[str, Any], vram_gb: float) -> bool:
    """Whether the estimated peak fits `vram_gb` GiB."""
    return int(result["peak"]["bytes"]) <= vram_gb * GiB

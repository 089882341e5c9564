"""`bem.core.dryrun`: a base built on the meta device from its config.json is the model `load_model`
loads (parameters, dtype), the phase arithmetic is the documented one, and a folder that is not a
local model is refused. The recipes' dry runs against real runs: tests/fleet/test_dryrun.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bem.core import dryrun
from bem.core.models import build_tiny_llama, byte_tokenizer, load_model, save_model, tiny_llama_config
from bem.core.train import lora_factors, lora_model


def test_a_meta_base_is_the_model_load_model_loads(tmp_path: Path) -> None:
    """Same parameters, same dtype (from config.json, and from the weights when config.json names
    none), and rows counted with the folder's tokenizer."""
    real = build_tiny_llama(tiny_llama_config(), seed=0).to(torch.bfloat16)
    save_model(real, byte_tokenizer(), tmp_path)
    loaded, _ = load_model(tmp_path)
    base = dryrun.meta_base(tmp_path)
    assert base.model.device.type == "meta"
    assert base.parameters == sum(p.numel() for p in loaded.parameters())
    assert (base.dtype, base.dtype_from) == (loaded.dtype, "config.json") == (torch.bfloat16, "config.json")
    assert base.tokenizer is not None and base.tokens("héllo") == len("héllo".encode())

    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(tmp_path)
    base = dryrun.meta_base(tmp_path)
    assert (base.dtype, base.dtype_from) == (loaded.dtype, "weights") == (torch.bfloat16, "weights")


def test_a_config_alone_builds_in_the_default_dtype_and_counts_bytes(tmp_path: Path) -> None:
    tiny_llama_config().save_pretrained(tmp_path)
    base = dryrun.meta_base(tmp_path)
    assert (base.dtype, base.dtype_from, base.tokenizer) == (torch.float32, "default", None)
    assert base.parameters == sum(p.numel() for p in build_tiny_llama(tiny_llama_config()).parameters())


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} is not a local Hugging Face model"):
        dryrun.meta_base(tmp_path / "nope")


def test_lora_factors_finds_every_site_of_a_deep_model() -> None:
    """peft rewrites 20 or more target names into suffixes; the factors still cover every site (a
    12-layer base has 24), on the meta device as on the CPU."""
    config = tiny_llama_config(hidden_size=16, intermediate_size=32, num_hidden_layers=12)
    with torch.device("meta"):
        meta = build_tiny_llama(config)
    for model in (build_tiny_llama(config), meta):
        factors = lora_factors(lora_model(model.requires_grad_(False), 4))
        assert len(factors) == 24
        assert all(a.shape[0] == 4 and b.shape[1] == 4 for a, b in factors.values())


def test_phase_arithmetic(tmp_path: Path) -> None:
    """Weights: every resident parameter once in its dtype; gradients and AdamW: 1 and 2 per trainable
    one; activations: the documented per-token formula."""
    tiny_llama_config().save_pretrained(tmp_path)
    base = dryrun.meta_base(tmp_path)
    frozen, learnt = nn.Linear(4, 3).to(torch.bfloat16), nn.Linear(2, 2)
    ph = dryrun.phase("p", base, [frozen, frozen.weight], [learnt], dryrun.Pass(3, 5))
    assert (ph.trainable, ph.weights, ph.gradients, ph.optimizer) == (6, 15 * 2 + 6 * 4, 6 * 4, 12 * 4)
    h, i, k, layers, vocab = 64, 128, 32, 2, 259  # tiny_llama_config: 2 key/value heads of 16
    assert dryrun.dims(base.config) == {
        "hidden": h,
        "intermediate": i,
        "kv": k,
        "layers": layers,
        "vocab": vocab,
    }
    assert ph.activations == 3 * 5 * (layers * (7 * h + 2 * k + 5 * i) * 4 + vocab * 16)
    ng = dryrun.activation_bytes(base.config, base.dtype, dryrun.Pass(3, 5, backward=False, logits=2))
    assert ng == 3 * 5 * (layers * (2 * k + h) * 4 + (2 * h + 2 * i) * 4 + 2 * vocab * 8)
    assert ph.total == ph.weights + ph.gradients + ph.optimizer + ph.activations

"""Offline models: tokenizer, seeded tiny bases, save/load through real HF code, and the cached demo base."""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from bem.core.models import (
    DEMO_CONFIG,
    build_tiny_llama,
    byte_tokenizer,
    demo_base,
    load_model,
    pick_device,
    pydoc_corpus_ids,
    save_model,
    tiny_gpt2,
    tiny_llama_config,
)

# Small enough that 30 steps of 16 x 192 take about a second on 2 CPU cores.
TINY_DEMO = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP barriers can make
    a 1-second pretrain take 30; restore the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch() -> torch.Tensor:
    tokenizer = byte_tokenizer()
    texts = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog."]
    return tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_byte_tokenizer_vocab_specials_and_ascii_round_trip() -> None:
    tokenizer = byte_tokenizer()
    assert len(tokenizer) == 259
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    text = string.printable + "def f(x): return {'a': [1, 2]}"
    ids = tokenizer(text)["input_ids"]
    assert ids == [b + 3 for b in text.encode()] + [1]  # one id per byte, offset by the specials, then eos
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert max(tokenizer("\u00e9\u4e2d")["input_ids"]) < 259  # non-ASCII becomes in-vocab UTF-8 bytes


def test_test_base_size_and_save_load_reproduces_logits(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_llama(tiny_llama_config()), byte_tokenizer()
    assert 60_000 <= _params(model) <= 130_000
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the spec asks

    path = save_model(model, tokenizer, tmp_path / "base")
    assert (path / "model.safetensors").is_file()
    loaded, loaded_tok = load_model(path)
    assert isinstance(loaded, LlamaForCausalLM) and not loaded.training
    assert loaded.dtype == torch.float32

    ids = _batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    text = "Round trip: <>&\n\t{}[]"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(loaded_tok) == 259


def test_seed_fixes_weights_without_touching_global_rng() -> None:
    config = tiny_llama_config()
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_llama(config, seed=0), build_tiny_llama(config, seed=0), build_tiny_llama(config, 1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert _same_weights(tiny_gpt2(seed=3), tiny_gpt2(seed=3))
    assert not _same_weights(tiny_gpt2(seed=3), tiny_gpt2(seed=4))


def test_tiny_gpt2_has_conv1d_and_round_trips(tmp_path: Path) -> None:
    model = tiny_gpt2()
    assert any(isinstance(m, Conv1D) for m in model.modules())
    assert model.config.vocab_size == 259 and model.config.eos_token_id == 1
    loaded, _ = load_model(save_model(model, byte_tokenizer(), tmp_path / "gpt2"))
    assert isinstance(loaded, GPT2LMHeadModel)
    ids = _batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_model_missing_path_is_a_clear_offline_error(tmp_path: Path) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_model(empty)
    with pytest.raises(FileNotFoundError, match="some-org/some-model"):  # looks like a hub id: still local
        load_model("some-org/some-model")


def test_load_model_honours_dtype(tmp_path: Path) -> None:
    path = save_model(build_tiny_llama(tiny_llama_config()), byte_tokenizer(), tmp_path / "base")
    model, _ = load_model(path, device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"


@pytest.mark.usefixtures("one_thread")
def test_demo_base_trains_caches_and_loads(tmp_path: Path) -> None:
    logs: list[str] = []
    path = demo_base(tmp_path, steps=30, config_kwargs=TINY_DEMO, log=logs.append)
    assert path.parent == tmp_path and path.name.startswith("demo-base-")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind
    assert any("pretraining" in line for line in logs)

    info = json.loads((path / "pretrain.json").read_text())
    assert info["steps"] == 30 and info["params"] > 0 and info["final_loss"] < info["initial_loss"]

    trained, _ = load_model(path)
    untrained = build_tiny_llama(tiny_llama_config(**TINY_DEMO), seed=0)
    ids = pydoc_corpus_ids()[: 8 * 128].view(8, 128)
    assert _lm_loss(trained, ids) < _lm_loss(untrained, ids) - 1.0

    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    logs.clear()
    assert demo_base(tmp_path, steps=30, config_kwargs=TINY_DEMO, log=logs.append) == path
    assert not any("pretraining" in line for line in logs)
    assert weights.stat().st_mtime_ns == mtime


@pytest.mark.usefixtures("one_thread")
def test_demo_base_is_deterministic_and_keyed_by_recipe(tmp_path: Path) -> None:
    a = demo_base(tmp_path / "a", steps=5, config_kwargs=TINY_DEMO)
    b = demo_base(tmp_path / "b", steps=5, config_kwargs=TINY_DEMO)
    assert a.name == b.name
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert demo_base(tmp_path / "a", steps=5, seed=1, config_kwargs=TINY_DEMO).name != a.name
    assert demo_base(tmp_path / "a", steps=6, config_kwargs=TINY_DEMO).name != a.name


def test_demo_config_is_a_small_llama() -> None:
    model = build_tiny_llama(tiny_llama_config(**DEMO_CONFIG))
    assert 1_500_000 <= _params(model) <= 3_000_000


def test_pick_device_cpu() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type in {"cpu", "cuda"}
    with pytest.raises(ValueError, match="unsupported device"):
        pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: nothing to refuse")
def test_pick_device_cuda_without_cuda_raises() -> None:
    assert pick_device() == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")


def test_repeat_spans_copies_an_earlier_span_into_some_windows() -> None:
    from bem.core.models import repeat_spans

    batch = torch.arange(64 * 192).reshape(64, 192) % 251 + 3  # no accidental repeats inside a row
    out = repeat_spans(batch, torch.Generator().manual_seed(0), share=0.5)
    assert torch.equal(batch, torch.arange(64 * 192).reshape(64, 192) % 251 + 3)  # input untouched
    changed = (out != batch).any(dim=1)
    assert 16 <= int(changed.sum()) <= 48  # about half the windows
    for row in torch.nonzero(changed).flatten().tolist():
        diff = torch.nonzero(out[row] != batch[row]).flatten()
        dst, n = int(diff[0]), int(diff[-1] - diff[0] + 1)
        assert n >= 16
        # The overwritten stretch equals some earlier, untouched span of the same row.
        src = [
            s for s in range(0, dst - n + 1) if torch.equal(batch[row, s : s + n], out[row, dst : dst + n])
        ]
        assert src, f"row {row}: copied stretch not found earlier in the window"

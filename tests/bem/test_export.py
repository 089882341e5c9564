"""Export to peft and checkpoints: reloaded models must reproduce the BEM logits."""

import pytest
import torch
from peft import PeftModel

from bem.core.attach import attach_bems
from bem.core.controllers import SimpleController
from bem.core.export import export_peft, load_bem, save_bem
from bem.core.models import build_tiny_llama, tiny_gpt2, tiny_llama_config
from tests.bem.conftest import randomize

FRESH = {"llama": lambda: build_tiny_llama(tiny_llama_config(), seed=0), "gpt2": lambda: tiny_gpt2(seed=0)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_export_matches_bem_logits(family, ids, tmp_path) -> None:
    model = FRESH[family]()
    att = attach_bems(model, max_overhead=1.0)
    randomize(att)
    model.eval()
    code = torch.randn(att.total_rank)
    with torch.no_grad(), att.codes(code.expand(ids.shape[0], -1)):
        expected = model(ids).logits

    export_peft(att, code, tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(FRESH[family](), tmp_path / "lora").eval()
    with torch.no_grad():
        got = peft_model(ids).logits
        assert (got - expected).abs().max() <= 1e-5
        peft_model.merge_adapter()
        assert (peft_model(ids).logits - expected).abs().max() <= 1e-5
        peft_model.unmerge_adapter()
        assert (peft_model(ids).logits - expected).abs().max() <= 1e-5
        base = FRESH[family]()(ids).logits
    assert (got - base).abs().max() > 1e-3  # the exported adapter is not a no-op


def test_save_then_load_reproduces_logits(ids, tmp_path) -> None:
    model = build_tiny_llama(tiny_llama_config(), seed=0)
    att = attach_bems(model, ["W_down"], rank_schedule=[3, 5], max_overhead=1.0)
    randomize(att)
    ctrl = SimpleController(64, att.total_rank)
    model.eval(), ctrl.eval()
    feats = torch.randn(ids.shape[0], 64)
    with torch.no_grad(), att.codes(ctrl(feats).code):
        expected = model(ids).logits
    save_bem(att, tmp_path / "ckpt", {"controller": ctrl})

    fresh = build_tiny_llama(tiny_llama_config(), seed=0)
    ctrl2 = SimpleController(64, att.total_rank)
    att2 = load_bem(fresh, tmp_path / "ckpt", {"controller": ctrl2}, max_overhead=1.0)
    assert att2.ranks == att.ranks
    fresh.eval(), ctrl2.eval()
    with torch.no_grad(), att2.codes(ctrl2(feats).code):
        assert torch.equal(fresh(ids).logits, expected)


def test_load_rejects_a_foreign_folder(tmp_path) -> None:
    (tmp_path / "bem.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="bem-checkpoint"):
        load_bem(build_tiny_llama(tiny_llama_config()), tmp_path)

"""The smoke base's token-shift Llama: incremental and chunked decoding equal one full pass, the shift
is really there, and the model saves and loads through the Auto classes like any local model."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models
from transformers import DynamicCache, PreTrainedTokenizerFast

from bem.core.attach import attach_bems
from bem.core.models import load_model
from bem.core.token_shift import TokenShiftLlamaConfig, TokenShiftLlamaForCausalLM


def _model() -> TokenShiftLlamaForCausalLM:
    config = TokenShiftLlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = TokenShiftLlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.prev_tokens.weight[1:].normal_()  # trained-looking, so the shift moves the logits
    return model


def test_chunked_and_incremental_decoding_equal_one_full_pass() -> None:
    model = _model()
    ids = torch.randint(2, 40, (3, 11))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = DynamicCache(config=model.config)
        chunks = [
            model(input_ids=ids[:, lo:hi], past_key_values=cache, use_cache=True).logits
            for lo, hi in ((0, 4), (4, 5), (5, 11))
        ]
        out, steps = None, []
        for t in range(ids.shape[1]):
            out = model(
                input_ids=ids[:, t : t + 1],
                past_key_values=None if out is None else out.past_key_values,
                use_cache=True,
            )
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_each_position_sees_the_token_before_it() -> None:
    model = _model()
    a = torch.tensor([[5, 6, 7, 8]])
    b = torch.tensor([[9, 6, 7, 8]])  # only the first token differs
    with torch.no_grad():
        ha = model.model.embed_tokens(a) + model.model.prev_tokens(model.model._previous(a, None))
        hb = model.model.embed_tokens(b) + model.model.prev_tokens(model.model._previous(b, None))
    # position 1's input differs through the shift alone; position 2 onwards has equal inputs
    assert not torch.allclose(ha[0, 1], hb[0, 1])
    torch.testing.assert_close(ha[0, 2:], hb[0, 2:])
    # the first position has no previous token: the padding row adds nothing
    torch.testing.assert_close(ha[0, 0], model.model.embed_tokens.weight[5])


def test_generate_matches_greedy_full_passes_and_the_model_round_trips(tmp_path) -> None:
    model = _model()
    prompt = torch.tensor([[3, 9, 4, 7]])
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        ids = prompt
        for _ in range(5):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == ids.tolist()

    model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(40)}
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")), pad_token="t0", eos_token="t1"
    ).save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path)
    assert isinstance(loaded, TokenShiftLlamaForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bems_attach_to_it_as_to_a_llama() -> None:
    """A subclass of a known family's config is that family: the smoke base takes BEMs at W_O and
    W_down like any Llama."""
    model = _model()
    att = attach_bems(model, max_overhead=1.0)
    assert sorted(att.sites) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")
    )

"""Building models: inline configs of three families, local pretrained directories, errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_align.models import CausalLMSpec, build_causal_lm, build_tokenizer, load_tokenizer
from tests.conftest import tiny_config


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_inline_config_builds_each_family_with_tokenizer_ids(family):
    spec = CausalLMSpec(config=tiny_config(family))
    tok = load_tokenizer(spec)
    model = build_causal_lm(spec, tok)
    assert model.config.model_type == family
    assert model.config.vocab_size == len(tok) == 384
    assert model.config.eos_token_id == tok.eos_token_id == 1
    ids = torch.tensor([[5, 6, 7]])
    assert model(input_ids=ids).logits.shape == (1, 3, 384)


def test_same_seed_same_weights_different_seed_different():
    a = build_causal_lm(CausalLMSpec(config=tiny_config(), seed=3), build_tokenizer("byte"))
    b = build_causal_lm(CausalLMSpec(config=tiny_config(), seed=3), build_tokenizer("byte"))
    c = build_causal_lm(CausalLMSpec(config=tiny_config(), seed=4), build_tokenizer("byte"))
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_pretrained_local_directory_round_trip(tmp_path):
    """The hub-id code path, fed a directory written by save_pretrained (no network here)."""
    tok = build_tokenizer("byte")
    model = build_causal_lm(CausalLMSpec(config=tiny_config("qwen2")), tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = CausalLMSpec(pretrained=str(tmp_path))
    loaded = build_causal_lm(spec, load_tokenizer(spec))
    ids = torch.tensor([[10, 20, 30, 40]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert load_tokenizer(spec)("ab", add_special_tokens=False).input_ids == [100, 101]
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), type(model))


def test_bfloat16_and_gradient_checkpointing():
    spec = CausalLMSpec(config=tiny_config(), dtype="bfloat16", gradient_checkpointing=True)
    model = build_causal_lm(spec, load_tokenizer(spec))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.is_gradient_checkpointing


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one"),
    (dict(pretrained="x", config={"model_type": "llama"}), "exactly one"),
    (dict(config={"hidden_size": 8}), "model_type"),
    (dict(config={"model_type": "llama"}, dtype="float64"), "dtype"),
])
def test_invalid_specs_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLMSpec(**kwargs)


def test_byte_tokenizer_chat_template_ends_assistant_turns_with_eos():
    tok = build_tokenizer("byte")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert text == "<|user|>\nhi\n<|assistant|>\nyo</s>\n"

"""end_of_turn_ids: the token a chat template closes an assistant turn with, on every zoo tokenizer,
the byte tokenizer and templates written to probe each rule."""

import pytest

from lit_align.models import CausalLMSpec, build_tokenizer, load_tokenizer
from lit_align.models.tokenizer import end_of_turn_ids, special_ids

# Hand-checked ids: the zoo's byte-level BPEs put their special tokens right after the learned
# vocabulary (746 learned Qwen2 tokens; 768 for Llama 3 and GPT-2), in each family's order:
# Qwen2 <|endoftext|> <|im_start|> <|im_end|>; Llama 3 <|begin_of_text|> (768) ... <|eot_id|> (768 + 9).
TURN_END = {"qwen2_instruct": ("<|im_end|>", 748), "qwen2_base": ("<|im_end|>", 748), "moe": ("<|im_end|>", 748),
            "llama3_instruct": ("<|eot_id|>", 777), "gpt2": ("<|endoftext|>", 768)}


@pytest.mark.parametrize("name", sorted(TURN_END))
def test_end_of_turn_of_each_zoo_template(zoo, name):
    tok = load_tokenizer(CausalLMSpec(pretrained=zoo[name]))
    token, id_ = TURN_END[name]
    assert tok.convert_tokens_to_ids(token) == id_
    assert end_of_turn_ids(tok) == [id_]
    # the EOS of the Qwen2 base model and of Llama 3 is not where a turn ends
    assert (id_ == tok.eos_token_id) == (name in ("qwen2_instruct", "moe", "gpt2"))


def test_gpt2_without_a_template_of_its_own_ends_turns_with_the_byte_template_eos(zoo):
    # GPT-2 has no chat template; build_tokenizer gives it the byte template, whose turns end with the EOS.
    tok = load_tokenizer(CausalLMSpec(pretrained=zoo["gpt2"]))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert text == "<|user|>\nHi\n<|assistant|>\nyo<|endoftext|>\n" and end_of_turn_ids(tok) == [tok.eos_token_id]


def test_byte_tokenizer_turns_end_with_its_eos():
    tok = build_tokenizer("byte")
    assert end_of_turn_ids(tok) == [1] and tok.convert_ids_to_tokens(1) == "</s>"


def test_no_chat_template_or_no_special_token_after_the_turn_is_empty():
    tok = build_tokenizer("byte")
    tok.chat_template = None
    assert end_of_turn_ids(tok) == []
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    assert end_of_turn_ids(tok) == []  # only newlines follow the assistant's text


def test_whitespace_before_the_turn_end_is_skipped_and_a_later_special_token_is_not_it(zoo):
    # Llama 2's form: ' ' + content + ' ' + eos. GPT-2's BPE keeps the space as a token of its own
    # (220, 'Ġ'), unlike the byte tokenizer, whose special tokens swallow the whitespace next to them.
    tok = load_tokenizer(CausalLMSpec(pretrained=zoo["gpt2"]))
    tok.add_special_tokens({"additional_special_tokens": ["<next>"]})
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                         "{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                         "{% else %}{{ ' ' + m['content'] + ' ' + eos_token + '<next>' }}{% endif %}{% endfor %}")
    assert tok(" <|endoftext|><next>", add_special_tokens=False).input_ids == [220, 768, 769]
    assert special_ids(tok) == {768, 769}
    assert end_of_turn_ids(tok) == [768]


def test_a_template_ending_the_last_turn_differently_gives_both_ends_in_order():
    tok = build_tokenizer("byte")
    tok.add_special_tokens({"additional_special_tokens": ["<end>", "<last>"]})
    end, last = tok.convert_tokens_to_ids(["<end>", "<last>"])
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ':' + m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ '<last>' if loop.last else '<end>' }}{% endif %}"
                         "{% endfor %}")
    assert end_of_turn_ids(tok) == [end, last] == [384, 385]


def test_the_result_follows_a_changed_template():
    tok = build_tokenizer("byte")
    assert end_of_turn_ids(tok) == [1]
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = "{% for m in messages %}{{ m['role'] + '\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|end|>")] == [384]


def test_a_template_that_cannot_render_a_conversation_or_rewrites_the_answer_is_an_error():
    tok = build_tokenizer("byte")
    tok.chat_template = "{{ raise_exception('only tools here') }}"
    with pytest.raises(ValueError, match="cannot render a user / assistant conversation.*only tools here"):
        end_of_turn_ids(tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}</s>{% endfor %}"
    with pytest.raises(ValueError, match="does not write an assistant turn's text as given"):
        end_of_turn_ids(tok)


def test_a_template_refusing_two_exchanges_is_probed_with_one():
    tok = build_tokenizer("byte")
    tok.chat_template = ("{% if messages | length > 2 %}{{ raise_exception('one exchange only') }}{% endif %}"
                         "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}")
    assert end_of_turn_ids(tok) == [1]

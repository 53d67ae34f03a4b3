"""Tokenizers: any Hugging Face tokenizer by hub id or local path, or the built-in
byte-level tokenizer that needs no files (so every recipe runs offline)."""

from __future__ import annotations

import json
import os

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

BYTE_TOKENIZER = "byte"

# A plain role-tagged template. Each assistant turn ends with the EOS token so the
# model learns to stop; the generation prompt opens an assistant turn.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _declared_class(path: str):
    """The tokenizer class a local directory's ``tokenizer_config.json`` names, if transformers has it.

    ``AutoTokenizer`` may prefer the model family's tokenizer over the declared class
    (a byte tokenizer saved beside a Qwen2 model loads as an empty Qwen2 tokenizer), so
    a declared class is honoured first.
    """
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        name = json.load(f).get("tokenizer_class")
    return getattr(transformers, name, None) if isinstance(name, str) else None


def build_tokenizer(name_or_path: str | None, padding_side: str = "right", trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer.

    Args:
        name_or_path: ``"byte"`` (or ``None``) for the built-in byte-level tokenizer
            (``ByT5Tokenizer``: 384 ids, pad 0, eos 1), otherwise a hub id or a local
            directory readable by ``AutoTokenizer.from_pretrained``.
        padding_side: side used by ``tokenizer.pad``; collators pad explicitly anyway.

    A tokenizer without a pad token gets its EOS token as pad; one without a chat
    template gets the byte template above, so conversational data always renders.
    """
    if name_or_path in (None, BYTE_TOKENIZER):
        from transformers import ByT5Tokenizer

        tokenizer = ByT5Tokenizer()
    else:
        tokenizer = _declared_class(name_or_path) or AutoTokenizer
        tokenizer = tokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; targets must end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    tokenizer.padding_side = padding_side
    return tokenizer


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token the chat template ends an assistant turn with (``<|im_end|>`` for ChatML,
    ``<|eot_id|>`` for Llama 3, the EOS for the built-in byte template), found by rendering a
    short conversation and reading what follows the assistant's text; empty when that is not a
    special token (or the template cannot render it)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "ping"},
                                              {"role": "assistant", "content": "pong"}], tokenize=False)
    except Exception:  # a template that refuses this conversation has no end of turn to learn
        return []
    tail = text[text.rfind("pong") + len("pong"):]
    ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [ids[0]] if ids and ids[0] in special else []

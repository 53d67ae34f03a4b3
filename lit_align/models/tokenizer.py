"""Tokenizers: any Hugging Face tokenizer by hub id or local path, or the built-in
byte-level tokenizer that needs no files (so every recipe runs offline)."""

from __future__ import annotations

import json
import os
import weakref

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


def build_tokenizer(name_or_path: str | None, padding_side: str = "right",
                    trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
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


# Assistant contents of the probe conversation: text no template writes itself, with no
# whitespace at either end for templates that trim contents.
_PROBE_TURNS = ("lit-align probe answer one", "lit-align probe answer two")
_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (settings, ids)


def special_ids(tokenizer) -> set[int]:
    """Every special token id of ``tokenizer``: the named ones (BOS, EOS, pad, ...) and every
    added token marked special (ChatML's ``<|im_start|>``, Llama 3's ``<|eot_id|>`` ...)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False))
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token id(s) the tokenizer's chat template ends an assistant turn with.

    Found by rendering a conversation of two user / assistant exchanges and tokenizing what
    follows each assistant's content: its first token, whitespace skipped, is the turn end
    when it is a special token (:func:`special_ids`). ChatML (Qwen) gives ``[<|im_end|>]``,
    Llama 3 ``[<|eot_id|>]``, the built-in byte template (:data:`BYTE_CHAT_TEMPLATE`) the
    tokenizer's EOS. A template that ends turns differently in the middle and at the end of
    a conversation gives both, in that order. Empty without a chat template, or when no
    special token follows the assistant's text (the turn then ends in plain text, which no
    single stop id can catch).

    A generation that stops at one of these ids has finished its turn, so the online RL
    modules add them to the stop ids whenever the data is chat-templated, and
    :func:`lit_align.data.encode.tokenize_segments` appends no EOS after a templated turn
    that ends with one. Computed once per tokenizer and template (cached).

    Raises ``ValueError`` when the template cannot render a plain user / assistant
    conversation, or rewrites the assistant's text.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return []
    key = (template if isinstance(template, str) else repr(template), tokenizer.eos_token, len(tokenizer))
    cached = _END_OF_TURN.get(tokenizer)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    one, two = _PROBE_TURNS
    conversations = ([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": one},
                      {"role": "user", "content": "And then?"}, {"role": "assistant", "content": two}],
                     [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": one}])
    errors = []
    for conversation in conversations:  # a template refusing two exchanges may render one
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
            break
        except Exception as e:  # noqa: BLE001 - a template may raise anything (jinja's TemplateError, ValueError)
            errors.append(f"{type(e).__name__}: {e}")
    else:
        raise ValueError(f"end_of_turn_ids: the chat template cannot render a user / assistant conversation"
                         f" ({errors[-1]})")
    special = special_ids(tokenizer)
    ids: list[int] = []
    for turn in conversation:
        if turn["role"] != "assistant":
            continue
        at = text.find(turn["content"])
        if at < 0:
            raise ValueError(f"end_of_turn_ids: the chat template does not write an assistant turn's text as given"
                             f" ({turn['content']!r} is not in {text!r:.200})")
        after = tokenizer(text[at + len(turn["content"]):], add_special_tokens=False).input_ids
        first = next((i for i in after if i in special or tokenizer.decode([i]).strip()), None)
        if first in special and first not in ids:
            ids.append(first)
    _END_OF_TURN[tokenizer] = (key, tuple(ids))
    return ids

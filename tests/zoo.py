"""A zoo of tiny Hugging Face model directories in the formats of real hub checkpoints.

Each directory is what ``save_pretrained`` writes for a model, its tokenizer and its
``generation_config.json``, built offline from a fixed seed, and carries the quirks of the
checkpoint family it imitates (special tokens, stop ids, sampling defaults, dropout,
padded embeddings, storage dtype). The weights are random: the zoo tests loading, data,
stop tokens and sampling paths on real formats, not what a model knows.

=================  ==========================================================================
name               imitates
=================  ==========================================================================
qwen2_instruct     Qwen2.5-Instruct: ChatML template with a default system turn; eos
                   ``<|im_end|>``, pad ``<|endoftext|>``; generation config samples
                   (temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.1) and stops
                   on both; one digit per token; embeddings padded past the tokenizer.
qwen2_base         Qwen2.5 base: the same template, but eos = pad = ``<|endoftext|>`` while
                   turns end with ``<|im_end|>``; greedy generation config with
                   ``max_new_tokens`` 2048.
llama3_instruct    Llama-3-Instruct as first released: the tokenizer adds ``<|begin_of_text|>``
                   and its eos is ``<|end_of_text|>``, turns end with ``<|eot_id|>``; only the
                   generation config's eos list holds both; no pad token; up to 3 digits per
                   token; the template writes the BOS as text too (Llama 3.1's form).
gpt2               GPT-2: dropout 0.1 (resid, embd, attn, summary), learned absolute positions,
                   bos = eos = unk = ``<|endoftext|>``, no pad token, no chat template, digit
                   runs merged freely, float32 weights.
moe                Qwen1.5-MoE-Chat (``qwen2_moe``): 4 routed experts, top-2, a shared expert,
                   ChatML tokenizer as ``qwen2_instruct``.
=================  ==========================================================================

Every model is 2 layers with hidden size 32; every tokenizer is a byte-level BPE trained here
with ``tokenizers`` on text of the built-in tasks (arithmetic, the shapes scenes) and chat
phrases, with the family's pre-tokenizer and its special tokens after the learned vocabulary.
Weights are stored in bfloat16 (as the hub checkpoints are) except GPT-2's.

``write_variant`` copies a directory with its generation config changed, e.g.
``repetition_penalty=1.3`` on the same weights.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ZOO = ("qwen2_instruct", "qwen2_base", "llama3_instruct", "gpt2", "moe")
# The repetition-penalised variant in the session fixture (same weights as qwen2_instruct).
REPETITION_VARIANT = "qwen2_instruct_rep13"
BPE_VOCAB = 768  # learned tokens (bytes + merges) before the special tokens

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's template without its tool branches: a default system turn when the conversation
# has none, every turn closed by <|im_end|> and a newline.
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3.1's form of the Llama-3 template: the BOS written unconditionally (so an empty
# conversation renders a prefix of every other), contents trimmed, turns closed by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Pre-tokenizer splits of each family (from their tokenizer.json files): Qwen2 isolates every
# digit, Llama 3 takes up to three, GPT-2's byte-level regex keeps a run of digits together.
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = {
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    # Llama 3's first ten special ids, in order (128000 ...).
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
               "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
               "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"],
    "gpt2": ["<|endoftext|>"],
}

CHAT_PHRASES = [
    "Hello! How can I help you today?", "Hi, can you help me with a question?", "Sure, I can help with that.",
    "Thank you very much.", "You're welcome. Is there anything else you would like to know?",
    "I'm not sure I understand the question. Could you say it again?", "Let me think about it step by step.",
    "The answer is", "Please answer with a single number.", "Please answer in one word.", "Answer:", "Question:",
    "Yes, that is correct.", "No, that is not right.", "I don't know.", "Here is a short summary of the text.",
    "You are a helpful assistant.", QWEN_SYSTEM, "Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:", "### Input:", "### Response:", "system", "user", "assistant", "tool",
    "What is the capital of France? The capital of France is Paris.", "Good morning, how are you?",
    "I am fine, thanks for asking.", "Can you explain why the sky is blue?", "Sorry, I cannot do that.",
    "Describe the image.", "What colour is the circle?", "How many objects are there?", "there is nothing",
]


# -- tokenizers -----------------------------------------------------------------------------------------------------
@functools.cache
def corpus() -> tuple[str, ...]:
    """Training text of the tokenizers: arithmetic problems with their answers (both digit
    orders, several operators and prompt templates), both renderings of the shapes scenes
    with their questions and answers, and chat phrases."""
    from lit_align.data.tasks import ArithTask, ShapesTextTask

    lines = []
    for digits, ops in ((1, "+-*"), (2, "+"), (2, "-*"), (3, "+")):
        task = ArithTask(digits=digits, operators=ops, train_size=600 if digits > 1 else 70, val_size=10)
        for i, question in enumerate(task.splits()["train"]):
            value = task.solve(question)
            lines += [f"{question}={task.format_answer(value)}", f"What is {question}? {value}" if i % 3 == 0 else
                      f"{question}={value}"]
    for rendering in ("grid", "description"):
        rows = ShapesTextTask(rendering=rendering, train_size=60, val_size=5).rows()
        lines += [turn["value"] for split in rows.values() for row in split for turn in row["conversations"]]
    return tuple(lines + CHAT_PHRASES)


def _pre_tokenizer(family: str):
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    split = QWEN_SPLIT if family == "qwen2" else LLAMA3_SPLIT
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@functools.cache
def train_bpe(family: str) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Vocabulary (token, id) and merges of a byte-level BPE trained on :func:`corpus` with the
    pre-tokenizer of ``family`` (``qwen2``, ``llama3`` or ``gpt2``), the family's special tokens
    appended after the learned ids. Deterministic; trained once per process."""
    tokenizer = Tokenizer(models.BPE())
    if family == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer(family)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in SPECIAL_TOKENS[family]:
        vocab[token] = len(vocab)
    return tuple(sorted(vocab.items(), key=lambda kv: kv[1])), tuple(tuple(m) for m in model["merges"])


def make_tokenizer(name: str):
    """The transformers tokenizer of zoo model ``name``, in its family's class: ``Qwen2Tokenizer``,
    ``PreTrainedTokenizerFast`` (Llama 3's tokenizer.json with a BOS post-processor) or
    ``GPT2Tokenizer``."""
    from transformers import GPT2Tokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

    family = _family(name)
    vocab, merges = train_bpe(family)
    vocab, merges = dict(vocab), list(merges)
    if family == "qwen2":
        eos = "<|endoftext|>" if name == "qwen2_base" else "<|im_end|>"
        return Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=eos, pad_token="<|endoftext|>", bos_token=None,
                              unk_token=None, extra_special_tokens=["<|im_start|>", "<|im_end|>"],
                              chat_template=CHATML_TEMPLATE, model_max_length=32768,
                              clean_up_tokenization_spaces=False, errors="replace")
    if family == "gpt2":
        return GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024, clean_up_tokenization_spaces=False)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = _pre_tokenizer(family)
    backend.decoder = decoders.ByteLevel()
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, vocab[bos])]),
    ])
    backend.add_special_tokens(SPECIAL_TOKENS[family])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|end_of_text|>",
                                   chat_template=LLAMA3_TEMPLATE, model_max_length=8192,
                                   clean_up_tokenization_spaces=True, model_input_names=["input_ids", "attention_mask"])


# -- models ---------------------------------------------------------------------------------------------------------
def _family(name: str) -> str:
    if name not in ZOO:
        raise ValueError(f"zoo: unknown model {name!r} (known: {', '.join(ZOO)})")
    return {"llama3_instruct": "llama3", "gpt2": "gpt2"}.get(name, "qwen2")


def _configs(name: str, tokenizer) -> tuple[dict, dict]:
    """``(config.json kwargs, generation_config.json kwargs)`` of zoo model ``name``."""
    ids = tokenizer.convert_tokens_to_ids
    n = len(tokenizer)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    if name in ("qwen2_instruct", "qwen2_base", "moe"):
        endoftext, im_end = ids("<|endoftext|>"), ids("<|im_end|>")
        eos = endoftext if name == "qwen2_base" else im_end
        config = dict(model_type="qwen2", **small, vocab_size=64 * math.ceil(n / 64), rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
                      bos_token_id=endoftext, eos_token_id=eos)
        if name == "qwen2_base":
            return config, dict(bos_token_id=endoftext, eos_token_id=endoftext, do_sample=False, max_new_tokens=2048)
        sampling = dict(bos_token_id=endoftext, pad_token_id=endoftext, eos_token_id=[im_end, endoftext],
                        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1)
        if name == "moe":
            config.update(model_type="qwen2_moe", num_key_value_heads=4, tie_word_embeddings=False, num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                          decoder_sparse_step=1, norm_topk_prob=False, output_router_logits=False,
                          router_aux_loss_coef=0.001, mlp_only_layers=[])
            sampling.update(repetition_penalty=1.05)
        return config, sampling
    if name == "llama3_instruct":
        bos, end_of_text, eot = ids("<|begin_of_text|>"), ids("<|end_of_text|>"), ids("<|eot_id|>")
        config = dict(model_type="llama", **small, vocab_size=n, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=bos, eos_token_id=end_of_text)
        return config, dict(bos_token_id=bos, eos_token_id=[end_of_text, eot], do_sample=True, temperature=0.6,
                            top_p=0.9, max_length=256)
    eot = ids("<|endoftext|>")
    config = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_inner=None, n_positions=256, vocab_size=n,
                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, summary_first_dropout=0.1,
                  tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
                  task_specific_params={"text-generation": {"do_sample": True, "max_length": 50}})
    return config, dict(bos_token_id=eot, eos_token_id=eot)


def build_model(name: str, folder, seed: int = 0, generation: dict | None = None) -> str:
    """Write zoo model ``name`` (see the module docstring) to ``folder/name`` with
    ``save_pretrained``: weights, ``config.json``, ``generation_config.json`` and the tokenizer
    files. ``generation`` sets fields of the generation config on top of the checkpoint's
    (e.g. ``{"repetition_penalty": 1.3}``). The same ``seed`` writes identical files.
    Returns the directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = make_tokenizer(name)
    config, sampling = _configs(name, tokenizer)
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if name != "gpt2":
        model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(**{**sampling, **(generation or {})})
    path = os.path.join(os.fspath(folder), name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_variant(source: str, target, replace: bool = False, **generation) -> str:
    """Copy the model directory ``source`` to ``target`` (same weights and tokenizer) with its
    ``generation_config.json`` changed: ``generation`` fields set on top of the checkpoint's
    own, or, with ``replace=True``, on top of only its token ids (a clean generation config).
    Returns ``target``."""
    from transformers import GenerationConfig

    target = os.fspath(target)
    shutil.copytree(source, target, dirs_exist_ok=True)
    config = GenerationConfig.from_pretrained(source)
    if replace:
        config = GenerationConfig(**{k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                     if getattr(config, k) is not None})
    config.update(**generation)
    config.save_pretrained(target)
    return target


def build_zoo(folder, names=ZOO, seed: int = 0, variants: bool = True) -> dict[str, str]:
    """Write every zoo model in ``names`` under ``folder``, plus (``variants``) the
    :data:`REPETITION_VARIANT` of ``qwen2_instruct``: the same weights with ``repetition_penalty``
    1.3. Returns ``{name: directory}``."""
    paths = {name: build_model(name, folder, seed) for name in names}
    if variants and "qwen2_instruct" in paths:
        paths[REPETITION_VARIANT] = write_variant(paths["qwen2_instruct"], os.path.join(os.fspath(folder),
                                                  REPETITION_VARIANT), repetition_penalty=1.3)
    return paths

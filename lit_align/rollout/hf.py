"""Generation with Hugging Face ``generate`` (KV cache, left padding, batched)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How to sample completions.

    Args:
        max_new_tokens: generation limit per completion.
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling threshold (1.0: off).
        top_k: keep the k most likely tokens (0: off).
        n: completions per prompt (all in one batched call).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.n < 1:
            raise ValueError(f"sampling: invalid settings {self}")


@torch.inference_mode()
def hf_generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingParams,
                pad_token_id: int, eos_token_id: int) -> torch.Tensor:
    """Sample completions for left-padded prompts ``[B, P]``; returns ``[B * n, C]`` completion
    ids (prompt removed), padded with ``pad_token_id`` after EOS. The model is put in eval
    mode for the call and restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        greedy = sampling.temperature == 0
        kwargs = dict(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_token_id,
                      eos_token_id=eos_token_id, num_return_sequences=sampling.n, use_cache=True)
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    finally:
        model.train(was_training)
    return out[:, prompt_ids.shape[1]:]


def decode_completions(tokenizer, completion_ids: torch.Tensor) -> list[str]:
    """Text of each completion up to (not including) its first EOS."""
    eos = tokenizer.eos_token_id
    texts = []
    for row in completion_ids.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts

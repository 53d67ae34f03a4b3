"""The ``reward_model`` built-in: scores completions with a trained reward model
(:class:`lit_align.RewardModel` export or checkpoint)."""

from __future__ import annotations

import os

import torch

from lit_align.data.encode import tokenize_segments
from lit_align.data.formats import Segment
from lit_align.models import load_reward_model, sequence_scores
from lit_align.rewards.base import register_reward


@register_reward("reward_model")
class RewardModelReward:
    """r(x, y) of a Bradley-Terry reward model for each ``prompt + completion``.

    A sequence is tokenized exactly as the preference data tokenizes a (prompt, response)
    pair for reward-model training (:func:`lit_align.data.encode.tokenize_segments`): the
    tokenizer's BOS if it adds one, the prompt's tokens, the completion's tokens, then EOS
    unless the completion already contains it. The rollout's completions are decoded without
    their EOS; putting it back scores the sequence at the token where the model learnt to. A
    truncated completion (no stop token within the limit, ``context["truncated"]``) is scored as
    it is, without an EOS it never produced (PPO's ``missing_eos_penalty`` is the place to
    punish it).

    Args:
        path: an HF export directory of a reward model or a Lightning ``.ckpt`` of
            :class:`lit_align.RewardModel` (see :func:`lit_align.models.load_reward_model`).
        batch_size: sequences per forward pass.
        dtype: ``float32`` / ``bfloat16`` / ``float16`` to cast the model to (``None``: as stored).
        max_length: keep at most this many tokens per sequence, cutting the prompt from the
            left as preference-data truncation does (``None``: no limit).
        tokenizer: where to load the tokenizer from instead of ``path`` (a hub id, a directory or
            ``"byte"``), e.g. for an export whose tokenizer files name a class transformers lacks.

    The model is loaded by :meth:`setup` (onto its device) or at the first call (on CPU), and
    kept frozen in eval mode; the scores are float32 ``[N]`` on CPU.
    """

    def __init__(self, path: str, batch_size: int = 32, dtype: str | None = None, max_length: int | None = None,
                 tokenizer: str | None = None):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ValueError(f"reward_model: path {path!r} does not exist (expected a reward model's HF export "
                             "directory or a RewardModel .ckpt)")
        if batch_size < 1:
            raise ValueError(f"reward_model: batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"reward_model: max_length must be >= 2, got {max_length}")
        self.path, self.batch_size, self.dtype, self.max_length = path, batch_size, dtype, max_length
        self.tokenizer_source = tokenizer
        self.model = None
        self.tokenizer = None
        self.device = torch.device("cpu")

    def setup(self, device: torch.device | str | None = None) -> None:
        """Load the model (once) and move it to ``device``."""
        if device is not None:
            self.device = torch.device(device)
        if self.model is None:
            self.model, self.tokenizer = load_reward_model(self.path, dtype=self.dtype, padding_side="right",
                                                           tokenizer=self.tokenizer_source)
            self.model.requires_grad_(False)
        self.model.to(self.device)

    def encode(self, prompt: str, completion: str, truncated: bool = False) -> list[int]:
        """Token ids of the scored sequence: [BOS] + prompt + completion + EOS (no EOS when the
        completion was truncated)."""
        if self.tokenizer is None:
            self.setup()
        ids, labels, start = tokenize_segments([Segment(prompt, train=False), Segment(completion, train=True)],
                                               self.tokenizer)
        if truncated and ids and ids[-1] == self.tokenizer.eos_token_id and not completion.endswith(
                self.tokenizer.eos_token or "\0"):
            ids = ids[:-1]
        if self.max_length is not None and len(ids) > self.max_length:
            cut = min(len(ids) - self.max_length, max(start - 1, 0))  # keep a token of context before the response
            ids = ids[cut:][: self.max_length]
        return ids

    def __call__(self, prompts: list[str], completions: list[str], meta: list[dict], **context) -> torch.Tensor:
        if self.model is None:
            self.setup()
        truncated = context.get("truncated") or [False] * len(completions)
        sequences = [self.encode(p, c, t) for p, c, t in zip(prompts, completions, truncated)]
        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        with torch.inference_mode():
            for begin in range(0, len(sequences), self.batch_size):
                chunk = sequences[begin: begin + self.batch_size]
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, seq in enumerate(chunk):
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, : len(seq)] = 1
                out = sequence_scores(self.model, ids.to(self.device), mask.to(self.device))
                scores += out.float().cpu().tolist()
        return torch.tensor(scores, dtype=torch.float32)

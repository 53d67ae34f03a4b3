"""The result of a rollout: prompts, sampled completions, masks and log-probs, row-aligned."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import torch


def _pad_to(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    filler = x.new_full((x.shape[0], extra), value)
    return torch.cat([filler, x] if left else [x, filler], dim=1)


@dataclass
class RolloutBatch:
    """``N`` sampled completions; rows ``g * n .. g * n + n - 1`` answer the same prompt (a group).

    Tensors (``P`` prompt width, ``C`` completion width):
        prompt_ids ``[N, P]`` left-padded, prompt_mask ``[N, P]``;
        completion_ids ``[N, C]`` right-padded (pad after EOS), completion_mask ``[N, C]``
        (1 on sampled tokens, the stop token included); logprobs ``[N, C]`` float32 log-probs of the
        sampled tokens under ``softmax(logits / temperature)`` of the sampling policy, as the
        training forward computes them (0 off the mask); sampler_logprobs ``[N, C]`` or ``None``:
        the same log-probs as the sampler itself computed them (its kernels, precision and
        processing), so the gap between the two can be measured and corrected; truncated ``[N]``
        bool (no stop token within ``max_new_tokens``).
    Lists of length ``N``: prompts and completions (text, completion up to its EOS) and meta
    (the prompt row's metadata). ``group_size`` is the number of samples per prompt.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    group_size: int = 1
    sampler_logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_groups(self) -> int:
        return len(self) // self.group_size

    @property
    def lengths(self) -> torch.Tensor:
        """``[N]`` completion tokens, EOS included."""
        return self.completion_mask.sum(-1)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, rows: torch.Tensor | list[int]) -> RolloutBatch:
        """The given rows, in order (whole groups keep their grouping only if ``rows`` keeps them whole)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        idx = rows.tolist()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[rows.to(v.device)]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx] if v else []  # the text lists are optional
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    def trimmed(self) -> RolloutBatch:
        """The same rows without columns that are padding in every row (left of the prompts,
        right of the completions): a micro-batch's forward costs only what it needs."""
        keep_p = self.prompt_mask.any(0).nonzero()
        keep_c = self.completion_mask.any(0).nonzero()
        p0 = int(keep_p[0]) if len(keep_p) else self.prompt_mask.shape[1]
        c1 = int(keep_c[-1]) + 1 if len(keep_c) else 0
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("prompt_ids", "prompt_mask"):
            out[name] = out[name][:, p0:]
        for name in ("completion_ids", "completion_mask", "logprobs", "sampler_logprobs"):
            if out[name] is not None:
                out[name] = out[name][:, :c1]
        return RolloutBatch(**out)

    def chunks(self, size: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[list[int], RolloutBatch]]:
        """``(rows, chunk)`` for consecutive chunks of at most ``size`` rows of ``[lo, hi)``, each
        :meth:`trimmed`: the one layout of every pass over a rollout (scoring, reference, values and
        training micro-batches), so values computed chunk by chunk line up with the training
        forward's."""
        hi = len(self) if hi is None else hi
        for s in range(lo, hi, size):
            rows = list(range(s, min(s + size, hi)))
            yield rows, self.select(rows).trimmed()

    @staticmethod
    def cat(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
        """Rows of several rollouts (same group size), re-padded to common widths."""
        if not batches:
            raise ValueError("RolloutBatch.cat: nothing to concatenate")
        sizes = {b.group_size for b in batches}
        if len(sizes) != 1:
            raise ValueError(f"RolloutBatch.cat: group sizes differ ({sorted(sizes)})")
        p = max(b.prompt_ids.shape[1] for b in batches)
        c = max(b.completion_ids.shape[1] for b in batches)
        pads = {"prompt_ids": (p, pad_id, True), "prompt_mask": (p, 0, True), "completion_ids": (c, pad_id, False),
                "completion_mask": (c, 0, False), "logprobs": (c, 0.0, False), "sampler_logprobs": (c, 0.0, False)}
        out = {}
        for f in fields(RolloutBatch):
            values = [getattr(b, f.name) for b in batches]
            if f.name == "sampler_logprobs" and any(v is None for v in values):
                if not all(v is None for v in values):
                    raise ValueError("RolloutBatch.cat: some batches carry sampler_logprobs and some do not")
                out[f.name] = None
            elif f.name in pads:
                width, value, left = pads[f.name]
                out[f.name] = torch.cat([_pad_to(v, width, value, left) for v in values])
            elif f.name == "truncated":
                out[f.name] = torch.cat(values)
            elif f.name == "group_size":
                out[f.name] = values[0]
            else:
                out[f.name] = [x for v in values for x in v]
        return RolloutBatch(**out)

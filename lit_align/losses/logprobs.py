"""Per-token log-probabilities and entropies from logits, without a float32 [B, T, V] copy."""

from __future__ import annotations

import torch


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = 1024) -> torch.Tensor:
    """log p(label_t) under ``softmax(logits_t / temperature)``.

    Args:
        logits: ``[B, T, V]`` (any float dtype), already aligned with ``labels`` (the caller shifts).
        labels: ``[B, T]`` token ids; positions the caller masks out may hold any valid id
            (``-100`` is read as 0 here so the gather stays in range; mask the result).
        temperature: sampling temperature, so the log-probs match those of the sampler.
        chunk_size: rows of the flattened ``[B*T, V]`` upcast to float32 at a time.
    Returns:
        ``[B, T]`` float32 log-probs, differentiable with respect to ``logits``.

    ``log p = z_label - logsumexp(z)`` computed per chunk of rows: the peak extra memory
    is one float32 ``[chunk_size, V]`` block instead of a full ``[B, T, V]`` log-softmax.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"token_logprobs: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    flat = logits.reshape(-1, logits.shape[-1])
    ids = labels.reshape(-1).clamp(min=0)
    out = []
    for rows in _chunks(flat.shape[0], chunk_size):
        z = flat[rows].float()
        if temperature != 1.0:
            z = z / temperature
        out.append(z.gather(-1, ids[rows, None]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    if not out:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.cat(out).view(labels.shape)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy ``H(softmax(logits_t / temperature))`` per position: ``[B, T, V]`` -> ``[B, T]`` float32."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for rows in _chunks(flat.shape[0], chunk_size):
        z = flat[rows].float() / temperature
        logp = torch.log_softmax(z, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    if not out:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(out).view(logits.shape[:-1])

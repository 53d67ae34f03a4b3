"""Reducing a per-token loss matrix to a scalar (the loss-aggregation modes of verl / Dr. GRPO)."""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None,
                   num_tokens: torch.Tensor | float | None = None,
                   num_seqs: torch.Tensor | float | None = None) -> torch.Tensor:
    """Aggregate a per-token loss.

    Args:
        loss_mat: ``[B, T]`` per-token loss.
        mask: ``[B, T]``, 1 on tokens that count.
        mode: ``token-mean``: sum over all valid tokens / number of valid tokens (DAPO, Yu et al.
            2025, eq. 12); ``seq-mean-token-mean``: mean over sequences of each sequence's token
            mean (GRPO, Shao et al. 2024, eq. 3); ``seq-mean-token-sum``: mean over sequences of
            each sequence's token sum; ``seq-mean-token-sum-norm``: sum over all tokens /
            (number of sequences x ``max_len``) (Dr. GRPO, Liu et al. 2025).
        max_len: the constant of ``seq-mean-token-sum-norm`` (default ``T``).
        num_tokens: denominator of ``token-mean`` instead of this batch's token count: the
            token count of the whole optimizer step over micro-batches and ranks, so that
            the micro-batch results sum to the full-batch value.
        num_seqs: likewise the sequence count for the ``seq-mean-*`` modes.
    Returns:
        A scalar. Sequences with no valid token contribute 0 and still count as sequences.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"aggregate_loss: mode {mode!r} is not one of {AGG_MODES}")
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"aggregate_loss: loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    mask = mask.to(loss_mat.dtype)
    masked = loss_mat * mask
    seqs = num_seqs if num_seqs is not None else loss_mat.shape[0]
    if mode == "token-mean":
        tokens = num_tokens if num_tokens is not None else mask.sum()
        return masked.sum() / torch.clamp(torch.as_tensor(tokens, dtype=loss_mat.dtype, device=loss_mat.device), min=1.0)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / seqs
    if mode == "seq-mean-token-sum":
        return masked.sum() / seqs
    return masked.sum() / (seqs * (max_len if max_len is not None else loss_mat.shape[1]))

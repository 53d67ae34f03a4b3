"""Reducing a per-token loss matrix to a scalar: the loss-aggregation modes of verl / Dr. GRPO,
in the registry :data:`AGG_MODES`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_align.registry import lookup, register_into

#: Mode name -> ``fn(masked [B, T], mask [B, T], max_len, num_tokens, num_seqs) -> scalar``, where
#: ``masked`` is the loss already multiplied by the mask and ``num_seqs`` is never ``None``.
AGG_MODES: dict[str, Callable[..., torch.Tensor]] = {}


def register_agg_mode(name: str):
    """Decorator adding an aggregation mode to :data:`AGG_MODES`."""
    return register_into(AGG_MODES, "register_agg_mode", name)


@register_agg_mode("token-mean")
def _token_mean(masked, mask, max_len, num_tokens, num_seqs):
    # DAPO, Yu et al. 2025, eq. 12: every token of the step weighs the same
    tokens = num_tokens if num_tokens is not None else mask.sum()
    return masked.sum() / torch.clamp(torch.as_tensor(tokens, dtype=masked.dtype, device=masked.device), min=1.0)


@register_agg_mode("seq-mean-token-mean")
def _seq_mean_token_mean(masked, mask, max_len, num_tokens, num_seqs):
    # GRPO, Shao et al. 2024, eq. 3: each sequence's token mean, then a mean over sequences
    return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_seqs


@register_agg_mode("seq-mean-token-sum")
def _seq_mean_token_sum(masked, mask, max_len, num_tokens, num_seqs):
    return masked.sum() / num_seqs


@register_agg_mode("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(masked, mask, max_len, num_tokens, num_seqs):
    # Dr. GRPO, Liu et al. 2025: a constant denominator, no length bias
    return masked.sum() / (num_seqs * (max_len if max_len is not None else masked.shape[1]))


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None,
                   num_tokens: torch.Tensor | float | None = None,
                   num_seqs: torch.Tensor | float | None = None) -> torch.Tensor:
    """Aggregate a per-token loss.

    Args:
        loss_mat: ``[B, T]`` per-token loss.
        mask: ``[B, T]``, 1 on tokens that count.
        mode: a name in :data:`AGG_MODES`: ``token-mean``: sum over all valid tokens / number of
            valid tokens (DAPO, Yu et al. 2025, eq. 12); ``seq-mean-token-mean``: mean over
            sequences of each sequence's token mean (GRPO, Shao et al. 2024, eq. 3);
            ``seq-mean-token-sum``: mean over sequences of each sequence's token sum;
            ``seq-mean-token-sum-norm``: sum over all tokens / (number of sequences x ``max_len``)
            (Dr. GRPO, Liu et al. 2025).
        max_len: the constant of ``seq-mean-token-sum-norm`` (default ``T``).
        num_tokens: denominator of ``token-mean`` instead of this batch's token count: the
            token count of the whole optimizer step over micro-batches and ranks, so that
            the micro-batch results sum to the full-batch value.
        num_seqs: likewise the sequence count for the ``seq-mean-*`` modes.
    Returns:
        A scalar. Sequences with no valid token contribute 0 and still count as sequences.
    """
    fn = lookup(AGG_MODES, "aggregate_loss: mode", mode)
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"aggregate_loss: loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} "
                         "must both be [B, T]")
    mask = mask.to(loss_mat.dtype)
    seqs = num_seqs if num_seqs is not None else loss_mat.shape[0]
    return fn(loss_mat * mask, mask, max_len, num_tokens, seqs)

"""Reward shaping terms."""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13).

    Args:
        lengths: ``[B]`` response lengths in tokens.
        max_len: L_max, the generation limit.
        cache_len: L_cache, the width of the soft band before ``max_len``.
    Returns:
        ``[B]`` float penalty: 0 for |y| <= L_max - L_cache; (L_max - L_cache - |y|) / L_cache
        inside the band (linear from 0 to -1); -1 for |y| > L_max.
    """
    if cache_len <= 0 or cache_len > max_len:
        raise ValueError(f"overlong_penalty: cache_len must be in (0, max_len={max_len}], got {cache_len}")
    lengths = lengths.float()
    start = max_len - cache_len
    return ((start - lengths) / cache_len).clamp(min=-1.0, max=0.0)


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF-PPO (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2).

    Args:
        scores: ``[B]`` sequence-level scores (reward model or rule), placed on each
            sequence's last valid token.
        kl: ``[B, T]`` per-token KL estimate between the policy and the reference
            (see :func:`~lit_align.losses.kl_penalty`).
        mask: ``[B, T]`` 1 on response tokens.
        beta: KL coefficient.
    Returns:
        ``(rewards, non_score)``, both ``[B, T]``: ``non_score = -beta * kl`` on every valid
        token, ``rewards = non_score`` plus ``scores`` at the last valid token of each row
        (a row without valid tokens gets nothing).
    """
    if kl.shape != mask.shape or kl.dim() != 2 or scores.shape != kl.shape[:1]:
        raise ValueError(f"kl_shaped_rewards: scores {tuple(scores.shape)} must be [B] and kl {tuple(kl.shape)}, "
                         f"mask {tuple(mask.shape)} [B, T]")
    mask = mask.to(kl.dtype)
    non_score = -beta * kl * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * (mask > 0)).argmax(-1)
    has_tokens = mask.sum(-1) > 0
    rewards = non_score.clone()
    rewards[has_tokens, last[has_tokens]] += scores[has_tokens].to(kl.dtype)
    return rewards, non_score

"""Advantage estimators: group-relative ones for outcome rewards (GRPO family, in the registry
:data:`ADVANTAGE_ESTIMATORS`) and generalized advantage estimation against a critic (PPO)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_align.registry import register_into

ADVANTAGE_SCALES = ("group", "none")

#: Estimator name -> ``fn(rewards [B], group_size) -> advantages [B]`` for one scalar reward per
#: completion, a group being ``group_size`` consecutive rows (the samples of one prompt).
ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {}


def register_advantage_estimator(name: str):
    """Decorator adding ``fn(rewards [B], group_size) -> [B]`` to :data:`ADVANTAGE_ESTIMATORS`."""
    return register_into(ADVANTAGE_ESTIMATORS, "register_advantage_estimator", name)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, section 4.1.2).

    Args:
        rewards: ``[B]`` one scalar per completion; a group is ``group_size`` consecutive rows
            (the samples of one prompt), so ``B`` must be a multiple of ``group_size``.
        group_size: G, samples per prompt.
        scale: ``group``: (r - mean_g) / (std_g + eps) with the unbiased sample std; ``none``:
            r - mean_g only (Dr. GRPO, Liu et al. 2025, removes the std normalisation bias).
        eps: keeps a zero-variance group at advantage 0 instead of 0/0.
    Returns:
        ``[B]`` advantages. A group of one sample has std 0 (not NaN) and advantage 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"group_advantages: scale {scale!r} is not one of {ADVANTAGE_SCALES}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards {tuple(rewards.shape)} is not a whole number of groups of "
                         f"{group_size}")
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(-1, keepdim=True)
    if scale == "group":
        std = grouped.std(-1, unbiased=True, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centered = centered / (std + eps)
    return centered.view(-1)


@register_advantage_estimator("grpo")
def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - group mean) / (group std + 1e-6) (GRPO, Shao et al. 2024, sec. 4.1.2)."""
    return group_advantages(rewards, group_size, scale="group")


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r - group mean, without the std division that favours easy and hard prompts
    (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.1)."""
    return group_advantages(rewards, group_size, scale="none")


@register_advantage_estimator("rloo")
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline: r_i - mean_{j != i} r_j = G / (G - 1) (r_i - group mean)
    (RLOO, Ahmadian et al. 2024, eq. 7; Kool et al. 2019). Needs ``group_size >= 2``."""
    if group_size < 2:
        raise ValueError(f"rloo_advantages: the leave-one-out baseline needs group_size >= 2, got {group_size}")
    return group_advantages(rewards, group_size, scale="none") * (group_size / (group_size - 1))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    Args:
        rewards: ``[B, T]`` per-token rewards (e.g. -beta * KL everywhere plus the score on the
            last response token).
        values: ``[B, T]`` critic values V(s_t) at the same positions.
        mask: ``[B, T]`` 1 on response tokens. Masked positions are skipped: the recursion runs
            over valid tokens only, and the value after a sequence's last valid token is 0.
        gamma: discount; lam: the GAE lambda.
    Returns:
        ``(advantages, returns)``, both ``[B, T]``, 0 where ``mask`` is 0;
        ``returns = advantages + values`` on valid tokens.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma * lam * A_{t+1}.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [B, T]")
    mask = mask.to(torch.float32)
    rewards = rewards.float() * mask
    values = values.float() * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # on an invalid position carry the next valid token's quantities through unchanged
        advantages[:, t] = adv_t * m
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, adv_t, next_adv)
    return advantages, (advantages + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the valid tokens of ``mask`` (PPO advantage whitening).

    ``reduce`` sums a tensor over the data-parallel ranks (an all-reduce; ``None``: this batch
    alone). With it, the mean and the variance are those of every rank's valid tokens, as one
    process holding the whole batch computes them, so each rank's ``x`` is whitened by the same
    statistics."""
    reduce = reduce or (lambda t: t)
    mask = mask.to(x.dtype)
    n = reduce(mask.sum()).clamp(min=1.0)
    mean = reduce((x * mask).sum()) / n
    var = reduce(((x - mean).square() * mask).sum()) / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask

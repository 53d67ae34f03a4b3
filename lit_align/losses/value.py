"""The critic's side of PPO: the clipped value loss and the explained variance of its values."""

from __future__ import annotations

import torch


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss of PPO (as in OpenAI baselines / TRL's PPOTrainer).

    Args:
        values: ``[B, T]`` current critic values (with grad).
        old_values: ``[B, T]`` critic values at rollout time.
        returns: ``[B, T]`` GAE returns (targets).
        mask: ``[B, T]`` 1 on response tokens.
        clip: values may move at most ``clip`` from ``old_values`` before the loss stops
            rewarding the move; ``None`` disables clipping.
    Returns:
        ``(loss, metrics)``: 1/2 * masked mean of max((V - R)^2, (clip(V, V_old +- clip) - R)^2),
        and ``clip_frac`` (share of valid tokens where the clipped term is the larger).
    """
    mask = mask.to(values.dtype)
    unclipped = (values - returns).square()
    if clip is None:
        loss_mat = unclipped
        frac = values.new_tensor(0.0)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (v_clipped - returns).square()
        loss_mat = torch.maximum(unclipped, clipped)
        frac = _masked_mean((clipped > unclipped).to(values.dtype), mask).detach()
    return 0.5 * _masked_mean(loss_mat, mask), {"clip_frac": frac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over valid tokens: 1 for a perfect critic, 0 for a
    constant one, negative for one worse than a constant.

    Args:
        values, returns, mask: ``[B, T]``; variances are population variances over ``mask``.
    Returns:
        A detached scalar (Var(returns) is clamped at 1e-8).
    """
    mask = mask.float()
    n = mask.sum().clamp(min=1)

    def var(x):
        mean = (x * mask).sum() / n
        return (((x - mean) * mask) ** 2).sum() / n

    return (1.0 - var(returns - values) / var(returns).clamp(min=1e-8)).detach()

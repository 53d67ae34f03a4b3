"""Clipped policy-gradient surrogate losses: PPO/GRPO/DAPO token ratios and GSPO sequence ratios."""

from __future__ import annotations

import torch

from lit_align.losses.aggregation import aggregate_loss

IS_LEVELS = ("token", "sequence", "sequence-token")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float, clip_high: float, level: str = "token", agg_mode: str = "token-mean",
                max_len: int | None = None, num_tokens=None, num_seqs=None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective, negated to a loss.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (with grad).
        old_logp: ``[B, T]`` log-probs under the policy that generated them.
        advantages: ``[B]`` (one per sequence, broadcast over tokens) or ``[B, T]``.
        mask: ``[B, T]`` 1 on response tokens that carry loss.
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``
            (Clip-Higher when ``clip_high > clip_low``, DAPO, Yu et al. 2025, eq. 10).
        level: ``token``: rho_t = pi/pi_old per token (PPO, Schulman et al. 2017, eq. 7; GRPO);
            ``sequence``: one ratio per sequence, s = exp(mean_t(logp - old_logp)), the
            length-normalised sequence likelihood ratio of GSPO (Zheng et al. 2025, eq. 7);
            ``sequence-token``: GSPO-token (eq. 13), s_t = sg[s] * pi_t / sg[pi_t], equal to
            ``s`` in value but with per-token gradients so token-level advantages can be used.
        agg_mode, max_len, num_tokens, num_seqs: passed to :func:`aggregate_loss`.
    Returns:
        ``(loss, metrics)``: the scalar loss and detached metrics: ``clip_frac_low`` (share of
        tokens where the lower clip is active, A < 0 and rho < 1 - clip_low), ``clip_frac_high``
        (A > 0 and rho > 1 + clip_high), ``ratio_mean``/``ratio_min``/``ratio_max`` and
        ``approx_kl`` (mean of k3 between old and new policy) over valid tokens.

    Per token: L_t = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high)).
    """
    if level not in IS_LEVELS:
        raise ValueError(f"policy_loss: level {level!r} is not one of {IS_LEVELS}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"policy_loss: clip_low ({clip_low}) and clip_high ({clip_high}) must be >= 0")
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    advantages = advantages.to(logp.dtype)
    log_ratio = (logp - old_logp) * mask
    if level == "token":
        ratio = torch.exp(log_ratio.clamp(max=20.0))
    else:
        seq_log_ratio = log_ratio.sum(-1) / mask.sum(-1).clamp(min=1.0)
        seq_ratio = torch.exp(seq_log_ratio.clamp(max=20.0))[:, None]
        if level == "sequence":
            ratio = seq_ratio.expand_as(logp)
        else:
            ratio = seq_ratio.detach() * torch.exp(logp - logp.detach())
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(-advantages * ratio, -advantages * clipped)
    loss = aggregate_loss(loss_mat, mask, agg_mode, max_len=max_len, num_tokens=num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        r = ratio.detach()
        low = ((advantages < 0) & (r < 1.0 - clip_low)).to(mask.dtype)
        high = ((advantages > 0) & (r > 1.0 + clip_high)).to(mask.dtype)
        valid = mask > 0
        neg = -log_ratio.detach()
        metrics = {
            "clip_frac_low": _masked_mean(low, mask),
            "clip_frac_high": _masked_mean(high, mask),
            "ratio_mean": _masked_mean(r, mask),
            "ratio_min": r[valid].min() if valid.any() else r.new_tensor(1.0),
            "ratio_max": r[valid].max() if valid.any() else r.new_tensor(1.0),
            "approx_kl": _masked_mean(torch.exp(neg) - neg - 1.0, mask),
        }
    return loss, metrics


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

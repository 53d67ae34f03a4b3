"""Clipped policy-gradient surrogate losses: PPO/GRPO/DAPO token ratios and GSPO sequence ratios."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_align.losses.aggregation import aggregate_loss
from lit_align.registry import lookup, register_into

#: Importance-sampling level -> ``fn(log_ratio [B, T], mask [B, T], logp [B, T]) -> ratio [B, T]``
#: with ``log_ratio = (logp - old_logp) * mask``.
IS_LEVELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {}

#: Surrogate name -> ``fn(ratio [B, T], advantages [B, T], clip_low, clip_high) -> loss [B, T]`` per token.
POLICY_LOSSES: dict[str, Callable[..., torch.Tensor]] = {}

#: Dual-clip PPO's bound on the loss of negative-advantage tokens (Ye et al. 2020, c = 3, as verl).
DUAL_CLIP_C = 3.0


def register_is_level(name: str):
    """Decorator adding an importance-ratio function to :data:`IS_LEVELS`."""
    return register_into(IS_LEVELS, "register_is_level", name)


def register_policy_loss(name: str):
    """Decorator adding a per-token surrogate loss to :data:`POLICY_LOSSES`."""
    return register_into(POLICY_LOSSES, "register_policy_loss", name)


@register_is_level("token")
def token_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """rho_t = pi / pi_old per token (PPO, Schulman et al. 2017, eq. 7; GRPO; DAPO)."""
    return torch.exp(log_ratio.clamp(max=20.0))


def _sequence_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` exp of each sequence's mean token log-ratio (GSPO, Zheng et al. 2025, eq. 7)."""
    seq_log_ratio = log_ratio.sum(-1) / mask.sum(-1).clamp(min=1.0)
    return torch.exp(seq_log_ratio.clamp(max=20.0))[:, None]


@register_is_level("sequence")
def sequence_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """s = exp(mean_t(logp - old_logp)), the length-normalised sequence likelihood ratio of GSPO
    (Zheng et al. 2025, eq. 7), broadcast over the sequence's tokens."""
    return _sequence_ratio(log_ratio, mask).expand_as(logp)


@register_is_level("sequence-token")
def sequence_token_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """GSPO-token (Zheng et al. 2025, eq. 13): s_t = sg[s] * pi_t / sg[pi_t], equal to ``s`` in
    value but with per-token gradients, so token-level advantages can be used."""
    return _sequence_ratio(log_ratio, mask).detach() * torch.exp(logp - logp.detach())


@register_policy_loss("ppo_clip")
def ppo_clip_loss(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)) (PPO, Schulman et al. 2017, eq. 7;
    Clip-Higher when ``clip_high > clip_low``, DAPO, Yu et al. 2025, eq. 10)."""
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(-advantages * ratio, -advantages * clipped)


@register_policy_loss("dual_clip")
def dual_clip_loss(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5): the clipped
    surrogate, and for A < 0 at most -A * c (c = :data:`DUAL_CLIP_C`), so that a token whose
    ratio has grown far beyond 1 cannot drive an unbounded update."""
    loss = ppo_clip_loss(ratio, advantages, clip_low, clip_high)
    return torch.where(advantages < 0, torch.minimum(loss, -advantages * DUAL_CLIP_C), loss)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float, clip_high: float, level: str = "token", agg_mode: str = "token-mean",
                max_len: int | None = None, num_tokens=None, num_seqs=None, loss_fn: str = "ppo_clip",
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective, negated to a loss.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (with grad).
        old_logp: ``[B, T]`` log-probs under the policy that generated them.
        advantages: ``[B]`` (one per sequence, broadcast over tokens) or ``[B, T]``.
        mask: ``[B, T]`` 1 on response tokens that carry loss.
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``
            (Clip-Higher when ``clip_high > clip_low``, DAPO, Yu et al. 2025, eq. 10).
        level: a name in :data:`IS_LEVELS`: ``token`` (rho_t = pi/pi_old per token),
            ``sequence`` (GSPO's one length-normalised ratio per sequence) or ``sequence-token``
            (GSPO-token).
        agg_mode, max_len, num_tokens, num_seqs: passed to :func:`aggregate_loss`.
        loss_fn: a name in :data:`POLICY_LOSSES` (``ppo_clip``, ``dual_clip``).
        weights: optional ``[B, T]`` per-token factors without gradient (rollout-correction
            importance weights, :func:`~lit_align.losses.rollout_correction`) multiplied into the
            per-token loss before aggregation.
    Returns:
        ``(loss, metrics)``: the scalar loss and detached metrics: ``clip_frac_low`` (share of
        tokens where the lower clip is active, A < 0 and rho < 1 - clip_low), ``clip_frac_high``
        (A > 0 and rho > 1 + clip_high), ``ratio_mean``/``ratio_min``/``ratio_max`` and
        ``approx_kl`` (mean of k3 between old and new policy) over valid tokens.

    Per token (``ppo_clip``): L_t = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high)).
    """
    ratio_fn = lookup(IS_LEVELS, "policy_loss: level", level)
    surrogate = lookup(POLICY_LOSSES, "policy_loss: loss_fn", loss_fn)
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"policy_loss: clip_low ({clip_low}) and clip_high ({clip_high}) must be >= 0")
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    advantages = advantages.to(logp.dtype)
    log_ratio = (logp - old_logp) * mask
    ratio = ratio_fn(log_ratio, mask, logp)
    loss_mat = surrogate(ratio, advantages, clip_low, clip_high)
    if weights is not None:
        loss_mat = loss_mat * weights.detach().to(loss_mat.dtype)
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

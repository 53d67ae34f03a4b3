"""Importance weights for the gap between the sampler and the training forward (rollout correction).

A rollout engine samples with its own numerics (another kernel, another precision, vLLM), so the
behaviour policy mu that produced the tokens is not exactly the training forward's pi_old. The
weights below re-weight the policy-gradient loss by pi_old / mu per token or per sequence,
truncated (TIS: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training") or masked above a threshold (MIS, as verl's rollout-correction modes).
"""

from __future__ import annotations

import math

import torch

CORRECTION_LEVELS = ("token", "sequence", "geometric")
CORRECTION_MODES = ("truncate", "mask")


def mismatch_metrics(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the sampler's log-probs are from the training forward's, over masked tokens:
    ``kl`` (k3 estimate of KL(sampler || training forward), samples being the sampler's),
    ``ratio_mean`` and ``ratio_max`` of ``exp(logp - sampler_logp)``; all ``[B, T]`` in, detached
    scalars out."""
    with torch.no_grad():
        m = mask.to(torch.float32)
        log_ratio = ((logp.float() - sampler_logp.float()) * m).clamp(min=-20.0, max=20.0)
        n = m.sum().clamp(min=1.0)
        ratio = torch.exp(log_ratio)
        valid = m > 0
        return {"kl": ((ratio - 1.0 - log_ratio) * m).sum() / n, "ratio_mean": (ratio * m).sum() / n,
                "ratio_max": ratio[valid].max() if valid.any() else ratio.new_tensor(1.0)}


def rollout_correction(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, level: str = "token",
                       mode: str = "truncate", threshold: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token importance weights ``[B, T]`` (no gradient) from ``ratio = exp(logp - sampler_logp)``.

    Args:
        logp: ``[B, T]`` the training forward's log-probs of the sampled tokens at rollout time.
        sampler_logp: ``[B, T]`` the sampler's own log-probs of the same tokens.
        mask: ``[B, T]`` 1 on sampled tokens.
        level: ``token``: w_t = ratio_t; ``sequence``: w = prod_t ratio_t over the sequence's
            masked tokens; ``geometric``: w = exp(mean_t log ratio_t); the sequence levels
            broadcast w over the sequence's tokens.
        mode: ``truncate``: min(w, threshold) (TIS); ``mask``: 1 if w <= threshold, else 0 (MIS).
        threshold: > 0, finite.
    Returns:
        ``(weights, metrics)``: weights ``[B, T]`` float32, 0 off the mask; metrics (detached,
        over masked tokens): ``kl`` (k3 estimate of KL(sampler || training forward)),
        ``ratio_mean``, ``ratio_max`` (token ratios) and ``masked_frac`` (share of tokens whose
        weight the threshold changed: truncated or masked).

    Sums of log-ratios are compared with log(threshold) in log space, so a long sequence's
    product cannot overflow.
    """
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"rollout_correction: level {level!r} is not one of {CORRECTION_LEVELS}")
    if mode not in CORRECTION_MODES:
        raise ValueError(f"rollout_correction: mode {mode!r} is not one of {CORRECTION_MODES}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"rollout_correction: threshold must be a finite number > 0, got {threshold!r}")
    with torch.no_grad():
        m = mask.to(torch.float32)
        log_ratio = (logp.float() - sampler_logp.float()) * m
        if level == "token":
            log_w = log_ratio
        else:
            total = log_ratio.sum(-1, keepdim=True)
            if level == "geometric":
                total = total / m.sum(-1, keepdim=True).clamp(min=1.0)
            log_w = total.expand_as(log_ratio)
        log_t = math.log(threshold)
        over = (log_w > log_t) & (m > 0)
        if mode == "truncate":
            weights = torch.exp(log_w.clamp(max=log_t))
        else:
            weights = (~over).to(torch.float32)
        weights = weights * m
        metrics = mismatch_metrics(logp, sampler_logp, mask)
        metrics["masked_frac"] = over.to(torch.float32).sum() / m.sum().clamp(min=1.0)
    return weights, metrics

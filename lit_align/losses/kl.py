"""Per-token estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence", 2020)."""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) at tokens sampled from pi.

    Args:
        logp: ``[B, T]`` log pi(y_t | ...) of the sampled tokens.
        ref_logp: ``[B, T]`` log ref(y_t | ...) of the same tokens.
        estimator: ``k1`` = log r' with r' = pi/ref, i.e. ``logp - ref_logp`` (unbiased, can be
            negative); ``k2`` = 1/2 (logp - ref_logp)^2 (biased, low variance); ``k3`` =
            exp(ref_logp - logp) - (ref_logp - logp) - 1 (unbiased, always >= 0; used by GRPO,
            Shao et al. 2024, eq. 4).
    Returns:
        ``[B, T]``; the caller masks and aggregates.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: estimator {estimator!r} is not one of {KL_ESTIMATORS}")
    delta = logp - ref_logp
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta.square()
    # log(ref/pi) clamped so that exp cannot overflow on a wildly off-policy token
    log_ratio = (-delta).clamp(min=-20.0, max=20.0)
    return torch.exp(log_ratio) - log_ratio - 1.0

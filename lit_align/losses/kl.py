"""Per-token estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence", 2020),
in the registry :data:`KL_ESTIMATORS`.

Every estimator is evaluated at tokens sampled from pi. As a *value* (a KL penalty in the reward,
a logged metric) k1 and k3 are unbiased for KL(pi || ref) and k2 is biased but low-variance. As a
*loss* differentiated through ``logp`` (GRPO's KL term) they do not all minimise the same thing
(Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL"):

- k1: E_pi[grad log pi] = 0, so the expected gradient is zero: k1 belongs in the reward only.
- k2: E_pi[(log pi - log ref) grad log pi] = grad KL(pi || ref): the reverse KL's gradient.
- k3: E_pi[(1 - ref / pi) grad log pi] = grad KL(ref || pi): the forward KL's gradient, whatever
  its value estimates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_align.registry import lookup, register_into

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Estimator name -> ``fn(logp [B, T], ref_logp [B, T]) -> [B, T]``.
KL_ESTIMATORS: dict[str, KLEstimator] = {}

#: The largest k3 value kept (as verl clamps its low-variance KL): one far off-policy token cannot
#: dominate a batch's penalty or its gradient.
K3_MAX = 10.0


def register_kl_estimator(name: str) -> Callable[[KLEstimator], KLEstimator]:
    """Decorator adding ``fn(logp, ref_logp) -> per-token estimate`` to :data:`KL_ESTIMATORS`."""
    return register_into(KL_ESTIMATORS, "register_kl_estimator", name)


@register_kl_estimator("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log(pi / ref) = ``logp - ref_logp``: unbiased, can be negative."""
    return logp - ref_logp


@register_kl_estimator("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 1/2 (log(pi / ref))^2: biased, low variance, always >= 0."""
    return 0.5 * (logp - ref_logp).square()


@register_kl_estimator("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = ref/pi - log(ref/pi) - 1: unbiased, always >= 0 (GRPO, Shao et al. 2024, eq. 4).

    log(ref/pi) is clamped to [-20, 20] so that exp cannot overflow, and the value to at most
    :data:`K3_MAX` (where the clamp is active the gradient is 0)."""
    log_ratio = (ref_logp - logp).clamp(min=-20.0, max=20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(max=K3_MAX)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) at tokens sampled from pi.

    Args:
        logp: ``[B, T]`` log pi(y_t | ...) of the sampled tokens.
        ref_logp: ``[B, T]`` log ref(y_t | ...) of the same tokens.
        estimator: a name in :data:`KL_ESTIMATORS`: ``k1``, ``k2`` or ``k3`` (see the module
            docstring for what each minimises when used as a loss).
    Returns:
        ``[B, T]``; the caller masks and aggregates.
    """
    return lookup(KL_ESTIMATORS, "kl_penalty: estimator", estimator)(logp, ref_logp)


def adaptive_kl_coef(beta: float, kl: float, n: int, target: float, horizon: int) -> float:
    """The adaptive KL controller's next coefficient (Ziegler et al. 2019, sec. 2.2):
    ``beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)``.

    Args:
        beta: the current coefficient.
        kl: the rollout's mean summed KL per sequence.
        n: the rollout's sequences (over all ranks).
        target: the KL the controller steers towards (> 0).
        horizon: the number of sequences over which an error is corrected (>= 1).
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)

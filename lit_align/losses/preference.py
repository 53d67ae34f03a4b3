"""Pairwise preference losses: the DPO family and the Bradley-Terry reward-model loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lit_align.registry import lookup, register_into

#: Loss name -> ``fn(h [B], beta, label_smoothing) -> losses [B]`` with h the difference of the
#: chosen and rejected log-ratios. Each carries ``label_smoothing`` (whether it takes a flip rate)
#: and ``length_normalized`` (whether its log-probs are means over tokens rather than sums: the
#: caller passes those).
PREFERENCE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {}
DPO_LOSS_TYPES = PREFERENCE_LOSSES


def register_preference_loss(name: str, *, label_smoothing: bool = False, length_normalized: bool = False):
    """Decorator adding a pairwise loss ``fn(h, beta, eps)`` to :data:`PREFERENCE_LOSSES`.

    Args:
        label_smoothing: the loss takes a label-flip rate ``eps`` (others must get 0).
        length_normalized: the loss is defined on per-token mean log-probs (IPO): the caller
            divides each sequence's summed log-prob by its token count before :func:`dpo_loss`.
    """
    register = register_into(PREFERENCE_LOSSES, "register_preference_loss", name)

    def decorator(fn):
        fn.label_smoothing, fn.length_normalized = label_smoothing, length_normalized
        return register(fn)

    return decorator


@register_preference_loss("sigmoid", label_smoothing=True)
def sigmoid_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigma(beta h) - eps log sigma(-beta h) (DPO, Rafailov et al. 2023, eq. 7;
    eps > 0 is conservative DPO, Mitchell 2023)."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


@register_preference_loss("ipo", length_normalized=True)
def ipo_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """(h - 1 / (2 beta))^2 (IPO, Azar et al. 2023, eq. 17), on length-normalised log-ratios as the
    IPO authors and TRL compute them, so that beta (tau) transfers from the paper."""
    return (h - 1.0 / (2.0 * beta)).square()


@register_preference_loss("ipo_sum")
def ipo_sum_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """IPO's squared loss on summed (not length-normalised) log-ratios: long responses move h
    further, so beta must shrink with the response length."""
    return (h - 1.0 / (2.0 * beta)).square()


@register_preference_loss("hinge")
def hinge_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """relu(1 - beta h): the reference-normalised hinge of RSO (Liu et al. 2024, "Statistical
    Rejection Sampling Improves Preference Optimization", eq. 9), not SLiC-HF's hinge on the
    policy's own log-probs."""
    return torch.relu(1.0 - beta * h)


@register_preference_loss("robust", label_smoothing=True)
def robust_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """[-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps) (robust DPO,
    Chowdhury et al. 2024, eq. 8; unbiased under label flips at rate eps < 0.5)."""
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation losses on sequence log-probs.

    Args:
        policy_chosen, policy_rejected: ``[B]`` response log-probs under the policy: sums over
            tokens, or means for a ``length_normalized`` loss type (``ipo``); the values are
            used as given.
        ref_chosen, ref_rejected: ``[B]`` the same under the reference model.
        beta: the KL-regularisation strength (the IPO tau for ``ipo``).
        loss_type: a name in :data:`PREFERENCE_LOSSES` (``sigmoid``, ``ipo``, ``ipo_sum``,
            ``hinge``, ``robust``), applied to h = (policy_chosen - ref_chosen) -
            (policy_rejected - ref_rejected).
        label_smoothing: eps, the assumed rate of flipped preference labels (``sigmoid``, ``robust``).
    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` with the implicit rewards
        beta * (policy - ref), detached.
    """
    fn = lookup(PREFERENCE_LOSSES, "dpo_loss: loss_type", loss_type)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and not fn.label_smoothing:
        raise ValueError(f"dpo_loss: label_smoothing applies to "
                         f"{', '.join(k for k, v in PREFERENCE_LOSSES.items() if v.label_smoothing)}, "
                         f"not {loss_type!r}")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = fn(h, beta, label_smoothing)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Reward-model loss under the Bradley-Terry preference model (Ouyang et al. 2022, eq. 1).

    Args:
        chosen, rejected: ``[B]`` scalar rewards of the preferred and the other response.
        margin: optional ``[B]`` required gap (Llama 2, Touvron et al. 2023, eq. 2).
        center_coef: weight of mean((r_c + r_r)^2), which keeps rewards centred on 0
            (Eisenstein et al. 2023).
    Returns:
        Scalar: mean(-log sigma(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2).
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * (chosen + rejected).square().mean()
    return loss

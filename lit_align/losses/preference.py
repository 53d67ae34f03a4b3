"""Pairwise preference losses: the DPO family and the Bradley-Terry reward-model loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation losses on sequence log-probs.

    Args:
        policy_chosen, policy_rejected: ``[B]`` summed response log-probs under the policy.
        ref_chosen, ref_rejected: ``[B]`` the same under the reference model.
        beta: the KL-regularisation strength (the IPO tau for ``ipo``).
        loss_type, with h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):
            ``sigmoid``: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h) (DPO, Rafailov et al.
            2023, eq. 7; eps > 0 is conservative DPO, Mitchell 2023);
            ``ipo``: (h - 1 / (2 beta))^2 (IPO, Azar et al. 2023, eq. 17);
            ``hinge``: relu(1 - beta h) (SLiC, Zhao et al. 2023);
            ``robust``: [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)
            (robust DPO, Chowdhury et al. 2024, eq. 8; needs eps < 0.5).
        label_smoothing: eps, the assumed rate of flipped preference labels.
    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` with the implicit rewards
        beta * (policy - ref), detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} is not one of {DPO_LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"dpo_loss: label_smoothing applies to sigmoid and robust, not {loss_type!r}")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)).square()
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
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

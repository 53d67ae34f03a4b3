"""Optimizer and learning-rate schedule settings shared by every algorithm."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimSpec:
    """AdamW with linear warm-up then a decay to ``min_lr_ratio`` x ``lr``.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay, not applied to biases and norm weights (1-D parameters).
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: optimizer steps of linear warm-up from 0.
        schedule: ``cosine``, ``linear`` or ``constant`` after warm-up.
        min_lr_ratio: the final learning rate as a fraction of ``lr``.
        total_steps: optimizer steps the schedule spans; ``None`` takes the trainer's estimate
            (``max_steps``, or epochs x batches / accumulation).
        grad_clip: clip the global gradient norm to this value (``None``: no clipping). Used by
            manually optimised modules; automatic ones use the trainer's ``gradient_clip_val``.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    total_steps: int | None = None
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("optim: need lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        self.betas = tuple(self.betas)


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(spec: OptimSpec, params, total_steps: int) -> dict:
    """Lightning's ``configure_optimizers`` dict: AdamW plus a per-step LambdaLR."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("optim: the model has no trainable parameters (check the freeze settings)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, betas=spec.betas, eps=spec.eps)
    total = spec.total_steps or total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, spec.warmup_steps, total, spec.schedule, spec.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

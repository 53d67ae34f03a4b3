"""Optimizer and learning-rate schedule settings shared by every algorithm."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "linear", "constant")
#: AdamW implementations: one fused kernel per step, one multi-tensor launch per group, or a
#: Python loop over the parameters (torch's default for CPU tensors, several times slower there)
IMPLS = ("auto", "fused", "foreach", "for-loop")
FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


@dataclass
class OptimSpec:
    """AdamW with linear warm-up then a decay to ``min_lr_ratio`` x ``lr``.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay, not applied to biases and norm weights (1-D parameters).
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: optimizer steps of linear warm-up from 0; ``None`` (the default): a
            ``warmup_ratio`` share of the schedule's steps.
        warmup_ratio: the warm-up's share of the schedule when ``warmup_steps`` is ``None``.
        schedule: ``cosine``, ``linear`` or ``constant`` after warm-up.
        min_lr_ratio: the final learning rate as a fraction of ``lr``.
        total_steps: optimizer steps the schedule spans; ``None`` takes the trainer's estimate
            (``max_steps``, or epochs x batches / accumulation).
        grad_clip: clip the global gradient norm to this value (``None``: no clipping), in every
            module; the trainer's ``gradient_clip_val`` may only repeat it.
        impl: the AdamW kernel: ``fused`` (one kernel for all parameters), ``foreach``
            (multi-tensor), ``for-loop`` (one parameter at a time), or ``auto`` (the default):
            ``fused`` where the parameters' device has the kernel, as TRL's default
            ``adamw_torch_fused``, else ``foreach``. The update is the same formula in each.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    total_steps: int | None = None
    grad_clip: float | None = 1.0
    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule: {self.schedule!r} is not one of {SCHEDULES}")
        numbers = {"lr": self.lr, "weight_decay": self.weight_decay, "eps": self.eps, "warmup_ratio": self.warmup_ratio,
                   "min_lr_ratio": self.min_lr_ratio, "grad_clip": self.grad_clip, "betas": list(self.betas)}
        # NaN passes every comparison below and inf most of them: refuse both by name first
        bad = [f"{k}={v} must be a finite number" for k, v in numbers.items()
               if v is not None and not all(math.isfinite(x) for x in (v if isinstance(v, list) else [v]))]
        if bad:
            raise ValueError("optim: " + "; ".join(bad))
        problems = [f"lr={self.lr} must be > 0"] if self.lr <= 0 else []
        if self.impl not in IMPLS:
            problems.append(f"impl={self.impl!r} is not one of {IMPLS}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.weight_decay < 0 or self.eps <= 0:
            problems.append(f"weight_decay={self.weight_decay} must be >= 0 and eps={self.eps} > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.total_steps is not None and self.total_steps < 1:
            problems.append(f"total_steps={self.total_steps} must be >= 1")
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append(f"grad_clip={self.grad_clip} must be > 0 (null: no clipping)")
        if problems:
            raise ValueError("optim: " + "; ".join(problems))
        self.betas = tuple(self.betas)

    def warmup(self, total_steps: int) -> int:
        """Warm-up steps of a schedule spanning ``total_steps``."""
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total_steps)


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def adamw_kernel(impl: str, params: list[torch.Tensor]) -> dict:
    """``torch.optim.AdamW`` keyword arguments selecting ``impl`` (see :class:`OptimSpec`)."""
    if impl == "auto":
        fusable = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
        impl = "fused" if fusable else "foreach"
    if impl == "fused":
        bad = sorted({f"{p.device.type}/{p.dtype}" for p in params
                      if p.device.type not in FUSED_DEVICES or not p.is_floating_point()})
        if bad:
            raise ValueError(f"optim.impl: 'fused' has no kernel for parameters on {', '.join(bad)}; use 'foreach'")
        return {"fused": True, "foreach": False}
    return {"fused": False, "foreach": impl == "foreach"}


def build_optimizer(spec: OptimSpec, params, total_steps: int) -> dict:
    """Lightning's ``configure_optimizers`` dict: AdamW plus a per-step LambdaLR."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("optim: the model has no trainable parameters (check the freeze settings)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                  **adamw_kernel(spec.impl, params))
    total = spec.total_steps or total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, spec.warmup(total), total, spec.schedule, spec.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

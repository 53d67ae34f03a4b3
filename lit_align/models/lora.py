"""Low-rank adapters through peft (Hu et al. 2021, "LoRA")."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


@dataclass
class LoraSpec:
    """LoRA adapters on the policy; the base weights stay frozen.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is ``alpha / r * B A``).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``all-linear``.
        modules_to_save: extra modules trained in full (e.g. a value head).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: need r >= 1, alpha > 0 and 0 <= dropout < 1, got r={self.r}, "
                             f"alpha={self.alpha}, dropout={self.dropout}")


def apply_lora(model: torch.nn.Module, spec: LoraSpec, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap ``model`` with trainable adapters (a ``peft.PeftModel``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
                        modules_to_save=spec.modules_to_save or None, task_type=task_type)
    return get_peft_model(model, config)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain HF model with the adapters folded into the weights (the module keeps its adapters)."""
    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model

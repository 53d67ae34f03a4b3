"""Low-rank adapters through peft (Hu et al. 2021, "LoRA")."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch

#: What the HF export of a LoRA run holds: the base with the adapters folded in (loads as a plain
#: model) or the adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``, peft format).
EXPORTS = ("merged", "adapter")


@dataclass
class LoraSpec:
    """LoRA adapters on the policy; the base weights stay frozen.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is ``alpha / r * B A``).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``all-linear``.
        modules_to_save: extra modules trained in full (e.g. a value head).
        export: what the HF export holds, one of :data:`EXPORTS`: ``merged`` (``W + alpha / r * B A``
            folded into the base weights, a plain HF model) or ``adapter`` (the adapter weights and
            config only, loaded on top of the base with ``peft.PeftModel.from_pretrained``).
        seed: seed of the adapters' random initialisation (peft's Kaiming-uniform ``A``; ``B`` is 0),
            drawn from its own generator: every rank builds the same adapters (FSDP2 keeps each
            rank's own shard of its initialisation, nothing is broadcast) and a run repeats
            whatever the global random state.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)
    export: str = "merged"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: need r >= 1, alpha > 0 and 0 <= dropout < 1, got r={self.r}, "
                             f"alpha={self.alpha}, dropout={self.dropout}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"lora.seed: expected an integer >= 0, got {self.seed!r}")
        if self.export not in EXPORTS:
            raise ValueError(f"lora.export: {self.export!r} is not one of {EXPORTS}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules: an empty list adapts nothing; name modules or give 'all-linear'")


#: Module types peft's LoRA can wrap (by class name: transformers' GPT-2 style Conv1D included).
_ADAPTABLE = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")


def check_targets(spec: LoraSpec, model: torch.nn.Module, source: str = "lora.target_modules") -> None:
    """Raise ``ValueError`` when a target of ``spec`` names no module of ``model`` that LoRA can
    wrap, matched as peft matches them (a list entry matches a module whose name is it or ends
    in ``.<entry>``; a string is a regular expression over the whole name), listing the names
    the model has. ``model`` may be a skeleton on the meta device: no weights are needed."""
    targets = spec.target_modules
    if targets == "all-linear":
        return
    names = {name: type(module).__name__ for name, module in model.named_modules() if name}
    leaves = sorted({name.rsplit(".", 1)[-1] for name, kind in names.items() if kind in _ADAPTABLE})
    if isinstance(targets, str):
        matched = [n for n in names if re.fullmatch(targets, n)]
        if not any(names[n] in _ADAPTABLE for n in matched):
            raise ValueError(f"{source}: the pattern {targets!r} matches no linear or embedding module of "
                             f"{type(model).__name__} (its adaptable modules: {leaves})")
        return
    for target in targets:
        matched = [n for n in names if n == target or n.endswith("." + target)]
        if not matched:
            raise ValueError(f"{source}: {target!r} is not a module of {type(model).__name__} (its adaptable "
                             f"modules: {leaves})")
        if not any(names[n] in _ADAPTABLE for n in matched):
            raise ValueError(f"{source}: {target!r} is a {names[matched[0]]}, which LoRA cannot wrap (its adaptable "
                             f"modules: {leaves})")


def apply_lora(model: torch.nn.Module, spec: LoraSpec, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap ``model`` with trainable adapters (a ``peft.PeftModel``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
                        modules_to_save=spec.modules_to_save or None, task_type=task_type)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed)
        return get_peft_model(model, config)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def find_peft(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """The ``peft.PeftModel`` in ``model`` (itself, or e.g. a LLaVA model's language model), or ``None``."""
    if model is None:
        return None
    return next((m for m in model.modules() if is_peft(m)), None)


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain HF model with the adapters folded into the weights (the module keeps its adapters)."""
    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model

"""Trainer settings that cannot run on this machine, refused when the config is parsed: before any
module is built (a LLaVA tower loads its weights at construction) and with a message that names
the setting, instead of Lightning's later and vaguer accelerator errors."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

#: Strategies Lightning runs on CUDA devices only (FSDP1's FSDPStrategy, DeepSpeed), by the
#: registered names and the class names a config may give.
GPU_STRATEGIES = {"fsdp": "FSDPStrategy", "deepspeed": "DeepSpeedStrategy"}
#: Precisions refused on CPU (float16 autocast with its gradient scaler: Lightning refuses it there).
GPU_PRECISIONS = ("16-mixed", "16", 16)


def _strategy_name(strategy: Any) -> str | None:
    """``"fsdp"``, ``"deepspeed"`` or ``None`` for the trainer's ``strategy`` setting (a registered
    name such as ``deepspeed_stage_3``, a ``class_path`` mapping, or an instance)."""
    if strategy is None:
        return None
    if isinstance(strategy, str):
        name = strategy.lower()
    else:
        path = strategy.get("class_path") if hasattr(strategy, "get") else type(strategy).__name__
        name = str(path or "").rsplit(".", 1)[-1]
        for key, cls in GPU_STRATEGIES.items():
            if name == cls:
                return key
        return None
    if name.startswith("deepspeed"):
        return "deepspeed"
    if name.startswith("fsdp") and not name.startswith("fsdp2"):
        return "fsdp"
    return None


def check_trainer(trainer: Any, source: str = "trainer") -> None:
    """Raise ``ValueError`` when the ``trainer`` settings (a mapping: ``strategy``, ``accelerator``,
    ``precision``) need what this machine lacks: DeepSpeed not installed, or FSDP1, DeepSpeed or
    float16 mixed precision without CUDA. ``source`` names the settings in the message."""
    get = trainer.get if hasattr(trainer, "get") else lambda k, d=None: getattr(trainer, k, d)
    accelerator = str(get("accelerator", "auto") or "auto").lower()
    cuda = torch.cuda.is_available() and accelerator not in ("cpu", "mps", "tpu")
    strategy = _strategy_name(get("strategy", None))
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"{source}.strategy: DeepSpeedStrategy needs the `deepspeed` package, which is not "
                         "installed: pip install 'lit_align[deepspeed]' (on a machine with CUDA)")
    if strategy is not None and not cuda:
        raise ValueError(f"{source}.strategy: {GPU_STRATEGIES[strategy]} ({strategy}) runs on CUDA GPUs only "
                         f"(accelerator {accelerator!r}, CUDA available: {torch.cuda.is_available()}); on CPU use "
                         "configs/strategy/fsdp2.yaml (FSDP2, ModelParallelStrategy) or configs/strategy/ddp.yaml")
    precision = get("precision", None)
    if precision in GPU_PRECISIONS and not cuda:
        raise ValueError(f"{source}.precision: {precision!r} (float16) runs on CUDA GPUs only (accelerator "
                         f"{accelerator!r}, CUDA available: {torch.cuda.is_available()}); on CPU use "
                         "configs/precision/bf16-mixed.yaml or bf16-true.yaml")

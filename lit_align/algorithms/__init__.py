"""LightningModules, one per post-training method."""

from lit_align.algorithms.optim import OptimSpec
from lit_align.algorithms.sft import SFT

__all__ = ["OptimSpec", "SFT"]

"""LightningModules, one per post-training method."""

from lit_align.algorithms.dpo import DPO
from lit_align.algorithms.optim import OptimSpec
from lit_align.algorithms.reward_model import RewardModel
from lit_align.algorithms.sft import SFT

__all__ = ["DPO", "OptimSpec", "RewardModel", "SFT"]

"""LightningModules, one per post-training method."""

from lit_align.algorithms.dpo import DPO
from lit_align.algorithms.llava import LLaVA, LLaVADPO
from lit_align.algorithms.optim import OptimSpec
from lit_align.algorithms.policy_gradient import PolicyGradient
from lit_align.algorithms.ppo import PPO, AdaptiveKL
from lit_align.algorithms.presets import DAPO, GRPO, GSPO
from lit_align.algorithms.reward_model import RewardModel
from lit_align.algorithms.sft import SFT

__all__ = ["LLaVA", "LLaVADPO", "AdaptiveKL", "PPO", "DAPO", "DPO", "GRPO", "GSPO", "OptimSpec", "PolicyGradient",
           "RewardModel", "SFT"]

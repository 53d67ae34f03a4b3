"""Reward functions for online RL (PPO, GRPO, GSPO, DAPO): rule-based rewards, reward-model
scoring and user functions given by import path, combined by :class:`Rewards` into one
weighted total per completion.

Example::

    rewards = Rewards([RewardSpec("arith_match"), RewardSpec("overlong", weight=1.0, args={"cache_len": 4})])
    rewards.setup(device)
    total, raw = rewards(prompts, completions, meta, completion_lengths=lengths, truncated=truncated,
                         max_new_tokens=16)
"""

from lit_align.rewards import builtin as _builtin  # noqa: F401  (registers task_check, arith_match, chain_match, format, overlong)
from lit_align.rewards.base import REWARDS, RewardError, Rewards, RewardSpec, register_reward
from lit_align.rewards.reward_model import RewardModelReward

__all__ = ["REWARDS", "RewardError", "RewardSpec", "Rewards", "register_reward", "RewardModelReward"]

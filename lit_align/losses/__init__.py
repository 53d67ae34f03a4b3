"""Pure torch math: no Lightning, no transformers, no I/O (DESIGN.md, public contracts)."""

from lit_align.losses.advantages import ADVANTAGE_SCALES, gae, group_advantages, masked_whiten
from lit_align.losses.aggregation import AGG_MODES, aggregate_loss
from lit_align.losses.kl import KL_ESTIMATORS, kl_penalty
from lit_align.losses.logprobs import token_entropy, token_logprobs
from lit_align.losses.policy import IS_LEVELS, policy_loss, value_loss
from lit_align.losses.preference import DPO_LOSS_TYPES, bradley_terry_loss, dpo_loss
from lit_align.losses.shaping import kl_shaped_rewards, overlong_penalty

__all__ = [
    "ADVANTAGE_SCALES", "AGG_MODES", "DPO_LOSS_TYPES", "IS_LEVELS", "KL_ESTIMATORS",
    "aggregate_loss", "bradley_terry_loss", "dpo_loss", "gae", "group_advantages", "kl_penalty",
    "kl_shaped_rewards", "masked_whiten", "overlong_penalty", "policy_loss", "token_entropy", "token_logprobs", "value_loss",
]

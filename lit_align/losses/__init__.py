"""Pure torch math: no Lightning, no transformers, no I/O (DESIGN.md, public contracts).

Each family of formulas is a registry of named pure functions (``lit_align.registry.register_into``),
looked up by the modules' settings: :data:`ADVANTAGE_ESTIMATORS`, :data:`POLICY_LOSSES`,
:data:`IS_LEVELS` (importance-sampling levels), :data:`AGG_MODES` (loss aggregation),
:data:`PREFERENCE_LOSSES` (the DPO family) and :data:`KL_ESTIMATORS`. A new method is one
registered function and its test."""

from lit_align.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALES,
    gae,
    group_advantages,
    masked_whiten,
    register_advantage_estimator,
)
from lit_align.losses.aggregation import AGG_MODES, aggregate_loss, register_agg_mode
from lit_align.losses.correction import CORRECTION_LEVELS, CORRECTION_MODES, mismatch_metrics, rollout_correction
from lit_align.losses.kl import KL_ESTIMATORS, adaptive_kl_coef, kl_penalty, register_kl_estimator
from lit_align.losses.logprobs import token_entropy, token_logprobs
from lit_align.losses.policy import IS_LEVELS, POLICY_LOSSES, policy_loss, register_is_level, register_policy_loss
from lit_align.losses.preference import (
    DPO_LOSS_TYPES,
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    register_preference_loss,
)
from lit_align.losses.shaping import kl_shaped_rewards, overlong_penalty
from lit_align.losses.value import explained_variance, value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS", "ADVANTAGE_SCALES", "AGG_MODES", "CORRECTION_LEVELS", "CORRECTION_MODES", "DPO_LOSS_TYPES",
    "IS_LEVELS", "KL_ESTIMATORS", "POLICY_LOSSES", "PREFERENCE_LOSSES",
    "adaptive_kl_coef", "aggregate_loss", "bradley_terry_loss", "dpo_loss", "explained_variance", "gae",
    "group_advantages", "kl_penalty", "kl_shaped_rewards", "masked_whiten", "mismatch_metrics", "overlong_penalty",
    "policy_loss",
    "register_advantage_estimator", "register_agg_mode", "register_is_level", "register_kl_estimator",
    "register_policy_loss", "register_preference_loss", "rollout_correction", "token_entropy", "token_logprobs",
    "value_loss",
]

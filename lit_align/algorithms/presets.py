"""GRPO, GSPO and DAPO: :class:`PolicyGradient` with each paper's defaults (not copies of it)."""

from __future__ import annotations

from lit_align.algorithms.policy_gradient import preset

GRPO = preset(
    "GRPO",
    "GRPO (Shao et al. 2024, DeepSeekMath, eq. 3): token-level ratio clipped at 0.2, the loss a\n"
    "mean over sequences of token means, k3 KL to the reference in the loss with beta 0.04 (k3 is the\n"
    "estimator a KL term gets unless ``kl_estimator`` names another; with beta 0 there is none).",
    importance_sampling_level="token", loss_agg_mode="seq-mean-token-mean", beta=0.04,
    clip_low=0.2, clip_high=0.2,
)

GSPO = preset(
    "GSPO",
    "GSPO (Zheng et al. 2025, eq. 5-7): one length-normalised importance ratio per sequence,\n"
    "clipped to [1 - 3e-4, 1 + 4e-4], no KL term; stable on mixture-of-experts models.",
    importance_sampling_level="sequence", loss_agg_mode="seq-mean-token-mean", beta=0.0,
    clip_low=3e-4, clip_high=4e-4,
)

DAPO = preset(
    "DAPO",
    "DAPO (Yu et al. 2025): Clip-Higher (0.2 / 0.28), token-level loss, no KL, dynamic sampling,\n"
    "overlong filtering and soft overlong punishment over the last fifth of max_new_tokens (the paper's\n"
    "4,096 of 20,480 tokens; ``overlong_buffer: null`` resolves to max_new_tokens // 5).",
    importance_sampling_level="token", loss_agg_mode="token-mean", beta=0.0, clip_low=0.2, clip_high=0.28,
    dynamic_sampling=True, overlong_filtering=True, overlong_buffer=None,
)

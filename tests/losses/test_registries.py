"""The formula registries of lit_align.losses: lookups, new entries, and the entries added with them."""

import math

import pytest
import torch

from lit_align.losses import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    IS_LEVELS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    adaptive_kl_coef,
    aggregate_loss,
    dpo_loss,
    kl_penalty,
    policy_loss,
    register_advantage_estimator,
    register_kl_estimator,
)


def test_every_family_is_a_registry_of_callables():
    expected = {
        "advantage": (ADVANTAGE_ESTIMATORS, {"grpo", "dr_grpo", "rloo"}),
        "is_level": (IS_LEVELS, {"token", "sequence", "sequence-token"}),
        "policy": (POLICY_LOSSES, {"ppo_clip", "dual_clip"}),
        "agg": (AGG_MODES, {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"}),
        "preference": (PREFERENCE_LOSSES, {"sigmoid", "ipo", "ipo_sum", "hinge", "robust"}),
        "kl": (KL_ESTIMATORS, {"k1", "k2", "k3"}),
    }
    for family, (registry, names) in expected.items():
        assert names <= set(registry), family
        assert all(callable(fn) for fn in registry.values()), family


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match=r"estimator: 'k4' is not one of \('k1', 'k2', 'k3'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    with pytest.raises(ValueError, match="mode: 'mean' is not one of"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "mean")
    with pytest.raises(ValueError, match="loss_fn: 'clip' is not one of"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), 0.2, 0.2, loss_fn="clip")


def test_a_new_estimator_is_one_decorated_function():
    @register_kl_estimator("k1_abs_test")
    def k1_abs(logp, ref_logp):
        return (logp - ref_logp).abs()

    try:
        assert kl_penalty(torch.tensor([[-1.0]]), torch.tensor([[-3.0]]), "k1_abs_test").item() == 2.0
        # the same object again is allowed (re-imports); another one under the same name is not
        register_kl_estimator("k1_abs_test")(k1_abs)
        with pytest.raises(ValueError, match="already registered"):
            register_kl_estimator("k1_abs_test")(lambda a, b: a)
    finally:
        del KL_ESTIMATORS["k1_abs_test"]
    with pytest.raises(ValueError, match="without ':'"):
        register_advantage_estimator("pkg:fn")


def test_rloo_leaves_each_sample_out_of_its_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0])  # two groups of 3
    # r_i - mean of the other two
    expected = [1 - 0.0, 0 - 0.5, 0 - 0.5, 1 - 4.0, 3 - 3.0, 5 - 2.0]
    assert ADVANTAGE_ESTIMATORS["rloo"](rewards, 3).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="group_size >= 2"):
        ADVANTAGE_ESTIMATORS["rloo"](rewards, 1)


def test_grpo_and_dr_grpo_estimators_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert ADVANTAGE_ESTIMATORS["dr_grpo"](rewards, 2).tolist() == [0.5, -0.5, -0.5, 0.5]
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # the unbiased std of a group (1, 0) is sqrt(1/2)
    assert ADVANTAGE_ESTIMATORS["grpo"](rewards, 2).tolist() == pytest.approx([a, -a, -a, a])


def test_dual_clip_bounds_negative_advantage_tokens_only():
    # log-ratios: rho = e^2 (far above 1 + eps) and e^-2; advantages +-1
    logp = torch.tensor([[2.0, 2.0, -2.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[-1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    per_token = {}
    for name in ("ppo_clip", "dual_clip"):
        ratio = IS_LEVELS["token"](logp - old, mask, logp)
        per_token[name] = POLICY_LOSSES[name](ratio, adv, 0.2, 0.2)
    e2 = math.exp(2.0)
    # ppo_clip: A<0, rho=e^2: max(e^2, 1.2) = e^2; A>0: max(-e^2, -1.2) = -1.2; A<0, rho=e^-2: max(e^-2, 0.8) = 0.8
    assert per_token["ppo_clip"][0].tolist() == pytest.approx([e2, -1.2, 0.8])
    # dual clip caps the first at -A * 3 = 3 and leaves the others
    assert per_token["dual_clip"][0].tolist() == pytest.approx([3.0, -1.2, 0.8])
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2, loss_fn="dual_clip")
    assert loss.item() == pytest.approx((3.0 - 1.2 + 0.8) / 3)


def test_policy_loss_weights_multiply_the_per_token_loss():
    logp, old = torch.tensor([[0.1, -0.1]]), torch.zeros(1, 2)
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    plain, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2)
    weighted, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2, weights=torch.tensor([[2.0, 0.0]]))
    assert plain.item() == pytest.approx(-(math.exp(0.1) + math.exp(-0.1)) / 2)
    assert weighted.item() == pytest.approx(-(2 * math.exp(0.1)) / 2)


def test_ipo_is_marked_length_normalised_and_the_sum_form_is_its_own_name():
    assert PREFERENCE_LOSSES["ipo"].length_normalized and not PREFERENCE_LOSSES["ipo_sum"].length_normalized
    assert not PREFERENCE_LOSSES["sigmoid"].length_normalized
    args = (torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.5)
    # same formula on whatever log-probs the caller passes: (h - 1/(2 beta))^2 with h = 1
    assert dpo_loss(*args, "ipo")[0].item() == pytest.approx(0.0) == dpo_loss(*args, "ipo_sum")[0].item()
    assert {n for n, f in PREFERENCE_LOSSES.items() if f.label_smoothing} == {"sigmoid", "robust"}


def test_adaptive_kl_coef_by_hand():
    # kl 3 vs target 6: error clipped to -0.2; 64 sequences over a horizon of 100
    assert adaptive_kl_coef(0.1, 3.0, 64, 6.0, 100) == pytest.approx(0.1 * (1 - 0.2 * 0.64))
    assert adaptive_kl_coef(0.1, 6.6, 10, 6.0, 100) == pytest.approx(0.1 * (1 + 0.1 * 0.1))


def test_k3_value_is_clamped_at_ten():
    out = kl_penalty(torch.tensor([[0.0]]), torch.tensor([[15.0]]), "k3")  # e^15 - 15 - 1 without the clamp
    assert out.item() == 10.0

"""group_advantages, gae and masked_whiten against hand-computed values."""

import math

import pytest
import torch

from lit_align.losses import gae, group_advantages, masked_whiten

# ---------------------------------------------------------------- group_advantages


def test_group_of_four_unbiased_std():
    # mean 3, deviations [-2, -1, 0, 3], unbiased var = (4 + 1 + 0 + 9) / 3
    std = math.sqrt(14 / 3)
    out = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), group_size=4)
    assert out.tolist() == pytest.approx([d / (std + 1e-6) for d in (-2, -1, 0, 3)], rel=1e-6)


def test_two_groups_are_normalised_separately():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])
    std1, std2 = math.sqrt(14 / 3), math.sqrt(1 / 3)  # group 2: mean 0.5, deviations +-0.5
    expected = [d / (std1 + 1e-6) for d in (-2, -1, 0, 3)] + [d / (std2 + 1e-6) for d in (-0.5, -0.5, 0.5, 0.5)]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, rel=1e-6)


def test_scale_none_only_centres():
    out = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0]), 4, scale="none")
    assert out.tolist() == pytest.approx([-2, -1, 0, 3, -0.5, -0.5, 0.5, 0.5])


def test_custom_eps():
    out = group_advantages(torch.tensor([0.0, 2.0]), 2, eps=1.0)  # std sqrt(2), deviations -1, 1
    assert out.tolist() == pytest.approx([-1 / (math.sqrt(2) + 1), 1 / (math.sqrt(2) + 1)])


def test_zero_variance_group_gives_zero():
    out = group_advantages(torch.tensor([5.0, 5.0, 5.0, 5.0, 0.0, 1.0, 0.0, 1.0]), 4)
    assert out[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.isfinite(out).all()


def test_group_size_one_gives_zeros():
    out = group_advantages(torch.tensor([1.0, -3.0, 7.0]), 1)
    assert out.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("rewards,group_size,scale", [
    (torch.zeros(5), 4, "group"),      # not a whole number of groups
    (torch.zeros(2, 4), 4, "group"),   # not [B]
    (torch.zeros(4), 0, "group"),
    (torch.zeros(4), 4, "batch"),      # unknown scale
])
def test_bad_arguments_raise(rewards, group_size, scale):
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size, scale=scale)


# ---------------------------------------------------------------- gae

GAMMA, LAM = 0.9, 0.8  # gamma * lam = 0.72


def test_gae_right_padding_hand_values():
    # 3 valid tokens then one pad whose (junk) reward and value must not leak in
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, GAMMA, LAM)
    # t=2: delta = 1 + 0.9 * 0 - 0.7 = 0.3   (value after the last valid token is 0)
    # t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03;  A = 0.03 + 0.72 * 0.3 = 0.246
    # t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04;  A = 0.04 + 0.72 * 0.246 = 0.21712
    assert adv[0].tolist() == pytest.approx([0.21712, 0.246, 0.3, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.21712 + 0.5, 0.246 + 0.6, 0.3 + 0.7, 0.0], abs=1e-6)


def test_gae_left_prompt_and_both_sides_hand_values():
    rewards = torch.tensor([[7.0, 7.0, 0.5, -1.0],   # prompt on the left
                            [9.0, 0.0, 2.0, 9.0]])   # prompt on the left and a pad on the right
    values = torch.tensor([[3.0, 3.0, 0.2, 0.4],
                           [9.0, 1.0, 0.5, 9.0]])
    mask = torch.tensor([[0, 0, 1, 1],
                         [0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, GAMMA, LAM)
    # row 0: t=3: -1 - 0.4 = -1.4;  t=2: delta = 0.5 + 0.9 * 0.4 - 0.2 = 0.66, A = 0.66 + 0.72 * -1.4 = -0.348
    # row 1: t=2: 2 - 0.5 = 1.5;    t=1: delta = 0 + 0.9 * 0.5 - 1.0 = -0.55, A = -0.55 + 0.72 * 1.5 = 0.53
    assert adv[0].tolist() == pytest.approx([0.0, 0.0, -0.348, -1.4], abs=1e-6)
    assert adv[1].tolist() == pytest.approx([0.0, 0.53, 1.5, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.0, 0.0, -0.348 + 0.2, -1.4 + 0.4], abs=1e-6)
    assert ret[1].tolist() == pytest.approx([0.0, 0.53 + 1.0, 1.5 + 0.5, 0.0], abs=1e-6)


def test_gae_bootstraps_zero_after_last_valid_token():
    # the last valid token's advantage is r - V whatever sits in the padding
    mask = torch.tensor([[1, 1, 0, 0]])
    for junk in (0.0, 100.0, -3.0):
        rewards = torch.tensor([[0.0, 2.0, junk, junk]])
        values = torch.tensor([[1.0, 0.5, junk, junk]])
        adv, ret = gae(rewards, values, mask, GAMMA, LAM)
        # t=1: 2 - 0.5 = 1.5; t=0: delta = 0.9 * 0.5 - 1 = -0.55, A = -0.55 + 0.72 * 1.5 = 0.53
        assert adv[0].tolist() == pytest.approx([0.53, 1.5, 0.0, 0.0], abs=1e-6)
    # a full-length row also bootstraps 0 at its end
    adv, _ = gae(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.5]]), torch.ones(1, 2), GAMMA, LAM)
    assert adv[0].tolist() == pytest.approx([0.53, 1.5], abs=1e-6)


def test_gae_skips_a_masked_gap():
    # the recursion runs over valid tokens only: t=0 sees t=2 as its next state
    rewards = torch.tensor([[1.0, 100.0, 2.0]])
    values = torch.tensor([[0.5, 100.0, 1.0]])
    adv, _ = gae(rewards, values, torch.tensor([[1, 0, 1]]), GAMMA, LAM)
    # t=2: 2 - 1 = 1;  t=0: delta = 1 + 0.9 * 1 - 0.5 = 1.4, A = 1.4 + 0.72 * 1 = 2.12
    assert adv[0].tolist() == pytest.approx([2.12, 0.0, 1.0], abs=1e-6)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[5.0, 1.0, 2.0, 3.0]])
    values = torch.tensor([[4.0, 0.5, 1.0, 1.5]])
    mask = torch.tensor([[0, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go over valid tokens: [-, 6, 5, 3]
    assert adv[0].tolist() == pytest.approx([0.0, 6 - 0.5, 5 - 1.0, 3 - 1.5])
    assert ret[0].tolist() == pytest.approx([0.0, 6.0, 5.0, 3.0])


def test_gae_returns_are_advantages_plus_values():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, GAMMA, LAM)
    valid = mask.bool()
    torch.testing.assert_close(ret[valid], (adv + values)[valid])
    assert (adv[~valid] == 0).all() and (ret[~valid] == 0).all()


def test_gae_shape_mismatch_raises():
    with pytest.raises(ValueError):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), GAMMA, LAM)
    with pytest.raises(ValueError):
        gae(torch.zeros(3), torch.zeros(3), torch.ones(3), GAMMA, LAM)


# ---------------------------------------------------------------- masked_whiten


def test_masked_whiten_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # valid values 1..5: mean 3, variance (4 + 1 + 0 + 1 + 4) / 5 = 2
    out = masked_whiten(x, mask)
    s = math.sqrt(2.0)
    assert out.tolist() == [pytest.approx([-2 / s, -1 / s, 0.0, 0.0], abs=1e-6),
                            pytest.approx([1 / s, 2 / s, 0.0, 0.0], abs=1e-6)]
    valid = out[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.square().mean().item() == pytest.approx(1.0, abs=1e-5)
    assert (out[~mask.bool()] == 0).all()


def test_masked_whiten_keep_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    out = masked_whiten(x, torch.tensor([[1, 1, 1, 0]]), shift_mean=False)
    s = math.sqrt(2 / 3)  # mean 2, variance 2/3
    assert out[0].tolist() == pytest.approx([-1 / s + 2, 2.0, 1 / s + 2, 0.0], abs=1e-5)


def test_masked_whiten_over_ranks_uses_the_whole_batch_statistics():
    """Two "ranks" (threads) whose ``reduce`` sums each value over both, as an all-reduce does:
    each whitens its rows by the mean and variance of all valid tokens, so the two halves put
    together equal whitening the whole batch in one process (and differ from whitening each alone)."""
    import threading

    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 9.0, -50.0, 0.0], [-3.0, 7.0, 6.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    halves = [(x[:1], mask[:1]), (x[1:], mask[1:])]
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def rank(r):
        def reduce(t):
            slots[r] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read the slots before either writes the next value
            return total

        out[r] = masked_whiten(*halves[r], reduce=reduce)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    torch.testing.assert_close(torch.cat(out), masked_whiten(x, mask))
    alone = torch.cat([masked_whiten(*h) for h in halves])
    assert (alone - masked_whiten(x, mask)).abs().max() > 0.1

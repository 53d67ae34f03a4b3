"""overlong_penalty: DAPO soft overlong punishment; kl_shaped_rewards: RLHF-PPO per-token rewards."""

import pytest
import torch

from lit_align.losses import kl_shaped_rewards, overlong_penalty


def test_band_values():
    # max_len 20, cache 4: 0 up to 16, linear to -1 at 20, -1 beyond
    out = overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, cache_len=4)
    assert out.dtype.is_floating_point
    assert out.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_inside_band_is_linear():
    out = overlong_penalty(torch.tensor([0, 17, 19]), max_len=20, cache_len=4)
    assert out.tolist() == pytest.approx([0.0, -0.25, -0.75])
    # a band as wide as the limit starts at 0
    out = overlong_penalty(torch.tensor([0, 5, 10, 11]), max_len=10, cache_len=10)
    assert out.tolist() == pytest.approx([0.0, -0.5, -1.0, -1.0])


@pytest.mark.parametrize("cache_len", [0, -1, 21])
def test_bad_cache_len_raises(cache_len):
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([10]), max_len=20, cache_len=cache_len)


# -- kl_shaped_rewards: RLHF-PPO per-token rewards -------------------------------------------
def test_kl_shaped_rewards_hand_values():
    """Right-padded rows of lengths 3, 1 and 4, a row with a hole in its mask (last valid
    token at 3) and an empty row; beta 0.5."""
    kl = torch.tensor([[0.2, -0.4, 0.6, 9.0],
                       [1.0, 9.0, 9.0, 9.0],
                       [0.1, 0.2, 0.3, 0.4],
                       [0.8, 9.0, -0.2, 0.4],
                       [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0],
                         [1, 0, 0, 0],
                         [1, 1, 1, 1],
                         [1, 0, 1, 1],
                         [0, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0, 3.0, 5.0, 7.0])
    rewards, non_score = kl_shaped_rewards(scores, kl, mask, 0.5)
    expected_non_score = torch.tensor([[-0.1, 0.2, -0.3, 0.0],
                                       [-0.5, 0.0, 0.0, 0.0],
                                       [-0.05, -0.1, -0.15, -0.2],
                                       [-0.4, 0.0, 0.1, -0.2],
                                       [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[-0.1, 0.2, 1.7, 0.0],      # score on token 2, the last valid one
                             [-1.5, 0.0, 0.0, 0.0],      # a one-token row: KL and score together
                             [-0.05, -0.1, -0.15, 2.8],
                             [-0.4, 0.0, 0.1, 4.8],      # the hole at 1 gets nothing; score on 3
                             [0.0, 0.0, 0.0, 0.0]])      # no valid token: no score, no KL
    torch.testing.assert_close(non_score, expected_non_score)
    torch.testing.assert_close(rewards, expected)
    assert rewards.shape == non_score.shape == (5, 4)
    # the score is the only difference, exactly once per non-empty row
    torch.testing.assert_close((rewards - non_score).sum(-1), torch.tensor([2.0, -1.0, 3.0, 5.0, 0.0]))


def test_kl_shaped_rewards_score_lands_on_last_valid_token_only():
    kl = torch.zeros(3, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    rewards, non_score = kl_shaped_rewards(torch.tensor([1.0, 2.0, 3.0]), kl, mask, 0.1)
    assert rewards.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 2, 0], [0, 0, 0, 0, 3]]
    assert non_score.abs().sum() == 0


def test_kl_shaped_rewards_beta_zero_and_tensor_beta():
    kl = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 0]])
    rewards, non_score = kl_shaped_rewards(torch.tensor([4.0]), kl, mask, 0.0)
    assert rewards.tolist() == [[0.0, 4.0, 0.0]] and non_score.abs().sum() == 0
    rewards, non_score = kl_shaped_rewards(torch.tensor([4.0]), kl, mask, torch.tensor(0.25))
    torch.testing.assert_close(non_score, torch.tensor([[-0.25, -0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.25, 3.5, 0.0]]))


def test_kl_shaped_rewards_bool_mask_and_dtype():
    kl = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    rewards, non_score = kl_shaped_rewards(torch.tensor([1.0]), kl, torch.tensor([[True, False]]), 2.0)
    assert rewards.dtype == non_score.dtype == torch.float64
    assert rewards.tolist() == [[0.0, 0.0]] and non_score.tolist() == [[-1.0, 0.0]]


@pytest.mark.parametrize("scores, kl, mask", [
    (torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 4)),      # kl and mask widths differ
    (torch.zeros(3), torch.zeros(2, 3), torch.ones(2, 3)),      # one score per row
    (torch.zeros(2, 1), torch.zeros(2, 3), torch.ones(2, 3)),   # scores not [B]
    (torch.zeros(2), torch.zeros(2, 3, 1), torch.ones(2, 3, 1)),  # not [B, T]
    (torch.zeros(()), torch.zeros(3), torch.ones(3)),
])
def test_kl_shaped_rewards_shape_errors(scores, kl, mask):
    with pytest.raises(ValueError, match="kl_shaped_rewards"):
        kl_shaped_rewards(scores, kl, mask, 0.1)

"""aggregate_loss: the four modes by hand, micro-batch and rank-sharding invariance."""

import pytest
import torch

from lit_align.losses import AGG_MODES, aggregate_loss

# 2 x 3 example: row 0 has valid tokens 1, 2; row 1 has the single valid token 4.
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", (1 + 2 + 4) / 3),                      # all tokens / token count
    ("seq-mean-token-mean", ((1 + 2) / 2 + 4 / 1) / 2),  # mean of per-sequence means
    ("seq-mean-token-sum", ((1 + 2) + 4) / 2),           # mean of per-sequence sums
    ("seq-mean-token-sum-norm", (1 + 2 + 4) / (2 * 3)),  # sum / (B * T)
])
def test_modes_hand_values(mode, expected):
    assert aggregate_loss(LOSS, MASK, mode).item() == pytest.approx(expected)


def test_max_len_override():
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", max_len=5).item() == pytest.approx(7 / (2 * 5))
    # max_len only concerns the Dr. GRPO mode
    assert aggregate_loss(LOSS, MASK, "token-mean", max_len=5).item() == pytest.approx(7 / 3)


def test_float_mask_and_empty_sequence():
    loss = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # an empty sequence adds 0 but still counts as a sequence
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 0.0) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(3.0 / 2)
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(1.5)
    assert aggregate_loss(loss, torch.zeros(2, 2), "token-mean").item() == 0.0


# 4 x 3 batch: per-row valid sums 6, 9, 7, 21 over 3, 2, 1, 2 tokens; 43 over 8 tokens in all.
BIG_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 11.0, 12.0]])
BIG_MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]])
WHOLE = {
    "token-mean": 43 / 8,
    "seq-mean-token-mean": (6 / 3 + 9 / 2 + 7 / 1 + 21 / 2) / 4,
    "seq-mean-token-sum": 43 / 4,
    "seq-mean-token-sum-norm": 43 / (4 * 3),
}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_sum_to_full_batch(mode):
    whole = aggregate_loss(BIG_LOSS, BIG_MASK, mode)
    assert whole.item() == pytest.approx(WHOLE[mode])
    parts = [
        aggregate_loss(BIG_LOSS[rows], BIG_MASK[rows], mode, max_len=3, num_tokens=BIG_MASK.sum(), num_seqs=4)
        for rows in (slice(0, 2), slice(2, 4))
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(WHOLE[mode])


def test_micro_batch_token_mean_needs_the_global_count():
    # without the override each micro-batch divides by its own count: 15/5 + 28/3 != 2 * 43/8
    local = [aggregate_loss(BIG_LOSS[r], BIG_MASK[r], "token-mean") for r in (slice(0, 2), slice(2, 4))]
    assert local[0].item() == pytest.approx(15 / 5) and local[1].item() == pytest.approx(28 / 3)
    assert ((local[0] + local[1]) / 2).item() != pytest.approx(43 / 8)
    # plain python numbers are accepted as overrides too
    assert aggregate_loss(BIG_LOSS[:2], BIG_MASK[:2], "token-mean", num_tokens=8).item() == pytest.approx(15 / 8)


def test_rank_sharded_token_mean_equals_global_token_mean():
    """OpenRLHF-style invariance: every rank divides its token sum by the global token count.

    DDP averages gradients over ranks, so each rank scales its loss by the world size; the
    average of the rank losses (and of their gradients) then equals the global token mean.
    """
    g = torch.Generator().manual_seed(0)
    world, rows, T = 3, 2, 5
    loss = torch.randn(world * rows, T, generator=g, dtype=torch.float64)
    # ragged masks: very different token counts per rank
    lengths = torch.tensor([5, 1, 0, 2, 4, 3])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    global_tokens = int(lengths.sum())
    global_mean = float((loss * mask).sum()) / global_tokens

    leaf = loss.clone().requires_grad_(True)
    rank_losses = [world * aggregate_loss(leaf[r * rows:(r + 1) * rows], mask[r * rows:(r + 1) * rows],
                                          "token-mean", num_tokens=global_tokens) for r in range(world)]
    averaged = sum(rank_losses) / world
    assert averaged.item() == pytest.approx(global_mean, rel=1e-12)
    averaged.backward()
    # d(global token mean)/d loss = mask / global token count
    torch.testing.assert_close(leaf.grad, mask.double() / global_tokens)
    # while the mean of the local token means is different
    local = [aggregate_loss(loss[r * rows:(r + 1) * rows], mask[r * rows:(r + 1) * rows], "token-mean")
             for r in range(world)]
    assert (sum(local) / world).item() != pytest.approx(global_mean)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        aggregate_loss(LOSS, MASK, "token-sum")
    with pytest.raises(ValueError):
        aggregate_loss(LOSS, MASK[:, :2], "token-mean")

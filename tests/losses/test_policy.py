"""policy_loss (token, sequence, sequence-token ratios) and value_loss against hand values."""

import math

import pytest
import torch

from lit_align.losses import policy_loss, value_loss

D = torch.float64
LN = math.log

# ---------------------------------------------------------------- token level
# row 0: A = +1, row 1: A = -2; ratios 1.5 (above 1 + 0.28), 0.5 (below 1 - 0.2), 1.1 (inside)
RATIOS = [1.5, 0.5, 1.1]
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0]], dtype=D)
ADV = torch.tensor([1.0, -2.0], dtype=D)
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # clip range [0.8, 1.28]
# L = max(-A r, -A clip(r)):
#   A = +1: r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped); r=0.5 -> max(-0.5, -0.8) = -0.5; r=1.1 -> -1.1
#   A = -2: r=1.5 -> max(3.0, 2.56) = 3.0;  r=0.5 -> max(1.0, 1.6) = 1.6 (clipped); r=1.1 -> 2.2
LOSS_MAT = [[-1.28, -0.5, -1.1], [3.0, 1.6, 2.2]]


def _logp(requires_grad=True):
    logp = OLD + torch.tensor([[LN(r) for r in RATIOS]] * 2, dtype=D)
    return logp.clone().requires_grad_(requires_grad)


def test_token_level_clipping_hand_values_and_gradient():
    logp = _logp()
    loss, m = policy_loss(logp, OLD, ADV, torch.ones(2, 3), CLIP_LOW, CLIP_HIGH, level="token", agg_mode="token-mean")
    assert loss.item() == pytest.approx((-1.28 - 0.5 - 1.1 + 3.0 + 1.6 + 2.2) / 6)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 6)  # A > 0 and r = 1.5 > 1.28
    assert m["clip_frac_low"].item() == pytest.approx(1 / 6)   # A < 0 and r = 0.5 < 0.8
    assert m["ratio_mean"].item() == pytest.approx(2 * (1.5 + 0.5 + 1.1) / 6)
    assert m["ratio_min"].item() == pytest.approx(0.5) and m["ratio_max"].item() == pytest.approx(1.5)
    # approx_kl = mean of exp(-d) + d - 1 with d = log r
    kl = sum(1 / r + LN(r) - 1 for r in RATIOS) / 3
    assert m["approx_kl"].item() == pytest.approx(kl)
    loss.backward()
    # dL/dlogp = -A r / N where the unclipped term is taken, 0 where the clip is active
    expected = [[0.0, -0.5 / 6, -1.1 / 6], [2 * 1.5 / 6, 0.0, 2 * 1.1 / 6]]
    assert logp.grad.tolist() == [pytest.approx(row) for row in expected]


MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# masked loss sums: row 0: -2.88 over 3 tokens, row 1: 4.6 over 2 tokens


@pytest.mark.parametrize("agg_mode,max_len,expected", [
    ("token-mean", None, (-2.88 + 4.6) / 5),
    ("seq-mean-token-mean", None, (-2.88 / 3 + 4.6 / 2) / 2),
    ("seq-mean-token-sum", None, (-2.88 + 4.6) / 2),
    ("seq-mean-token-sum-norm", None, (-2.88 + 4.6) / (2 * 3)),
    ("seq-mean-token-sum-norm", 10, (-2.88 + 4.6) / (2 * 10)),
])
def test_each_agg_mode_passes_through(agg_mode, max_len, expected):
    loss, m = policy_loss(_logp(False), OLD, ADV, MASK, CLIP_LOW, CLIP_HIGH, agg_mode=agg_mode, max_len=max_len)
    assert loss.item() == pytest.approx(expected)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 5)


# ---------------------------------------------------------------- every level x every aggregation
# row 0: A = +1, ratios 1.5, 0.5, 1.1 (all valid); row 1: A = -2, ratios 0.5, 1.1 and a masked
# token whose log ratio of 5 must count nowhere. Clip range [0.8, 1.28].
TABLE_RATIOS = [[1.5, 0.5, 1.1], [0.5, 1.1, math.exp(5.0)]]
TABLE_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# token level, L_t = max(-A r, -A clip(r)):
#   row 0: -1.28 (1.5 clipped), -0.5, -1.1 -> sum -2.88 over 3 tokens
#   row 1: 1.6 (0.5 clipped: max(1.0, 1.6)), 2.2 -> sum 3.8 over 2 tokens
# sequence levels, s = exp(mean of the valid log ratios):
#   row 0: s0 = 0.825^(1/3) = 0.938 inside the range: -s0 on 3 tokens -> sum -3 s0
#   row 1: s1 = 0.55^(1/2) = 0.742 < 0.8: max(2 s1, 1.6) = 1.6 on 2 tokens -> sum 3.2
# sequence-token has the sequence ratio's value (only its gradient is per token).
S0_TABLE = 0.825 ** (1 / 3)
# mode: (token-level loss, sequence-level loss); 2 sequences, 5 tokens, T = 3
AGG_TABLE = {
    ("token-mean", None): ((-2.88 + 3.8) / 5, (-3 * S0_TABLE + 3.2) / 5),
    ("seq-mean-token-mean", None): ((-2.88 / 3 + 3.8 / 2) / 2, (-S0_TABLE + 1.6) / 2),
    ("seq-mean-token-sum", None): ((-2.88 + 3.8) / 2, (-3 * S0_TABLE + 3.2) / 2),
    ("seq-mean-token-sum-norm", None): ((-2.88 + 3.8) / (2 * 3), (-3 * S0_TABLE + 3.2) / (2 * 3)),
    ("seq-mean-token-sum-norm", 10): ((-2.88 + 3.8) / (2 * 10), (-3 * S0_TABLE + 3.2) / (2 * 10)),
}
# level: (clip_frac_low, clip_frac_high) over the 5 valid tokens
CLIP_TABLE = {"token": (1 / 5, 1 / 5), "sequence": (2 / 5, 0.0), "sequence-token": (2 / 5, 0.0)}


@pytest.mark.parametrize("level", ["token", "sequence", "sequence-token"])
@pytest.mark.parametrize("agg_mode, max_len", list(AGG_TABLE))
def test_every_level_and_aggregation_against_hand_values(level, agg_mode, max_len):
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0]], dtype=D)
    logp = old + torch.tensor(TABLE_RATIOS, dtype=D).log()
    loss, m = policy_loss(logp, old, torch.tensor([1.0, -2.0], dtype=D), TABLE_MASK, 0.2, 0.28, level=level,
                          agg_mode=agg_mode, max_len=max_len)
    expected = AGG_TABLE[(agg_mode, max_len)][0 if level == "token" else 1]
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert (m["clip_frac_low"].item(), m["clip_frac_high"].item()) == pytest.approx(CLIP_TABLE[level])


def test_num_tokens_passes_through():
    loss, _ = policy_loss(_logp(False), OLD, ADV, MASK, CLIP_LOW, CLIP_HIGH, num_tokens=10)
    assert loss.item() == pytest.approx((-2.88 + 4.6) / 10)


def test_first_update_loss_is_minus_mean_advantage():
    old = torch.tensor([[-1.0, -2.0, -0.3], [-0.5, -4.0, -1.0], [-2.0, -0.1, -0.9]], dtype=D)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    n = 6
    for level in ("token", "sequence", "sequence-token"):
        logp = old.clone().requires_grad_(True)
        loss, m = policy_loss(logp, old, adv, mask, 0.2, 0.2, level=level, agg_mode="token-mean")
        assert loss.item() == pytest.approx(-(2 * 1.0 + 1 * -0.5 + 3 * 2.0) / n), level
        assert m["clip_frac_low"].item() == 0.0 and m["clip_frac_high"].item() == 0.0
        assert m["approx_kl"].item() == 0.0
        loss.backward()
        # the policy gradient: -A / N on every valid token
        expected = [[-1.0 / n, -1.0 / n, 0.0], [0.5 / n, 0.0, 0.0], [-2.0 / n] * 3]
        assert logp.grad.tolist() == [pytest.approx(row) for row in expected], level


@pytest.mark.parametrize("level", ["token", "sequence", "sequence-token"])
def test_sequence_and_broadcast_token_advantages_agree(level):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 4, generator=g, dtype=D)
    base = old + 0.3 * torch.randn(3, 4, generator=g, dtype=D)
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])
    results = []
    for a in (adv, adv[:, None].expand(3, 4).clone()):
        logp = base.clone().requires_grad_(True)
        loss, m = policy_loss(logp, old, a, mask, 0.2, 0.2, level=level)
        loss.backward()
        results.append((loss, logp.grad, m["clip_frac_low"], m["clip_frac_high"]))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------- sequence level (GSPO)
SEQ_OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.4, -0.6, -1.0]], dtype=D)
SEQ_LOG_RATIO = torch.tensor([[0.3, -0.1, 0.1], [0.2, 0.4, 5.0]], dtype=D)  # 5.0 sits on a masked token
SEQ_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
S0, S1 = math.exp(0.1), math.exp(0.3)  # exp(mean log ratio): (0.3 - 0.1 + 0.1) / 3, (0.2 + 0.4) / 2


def test_sequence_level_hand_values_and_gradient():
    logp = (SEQ_OLD + SEQ_LOG_RATIO).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=D)
    loss, m = policy_loss(logp, SEQ_OLD, adv, SEQ_MASK, 0.2, 0.2, level="sequence", agg_mode="token-mean")
    # row 0: A=+1, s0 = 1.105 inside [0.8, 1.2]: L = -s0 on 3 tokens
    # row 1: A=-1, s1 = 1.350 > 1.2: L = max(s1, 1.2) = s1 on 2 tokens (unclipped, pessimistic)
    assert loss.item() == pytest.approx((3 * -S0 + 2 * S1) / 5)
    assert m["ratio_mean"].item() == pytest.approx((3 * S0 + 2 * S1) / 5)
    assert m["clip_frac_high"].item() == 0.0 and m["clip_frac_low"].item() == 0.0
    loss.backward()
    # d s / d logp_t = s / |y| on each valid token: row 0: 3 * (-s0 / 3) / 5, row 1: 2 * (s1 / 2) / 5
    assert logp.grad.tolist() == [pytest.approx([-S0 / 5] * 3), pytest.approx([S1 / 5, S1 / 5, 0.0])]

    _, m = policy_loss(logp.detach(), SEQ_OLD, -adv, SEQ_MASK, 0.2, 0.2, level="sequence")
    assert m["clip_frac_high"].item() == pytest.approx(2 / 5)  # row 1 now has A > 0, s1 > 1.2
    loss, _ = policy_loss(logp.detach(), SEQ_OLD, -adv, SEQ_MASK, 0.2, 0.2, level="sequence")
    # row 0: A=-1: max(s0, s0) = s0; row 1: A=+1: max(-s1, -1.2) = -1.2
    assert loss.item() == pytest.approx((3 * S0 + 2 * -1.2) / 5)


def test_sequence_level_mean_modes():
    logp = SEQ_OLD + SEQ_LOG_RATIO
    adv = torch.tensor([1.0, -1.0], dtype=D)
    loss, _ = policy_loss(logp, SEQ_OLD, adv, SEQ_MASK, 0.2, 0.2, level="sequence", agg_mode="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-S0 + S1) / 2)


def test_sequence_token_same_value_but_per_token_gradients():
    adv = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -1.0, -1.0]], dtype=D)
    grads, losses = {}, {}
    for level in ("sequence", "sequence-token"):
        logp = (SEQ_OLD + SEQ_LOG_RATIO).requires_grad_(True)
        loss, _ = policy_loss(logp, SEQ_OLD, adv, SEQ_MASK, 0.5, 0.5, level=level, agg_mode="token-mean")
        loss.backward()
        losses[level], grads[level] = loss.item(), logp.grad.tolist()
    # row 0: -(1 + 2 + 3) s0, row 1: 2 s1; both within [0.5, 1.5]
    expected = (-6 * S0 + 2 * S1) / 5
    assert losses["sequence"] == pytest.approx(expected)
    assert losses["sequence-token"] == pytest.approx(expected)
    # GSPO: every token of a row gets sum_t'(-A_t') s / |y| / N
    assert grads["sequence"] == [pytest.approx([-6 * S0 / 3 / 5] * 3), pytest.approx([S1 / 5, S1 / 5, 0.0])]
    # GSPO-token: token t gets -A_t s / N
    assert grads["sequence-token"] == [pytest.approx([-S0 / 5, -2 * S0 / 5, -3 * S0 / 5]),
                                       pytest.approx([S1 / 5, S1 / 5, 0.0])]


def test_gspo_equals_token_ratio_for_one_token_responses():
    old = torch.tensor([[-1.0], [-2.0], [-0.5], [-0.3]], dtype=D)
    log_ratio = torch.tensor([[0.5], [-0.5], [0.05], [-0.4]], dtype=D)  # clip high, low, inside, low
    adv = torch.tensor([1.0, -1.0, 2.0, 1.5], dtype=D)
    out = {}
    for level in ("token", "sequence", "sequence-token"):
        logp = (old + log_ratio).requires_grad_(True)
        loss, m = policy_loss(logp, old, adv, torch.ones(4, 1), 0.2, 0.2, level=level)
        loss.backward()
        out[level] = (loss.item(), logp.grad.flatten().tolist(), m["clip_frac_low"].item(), m["clip_frac_high"].item())
    r = [math.exp(v) for v in (0.5, -0.5, 0.05, -0.4)]
    # L: max(-r, -1.2) = -1.2; max(r, 0.8) = 0.8; -2 r; max(-1.5 r, -1.5 * 0.8) = -1.5 r
    assert out["token"][0] == pytest.approx((-1.2 + 0.8 - 2 * r[2] - 1.5 * r[3]) / 4)
    assert out["token"][1] == pytest.approx([0.0, 0.0, -2 * r[2] / 4, -1.5 * r[3] / 4])
    assert out["token"][2:] == (pytest.approx(1 / 4), pytest.approx(1 / 4))
    for level in ("sequence", "sequence-token"):
        assert out[level][0] == pytest.approx(out["token"][0])
        assert out[level][1] == pytest.approx(out["token"][1])
        assert out[level][2:] == pytest.approx(out["token"][2:])


def test_bad_arguments_raise():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(1), torch.ones(1, 2), 0.2, 0.2, level="segment")
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(1), torch.ones(1, 2), -0.1, 0.2)
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(1), torch.ones(1, 2), 0.2, 0.2, agg_mode="sum")


# ---------------------------------------------------------------- value_loss
#            token 0      token 1       token 2 (moves past clip towards R)  token 3 (masked)
V = torch.tensor([[1.0, 2.0, 1.0, 5.0]], dtype=D)
V_OLD = torch.tensor([[1.0, 1.0, 0.5, 5.0]], dtype=D)
R = torch.tensor([[2.0, 0.0, 1.0, 0.0]], dtype=D)
V_MASK = torch.tensor([[1, 1, 1, 0]])


def test_value_loss_clip_active():
    values = V.clone().requires_grad_(True)
    loss, m = value_loss(values, V_OLD, R, V_MASK, clip=0.2)
    # token 0: V unchanged: (1-2)^2 = 1 both ways
    # token 1: clipped V = 1.2: max((2-0)^2, 1.2^2) = 4 (unclipped)
    # token 2: clipped V = 0.7: max((1-1)^2, (0.7-1)^2) = 0.09 (clipped is larger)
    assert loss.item() == pytest.approx(0.5 * (1 + 4 + 0.09) / 3)
    assert m["clip_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # d/dV of 1/2 (V - R)^2 / 3 = (V - R) / 3 where unclipped; 0 through the saturated clip
    assert values.grad[0].tolist() == pytest.approx([-1 / 3, 2 / 3, 0.0, 0.0])


def test_value_loss_clip_inactive_and_none():
    for clip in (None, 10.0):
        loss, m = value_loss(V, V_OLD, R, V_MASK, clip=clip)
        assert loss.item() == pytest.approx(0.5 * (1 + 4 + 0) / 3), clip
        assert m["clip_frac"].item() == 0.0

"""rollout_correction: importance weights between the sampler and the training forward, by hand."""

import math

import pytest
import torch

from lit_align.losses import CORRECTION_LEVELS, CORRECTION_MODES, rollout_correction

# two sequences, three token slots; the second has 2 valid tokens
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -1.9, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# log ratios: [0.5, -1.0, 0.0] and [-0.2, 1.2, (masked)]
LOG_RATIOS = [[0.5, -1.0, 0.0], [-0.2, 1.2]]


def _expected(level: str, mode: str, threshold: float) -> list[list[float]]:
    out = []
    for row in LOG_RATIOS:
        if level == "token":
            logs = row
        elif level == "sequence":
            logs = [sum(row)] * len(row)
        else:
            logs = [sum(row) / len(row)] * len(row)
        w = [min(math.exp(x), threshold) if mode == "truncate" else float(math.exp(x) <= threshold) for x in logs]
        out.append(w + [0.0] * (3 - len(w)))
    return out


@pytest.mark.parametrize("level", CORRECTION_LEVELS)
@pytest.mark.parametrize("mode", CORRECTION_MODES)
@pytest.mark.parametrize("threshold", [1.2, 2.0])
def test_weights_by_hand_for_every_level_and_mode(level, mode, threshold):
    weights, _ = rollout_correction(LOGP, SAMPLER, MASK, level=level, mode=mode, threshold=threshold)
    expected = torch.tensor(_expected(level, mode, threshold))
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)


def test_hand_cases_differ_between_levels():
    # sanity of the table above: at threshold 1.2 token-level truncation changes two tokens
    w, metrics = rollout_correction(LOGP, SAMPLER, MASK, "token", "truncate", 1.2)
    assert w[0, 0].item() == pytest.approx(1.2) and w[1, 1].item() == pytest.approx(1.2)
    assert w[0, 1].item() == pytest.approx(math.exp(-1.0))
    assert metrics["masked_frac"].item() == pytest.approx(2 / 5)  # two of five valid tokens truncated
    seq, _ = rollout_correction(LOGP, SAMPLER, MASK, "sequence", "mask", 1.2)
    assert seq.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]  # exp(-0.5) <= 1.2 < exp(1.0)


def test_metrics_by_hand():
    _, m = rollout_correction(LOGP, SAMPLER, MASK, "token", "truncate", 10.0)
    flat = [x for row in LOG_RATIOS for x in row]
    assert m["ratio_mean"].item() == pytest.approx(sum(math.exp(x) for x in flat) / 5)
    assert m["ratio_max"].item() == pytest.approx(math.exp(1.2))
    # k3 estimate of KL(sampler || training forward): r - 1 - log r with r = pi / mu
    assert m["kl"].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in flat) / 5)
    assert m["masked_frac"].item() == 0.0


def test_identical_log_probs_give_unit_weights_and_zero_mismatch():
    w, m = rollout_correction(LOGP, LOGP, MASK, "sequence", "truncate", 2.0)
    assert torch.equal(w, MASK.float())
    assert m["kl"].item() == 0.0 and m["ratio_max"].item() == 1.0


def test_weights_carry_no_gradient_and_a_long_sequence_cannot_overflow():
    logp = torch.zeros(1, 400, requires_grad=True)
    w, _ = rollout_correction(logp, torch.full((1, 400), -1.0), torch.ones(1, 400), "sequence", "truncate", 5.0)
    assert not w.requires_grad and torch.isfinite(w).all() and w.max().item() == pytest.approx(5.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(level="batch"), "level"), (dict(mode="clip"), "mode"), (dict(threshold=0.0), "threshold"),
    (dict(threshold=float("inf")), "threshold"), (dict(threshold=float("nan")), "threshold"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rollout_correction(LOGP, SAMPLER, MASK, **kwargs)

"""kl_penalty: k1 / k2 / k3 estimators by hand."""

import math

import pytest
import torch

from lit_align.losses import kl_penalty

LOGP = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
# logp - ref = [0.5, -1.0, 0.0]; ref - logp = [-0.5, 1.0, 0.0]


def test_k1():
    assert kl_penalty(LOGP, REF, "k1")[0].tolist() == pytest.approx([0.5, -1.0, 0.0])


def test_k2():
    assert kl_penalty(LOGP, REF, "k2")[0].tolist() == pytest.approx([0.5 * 0.25, 0.5 * 1.0, 0.0])


def test_k3():
    expected = [math.exp(-0.5) - (-0.5) - 1, math.exp(1.0) - 1.0 - 1, 0.0]
    assert kl_penalty(LOGP, REF, "k3")[0].tolist() == pytest.approx(expected)
    assert kl_penalty(LOGP, REF)[0].tolist() == pytest.approx(expected)  # k3 is the default


def test_k3_nonnegative_and_zero_on_equal():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 16, generator=g) * 5
    ref = -torch.rand(4, 16, generator=g) * 5
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert torch.equal(kl_penalty(logp, logp, "k3"), torch.zeros_like(logp))
    assert torch.equal(kl_penalty(logp, logp, "k1"), torch.zeros_like(logp))


def test_k1_and_k3_are_unbiased_over_a_categorical():
    # pi = [1/2, 1/4, 1/4], ref = [1/4, 1/4, 1/2]: KL(pi || ref) = 1/2 ln 2 + 0 + 1/4 ln(1/2) = 1/4 ln 2
    pi = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    kl = 0.25 * math.log(2.0)
    for est in ("k1", "k3"):
        expectation = (pi * kl_penalty(pi.log(), ref.log(), est)).sum().item()
        assert expectation == pytest.approx(kl), est


def test_k3_stays_finite_far_off_policy():
    out = kl_penalty(torch.tensor([0.0, -200.0]), torch.tensor([-200.0, 0.0]), "k3")
    assert torch.isfinite(out).all() and (out >= 0).all()


def test_bad_estimator_raises():
    with pytest.raises(ValueError):
        kl_penalty(LOGP, REF, "k4")

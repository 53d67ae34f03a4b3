"""dpo_loss (sigmoid, conservative, ipo, hinge, robust) and bradley_terry_loss by hand."""

import math

import pytest
import torch

from lit_align.losses import bradley_terry_loss, dpo_loss

D = torch.float64
PC = torch.tensor([-1.0, -2.0, -3.0], dtype=D)
PR = torch.tensor([-2.0, -1.5, -3.0], dtype=D)
RC = torch.tensor([-1.5, -1.8, -2.5], dtype=D)
RR = torch.tensor([-1.8, -1.6, -2.0], dtype=D)
# chosen log ratios [0.5, -0.2, -0.5], rejected [-0.2, 0.1, -1.0]; h = [0.7, -0.3, 0.5]
H = [0.7, -0.3, 0.5]


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_sigmoid():
    beta = 0.5
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta, "sigmoid")
    assert losses.tolist() == pytest.approx([softplus(-beta * h) for h in H])  # -log sigma(beta h)
    assert cr.tolist() == pytest.approx([0.25, -0.1, -0.25])
    assert rr.tolist() == pytest.approx([-0.1, 0.05, -0.5])


def test_sigmoid_label_smoothing():
    beta, eps = 0.5, 0.1
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta, "sigmoid", label_smoothing=eps)
    expected = [(1 - eps) * softplus(-beta * h) + eps * softplus(beta * h) for h in H]
    assert losses.tolist() == pytest.approx(expected)


def test_sigmoid_gradient():
    beta = 0.5
    pc = PC.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, PR, RC, RR, beta, "sigmoid")
    losses.sum().backward()
    # d/dpc of -log sigma(beta h) = -beta sigma(-beta h)
    assert pc.grad.tolist() == pytest.approx([-beta / (1 + math.exp(beta * h)) for h in H])


def test_ipo():
    beta = 0.5  # 1 / (2 beta) = 1
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta, "ipo")
    assert losses.tolist() == pytest.approx([(0.7 - 1) ** 2, (-0.3 - 1) ** 2, (0.5 - 1) ** 2])
    losses, _, _ = dpo_loss(PC, PR, RC, RR, 0.25, "ipo")  # 1 / (2 beta) = 2
    assert losses.tolist() == pytest.approx([(h - 2) ** 2 for h in H])


def test_hinge():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, 0.5, "hinge")
    assert losses.tolist() == pytest.approx([1 - 0.35, 1 + 0.15, 1 - 0.25])
    losses, _, _ = dpo_loss(PC, PR, RC, RR, 2.0, "hinge")  # beta h = [1.4, -0.6, 1.0]
    assert losses.tolist() == pytest.approx([0.0, 1.6, 0.0])


def test_robust():
    beta, eps = 0.5, 0.1
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta, "robust", label_smoothing=eps)
    expected = [((1 - eps) * softplus(-beta * h) - eps * softplus(beta * h)) / (1 - 2 * eps) for h in H]
    assert losses.tolist() == pytest.approx(expected)
    # with no label noise it is plain DPO
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta, "robust")
    assert losses.tolist() == pytest.approx([softplus(-beta * h) for h in H])


def test_rewards_are_detached():
    pc = PC.clone().requires_grad_(True)
    _, cr, rr = dpo_loss(pc, PR, RC, RR, 0.1, "sigmoid")
    assert not cr.requires_grad and not rr.requires_grad
    assert cr.tolist() == pytest.approx([0.05, -0.02, -0.05])


@pytest.mark.parametrize("kwargs", [
    dict(loss_type="kto"),
    dict(loss_type="sigmoid", label_smoothing=0.5),
    dict(loss_type="sigmoid", label_smoothing=-0.1),
    dict(loss_type="robust", label_smoothing=0.7),
    dict(loss_type="ipo", label_smoothing=0.1),
])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, 0.1, **kwargs)


# ---------------------------------------------------------------- Bradley-Terry

CH = torch.tensor([1.0, 0.5], dtype=D)
RJ = torch.tensor([0.0, 1.0], dtype=D)


def test_bradley_terry_plain():
    # diff = [1, -0.5]
    assert bradley_terry_loss(CH, RJ).item() == pytest.approx((softplus(-1.0) + softplus(0.5)) / 2)


def test_bradley_terry_margin_and_centering():
    margin = torch.tensor([0.5, 0.0], dtype=D)
    # diff - margin = [0.5, -0.5]; centre term: mean((1 + 0)^2, (0.5 + 1)^2) = (1 + 2.25) / 2
    expected = (softplus(-0.5) + softplus(0.5)) / 2 + 0.01 * (1.0 + 2.25) / 2
    assert bradley_terry_loss(CH, RJ, margin=margin, center_coef=0.01).item() == pytest.approx(expected)
    assert bradley_terry_loss(CH, RJ, margin=margin).item() == pytest.approx((softplus(-0.5) + softplus(0.5)) / 2)


def test_bradley_terry_gradient():
    ch = CH.clone().requires_grad_(True)
    bradley_terry_loss(ch, RJ).backward()
    # d/dr_c of mean(-log sigma(d)) = -sigma(-d) / B
    assert ch.grad.tolist() == pytest.approx([-1 / (1 + math.exp(1.0)) / 2, -1 / (1 + math.exp(-0.5)) / 2])

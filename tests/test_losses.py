"""rlhf.losses against hand-computed numbers."""

import math

import pytest
import torch

from rlhf.losses import bradley_terry_loss, preference_accuracy


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_bt_equal_rewards_is_ln2():
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_bt_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    # Δ = 1 and −1: (−log σ(1) − log σ(−1)) / 2
    expected = (-math.log(sig(1.0)) - math.log(sig(-1.0))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_bt_margin_from_strength():
    # Δ = 1, margin 2/3 (strength 3): −log σ(1/3)
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([2 / 3]))
    assert loss.item() == pytest.approx(-math.log(sig(1 / 3)), rel=1e-6)


def test_bt_tie_is_soft_half_and_ignores_margin():
    # Δ = 2, tie: −½ log σ(2) − ½ log σ(−2); the margin of 1 is ignored for ties.
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]), tie=torch.tensor([True]))
    assert loss.item() == pytest.approx(-0.5 * math.log(sig(2.0)) - 0.5 * math.log(sig(-2.0)), rel=1e-6)
    # A tie's loss is smallest when the rewards are equal.
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]), tie=torch.tensor([True])).item() == pytest.approx(math.log(2))


def test_bt_centering():
    # (r_c + r_r)² = 9, coefficient 0.01 → +0.09
    base = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]))
    centered = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), center_coef=0.01)
    assert (centered - base).item() == pytest.approx(0.09, rel=1e-5)


def test_bt_gradient_pushes_chosen_up():
    chosen, rejected = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)  # −(1 − σ(0))


def test_accuracy_leaves_ties_out():
    acc = preference_accuracy(torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0.0, 1.0, 0.0]), tie=torch.tensor([False, False, True]))
    assert acc.item() == pytest.approx(0.5)


def test_bt_soft_target():
    # target 0.75 at Δ = 1: −0.75 log σ(1) − 0.25 log σ(−1); the margin is ignored for soft labels.
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]), target=torch.tensor([0.75]))
    assert loss.item() == pytest.approx(-0.75 * math.log(sig(1.0)) - 0.25 * math.log(sig(-1.0)), rel=1e-6)

"""rlhf.losses against hand-computed numbers."""

import math

import pytest
import torch

from rlhf.losses import bradley_terry_loss, fit_logit_coef, pearson_correlation, preference_accuracy, shorter_preferred


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


def test_shorter_preferred_by_hand():
    # Pairs 0, 1, 4 count (2 has equal lengths, 3 is a tie). The labels chose the shorter story in pair 0
    # only: 1/3. The model scores the shorter one higher in all three: 1 > 0, 1 > 0 (rejected), 3 > 2 (rejected).
    t = torch.tensor
    out = shorter_preferred(t([1.0, 0.0, 9.0, 9.0, 2.0]), t([0.0, 1.0, 0.0, 0.0, 3.0]), t([3, 5, 4, 2, 6]), t([5, 3, 4, 4, 2]),
                            tie=t([False, False, False, True, False]))  # fmt: skip
    assert out == {"labels": pytest.approx(1 / 3), "model": 1.0, "pairs": 3}
    flipped = shorter_preferred(t([0.0]), t([1.0]), t([3]), t([5]))  # the labels chose the shorter, the model the longer
    assert flipped == {"labels": 1.0, "model": 0.0, "pairs": 1}
    assert shorter_preferred(t([1.0]), t([0.0]), t([4]), t([4]))["pairs"] == 0


def test_pearson_correlation_by_hand():
    # x − x̄ = (−1, 0, 1), y − ȳ = (−7/3, −1/3, 8/3): Σ = 5, Σx² = 2, Σy² = 38/3, r = 5 / √(76/3)
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])
    assert pearson_correlation(x, y).item() == pytest.approx(5 / math.sqrt(76 / 3), abs=1e-6)
    assert pearson_correlation(x, -y).item() == pytest.approx(-5 / math.sqrt(76 / 3), abs=1e-6)
    assert pearson_correlation(x, 10 * y + 3).item() == pytest.approx(5 / math.sqrt(76 / 3), abs=1e-6)  # scale-free
    # A constant (a batch of equally long stories): r = 0, with a finite gradient for the penalty.
    rewards = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    r = pearson_correlation(rewards, torch.full((3,), 40.0))
    r.abs().backward()
    assert r.item() == 0.0 and torch.isfinite(rewards.grad).all()


def test_bt_soft_target():
    # target 0.75 at Δ = 1: −0.75 log σ(1) − 0.25 log σ(−1); the margin is ignored for soft labels.
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]), target=torch.tensor([0.75]))
    assert loss.item() == pytest.approx(-0.75 * math.log(sig(1.0)) - 0.25 * math.log(sig(-1.0)), rel=1e-6)



def test_bt_offset_applies_to_every_pair():
    # Pair 1: Δ = 1 − 0 + 0.5 = 1.5, margin 1 → −log σ(0.5). Pair 2 a tie: Δ = 0 + (−1) → −½ log σ(−1) − ½ log σ(1).
    t = torch.tensor
    loss = bradley_terry_loss(t([1.0, 0.0]), t([0.0, 0.0]), margin=t([1.0, 1.0]), tie=t([False, True]), offset=t([0.5, -1.0]))
    expected = (-math.log(sig(0.5)) - 0.5 * math.log(sig(-1.0)) - 0.5 * math.log(sig(1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # The offset's gradient is the residual σ(Δ) − target: it learns what the rewards leave unexplained.
    beta = t(0.0, requires_grad=True)
    bradley_terry_loss(t([0.0]), t([0.0]), offset=beta * t([2.0])).backward()
    assert beta.grad.item() == pytest.approx(2.0 * (sig(0.0) - 1.0))


def test_fit_logit_coef_by_hand():
    t = torch.tensor
    # x = ±1 with targets 0.75 / 0.25: σ(β) = 0.75, β = ln 3.
    assert fit_logit_coef(t([1.0, -1.0]), t([0.75, 0.25])) == pytest.approx(math.log(3), rel=1e-6)
    # Three pairs at x = 2, two of them won: σ(2β) = 2/3, β = ½ ln 2.
    assert fit_logit_coef(t([2.0, 2.0, 2.0]), t([1.0, 1.0, 0.0])) == pytest.approx(0.5 * math.log(2), rel=1e-6)
    # Pairs of equal length (x = 0), decisive or tied, carry no information about β: the same answer with two added.
    assert fit_logit_coef(t([2.0, 2.0, 2.0, 0.0, 0.0]), t([1.0, 1.0, 0.0, 1.0, 0.5])) == pytest.approx(0.5 * math.log(2), rel=1e-6)
    assert fit_logit_coef(t([-1.0, 1.0]), t([0.25, 0.75])) == pytest.approx(math.log(3), rel=1e-6)  # negating x and the target: same β
    assert fit_logit_coef(t([0.0, 0.0]), t([1.0, 0.0])) == 0.0  # no length differences, nothing to fit
    assert fit_logit_coef(t([1.0, 2.0]), t([1.0, 1.0])) == 20.0  # separable: clamped, not infinite

# ------------------------------------------------------------------------------------------------
# PPO pieces.
# ------------------------------------------------------------------------------------------------

from rlhf.losses import (  # noqa: E402
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)


def test_masked_mean_var_whiten_by_hand():
    x, m = torch.tensor([[1.0, 2.0, 9.0], [3.0, 100.0, 100.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.0])
    assert masked_var(x, m).item() == pytest.approx(1.0)  # ((−1)² + 0 + 1²) / 2
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)
    w = masked_whiten(x, m)
    close(w, [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_whiten(x, m, shift_mean=False)[0, :2].tolist() == pytest.approx([1.0, 2.0], abs=1e-6)


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])  # log π − log π_ref = 0.5, −1
    assert kl_estimate(lp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_estimate(lp, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    # k3 = (r − 1) − log r with r = π_ref/π = e^{−0.5}, e^{1}
    assert kl_estimate(lp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1], rel=1e-6)
    assert (kl_estimate(lp, lp, "k3") == 0).all()
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_estimate(lp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        assert kl_estimate(p.log()[x], q.log()[x], kind).mean().item() == pytest.approx(true_kl, abs=0.01)


def test_adaptive_kl_controller_by_hand():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    # KL 9: error clip(9/6 − 1) = 0.2 (clipped from 0.5); β = 0.2 · (1 + 0.2 · 256/10000)
    assert c.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000))
    before = c.value
    assert c.update(3.0, 100) == pytest.approx(before * (1 - 0.5 * 100 / 10_000 * 0.4))  # error −0.5 → −0.2
    assert FixedKLController(0.1).update(100.0, 1000) == 0.1


def test_kl_penalized_rewards_put_the_score_on_the_last_real_token():
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0, -1.0]), lp, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, 0.0, -0.5], [-1.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.0, 0.05 + 2.0], [0.1, -1.0, 0.0]])
    assert rewards[0, 2].item() == pytest.approx(2.05)  # the score lands on the EOS, the last real token


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def gae_reference(rewards, values, mask, gamma, lam):
    """Straight from the paper, one sequence at a time, over its real tokens only."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                next_v = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * next_v - values[b, k].item()
                total += (gamma * lam) ** (k - t) * delta
            adv[b, t] = total
    return adv


def test_gae_by_hand_and_against_a_plain_loop():
    # One step: A = r − V. Two steps, γ=1, λ=0.5: δ1 = 1 − 0.5 = 0.5, δ0 = 0 + 0.5 − 1 = −0.5, A0 = −0.5 + 0.5·0.5.
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.5]]), torch.tensor([[1, 1]]), gamma=1.0, lam=0.5)
    close(adv, [[-0.25, 0.5]])
    close(ret, [[0.75, 1.0]])
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor([[7], [3], [1], [5]])).long()
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8)):
        adv, _ = gae(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, gae_reference(rewards, values, mask, gamma, lam), atol=1e-5, rtol=1e-5)
        assert (adv[mask == 0] == 0).all()


def test_ppo_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, stats = ppo_policy_loss(lp, old, adv, torch.ones(1, 3), cliprange=0.2)
    # token 1: max(−1.5, −1.2) = −1.2 (clipped); token 2: max(0.5, 0.8) = 0.8 (clipped); token 3: max(−2.2, −2.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.1)) / 3)
    # At ratio 1 the loss is −mean(A) and its gradient is −A per token.
    lp0 = torch.zeros(1, 3, requires_grad=True)
    ppo_policy_loss(lp0, old, adv, torch.ones(1, 3))[0].backward()
    close(lp0.grad, [[-1 / 3, 1 / 3, -2 / 3]])


def test_ppo_value_loss_by_hand():
    values, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, stats = ppo_value_loss(values, old, ret, torch.ones(1, 2), cliprange_value=0.2)
    # token 1: unclipped (1−0)² = 1, clipped (0.7−0)² = 0.49 → 1; token 2: (0−1)² both → 1
    assert loss.item() == pytest.approx(0.5 * (1 + 1) / 2)
    assert stats["vf_clipfrac"].item() == 0.0
    values = torch.tensor([[0.0, 0.0]])  # token 1: unclipped 0, clipped (0.3)² = 0.09 → takes 0.09
    loss, stats = ppo_value_loss(values, old, ret, torch.ones(1, 2), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.09 + 1) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_explained_variance():
    ret, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), ret, mask).item() == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------------
# GRPO / RLOO advantages and the DPO family.
# ------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    from rlhf.losses import group_advantages

    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two prompts, three samples each
    # GRPO, group 1: mean 2, unbiased std 1 → (−1, 0, 1); group 2: mean 2, std √12 → (−2, −2, 4) / √12.
    grpo = group_advantages(scores, 3, "grpo", eps=0.0)
    expected = [-1.0, 0.0, 1.0, -2 / math.sqrt(12), -2 / math.sqrt(12), 4 / math.sqrt(12)]
    assert grpo.tolist() == pytest.approx(expected, rel=1e-6)
    # RLOO: r − mean of the others: 1 − 2.5, 2 − 2, 3 − 1.5; 0 − 3, 0 − 3, 6 − 0.
    assert group_advantages(scores, 3, "rloo").tolist() == pytest.approx([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])
    # A group whose samples all score the same teaches nothing.
    assert group_advantages(torch.full((4,), 2.0), 4, "grpo").abs().max().item() == 0.0


def test_group_advantages_reject_bad_groups():
    from rlhf.losses import group_advantages

    with pytest.raises(ValueError, match="2 or more samples"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="use grpo or rloo"):
        group_advantages(torch.zeros(4), 2, "gae")


def test_length_debiased_by_hand_and_against_numpy():
    import numpy as np

    from rlhf.losses import length_debiased

    # L = 1, 2, 3 (mean 2), s = 1, 2, 6 (mean 3): slope = ((−1)(−2) + 0 + (1)(3)) / 2 = 2.5.
    scores, lengths = torch.tensor([1.0, 2.0, 6.0]), torch.tensor([1, 2, 3])
    out, slope = length_debiased(scores, lengths)
    assert slope.item() == pytest.approx(2.5)
    assert out.tolist() == pytest.approx([3.5, 2.0, 3.5])
    half, _ = length_debiased(scores, lengths, 0.5)  # half the dependence: s − 1.25 (L − 2)
    assert half.tolist() == pytest.approx([2.25, 2.0, 4.75])
    # Against numpy's least-squares line on random data: the slope, then residuals uncorrelated with length.
    g = torch.Generator().manual_seed(0)
    scores, lengths = torch.randn(64, generator=g), torch.randint(10, 90, (64,), generator=g)
    out, slope = length_debiased(scores, lengths)
    np_slope = np.polyfit(lengths.numpy().astype(float), scores.numpy().astype(float), 1)[0]
    assert slope.item() == pytest.approx(np_slope, rel=1e-4)
    assert abs(np.corrcoef(out.numpy(), lengths.numpy())[0, 1]) < 1e-5
    assert out.mean().item() == pytest.approx(scores.mean().item(), abs=1e-5)  # the batch's mean reward is kept
    # One length for all: nothing to take out.
    same, slope = length_debiased(torch.tensor([1.0, 5.0]), torch.tensor([7, 7]))
    assert slope.item() == 0.0 and same.tolist() == [1.0, 5.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        length_debiased(scores, lengths, 1.5)


def test_losses_docstring_examples_hold():
    import doctest

    import rlhf.losses

    assert doctest.testmod(rlhf.losses).failed == 0


def test_dpo_sigmoid_by_hand():
    from rlhf.losses import dpo_loss

    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])  # Δ = 1, −2
    loss, stats = dpo_loss(chosen, rejected, beta=0.5)
    expected = (-math.log(sig(0.5)) - math.log(sig(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["rewards/margins"].item() == pytest.approx((0.5 - 1.0) / 2)
    assert stats["rewards/accuracies"].item() == 0.5
    assert stats["rewards/chosen"].item() == pytest.approx(0.25)


def test_dpo_soft_target_by_hand():
    from rlhf.losses import dpo_loss

    # A 2-to-1 vote (target ⅔), Δ = 1, β = 1: −⅔·log σ(1) − ⅓·log σ(−1); ε smooths only targets of 1 (0.9 here),
    # and the soft pair, ordered right, counts in the accuracy.
    loss, stats = dpo_loss(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0]), beta=1.0, label_smoothing=0.1, target=torch.tensor([2 / 3, 1.0]))
    soft = -2 / 3 * math.log(sig(1)) - 1 / 3 * math.log(sig(-1))
    sure = -0.9 * math.log(sig(-1)) - 0.1 * math.log(sig(1))
    assert loss.item() == pytest.approx((soft + sure) / 2, rel=1e-6)
    assert stats["rewards/accuracies"].item() == 0.5


def test_conservative_dpo_and_ties_by_hand():
    from rlhf.losses import dpo_loss

    # cDPO, ε = 0.25, Δ = 2, β = 1: −0.75·log σ(2) − 0.25·log σ(−2). A tie stays a target of ½.
    loss, _ = dpo_loss(torch.tensor([2.0]), torch.tensor([0.0]), beta=1.0, label_smoothing=0.25)
    assert loss.item() == pytest.approx(-0.75 * math.log(sig(2)) - 0.25 * math.log(sig(-2)), rel=1e-6)
    tie, stats = dpo_loss(torch.tensor([2.0]), torch.tensor([0.0]), beta=1.0, label_smoothing=0.25, target=torch.tensor([0.5]))
    assert tie.item() == pytest.approx(-0.5 * math.log(sig(2)) - 0.5 * math.log(sig(-2)), rel=1e-6)
    assert math.isnan(stats["rewards/accuracies"].item())  # no decisive pair to be right about
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(torch.zeros(1), torch.zeros(1), label_smoothing=0.5)


def test_ipo_by_hand():
    from rlhf.losses import dpo_loss

    # Per-token means: 3/3 − 2/4 = 0.5; β = 0.5 → target gap 1/(2β) = 1; loss (0.5 − 1)² = 0.25.
    loss, _ = dpo_loss(torch.tensor([3.0]), torch.tensor([2.0]), beta=0.5, loss_type="ipo",
                       chosen_tokens=torch.tensor([3]), rejected_tokens=torch.tensor([4]))  # fmt: skip
    assert loss.item() == pytest.approx(0.25)
    # A tie's target gap is 0: loss 0.5².
    tie, _ = dpo_loss(torch.tensor([3.0]), torch.tensor([2.0]), beta=0.5, loss_type="ipo", target=torch.tensor([0.5]),
                      chosen_tokens=torch.tensor([3]), rejected_tokens=torch.tensor([4]))  # fmt: skip
    assert tie.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(torch.zeros(1), torch.zeros(1), loss_type="ipo")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_matches_trl(loss_type):
    """The same per-token log-probs through TRL's own DPOTrainer loss (a peer nobody here wrote)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    from rlhf.losses import dpo_loss

    torch.manual_seed(0)
    b, t, beta = 3, 6, 0.3
    completion = torch.zeros(2 * b, t + 1, dtype=torch.long)  # TRL shifts the mask by one: the completion is positions 1..t
    lengths = [6, 4, 2, 5, 6, 3]  # chosen rows, then rejected rows
    for i, n in enumerate(lengths):
        completion[i, 1 : 1 + n] = 1
    mask = completion[:, 1:]
    token_logps = -torch.rand(2 * b, t) * mask  # zero where masked, as TRL's fused head gives
    ref_logps = (-torch.rand(2 * b, t) * mask).sum(1)

    outputs = SimpleNamespace(log_probs=token_logps, entropy=torch.zeros(2 * b, t), mean_logits=torch.zeros(2 * b, t),
                              is_top1=torch.zeros(2 * b, t, dtype=torch.bool))  # fmt: skip
    model = lambda **kw: outputs  # noqa: E731
    model.training = True
    identity = lambda x: x  # noqa: E731
    fake = SimpleNamespace(model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=identity, gather=identity),
                           aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
                           _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)  # fmt: skip
    inputs = {"input_ids": torch.zeros(2 * b, t + 1, dtype=torch.long), "attention_mask": torch.ones(2 * b, t + 1, dtype=torch.long),
              "completion_mask": completion, "ref_chosen_logps": ref_logps[:b], "ref_rejected_logps": ref_logps[b:]}  # fmt: skip
    trl_loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)

    ratios = token_logps.sum(1) - ref_logps
    tokens = mask.sum(1)
    ours, stats = dpo_loss(ratios[:b], ratios[b:], beta=beta, loss_type=loss_type, chosen_tokens=tokens[:b], rejected_tokens=tokens[b:])
    assert ours.item() == pytest.approx(float(trl_loss), rel=1e-5)
    assert stats["rewards/margins"].item() == pytest.approx(fake._metrics["train"]["rewards/margins"][0], rel=1e-5)


def test_bradley_terry_weighted_mean_by_hand():
    # Δ = 1 and Δ = −1: losses log(1 + e^−1) = 0.31326 and log(1 + e) = 1.31326; weights 2/3 and 1/3.
    chosen, rejected, w = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([2 / 3, 1 / 3])
    expected = (2 / 3 * math.log1p(math.exp(-1)) + 1 / 3 * math.log1p(math.e)) / 1.0
    assert bradley_terry_loss(chosen, rejected, weight=w).item() == pytest.approx(expected, rel=1e-6)
    # equal weights of any size give the plain mean
    assert bradley_terry_loss(chosen, rejected, weight=torch.full((2,), 0.5)).item() == pytest.approx(
        bradley_terry_loss(chosen, rejected).item(), rel=1e-6)


def test_span_token_loss_is_class_balanced_by_hand():
    from rlhf.losses import span_token_loss

    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([[1, 1, 0, -100], [1, 0, -100, -100]])
    bce = lambda x, y: math.log1p(math.exp(-x)) if y == 1 else math.log1p(math.exp(x))  # noqa: E731
    fine = (bce(0.0, 1) + bce(1.0, 1) + bce(3.0, 1)) / 3
    marked = (bce(-1.0, 0) + bce(0.0, 0)) / 2
    assert span_token_loss(logits, labels).item() == pytest.approx((fine + marked) / 2, rel=1e-6)
    assert span_token_loss(logits, torch.full_like(labels, -100)).item() == 0.0
    only_fine = torch.tensor([[1, 1, -100, -100], [-100, -100, -100, -100]])
    assert span_token_loss(logits, only_fine).item() == pytest.approx((bce(0.0, 1) + bce(1.0, 1)) / 2, rel=1e-6)

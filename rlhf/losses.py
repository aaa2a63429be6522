"""Pure functions for reward modeling and PPO. Only torch; every one is tested against
hand-computed numbers (and GAE against a plain loop) in tests/test_losses.py.

Reward model: the Bradley-Terry loss and accuracy. PPO, following "The N Implementation Details of
RLHF with PPO" (Huang et al., 2022) and Ziegler et al. (2019): masked mean and whitening, the KL
estimators k1/k2/k3 (Schulman, 2020), the adaptive and fixed KL controllers, per-token rewards
with the score at EOS, GAE (Schulman et al., 2016), and the clipped policy and value losses
(Schulman et al., 2017). Shapes: (B, T) per token, with a (B, T) mask of real response tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    tie: torch.Tensor | None = None,
    center_coef: float = 0.0,
    target: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean Bradley-Terry loss −log σ(r_c − r_r − m) over a batch (Ouyang et al. 2022; Llama 2 margin).

    A tie is a soft target of 0.5: −½ log σ(Δ) − ½ log σ(−Δ), with no margin, so the two rewards
    are pulled together. More generally `target` gives P(chosen ≻ rejected) per pair (e.g. the
    share of annotators who preferred it); the margin applies only to decisive pairs (target 1).
    `center_coef` adds c·mean((r_c + r_r)²), which keeps rewards centered on zero
    (Eisenstein et al. 2023). `offset` is added to every pair's logit, ties included: a term the
    labels depend on that the reward should not carry, such as β·(length difference) in a
    length-controlled model (Dubois et al. 2024). `weight` makes it the weighted mean Σ w·ℓ / Σ w
    (the pairs a ranking implies weigh less than a vote each: annotate.export --rank-weight).
    Shapes: all (B,).

    >>> bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item()  # ln 2
    0.6931471824645996
    """
    delta = chosen_rewards - rejected_rewards  # (B,)
    if offset is not None:
        delta = delta + offset.to(delta.dtype)
    if target is None:
        target = torch.ones_like(delta)
        if tie is not None:
            target = target - 0.5 * tie.to(delta.dtype)
    target = target.to(delta.dtype)
    if margin is not None:
        delta = delta - margin.to(delta.dtype) * (target >= 1)  # ties and soft labels have no margin
    if weight is None:
        loss = F.binary_cross_entropy_with_logits(delta, target, reduction="mean")
    else:
        weight = weight.to(delta.dtype)
        loss = (F.binary_cross_entropy_with_logits(delta, target, reduction="none") * weight).sum() / weight.sum().clamp_min(1e-12)
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def span_token_loss(token_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The span head's token-level loss (fine-grained RLHF, Wu et al. 2023; RLHF-V, Yu et al. 2024):
    binary cross-entropy of each labelled token's logit against 1 (fine) or 0 (inside a span mark),
    class-balanced: the mean over the marked tokens and the mean over the fine ones, averaged, since
    marks cover a few tokens in a hundred and a plain mean is won by calling every token fine. −100
    marks a token without a label; a class with no token drops out; zero when none has a label.
    Shapes: (B, T).

    >>> round(span_token_loss(torch.tensor([[0.0, 2.0, 5.0, 0.0]]), torch.tensor([[1, 0, -100, 1]])).item(), 4)  # (ln 2 + ln(1 + e²)) / 2
    1.41
    """
    keep = labels != -100
    if not keep.any():
        return token_logits.sum() * 0.0  # keeps the graph (DDP wants every parameter used)
    losses = F.binary_cross_entropy_with_logits(token_logits[keep], labels[keep].to(token_logits.dtype), reduction="none")
    marked = labels[keep] == 0
    parts = [losses[m].mean() for m in (marked, ~marked) if m.any()]
    return sum(parts) / len(parts)


def fit_logit_coef(x: torch.Tensor, target: torch.Tensor, steps: int = 25) -> float:
    """β of the one-feature model P(chosen ≻ rejected) = σ(β·x), fit by maximum likelihood (Newton).

    No intercept: swapping a pair's two stories negates x and turns the target into 1 − target. With
    x the (scaled) word difference it is the labels' own taste for length, the start of a
    length-controlled reward model's β. Shapes: (B,); returns 0.0 where x is all zero.

    >>> round(fit_logit_coef(torch.tensor([1.0, -1.0]), torch.tensor([0.75, 0.25])), 4)  # σ(β) = 0.75: β = ln 3
    1.0986
    """
    x, target = x.double(), target.double()
    if not x.abs().sum():
        return 0.0
    beta = torch.zeros((), dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(beta * x)
        beta = beta - ((p - target) * x).sum() / ((p * (1 - p) * x * x).sum() + 1e-12)
        beta = beta.clamp(-20.0, 20.0)  # separable labels would send it to infinity
    return beta.item()


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Share of decisive pairs (ties left out) where the chosen story scores higher. Shape ()."""
    decisive = torch.ones_like(chosen_rewards, dtype=torch.bool) if tie is None else ~tie.bool()
    if not decisive.any():
        return torch.tensor(float("nan"))
    return (chosen_rewards[decisive] > rejected_rewards[decisive]).float().mean()


def shorter_preferred(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_len: torch.Tensor,
                      rejected_len: torch.Tensor, tie: torch.Tensor | None = None) -> dict[str, float]:
    """A length-bias check: on decisive pairs whose two stories differ in length, how often the labels
    prefer the shorter one (`labels`) and how often the reward model does (`model`).

    A model far from its labels has learned length as a shortcut, and PPO will follow it (Singhal et
    al., 2023, for the longer-is-better kind). `pairs`: how many pairs it is measured on.
    """
    keep = chosen_len != rejected_len
    if tie is not None:
        keep &= ~tie.bool()
    if not keep.any():
        return {"labels": float("nan"), "model": float("nan"), "pairs": 0}
    chosen_shorter = (chosen_len < rejected_len)[keep]
    model_shorter = torch.where(chosen_shorter, chosen_rewards[keep] > rejected_rewards[keep], rejected_rewards[keep] > chosen_rewards[keep])
    return {"labels": chosen_shorter.float().mean().item(), "model": model_shorter.float().mean().item(), "pairs": int(keep.sum())}


def pearson_correlation(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson's r of two (N,) tensors, differentiable; 0 where either is constant.

    ODIN (Chen et al., 2024) adds λ·|r(reward, length)| over each batch to the reward model's loss,
    so that the reward cannot carry length (`rlhf.train_rm --length_decorrelation`).

    >>> round(pearson_correlation(torch.tensor([1., 2., 3.]), torch.tensor([2., 4., 7.])).item(), 4)  # 5 / √(2 · 12.667)
    0.9934
    """
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    return (x * y).sum() / (x.pow(2).sum() * y.pow(2).sum() + eps).sqrt()  # eps inside: a finite gradient when one is constant


# ------------------------------------------------------------------------------------------------
# PPO.
# ------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1: masked_mean([1, 2, 9], [1, 1, 0]) = 1.5."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if unbiased and n > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries (keep the mean when `shift_mean` is False); 0 where masked."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π (Schulman, "Approximating KL Divergence").

    With log r = log π_ref − log π:  k1 = −log r (unbiased, can be negative);
    k2 = ½ (log r)² (biased, low variance);  k3 = (r − 1) − log r (unbiased, always ≥ 0).
    """
    log_ratio = logprobs - ref_logprobs  # log π − log π_ref = −log r
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


class AdaptiveKLController:
    """β_{t+1} = β_t · (1 + clip(KL/target − 1, −0.2, 0.2) · n/horizon)  (Ziegler et al. 2019, §2.2)."""

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10_000):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A constant β."""

    def __init__(self, kl_coef: float = 0.2):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float, kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token rewards −β·KL_t, plus the sequence score on its last real token (the EOS).

    Returns (rewards (B, T), kl (B, T)), both 0 where masked.
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_estimate(logprobs, ref_logprobs, kind) * mask  # (B, T)
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype) * (mask.sum(1) > 0)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over right-padded responses.

    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1}, with V and r zero past the last real token.
    Returns (advantages, returns = advantages + values), both (B, T) and 0 where masked.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    cliprange: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The clipped surrogate: mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old.

    Also returns the clip fraction and approx-KL ½·mean((log ρ)²) as diagnostics.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """½·mean(max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²)), and the value clip fraction."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V) / Var(R): 1 for a perfect value function, 0 for a constant one."""
    var = masked_var(returns, mask, unbiased=False)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var.clamp(min=1e-8)


# ------------------------------------------------------------------------------------------------
# Critic-free advantages (GRPO, RLOO) and direct preference optimization (DPO, IPO, cDPO).
# ------------------------------------------------------------------------------------------------


def length_debiased(scores: torch.Tensor, lengths: torch.Tensor, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores with `strength` of their linear dependence on length taken out: (scores', slope).

    slope b is the least-squares fit of the scores on the lengths over the batch, cov(s, L) / var(L),
    and s' = s − strength · b · (L − mean L). At strength 1 the batch's scores no longer correlate
    with length, so a policy cannot raise its reward by writing shorter (or longer) alone, while
    every difference between stories of equal length stays; the batch's mean score is unchanged. A
    batch whose stories all have one length is returned as it is (slope 0).

    >>> s, b = length_debiased(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([1.0, 2.0, 3.0]))
    >>> round(b.item(), 3), [round(x, 3) for x in s.tolist()]
    (2.5, [3.5, 2.0, 3.5])
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"length debias strength {strength}: give a value in [0, 1] (0: off, 1: no linear length dependence left)")
    s, length = scores.float(), lengths.float().to(scores.device)
    centered = length - length.mean()
    var = (centered**2).sum()
    slope = (centered * (s - s.mean())).sum() / var if var > 0 else torch.zeros((), device=s.device)
    return s - strength * slope * centered, slope


def group_advantages(scores: torch.Tensor, group_size: int, kind: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """One advantage per sample, from the other samples of the same prompt; no value function.

    `scores` (B,) holds `group_size` samples per prompt, each prompt's samples next to each other.
    grpo (Shao et al., 2024): (r − mean of the group) / (std of the group + eps), std unbiased as in
    TRL's GRPOTrainer. rloo (Ahmadian et al., 2024): r − the mean of the group's *other* samples.

    >>> group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 2, "rloo").tolist()
    [-1.0, 1.0, -3.0, 3.0]
    """
    if group_size < 2:
        raise ValueError(f"group advantages need 2 or more samples per prompt, not {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.float().view(-1, group_size)  # (P, K)
    mean = groups.mean(1, keepdim=True)
    if kind == "grpo":
        return ((groups - mean) / (groups.std(1, keepdim=True) + eps)).view(-1)
    if kind == "rloo":
        return (groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)).view(-1)
    raise ValueError(f"unknown group advantage {kind!r}; use grpo or rloo")


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, target: torch.Tensor | None = None, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Direct preference optimization on sequence log-ratios log π(y|x) − log π_ref(y|x), shapes (B,).

    * sigmoid (Rafailov et al., 2023): −log σ(β·(ρ_c − ρ_r)), as a binary cross-entropy against
      `target` = P(chosen ≻ rejected) (default 1; a tie 0.5; a vote share in between).
    * `label_smoothing` ε > 0 with sigmoid is conservative DPO (Mitchell, 2023): targets of 1
      become 1 − ε, −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ), for labels right about 1 − ε of the time.
    * ipo (Azar et al., 2023): (Δ̄ − (2p − 1)/(2β))², Δ̄ the difference of the per-token mean
      log-ratios (TRL's normalization; needs `chosen_tokens` and `rejected_tokens`), p the target.

    Returns (mean loss, stats): the implicit rewards β·ρ of each side, their margin and the share of
    decisive pairs (target above ½) the implicit reward orders right.

    >>> round(dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), beta=1.0)[0].item(), 4)  # −log σ(1)
    0.3133
    """
    delta = chosen_logratios - rejected_logratios
    if target is None:
        target = torch.ones_like(delta)
    target = target.to(delta.dtype)
    decisive = target > 0.5  # chosen preferred: unanimous (1) or by a vote share (soft); a tie is ½
    if label_smoothing:
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing {label_smoothing}: use a value in [0, 0.5)")
        target = torch.where(target >= 1, target - label_smoothing, target)  # a soft target already says how sure the votes are
    if loss_type == "sigmoid":
        loss = F.binary_cross_entropy_with_logits(beta * delta, target, reduction="mean")
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the token counts of both sides (chosen_tokens, rejected_tokens)")
        mean_delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        loss = ((mean_delta - (2 * target - 1) / (2 * beta)) ** 2).mean()
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use sigmoid or ipo")
    with torch.no_grad():
        chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
        right = (chosen > rejected)[decisive].float()
        stats = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(), "rewards/margins": (chosen - rejected).mean(),
                 "rewards/accuracies": right.mean() if right.numel() else torch.tensor(float("nan"))}  # fmt: skip
    return loss, stats

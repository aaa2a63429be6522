"""Pure loss functions for reward modeling (and, later, PPO). Only torch; every one is tested
against hand-computed numbers in tests/test_losses.py.
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
) -> torch.Tensor:
    """Mean Bradley-Terry loss −log σ(r_c − r_r − m) over a batch (Ouyang et al. 2022; Llama 2 margin).

    A tie is a soft target of 0.5: −½ log σ(Δ) − ½ log σ(−Δ), with no margin, so the two rewards
    are pulled together. More generally `target` gives P(chosen ≻ rejected) per pair (e.g. the
    share of annotators who preferred it); the margin applies only to decisive pairs (target 1).
    `center_coef` adds c·mean((r_c + r_r)²), which keeps rewards centered on zero
    (Eisenstein et al. 2023). Shapes: all (B,).

    >>> bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item()  # ln 2
    0.6931471824645996
    """
    delta = chosen_rewards - rejected_rewards  # (B,)
    if target is None:
        target = torch.ones_like(delta)
        if tie is not None:
            target = target - 0.5 * tie.to(delta.dtype)
    target = target.to(delta.dtype)
    if margin is not None:
        delta = delta - margin.to(delta.dtype) * (target >= 1)  # ties and soft labels have no margin
    loss = F.binary_cross_entropy_with_logits(delta, target, reduction="mean")
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Share of decisive pairs (ties left out) where the chosen story scores higher. Shape ()."""
    decisive = torch.ones_like(chosen_rewards, dtype=torch.bool) if tie is None else ~tie.bool()
    if not decisive.any():
        return torch.tensor(float("nan"))
    return (chosen_rewards[decisive] > rejected_rewards[decisive]).float().mean()

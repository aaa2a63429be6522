"""Simulated annotators: Bradley-Terry choices on the hidden utility, with human-like noise.

An annotator sees two stories, left and right, and picks one with probability
`P(left) = σ((u_left − u_right) / temperature + left_bias)` (AlpacaFarm-style simulated raters).
Utilities closer than `tie_threshold` get "tie". A careless annotator answers at random part of
the time. The default pool is tuned so that two annotators agree on about 75% of the pairs both
call (non-tie), the inter-rater agreement InstructGPT and Stiennon et al. report for humans.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations

# Tuned on `make` candidates so that default_pool(5) agrees on ~75% of non-tie pairs: temperature
# 0.5 gives 0.80, 0.65 gives 0.75, 0.8 gives 0.72 (2,000 pairs, 8 seeds; see tests/test_storyworld.py).
DEFAULT_TEMPERATURE = 0.65


@dataclass(frozen=True)
class SimAnnotator:
    name: str
    temperature: float = DEFAULT_TEMPERATURE  # higher = noisier
    left_bias: float = 0.0  # added to the logit of the left story
    careless: float = 0.0  # chance of a random answer
    tie_threshold: float = 0.1  # utilities closer than this are a tie
    mark_recall: float = 0.8  # span marks: the chance of marking each flaw the frames show (a careless one marks half as many)

    def choose(self, u_left: float, u_right: float, rng: random.Random) -> str:
        """'left', 'right' or 'tie'."""
        if rng.random() < self.careless:
            return rng.choice(("left", "right"))
        diff = u_left - u_right
        if abs(diff) < self.tie_threshold:
            return "tie"
        p_left = 1.0 / (1.0 + math.exp(-(diff / self.temperature + self.left_bias)))
        return "left" if rng.random() < p_left else "right"


    def rank(self, utilities: list[float], rng: random.Random) -> list[int]:
        """Ranks (1 best; equal ranks tie) for stories of these utilities, in the order given.

        Plackett-Luce on exp(u / temperature): the best is drawn first, then the best of the rest, so
        any two stories are ordered as `choose` would order them, σ((u_i − u_j) / temperature).
        Neighbours in the drawn order whose utilities are closer than `tie_threshold` tie. A careless
        annotator gives a random order part of the time.
        """
        n = len(utilities)
        if rng.random() < self.careless:
            order = rng.sample(range(n), n)
        else:
            left, order = list(range(n)), []
            while left:
                top = max(utilities[i] for i in left)
                weights = [math.exp((utilities[i] - top) / self.temperature) for i in left]
                order.append(left.pop(rng.choices(range(len(left)), weights)[0]))
        ranks, rank = [0] * n, 0
        for k, i in enumerate(order):
            if k == 0 or abs(utilities[i] - utilities[order[k - 1]]) >= self.tie_threshold:
                rank = k + 1
            ranks[i] = rank
        return ranks

    def mark(self, flaws: list[tuple[int, int, str]], rng: random.Random) -> list[tuple[int, int, str]]:
        """The flaws (start, end, label) this annotator notices and marks: each with `mark_recall`."""
        recall = self.mark_recall * (0.5 if self.careless else 1.0)
        return [f for f in flaws if rng.random() < recall]


def default_pool(n: int = 5) -> list[SimAnnotator]:
    """`n` annotators: mostly attentive, one with a left bias and one careless (for n >= 3)."""
    pool = [SimAnnotator(f"sim{i + 1}", temperature=DEFAULT_TEMPERATURE * (0.85 + 0.3 * (i % 3) / 2)) for i in range(n)]
    if n >= 3:
        pool[1] = SimAnnotator("sim2-leftbias", temperature=DEFAULT_TEMPERATURE, left_bias=1.0)
        pool[2] = SimAnnotator("sim3-careless", temperature=DEFAULT_TEMPERATURE * 0.85, careless=0.2)
    return pool


def pairwise_agreement(labels: list[list[str | None]]) -> float:
    """Share of annotator pairs that agree, over comparisons both called (not tie, not missing).

    `labels[c][k]` is annotator k's answer on comparison c, in canonical terms ('a'/'b'/'tie') or None.
    >>> pairwise_agreement([["a", "a", "b"], ["b", "b", None]])
    0.5
    """
    agree = total = 0
    for row in labels:
        called = [x for x in row if x in ("a", "b")]
        for x, y in combinations(called, 2):
            total += 1
            agree += x == y
    return agree / total if total else float("nan")

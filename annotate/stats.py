"""Agreement and quality statistics for the admin page: pure functions over plain data.

* `krippendorff_alpha`: Krippendorff's α (interval metric) over units coded by any number of
  coders, with missing values (Krippendorff, *Content Analysis*, 2004, ch. 11).
* `cohen_kappa`: Cohen's κ for two coders (Cohen, 1960).
* `bradley_terry`: strengths of candidate origins from pairwise outcomes by the MM algorithm
  (Hunter, 2004), ties as half a win each, with bootstrap confidence intervals.
* `annotator_report`: per-annotator counts, speed, gold accuracy, left bias and self-consistency.

For agreement, votes are coded +1 (canonical A better), 0 (tie) and −1 (B better); both-bad is left out.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

CODE = {"a": 1, "tie": 0, "b": -1}  # both_bad is not on this scale and is left out


def krippendorff_alpha(units: Iterable[Sequence[float | None]]) -> float:
    """α for interval data. Each unit lists the coders' values (None = not coded).

    Units with fewer than two values carry no pairing information and are skipped.
    >>> round(krippendorff_alpha([[1, 1], [0, 0], [-1, -1], [1, 0]]), 4)
    0.8205
    """
    coincidence: Counter = Counter()
    for unit in units:
        values = [v for v in unit if v is not None]
        m = len(values)
        if m < 2:
            continue
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            coincidence[(values[i], values[j])] += 1 / (m - 1)
    n = sum(coincidence.values())
    if n <= 1:
        return float("nan")
    marginals: Counter = Counter()
    for (c, _), w in coincidence.items():
        marginals[c] += w
    observed = sum(w * (c - k) ** 2 for (c, k), w in coincidence.items()) / n
    expected = sum(marginals[c] * marginals[k] * (c - k) ** 2 for c in marginals for k in marginals) / (n * (n - 1))
    return 1.0 - observed / expected if expected else float("nan")


def cohen_kappa(first: Sequence, second: Sequence) -> float:
    """κ = (p_o − p_e) / (1 − p_e) for two coders' labels of the same units.

    >>> cohen_kappa(["a", "a", "b", "b"], ["a", "a", "b", "a"])
    0.5
    """
    if len(first) != len(second) or not first:
        return float("nan")
    n = len(first)
    p_o = sum(x == y for x, y in zip(first, second)) / n
    c1, c2 = Counter(first), Counter(second)
    p_e = sum(c1[k] * c2[k] for k in c1) / (n * n)
    return (p_o - p_e) / (1 - p_e) if p_e < 1 else float("nan")


def pairwise_kappas(labels: dict[int, dict[str, object]], min_shared: int = 5) -> dict[tuple[str, str], float]:
    """Cohen's κ for every pair of coders sharing at least `min_shared` units.

    `labels[unit][coder] = label`.
    """
    by_pair: dict[tuple[str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
    for coded in labels.values():
        for x, y in combinations(sorted(coded), 2):
            by_pair[(x, y)][0].append(coded[x])
            by_pair[(x, y)][1].append(coded[y])
    return {pair: cohen_kappa(a, b) for pair, (a, b) in by_pair.items() if len(a) >= min_shared}


def _bt_fit(outcomes: Sequence[tuple[str, str, float]], players: list[str], iterations: int = 200) -> dict[str, float]:
    """MM updates p_i ← W_i / Σ_j n_ij / (p_i + p_j) (Hunter 2004); returns centered log-strengths."""
    wins: Counter = Counter()
    games: Counter = Counter()
    for a, b, score in outcomes:  # score: 1 a wins, 0 b wins, 0.5 tie
        wins[a] += score
        wins[b] += 1 - score
        games[(a, b)] += 1
        games[(b, a)] += 1
    p = {x: 1.0 for x in players}
    for _ in range(iterations):
        new = {}
        for i in players:
            denom = sum(n / (p[i] + p[j]) for (x, j), n in games.items() if x == i)
            new[i] = max(wins[i], 1e-3) / denom if denom else p[i]  # a floor keeps winless players finite
        log_mean = statistics.fmean(math.log(v) for v in new.values())
        p = {k: v / math.exp(log_mean) for k, v in new.items()}
    return {k: math.log(v) for k, v in p.items()}


@dataclass
class Strength:
    name: str
    strength: float  # log-strength, centered: P(i beats j) = σ(s_i − s_j)
    low: float
    high: float
    games: int


def bradley_terry(outcomes: Sequence[tuple[str, str, float]], bootstrap: int = 200, seed: int = 0) -> list[Strength]:
    """Strengths with 95% bootstrap intervals (votes resampled with replacement), best first.

    >>> [round(s.strength, 3) for s in bradley_terry([("x", "y", 1), ("x", "y", 1), ("x", "y", 1), ("y", "x", 1)], 0)]
    [0.549, -0.549]
    """
    players = sorted({a for a, _, _ in outcomes} | {b for _, b, _ in outcomes})
    if len(players) < 2:
        return []
    point = _bt_fit(outcomes, players)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(bootstrap):
        fit = _bt_fit([outcomes[rng.randrange(len(outcomes))] for _ in outcomes], players, iterations=60)
        for k, v in fit.items():
            samples[k].append(v)
    games = Counter(x for a, b, _ in outcomes for x in (a, b))
    out = []
    for k in players:
        s = sorted(samples[k]) or [point[k]]
        out.append(Strength(k, point[k], s[int(0.025 * (len(s) - 1))], s[int(0.975 * (len(s) - 1))], games[k]))
    return sorted(out, key=lambda s: -s.strength)


@dataclass
class VoteFact:
    """What the admin statistics need to know about one vote."""

    annotator: str
    comparison_id: int
    choice: str  # canonical a | b | tie | both_bad
    shown_left: str  # canonical a | b
    time_spent_ms: int | None
    is_repeat: bool = False
    gold_choice: str | None = None


def annotator_report(votes: Iterable[VoteFact]) -> list[dict]:
    """Per annotator: votes, median seconds, gold accuracy, left share, self-consistency on repeats."""
    by: dict[str, list[VoteFact]] = defaultdict(list)
    for v in votes:
        by[v.annotator].append(v)
    rows = []
    for name, vs in sorted(by.items()):
        main = [v for v in vs if not v.is_repeat]
        original = {v.comparison_id: v.choice for v in main}
        repeats = [v for v in vs if v.is_repeat and v.comparison_id in original]
        gold = [v for v in main if v.gold_choice]
        sided = [v for v in vs if v.choice in ("a", "b")]
        times = [v.time_spent_ms / 1000 for v in vs if v.time_spent_ms]
        rows.append(
            {
                "annotator": name,
                "votes": len(main),
                "median_seconds": round(statistics.median(times), 1) if times else None,
                "gold_accuracy": round(sum(v.choice == v.gold_choice for v in gold) / len(gold), 3) if gold else None,
                "gold_votes": len(gold),
                # Share of decisive votes that went to the story shown on the left; 0.5 is unbiased.
                "left_share": round(sum(v.choice == v.shown_left for v in sided) / len(sided), 3) if sided else None,
                "self_consistency": round(sum(v.choice == original[v.comparison_id] for v in repeats) / len(repeats), 3) if repeats else None,
                "repeats": len(repeats),
            }
        )  # fmt: skip
    return rows


def agreement_report(votes: Iterable[VoteFact]) -> dict:
    """Krippendorff's α overall and pairwise Cohen's κ, overall and per annotator (on −1/0/+1)."""
    units: dict[int, dict[str, int]] = defaultdict(dict)
    for v in votes:
        if not v.is_repeat and v.choice in CODE:
            units[v.comparison_id][v.annotator] = CODE[v.choice]
    alpha = krippendorff_alpha(list(u.values()) for u in units.values())
    kappas = pairwise_kappas(units)
    per: dict[str, list[float]] = defaultdict(list)
    for (x, y), k in kappas.items():
        if not math.isnan(k):
            per[x].append(k)
            per[y].append(k)
    finite = [k for k in kappas.values() if not math.isnan(k)]
    return {
        "krippendorff_alpha": None if math.isnan(alpha) else round(alpha, 3),
        "mean_pairwise_kappa": round(statistics.fmean(finite), 3) if finite else None,
        "kappa_per_annotator": {k: round(statistics.fmean(v), 3) for k, v in sorted(per.items())},
        "units_with_2plus_votes": sum(len(u) >= 2 for u in units.values()),
    }


def majority(choices: Iterable[str]) -> str | None:
    """The annotators' majority on one comparison, in canonical terms: a, b or tie (an a-b draw is a tie).

    Both-bad answers are left out; None when nothing else was said.
    >>> majority(["a", "a", "b"]), majority(["a", "b"]), majority(["tie", "tie", "a"]), majority(["both_bad"])
    ('a', 'tie', 'tie', None)
    """
    counts = Counter(c for c in choices if c in CODE)
    if not counts:
        return None
    (top, n), *rest = counts.most_common()
    return "tie" if rest and rest[0][1] == n else top


def model_verdicts(rows: Iterable[tuple[int, str, str | None, dict[str, Sequence[float]]]]) -> tuple[list[dict], dict[str, dict]]:
    """Where the models and the people disagree: per comparison, each signal's pick beside the majority.

    `rows` are (comparison id, item, majority a/b/tie/None, {signal: (score of candidate a, of b)}).
    Returns the table (disagreements first) and, per signal, how often its pick matches a decisive
    majority: {"agree": k, "decided": n, "share": k / n}. Equal scores pick a tie, which never matches.
    """
    table, tally = [], defaultdict(lambda: [0, 0])
    for comparison_id, item, said, scores in rows:
        row = {"comparison": comparison_id, "item": item, "majority": said or "–"}
        disagree = False
        for signal, (score_a, score_b) in sorted(scores.items()):
            pick = "a" if score_a > score_b else "b" if score_b > score_a else "tie"
            row[signal] = pick
            row[f"{signal}_margin"] = round(float(score_a) - float(score_b), 3)
            if said in ("a", "b"):
                tally[signal][0] += pick == said
                tally[signal][1] += 1
                disagree |= pick != said
        row["disagree"] = disagree
        table.append(row)
    table.sort(key=lambda r: (not r["disagree"], r["comparison"]))
    return table, {s: {"agree": k, "decided": n, "share": round(k / n, 3) if n else None} for s, (k, n) in sorted(tally.items())}

"""Agreement and quality statistics for the admin page: vectorized functions over plain data.

* `krippendorff_alpha`: Krippendorff's α (interval metric) over units coded by any number of
  coders, with missing values (Krippendorff, *Content Analysis*, 2004, ch. 11).
* `cohen_kappa`: Cohen's κ for two coders (Cohen, 1960).
* `bradley_terry`: strengths of candidate origins from pairwise outcomes by the MM algorithm
  (Hunter, 2004), ties as half a win each, with bootstrap confidence intervals. Outcomes are first
  counted per (origin, origin, score) cell, so a fit costs the same at 100 votes or 100k, and a
  bootstrap resample of the votes is one multinomial draw over the cells.
* `annotator_report`: per-annotator counts, speed, gold accuracy, left bias and self-consistency.
* `agreement_report`: α and pairwise κ over the votes, in pandas.
* `kendall_tau_b` and `ranking_agreement`: for rank mode, Kendall's τ-b between two annotators'
  rankings of the same stories (Kendall, 1945), averaged over the rank sets and the annotator pairs,
  and α over the pairs the rankings imply (each pair a unit, coded as above).

The votes arrive as `VoteFact`s or as a `votes_frame` (one row per vote), which the app builds
straight from its query. For agreement, votes are coded +1 (canonical A better), 0 (tie) and −1
(B better); both-bad is left out. tests/test_stats.py checks each against hand-computed values and
against peer libraries (`krippendorff`, scikit-learn's `cohen_kappa_score`, `choix`).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields

import numpy as np
import pandas as pd

CODE = {"a": 1, "tie": 0, "b": -1}  # both_bad is not on this scale and is left out


def _alpha_from_counts(counts: np.ndarray, values: np.ndarray) -> float:
    """α from a units × values matrix of how many coders gave each value (rows with < 2 are pairable-free)."""
    counts = counts[counts.sum(1) >= 2].astype(float)
    if not len(counts):
        return float("nan")
    m = counts.sum(1)
    # coincidences o_ck = Σ_u n_uc (n_uk − δ_ck) / (m_u − 1)
    o = np.einsum("uc,uk,u->ck", counts, counts, 1 / (m - 1)) - np.diag((counts / (m - 1)[:, None]).sum(0))
    n = o.sum()
    if n <= 1:
        return float("nan")
    marg = o.sum(1)
    delta = (values[:, None] - values[None, :]) ** 2
    observed = (o * delta).sum() / n
    expected = (np.outer(marg, marg) * delta).sum() / (n * (n - 1))
    return float(1.0 - observed / expected) if expected else float("nan")


def krippendorff_alpha(units: Iterable[Sequence[float | None]]) -> float:
    """α for interval data. Each unit lists the coders' values (None = not coded).

    Units with fewer than two values carry no pairing information and are skipped.
    >>> round(krippendorff_alpha([[1, 1], [0, 0], [-1, -1], [1, 0]]), 4)
    0.8205
    """
    rows = [[v for v in unit if v is not None] for unit in units]
    values = np.array(sorted({v for r in rows for v in r}), dtype=float)
    if not len(values):
        return float("nan")
    index = {v: i for i, v in enumerate(values.tolist())}
    counts = np.zeros((len(rows), len(values)))
    for u, r in enumerate(rows):
        for v in r:
            counts[u, index[float(v)]] += 1
    return _alpha_from_counts(counts, values)


def cohen_kappa(first: Sequence, second: Sequence) -> float:
    """κ = (p_o − p_e) / (1 − p_e) for two coders' labels of the same units.

    >>> cohen_kappa(["a", "a", "b", "b"], ["a", "a", "b", "a"])
    0.5
    """
    if len(first) != len(second) or not len(first):
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
    frame = pd.DataFrame([(u, c, v) for u, coded in labels.items() for c, v in coded.items()], columns=["unit", "coder", "value"])
    return _pairwise_kappas(frame, min_shared)


def _pairwise_kappas(frame: pd.DataFrame, min_shared: int = 5) -> dict[tuple[str, str], float]:
    """κ per coder pair from a (unit, coder, value) frame, one row per coder and unit, with numpy counts."""
    if frame.empty:
        return {}
    units = pd.factorize(frame["unit"])[0]
    coders, names = pd.factorize(frame["coder"].astype(str), sort=True)
    values, uniques = pd.factorize(frame["value"])
    f = pd.DataFrame({"unit": units, "coder": coders, "value": values})
    pairs = f.merge(f, on="unit", suffixes=("_x", "_y"))
    pairs = pairs[pairs["coder_x"].to_numpy() < pairs["coder_y"].to_numpy()]
    if pairs.empty:
        return {}
    C, k = len(names), len(uniques)
    pair = pairs["coder_x"].to_numpy() * C + pairs["coder_y"].to_numpy()
    vx, vy = pairs["value_x"].to_numpy(), pairs["value_y"].to_numpy()
    n = np.bincount(pair, minlength=C * C).astype(float)
    agree = np.bincount(pair, weights=(vx == vy).astype(float), minlength=C * C)
    # Σ_v (count of v by x)(count of v by y), per pair: the chance agreement's numerator
    by_x = np.stack([np.bincount(pair, weights=(vx == v).astype(float), minlength=C * C) for v in range(k)])
    by_y = np.stack([np.bincount(pair, weights=(vy == v).astype(float), minlength=C * C) for v in range(k)])
    keep = np.flatnonzero(n >= max(min_shared, 1))
    n_k = n[keep]
    p_o = agree[keep] / n_k
    p_e = (by_x[:, keep] * by_y[:, keep]).sum(0) / (n_k * n_k)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(p_e < 1, (p_o - p_e) / (1 - p_e), np.nan)
    return {(str(names[i // C]), str(names[i % C])): float(v) for i, v in zip(keep.tolist(), kappa.tolist())}


def _bt_fit(wins: np.ndarray, games: np.ndarray, iterations: int = 200) -> np.ndarray:
    """MM updates p_i ← W_i / Σ_j n_ij / (p_i + p_j) (Hunter 2004) on a wins vector and a games matrix.

    Works on a batch: `wins` (..., P) and `games` (..., P, P). Returns centered log-strengths.
    """
    w = np.maximum(wins, 1e-3)  # a floor keeps winless players finite
    p = np.ones_like(wins, dtype=float)
    for _ in range(iterations):
        denom = (games / (p[..., :, None] + p[..., None, :])).sum(-1)
        new = np.where(denom > 0, w / np.where(denom > 0, denom, 1.0), p)
        p = new / np.exp(np.log(new).mean(-1, keepdims=True))
    return np.log(p)


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
    return bradley_terry_counts(Counter((a, b, float(score)) for a, b, score in outcomes), bootstrap, seed)


def bradley_terry_counts(cells: dict[tuple[str, str, float], int], bootstrap: int = 200, seed: int = 0) -> list[Strength]:
    """`bradley_terry` from outcome counts: {(a, b, score of a): how many votes}, score 1 a won, 0 b won, 0.5 tie."""
    cells = {k: n for k, n in cells.items() if n > 0}
    players = sorted({a for a, _, _ in cells} | {b for _, b, _ in cells})
    if len(players) < 2:
        return []
    index = {x: i for i, x in enumerate(players)}
    ia = np.array([index[a] for a, _, _ in cells])
    ib = np.array([index[b] for _, b, _ in cells])
    score = np.array([s for _, _, s in cells])
    count = np.array(list(cells.values()), dtype=float)
    P = len(players)

    # Each cell's contribution to the wins vector and the games matrix; a batch of vote counts per
    # cell (one row per bootstrap resample) then maps to its tables by two matrix products.
    to_wins = np.zeros((len(count), P))
    np.add.at(to_wins, (np.arange(len(count)), ia), score)
    np.add.at(to_wins, (np.arange(len(count)), ib), 1 - score)
    to_games = np.zeros((len(count), P * P))
    np.add.at(to_games, (np.arange(len(count)), ia * P + ib), 1.0)
    np.add.at(to_games, (np.arange(len(count)), ib * P + ia), 1.0)

    def tables(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return weights @ to_wins, (weights @ to_games).reshape(*weights.shape[:-1], P, P)

    point = _bt_fit(*tables(count))
    samples = np.empty((0, P))
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(int(count.sum()), count / count.sum(), size=bootstrap)  # votes resampled with replacement
        samples = np.sort(_bt_fit(*tables(draws.astype(float)), iterations=60), axis=0)
    games_per = np.zeros(P)
    np.add.at(games_per, ia, count)
    np.add.at(games_per, ib, count)
    out = []
    for i, name in enumerate(players):
        col = samples[:, i] if len(samples) else np.array([point[i]])
        lo, hi = col[int(0.025 * (len(col) - 1))], col[int(0.975 * (len(col) - 1))]
        out.append(Strength(name, float(point[i]), float(lo), float(hi), int(games_per[i])))
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


VOTE_COLUMNS = [f.name for f in fields(VoteFact)]


def votes_frame(votes: Iterable[VoteFact] | pd.DataFrame) -> pd.DataFrame:
    """One row per vote with VoteFact's columns (a frame passes through)."""
    if isinstance(votes, pd.DataFrame):
        return votes
    return pd.DataFrame([astuple(v) for v in votes], columns=VOTE_COLUMNS)


def _round(x, digits: int = 3):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), digits)


def annotator_report(votes: Iterable[VoteFact] | pd.DataFrame) -> list[dict]:
    """Per annotator: votes, median seconds, gold accuracy, left share, self-consistency on repeats."""
    df = votes_frame(votes)
    if df.empty:
        return []
    df = df.assign(is_repeat=df["is_repeat"].astype(bool))
    main = df[~df["is_repeat"]]
    names = sorted(df["annotator"].unique())
    n_main = main.groupby("annotator").size()
    t = df["time_spent_ms"].astype(float)
    secs = (t[t > 0] / 1000).groupby(df.loc[t > 0, "annotator"]).median()
    gold = main[main["gold_choice"].notna() & (main["gold_choice"] != "")]
    gold_n = gold.groupby("annotator").size()
    gold_acc = (gold["choice"] == gold["gold_choice"]).groupby(gold["annotator"]).mean()
    sided = df[df["choice"].isin(["a", "b"])]
    left = (sided["choice"] == sided["shown_left"]).groupby(sided["annotator"]).mean()
    original = main.drop_duplicates(["annotator", "comparison_id"], keep="last")[["annotator", "comparison_id", "choice"]]
    rep = df[df["is_repeat"]].merge(original, on=["annotator", "comparison_id"], suffixes=("", "_original"))
    consistent = (rep["choice"] == rep["choice_original"]).groupby(rep["annotator"]).mean()
    rep_n = rep.groupby("annotator").size()
    rows = []
    for name in names:
        rows.append({
            "annotator": name,
            "votes": int(n_main.get(name, 0)),
            "median_seconds": _round(secs.get(name), 1),
            "gold_accuracy": _round(gold_acc.get(name)),
            "gold_votes": int(gold_n.get(name, 0)),
            # Share of decisive votes that went to the story shown on the left; 0.5 is unbiased.
            "left_share": _round(left.get(name)),
            "self_consistency": _round(consistent.get(name)),
            "repeats": int(rep_n.get(name, 0)),
        })  # fmt: skip
    return rows


def agreement_report(votes: Iterable[VoteFact] | pd.DataFrame) -> dict:
    """Krippendorff's α overall and pairwise Cohen's κ, overall and per annotator (on −1/0/+1)."""
    df = votes_frame(votes)
    coded = df[~df["is_repeat"].astype(bool) & df["choice"].isin(list(CODE))] if not df.empty else df
    coded = coded.drop_duplicates(["comparison_id", "annotator"], keep="last")
    values = np.array([-1.0, 0.0, 1.0])
    if coded.empty:
        alpha, kappas, per_unit = float("nan"), {}, np.zeros(0)
    else:
        code = coded["choice"].map(CODE).to_numpy()
        unit = pd.factorize(coded["comparison_id"])[0]
        counts = np.bincount(unit * 3 + (code + 1), minlength=3 * (unit.max() + 1)).reshape(-1, 3)  # columns −1, 0, +1
        alpha = _alpha_from_counts(counts, values)
        kappas = _pairwise_kappas(pd.DataFrame({"unit": coded["comparison_id"], "coder": coded["annotator"], "value": code}))
        per_unit = counts.sum(1)
    per: dict[str, list[float]] = defaultdict(list)
    for (x, y), k in kappas.items():
        if not math.isnan(k):
            per[x].append(k)
            per[y].append(k)
    finite = [k for k in kappas.values() if not math.isnan(k)]
    return {
        "krippendorff_alpha": None if math.isnan(alpha) else round(alpha, 3),
        "mean_pairwise_kappa": round(float(np.mean(finite)), 3) if finite else None,
        "kappa_per_annotator": {k: round(float(np.mean(v)), 3) for k, v in sorted(per.items())},
        "units_with_2plus_votes": int((per_unit >= 2).sum()),
    }


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b of two rankings of the same items (ties allowed): (C − D) / √((n0 − n1)(n0 − n2)),
    with C and D the concordant and discordant pairs, n0 all pairs, n1 and n2 the pairs tied in x
    and in y. NaN when either ranking ties everything.

    >>> kendall_tau_b([1, 2, 3], [1, 2, 3]), kendall_tau_b([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    >>> round(kendall_tau_b([1, 1, 2], [1, 2, 3]), 4)  # C = 2, D = 0, n0 = 3, n1 = 1, n2 = 0: 2 / √6
    0.8165
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    i, j = np.triu_indices(len(x), 1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0, n1, n2 = len(i), int((sx == 0).sum()), int((sy == 0).sum())
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return float((sx * sy).sum() / denom) if denom else float("nan")


def ranking_agreement(rankings: Iterable[tuple[str, int, dict[int, int]]]) -> dict:
    """Agreement of rankings, given as (annotator, comparison id, {candidate id: rank, 1 best}).

    `mean_kendall_tau`: τ-b for every two annotators who ranked the same set, averaged (NaN pairs,
    where one ranking ties everything, left out). `alpha_implied_pairs`: Krippendorff's α with every
    (set, candidate pair) as a unit, coded +1 (the lower id ranked better), 0 (tie), −1.
    """
    by_set: dict[int, dict[str, dict[int, int]]] = defaultdict(dict)
    for annotator, comparison_id, ranks in rankings:
        by_set[comparison_id][annotator] = {int(k): v for k, v in ranks.items()}
    taus, units = [], []
    for ranked in by_set.values():
        people = sorted(ranked)
        for p, q in ((p, q) for k, p in enumerate(people) for q in people[k + 1 :]):
            ids = sorted(ranked[p])
            if ids == sorted(ranked[q]):
                tau = kendall_tau_b([ranked[p][c] for c in ids], [ranked[q][c] for c in ids])
                if not math.isnan(tau):
                    taus.append(tau)
        ids = sorted(next(iter(ranked.values())))
        for k, a in enumerate(ids):
            for b in ids[k + 1 :]:
                units.append([float(np.sign(r[b] - r[a])) for r in ranked.values() if a in r and b in r])
    alpha = krippendorff_alpha(units) if units else float("nan")
    return {
        "mean_kendall_tau": round(float(np.mean(taus)), 3) if taus else None,
        "alpha_implied_pairs": None if math.isnan(alpha) else round(alpha, 3),
        "sets_with_2plus_rankings": sum(len(r) >= 2 for r in by_set.values()),
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


def majorities(votes: Iterable[VoteFact] | pd.DataFrame) -> dict[int, str]:
    """`majority` of every comparison's non-repeat votes at once: {comparison id: a | b | tie}.

    Comparisons with nothing but both-bad answers are left out, as `majority` gives None for them.
    """
    df = votes_frame(votes)
    if df.empty:
        return {}
    df = df[~df["is_repeat"].astype(bool) & df["choice"].isin(list(CODE))]
    if df.empty:
        return {}
    counts = pd.crosstab(df["comparison_id"], df["choice"])
    arr = counts.to_numpy()
    top = arr.max(1)
    picks = np.where((arr == top[:, None]).sum(1) > 1, "tie", counts.columns.to_numpy()[arr.argmax(1)])
    return dict(zip(counts.index.tolist(), picks.tolist()))


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

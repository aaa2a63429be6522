"""annotate.stats against hand-computed values."""

import math

import numpy as np
import pytest

from annotate.stats import (
    CODE,
    VoteFact,
    agreement_report,
    annotator_report,
    bradley_terry,
    cohen_kappa,
    krippendorff_alpha,
    majorities,
    majority,
    model_verdicts,
)


def test_krippendorff_alpha_by_hand():
    # Units (1,1) (0,0) (-1,-1) (1,0): coincidences o_11=o_00=o_-1-1=2, o_10=o_01=1, n=8,
    # marginals n_1=3, n_0=3, n_-1=2. D_o = 2/8; D_e = (2·9·1 + 2·6·4 + 2·6·1) / (8·7) = 78/56.
    assert krippendorff_alpha([[1, 1], [0, 0], [-1, -1], [1, 0]]) == pytest.approx(1 - (2 / 8) / (78 / 56))
    assert krippendorff_alpha([[1, 1, 1], [-1, -1, None], [0, 0]]) == pytest.approx(1.0)
    assert krippendorff_alpha([[1], [0, None]]) != krippendorff_alpha([[1], [0, None]])  # nan: nothing pairable


def test_cohen_kappa_by_hand():
    # p_o = 3/4; p_e = (2·3 + 2·1)/16 = 1/2; κ = (3/4 − 1/2)/(1/2) = 1/2.
    assert cohen_kappa(list("aabb"), list("aaba")) == pytest.approx(0.5)
    assert cohen_kappa(list("abab"), list("abab")) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(list("aa"), list("aa")))  # no variation: undefined


def test_bradley_terry_by_hand():
    # x beats y 3 times, y beats x once: p_x/p_y = 3, centered log-strengths ±ln(3)/2.
    board = bradley_terry([("x", "y", 1.0)] * 3 + [("x", "y", 0.0)], bootstrap=100)
    assert [b.name for b in board] == ["x", "y"]
    assert board[0].strength == pytest.approx(math.log(3) / 2, abs=1e-3)
    assert board[0].low <= board[0].strength <= board[0].high and board[0].games == 4
    # A tie counts half a win each: 1 win + 2 ties = 2 of 3 → ratio 2.
    tied = bradley_terry([("x", "y", 1.0), ("x", "y", 0.5), ("x", "y", 0.5)], bootstrap=0)
    assert tied[0].strength - tied[1].strength == pytest.approx(math.log(2), abs=1e-3)


def test_annotator_report_by_hand():
    votes = [
        VoteFact("ann", 1, "a", "a", 4000),  # left chosen
        VoteFact("ann", 2, "b", "a", 6000),  # right chosen
        VoteFact("ann", 3, "a", "a", 2000, gold_choice="a"),  # left, gold right
        VoteFact("ann", 4, "tie", "b", None, gold_choice="b"),  # gold wrong
        VoteFact("ann", 1, "a", "b", 3000, is_repeat=True),  # repeat agrees (now chosen on the right)
        VoteFact("ann", 2, "a", "b", 3000, is_repeat=True),  # repeat disagrees
    ]
    (row,) = annotator_report(votes)
    assert row["votes"] == 4 and row["median_seconds"] == 3.0
    assert row["gold_accuracy"] == 0.5 and row["gold_votes"] == 2
    assert row["left_share"] == pytest.approx(round(2 / 5, 3))  # decisive: 1,2,3 + two repeats; left in 1, 3
    assert row["self_consistency"] == 0.5 and row["repeats"] == 2


def test_agreement_report():
    # x and y always agree; z disagrees on two of six comparisons.
    answers = {"x": "abaabt", "y": "abaabt", "z": "abbbbt"}
    votes = [VoteFact(name, c, {"t": "tie"}.get(ch, ch), "a", 1000) for name, row in answers.items() for c, ch in enumerate(row)]
    report = agreement_report(votes)
    assert report["units_with_2plus_votes"] == 6
    kappa = report["kappa_per_annotator"]
    assert kappa["x"] == kappa["y"] > kappa["z"]
    # Pairs: κ(x,y) = 1; κ(x,z) = κ(y,z): p_o = 4/6, p_e = (3·1 + 2·4 + 1·1)/36 = 1/3 → κ = 1/2.
    assert report["mean_pairwise_kappa"] == pytest.approx((1 + 0.5 + 0.5) / 3, abs=1e-3)


def test_majority_and_model_verdicts_by_hand():
    assert [majority(c) for c in (["a", "a", "b"], ["b", "a"], ["tie", "b", "tie"], ["both_bad", "b"], [])] == ["a", "tie", "tie", "b", None]
    rows = [
        (1, "it1", "a", {"human": (0.9, 0.1), "clip": (0.2, 0.3)}),  # human agrees, clip does not
        (2, "it2", "b", {"human": (0.0, 1.0), "clip": (0.5, 0.5)}),  # human agrees, clip scores a tie: no match
        (3, "it3", "tie", {"human": (1.0, 0.0), "clip": (0.1, 0.2)}),  # a tie majority: not counted
        (4, "it4", "a", {"human": (0.2, 0.4), "clip": (0.3, 0.1)}),  # clip agrees, human does not
    ]
    table, tally = model_verdicts(rows)
    assert tally == {"clip": {"agree": 1, "decided": 3, "share": 0.333}, "human": {"agree": 2, "decided": 3, "share": 0.667}}
    assert [r["comparison"] for r in table] == [1, 2, 4, 3]  # disagreements first, then in order
    assert table[0] == {"comparison": 1, "item": "it1", "majority": "a", "clip": "b", "clip_margin": -0.1, "human": "a",
                        "human_margin": 0.8, "disagree": True}  # fmt: skip
    assert table[-1]["disagree"] is False and table[1]["clip"] == "tie"


# ------------------------------------------------------------------------------------------------
# Against peer libraries no one here wrote, on random data with missing values.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_krippendorff_alpha_matches_the_krippendorff_package(seed):
    krippendorff = pytest.importorskip("krippendorff")
    import numpy as np

    rng = np.random.default_rng(seed)
    data = rng.choice([-1.0, 0.0, 1.0], size=(6, 80), p=[0.3, 0.2, 0.5])  # coders × units
    data[rng.random(data.shape) < 0.55] = np.nan  # most units coded by a few coders only
    ours = krippendorff_alpha([[None if np.isnan(v) else v for v in data[:, u]] for u in range(data.shape[1])])
    assert ours == pytest.approx(krippendorff.alpha(reliability_data=data, level_of_measurement="interval"), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_cohen_kappa_and_the_pairwise_table_match_scikit_learn(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    import random

    rng = random.Random(seed)
    first = [rng.choice("abt") for _ in range(60)]
    second = [x if rng.random() < 0.6 else rng.choice("abt") for x in first]
    assert cohen_kappa(first, second) == pytest.approx(sklearn_metrics.cohen_kappa_score(first, second), abs=1e-12)
    # The report's pairwise κ: three annotators, each missing some units.
    votes, by = [], {}
    for unit in range(120):
        truth = rng.choice("ab")
        for name in ("ann", "bob", "cyd"):
            if rng.random() < 0.75:
                choice = truth if rng.random() < 0.7 else rng.choice(["a", "b", "tie"])
                votes.append(VoteFact(name, unit, choice, "a", 1000))
                by.setdefault(unit, {})[name] = CODE[choice]
    report = agreement_report(votes)
    for name in ("ann", "bob", "cyd"):
        others = [o for o in ("ann", "bob", "cyd") if o != name]
        expected = []
        for other in others:
            shared = [u for u in by if name in by[u] and other in by[u]]
            expected.append(sklearn_metrics.cohen_kappa_score([by[u][name] for u in shared], [by[u][other] for u in shared]))
        assert report["kappa_per_annotator"][name] == pytest.approx(sum(expected) / 2, abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_bradley_terry_matches_choix(seed):
    choix = pytest.importorskip("choix")
    import random

    rng = random.Random(seed)
    truth = {"m0": 0.8, "m1": 0.2, "m2": -0.3, "m3": -0.7}
    names = sorted(truth)
    outcomes, data = [], []
    for _ in range(400):
        a, b = rng.sample(names, 2)
        a_wins = rng.random() < 1 / (1 + math.exp(truth[b] - truth[a]))
        outcomes.append((a, b, 1.0 if a_wins else 0.0))
        data.append((names.index(a), names.index(b)) if a_wins else (names.index(b), names.index(a)))
    ours = {s.name: s.strength for s in bradley_terry(outcomes, bootstrap=0)}
    theirs = choix.ilsr_pairwise(len(names), data, alpha=0.0)  # the maximum-likelihood strengths, mean zero
    for i, name in enumerate(names):
        assert ours[name] == pytest.approx(theirs[i] - theirs.mean(), abs=1e-3)


def test_majorities_agree_with_majority_comparison_by_comparison():
    import random

    rng = random.Random(3)
    votes = [VoteFact(f"u{k}", c, rng.choice(["a", "b", "tie", "both_bad"]), "a", None, is_repeat=rng.random() < 0.1)
             for c in range(200) for k in range(rng.randint(1, 4))]  # fmt: skip
    by: dict[int, list[str]] = {}
    for v in votes:
        if not v.is_repeat:
            by.setdefault(v.comparison_id, []).append(v.choice)
    expected = {c: majority(ch) for c, ch in by.items() if majority(ch) is not None}
    assert majorities(votes) == expected and len(expected) > 100


def test_kendall_tau_b_by_hand_and_against_scipy():
    from scipy.stats import kendalltau

    from annotate.stats import kendall_tau_b

    # x = [1, 2, 3, 4], y = [2, 1, 4, 3]: C = 4, D = 2, no ties → (4 − 2) / 6
    assert kendall_tau_b([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(1 / 3)
    # ties in both: x = [1, 1, 2, 3], y = [1, 2, 2, 3]: C = 4, D = 0, n1 = n2 = 1 → 4 / 5
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(1, 4, 6), rng.integers(1, 5, 6)
        expected = kendalltau(x, y).statistic  # τ-b is scipy's default variant
        got = kendall_tau_b(x, y)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_ranking_agreement_over_sets_and_implied_pairs():
    import krippendorff

    from annotate.stats import ranking_agreement

    rankings = [
        ("u0", 1, {10: 1, 11: 2, 12: 3}), ("u1", 1, {10: 1, 11: 2, 12: 3}), ("u2", 1, {10: 3, 11: 2, 12: 1}),
        ("u0", 2, {20: 1, 21: 1, 22: 2}), ("u1", 2, {20: 1, 21: 2, 22: 3}),
        ("u0", 3, {30: 1, 31: 2}),  # one ranking only: no pair of annotators, one-coder units
    ]  # fmt: skip
    report = ranking_agreement(rankings)
    # set 1: τ(u0, u1) = 1, τ(u0, u2) = τ(u1, u2) = −1; set 2: τ-b = 2 / √6 (u0 ties 20 and 21)
    assert report["mean_kendall_tau"] == pytest.approx(round((1 - 1 - 1 + 2 / math.sqrt(6)) / 4, 3))
    assert report["sets_with_2plus_rankings"] == 2
    # α over implied pairs, against the krippendorff package: units (set, pair) × coders u0, u1, u2
    nan = np.nan
    data = np.array([
        # (10,11) (10,12) (11,12) (20,21) (20,22) (21,22) (30,31)
        [1, 1, 1, 0, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, nan],
        [-1, -1, -1, nan, nan, nan, nan],
    ])  # fmt: skip
    assert report["alpha_implied_pairs"] == pytest.approx(krippendorff.alpha(reliability_data=data, level_of_measurement="interval"), abs=1e-3)

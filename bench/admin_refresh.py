"""Benchmark: one Admin-tab refresh at 100k votes, cold and cached, with where the time goes.

    python bench/admin_refresh.py [--votes 100000] [--rounds 3] [--out bench/out/admin-refresh.json]

The database (SQLite) is a campaign: bench/export.py's 10k items with 4 candidate origins each (60k
comparisons), and 100k votes from 60 annotators, 3 per comparison (overlap 3), 3% of them
position-swapped repeats, 2% of comparisons gold; annotators differ in accuracy and left bias. `LabelingApp.admin_refresh` runs as the app runs it for an admin: the vote query, the
per-annotator table, Krippendorff's α and pairwise Cohen's κ, the Bradley–Terry leaderboard with
200 bootstrap resamples, and the model-verdict table. "Cold" clears the cache first (the first
refresh after new votes); "cached" is a second refresh with no vote in between. Target: cold ≤ 2 s.
`--code DIR` times another checkout's app on the same database (e.g. a `git worktree` of an older
commit, for the before/after ratio); only its `admin_refresh` is called.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotate.ui import LabelingApp  # noqa: E402
from bench.export import seed  # noqa: E402
from db import Annotator, open_db  # noqa: E402


def campaign(factory, n_votes: int, n_annotators: int = 60, overlap: int = 3, seed: int = 0) -> None:
    """Votes as a labeling campaign leaves them (see the module docstring)."""
    import random

    from sqlalchemy import insert, select, update

    from db import Comparison, Vote

    rng = random.Random(seed)
    with factory.begin() as s:
        s.execute(insert(Annotator), [{"username": f"campaign{i}", "password_hash": None} for i in range(n_annotators)])
        people = list(s.scalars(select(Annotator.id).where(Annotator.username.like("campaign%"))))
        skill = {a: rng.uniform(0.55, 0.95) for a in people}
        left = {a: rng.choice([0.5] * 8 + [0.8, 0.95]) for a in people}
        comps = list(s.scalars(select(Comparison.id)))
        rng.shuffle(comps)
        truth = {c: rng.choice("ab") for c in comps}
        gold = set(comps[: len(comps) // 50])
        s.execute(update(Comparison), [{"id": c, "gold_choice": truth[c]} for c in gold])
        rows, k = [], 0
        for c in comps:
            for a in rng.sample(people, overlap):
                if len(rows) >= n_votes:
                    break
                shown_left = rng.choice("ab")
                r = rng.random()
                choice = ("tie" if r < 0.08 else shown_left if rng.random() < left[a] - 0.5 else
                          truth[c] if rng.random() < skill[a] else "ba"[("ab").index(truth[c])])  # fmt: skip
                rows.append({"comparison_id": c, "annotator_id": a, "choice": choice, "strength": rng.randint(1, 4), "aspects": {},
                             "shown_left": shown_left, "client_token": f"c{k}", "time_spent_ms": rng.randint(2000, 60000),
                             "is_repeat": False})  # fmt: skip
                k += 1
                if rng.random() < 0.03 and len(rows) < n_votes:  # a position-swapped repeat of the same answer, mostly
                    again = choice if rng.random() < 0.8 else rng.choice(["a", "b", "tie"])
                    rows.append({**rows[-1], "choice": again, "shown_left": "ba"[("ab").index(shown_left)], "client_token": f"c{k}",
                                 "is_repeat": True})  # fmt: skip
                    k += 1
        s.execute(insert(Vote), rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--votes", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/out/admin-refresh.json"))
    p.add_argument("--code", type=Path, help="also time the app of this checkout (an older commit's worktree) on the same database")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="storypref-admin-"))
    url = f"sqlite:///{tmp}/bench.db"
    _, factory = open_db(url)
    t0 = time.perf_counter()
    seed(factory, 10_000, 0, str(tmp / "media"))
    campaign(factory, args.votes)
    print(f"seeded {args.votes:,} votes in {time.perf_counter() - t0:.1f} s", flush=True)
    with factory.begin() as s:
        s.get(Annotator, 1).role = "admin"
        admin = s.get(Annotator, 1).username
    app = LabelingApp(factory, "bench", tmp / "media")
    request = type("R", (), {"username": admin})()
    cold, cached, phases = [], [], []
    for _ in range(args.rounds):
        app.clear_stats_cache()
        t = time.perf_counter()
        out = app.admin_refresh(request)
        cold.append(time.perf_counter() - t)
        phases.append(dict(app.last_refresh_seconds))
        t = time.perf_counter()
        app.admin_refresh(request)
        cached.append(time.perf_counter() - t)
    people, summary = out[0], out[1]
    report = {"date": time.strftime("%Y-%m-%d"), "votes": args.votes, "annotators": len(people), "cold_s": [round(x, 3) for x in cold],
              "cold_median_s": round(statistics.median(cold), 3), "cached_median_s": round(statistics.median(cached), 4),
              "phases_s": {k: round(statistics.median(ph[k] for ph in phases), 3) for k in phases[0]}, "summary": summary[:200]}  # fmt: skip
    if args.code:  # the other checkout's app, in its own process, on the same database
        import subprocess

        script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from annotate.ui import LabelingApp; "
                  "from db import open_db; _, f = open_db(sys.argv[2]); app = LabelingApp(f, 'bench', Path(sys.argv[3])); "
                  "r = type('R', (), {'username': sys.argv[4]})(); ts = []\n"
                  "for _ in range(int(sys.argv[5])):\n    t = time.perf_counter(); app.admin_refresh(r); ts.append(time.perf_counter() - t)\n"
                  "print(sorted(ts)[len(ts) // 2])")  # fmt: skip
        run = subprocess.run([sys.executable, "-c", script, str(args.code.resolve()), url, str(tmp / "media"), admin, str(args.rounds)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        report["other_code"] = str(args.code)
        report["other_code_median_s"] = round(float(run.stdout.strip().splitlines()[-1]), 3)
        report["ratio_vs_other_code"] = round(report["cold_median_s"] / report["other_code_median_s"], 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

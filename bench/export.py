"""Benchmark: `annotate.export` against the obvious pandas way, in one run, on the same rows.

    python bench/export.py [--db URL] [--items 10000] [--votes 100000] [--repeats 5]

Seeds a database with 10k items, 40k candidates and 100k votes (bulk inserts, once), then times,
alternately, our pairs export (per vote) and pandas (`read_sql` of the same joins, images grouped
per item, `to_json(orient="records", lines=True)`). Both must write the same rows. Prints medians,
votes/s and the ratio; the figures go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from sqlalchemy import insert, select, update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotate.export import PREFERENCE, export  # noqa: E402
from db import Annotator, Candidate, Comparison, Item, ItemImage, Project, Vote, open_db, set_meta  # noqa: E402


def seed(session_factory, n_items: int, n_votes: int, media_root: str) -> None:
    rng = random.Random(0)
    with session_factory.begin() as s:
        set_meta(s, "media_root", media_root)
        project = Project(name="bench")
        s.add(project)
        s.flush()
        s.execute(insert(Annotator), [{"username": f"ann{i}", "password_hash": None} for i in range(20)])
        s.execute(insert(Item), [{"project_id": project.id, "source": "bench", "external_id": f"it{i}",
                                  "instruction": "Tell a story about these images.", "style": "calm", "meta": {}}
                                 for i in range(n_items)])  # fmt: skip
        item_ids = list(s.scalars(select(Item.id).order_by(Item.id)))
        s.execute(insert(ItemImage), [{"item_id": it, "position": k, "sha256": f"{it:060d}{k:04d}", "path": f"aa/{it}_{k}.png",
                                       "width": 128, "height": 96} for it in item_ids for k in range(1 + it % 3)])  # fmt: skip
        story = "Peacefully, one sunny day in the forest, Pip the red circle rested quietly. " * 3
        s.execute(insert(Candidate), [{"item_id": it, "text": f"{story} ({it}-{c})", "text_sha256": f"{it}-{c}", "origin": f"m{c}",
                                       "gen_params": {}} for it in item_ids for c in range(4)])  # fmt: skip
        cands = {}
        for cid, it in s.execute(select(Candidate.id, Candidate.item_id).order_by(Candidate.id)):
            cands.setdefault(it, []).append(cid)
        s.execute(insert(Comparison), [{"project_id": project.id, "item_id": it, "candidate_a_id": a, "candidate_b_id": b, "n_votes": 0}
                                       for it, cs in cands.items() for i, a in enumerate(cs) for b in cs[i + 1:]])  # fmt: skip
        comps = list(s.scalars(select(Comparison.id)))
        annotators = list(s.scalars(select(Annotator.id)))
        rows, k = [], 0
        while len(rows) < n_votes:
            comp = comps[k % len(comps)]
            ann = annotators[(k // len(comps)) % len(annotators)]
            rows.append({"comparison_id": comp, "annotator_id": ann, "choice": rng.choice("aab") if rng.random() > 0.1 else "tie",
                         "strength": rng.randint(1, 4), "aspects": {}, "shown_left": rng.choice("ab"), "client_token": f"t{k}"})  # fmt: skip
            k += 1
        if rows:  # an empty insert would add one row of defaults
            s.execute(insert(Vote), rows)
        per_comparison = Counter(r["comparison_id"] for r in rows)
        s.execute(update(Comparison), [{"id": c, "n_votes": n} for c, n in per_comparison.items()])


PANDAS_SQL = """
SELECT v.id AS vote_id, v.choice, v.strength, v.aspects, v.shown_left, an.username AS annotator,
       c.id AS comparison_id, c.item_id, i.external_id, i.instruction, i.style, i.context,
       ca.text AS response_a, cb.text AS response_b
FROM vote v
JOIN comparison c ON v.comparison_id = c.id
JOIN item i ON c.item_id = i.id
JOIN candidate ca ON c.candidate_a_id = ca.id
JOIN candidate cb ON c.candidate_b_id = cb.id
JOIN annotator an ON v.annotator_id = an.id
WHERE v.active AND NOT v.is_repeat AND v.choice IN ('a', 'b')
ORDER BY c.id, v.id
"""


def pandas_export(engine, out: Path, media_root: str) -> int:
    df = pd.read_sql(PANDAS_SQL, engine)
    images = pd.read_sql("SELECT item_id, path FROM item_image ORDER BY item_id, position", engine)
    images["path"] = media_root + "/" + images["path"]
    paths = images.groupby("item_id")["path"].agg(list)
    df["image_paths"] = df["item_id"].map(paths)
    df["image_path"] = df["image_paths"].str[0]
    df["preference"] = df["choice"].map(PREFERENCE)
    df["aspects"] = df["aspects"].map(lambda a: a if isinstance(a, dict) else json.loads(a))
    df["item_id"] = df["external_id"]
    cols = ["image_paths", "image_path", "instruction", "response_a", "response_b", "preference", "strength",
            "aspects", "item_id", "comparison_id", "annotator", "shown_left", "style"]  # fmt: skip
    df[cols].to_json(out, orient="records", lines=True, force_ascii=False)
    return len(df)


def row_keys(path: Path) -> list[tuple]:
    return sorted((d["comparison_id"], d["annotator"], d["preference"], d["response_a"][-12:]) for d in map(json.loads, path.open()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default=None, help="database URL (default: a fresh SQLite file in a temp dir)")
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--votes", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    url = args.db or f"sqlite:///{tmp}/bench.db"
    engine, factory = open_db(url)
    media_root = str(tmp / "media")
    t0 = time.perf_counter()
    seed(factory, args.items, args.votes, media_root)
    print(f"seeded {args.items} items, {4 * args.items} candidates, {args.votes} votes in {time.perf_counter() - t0:.1f}s ({url})")

    ours, theirs = [], []
    for _ in range(args.repeats):  # alternate, so drift on a noisy machine hits both alike
        t0 = time.perf_counter()
        with factory() as s:
            stats = export(s, tmp / "ours.jsonl", "pairs")
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        n = pandas_export(engine, tmp / "pandas.jsonl", media_root)
        theirs.append(time.perf_counter() - t0)
    assert stats.rows == n, (stats.rows, n)
    assert row_keys(tmp / "ours.jsonl") == row_keys(tmp / "pandas.jsonl"), "exports differ"
    m_ours, m_pd = statistics.median(ours), statistics.median(theirs)
    result = {
        "rows": n,
        "ours_median_s": round(m_ours, 3),
        "pandas_median_s": round(m_pd, 3),
        "ours_votes_per_s": round(n / m_ours),
        "pandas_votes_per_s": round(n / m_pd),
        "speedup_vs_pandas": round(m_pd / m_ours, 2),
        "backend": engine.dialect.name,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

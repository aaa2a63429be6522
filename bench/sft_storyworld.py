"""Benchmark: SFT of storyworld's starting policy (`--init tiny-vit-gpt2`) on the CPU.

    python bench/sft_storyworld.py [--items 1500] [--epochs 8] [--out bench/out/sft-storyworld]

Makes a world, trains tiny-vit-gpt2 from scratch on its `sft.jsonl`, and scores greedy stories on
held-out scenes with the hidden utility: the untrained model (before), the SFT policy (after), and
the SFT data's own stories (the ceiling it imitates). Also reports the time. Writes report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def utility(world: Path, rows: list[dict], out: Path) -> dict:
    from storyworld.world import score_stories

    out.write_text("".join(json.dumps({"item_id": r["item_id"], "story": r["story"]}) + "\n" for r in rows))
    s = score_stories(world, out)
    return {"mean_utility": s["mean_utility"], **{k: v for k, v in s["mean"].items() if k != "utility"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--held-out", type=int, default=100, help="scenes scored before and after")
    p.add_argument("--out", type=Path, default=Path("bench/out/sft-storyworld"))
    args = p.parse_args()
    from rlhf.policy import load_policy
    from rlhf.sft import SFTConfig, sample_stories, split_examples, train
    from rlhf.stories import read_examples
    from storyworld.world import make_world

    args.out.mkdir(parents=True, exist_ok=True)
    world = make_world(args.out / "world", args.items, seed=0)
    cfg = SFTConfig(data=str(world / "sft.jsonl"), init="tiny-vit-gpt2", output_dir=str(args.out / "sft"), epochs=args.epochs,
                    eval_fraction=args.held_out / args.items, samples=args.held_out)  # fmt: skip
    t0 = time.perf_counter()
    policy, metrics = train(cfg)
    minutes = (time.perf_counter() - t0) / 60
    _, held = split_examples(read_examples(cfg.data, need_story=True), cfg.eval_fraction, cfg.seed)
    before = sample_stories(load_policy(str(args.out / "sft" / "init")), held, cfg.max_new_tokens)
    after = [json.loads(x) for x in (args.out / "sft" / "samples.jsonl").open()]
    report = {
        "items": args.items, "epochs": args.epochs, "held_out": len(held), "sft_minutes": round(minutes, 2),
        "eval_loss": metrics["eval_loss"],
        "before": utility(world, before, args.out / "before.jsonl"),
        "after": utility(world, after, args.out / "after.jsonl"),
        "sft_data": utility(world, [{"item_id": e.item_id, "story": e.story} for e in held], args.out / "data.jsonl"),
        "examples": after[:3],
    }  # fmt: skip
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

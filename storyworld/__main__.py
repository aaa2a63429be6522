"""python -m storyworld {make, annotate, score, train-clip, train-vit}: the synthetic world from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _frames(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i <= 8:
        raise argparse.ArgumentTypeError("--frames takes N or LO-HI within 1-8, e.g. 1-4, 5-8 or 3")
    return lo_i, hi_i


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m storyworld",
        description="A synthetic world of visual stories with a hidden human preference (docs/storyworld.md).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    make = sub.add_parser("make", help="render scenes and write items.jsonl, sft.jsonl and world.jsonl")
    make.add_argument("--out", required=True, type=Path, help="directory to write the world into")
    make.add_argument("--items", type=int, default=100, help="number of items (scenes)")
    make.add_argument("--seed", type=int, default=0, help="the same seed always makes the same world")
    make.add_argument("--frames", type=_frames, default=(1, 4), help="frames per scene: N or LO-HI, up to 8 (default 1-4; 5-8 for next-frame windows)")
    make.add_argument("--frame-tags", action="store_true",
                      help="mark each frame's sentences of the SFT stories with <gdi imageN> (StoryReasoning's schema), so --window K cuts them at the frames")
    make.add_argument("--image-size", type=_size, default=(128, 96), help="frame size WxH (default 128x96)")

    ann = sub.add_parser(
        "annotate",
        help="simulated annotators vote: into a pairs JSONL (--out), or through the running app (--app)",
    )
    ann.add_argument("--world", required=True, type=Path, help="a directory written by `make`")
    where = ann.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="pairs JSONL to write (one line per vote)")
    where.add_argument("--app", help="URL of a running labeling app to vote through, e.g. http://127.0.0.1:7860")
    ann.add_argument("--users", type=Path, help="with --app: a file of name:password lines, one account each")
    ann.add_argument("--votes-per-user", type=int, default=50, help="with --app: votes per account")
    ann.add_argument("--pairs-per-item", type=int, default=None, help="sample K of the 6 pairs per item (default all)")
    ann.add_argument("--annotators", type=int, default=5, help="size of the simulated pool")
    ann.add_argument("--votes-per-pair", type=int, default=3, help="annotators per pair")
    ann.add_argument("--marks", action="store_true", help="--out: each voter also marks the flaws it notices (span marks, as export writes them)")
    ann.add_argument("--seed", type=int, default=0)

    score = sub.add_parser("score", help="print the hidden utility of stories (JSON)")
    score.add_argument("--world", required=True, type=Path)
    score.add_argument("--stories", required=True, type=Path, help="JSONL with item_id and story (or text)")

    clip = sub.add_parser("train-clip", help="train a tiny open_clip model on the world's frames and captions")
    clip.add_argument("--world", required=True, type=Path)
    clip.add_argument("--out", required=True, type=Path, help="directory for open_clip_config.json and weights")
    clip.add_argument("--epochs", type=int, default=8)
    clip.add_argument("--batch-size", type=int, default=128)
    clip.add_argument("--lr", type=float, default=2e-3)
    clip.add_argument("--max-minutes", type=float, default=5.0, help="stop training after this long")
    clip.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=True,
                      help="also contrast each frame with its caption with one color, shape, setting or time swapped")  # fmt: skip
    clip.add_argument("--fresh-scenes", type=int, default=0,
                      help="also train on the frames of this many new random scenes (4000 with --epochs 6: color 0.56-0.60, shape 0.22-0.33, against 0.45, 0.25)")
    clip.add_argument("--zoom", type=float, default=0.0,
                      help="share of training views that are a crop around the captioned shape (0 to 1), so small shapes fill the view")  # fmt: skip
    clip.add_argument("--look-weight", type=float, default=0.0,
                      help="weight of a supervised term: one linear head reads the color-shape pairs in view from both towers (1 with --fresh-scenes 4000 --epochs 6: shape 0.47, color 0.70)")  # fmt: skip
    clip.add_argument("--seed", type=int, default=0)

    vit = sub.add_parser("train-vit", help="pretrain the tiny ViT of rlhf.sft --init tiny-vit-gpt2 on the world's frames "
                                           "(then pass it as --vision_encoder)")  # fmt: skip
    vit.add_argument("--world", required=True, type=Path)
    vit.add_argument("--out", required=True, type=Path, help="directory for the Hugging Face ViTModel and image processor")
    vit.add_argument("--max-minutes", type=float, default=1.5, help="stop training after this long")
    vit.add_argument("--max-steps", type=int, default=2000)
    vit.add_argument("--lr", type=float, default=1e-3)
    vit.add_argument("--fresh-scenes", type=int, default=0,
                     help="also train on the frames of this many new random scenes: the world's own frames are too few to "
                          "learn shapes from (4000 with --max-steps 1000 --max-minutes 8: shape 0.53 against 0.22, chance 0.21)")  # fmt: skip
    vit.add_argument("--patch-weight", type=float, default=1.0,
                     help="weight of the dense loss that teaches each patch token which look is drawn there (0: off; the "
                          "frame's labels alone teach colors but hardly shapes)")  # fmt: skip
    vit.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make":
        from storyworld.world import make_world

        start = time.perf_counter()
        make_world(args.out, args.items, seed=args.seed, frames=args.frames, image_size=args.image_size, progress=True, frame_tags=args.frame_tags)
        print(f"wrote {args.items} items to {args.out} in {time.perf_counter() - start:.1f}s")
        print(f"next: python -m annotate.ingest {args.out / 'items.jsonl'} --project storyworld")
    elif args.command == "annotate" and args.app:
        from storyworld.app_client import annotate_app

        if not args.users:
            print("error: --app needs --users FILE (name:password lines)", file=sys.stderr)
            return 2
        stats = annotate_app(args.world, args.app, args.users, args.votes_per_user, args.seed)
        print(json.dumps(stats, indent=1))
        return 1 if stats["errors"] else 0
    elif args.command == "annotate":
        from storyworld.world import annotate_world

        stats = annotate_world(args.world, args.out, args.pairs_per_item, args.annotators, args.votes_per_pair, args.seed, marks=args.marks)
        print(f"wrote {stats['votes']} votes ({stats['ties']} ties) by {', '.join(stats['annotators'])} to {args.out}")
    elif args.command == "score":
        from storyworld.world import score_stories

        print(json.dumps(score_stories(args.world, args.stories), indent=1))
    elif args.command == "train-vit":
        from storyworld.vision import train_vit

        report = train_vit(args.world, args.out, lr=args.lr, max_minutes=args.max_minutes, max_steps=args.max_steps, seed=args.seed,
                           fresh_scenes=args.fresh_scenes, patch_weight=args.patch_weight)  # fmt: skip
        print(json.dumps(report, indent=1))
        print(f"next: python -m rlhf.sft --init tiny-vit-gpt2 --vision_encoder {args.out} --data {args.world / 'sft.jsonl'}")
    else:
        from storyworld.clip import train_clip

        report = train_clip(args.world, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            max_minutes=args.max_minutes, seed=args.seed, hard_negatives=args.hard_negatives,
                            fresh_scenes=args.fresh_scenes, zoom=args.zoom, look_weight=args.look_weight)  # fmt: skip
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

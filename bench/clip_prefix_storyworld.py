"""Benchmark: the clip-prefix family on next-frame windows (K = 4) of long storyworld scenes: SFT, then DPO.

    python bench/clip_prefix_storyworld.py --out bench/out/clip-prefix --worlds 91,92,93 --seeds 2
    python bench/clip_prefix_storyworld.py --smoke --out /tmp/cp-smoke                  (a few minutes)

Per world, what a user of StoryReasoning-style data would run, on `storyworld make --frames 5-8
--frame-tags` (scenes of 5-8 frames; SFT stories tagged per frame, so windows cut at the frames):

1. `storyworld train-clip` on the world: the frozen CLIP the policy reads;
2. `rlhf.sft --init tiny-clip-prefix --window 4`: the family from scratch, on the training stories'
   windows (held-out stories are never seen: the split is by story);
3. `rlhf.generate --window 4`: 4 next parts per training window from the SFT policy;
4. simulated annotators vote on every pair of them, by the hidden utility of the part (the utility
   of the part as a story of its target frame alone, `storyworld.world.window_scene`); in --smoke,
   whose policy writes word salad that ties, the data's own part joins each window's candidates;
5. `annotate.ingest` and `annotate.export` (majority), then `rlhf.dpo` on the export (conservative
   DPO, β 0.1, ε 0.1, one epoch), `--seeds` seeds.

On the held-out windows, greedy next parts of the SFT and DPO policies are scored with the hidden
utility: the win rate of DPO over SFT (ties half), the mean utility of each and of the reference
parts, and CLIPScore against the target frame and against all K+1 frames (with the world's tiny
CLIP: the policy's own CLIP, so read it as a consistency check, not an independent judge). Writes
DIR/world-W/report.json per world and DIR/report.json with medians over the worlds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WINDOW = 4
FULL = {"items": 400, "held_out": 60, "clip_epochs": 8, "sft_epochs": 10, "per_item": 4, "temperature": 0.7, "dpo_epochs": 1, "dpo_lr": 5e-4,
        "max_new_tokens": 48, "reference_candidate": False}  # fmt: skip
SMOKE = {"items": 40, "held_out": 8, "clip_epochs": 1, "sft_epochs": 2, "per_item": 3, "temperature": 1.0, "dpo_epochs": 1, "dpo_lr": 5e-4,
         "max_new_tokens": 24, "reference_candidate": True}  # fmt: skip


def part_utility(world: dict, item_id: str, text: str) -> float:
    """The hidden utility of a next part `text` for window `item_id` (ID/T)."""
    from storyworld.utility import components
    from storyworld.world import window_scene

    scene, style = window_scene(world, item_id)
    return components(scene, text, style).utility


def clip_scores(features, examples, parts: list[str]) -> dict[str, float]:
    """Mean CLIPScore of each part against its target frame (the window's last image) and against all of the window's frames."""
    from annotate.formats import plain_text
    from rlhf.clip import clip_score

    plain = [plain_text(p) for p in parts]
    target = clip_score(features, [[e.images[-1]] for e in examples], plain)
    every = clip_score(features, [e.images for e in examples], parts)
    return {"clip_score_target_frame": round(target.mean().item(), 4), "clip_score_all_frames": round(every.mean().item(), 4)}


def run_world(seed: int, out: Path, s: dict, dpo_seeds: int) -> dict:
    from accelerate.state import AcceleratorState

    from annotate.export import export
    from annotate.ingest import ingest
    from db import open_db
    from rlhf.clip import ClipFeatures
    from rlhf.dpo import DPOConfig
    from rlhf.dpo import train as dpo
    from rlhf.generate import GenerateConfig
    from rlhf.generate import main as generate
    from rlhf.policy import load_policy
    from rlhf.sft import SFTConfig, sample_stories, split_examples
    from rlhf.sft import train as sft
    from rlhf.stories import read_examples
    from storyworld import annotate_world, make_world
    from storyworld.clip import train_clip

    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"world": seed, **s, "window": WINDOW, "date": time.strftime("%Y-%m-%d"), "minutes": {}}
    t0 = time.perf_counter()

    def done(phase: str) -> None:
        nonlocal t0
        report["minutes"][phase] = round((time.perf_counter() - t0) / 60, 2)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        AcceleratorState._reset_state(True)
        t0 = time.perf_counter()

    # 1. The world (scenes of 5-8 frames, SFT stories tagged per frame) and its tiny CLIP.
    world_dir = (out / "world").resolve()
    make_world(world_dir, s["items"], seed=seed, frames=(5, 8), frame_tags=True)
    report["clip"] = train_clip(world_dir, out / "clip", epochs=s["clip_epochs"], max_minutes=6)
    world = {json.loads(x)["external_id"]: json.loads(x) for x in (world_dir / "world.jsonl").open()}
    fraction = s["held_out"] / s["items"]
    windows = read_examples(str(world_dir / "sft.jsonl"), need_story=True, window=WINDOW)
    train_windows, held = split_examples(windows, fraction, seed)  # the split rlhf.sft makes: by story
    report["windows"] = {"train": len(train_windows), "held_out": len(held)}
    done("make_and_clip")

    # 2. SFT from scratch on the windows.
    sft_dir = out / "sft"
    _, metrics = sft(SFTConfig(data=str(world_dir / "sft.jsonl"), window=WINDOW, init="tiny-clip-prefix", clip_model=str(out / "clip"),
                               output_dir=str(sft_dir), epochs=s["sft_epochs"], eval_fraction=fraction, samples=0, seed=seed))  # fmt: skip
    report["sft"] = {k: metrics[k] for k in ("eval_loss", "train_examples", "eval_examples", "trainable_parameters")}
    done("sft")

    # 3. Next parts from the SFT policy on the training stories' windows; 4. simulated votes on every pair.
    held_stories = {e.group for e in held}
    stories = [json.loads(x) for x in (world_dir / "sft.jsonl").open()]
    (out / "train-stories.jsonl").write_text("".join(json.dumps({**d, "image_paths": [str(world_dir / p) for p in d["image_paths"]]}) + "\n"
                                                     for d in stories if d["item_id"] not in held_stories))  # fmt: skip
    generate(GenerateConfig(policy=str(sft_dir), items=str(out / "train-stories.jsonl"), window=WINDOW, per_item=s["per_item"],
                            temperature=s["temperature"], max_new_tokens=s["max_new_tokens"], out=str(out / "generated.jsonl"), device="cpu",
                            seed=seed))  # fmt: skip
    aug = out / "annotated"
    aug.mkdir(exist_ok=True)
    n_items = 0
    reference = {e.item_id: e.story for e in train_windows}
    with (aug / "world.jsonl").open("w") as f:
        for row in map(json.loads, (out / "generated.jsonl").open()):
            texts = [(c["text"], c["origin"]) for c in row["candidates"]]
            if s["reference_candidate"]:  # --smoke: its barely trained policy writes word salad, all ties; the data's own part adds decisive pairs
                texts.append((reference[row["external_id"]], "storyworld/sft"))
            cands = [{"text": t, "origin": o, "utility": part_utility(world, row["external_id"], t)} for t, o in texts]
            if len(cands) > 1:
                n_items += 1
                f.write(json.dumps({**row, "candidates": cands}) + "\n")
    votes = annotate_world(aug, out / "prefs.jsonl", votes_per_pair=3, seed=seed)
    report["annotation"] = {"windows": n_items, "votes": votes["votes"], "ties": votes["ties"]}
    db = out / "prefs.db"
    db.unlink(missing_ok=True)
    _, factory = open_db(f"sqlite:///{db}")
    ingest(factory, str(out / "prefs.jsonl"), "clip-prefix", media_root=out / "media")
    with factory() as session:
        stats = export(session, out / "trl", "trl", aggregate="majority", test_fraction=0.1)
    report["export"] = {"train": stats.train, "test": stats.test}
    done("generate_annotate_export")

    # 5. DPO, and the comparison on held-out windows.
    features = ClipFeatures(str(out / "clip"), None, out / "clip-cache")
    sft_parts = [r["story"] for r in sample_stories(load_policy(str(sft_dir)), held, s["max_new_tokens"])]
    sft_u = [part_utility(world, e.item_id, p) for e, p in zip(held, sft_parts)]
    report["sft"] |= {"utility": round(statistics.mean(sft_u), 4), **clip_scores(features, held, sft_parts)}
    ref_u = [part_utility(world, e.item_id, e.story) for e in held]
    report["reference_parts"] = {"utility": round(statistics.mean(ref_u), 4), **clip_scores(features, held, [e.story for e in held])}
    report["samples"] = [{"item_id": e.item_id, "reference": e.story, "sft": p} for e, p in zip(held[:3], sft_parts)]
    done("evaluate_sft")
    report["dpo"] = []
    for k in range(dpo_seeds):
        name = out / f"dpo-seed-{k}"
        _, m = dpo(DPOConfig(policy=str(sft_dir), data=str(out / "trl"), output_dir=str(name), beta=0.1, label_smoothing=0.1, epochs=s["dpo_epochs"],
                             lr=s["dpo_lr"], batch_size=16, max_length=s["max_new_tokens"] + 16, seed=seed + k, device="cpu", save_steps=10_000,
                             logging_steps=20))  # fmt: skip
        AcceleratorState._reset_state(True)
        parts = [r["story"] for r in sample_stories(load_policy(str(name)), held, s["max_new_tokens"])]
        u = [part_utility(world, e.item_id, p) for e, p in zip(held, parts)]
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(u, sft_u)) / len(u)
        report["dpo"].append({"seed": seed + k, "win_rate_vs_sft": round(wins, 4), "utility": round(statistics.mean(u), 4),
                              "eval_rewards_accuracies": m.get("eval_rewards_accuracies"), **clip_scores(features, held, parts),
                              "sample": {"item_id": held[0].item_id, "dpo": parts[0], "sft": sft_parts[0]}})  # fmt: skip
        done(f"dpo_seed_{k}")
    report["win_rate_median"] = statistics.median(r["win_rate_vs_sft"] for r in report["dpo"])
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--worlds", default="91,92,93", help="world seeds, comma-separated (fresh ones for a new comparison)")
    p.add_argument("--seeds", type=int, default=2, help="DPO seeds per world")
    p.add_argument("--smoke", action="store_true", help="a tiny setting that runs in a few minutes")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override a setting, e.g. --set sft_epochs=6 (values read as JSON)")
    args = p.parse_args()
    s = dict(SMOKE if args.smoke else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in s:
            p.error(f"--set {item}: unknown setting {key!r}; known: {', '.join(sorted(s))}")
        s[key] = json.loads(value)
    worlds = [int(w) for w in args.worlds.split(",") if w]
    reports = {}
    for w in worlds:
        path = args.out / f"world-{w}" / "report.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        reports[w] = done if "win_rate_median" in done and len(done.get("dpo", [])) == args.seeds else run_world(w, args.out / f"world-{w}", s, args.seeds)
    med = lambda xs: round(statistics.median(xs), 4)  # noqa: E731
    summary = {
        "date": time.strftime("%Y-%m-%d"), "setting": "smoke" if args.smoke else "full", "worlds": worlds, "dpo_seeds": args.seeds,
        "win_rate_by_world": {w: r["win_rate_median"] for w, r in reports.items()},
        "win_rate_median": med([r["win_rate_median"] for r in reports.values()]),
        "utility": {"sft": med([r["sft"]["utility"] for r in reports.values()]),
                    "dpo": med([d["utility"] for r in reports.values() for d in r["dpo"]]),
                    "reference": med([r["reference_parts"]["utility"] for r in reports.values()])},
        "clip_score_target_frame": {"sft": med([r["sft"]["clip_score_target_frame"] for r in reports.values()]),
                                    "dpo": med([d["clip_score_target_frame"] for r in reports.values() for d in r["dpo"]]),
                                    "reference": med([r["reference_parts"]["clip_score_target_frame"] for r in reports.values()])},
        "minutes_per_world": med([sum(r["minutes"].values()) for r in reports.values()]),
    }  # fmt: skip
    (args.out / "report.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

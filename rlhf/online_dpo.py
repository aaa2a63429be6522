"""Iterative (online) DPO: each round, the policy's own samples, ranked by a reward, become DPO pairs.

    python -m rlhf.online_dpo --policy runs/sft --prompts items.jsonl --reward_model runs/rm --output_dir runs/odpo
    python -m rlhf.online_dpo --policy runs/dpo --prompts items.jsonl --reward_model runs/rm --rounds 3 --samples_per_prompt 8
    python -m rlhf.online_dpo --config online_dpo.yaml

Per round (Xu et al., 2023; Yuan et al., 2024; Xiong et al., 2024): sample `--samples_per_prompt`
stories for every prompt from the current policy (as `rlhf.generate` does), score them with the
reward `--reward_weights` (the signals of `rlhf.ppo`: the reward model `human`, `clip`, `coherence`,
`repetition`, `style`), keep each prompt's best and worst story as a pair when their scores differ by
more than `--min_gap`, and train DPO on those pairs (`rlhf.dpo`, every one of its settings applies).
The next round starts from the policy this round wrote, and its reference is that policy: each round
moves at most so far from the last (β), and the KL to the starting policy adds up over the rounds.

The composite score of a round is Σ_k w_k · z_k, each signal standardized over all of the round's
samples, so a prompt's best and worst do not depend on the batch they were scored in.

Where the reward cannot rank the policy's own samples, this method learns the reward's mistakes:
check it first with `python -m rlhf.rewards` on held-out pairs of the policy's samples (docs/rewards.md).
With a weak reward model, a new round of human votes on the policy's samples (`rlhf.generate`, the
app, `annotate.export`, then `rlhf.dpo --policy` the last DPO policy) is the same loop with people
ranking (docs/training.md).

Writes OUTPUT_DIR/round-N/ (pairs.jsonl: the round's pairs as a TRL file, with each story's score;
the round's DPO policy, logs and metrics.json), the last round's policy in OUTPUT_DIR itself (load it
as any policy dir), and OUTPUT_DIR/metrics.json (per round: prompts, pairs, the mean score of the
samples, the mean gap of the pairs, DPO's figures). A round with metrics.json is done: run the same
command again to continue after an interruption (a round cut short resumes with `rlhf.dpo --resume`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from annotate.formats import format_prompt
from rlhf.data import DataError
from rlhf.dpo import DPOConfig, check_config
from rlhf.dpo import train as dpo_train
from rlhf.generate import write_jsonl
from rlhf.loading import ModelLoadError
from rlhf.rewards import CompositeReward, build_reward, parse_weights
from rlhf.stories import StoryDataError, StoryExample, read_examples


@dataclass
class OnlineDPOConfig(DPOConfig):
    prompts: str = field(default="", metadata={"help": "prompts: items JSONL (image_paths, instruction, style, context) or an HF dataset, "
                                                       "as rlhf.ppo --prompts"})  # fmt: skip
    rounds: int = field(default=2, metadata={"help": "rounds of sample → rank → DPO"})
    samples_per_prompt: int = field(default=4, metadata={"help": "stories sampled per prompt and round (2 or more)"})
    prompts_per_round: int = field(default=0, metadata={"help": "prompts sampled per round (0: all of them)"})
    min_gap: float = field(default=0.0, metadata={"help": "keep a prompt's pair only if best − worst composite score exceeds this"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=160, metadata={"help": "story length limit in tokens"})
    reward_weights: str = field(default="human=1", metadata={"help": "signals and weights, as rlhf.ppo: human, clip, coherence, repetition, style"})
    reward_model: str | None = field(default=None, metadata={"help": "the `human` signal: a dir from rlhf.train_rm"})
    clip_model: str | None = field(default=None, metadata={"help": "the `clip` signal: an open_clip name or a local dir"})
    clip_pretrained: str | None = field(default=None, metadata={"help": "open_clip pretrained tag (with an open_clip name)"})
    sentence_model: str | None = field(default=None, metadata={"help": "the `coherence` and `style` signals: a sentence-transformers id or path"})
    style_descriptions: str | None = field(default=None, metadata={"help": "JSON file {style: description} for the `style` signal"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache of the reward model's and CLIP's frame embeddings"})
    generate_batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    output_dir: str = field(default="runs/online-dpo", metadata={"help": "rounds, the last round's policy, metrics.json"})


def dpo_settings(cfg: OnlineDPOConfig, **overrides) -> DPOConfig:
    """The DPO settings of each round: every rlhf.dpo flag as given, with `overrides`."""
    return DPOConfig(**{f.name: getattr(cfg, f.name) for f in fields(DPOConfig) if f.init} | overrides)


def check_online(cfg: OnlineDPOConfig, reward: CompositeReward | None = None) -> tuple[list[StoryExample], dict[str, float]]:
    """Every setting and the prompts, before any model loads (`--reward_weights` only where no `reward` is handed in)."""
    if cfg.rounds < 1:
        raise ValueError(f"--rounds {cfg.rounds}: give 1 or more")
    if cfg.samples_per_prompt < 2:
        raise ValueError(f"--samples_per_prompt {cfg.samples_per_prompt}: a pair needs 2 or more samples per prompt (4 is common)")
    if cfg.prompts_per_round < 0:
        raise ValueError(f"--prompts_per_round {cfg.prompts_per_round}: give 0 (all prompts) or a positive number")
    if cfg.min_gap < 0:
        raise ValueError(f"--min_gap {cfg.min_gap}: give a score difference ≥ 0")
    if cfg.data:
        raise DataError("--data: online DPO makes its pairs from the policy's own samples; train on an export first with rlhf.dpo, "
                        "then pass that policy as --policy")  # fmt: skip
    weights = parse_weights(cfg.reward_weights) if reward is None else reward.weights
    check_config(dpo_settings(cfg, data="-"))
    if not cfg.prompts:
        raise StoryDataError("--prompts is required: an items JSONL (image_paths, instruction, style, context) or an HF dataset")
    return read_examples(cfg.prompts), weights


def round_scores(reward: CompositeReward, examples: list[StoryExample], stories: list[list[str]], batch_size: int = 16) -> list[list[float]]:
    """Each prompt's samples scored Σ_k w_k · z_k, every signal standardized over the whole round."""
    flat = [(e, s) for e, group in zip(examples, stories) for s in group]
    raw: dict[str, list[torch.Tensor]] = {name: [] for name in reward.weights}
    for k in range(0, len(flat), batch_size):
        chunk = flat[k : k + batch_size]
        for name in reward.weights:
            raw[name].append(reward.signals[name]([e.images for e, _ in chunk], [e.instruction for e, _ in chunk], [e.context for e, _ in chunk],
                                                  [e.style for e, _ in chunk], [s for _, s in chunk]).float().cpu())  # fmt: skip
    total = torch.zeros(len(flat))
    for name, parts in raw.items():
        values = torch.cat(parts)
        std = values.std(unbiased=False).item() if len(values) > 1 else 0.0
        total += reward.weights[name] * (values - values.mean()) / max(std, 1e-6)
    out, k = [], 0
    for group in stories:
        out.append(total[k : k + len(group)].tolist())
        k += len(group)
    return out


def best_and_worst(example: StoryExample, stories: list[str], scores: list[float], min_gap: float) -> dict | None:
    """A TRL row: the best story chosen over the worst, or None when fewer than two distinct stories or a gap ≤ min_gap."""
    ranked = sorted({s: sc for s, sc in zip(stories, scores)}.items(), key=lambda kv: kv[1])
    if len(ranked) < 2 or ranked[-1][1] - ranked[0][1] <= min_gap:
        return None
    (worst, low), (best, high) = ranked[0], ranked[-1]
    return {"item_id": example.item_id, "images": [str(Path(p).resolve()) for p in example.images],
            "prompt": format_prompt(example.instruction, example.style, example.context), "chosen": best, "rejected": worst,
            "score_chosen": round(high, 4), "score_rejected": round(low, 4)}  # fmt: skip


def sample_round(cfg: OnlineDPOConfig, policy_dir: str, sft_adapter: str | None, examples: list[StoryExample], seed: int) -> list[list[str]]:
    """Up to `samples_per_prompt` distinct stories per prompt from the policy: `rlhf.generate`'s sampling."""
    from rlhf.generate import GenerateConfig, generate_candidates

    gen = GenerateConfig(policy=policy_dir, sft_adapter=sft_adapter, per_item=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generate_batch_size, seed=seed, device=cfg.device)  # fmt: skip
    rows = generate_candidates(gen, [(e, {"candidates": []}) for e in examples])
    return [[c["text"] for c in row["candidates"]] for row in rows]


def train(cfg: OnlineDPOConfig, reward: CompositeReward | None = None):
    """Run the rounds as `cfg` says; returns the last round's policy and the metrics.

    `reward`, from Python only: a CompositeReward of your own signals (any callable taking
    `(images, instructions, contexts, styles, stories)` and returning a (B,) tensor, such as a
    verifiable check of your own) ranks each prompt's samples instead of the one `--reward_weights`
    builds; `--reward_weights` and the reward-model flags are then not read, as in `rlhf.ppo.train`.
    """
    # 1. Settings, prompts and the reward's models, before any sampling.
    examples, weights = check_online(cfg, reward)
    settings = asdict(cfg) if reward is None else asdict(cfg) | {"reward_weights": None, "reward": f"from Python: {weights}"}
    if reward is None:
        style_descriptions = json.loads(Path(cfg.style_descriptions).read_text()) if cfg.style_descriptions else None
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        reward = build_reward(weights, reward_model=cfg.reward_model, clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained,
                              sentence_model=cfg.sentence_model, style_descriptions=style_descriptions, device=device,
                              cache_dir=cfg.cache_dir)  # fmt: skip
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "online_dpo_config.json").write_text(json.dumps(settings, indent=1))  # what ranked the rounds, as it was
    rounds: list[dict] = []
    current, adapter, policy = cfg.policy, cfg.sft_adapter, None
    # Under accelerate launch the main process samples and ranks, and every process trains (on the CPU
    # as accelerate's own state does: --cpu or ACCELERATE_USE_CPU).
    state = PartialState(cpu=cfg.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    t0 = time.perf_counter()
    for r in range(1, cfg.rounds + 1):
        round_dir = out / f"round-{r}"
        if (round_dir / "metrics.json").exists():  # done in an earlier run of the same command
            rounds.append(json.loads((round_dir / "round.json").read_text()))
            current, adapter = str(round_dir), None
            print(f"round {r}: done earlier ({round_dir})")
            continue
        pairs_file = round_dir / "pairs.jsonl"
        if not pairs_file.exists() and state.is_main_process:  # sampled and ranked once (after an interruption, DPO resumes on the same pairs)
            g = torch.Generator().manual_seed(cfg.seed * 1009 + r)
            chosen = examples if not cfg.prompts_per_round else [examples[i] for i in torch.randperm(len(examples), generator=g)[: cfg.prompts_per_round].tolist()]
            stories = sample_round(cfg, current, adapter, chosen, cfg.seed + r)
            scores = round_scores(reward, chosen, stories)
            rows = [row for e, s, sc in zip(chosen, stories, scores) if (row := best_and_worst(e, s, sc, cfg.min_gap))]
            if len(rows) < 2:
                raise DataError(f"round {r}: only {len(rows)} of {len(chosen)} prompts gave a pair (two distinct samples whose scores "
                                f"differ by more than --min_gap {cfg.min_gap}); sample more (--samples_per_prompt, --temperature) or "
                                "lower --min_gap")  # fmt: skip
            info = {"round": r, "prompts": len(chosen), "pairs": len(rows), "mean_score": sum(map(sum, scores)) / sum(map(len, scores)),
                    "mean_gap": sum(x["score_chosen"] - x["score_rejected"] for x in rows) / len(rows)}  # fmt: skip
            round_dir.mkdir(parents=True, exist_ok=True)
            (round_dir / "round.json").write_text(json.dumps(info, indent=1))
            write_jsonl(rows, pairs_file)  # all or nothing, and last: a round with pairs.jsonl has its round.json
        state.wait_for_everyone()  # the other processes train on the pairs the main one wrote
        info = json.loads((round_dir / "round.json").read_text())
        policy, metrics = dpo_train(dpo_settings(cfg, policy=current, sft_adapter=adapter, data=str(pairs_file), output_dir=str(round_dir),
                                                 seed=cfg.seed + r, resume=(round_dir / "checkpoint-last").exists()))  # fmt: skip
        info |= {"dpo": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        if state.is_main_process:
            (round_dir / "round.json").write_text(json.dumps(info, indent=1))
            print(json.dumps(info))
        rounds.append(info)
        current, adapter = str(round_dir), None
    if policy is None:  # every round was done earlier: the last one's policy
        from rlhf.policy import load_policy

        policy = load_policy(current, trainable=False)
    result = {"rounds": rounds, "policy": str(out), "minutes": round((time.perf_counter() - t0) / 60, 2)}
    if state.is_main_process:
        policy.save_pretrained(out)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
    state.wait_for_everyone()
    return policy, result


def main(cfg: OnlineDPOConfig) -> dict:
    return train(cfg)[1]


def parse_args(argv: list[str] | None = None) -> OnlineDPOConfig:
    import argparse

    from trl import TrlParser

    (cfg,) = TrlParser(dataclass_types=[OnlineDPOConfig], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args_and_config(argv)
    return cfg


if __name__ == "__main__":
    from rlhf.policy import UnsupportedPolicyError

    try:
        main(parse_args())
    except (DataError, StoryDataError, ModelLoadError, UnsupportedPolicyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

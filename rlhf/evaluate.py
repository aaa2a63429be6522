"""Evaluate a story policy: CLIPScore, BLEU, distinct-n and length, as a JSON report.

    python -m rlhf.evaluate --policy runs/sft --items world/sft.jsonl --clip_model ViT-B-32 --out report.json

The helpers are plain functions, so PPO's reward signals and the benchmarks use the same ones:

* `clip_score` (from `rlhf.clip`): CLIPScore (Hessel et al., 2021), per frame and per sentence, so
  long stories are never cut at CLIP's 77 tokens.
* `bleu`: corpus BLEU with sacrebleu against the items' reference stories, where they have one.
* `distinct_n`: distinct n-grams over all n-grams of a set of stories (Li et al., 2016).
* `mean_length`: words per story.

With `--window K` the items are next-frame examples (`rlhf.stories`): the policy writes the part for
frame T from frames T−K..T and the story so far, BLEU is against frame T's reference text, and
`clip_score_target_frame` scores the part against frame T alone (beside `clip_score` over all the
window's frames).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from annotate.formats import plain_text
from rlhf.clip import ClipFeatures, clip_score


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over `texts`: ["a b a b"], n=2 → 2/3."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [plain_text(t).lower().split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_length(texts: Sequence[str]) -> float:
    return sum(len(plain_text(t).split()) for t in texts) / len(texts) if texts else 0.0


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu([plain_text(h) for h in hypotheses], [[plain_text(r) for r in references]]).score

@dataclass
class EvaluateConfig:
    policy: str = field(metadata={"help": "the policy to evaluate: HF id or path, or a dir from rlhf.sft / rlhf.ppo"})
    items: str = field(metadata={"help": "items JSONL (image_paths, instruction, [style, context, story]) or an HF dataset"})
    window: int = field(default=0, metadata={"help": "K: cut each story into next-frame examples (frames T-K..T, the text before T as context, frame T's text as the target); 0: whole stories"})
    out: str = field(default="eval_report.json", metadata={"help": "where the JSON report goes"})
    sft_adapter: str | None = field(default=None, metadata={"help": "an SFT adapter to merge into --policy first"})
    clip_model: str | None = field(default="ViT-B-32", metadata={"help": "open_clip model name or local dir for CLIPScore; empty to skip"})
    clip_pretrained: str | None = field(default="laion2b_s34b_b79k", metadata={"help": "open_clip pretrained tag (ignored for a local dir)"})
    limit: int | None = field(default=200, metadata={"help": "evaluate the first N items"})
    temperature: float = field(default=0.0, metadata={"help": "0 for greedy stories, else the sampling temperature"})
    max_new_tokens: int = field(default=160, metadata={"help": "story length limit"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


def main(cfg: EvaluateConfig) -> dict:
    from tqdm import tqdm

    from rlhf.policy import load_policy
    from rlhf.stories import read_examples

    # 1. Items and models.
    examples = read_examples(cfg.items, limit=cfg.limit, window=cfg.window)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = load_policy(cfg.policy, sft_adapter=cfg.sft_adapter, device=device, trainable=False)
    features = None
    if cfg.clip_model:
        features = ClipFeatures(cfg.clip_model, cfg.clip_pretrained, device=device)
    # 2. Stories.
    torch.manual_seed(cfg.seed)
    stories: list[str] = []
    for k in tqdm(range(0, len(examples), cfg.batch_size), desc="evaluate", unit="batch"):
        chunk = examples[k : k + cfg.batch_size]
        batch = policy.examples_batch(chunk)
        sampling = {"do_sample": False} if cfg.temperature == 0 else {"temperature": cfg.temperature}
        stories += policy.generate(batch, max_new_tokens=cfg.max_new_tokens, **sampling).texts
    # 3. Metrics.
    report = {"policy": cfg.policy, "items": len(examples), "mean_length": mean_length(stories),
              "distinct_1": distinct_n(stories, 1), "distinct_2": distinct_n(stories, 2)}  # fmt: skip
    refs = [(s, e.story) for s, e in zip(stories, examples) if e.story]
    if refs:
        report["bleu"] = bleu([s for s, _ in refs], [r for _, r in refs])
    if features is not None:
        report["clip_score"] = clip_score(features, [e.images for e in examples], stories).mean().item()
        if cfg.window:  # the part written for frame T, against frame T alone (as StoryReasoning's users report it)
            report["clip_score_target_frame"] = clip_score(features, [e.images[-1:] for e in examples], stories).mean().item()
    report["samples"] = [{"item_id": e.item_id, "story": s} for e, s in zip(examples, stories)]
    Path(cfg.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    return report


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    from trl import TrlParser

    (cfg,) = TrlParser(dataclass_types=[EvaluateConfig], description=__doc__.split("\n\n")[0]).parse_args_and_config(argv)
    return cfg


if __name__ == "__main__":
    from rlhf.loading import ModelLoadError
    from rlhf.stories import StoryDataError

    try:
        main(parse_args())
    except (StoryDataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

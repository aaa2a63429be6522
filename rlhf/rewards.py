"""Named reward signals for PPO, and their normalized, weighted mix.

Every signal is called as `signal(images, instructions, contexts, styles, stories) -> (B,) tensor`,
one entry per story (images: a list of frames per story, as paths or PIL images):

* `human`: the trained reward model (`rlhf.train_rm`), loaded from its directory.
* `clip`: CLIPScore, 2.5·max(cos, 0) per frame and sentence (see `rlhf.clip.clip_score`).
* `coherence`: sentence-embedding similarity of consecutive sentences, and of the first sentence
  to the story so far (the context) when there is one.
* `repetition`: distinct-2 within the story (1 = no repeated word pair; higher is better).
* `style`: embedding similarity of the story to a description of the asked style.

`CompositeReward` normalizes each signal by its running mean and std (over everything it has
scored so far, so a signal's scale does not decide its weight) and returns Σ_k w_k · norm_k(r_k),
with every raw component for logging.

Before giving a signal weight, check it against your annotators: `python -m rlhf.rewards` scores the
held-out pairs of an export with each signal and reports how often it ranks the chosen story above
the rejected one (ties skipped), with a 95% Wilson interval: what each proxy measures on your data.
It does not settle a weight by itself (a signal below chance on the annotators' pairs can still keep
PPO's stories together); try a change with PPO over a few seeds:

    python -m rlhf.rewards --preferences runs/trl --reward_model runs/rm [--split all] [--out check.json]
        [--mix human=1,clip=0.3]    (a weighting, scored as one signal beside its parts)

The clip, coherence and style signals load `--clip_model` (ViT-B-32, laion2b_s34b_b79k) and
`--sentence_model` (all-MiniLM-L6-v2) by default, as `rlhf.ppo` does.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from annotate.formats import parse_prompt, plain_text, split_sentences
from rlhf.clip import DEFAULT_CACHE, ClipFeatures, clip_score, trim_cache
from rlhf.evaluate import distinct_n
from rlhf.loading import ModelLoadError

SIGNALS = ("human", "clip", "coherence", "repetition", "style")
Signal = Callable[..., torch.Tensor]


def parse_weights(spec: str | dict, flag: str = "--reward_weights") -> dict[str, float]:
    """"human=1,clip=0.3" → {"human": 1.0, "clip": 0.3}, with unknown names refused (errors name `flag`)."""
    if isinstance(spec, dict):
        weights = {str(k): float(v) for k, v in spec.items()}
    else:
        weights = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            try:
                weights[name.strip()] = float(value) if sep else 1.0
            except ValueError:
                raise ValueError(f"{flag}: {part!r} is not name=number (e.g. human=1,clip=0.3)") from None
    unknown = sorted(set(weights) - set(SIGNALS))
    if unknown:
        raise ValueError(f"{flag} names unknown signal(s) {unknown}; the signals are {', '.join(SIGNALS)}")
    if not any(weights.values()):
        raise ValueError(f"{flag}: every weight is 0, so there is nothing to optimize")
    return {k: v for k, v in weights.items() if v}


def ends_a_sentence(story: str) -> bool:
    """Whether the story's last sentence is finished: its text ends in . ! ? … (or a quote or bracket after one)."""
    text = plain_text(story).rstrip()
    while text and text[-1] in "\"'”’)]»":
        text = text[:-1].rstrip()
    return bool(text) and text[-1] in ".!?…"


class HumanReward:
    """The human-preference reward model; scores are already normalized on its train split."""

    def __init__(self, path: str, device: str = "cpu", cache_dir: str | None = None):
        from rlhf.reward_model import RewardModel

        if not (Path(path) / "reward_config.json").exists():
            raise ModelLoadError(f"--reward_model {path}: no reward_config.json there; train one with python -m rlhf.train_rm")
        self.model = RewardModel.from_pretrained(path, device=device, cache_dir=cache_dir)

    def __call__(self, images, instructions, contexts, styles, stories) -> torch.Tensor:
        return self.model.score(images, list(instructions), list(stories), context=list(contexts), style=list(styles))


class ClipReward:
    def __init__(self, clip_model: str, clip_pretrained: str | None, device: str = "cpu", cache_dir: str | None = None):
        self.features = ClipFeatures(clip_model, clip_pretrained, cache_dir, device)

    def __call__(self, images, instructions, contexts, styles, stories) -> torch.Tensor:
        return clip_score(self.features, images, stories)


class SentenceEncoder:
    """A sentence-transformers model (by id or path), with a cache of sentence embeddings."""

    def __init__(self, name: str, device: str = "cpu"):
        try:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(name, device=device)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the sentence encoder {name!r} ({e}); pass a local path with --sentence_model") from None
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        trim_cache(self._cache)
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            emb = self.model.encode(new, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False).float().cpu()
            self._cache.update(zip(new, emb))
        return torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0)


class CoherenceReward:
    def __init__(self, encoder: SentenceEncoder):
        self.encode = encoder

    def __call__(self, images, instructions, contexts, styles, stories) -> torch.Tensor:
        per_story = [split_sentences(plain_text(story)) for story in stories]
        contexts = [plain_text(c) if c else "" for c in contexts]
        texts = list(dict.fromkeys([s for sentences in per_story for s in sentences] + [c for c in contexts if c]))
        table = dict(zip(texts, self.encode(texts)))  # the batch's sentences in one pass of the encoder
        out = []
        for context, sentences in zip(contexts, per_story):
            sims = [float(table[a] @ table[b]) for a, b in zip(sentences, sentences[1:])]
            if context and sentences:
                sims.append(float(table[context] @ table[sentences[0]]))
            out.append(sum(sims) / len(sims) if sims else 0.0)
        return torch.tensor(out)


class RepetitionReward:
    def __call__(self, images, instructions, contexts, styles, stories) -> torch.Tensor:
        return torch.tensor([distinct_n([s], 2) if len(plain_text(s).split()) > 1 else 0.0 for s in stories])


class StyleReward:
    """Cosine similarity of the story to the style's description (default: "a {style} story")."""

    def __init__(self, encoder: SentenceEncoder, descriptions: dict[str, str] | None = None):
        self.encode, self.descriptions = encoder, descriptions or {}

    def __call__(self, images, instructions, contexts, styles, stories) -> torch.Tensor:
        pairs = [(self.descriptions.get(style, f"a {style} story"), plain_text(story)) if style and plain_text(story) else None
                 for style, story in zip(styles, stories)]  # fmt: skip
        texts = list(dict.fromkeys(t for pair in pairs if pair for t in pair))
        table = dict(zip(texts, self.encode(texts)))  # the batch's stories and descriptions in one pass
        return torch.tensor([float(table[pair[0]] @ table[pair[1]]) if pair else 0.0 for pair in pairs])


class RunningStats:
    """Running mean and variance (Chan et al.'s parallel update), for normalizing a signal."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        mean, var = x.float().mean().item(), x.float().var(unbiased=False).item()
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += var * n + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


class CompositeReward:
    """r = Σ_k w_k · (r_k − mean_k) / std_k, with running statistics per signal."""

    def __init__(self, weights: dict[str, float], signals: dict[str, Signal]):
        missing = sorted(set(weights) - set(signals))
        if missing:
            raise ValueError(f"no signal built for {missing}")
        self.weights, self.signals = weights, signals
        self.stats = {name: RunningStats() for name in weights}
        self.seconds: dict[str, float] = {}  # each signal's time in the last call

    def __call__(self, images, instructions, contexts, styles, stories, update: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total (B,), raw components {name: (B,)})."""
        components = {}
        for name in self.weights:
            start = time.perf_counter()
            components[name] = self.signals[name](images, instructions, contexts, styles, stories).float().cpu()
            self.seconds[name] = time.perf_counter() - start
        total = torch.zeros(len(stories))
        for name, raw in components.items():
            if update:
                self.stats[name].update(raw)
            stats = self.stats[name]
            total += self.weights[name] * (raw - stats.mean) / max(stats.std, 1e-6)
        return total, components

    def state_dict(self) -> dict:
        return {name: s.state_dict() for name, s in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, s in state.items():
            if name in self.stats:
                self.stats[name].load_state_dict(s)


def build_reward(weights: dict[str, float], *, reward_model: str | None = None, clip_model: str | None = None,
                 clip_pretrained: str | None = None, sentence_model: str | None = None,
                 style_descriptions: dict[str, str] | None = None, device: str = "cpu",
                 cache_dir: str | None = None) -> CompositeReward:  # fmt: skip
    """Load exactly the signals with a weight; a missing model for one is an error that names the flag."""
    signals: dict[str, Signal] = {}
    if "human" in weights:
        if not reward_model:
            raise ModelLoadError("the `human` signal needs --reward_model, a directory written by rlhf.train_rm")
        signals["human"] = HumanReward(reward_model, device, cache_dir)
    if "clip" in weights:
        if not clip_model:
            raise ModelLoadError("the `clip` signal needs --clip_model (an open_clip name, or a local dir from storyworld train-clip)")
        signals["clip"] = ClipReward(clip_model, clip_pretrained, device, cache_dir)
    if {"coherence", "style"} & set(weights):
        if not sentence_model:
            raise ModelLoadError("the `coherence` and `style` signals need --sentence_model (a sentence-transformers id or path)")
        encoder = SentenceEncoder(sentence_model, device)
        if "coherence" in weights:
            signals["coherence"] = CoherenceReward(encoder)
        if "style" in weights:
            signals["style"] = StyleReward(encoder, style_descriptions)
    if "repetition" in weights:
        signals["repetition"] = RepetitionReward()
    return CompositeReward(weights, signals)


def _message_text(value, role: str) -> str:
    """The text of a TRL prompt or completion: a string, or the last `role` message of a conversation."""
    if isinstance(value, str):
        return value
    for message in reversed(value):
        if message.get("role") == role:
            content = message.get("content")
            return content if isinstance(content, str) else " ".join(c.get("text", "") for c in content if c.get("type") == "text")
    raise ValueError(f"no {role} message in {value!r:.200}")


def trl_reward_funcs(reward: CompositeReward, composite: bool = False) -> list[Callable]:
    """storypref's signals as TRL reward functions (`reward_funcs` of `GRPOTrainer` and `RLOOTrainer`).

    One function per signal, each named after it, so TRL logs `rewards/<name>/mean` and weighs them with
    its own `reward_weights`; or, with `composite`, one function `storypref` that returns the
    normalized, weighted mix `rlhf.ppo` uses. Each reads the prompts (plain or conversational; the
    text is `annotate.formats.format_prompt`'s: instruction, then `Style:` and `Story so far:` lines),
    the completions, and the dataset's image column (`images`, a list per row, or `image`):

        from trl import GRPOConfig, GRPOTrainer
        from rlhf.rewards import build_reward, trl_reward_funcs

        reward = build_reward({"human": 1.0, "clip": 0.3}, reward_model="runs/rm", clip_model="ViT-B-32")
        trainer = GRPOTrainer(model="Qwen/Qwen2-VL-2B-Instruct", reward_funcs=trl_reward_funcs(reward), args=GRPOConfig(...), train_dataset=ds)
        trainer.train()
    """

    def inputs(prompts, completions, kwargs):
        if "images" in kwargs:
            images = [list(i) if isinstance(i, (list, tuple)) else [i] for i in kwargs["images"]]
        elif "image" in kwargs:
            images = [[i] for i in kwargs["image"]]
        else:
            raise ValueError("storypref's reward functions need the frames: give the dataset an `images` (list per row) or `image` column")
        parsed = [parse_prompt(_message_text(p, "user")) for p in prompts]
        stories = [_message_text(c, "assistant") for c in completions]
        return images, [i for i, _, _ in parsed], [c for _, _, c in parsed], [s for _, s, _ in parsed], stories

    def signal_func(name: str) -> Callable:
        def func(prompts, completions, **kwargs) -> list[float]:
            with torch.no_grad():
                return reward.signals[name](*inputs(prompts, completions, kwargs)).float().cpu().tolist()

        func.__name__ = func.__qualname__ = name
        return func

    if not composite:
        return [signal_func(name) for name in reward.weights]

    def storypref(prompts, completions, **kwargs) -> list[float]:
        with torch.no_grad():
            total, _ = reward(*inputs(prompts, completions, kwargs))
        return total.tolist()

    return [storypref]


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96): 7 of 10 → (0.397, 0.892)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def score_pairs(reward: CompositeReward, pairs: Sequence, progress: bool = False, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Every signal's raw scores of `pairs`' stories: {signal: (n, 2) tensor of (chosen, rejected)}. Each pair is
    scored with its own images (by path: the CLIP cache's key) and prompt, `batch_size` pairs at a time."""
    from tqdm import tqdm

    columns: dict[str, list[torch.Tensor]] = {}  # keyed as the reward names its raw scores
    bar = tqdm(total=len(pairs), desc="scoring pairs", unit="pair", disable=not progress)
    for start in range(0, len(pairs), batch_size):  # each batch: the chosen stories, then the rejected ones
        batch = pairs[start : start + batch_size]
        prompts = [parse_prompt(p.prompt) for p in batch]
        images = [[i.path if i.path is not None else i.load() for i in p.images] for p in batch]
        with torch.no_grad():
            _, raw = reward(images * 2, [i for i, _, _ in prompts] * 2, [c for _, _, c in prompts] * 2, [s for _, s, _ in prompts] * 2,
                            [p.chosen for p in batch] + [p.rejected for p in batch], update=False)  # fmt: skip
        for name, v in raw.items():
            columns.setdefault(name, []).append(torch.stack([v[: len(batch)], v[len(batch) :]], 1).double())
        bar.update(len(batch))
    bar.close()
    return {name: torch.cat(c) for name, c in columns.items()}


def signal_agreement(reward: CompositeReward, pairs: Sequence, progress: bool = False, batch_size: int = 16,
                     mix: dict[str, float] | None = None) -> dict:  # fmt: skip
    """Each signal's agreement with the annotators on preference `pairs` (`rlhf.data.PreferencePair`).

    {signal: share of decided pairs where it scores the chosen story above the rejected one, ...,
    "interval": {signal: (low, high)}, "pairs": n}. Tied pairs are skipped; a pair the signal scores
    equal counts half. Each pair is scored with its own images and prompt, `batch_size` pairs at a time.

    With `mix` ({signal: weight}, signals among the reward's), the weighted mix is scored too, under
    "mix": Σ_k w_k · r_k / std_k, each signal divided by its std over every story scored here (the
    population std, as `CompositeReward`'s running statistics give it; a constant signal adds nothing).
    It asks whether a weighting ranks the pairs better than its parts, before PPO is run with it.
    """
    decided = [p for p in pairs if not p.tie]
    if not decided:
        return {"pairs": 0}
    if mix and (unknown := sorted(set(mix) - set(reward.weights))):
        raise ValueError(f"the mix names {unknown}, which are not among the signals scored ({', '.join(reward.weights)}); add them to the signals")
    scores = score_pairs(reward, decided, progress, batch_size)
    diffs = {name: v[:, 0] - v[:, 1] for name, v in scores.items()}
    if mix:
        diffs["mix"] = sum((w * diffs[name] / std for name, w in mix.items() if (std := scores[name].std(unbiased=False).item()) > 0),
                           torch.zeros(len(decided), dtype=torch.float64))  # fmt: skip
    n = len(decided)
    agree = {name: float((d > 0).sum()) + 0.5 * float((d == 0).sum()) for name, d in diffs.items()}
    intervals = {name: tuple(round(x, 3) for x in wilson_interval(k, n)) for name, k in agree.items()}
    return {name: round(k / n, 3) for name, k in agree.items()} | {"interval": intervals, "pairs": n}


def bag_of_words_scorer(pairs: Sequence, c: float = 0.1, ngrams: int = 2):
    """A yardstick reward fit on preference `pairs`: a logistic regression on word and n-gram counts.

    The Bradley–Terry model with a linear reward r(story) = w · counts(story): scikit-learn's
    `LogisticRegression` (L2, C = `c`, no intercept) on the count differences chosen − rejected,
    each decided pair also entered flipped, so the fit is symmetric. Returns `score(stories) → list`
    (higher: preferred). A reward model that ranks held-out pairs no better than this has learned
    nothing beyond which words the preferred stories use.
    """
    import numpy as np
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    decided = [p for p in pairs if not p.tie]
    if len(decided) < 2:
        raise ValueError(f"a bag-of-words baseline needs decided train pairs to fit on, and there are {len(decided)}")
    vec = CountVectorizer(ngram_range=(1, ngrams), min_df=2 if len(decided) >= 50 else 1)
    vec.fit([plain_text(s) for p in decided for s in (p.chosen, p.rejected)])
    diff = vec.transform([plain_text(p.chosen) for p in decided]) - vec.transform([plain_text(p.rejected) for p in decided])
    model = LogisticRegression(C=c, max_iter=5000, fit_intercept=False)
    model.fit(sp.vstack([diff, -diff]), np.r_[np.ones(len(decided)), np.zeros(len(decided))])
    weights = model.coef_.ravel()
    return lambda stories: (vec.transform([plain_text(s) for s in stories]) @ weights).tolist()


def baseline_agreement(train: Sequence, pairs: Sequence) -> dict:
    """The bag-of-words yardstick (`bag_of_words_scorer`, fit on `train`) scored as `signal_agreement` scores a signal."""
    score = bag_of_words_scorer(train)
    decided = [p for p in pairs if not p.tie]
    if not decided:
        return {"pairs": 0}
    chosen, rejected = score([p.chosen for p in decided]), score([p.rejected for p in decided])
    k = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(chosen, rejected))
    return {"bag_of_words": round(k / len(decided), 3), "interval": tuple(round(x, 3) for x in wilson_interval(k, len(decided))), "pairs": len(decided)}


@dataclass
class CheckConfig:
    """Which reward signals agree with your annotators? Scored on an export's held-out pairs."""

    preferences: str = field(metadata={"help": "preference data, as rlhf.train_rm reads it: an annotate.export dir or file (TRL or pairs "
                                               "JSONL, or a saved HF dataset)"})  # fmt: skip
    split: str = field(default="test", metadata={"help": "which pairs: test (held out, as rlhf.train_rm splits them) | train | all"})
    signals: str = field(default="human,clip,coherence,repetition,style",
                         metadata={"help": "the signals to check, comma-separated (each needs its model flag below)"})
    reward_model: str | None = field(default=None, metadata={"help": "reward model dir (rlhf.train_rm) for the `human` signal"})
    clip_model: str | None = field(default="ViT-B-32", metadata={"help": "open_clip name or local dir for the `clip` signal"})
    clip_pretrained: str | None = field(default="laion2b_s34b_b79k", metadata={"help": "open_clip pretrained tag (ignored for a local dir)"})
    sentence_model: str | None = field(default="sentence-transformers/all-MiniLM-L6-v2", metadata={"help": "sentence encoder for coherence and style"})
    style_descriptions: str | None = field(default=None, metadata={"help": "JSON file {style: description} for the `style` signal"})
    mix: str | None = field(default=None, metadata={"help": "also score this weighted mix of the signals, written as --reward_weights "
                                                          "(human=1,clip=0.3): each signal divided by its std over the scored stories, "
                                                          "as PPO's running normalization does; does the mix rank better than its parts?"})
    limit: int | None = field(default=None, metadata={"help": "score at most this many pairs (the first ones)"})
    batch_size: int = field(default=16, metadata={"help": "pairs scored per call of each signal"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda"})
    cache_dir: str | None = field(default=None, metadata={"help": "CLIP embedding cache (default: ~/.cache/storypref/clip)"})
    baseline: bool = field(default=True, metadata={"help": "also fit a bag-of-words logistic regression on the train split and score it on "
                                                           "the same test pairs: a yardstick any reward model should beat (test split only)"})
    out: str | None = field(default=None, metadata={"help": "also write the result here as JSON"})


def check(cfg: CheckConfig) -> dict:
    """Score `cfg.preferences`' pairs with each signal; print a table and return the numbers."""
    from rlhf.data import load_preferences

    if cfg.split not in ("test", "train", "all"):
        raise ValueError(f"--split {cfg.split!r}: use test, train or all")
    weights = parse_weights(cfg.signals, flag="--signals")
    mix = parse_weights(cfg.mix, flag="--mix") if cfg.mix else None
    if mix and (missing := sorted(set(mix) - set(weights))):
        raise ValueError(f"--mix {cfg.mix}: {missing} not among --signals {cfg.signals}; add them to --signals")
    train, test, message = load_preferences(cfg.preferences)
    pairs = {"test": test, "train": train, "all": train + test}[cfg.split][: cfg.limit]
    descriptions = json.loads(Path(cfg.style_descriptions).read_text()) if cfg.style_descriptions else None
    reward = build_reward(weights, reward_model=cfg.reward_model, clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained,
                          sentence_model=cfg.sentence_model, style_descriptions=descriptions, device=cfg.device,
                          cache_dir=cfg.cache_dir or str(DEFAULT_CACHE))  # fmt: skip
    print(message, file=sys.stderr)
    result = signal_agreement(reward, pairs, progress=True, batch_size=cfg.batch_size, mix=mix) | {"split": cfg.split, "preferences": cfg.preferences}
    if not result["pairs"]:
        raise ValueError(f"--preferences {cfg.preferences}: the {cfg.split} split has no decided pair (all ties); try --split all")
    names = list(weights) + (["mix"] if mix else [])
    if cfg.baseline and cfg.split == "test" and sum(not p.tie for p in train) >= 2:  # fit on the train split, scored on the held-out pairs
        base = baseline_agreement(train, pairs)
        result["bag_of_words"], result["interval"]["bag_of_words"] = base["bag_of_words"], base["interval"]
        names.append("bag_of_words")
    print(f"agreement with the annotators on {result['pairs']} decided {cfg.split} pairs (0.5 = chance):")
    for name in names:
        low, high = result["interval"][name]
        verdict = "  (worse than chance: it prefers the rejected story)" if high < 0.5 else "  (no better than chance)" if low <= 0.5 else ""
        if name == "bag_of_words":
            verdict = "  (the yardstick: word counts fit on the train split)"
        elif name == "mix":
            verdict = f"  (--mix {cfg.mix}){verdict}"
        print(f"  {name:<12} {result[name]:.3f}  95% [{low:.3f}, {high:.3f}]{verdict}")
    if "bag_of_words" in result and "human" in result and result["human"] <= result["bag_of_words"]:
        print("  the reward model ranks these pairs no better than a bag of words fit on the same labels: it has not learned what "
              "the words alone cannot say; more PPO on it will not help (docs/reward-model.md)")
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    import argparse

    from trl import TrlParser

    from rlhf.data import DataError

    about = __doc__[__doc__.index("Before giving") :]  # the module docstring's part about this command
    (config,) = TrlParser(dataclass_types=[CheckConfig], description=about, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args_and_config()
    try:
        check(config)
    except (DataError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

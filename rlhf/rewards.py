"""Named reward signals for PPO, and their normalized, weighted mix.

Every signal is called as `signal(images, instructions, contexts, styles, stories) -> (B,) tensor`,
one entry per story (images: a list of frames per story, as paths or PIL images):

* `human`: the trained reward model (`rlhf.train_rm`), loaded from its directory.
* `clip`: CLIPScore, 2.5·max(cos, 0) per frame and sentence (see `rlhf.evaluate.clip_score`).
* `coherence`: sentence-embedding similarity of consecutive sentences, and of the first sentence
  to the story so far (the context) when there is one.
* `repetition`: distinct-2 within the story (1 = no repeated word pair; higher is better).
* `style`: embedding similarity of the story to a description of the asked style.

`CompositeReward` normalizes each signal by its running mean and std (over everything it has
scored so far, so a signal's scale does not decide its weight) and returns Σ_k w_k · norm_k(r_k),
with every raw component for logging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from annotate.formats import plain_text, split_sentences
from rlhf.evaluate import clip_score, distinct_n
from rlhf.reward_model import ModelLoadError, trim_cache

SIGNALS = ("human", "clip", "coherence", "repetition", "style")
Signal = Callable[..., torch.Tensor]


def parse_weights(spec: str | dict) -> dict[str, float]:
    """"human=1,clip=0.3" → {"human": 1.0, "clip": 0.3}, with unknown names refused."""
    if isinstance(spec, dict):
        weights = {str(k): float(v) for k, v in spec.items()}
    else:
        weights = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            try:
                weights[name.strip()] = float(value) if sep else 1.0
            except ValueError:
                raise ValueError(f"--reward_weights: {part!r} is not name=number (e.g. human=1,clip=0.3)") from None
    unknown = sorted(set(weights) - set(SIGNALS))
    if unknown:
        raise ValueError(f"--reward_weights names unknown signal(s) {unknown}; the signals are {', '.join(SIGNALS)}")
    if not any(weights.values()):
        raise ValueError("--reward_weights: every weight is 0, so there is nothing to optimize")
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
        from rlhf.reward_model import ClipFeatures

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
        out = []
        for context, story in zip(contexts, stories):
            sentences = split_sentences(plain_text(story))
            sims = []
            if len(sentences) > 1:
                emb = self.encode(sentences)  # (S, D)
                sims += (emb[:-1] * emb[1:]).sum(-1).tolist()
            if context and sentences:
                ctx, first = self.encode([plain_text(context), sentences[0]])
                sims.append(float(ctx @ first))
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
        out = []
        for style, story in zip(styles, stories):
            if not style or not plain_text(story):
                out.append(0.0)
                continue
            description = self.descriptions.get(style, f"a {style} story")
            d, s = self.encode([description, plain_text(story)])
            out.append(float(d @ s))
        return torch.tensor(out)


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

    def __call__(self, images, instructions, contexts, styles, stories, update: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total (B,), raw components {name: (B,)})."""
        components = {name: self.signals[name](images, instructions, contexts, styles, stories).float().cpu() for name in self.weights}
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

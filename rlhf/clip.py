"""Frozen CLIP features: image embeddings cached on disk by sha256, sentence embeddings in memory, and CLIPScore.

One place reads frames and sentences with an open_clip model, for everyone who needs them: the
clip-fusion reward model (`rlhf.reward_model`), the `clip` reward signal (`rlhf.rewards`) and the
evaluation report (`rlhf.evaluate`). `ClipFeatures(name, pretrained)` loads an open_clip model by
name (`ViT-B-32` with `laion2b_s34b_b79k`) or from a local directory with `open_clip_config.json`
(`python -m storyworld train-clip`); an image is encoded once per run, and once ever with a
`cache_dir`. Stories are embedded sentence by sentence, so a long story is never cut at CLIP's 77
tokens, and every new sentence of a batch goes through the text tower in one pass.

* `clip_score`: CLIPScore (Hessel et al., 2021), 2.5·max(cos(image, text), 0), computed per frame
  and per sentence (each frame's sentences against that frame's image), averaged over the sentences
  of a frame and then over the frames.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from annotate.formats import frame_sentences
from rlhf.data import ImageRef
from rlhf.loading import ModelLoadError

DEFAULT_CACHE = Path.home() / ".cache" / "storypref" / "clip"  # image embeddings on disk, unless a --cache_dir says otherwise
SENTENCE_CACHE_LIMIT = 100_000  # sentence embeddings kept in memory; PPO scores new sentences forever


def trim_cache(cache: dict, limit: int = SENTENCE_CACHE_LIMIT) -> None:
    """Drop the older half of an insertion-ordered cache once it outgrows `limit`."""
    if len(cache) > limit:
        for key in list(cache)[: len(cache) // 2]:
            del cache[key]




class ClipFeatures:
    """A frozen open_clip model: image embeddings cached on disk by sha256, sentences in memory."""

    def __init__(self, name: str, pretrained: str | None, cache_dir: str | Path | None = None, device: str = "cpu"):
        import open_clip

        local = Path(name).is_dir()
        ident = f"local-dir:{name}" if local else name
        if not local and name not in open_clip.list_models():
            raise ModelLoadError(
                f"cannot load CLIP {name!r}: not a local directory with open_clip_config.json, nor an open_clip model "
                "name (see open_clip.list_models()). For storyworld: python -m storyworld train-clip --world DIR --out DIR"
            )
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(ident, pretrained=None if local else pretrained)
        except RuntimeError as e:
            raise ModelLoadError(f"cannot load CLIP weights {name!r}/{pretrained!r}: {e}. Offline, pass a local directory.") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(ident)
        self.device = device
        self.dim = int(self.model.text_projection.shape[1] if hasattr(self.model, "text_projection") else self.model.embed_dim)
        weights = sorted(Path(name).glob("*.safetensors")) if local else []
        stamp = f"{name}|{pretrained}|" + "|".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
        self.cache_dir = Path(cache_dir) / hashlib.sha256(stamp.encode()).hexdigest()[:12] if cache_dir else None
        self._images: dict[str, torch.Tensor] = {}
        self._sentences: dict[str, torch.Tensor] = {}
        self.encoded_images = 0  # images actually run through the tower (the rest came from a cache)

    @torch.no_grad()
    def images(self, refs: list[ImageRef], batch_size: int = 64) -> torch.Tensor:
        """(N, D) normalized embeddings, in order."""
        missing = []
        for ref in refs:
            key = ref.key
            if key in self._images:
                continue
            path = self.cache_dir / key[:2] / f"{key}.pt" if self.cache_dir else None
            if path is not None and path.exists():
                self._images[key] = torch.load(path, weights_only=True)
            else:
                missing.append(ref)
        unique = list({r.key: r for r in missing}.values())
        for i in range(0, len(unique), batch_size):
            chunk = unique[i : i + batch_size]
            pixels = torch.stack([self.preprocess(r.load()) for r in chunk]).to(self.device)  # (b, 3, H, W)
            emb = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu()  # (b, D)
            self.encoded_images += len(chunk)
            for r, e in zip(chunk, emb):
                self._images[r.key] = e.clone()
                if self.cache_dir is not None:
                    path = self.cache_dir / r.key[:2] / f"{r.key}.pt"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{os.getpid()}")
                    torch.save(e.clone(), tmp)
                    os.replace(tmp, path)
        return torch.stack([self._images[r.key] for r in refs]) if refs else torch.zeros(0, self.dim)

    @torch.no_grad()
    def sentences(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(N, D) normalized CLIP text embeddings, one per sentence (each well under 77 tokens)."""
        trim_cache(self._sentences)
        new = list(dict.fromkeys(t for t in texts if t not in self._sentences))
        for i in range(0, len(new), batch_size):
            chunk = new[i : i + batch_size]
            emb = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(chunk).to(self.device)).float(), dim=-1)
            for t, e in zip(chunk, emb.cpu()):
                self._sentences[t] = e
        return torch.stack([self._sentences[t] for t in texts]) if texts else torch.zeros(0, self.dim)

    def story(self, story: str, n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(frame texts (F, D), whole story (D)): means of sentence embeddings; zeros where empty."""
        return self.stories([story], [n_frames])[0]

    def stories(self, stories: Sequence[str], n_frames: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`story` for each, with every new sentence of the batch embedded in one pass of the text tower."""
        parts = [frame_sentences(story, n) for story, n in zip(stories, n_frames)]
        flat = [s for frames in parts for sentences in frames for s in sentences]
        table = dict(zip(flat, self.sentences(flat)))
        mean = lambda sentences: torch.stack([table[s] for s in sentences]).mean(0) if sentences else torch.zeros(self.dim)  # noqa: E731
        return [(torch.stack([mean(f) for f in frames]), mean([s for f in frames for s in f])) for frames in parts]


@torch.no_grad()
def clip_score(features, images: Sequence[Sequence], stories: Sequence[str]) -> torch.Tensor:
    """(B,) CLIPScore per story; `features` is a `ClipFeatures`, images are paths, PIL images or ImageRefs."""
    refs = [[f if isinstance(f, ImageRef) else ImageRef(f) if isinstance(f, (str, Path)) else ImageRef(image=f) for f in frames] for frames in images]
    parts = [frame_sentences(story, len(r)) for r, story in zip(refs, stories)]
    flat = [s for frames in parts for sentences in frames for s in sentences]
    table = dict(zip(flat, features.sentences(flat)))  # every new sentence of the batch in one pass of the text tower
    scores = []
    for r, frames in zip(refs, parts):
        image_emb = features.images(r)  # (F, D), normalized
        per_frame = []
        for f, sentences in enumerate(frames):
            if not sentences:
                per_frame.append(0.0)  # a frame the story says nothing about scores 0
                continue
            cos = torch.stack([table[s] for s in sentences]) @ image_emb[f]  # (S,)
            per_frame.append((2.5 * cos.clamp(min=0)).mean().item())
        scores.append(sum(per_frame) / len(per_frame) if per_frame else 0.0)
    return torch.tensor(scores)

"""Multimodal Bradley-Terry reward models behind one interface, `RewardModel`.

Three backbones:

* **clip-fusion** (default, cheap). A frozen open_clip model (`rlhf.clip.ClipFeatures`) provides
  the image embedding of each frame (cached on disk by image sha256, so an image is encoded once
  per run and once across runs) and the CLIP text embedding of the story, sentence by sentence (so long stories are not cut
  at CLIP's 77 tokens), both for the whole story and for the part aligned with each frame. A Hugging
  Face text encoder with LoRA (peft) reads the prompt (instruction, style, context) and the story.
  An MLP fuses, per frame, [image, frame text, image⊙frame text, story text, text encoding] into a
  score, and the scores are averaged over the frames. With `fusion_layers` > 0, a small transformer
  reads the text encoder's token states and the frames together (every story token attends to every
  other token and to each frame), and its summary token replaces the mean-pooled text encoding: a
  name can be bound to its look across sentences, and a word to the frame that shows it. With
  `text_tuning="frozen"` the text encoder is not adapted: its token states are computed once per
  story, so an epoch costs only the fusion layers and the head, and many epochs are cheap. With
  `text_tuning="full"` every weight of the text encoder trains (a small encoder such as MiniLM; use a
  learning rate near 5e-5), and the saved model holds the whole encoder.
* **vlm**. A LLaVA or Qwen2-VL model with LoRA and a scalar head on the last non-pad token, as in
  LLaVA-RLHF.
* **policy**. A storypref policy (`rlhf.policy`: ViT-GPT2, LLaVA or Qwen2-VL), usually the SFT one,
  with LoRA and a scalar head on the hidden state after the story's last token: InstructGPT's reward
  model, which starts from the SFT model (Ouyang et al., 2022). It reads the frames with the policy's
  own vision tower and the story with the policy's own tokenizer and prompt, so it sees what the
  policy sees.

`score(images, instruction, story)` returns normalized scores: after training, the mean and std of
the chosen stories' scores on the train split are stored with the model, so reference outputs score
mean 0 and std 1. `save_pretrained` writes the config, the normalization and only the trained
weights (LoRA or, with `text_tuning="full"`, the text encoder; fusion layers and heads); `from_pretrained` rebuilds the frozen parts from their ids or paths.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from annotate.formats import format_prompt, plain_spans, plain_text
from rlhf.clip import ClipFeatures
from rlhf.data import ImageRef
from rlhf.entities import ENTITY_FEATURES, entity_features
from rlhf.loading import ModelLoadError, load_pretrained, local_path

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Sentence↔frame alignment, per frame f (cosines of normalized CLIP embeddings, × ALIGN_SCALE): the min,
# mean and max over f's own sentences against f's image, how well f's image is matched by the best
# sentence of the whole story, and, for the story, its worst-grounded sentence (the min over sentences
# of the max over frames) and the mean over sentences of that max. A single false look or phantom
# lowers one sentence's match; a mean over the frame's sentences hides it, a min does not.
ALIGN_FEATURES = 6
ALIGN_SCALE = 10.0
CONFIG_NAME = "reward_config.json"
WEIGHTS_NAME = "reward_weights.safetensors"
TEXT_TUNING = ("lora", "full", "frozen")  # clip-fusion: how the text encoder trains


@dataclass
class RewardModelConfig:
    backbone: str = "clip-fusion"  # clip-fusion | vlm | policy
    text_model: str = DEFAULT_TEXT_MODEL  # clip-fusion: AutoModel id or path; vlm: the VLM id or path; policy: a policy dir or id
    clip_model: str = "ViT-B-32"  # open_clip model name, or a local dir with open_clip_config.json
    clip_pretrained: str | None = "laion2b_s34b_b79k"
    use_images: bool = True  # False: a text-only ablation (no CLIP at all)
    use_text_encoder: bool = True  # False: a CLIP-only ablation
    sentence_alignment: bool = False  # clip-fusion: per-frame sentence↔frame cosine features (ALIGN_FEATURES)
    entity_features: bool = False  # clip-fusion: a learned linear term on who is described how (rlhf.entities)
    span_head: bool = False  # clip-fusion: a per-token head (text state + the frames) trained on span marks (train_rm --span_loss_coef)
    text_tuning: str = "lora"  # clip-fusion: lora (adapt the text encoder) | full (train all its weights) | frozen (states computed once)
    fusion_layers: int = 0  # clip-fusion: transformer layers over the story's token states and the frames (0: mean pooling)
    fusion_heads: int = 4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # default: peft's choice for the architecture
    hidden_size: int = 256
    max_length: int = 256
    max_frames: int = 8
    norm_mean: float = 0.0
    norm_std: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# The trainable modules.
# ------------------------------------------------------------------------------------------------


def _lora(model: nn.Module, cfg: RewardModelConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules)  # fmt: skip
    try:
        return get_peft_model(model, config)
    except ValueError:  # an architecture peft has no default for: adapt every linear layer
        return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                target_modules="all-linear"))  # fmt: skip


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C), (B, T) → (B, C): the sentence-transformers pooling."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)


def sentence_alignment(features: ClipFeatures, image_emb: torch.Tensor, story: str, n_frames: int) -> torch.Tensor:
    """(F, ALIGN_FEATURES) sentence↔frame features of `story` against its frames' normalized CLIP embeddings (F, D)."""
    from annotate.formats import frame_sentences

    parts = frame_sentences(story, n_frames)[: len(image_emb)]
    flat = [s for sentences in parts for s in sentences]
    out = torch.zeros(len(image_emb), ALIGN_FEATURES)
    if not flat:
        return out
    cos = features.sentences(flat) @ image_emb.T  # (S, F)
    best = cos.max(1).values  # (S,): each sentence's best frame
    out[:, 3] = cos.max(0).values  # each frame's best sentence anywhere in the story
    out[:, 4], out[:, 5] = best.min(), best.mean()
    start = 0
    for f, sentences in enumerate(parts):
        own = cos[start : start + len(sentences), f]
        start += len(sentences)
        if len(own):
            out[f, :3] = torch.stack([own.min(), own.mean(), own.max()])
    return out * ALIGN_SCALE


def span_token_labels(sequence_ids: list[int | None], offsets: list[tuple[int, int]], marks: list[tuple[int, int]]) -> torch.Tensor:
    """Per token of a (prompt, story) encoding: −100 unless a story token of a story with marks; then 0
    where the token overlaps a mark (plain-text offsets) and 1 elsewhere.

    >>> span_token_labels([None, 0, None, 1, 1, 1, None], [(0, 0), (0, 3), (0, 0), (0, 3), (4, 7), (8, 12), (0, 0)], [(4, 7)]).tolist()
    [-100, -100, -100, 1, 0, 1, -100]
    """
    labels = torch.full((len(offsets),), -100, dtype=torch.long)
    if not marks:
        return labels
    for t, (seq, (start, end)) in enumerate(zip(sequence_ids, offsets)):
        if seq == 1 and end > start:
            labels[t] = 0 if any(start < m_end and m_start < end for m_start, m_end in marks) else 1
    return labels


class FusionEncoder(nn.Module):
    """A summary token, the story's token states and the frames, through a few pre-norm transformer layers.

    Inputs: token states (B, T, C) with their mask (B, T), and per frame [image, frame text] CLIP
    embeddings (B, F, 2D) with their mask (B, F) (none for a text-only model). Each part is projected
    to `width`; frames get a learned position (their order in the story) and every part a type
    embedding. Output: the summary token's final state, (B, width).
    """

    def __init__(self, text_dim: int, frame_dim: int, width: int, layers: int, heads: int, max_frames: int):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, width)
        self.frame_proj = nn.Linear(frame_dim, width) if frame_dim else None
        self.frame_pos = nn.Embedding(max_frames, width) if frame_dim else None
        self.type_emb = nn.Embedding(3, width)  # summary, text, frame
        self.summary = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, states, mask, frames=None, frame_mask=None) -> torch.Tensor:
        b = states.shape[0]
        parts = [self.summary.expand(b, -1, -1) + self.type_emb.weight[0], self.text_proj(states) + self.type_emb.weight[1]]
        keep = [torch.ones(b, 1, dtype=torch.bool, device=states.device), mask.bool()]
        if self.frame_proj is not None and frames is not None:
            pos = self.frame_pos(torch.arange(frames.shape[1], device=frames.device).clamp(max=self.frame_pos.num_embeddings - 1))
            parts.append(self.frame_proj(frames) + pos + self.type_emb.weight[2])
            keep.append(frame_mask.bool())
        x = self.layers(torch.cat(parts, 1), src_key_padding_mask=~torch.cat(keep, 1))
        return self.norm(x[:, 0])


class ClipFusion(nn.Module):
    """Text encoder (LoRA, or frozen) + optional fusion layers + per-frame MLP over CLIP features; the CLIP model itself stays outside."""

    def __init__(self, cfg: RewardModelConfig, text_encoder: nn.Module | None, clip_dim: int):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = text_encoder
        text_dim = text_encoder.config.hidden_size if text_encoder is not None else 0
        self.fusion = None
        if cfg.fusion_layers:
            if text_encoder is None:
                raise ModelLoadError("fusion_layers needs the text encoder (use_text_encoder): it reads the story's token states")
            if cfg.hidden_size % cfg.fusion_heads:
                raise ModelLoadError(f"fusion_heads {cfg.fusion_heads} must divide hidden_size {cfg.hidden_size}")
            self.fusion = FusionEncoder(text_dim, 2 * clip_dim if cfg.use_images else 0, cfg.hidden_size, cfg.fusion_layers,
                                        cfg.fusion_heads, cfg.max_frames)  # fmt: skip
        pooled_dim = cfg.hidden_size if self.fusion is not None else text_dim
        in_dim = (4 * clip_dim + (ALIGN_FEATURES if cfg.sentence_alignment else 0) if cfg.use_images else 0) + pooled_dim
        self.head = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, cfg.hidden_size), nn.GELU(),
                                  nn.Linear(cfg.hidden_size, 1))  # fmt: skip
        if cfg.span_head:
            if text_encoder is None:
                raise ModelLoadError("span_head needs the text encoder (use_text_encoder): it scores the story's tokens")
            token_dim = text_dim + (clip_dim if cfg.use_images else 0)  # each token beside the mean of its frames
            self.span_head = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, cfg.hidden_size), nn.GELU(),
                                           nn.Linear(cfg.hidden_size, 1))  # fmt: skip
            self.span_scale = nn.Parameter(torch.tensor(1.0))  # how much the tokens' flaw scores move the reward (learned)
        if cfg.entity_features:  # starts at zero: the features move the reward only as far as the labels teach
            self.entity_head = nn.Linear(ENTITY_FEATURES, 1)
            nn.init.zeros_(self.entity_head.weight)
            nn.init.zeros_(self.entity_head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.text_encoder is not None and self.cfg.text_tuning == "frozen":
            self.text_encoder.eval()  # a frozen encoder never drops out: its states are computed once and must not vary
        return self

    def forward(self, input_ids=None, attention_mask=None, image_emb=None, frame_text_emb=None, frame_mask=None,
                story_text_emb=None, alignment=None, story_mask=None, token_labels=None,
                text_states=None, entity=None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(B,) scores; with `token_labels` (B, T) also the span head's (B, T) token logits (high: the token is fine).

        `text_states` (B, T, C): the text encoder's token states, computed before (a frozen encoder's,
        by `RewardModel.encode`); without them the encoder runs here.

        With `entity_features`, `entity` (B, ENTITY_FEATURES) adds a learned linear term (`rlhf.entities`).

        With a span head, the score is the fused score plus s · Σ_t log σ(logit_t) over the story's
        tokens (`story_mask`), s learned: each token the head takes for a marked one lowers the
        reward by up to s, fine tokens cost about nothing (fine-grained RLHF's sum of token rewards).
        """
        parts = []
        hidden = None
        if self.cfg.use_images:
            story = story_text_emb.unsqueeze(1).expand_as(frame_text_emb)  # (B, F, D)
            parts += [image_emb, frame_text_emb, image_emb * frame_text_emb, story]
            if self.cfg.sentence_alignment:
                parts.append(alignment)  # (B, F, ALIGN_FEATURES)
        if self.text_encoder is not None:
            if text_states is not None:
                hidden = text_states.to(self.text_encoder.dtype)
            else:
                hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
            if self.fusion is not None:
                frames = torch.cat([image_emb, frame_text_emb], -1) if self.cfg.use_images else None
                text = self.fusion(hidden, attention_mask, frames, frame_mask if self.cfg.use_images else None)  # (B, H)
            else:
                text = mean_pool(hidden, attention_mask)  # (B, C)
            n_frames = frame_mask.shape[1] if self.cfg.use_images else 1
            parts.append(text.unsqueeze(1).expand(-1, n_frames, -1))  # (B, F, C)
        x = torch.cat(parts, dim=-1)  # (B, F, in_dim)
        per_frame = self.head(x).squeeze(-1)  # (B, F)
        mask = frame_mask.to(per_frame.dtype) if self.cfg.use_images else torch.ones_like(per_frame)
        scores = (per_frame * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        if self.cfg.entity_features:
            scores = scores + self.entity_head(entity.to(scores.dtype)).squeeze(-1)
        if not self.cfg.span_head:
            return scores
        tokens = [hidden]  # (B, T, C)
        if self.cfg.use_images:
            frames = (image_emb * frame_mask.unsqueeze(-1)).sum(1) / frame_mask.sum(1, keepdim=True).clamp(min=1)  # (B, D)
            tokens.append(frames.unsqueeze(1).expand(-1, hidden.shape[1], -1))  # (B, T, D)
        logits = self.span_head(torch.cat(tokens, dim=-1)).squeeze(-1)  # (B, T)
        story = story_mask.to(logits.dtype) if story_mask is not None else attention_mask.to(logits.dtype)
        scores = scores + self.span_scale * (nn.functional.logsigmoid(logits) * story).sum(1)  # (B,)
        return scores if token_labels is None else (scores, logits)


class VLMScorer(nn.Module):
    """A VLM with LoRA and a scalar head on the last non-pad token's final hidden state."""

    def __init__(self, cfg: RewardModelConfig, vlm: nn.Module):
        super().__init__()
        self.vlm = _lora(vlm, cfg)
        hidden = vlm.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1)

    def forward(self, **inputs) -> torch.Tensor:
        out = self.vlm(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # (B, T, C)
        mask = inputs["attention_mask"]  # (B, T)
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # index of the last real token, any padding side
        return self.head(hidden[torch.arange(hidden.shape[0]), last].to(self.head.weight.dtype)).squeeze(-1)  # (B,)


class PolicyScorer(nn.Module):
    """A StoryPolicy (LoRA on its language model) and a scalar head on the hidden state that has read the whole story."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.head = nn.Linear(policy.hidden_size, 1)

    def forward(self, prompt, response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.policy.forward(prompt, response_ids, response_mask).hidden  # (B, T, C): hidden[:, j] predicts token j
        last = response_mask.sum(1) - 1  # the state that predicts the EOS `tokenize_responses` appends has read every story token
        return self.head(hidden[torch.arange(hidden.shape[0]), last].to(self.head.weight.dtype)).squeeze(-1)  # (B,)


# ------------------------------------------------------------------------------------------------
# The interface.
# ------------------------------------------------------------------------------------------------


class RewardModel:
    """`score(images, instruction, story)`, batching, and saving, for either backbone."""

    def __init__(self, cfg: RewardModelConfig, module: nn.Module, *, features: ClipFeatures | None = None,
                 tokenizer=None, processor=None, device: str = "cpu"):  # fmt: skip
        self.cfg, self.module, self.features = cfg, module, features
        self.tokenizer, self.processor, self.device = tokenizer, processor, device

    @classmethod
    def build(cls, cfg: RewardModelConfig, *, cache_dir: str | Path | None = None, device: str = "cpu") -> RewardModel:
        from transformers import AutoConfig

        if cfg.backbone not in ("clip-fusion", "vlm", "policy"):
            raise ModelLoadError(f"unknown backbone {cfg.backbone!r}; use clip-fusion, vlm or policy")
        if cfg.text_tuning not in TEXT_TUNING:
            raise ModelLoadError(f"unknown text_tuning {cfg.text_tuning!r}; use lora (adapt the text encoder with LoRA), "
                                 "full (train all of its weights) or frozen")  # fmt: skip
        if cfg.fusion_layers < 0:
            raise ModelLoadError(f"fusion_layers {cfg.fusion_layers}: give 0 (mean pooling) or more layers")
        if (cfg.text_tuning != "lora" or cfg.fusion_layers) and cfg.backbone != "clip-fusion":
            raise ModelLoadError(f"text_tuning and fusion_layers are clip-fusion options; backbone {cfg.backbone} adapts its model with LoRA")
        if cfg.entity_features and cfg.backbone != "clip-fusion":
            raise ModelLoadError(f"entity_features is a clip-fusion option; backbone {cfg.backbone} reads the story with its own model only. "
                                 "Use --backbone clip-fusion, or leave --entity_features off")  # fmt: skip
        if cfg.backbone == "policy":
            from rlhf.policy import LoraSpec, load_policy

            lora = LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules)
            policy = load_policy(cfg.text_model, lora=lora, device=device)  # its errors name the family and what to pass
            return cls(cfg, PolicyScorer(policy).to(device), device=device)
        model_config = load_pretrained(AutoConfig, cfg.text_model, "model config")
        is_vlm = hasattr(model_config, "vision_config")
        if cfg.backbone == "clip-fusion" and is_vlm:
            raise ModelLoadError(f"{cfg.text_model!r} is a vision-language model ({model_config.model_type}); "
                                 "use --backbone vlm for it, or give clip-fusion a text encoder as --text_model")  # fmt: skip
        if cfg.backbone == "vlm" and not is_vlm:
            raise ModelLoadError(f"{cfg.text_model!r} is a text-only model ({model_config.model_type}); "
                                 "--backbone vlm needs LLaVA or Qwen2-VL, or use --backbone clip-fusion")  # fmt: skip
        if cfg.backbone == "vlm":
            from transformers import AutoModelForImageTextToText, AutoProcessor

            vlm = load_pretrained(AutoModelForImageTextToText, cfg.text_model, "VLM")
            processor = load_pretrained(AutoProcessor, cfg.text_model, "VLM processor")
            return cls(cfg, VLMScorer(cfg, vlm).to(device), processor=processor, device=device)

        from transformers import AutoModel, AutoTokenizer

        features = ClipFeatures(cfg.clip_model, cfg.clip_pretrained, cache_dir, device) if cfg.use_images else None
        encoder = tokenizer = None
        if cfg.use_text_encoder:
            tokenizer = load_pretrained(AutoTokenizer, cfg.text_model, "tokenizer of text model")
            encoder = load_pretrained(AutoModel, cfg.text_model, "text model")
            if cfg.text_tuning == "frozen":
                encoder.requires_grad_(False)
                encoder.eval()
            elif cfg.text_tuning == "lora":
                encoder = _lora(encoder, cfg)  # (full: the encoder as loaded, every weight trainable)
            if cfg.span_head and not getattr(tokenizer, "is_fast", False):
                raise ModelLoadError(f"{cfg.text_model}: span marks need a fast tokenizer (its token offsets), and "
                                     f"{type(tokenizer).__name__} is not one; pick a text model with a tokenizer.json")  # fmt: skip
        if encoder is None and features is None:
            raise ModelLoadError("use_images and use_text_encoder cannot both be off: nothing would be read")
        module = ClipFusion(cfg, encoder, features.dim if features else 0).to(device)
        return cls(cfg, module, features=features, tokenizer=tokenizer, device=device)

    # -- batching -----------------------------------------------------------------------------

    def batch(self, images: list[list[ImageRef]], prompts: list[str], stories: list[str]) -> dict[str, Any]:
        """Model inputs for len(stories) (images, prompt, story) triples."""
        if self.cfg.backbone == "vlm":
            return self._vlm_batch(images, prompts, stories)
        if self.cfg.backbone == "policy":
            policy = self.module.policy  # the formatted prompt as its instruction: the policy wraps it as it wraps its own
            ids, mask = policy.tokenize_responses([plain_text(s) for s in stories])
            ids, mask = ids[:, : self.cfg.max_length], mask[:, : self.cfg.max_length]  # a longer story is scored on its start
            return {"prompt": policy.batch([[r.load() for r in refs] for refs in images], prompts), "response_ids": ids, "response_mask": mask}
        return self.collate(self.encode(images, prompts, stories))

    def encode(self, images: list[list[ImageRef]], prompts: list[str], stories: list[str],
               spans: list[list[dict]] | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        """clip-fusion: one unpadded example per triple (token ids, CLIP features), for `collate`.

        Training encodes its whole dataset once with this, as TRL's trainers tokenize up front, so a
        step only pads and stacks. `spans` (per story, its span marks, offsets into the story as
        given) adds `token_labels` for the span head: for a story with marks, 0 on a token inside a
        mark and 1 on its other story tokens; −100 (ignored) elsewhere and on stories without marks.
        """
        examples: list[dict[str, torch.Tensor]] = [{} for _ in stories]
        if self.cfg.entity_features:
            for ex, story in zip(examples, stories):
                ex["entity"] = torch.tensor(entity_features(story))
        if self.tokenizer is not None:
            labelled = spans is not None and self.cfg.span_head
            enc = self.tokenizer(prompts, [plain_text(s) for s in stories], truncation=True, max_length=self.cfg.max_length,
                                 return_offsets_mapping=labelled)  # fmt: skip
            for b, (ex, ids) in enumerate(zip(examples, enc["input_ids"])):
                ex["input_ids"] = torch.tensor(ids)
                if self.cfg.span_head:  # which tokens are the story's: their flaw scores enter the reward
                    ex["story_mask"] = torch.tensor([int(x == 1) for x in enc.sequence_ids(b)])
                if labelled:
                    ex["token_labels"] = span_token_labels(enc.sequence_ids(b), enc["offset_mapping"][b], plain_spans(stories[b], spans[b] or []))
            if self.cfg.text_tuning == "frozen":
                self._frozen_states(examples)
        if self.features is not None:
            counts = [max(1, len(refs[: self.cfg.max_frames])) for refs in images]
            texts = self.features.stories(stories, counts)
            for ex, refs, (frames, whole) in zip(examples, images, texts):
                refs = refs[: self.cfg.max_frames]
                ex["image_emb"] = self.features.images(refs) if refs else torch.zeros(1, self.features.dim)  # (k, D)
                ex["frame_text_emb"], ex["story_text_emb"] = frames, whole  # (k, D), (D,)
            if self.cfg.sentence_alignment:
                for ex, story, n in zip(examples, stories, counts):
                    ex["alignment"] = sentence_alignment(self.features, ex["image_emb"], story, n)
        return examples

    @torch.no_grad()
    def _frozen_states(self, examples: list[dict[str, torch.Tensor]], batch_size: int = 64) -> None:
        """A frozen text encoder's token states per example (`text_states`, (T, C), bfloat16), batched by length."""
        encoder = self.module.text_encoder
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        for k in range(0, len(order), batch_size):
            rows = [examples[i] for i in order[k : k + batch_size]]
            length = max(len(ex["input_ids"]) for ex in rows)
            ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(rows), length, dtype=torch.long)
            for j, ex in enumerate(rows):
                ids[j, : len(ex["input_ids"])], mask[j, : len(ex["input_ids"])] = ex["input_ids"], 1
            hidden = encoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            for j, ex in enumerate(rows):
                ex["text_states"] = hidden[j, : len(ex["input_ids"])].to("cpu", torch.bfloat16)

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad and stack `encode` outputs: token ids to the longest (right), frames to the most frames."""
        out: dict[str, torch.Tensor] = {}
        b = len(examples)
        if self.cfg.entity_features:
            out["entity"] = torch.stack([ex["entity"] for ex in examples])
        if self.tokenizer is not None:
            length = max(len(ex["input_ids"]) for ex in examples)
            ids = torch.full((b, length), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros(b, length, dtype=torch.long)
            for i, ex in enumerate(examples):
                ids[i, : len(ex["input_ids"])], mask[i, : len(ex["input_ids"])] = ex["input_ids"], 1
            out["input_ids"], out["attention_mask"] = ids, mask
            if "text_states" in examples[0]:
                states = torch.zeros(b, length, examples[0]["text_states"].shape[-1])
                for i, ex in enumerate(examples):
                    states[i, : len(ex["text_states"])] = ex["text_states"].float()
                out["text_states"] = states
            if self.cfg.span_head:
                story = torch.zeros(b, length, dtype=torch.long)
                for i, ex in enumerate(examples):
                    story[i, : len(ex["story_mask"])] = ex["story_mask"]
                out["story_mask"] = story
            if any("token_labels" in ex for ex in examples):
                labels = torch.full((b, length), -100, dtype=torch.long)
                for i, ex in enumerate(examples):
                    if "token_labels" in ex:
                        labels[i, : len(ex["token_labels"])] = ex["token_labels"]
                out["token_labels"] = labels
        if self.features is not None:
            n, d = max(len(ex["image_emb"]) for ex in examples), self.features.dim
            image_emb, frame_text, frame_mask = torch.zeros(b, n, d), torch.zeros(b, n, d), torch.zeros(b, n)
            for i, ex in enumerate(examples):
                k = len(ex["image_emb"])
                image_emb[i, :k], frame_text[i, :k], frame_mask[i, :k] = ex["image_emb"], ex["frame_text_emb"], 1
            story_text = torch.stack([ex["story_text_emb"] for ex in examples])
            out.update(image_emb=image_emb, frame_text_emb=frame_text, frame_mask=frame_mask, story_text_emb=story_text)
            if self.cfg.sentence_alignment:
                alignment = torch.zeros(b, n, ALIGN_FEATURES)
                for i, ex in enumerate(examples):
                    alignment[i, : len(ex["alignment"])] = ex["alignment"]
                out["alignment"] = alignment
        return out

    def _vlm_batch(self, images, prompts, stories):
        texts, pictures = [], []
        for refs, prompt, story in zip(images, prompts, stories):
            messages = [
                {"role": "user", "content": [*({"type": "image"} for _ in refs), {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": [{"type": "text", "text": plain_text(story)}]},
            ]
            texts.append(self.processor.apply_chat_template(messages, tokenize=False))
            pictures.append([r.load() for r in refs])
        enc = self.processor(text=texts, images=pictures if any(pictures) else None, padding=True, return_tensors="pt")
        return dict(enc)

    def raw_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**{k: v.to(self.device) for k, v in batch.items() if k != "token_labels"})

    @torch.no_grad()
    def score(self, images, instruction, story, context=None, style=None, batch_size: int = 32) -> torch.Tensor:
        """Normalized scores. One story → shape (); lists (one image list per story) → shape (B,)."""
        single = isinstance(story, str)
        stories = [story] if single else list(story)
        n = len(stories)
        if n == 0:
            return torch.zeros(0)
        as_list = lambda v: [v] * n if v is None or isinstance(v, str) else list(v)  # noqa: E731
        if single or (images and not isinstance(images[0], (list, tuple))):
            images = [images] * n if single else [[i] for i in images]
        refs = [[i if isinstance(i, ImageRef) else ImageRef(i) if isinstance(i, (str, Path)) else ImageRef(image=i) for i in imgs]
                for imgs in images]  # fmt: skip
        prompts = [format_prompt(i, s, c) for i, s, c in zip(as_list(instruction), as_list(style), as_list(context))]
        was_training = self.module.training
        self.module.eval()
        scores = torch.cat([self.raw_scores(self.batch(refs[k : k + batch_size], prompts[k : k + batch_size], stories[k : k + batch_size])).float().cpu()
                            for k in range(0, n, batch_size)])  # fmt: skip
        self.module.train(was_training)
        scores = (scores - self.cfg.norm_mean) / self.cfg.norm_std
        return scores[0] if single else scores

    # -- saving -------------------------------------------------------------------------------

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Exactly the weights training changes: LoRA adapters (or, with text_tuning full, the whole text encoder),
        the fusion layers and the heads."""
        full = self.cfg.backbone == "clip-fusion" and self.cfg.text_tuning == "full"
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()
                if "lora_" in k or k.startswith(("head.", "span_head.", "span_scale", "fusion.", "entity_head.")) or (full and k.startswith("text_encoder."))}  # fmt: skip

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.trained_state(), path / WEIGHTS_NAME)
        cfg = replace(self.cfg, text_model=local_path(self.cfg.text_model), clip_model=local_path(self.cfg.clip_model))
        (path / CONFIG_NAME).write_text(json.dumps(asdict(cfg), indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, cache_dir: str | Path | None = None, device: str = "cpu") -> RewardModel:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).exists():
            raise ModelLoadError(f"{path} holds no {CONFIG_NAME}: not a storypref reward model (train one with python -m rlhf.train_rm)")
        cfg = RewardModelConfig(**json.loads((path / CONFIG_NAME).read_text()))
        model = cls.build(cfg, cache_dir=cache_dir, device=device)
        missing = set(model.trained_state()) - set(state := load_file(path / WEIGHTS_NAME))
        if missing:
            raise ModelLoadError(f"{path}: weights missing for {sorted(missing)[:3]}…; the file does not match its config")
        try:
            model.module.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise ModelLoadError(
                f"{path}: its weights do not fit the backbone its config names ({cfg.backbone}, {cfg.text_model}); it was "
                f"trained on another backbone. Retrain it, or fix {CONFIG_NAME}. ({str(e).splitlines()[-1].strip()[:200]})"
            ) from None
        model.module.eval()
        return model

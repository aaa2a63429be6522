"""The clip-prefix story model (the ClipCap design): frozen CLIP embeddings → prefix vectors → GPT-2.

    frames 1..F ──CLIP image tower (frozen, cached)──► e_1 … e_F      (D each, normalized)
    story so far ─CLIP text tower (frozen)───────────► e_ctx          (D, the context's last words)
    mapper:  e ─► Linear(D, H) ─ tanh ─ Linear(H, L·C) ─► L vectors (C = GPT-2 width), + slot_i
    GPT-2:   [prefix of frame 1][…frame F][context slot][prompt tokens … "Story:"] ─► the story

The mapping network is ClipCap's MLP, applied to each input on its own with shared weights, so a
story of any length up to `max_frames` frames gets F·L (+ L for the context) prefix vectors; a
learned slot embedding per frame index (and one for the context) tells GPT-2 which frame a prefix
came from. Frames a batch row lacks are masked out of attention, as padding is. The instruction,
style and story so far also go to GPT-2 as ordinary prompt tokens, as in the ViT-GPT2 family, so
the context reaches the model twice: verbatim as tokens, and as one CLIP embedding in the prefix
(CLIP's view of it, in the same space as the frames).

CLIP itself is not part of this model: it is named by `config.clip_model` (an open_clip name, or a
local directory) and run by the policy adapter in `rlhf.policy`, which caches image embeddings by
sha256 as the reward model does. This module holds only what trains: the mapper, the slot
embeddings and GPT-2 (`ClipPrefixModel.gpt`, any `GPT2LMHeadModel`). LoRA goes on GPT-2's
projections, and the mapper and slot embeddings train in full beside it (`rlhf.policy`'s
`LORA_MODULES_TO_SAVE`); `--init tiny-clip-prefix` trains all of it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, GPT2Config, GPT2LMHeadModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

MODEL_TYPE = "storypref-clip-prefix"


def check_frames(n: int, limit: int) -> None:
    """A story of more frames than the model has slots for is refused, with what to do."""
    if n > limit:
        raise ValueError(f"a clip-prefix policy reads at most {limit} frames (its max_frames), got a story of {n}; "
                         "cut longer stories into next-frame windows with --window K")  # fmt: skip


@strict
class ClipPrefixConfig(PreTrainedConfig):
    """The mapper's shape and the CLIP it reads; `text_config` is GPT-2's own config."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2")}

    text_config: PreTrainedConfig | dict | None = None
    clip_model: str = "ViT-B-32"  # open_clip name, or a local directory with open_clip_config.json
    clip_pretrained: str | None = "laion2b_s34b_b79k"  # open_clip weights tag (None for a local directory)
    clip_dim: int = 512  # CLIP's embedding width
    prefix_length: int = 4  # prefix vectors per frame (and for the context)
    mapper_hidden: int = 0  # the MLP's hidden width; 0: (clip_dim + L·C) / 2, as ClipCap
    max_frames: int = 8  # frames a story may have (the slot embeddings)
    context_prefix: bool = True  # also embed the story so far with CLIP's text tower
    tie_word_embeddings: bool = True


class ClipPrefixModel(PreTrainedModel):
    """Mapper + slot embeddings + GPT-2; `forward`/`generate` take CLIP features, not pixels."""

    config_class = ClipPrefixConfig
    base_model_prefix = "clip_prefix"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2Block"]

    def __init__(self, config: ClipPrefixConfig):
        super().__init__(config)
        text = config.text_config
        width, length = text.n_embd, config.prefix_length
        hidden = config.mapper_hidden or (config.clip_dim + width * length) // 2
        self.mapper = nn.Sequential(nn.Linear(config.clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, width * length))
        self.slots = nn.Embedding(config.max_frames + 1, width)  # frame 0 … max_frames-1, then the context
        self.gpt = GPT2LMHeadModel(text)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and module in (self.mapper[0], self.mapper[2]):
            nn.init.normal_(module.weight, std=1.0 / module.in_features**0.5)
            nn.init.zeros_(module.bias)
        elif module is self.slots:
            nn.init.normal_(module.weight, std=0.02)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.gpt.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.gpt.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.gpt.get_output_embeddings()

    def prefix(self, frame_features: torch.Tensor, frame_mask: torch.Tensor,
               context_features: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(B, S·L, C) prefix vectors and their (B, S·L) mask, S = frames (+ 1 for the context)."""
        b, f, _ = frame_features.shape
        check_frames(f, self.config.max_frames)
        width, length = self.config.text_config.n_embd, self.config.prefix_length
        slots = torch.arange(f, device=frame_features.device)
        inputs, masks = [frame_features], [frame_mask]
        if self.config.context_prefix and context_features is not None:
            inputs.append(context_features[:, None])
            masks.append(context_mask[:, None] if context_mask is not None else torch.ones(b, 1, dtype=frame_mask.dtype, device=frame_mask.device))
            slots = torch.cat([slots, slots.new_tensor([self.config.max_frames])])
        feats = torch.cat(inputs, 1).to(self.gpt.get_input_embeddings().weight.dtype)  # (B, S, D)
        vectors = self.mapper(feats).view(b, feats.shape[1], length, width) + self.slots(slots)[None, :, None]  # (B, S, L, C)
        mask = torch.cat(masks, 1).repeat_interleave(length, 1)  # (B, S·L)
        return vectors.flatten(1, 2), mask

    def embed(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The prefix followed by the token embeddings, and the joint mask."""
        tokens = self.gpt.get_input_embeddings()(input_ids)
        return torch.cat([prefix.to(tokens.dtype), tokens], 1), torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, frame_features: torch.Tensor, frame_mask: torch.Tensor,
                context_features: torch.Tensor | None = None, context_mask: torch.Tensor | None = None, **kwargs):  # fmt: skip
        """GPT-2's output over prefix + tokens (logits and hidden states include the prefix positions)."""
        prefix, prefix_mask = self.prefix(frame_features, frame_mask, context_features, context_mask)
        embeds, mask = self.embed(prefix, prefix_mask, input_ids, attention_mask)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.gpt(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs)


def register() -> None:
    """Make `AutoConfig`/`AutoModel` know the clip-prefix model type (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, ClipPrefixConfig)
        AutoModel.register(ClipPrefixConfig, ClipPrefixModel)
    except ValueError:  # already registered
        pass


register()


def build_config(clip_model: str, clip_pretrained: str | None, clip_dim: int, text_config: GPT2Config, **kwargs) -> ClipPrefixConfig:
    return ClipPrefixConfig(text_config=text_config.to_dict(), clip_model=clip_model, clip_pretrained=clip_pretrained,
                            clip_dim=clip_dim, **kwargs)  # fmt: skip

"""Vision-language story policies behind one interface, `StoryPolicy`.

    policy = load_policy("Qwen/Qwen2-VL-2B-Instruct", lora=LoraSpec(r=16), dtype="bfloat16")
    batch = policy.batch(images=[[frame1, frame2]], instructions=["Tell a story about these images."])
    out = policy.generate(batch, max_new_tokens=96, temperature=0.7)    # ids, text, log-probs
    with policy.reference():                                             # the adapter switched off
        ref = policy.forward(batch, out.response_ids, out.response_mask, temperature=0.7)

Three families, each through a small adapter that builds the prompt, batches the images with the
right processor and runs the model:

* **vision-encoder-decoder** (ViT-GPT2, the comic-narration seed). Each frame goes through the
  image encoder on its own; the frames' patch states are concatenated (missing frames masked) and
  the text decoder cross-attends to all of them. The instruction, style and story so far are a
  decoder prefix, so the model continues after `Story:`.
* **llava** (LLaVA 1.5 and its kin) and **qwen2-vl** (Qwen2-VL, Qwen2.5-VL): decoder-only chat
  models. One image placeholder per frame, the processor expands them, prompts are left-padded.

Log-probabilities are always those of the sampling distribution, `log_softmax(logits / T)`, the
same in `generate` and `forward`, so PPO's ratio starts at exactly 1. Sampling is plain
temperature sampling (top-k and top-p off) unless asked otherwise, because PPO needs the true
sampling probabilities.

LoRA comes from peft. `policy.reference()` disables the adapter, so the reference model costs no
second copy. An SFT adapter given at load time is merged into the base weights first, so that the
reference is the SFT model and not the raw base.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from annotate.formats import format_prompt
from rlhf.loading import ModelLoadError, load_pretrained, local_path

POLICY_CONFIG = "storypref_policy.json"
STORY_CUE = "Story:"
# model_type of the loaded config -> family.
FAMILIES = {
    "vision-encoder-decoder": "vision-encoder-decoder",
    "llava": "llava",
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2-vl",
    "storypref-clip-prefix": "clip-prefix",
}
# LoRA targets: the language model only (the vision tower keeps its features).
LORA_TARGETS = {
    "vision-encoder-decoder": r".*decoder.*\.(c_attn|q_attn|c_proj|c_fc)$",
    "llava": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
    "qwen2-vl": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
    "clip-prefix": r".*gpt\..*\.(c_attn|c_proj|c_fc)$",
}
# Modules trained in full next to a LoRA adapter (peft's modules_to_save; the reference keeps the originals):
# clip-prefix's small mapping network, which a fresh model starts from random.
LORA_MODULES_TO_SAVE = {"clip-prefix": ["mapper", "slots"]}
# clip-prefix: the context's last words go through CLIP's text tower (77 tokens at most).
CONTEXT_WORDS = 40


class UnsupportedPolicyError(ModelLoadError):
    """A model whose family storypref cannot drive."""


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] | None = None  # default: the family's language-model projections


@dataclass
class PolicyBatch:
    """Prompt inputs for B stories. `inputs` go to the model; `prompt_ids`/`prompt_mask` are the text prompt."""

    inputs: dict[str, torch.Tensor]
    prompt_ids: torch.Tensor  # (B, P), left-padded
    prompt_mask: torch.Tensor  # (B, P)
    n_frames: list[int]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device) -> PolicyBatch:
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return PolicyBatch({k: move(v) for k, v in self.inputs.items()}, self.prompt_ids.to(device), self.prompt_mask.to(device), self.n_frames)

    def repeat(self, k: int) -> PolicyBatch:
        """Each row k times in a row (for K samples per prompt): row i becomes rows i*k … i*k+k-1."""
        return self if k == 1 else self.select([i for i in range(len(self)) for _ in range(k)])

    def select(self, rows: Sequence[int]) -> PolicyBatch:
        """The given rows (in that order, repeats allowed), with their own images: minibatches, repeats."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        per_image = {"pixel_values", "image_grid_thw", "image_sizes"}  # chat families: one entry (or patch run) per image
        inputs = {key: v[idx.to(v.device)] for key, v in self.inputs.items() if key not in per_image}
        grid = self.inputs.get("image_grid_thw")
        sizes = grid.prod(-1).tolist() if grid is not None else [1] * sum(self.n_frames)  # entries per image
        for key in per_image & self.inputs.keys():
            v = self.inputs[key]
            chunks = list(torch.split(v, sizes)) if key == "pixel_values" else list(v.split(1))
            by_row, start = [], 0
            for n in self.n_frames:
                by_row.append(chunks[start : start + n])
                start += n
            inputs[key] = torch.cat([c for r in idx.tolist() for c in by_row[r]])
        return PolicyBatch(inputs, self.prompt_ids[idx.to(self.prompt_ids.device)], self.prompt_mask[idx.to(self.prompt_mask.device)],
                           [self.n_frames[r] for r in idx.tolist()])  # fmt: skip


@dataclass
class Generation:
    response_ids: torch.Tensor  # (B, T), pad after the first EOS
    response_mask: torch.Tensor  # (B, T), 1 up to and including the first EOS
    logprobs: torch.Tensor  # (B, T), log p at the sampling temperature, 0 where masked
    texts: list[str]
    ended: torch.Tensor  # (B,) bool: the row produced an EOS


@dataclass
class ForwardOutput:
    logprobs: torch.Tensor  # (B, T) of response_ids at `temperature`
    logits: torch.Tensor  # (B, T, V) divided by the temperature
    hidden: torch.Tensor  # (B, T, C): the last hidden state that predicts each response token


@dataclass
class PolicyInfo:
    """What `save_pretrained` writes next to the adapter, so `load_policy(dir)` can rebuild the policy."""

    base: str
    family: str
    sft_adapter: str | None = None
    lora: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # adapters merged after sft_adapter, in order: a policy trained on top of a trained policy (DPO rounds, PPO after DPO)
    merged_after: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Family adapters.
# ------------------------------------------------------------------------------------------------


class _Adapter:
    family = ""

    def __init__(self, model, processor, tokenizer):
        self.model, self.processor, self.tokenizer = model, processor, tokenizer

    # the prompt --------------------------------------------------------------------------------
    def prompt_text(self, n_frames: int, instruction: str, style: str | None, context: str | None) -> str:
        raise NotImplementedError

    def batch(self, images: Sequence[Sequence], prompts: list[str], contexts: Sequence[str | None] | None = None) -> PolicyBatch:
        raise NotImplementedError

    # the model ---------------------------------------------------------------------------------
    def generate(self, model, batch: PolicyBatch, **kwargs) -> Any:
        raise NotImplementedError

    def forward(self, model, batch: PolicyBatch, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the last `keep` positions of `ids` (prompt + response), and the last hidden states of all."""
        raise NotImplementedError

    def positions(self, batch: PolicyBatch) -> tuple[int | None, int]:
        """(the model's position limit, or None where it has none that matters; positions before the prompt's tokens)."""
        return None, 0


def _left_padded(tok, prompts: Sequence[str], start_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt token ids (after `start_id`, if any), left-padded, and their mask."""
    rows = [([start_id] if start_id is not None else []) + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], mask[b, width - len(r) :] = torch.tensor(r), 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded attention mask, as `generate` computes them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class _ChatAdapter(_Adapter):
    """LLaVA and Qwen2-VL: a chat template with one image placeholder per frame, left padding."""

    def prompt_text(self, n_frames, instruction, style, context):
        messages = [{"role": "user", "content": [*({"type": "image"} for _ in range(n_frames)),
                                                 {"type": "text", "text": format_prompt(instruction, style, context)}]}]  # fmt: skip
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def batch(self, images, prompts, contexts=None):
        self.processor.tokenizer.padding_side = "left"
        flat = [img for frames in images for img in frames]
        enc = self.processor(text=prompts, images=flat or None, padding=True, return_tensors="pt")
        inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        return PolicyBatch(inputs, enc["input_ids"], enc["attention_mask"], [len(f) for f in images])

    def generate(self, model, batch, **kwargs):
        return model.generate(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, **batch.inputs, **kwargs)

    def forward(self, model, batch, ids, mask, keep):
        inputs = dict(batch.inputs)
        for key in ("mm_token_type_ids", "token_type_ids"):  # per-token inputs: the response is text (0)
            if key in inputs:
                inputs[key] = F.pad(inputs[key], (0, ids.shape[1] - inputs[key].shape[1]))
        if self.family != "qwen2-vl":  # Qwen computes its M-RoPE positions from the mask itself
            inputs["position_ids"] = _positions(mask)
        out = model(input_ids=ids, attention_mask=mask, **inputs, output_hidden_states=True, use_cache=False, logits_to_keep=keep)
        return out.logits, out.hidden_states[-1]


class _LlavaAdapter(_ChatAdapter):
    family = "llava"


class _QwenAdapter(_ChatAdapter):
    family = "qwen2-vl"


class _VisionEncoderDecoderAdapter(_Adapter):
    """ViT-GPT2: frames encoded one by one, patch states concatenated, the prompt as a decoder prefix."""

    family = "vision-encoder-decoder"

    def prompt_text(self, n_frames, instruction, style, context):
        return format_prompt(instruction, style, context) + "\n" + STORY_CUE

    def batch(self, images, prompts, contexts=None):
        tok = self.tokenizer
        k = max(len(f) for f in images)
        flat = [img for frames in images for img in frames]
        pixels = self.processor(images=flat, return_tensors="pt")["pixel_values"]  # (N, 3, H, W)
        frames = torch.zeros(len(images), k, *pixels.shape[1:], dtype=pixels.dtype)
        frame_mask = torch.zeros(len(images), k, dtype=torch.long)
        start = 0
        for b, f in enumerate(images):
            frames[b, : len(f)], frame_mask[b, : len(f)] = pixels[start : start + len(f)], 1
            start += len(f)
        start_id = tok.bos_token_id if tok.bos_token_id is not None else self.model_config.decoder_start_token_id
        ids, mask = _left_padded(tok, prompts, start_id)
        return PolicyBatch({"frames": frames, "frame_mask": frame_mask}, ids, mask, [len(f) for f in images])

    @property
    def model_config(self):
        return self.model.config

    def positions(self, batch):
        return getattr(self._parts(self.model).decoder.config, "n_positions", None), 0

    @staticmethod
    def _parts(model):
        """The VisionEncoderDecoderModel under any peft wrapping."""
        inner = model
        while not hasattr(inner, "encoder") or not hasattr(inner, "decoder"):
            inner = inner.model if hasattr(inner, "model") else inner.base_model
        return inner

    def encode(self, model, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        ved = self._parts(model)
        frames, frame_mask = batch.inputs["frames"], batch.inputs["frame_mask"]
        b, k = frame_mask.shape
        hidden = ved.encoder(pixel_values=frames.flatten(0, 1).to(ved.encoder.dtype)).last_hidden_state  # (B·K, P, C)
        if getattr(ved, "enc_to_dec_proj", None) is not None:
            hidden = ved.enc_to_dec_proj(hidden)
        p = hidden.shape[1]
        hidden = hidden.view(b, k * p, -1)  # (B, K·P, C)
        mask = frame_mask.repeat_interleave(p, 1)  # (B, K·P)
        return hidden, mask

    def generate(self, model, batch, **kwargs):
        ved = self._parts(model)
        hidden, enc_mask = self.encode(model, batch)
        return ved.decoder.generate(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                                    encoder_hidden_states=hidden, encoder_attention_mask=enc_mask, **kwargs)  # fmt: skip

    def forward(self, model, batch, ids, mask, keep):
        ved = self._parts(model)
        hidden, enc_mask = self.encode(model, batch)
        out = ved.decoder(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), encoder_hidden_states=hidden,
                          encoder_attention_mask=enc_mask, output_hidden_states=True, use_cache=False, logits_to_keep=keep)  # fmt: skip
        return out.logits, out.hidden_states[-1]


class _ClipPrefixAdapter(_Adapter):
    """clip-prefix (`rlhf.clip_prefix`): frozen CLIP features of the frames (and context) as a GPT-2 prefix.

    `batch` runs CLIP (image embeddings cached by sha256 in `self.features`), so the batch holds
    features, not pixels; the prompt is a token prefix after them, as in the ViT-GPT2 family.
    """

    family = "clip-prefix"
    features = None  # a rlhf.clip.ClipFeatures, set by _load_base
    prompt_text = _VisionEncoderDecoderAdapter.prompt_text  # the same token prompt, ending in `Story:`

    def batch(self, images, prompts, contexts=None):
        from rlhf.clip_prefix import check_frames
        from rlhf.data import ImageRef

        k, dim = max(len(f) for f in images), self.features.dim
        check_frames(k, self.model.config.max_frames)  # before any CLIP work
        emb = self.features.images([ImageRef(image=img) for frames in images for img in frames])  # (N, D)
        frame_features = torch.zeros(len(images), k, dim)
        frame_mask = torch.zeros(len(images), k, dtype=torch.long)
        start = 0
        for b, f in enumerate(images):
            frame_features[b, : len(f)], frame_mask[b, : len(f)] = emb[start : start + len(f)], 1
            start += len(f)
        tails = [" ".join(c.split()[-CONTEXT_WORDS:]) if c else "" for c in (contexts or [None] * len(images))]
        told = [t for t in tails if t]
        table = dict(zip(told, self.features.sentences(told)))
        context_features = torch.stack([table[t] if t else torch.zeros(dim) for t in tails])
        context_mask = torch.tensor([1 if t else 0 for t in tails])
        ids, mask = _left_padded(self.tokenizer, prompts, self.tokenizer.bos_token_id)
        inputs = {"frame_features": frame_features, "frame_mask": frame_mask, "context_features": context_features, "context_mask": context_mask}
        return PolicyBatch(inputs, ids, mask, [len(f) for f in images])

    @staticmethod
    def _parts(model):
        """The ClipPrefixModel under any peft wrapping (its LoRA layers are in place)."""
        from peft import PeftModel

        return model.get_base_model() if isinstance(model, PeftModel) else model

    def generate(self, model, batch, **kwargs):
        inner = self._parts(model)
        prefix, prefix_mask = inner.prefix(**batch.inputs)
        embeds, mask = inner.embed(prefix, prefix_mask, batch.prompt_ids, batch.prompt_mask)
        out = inner.gpt.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)  # returns the new tokens only
        out.sequences = torch.cat([batch.prompt_ids, out.sequences], 1)
        return out

    def positions(self, batch):
        config = self.model.config
        return config.text_config.n_positions, (batch.inputs["frame_features"].shape[1] + int(config.context_prefix)) * config.prefix_length

    def forward(self, model, batch, ids, mask, keep):
        out = self._parts(model)(input_ids=ids, attention_mask=mask, **batch.inputs, output_hidden_states=True, use_cache=False, logits_to_keep=keep)
        return out.logits, out.hidden_states[-1]


ADAPTERS = {a.family: a for a in (_VisionEncoderDecoderAdapter, _LlavaAdapter, _QwenAdapter, _ClipPrefixAdapter)}


# ------------------------------------------------------------------------------------------------
# The policy.
# ------------------------------------------------------------------------------------------------


class StoryPolicy(nn.Module):
    """A vision-language story model with an optional LoRA adapter; see the module docstring."""

    def __init__(self, model: nn.Module, adapter: _Adapter, info: PolicyInfo):
        super().__init__()
        self.model, self.adapter, self.info = model, adapter, info
        self.tokenizer = adapter.tokenizer
        self._checkpointed_layers: list[nn.Module] = []  # see enable_gradient_checkpointing

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def has_adapter(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        config = self.adapter._parts(self.model).decoder.config if self.family == "vision-encoder-decoder" else self.base_config.get_text_config()
        return config.hidden_size if hasattr(config, "hidden_size") else config.n_embd

    @property
    def base_config(self):
        return self.model.get_base_model().config if self.has_adapter else self.model.config

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def suppressed_ids(self) -> list[int]:
        """Tokens a story must never contain: image placeholders, vision markers, padding, BOS."""
        tok, config = self.tokenizer, self.base_config
        ids = {tok.pad_token_id, tok.bos_token_id, getattr(self.adapter.processor, "image_token_id", None)}
        ids |= {getattr(config, k, None) for k in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        return sorted(i for i in ids if i is not None and i != self.eos_token_id)

    def _suppress(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask the suppressed tokens (finite, so that entropies and log-probs stay NaN-free)."""
        idx = torch.tensor(self.suppressed_ids, dtype=torch.long, device=logits.device)
        return logits.index_fill(-1, idx, -1e9) if len(idx) else logits

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def adapter_hash(self) -> str | None:
        """A short hash of the trained adapter weights (None without an adapter): the candidates' origin."""
        if not self.has_adapter:
            return None
        h = hashlib.sha256()
        for name, p in sorted((n, p) for n, p in self.model.named_parameters() if "lora_" in n or "modules_to_save" in n):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:12]

    # -- prompts and batches ------------------------------------------------------------------

    def prompt(self, n_frames: int, instruction: str, style: str | None = None, context: str | None = None) -> str:
        return self.adapter.prompt_text(n_frames, instruction, style, context)

    def batch(self, images: Sequence[Sequence], instructions: Sequence[str] | str, styles=None, contexts=None) -> PolicyBatch:
        """Prompt inputs for len(images) stories; each entry of `images` is the frames (PIL or paths) of one story."""
        from PIL import Image

        n = len(images)
        as_list = lambda v: [v] * n if v is None or isinstance(v, str) else list(v)  # noqa: E731
        frames = [[Image.open(i).convert("RGB") if isinstance(i, (str, Path)) else i.convert("RGB") for i in f] for f in images]
        if any(not f for f in frames):
            raise ValueError("every story needs at least one image")
        prompts = [self.prompt(len(f), i, s, c) for f, i, s, c in zip(frames, as_list(instructions), as_list(styles), as_list(contexts))]
        return self.adapter.batch(frames, prompts, as_list(contexts)).to(self.device)

    def examples_batch(self, examples: Sequence, style: str | None = None) -> PolicyBatch:
        """Prompt inputs for `StoryExample`s: each one's frames, instruction, style (or `style` for all) and context."""
        return self.batch([e.load_images() for e in examples], [e.instruction for e in examples],
                          [style or e.style for e in examples], [e.context for e in examples])  # fmt: skip

    # -- generation and log-probs -------------------------------------------------------------

    @torch.no_grad()
    def generate(self, batch: PolicyBatch, max_new_tokens: int = 96, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, do_sample: bool = True, min_new_tokens: int = 0) -> Generation:  # fmt: skip
        """Sample one story per row. Log-probs are of the sampling distribution at `temperature`."""
        from transformers import GenerationConfig

        self._check_length(batch, max_new_tokens, "max_new_tokens")
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                                  top_k=top_k if do_sample else None, top_p=top_p if do_sample else None, min_new_tokens=min_new_tokens,
                                  eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, bos_token_id=self.tokenizer.bos_token_id,
                                  suppress_tokens=self.suppressed_ids, output_logits=True, return_dict_in_generate=True)  # fmt: skip
        out = self.adapter.generate(self.model, batch, generation_config=config)
        response = out.sequences[:, batch.prompt_ids.shape[1] :]  # (B, T)
        logits = self._suppress(torch.stack(out.logits, 1).float())  # (B, T, V), raw but for the suppressed tokens
        scale = temperature if do_sample else 1.0
        logprobs = torch.gather(F.log_softmax(logits / scale, -1), 2, response.unsqueeze(-1)).squeeze(-1)  # (B, T)
        mask, ended = self.response_mask(response)
        response = response.masked_fill(mask == 0, self.pad_token_id)
        return Generation(response, mask, logprobs.masked_fill(mask == 0, 0.0), self.decode(response, mask), ended)

    def _check_length(self, batch: PolicyBatch, new: int, what: str) -> None:
        """A clear error, instead of an index error deep in the model, when prompt + story outgrow its positions."""
        limit, before = self.adapter.positions(batch)
        need = before + batch.prompt_ids.shape[1] + new
        if limit is not None and need > limit:
            raise ValueError(
                f"{before + batch.prompt_ids.shape[1]} prompt positions ({before} of them image prefix) + {new} for the {what} need {need}, "
                f"more than this {self.family} model's {limit} (n_positions): shorten the story so far (--window K with a smaller "
                "K, or shorter contexts), lower --max_new_tokens, or build the model with more positions"
            )

    def response_mask(self, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask up to and including the first EOS, whether an EOS came) for (B, T) token ids."""
        is_eos = response == self.eos_token_id
        ended = is_eos.any(1)
        first = torch.where(ended, is_eos.int().argmax(1), torch.full_like(ended, response.shape[1], dtype=torch.long))
        mask = (torch.arange(response.shape[1], device=response.device)[None] <= first[:, None]).long()
        return mask, ended

    def decode(self, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True).strip() for r, m in zip(response, mask)]

    def forward(self, batch: PolicyBatch, response_ids: torch.Tensor, response_mask: torch.Tensor,
                temperature: float = 1.0) -> ForwardOutput:  # fmt: skip
        """Log-probs (at `temperature`) and last hidden states of `response_ids` given the prompt."""
        self._check_length(batch, response_ids.shape[1], "story")
        ids = torch.cat([batch.prompt_ids, response_ids], 1)
        mask = torch.cat([batch.prompt_mask, response_mask.to(batch.prompt_mask.dtype)], 1)
        t = response_ids.shape[1]
        with self._checkpointing():
            # Logits only where they are used: the prompt's (hundreds of image tokens × the vocabulary) are never built.
            logits, hidden = self.adapter.forward(self.model, batch, ids, mask, keep=t + 1)
        logits = self._suppress(logits[:, -t - 1 : -1].float()) / temperature  # position t predicts token t+1
        hidden = hidden[:, -t - 1 : -1]
        logprobs = torch.gather(F.log_softmax(logits, -1), 2, response_ids.unsqueeze(-1)).squeeze(-1)
        return ForwardOutput(logprobs.masked_fill(response_mask == 0, 0.0), logits, hidden)

    def tokenize_responses(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stories as response ids ending in EOS (right-padded), for SFT and for scoring given texts."""
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [self.eos_token_id] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
        return ids.to(self.device), mask.to(self.device)

    def response_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Per text, the character span of each token `tokenize_responses` gives it (its EOS not included).

        Needs a fast (Rust) tokenizer, which every supported family has; span marks map to tokens with it.
        """
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{type(self.tokenizer).__name__} is not a fast tokenizer, so token offsets are unknown; span marks "
                             "need one (load the policy's tokenizer with use_fast=True)")  # fmt: skip
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        return [[tuple(o) for o in offsets] for offsets in enc["offset_mapping"]]

    # -- the reference and training -----------------------------------------------------------

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run as the reference model: the LoRA adapter disabled (the merged SFT weights remain)."""
        if not self.has_adapter:
            raise RuntimeError("this policy has no LoRA adapter, so it has no built-in reference; load it with lora=LoraSpec()")
        with self.model.disable_adapter():
            yield

    def enable_gradient_checkpointing(self) -> None:
        """Non-reentrant checkpointing that works with peft (inputs that require grad).

        transformers checkpoints a layer only in train mode, and PPO keeps the model in eval mode
        (dropout off), so `forward` turns the checkpointed layers, and only them, to train mode while
        gradients are on. Generation and no-grad passes run as before, with the KV cache.
        """
        from transformers.modeling_layers import GradientCheckpointingLayer

        base = self.model.get_base_model() if self.has_adapter else self.model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
        base.config.use_cache = False
        self._checkpointed_layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]

    @contextlib.contextmanager
    def _checkpointing(self) -> Iterator[None]:
        layers = self._checkpointed_layers if torch.is_grad_enabled() else []
        modes = [m.training for m in layers]
        for m in layers:
            m.training = True  # the layer's own flag only: its dropout modules keep theirs
        try:
            yield
        finally:
            for m, mode in zip(layers, modes):
                m.training = mode

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save_pretrained(self, path: str | Path) -> None:
        """The adapter (or the full model without one), the processor, and storypref_policy.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        proc = self.adapter.processor
        if proc is not None:
            proc.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        info = self.info if self.has_adapter else PolicyInfo(base=str(path), family=self.family)
        (path / POLICY_CONFIG).write_text(json.dumps(asdict(info), indent=1))


# ------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------


def _dtype(dtype: str | torch.dtype | None):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}[dtype]  # fmt: skip


def family_of(name_or_path: str) -> str:
    from transformers import AutoConfig

    import rlhf.clip_prefix  # noqa: F401  (registers the clip-prefix model type with AutoConfig)

    config = load_pretrained(AutoConfig, name_or_path, "policy config")
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UnsupportedPolicyError(
            f"{name_or_path!r} is a {config.model_type!r} model; storypref policies are VisionEncoderDecoder "
            "(ViT-GPT2), clip-prefix (rlhf.sft --init tiny-clip-prefix), LLaVA, Qwen2-VL or Qwen2.5-VL"
        )
    return family


def load_policy(name_or_path: str, lora: LoraSpec | dict | None = None, *, sft_adapter: str | None = None,
                dtype: str | torch.dtype | None = None, device_map=None, device: str | None = None,
                trainable: bool = True) -> StoryPolicy:  # fmt: skip
    """A `StoryPolicy` for an HF id or path, or a directory that `StoryPolicy.save_pretrained` wrote.

    `sft_adapter` (a peft adapter dir) is merged into the base first; `lora` then adds a fresh
    trainable adapter on top. A saved policy dir with an adapter loads the base it names and merges
    the SFT adapter recorded with it; then, without `lora`, it loads the adapter as it is (trainable
    if `trainable`), and with `lora` it merges that adapter too and adds a fresh one (PPO after a
    LoRA SFT: the reference is the SFT model).
    """
    from peft import PeftModel

    saved = Path(name_or_path) / POLICY_CONFIG
    if saved.exists() and (Path(name_or_path) / "adapter_config.json").exists():  # an adapter saved by save_pretrained
        info = PolicyInfo(**json.loads(saved.read_text()))
        merged = [a for a in (info.sft_adapter, *info.merged_after) if a]
        if lora is None and sft_adapter is None:  # use it as it is (generate, evaluate, or more training of it)
            base = _load_base(info.base, info.family, merged, dtype, device_map, device)
            model = PeftModel.from_pretrained(base.model, name_or_path, is_trainable=trainable)
            base.model, base.info, base.adapter.model = model, info, model
            return base
        # Fine-tuning on top of it (PPO after LoRA SFT): it is merged, so it is part of the reference.
        merged += [str(Path(name_or_path).resolve())] + ([sft_adapter] if sft_adapter else [])
        policy = _load_base(info.base, info.family, merged, dtype, device_map, device)
        return _add_lora(policy, lora)
    family = family_of(name_or_path)
    return _add_lora(_load_base(name_or_path, family, [sft_adapter] if sft_adapter else [], dtype, device_map, device), lora)


def _add_lora(policy: StoryPolicy, lora: LoraSpec | dict | None) -> StoryPolicy:
    """A fresh trainable LoRA adapter on the family's language-model projections."""
    from peft import LoraConfig, get_peft_model

    if lora is None:
        return policy
    spec = lora if isinstance(lora, LoraSpec) else LoraSpec(**lora)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules or LORA_TARGETS[policy.family],
                        modules_to_save=LORA_MODULES_TO_SAVE.get(policy.family))  # fmt: skip
    policy.model = policy.adapter.model = get_peft_model(policy.model, config).eval()  # peft's new modules start in train mode
    policy.info.lora = asdict(spec)
    return policy


def _load_base(name_or_path, family, merged: list[str], dtype, device_map, device) -> StoryPolicy:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    kwargs = {"dtype": _dtype(dtype)} if dtype else {}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if family == "vision-encoder-decoder":
        from transformers import VisionEncoderDecoderModel

        model = load_pretrained(VisionEncoderDecoderModel, name_or_path, "policy", **kwargs)
        processor = load_pretrained(AutoImageProcessor, name_or_path, "image processor")
        tokenizer = load_pretrained(AutoTokenizer, name_or_path, "tokenizer")
    elif family == "clip-prefix":
        from rlhf.clip_prefix import ClipPrefixModel

        model = load_pretrained(ClipPrefixModel, name_or_path, "policy", **kwargs)
        processor, tokenizer = None, load_pretrained(AutoTokenizer, name_or_path, "tokenizer")
    else:
        model = load_pretrained(AutoModelForImageTextToText, name_or_path, "policy", **kwargs)
        processor = load_pretrained(AutoProcessor, name_or_path, "processor")
        tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for sft_adapter in merged:  # SFT adapters, merged in order: they become part of the base (and of the reference)
        from peft import PeftModel

        if not (Path(sft_adapter) / "adapter_config.json").exists():
            raise ModelLoadError(f"--sft_adapter {sft_adapter}: no adapter_config.json there; pass the directory rlhf.sft wrote")
        model = PeftModel.from_pretrained(model, sft_adapter).merge_and_unload()
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()  # dropout off: generation and PPO's log-probs must agree
    adapter = ADAPTERS[family](model, processor, tokenizer)
    if family == "clip-prefix":  # the frozen CLIP it reads, named in its config; embeddings cached as PPO's are
        from rlhf.clip import DEFAULT_CACHE, ClipFeatures

        cfg = model.config
        adapter.features = ClipFeatures(cfg.clip_model, cfg.clip_pretrained, DEFAULT_CACHE,
                                        str(next(model.parameters()).device))  # fmt: skip
        if adapter.features.dim != cfg.clip_dim:
            raise ModelLoadError(f"{name_or_path}: its mapper reads {cfg.clip_dim}-d CLIP embeddings, but {cfg.clip_model} makes {adapter.features.dim}-d ones")
    merged = [local_path(a) for a in merged]  # absolute: loads from any cwd
    return StoryPolicy(model, adapter, PolicyInfo(base=local_path(name_or_path), family=family, sft_adapter=merged[0] if merged else None,
                                                  merged_after=merged[1:]))  # fmt: skip

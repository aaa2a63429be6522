"""A pretrained vision encoder for storyworld's policies: a tiny ViT taught what is in each frame.

A real ViT-GPT2 starts from a ViT pretrained on ImageNet (`VisionEncoderDecoderModel.
from_encoder_decoder_pretrained("google/vit-base-patch16-224-in21k", "gpt2")`), and LLaVA from a
CLIP. Such weights cannot be downloaded here, and a ViT trained from scratch on stories alone, in a
few CPU minutes, learns the settings but not the colors and shapes (the SFT policy's color words
were right at chance rate). `train_vit` plays ImageNet's part: it trains the ViT of
`rlhf.sft --init tiny-vit-gpt2` on the world's frames to say which looks (color + shape), setting
and time each frame shows (multi-label, binary cross-entropy on the mean of the patch tokens), and
writes a Hugging Face `ViTModel` and its image processor, which `rlhf.sft --vision_encoder DIR` loads
by path like any hub ViT. Held-out accuracy is reported against chance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from storyworld.scene import COLORS, SETTINGS, SHAPES, TIMES, Frame, free_values

LOOKS = [(c, s) for c in COLORS for s in SHAPES]
# The size of rlhf.sft's random tiny ViT (build_tiny_vit_gpt2), written twice because storyworld
# imports nothing of storypref; tests/test_sft_generate.py checks that the two agree.
VIT_CONFIG = {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 256, "patch_size": 8,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # fmt: skip


LABELS = [*LOOKS, *SETTINGS, *TIMES, *COLORS, *SHAPES]  # what train_vit teaches, in its head's order


def frame_labels(frame: Frame) -> list[int]:
    """Indices of the frame's true labels among LABELS: its looks, setting, time, colors and shapes.

    The colors and shapes alone are dense labels (a look is rare: 1 of 40). They help a little
    (held-out shape 0.20 -> 0.22 at 360 steps, chance 0.21); what teaches shapes is more frames
    (`train_vit(fresh_scenes=...)`, docs/BENCHMARKS.md).
    """
    base = len(LOOKS) + len(SETTINGS) + len(TIMES)
    looks = sorted({LOOKS.index((e.color, e.shape)) for e in frame.entities})
    colors = sorted({base + list(COLORS).index(e.color) for e in frame.entities})
    shapes = sorted({base + len(COLORS) + SHAPES.index(e.shape) for e in frame.entities})
    return [*looks, len(LOOKS) + list(SETTINGS).index(frame.setting), len(LOOKS) + len(SETTINGS) + TIMES.index(frame.time), *colors, *shapes]


def look_accuracy(logits, frames: list[Frame]) -> dict[str, float]:
    """For each entity, whether its true color (shape) scores above the colors (shapes) that no entity
    of the frame has with its shape (color): the policy must tell "a red circle" from "a blue circle"
    and from "a red star". Chance is 1 / (number of options), averaged over entities."""
    out: dict[str, float] = {}
    for attribute in ("color", "shape"):
        hits, chance = [], []
        for row, frame in zip(logits, frames):
            for e in frame.entities:
                options = [getattr(e, attribute), *free_values(frame, e, attribute)]
                look = (lambda v: (v, e.shape)) if attribute == "color" else (lambda v: (e.color, v))
                best = max(options, key=lambda v: float(row[LOOKS.index(look(v))]))
                hits.append(best == getattr(e, attribute))
                chance.append(1 / len(options))
        out |= {attribute: sum(hits) / len(hits), f"{attribute}_chance": sum(chance) / len(chance)}
    return out | {"entities": len(hits)}


def train_vit(world_dir: str | Path, out: str | Path, image_size: int | tuple[int, int] = 64, batch_size: int = 128, lr: float = 1e-3,
              max_minutes: float = 1.5, max_steps: int = 2000, seed: int = 0, fresh_scenes: int = 0) -> dict:  # fmt: skip
    """Train the tiny ViT on `world_dir`'s frames, save it to `out` (HF layout), and return its report.

    `fresh_scenes` adds the frames of that many new random scenes (`world.fresh_frames`) to the
    training set: the world's own frames are few, and on them alone the ViT memorizes and reads
    shapes at chance. The report is always on the world's held-out frames.
    """
    import torch
    from PIL import Image
    from tqdm import tqdm
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from storyworld.world import fresh_frames, world_frames

    torch.manual_seed(seed)
    world_dir, out = Path(world_dir), Path(out)
    train, held = world_frames(world_dir)  # every 10th item held out for the report
    if not train or not held:
        raise ValueError(f"{world_dir}: too few items to train and evaluate a ViT; make at least 20")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    processor = ViTImageProcessor(size={"height": height, "width": width})
    n_labels = len(LABELS)

    def load(rows):  # every frame decoded once, up front, 1,000 at a time
        pixels = torch.cat([processor([p if isinstance(p, Image.Image) else Image.open(p).convert("RGB") for p, _ in rows[k : k + 1000]],
                                      return_tensors="pt")["pixel_values"] for k in range(0, len(rows), 1000)])  # (N, 3, H, W)
        targets = torch.zeros(len(rows), n_labels)
        for i, (_, frame) in enumerate(rows):
            targets[i, frame_labels(frame)] = 1
        return pixels, targets

    if fresh_scenes:
        train = train + fresh_frames(fresh_scenes, seed, Image.open(train[0][0]).size)
    (x_train, y_train), (x_held, y_held) = load(train), load(held)
    vit = ViTModel(ViTConfig(image_size=[height, width], **VIT_CONFIG), add_pooling_layer=False)
    head = torch.nn.Linear(VIT_CONFIG["hidden_size"], n_labels)
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))

    def logits(x):
        return head(vit(pixel_values=x).last_hidden_state.mean(1))  # (B, labels)

    gen = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    vit.train()
    bar = tqdm(total=max_steps, desc="train-vit", unit="step")
    for _ in range(max_steps):
        idx = torch.randint(len(x_train), (batch_size,), generator=gen)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.perf_counter() - start > max_minutes * 60:
            break
    bar.close()
    vit.eval()
    with torch.no_grad():
        held_logits = logits(x_held)
        held_loss = torch.nn.functional.binary_cross_entropy_with_logits(held_logits, y_held).item()
    setting = held_logits[:, len(LOOKS) : len(LOOKS) + len(SETTINGS)].argmax(1) == y_held[:, len(LOOKS) : len(LOOKS) + len(SETTINGS)].argmax(1)
    report = {
        "held_out": {**look_accuracy(held_logits, [f for _, f in held]), "setting": setting.float().mean().item(),
                     "setting_chance": 1 / len(SETTINGS), "loss": round(held_loss, 4)},  # fmt: skip
        "train_frames": len(train),
        "held_out_frames": len(held),
        "steps": len(losses),
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "minutes": round((time.perf_counter() - start) / 60, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    vit.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


__all__ = ["LABELS", "LOOKS", "VIT_CONFIG", "frame_labels", "look_accuracy", "train_vit"]

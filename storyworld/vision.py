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

from storyworld.scene import COLORS, SETTINGS, SHAPES, TIMES, Frame, drawing_order, free_values

LOOKS = [(c, s) for c in COLORS for s in SHAPES]
# The size of rlhf.sft's random tiny ViT (build_tiny_vit_gpt2), written twice because storyworld
# imports nothing of storypref; tests/test_sft_generate.py checks that the two agree.
VIT_CONFIG = {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 256, "patch_size": 8,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # fmt: skip


LABELS = [*LOOKS, *SETTINGS, *TIMES, *COLORS, *SHAPES]  # what train_vit teaches, in its head's order
BACKGROUND = len(LOOKS)  # the patch label of a patch that shows no entity


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


def patch_labels(frame: Frame, rows: int, cols: int, size: tuple[int, int]) -> list[int]:
    """For each patch of a rows x cols grid over the frame, row by row: the index in LOOKS of the
    entity drawn on top at the patch's centre, or BACKGROUND. `size` is the frame's (width, height)
    as rendered; the grid stretches over it as the image processor's resize does.

    An entity's own centre patch always carries its look, so that a small object that covers no
    patch centre is still labeled.
    """
    w, h = size
    out = [BACKGROUND] * (rows * cols)
    for e in drawing_order(frame):  # later ones are drawn on top
        look = LOOKS.index((e.color, e.shape))
        left, top, right, bottom = e.box(w, h)
        for r in range(rows):
            for c in range(cols):
                if top <= (r + 0.5) / rows * h <= bottom and left <= (c + 0.5) / cols * w <= right:
                    out[r * cols + c] = look
        out[min(rows - 1, int(e.y * rows)) * cols + min(cols - 1, int(e.x * cols))] = look
    return out


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
              max_minutes: float = 1.5, max_steps: int = 2000, seed: int = 0, fresh_scenes: int = 0, patch_weight: float = 1.0) -> dict:  # fmt: skip
    """Train the tiny ViT on `world_dir`'s frames, save it to `out` (HF layout), and return its report.

    `fresh_scenes` adds the frames of that many new random scenes (`world.fresh_frames`) to the
    training set: the world's own frames are few, and on them alone the ViT memorizes and reads
    shapes at chance. `patch_weight` weighs a second, dense loss: each patch token says which look
    is drawn there (`patch_labels`, cross-entropy), as a detector's pretraining teaches where things
    are; from the frame's labels alone the ViT learns colors but hardly shapes, and the policy's
    decoder attends to the patch tokens, not to their mean (docs/BENCHMARKS.md, storyworld). 0 turns
    it off. The report is always on the world's held-out frames.
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
    grid = (height // VIT_CONFIG["patch_size"], width // VIT_CONFIG["patch_size"])
    frame_size = Image.open(train[0][0]).size  # as the world rendered it, (width, height)

    def load(rows):  # every frame decoded once, up front, 1,000 at a time
        pixels = torch.cat([processor([p if isinstance(p, Image.Image) else Image.open(p).convert("RGB") for p, _ in rows[k : k + 1000]],
                                      return_tensors="pt")["pixel_values"] for k in range(0, len(rows), 1000)])  # (N, 3, H, W)
        targets = torch.zeros(len(rows), n_labels)
        for i, (_, frame) in enumerate(rows):
            targets[i, frame_labels(frame)] = 1
        patches = torch.tensor([patch_labels(frame, *grid, frame_size) for _, frame in rows])  # (N, rows * cols)
        return pixels, targets, patches

    if fresh_scenes:
        train = train + fresh_frames(fresh_scenes, seed, frame_size)
    (x_train, y_train, p_train), (x_held, y_held, p_held) = load(train), load(held)
    vit = ViTModel(ViTConfig(image_size=[height, width], **VIT_CONFIG), add_pooling_layer=False)
    head = torch.nn.Linear(VIT_CONFIG["hidden_size"], n_labels)
    patch_head = torch.nn.Linear(VIT_CONFIG["hidden_size"], len(LOOKS) + 1)  # the looks and BACKGROUND
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters(), *patch_head.parameters()], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))

    def logits(x):  # (B, labels) from the mean of the tokens; (B, patches, looks + 1) from each patch token
        hidden = vit(pixel_values=x).last_hidden_state  # (B, 1 + patches, D): [CLS] first
        return head(hidden.mean(1)), patch_head(hidden[:, 1:])

    def loss_of(frame_logits, patch_logits, y, patches):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(frame_logits, y)
        if patch_weight:
            loss = loss + patch_weight * torch.nn.functional.cross_entropy(patch_logits.flatten(0, 1), patches.flatten())
        return loss

    gen = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    vit.train()
    bar = tqdm(total=max_steps, desc="train-vit", unit="step")
    for _ in range(max_steps):
        idx = torch.randint(len(x_train), (batch_size,), generator=gen)
        loss = loss_of(*logits(x_train[idx]), y_train[idx], p_train[idx])
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
        held_logits, held_patches = logits(x_held)
        held_loss = loss_of(held_logits, held_patches, y_held, p_held).item()
    shown = p_held != BACKGROUND  # patches that show an entity; the patch head is untrained without the patch loss
    patch_look = (held_patches.argmax(-1)[shown] == p_held[shown]).float().mean().item() if patch_weight else None
    setting = held_logits[:, len(LOOKS) : len(LOOKS) + len(SETTINGS)].argmax(1) == y_held[:, len(LOOKS) : len(LOOKS) + len(SETTINGS)].argmax(1)
    report = {
        "held_out": {**look_accuracy(held_logits, [f for _, f in held]), "setting": setting.float().mean().item(),
                     "setting_chance": 1 / len(SETTINGS), "patch_look": patch_look, "patch_look_chance": 1 / len(LOOKS),
                     "loss": round(held_loss, 4)},  # fmt: skip
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


__all__ = ["BACKGROUND", "LABELS", "LOOKS", "VIT_CONFIG", "frame_labels", "look_accuracy", "patch_labels", "train_vit"]

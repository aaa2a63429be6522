"""A tiny CLIP for storyworld, trained contrastively on (frame, caption) pairs in a few CPU minutes.

Real CLIP weights cannot be downloaded here, so the CLIP reward signal and the reward model's image
tower need a CLIP that knows this world. `train_clip` builds an open_clip model of the standard
architecture (a small ResNet and text transformer), trains it with the symmetric InfoNCE loss of
Radford et al. (2021) on the world's frames and factual captions, and writes `open_clip_config.json`
plus `open_clip_model.safetensors`: the layout open_clip loads with `create_model_and_transforms(
"local-dir:DIR")`, exactly as a user would load a hub model. On held-out items it reports retrieval
accuracy and how often the true color (shape) of an entity beats the swapped ones, against chance.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

from storyworld.grammar import describe_frame
from storyworld.scene import SETTINGS, TIMES, Frame, free_values

# The image tower is open_clip's ModifiedResNet (the RN50 architecture, one block per stage, width
# 16): on this world's frames and a CPU-minute budget it reads colors where a ViT of the same cost
# does not (the color of a lone held-out shape: 0.91 against 0.24; docs/BENCHMARKS.md, storyworld).
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
PREPROCESS_CFG = {"resize_mode": "squash", "interpolation": "bicubic"}  # keep the whole frame, no crop


def load_clip(path_or_name: str, pretrained: str | None = None, device: str = "cpu"):
    """(model, preprocess, tokenizer) for a local directory or an open_clip model name + pretrained tag."""
    import open_clip

    name = f"local-dir:{path_or_name}" if Path(path_or_name).is_dir() else path_or_name
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def swapped_caption(frame: Frame, k: int, rng: random.Random, attribute: str | None = None) -> str:
    """A hard negative for caption `k` of `describe_frame(frame)`: one attribute changed, so it is false.

    The setting caption (k = 0) gets another setting or time; an entity caption another color or
    shape that no entity of the frame has in that combination. `attribute` picks which (random if None).
    """
    if k == 0:
        if (attribute or rng.choice(["setting", "time"])) == "setting":
            return describe_frame(replace(frame, setting=rng.choice([s for s in SETTINGS if s != frame.setting])))[0]
        return describe_frame(replace(frame, time=next(t for t in TIMES if t != frame.time)))[0]
    e = frame.entities[k - 1]
    attribute = attribute or rng.choice(["color", "shape"])
    other = replace(e, **{attribute: rng.choice(free_values(frame, e, attribute))})
    return describe_frame(replace(frame, entities=[other]))[1]


def attribute_accuracy(model, tokenizer, images, frames: list[Frame]) -> dict[str, float]:
    """How often the true entity caption beats every caption that differs only in color (or shape).

    This is what a story reward needs from a CLIP: "a red circle" must score above "a black
    circle" on a frame with a red circle. Chance is 1 / (number of options) averaged over entities.
    `<attribute>_alone` counts frames with one entity only; with several, a caption may also pair one
    entity's color with another's shape (binding, which small CLIPs are known to do poorly).
    """
    import torch

    out: dict[str, float] = {}
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)  # (N, D)
        for attribute in ("color", "shape"):
            hits, alone, chance = [], [], []
            for i, frame in enumerate(frames):
                for e in frame.entities:
                    options = [getattr(e, attribute), *free_values(frame, e, attribute)]
                    captions = [describe_frame(replace(frame, entities=[replace(e, **{attribute: v})]))[1] for v in options]
                    txt = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)  # (V, D)
                    hits.append(options[int((txt @ img[i]).argmax())] == getattr(e, attribute))
                    chance.append(1 / len(options))
                    if len(frame.entities) == 1:
                        alone.append(hits[-1])
            out[attribute] = sum(hits) / len(hits)
            out[f"{attribute}_alone"] = sum(alone) / len(alone) if alone else float("nan")
            out[f"{attribute}_chance"] = sum(chance) / len(chance)
    out["entities"] = len(hits)
    return out


def retrieval_accuracy(model, tokenizer, images, captions: list[str]) -> dict[str, float]:
    """Top-1 text→image and image→text accuracy of matching pairs among len(captions) candidates."""
    import torch

    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)  # (N, D)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)  # (N, D)
    sims = txt @ img.T  # (N, N)
    target = torch.arange(len(captions))
    return {
        "text_to_image": (sims.argmax(1) == target).float().mean().item(),
        "image_to_text": (sims.argmax(0) == target).float().mean().item(),
        "chance": 1 / len(captions),
        "candidates": len(captions),
    }


def train_clip(
    world_dir: str | Path,
    out: str | Path,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 2e-3,
    max_minutes: float = 5.0,
    seed: int = 0,
    eval_candidates: int = 100,
    hard_negatives: bool = True,
    fresh_scenes: int = 0,
) -> dict:
    """Train the tiny CLIP on `world_dir`, save it to `out`, and return its report (also saved).

    With `hard_negatives`, each image is also contrasted with its own caption with one attribute
    swapped (`swapped_caption`), as NegCLIP does (Yuksekgonul et al., 2023): in-batch negatives
    almost never differ in color alone, so without them a CLIP learns the setting long before the looks.

    `fresh_scenes` adds the frames of that many new random scenes to the training set; with three
    times the steps it lifts color and shape reading (docs/BENCHMARKS.md, storyworld). (A dense loss
    on the tower's middle map, which teaches `train_vit` shapes, did not help this CLIP.)
    """
    import open_clip
    import torch
    from tqdm import tqdm

    from storyworld.world import fresh_frames, world_frames

    torch.manual_seed(seed)
    rng = random.Random(seed)
    world_dir, out = Path(world_dir), Path(out)
    train, held = world_frames(world_dir)  # every 10th item held out for the report
    if not train or not held:
        raise ValueError(f"{world_dir}: too few items to train and evaluate a CLIP; make at least 20")

    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    preprocess = open_clip.image_transform(
        TINY_CLIP_CONFIG["vision_cfg"]["image_size"], is_train=False, resize_mode="squash"
    )
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CONFIG["text_cfg"]["context_length"])
    from PIL import Image

    def load(rows):  # every frame decoded once, up front
        return torch.stack([preprocess(p if isinstance(p, Image.Image) else Image.open(p).convert("RGB")) for p, _ in rows])  # (N, 3, H, W)

    frame_size = Image.open(train[0][0]).size  # as the world rendered it, (width, height)
    if fresh_scenes:
        train = train + fresh_frames(fresh_scenes, seed, frame_size)
    train_images, held_images = load(train), load(held)
    steps_per_epoch = max(1, len(train) // batch_size)
    total_steps = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    start, step, losses = time.perf_counter(), 0, []
    model.train()
    bar = tqdm(total=total_steps, desc="train-clip", unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(train))
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            frames = [train[i][1] for i in idx.tolist()]
            picks = [rng.randrange(len(f.entities) + 1) for f in frames]
            captions = [describe_frame(f)[k] for f, k in zip(frames, picks)]
            if hard_negatives:
                captions += [swapped_caption(f, k, rng) for f, k in zip(frames, picks)]
            img_f, txt_f, scale = model(train_images[idx], tokenizer(captions))  # (B, D), (B or 2B, D), ()
            logits = scale * img_f @ txt_f.T  # (B, B) or (B, 2B): the hard negatives as extra columns
            target = torch.arange(len(idx))
            # Symmetric InfoNCE (Radford et al., 2021); text→image over the true captions only.
            loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits[:, : len(idx)].T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if time.perf_counter() - start > max_minutes * 60:
                break
        else:
            continue
        break
    bar.close()
    model.eval()

    # Held-out retrieval: each frame against `eval_candidates` others, one entity caption each;
    # attributes: every held-out entity against its color- and shape-swapped captions.
    n = min(eval_candidates, len(held))
    pick = random.Random(f"eval:{seed}").sample(range(len(held)), n)  # the same frames whatever the training
    captions = [describe_frame(held[i][1])[1] for i in pick]  # every frame has an entity
    report = {
        "retrieval": retrieval_accuracy(model, tokenizer, held_images[pick], captions),
        "attributes": attribute_accuracy(model, tokenizer, held_images, [f for _, f in held]),
        "hard_negatives": hard_negatives,
        "fresh_scenes": fresh_scenes,
        "train_pairs": len(train),
        "held_out_frames": len(held),
        "steps": step,
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "minutes": round((time.perf_counter() - start) / 60, 2),
    }
    save_clip(model, out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def save_clip(model, out: str | Path) -> Path:
    """Write `model` (of TINY_CLIP_CONFIG) where open_clip's `local-dir:` loader finds it."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preprocess = {**PREPROCESS_CFG, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": preprocess}, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    return out

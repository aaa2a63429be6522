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
from storyworld.scene import SETTINGS, TIMES, Entity, Frame, free_values
from storyworld.vision import LOOKS  # the color-shape pairs, in train_vit's order: what the look head predicts

# The image tower is open_clip's ModifiedResNet (the RN50 architecture, one block per stage, width
# 16): on this world's frames and a CPU-minute budget it reads colors where a ViT of the same cost
# does not (the color of a lone held-out shape: 0.91 against 0.24; docs/BENCHMARKS.md, storyworld).
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
LOOK_SCALE = 30.0  # the look head reads unit-length embeddings, so its logits need a scale: with --zoom 0.5, shape 0.37 at 10 and 0.44 at 30 (BENCHMARKS)
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


def zoom_box(e: Entity, frame_size: tuple[int, int], scale: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom): a crop `scale` times the height of `e`'s square, of the frame's aspect,
    centred on `e` and moved (or shrunk) to stay inside the frame. The zoomed views of `train_clip`."""
    w, h = frame_size
    left, _, right, _ = e.box(w, h)
    half_h = (right - left) / 2 * scale
    half_w, half_h = min(half_h * w / h, w / 2), min(half_h, h / 2)
    cx, cy = min(max(e.x * w, half_w), w - half_w), min(max(e.y * h, half_h), h - half_h)
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


def look_targets(views: list[list[Entity]]):
    """(len(views), len(LOOKS)) multi-hot: which looks (color, shape) each view shows."""
    import torch

    y = torch.zeros(len(views), len(LOOKS))
    for j, entities in enumerate(views):
        for e in entities:
            y[j, LOOKS.index((e.color, e.shape))] = 1.0
    return y


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
    zoom: float = 0.0,
    look_weight: float = 0.0,
) -> dict:
    """Train the tiny CLIP on `world_dir`, save it to `out`, and return its report (also saved).

    With `hard_negatives`, each image is also contrasted with its own caption with one attribute
    swapped (`swapped_caption`), as NegCLIP does (Yuksekgonul et al., 2023): in-batch negatives
    almost never differ in color alone, so without them a CLIP learns the setting long before the looks.

    `fresh_scenes` adds the frames of that many new random scenes to the training set; with three
    times the steps it lifts color and shape reading (docs/BENCHMARKS.md, storyworld). (A dense loss
    on the tower's middle map, which teaches `train_vit` shapes, did not help this CLIP.)

    `zoom` is the share of training views that are a crop around the captioned entity instead of the
    whole frame: a box 1.5 to 4 times the entity's size, of the frame's aspect, resampled from the
    rendered frame to the tower's input size (the region captions of RegionCLIP, Zhong et al., 2022).
    A small shape is 7 pixels wide in a 64-pixel frame; in a crop it fills the view. The training
    frames are kept at their rendered size for it (about 150 kB each: 2 GB for 4,000 fresh scenes).

    `look_weight` adds a supervised term: one linear head predicts, from the image embedding, which
    looks (color-shape pairs) the view shows (the zoomed entity alone in a crop) and, from the text
    embedding, the look an entity caption names; binary cross-entropy summed over the looks.
    Contrast alone leaves shapes unread: while the image embedding carries no shape, the text tower
    has nothing to tell "a red circle" from "a red square" by (cosine 0.999 after training), and so
    neither tower moves; the head makes both carry the look. It is dropped when the model is saved.
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

    if not 0 <= zoom <= 1:
        raise ValueError(f"--zoom {zoom}: the share of zoomed views must be between 0 and 1")
    if look_weight < 0:
        raise ValueError(f"--look-weight {look_weight}: give 0 (no look head) or a positive weight")
    frame_size = Image.open(train[0][0]).size  # as the world rendered it, (width, height)
    if fresh_scenes:
        train = train + fresh_frames(fresh_scenes, seed, frame_size)
    train_images, held_images = load(train), load(held)
    if zoom:  # the frames at the size they were rendered, normalized as `preprocess` does, to crop from
        from torchvision.ops import roi_align
        from torchvision.transforms.functional import normalize, to_tensor

        def full_size(p):
            img = p if isinstance(p, Image.Image) else Image.open(p).convert("RGB")
            if img.size != frame_size:
                raise ValueError(f"{p}: frame of size {img.size}, the world's others are {frame_size}")
            return normalize(to_tensor(img), open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)

        rendered = torch.stack([full_size(p) for p, _ in train])  # (N, 3, h, w)
        side = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]

    def zoomed(idx, frames, picks, rows):
        """The batch's views: whole frames, and for each j in `rows` a crop around entity picks[j] - 1."""
        views = train_images[idx]  # (B, 3, side, side), a copy
        if not rows:
            return views
        boxes = [[j, *zoom_box(frames[j].entities[picks[j] - 1], frame_size, rng.uniform(1.5, 4.0))] for j in rows]
        views[rows] = roi_align(rendered[idx], torch.tensor(boxes, dtype=torch.float32), (side, side), 1.0, 2, aligned=True)
        return views

    # Only with a weight: building it draws from torch's generator, which would change the default run's batches.
    look_head = torch.nn.Linear(TINY_CLIP_CONFIG["embed_dim"], len(LOOKS)) if look_weight else None

    steps_per_epoch = max(1, len(train) // batch_size)
    total_steps = epochs * steps_per_epoch
    opt = torch.optim.AdamW([*model.parameters(), *(look_head.parameters() if look_head else [])], lr=lr, weight_decay=0.1)
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
            rows = [j for j, f in enumerate(frames) if zoom and f.entities and rng.random() < zoom]
            for j in rows:  # a zoomed view is captioned by the entity it is centred on
                picks[j] = rng.randrange(1, len(frames[j].entities) + 1)
            captions = [describe_frame(f)[k] for f, k in zip(frames, picks)]
            if hard_negatives:
                captions += [swapped_caption(f, k, rng) for f, k in zip(frames, picks)]
            img_f, txt_f, scale = model(zoomed(idx, frames, picks, rows), tokenizer(captions))  # (B, D), (B or 2B, D), ()
            logits = scale * img_f @ txt_f.T  # (B, B) or (B, 2B): the hard negatives as extra columns
            target = torch.arange(len(idx))
            # Symmetric InfoNCE (Radford et al., 2021); text→image over the true captions only.
            loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits[:, : len(idx)].T, target)) / 2
            if look_weight:  # one head reads the looks from both towers' embeddings, so both must carry them
                said = [j for j, k in enumerate(picks) if k]  # captions that name an entity, and the look they name
                y_img = look_targets([[f.entities[picks[j] - 1]] if j in rows else f.entities for j, f in enumerate(frames)])
                y_txt = look_targets([[frames[j].entities[picks[j] - 1]] for j in said])
                bce = torch.nn.functional.binary_cross_entropy_with_logits
                loss = loss + look_weight * len(LOOKS) * (bce(look_head(img_f * LOOK_SCALE), y_img) + bce(look_head(txt_f[said] * LOOK_SCALE), y_txt)) / 2
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
        "zoom": zoom,
        "look_weight": look_weight,
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

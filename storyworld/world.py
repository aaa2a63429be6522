"""Write a storyworld to disk, have simulated annotators label it, and score stories against it.

`make_world` writes `images/`, `items.jsonl` (ingestable by `annotate.ingest`, 4 grammar candidates
of varied quality per item; in half the items the last one is the first one's image twin, the same
words but for a flaw only the frames show, and the pair is marked as the `image-only` slice), `sft.jsonl` (good but imperfect stories for supervised fine-tuning) and
`world.jsonl` (the hidden ground truth: scenes, utilities and flaws; `rlhf/` must never read it).
`annotate_world` turns the candidates into pairs-format votes from the simulated pool, and
`score_stories` reports the hidden utility of any stories for the world's items.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import replace
from itertools import combinations
from pathlib import Path

from PIL import Image

from storyworld.annotators import SimAnnotator, default_pool
from storyworld.grammar import STYLES, Knobs, random_knobs, write_story
from storyworld.scene import Frame, Scene, make_scene, render_frame
from storyworld.utility import components, flaw_spans, utility

CANDIDATES_PER_ITEM = 4
SFT_QUALITY = 0.8  # "good but imperfect"
GOLD_GAP = 3.0  # utility gap above which a pair is obvious enough to serve as gold
IMAGE_TWIN_RATE = 0.5  # share of items whose last candidate is the first one's image twin


def _restored(state: tuple) -> random.Random:
    rng = random.Random()
    rng.setstate(state)
    return rng


def _image_twin(scene: Scene, style: str, state: tuple, knobs: Knobs, source_utility: float, rng: random.Random) -> tuple[str, Knobs] | None:
    """The story written from the same random state and knobs as another, plus one image-only flaw it lacks.

    Every word is the same but where the flaw acts (a false look, a phantom object, the setting,
    the time of day), so the pair differs only in what the frames show. None when no further
    image-only flaw can act on the scene.
    """
    options = [name for name, off in (("false_look", not knobs.false_look), ("phantom", not knobs.phantom),
                                      ("wrong_setting", not knobs.wrong_setting), ("wrong_time", not knobs.wrong_time)) if off]  # fmt: skip
    rng.shuffle(options)
    for name in options:
        flawed = replace(knobs, **{name: 1 if name in ("false_look", "phantom") else True}).applied_to(scene)
        if len(flawed.image_flaws()) > len(knobs.image_flaws()):
            text = write_story(scene, style, flawed, _restored(state))
            # A phantom sentence also adds words and trigrams; keep the twin only where it is the worse story.
            if utility(scene, text, style) < source_utility:
                return text, flawed
    return None


def instruction_for(style: str, n_frames: int) -> str:
    article = "an" if style[0] in "aeiou" else "a"
    return f"Tell {article} {style} story about {'this image' if n_frames == 1 else 'these images'}."


def cast_context(scene: Scene) -> str:
    """The story so far: one sentence that introduces the characters by name, the hero first.

    The pictures cannot show a name, and the utility judges names (a wrong one is a wrong mention),
    so the item tells them, as a user asking for a story about their own characters would. Which
    name is which shape is still for the pictures to say: the hero is the character of frame 1.
    """
    names = [e.name for _, e in sorted(scene.all_entities().items()) if e.kind == "character" and e.name]
    return f"{names[0]} and {names[1]} were old friends." if len(names) > 1 else f"{names[0]} set off alone."


def quality_band(q: float) -> str:
    return "good" if q > 0.66 else "fair" if q > 0.33 else "poor"


def _item(seed: int, index: int, frames: tuple[int, int], image_size: tuple[int, int], images_dir: Path,
          frame_tags: bool = False) -> tuple[dict, dict, dict]:  # fmt: skip
    item_id = f"sw{seed}-{index:05d}"
    rng = random.Random(f"item:{seed}:{index}")
    scene = make_scene(f"{seed}:{index}", frames_range=frames)
    style = rng.choice(STYLES)
    paths = []
    for k, frame in enumerate(scene.frames):
        name = f"{item_id}_{k}.png"
        render_frame(frame, image_size).save(images_dir / name, compress_level=1)
        paths.append(f"images/{name}")
    instruction = instruction_for(style, len(scene.frames))
    context = cast_context(scene)
    candidates, truth = [], []
    for c in range(CANDIDATES_PER_ITEM):
        quality = rng.random() if c else rng.uniform(0.7, 1.0)  # at least one decent candidate
        for _ in range(20):  # candidates of an item are distinct texts
            # Image-only flaws from a quality draw of their own: nothing in the words predicts them.
            knobs = random_knobs(rng, quality, image_quality=rng.random()).applied_to(scene)
            state = rng.getstate()
            text = write_story(scene, style, knobs, rng)
            if all(text != t["text"] for t in truth):
                break
            quality = rng.random()
        if c == 0:
            source = (state, knobs)  # what the image twin is written from
        comp = components(scene, text, style)
        origin = f"storyworld/{quality_band(quality)}"
        candidates.append({"text": text, "origin": origin, "gen_params": {"quality": round(quality, 3)}})
        truth.append({"text": text, "origin": origin, **comp.to_dict(), "flaws": knobs.flaws(style)})
    slices: dict[str, list[list[int]]] = {}
    twin = _image_twin(scene, style, *source, utility(scene, candidates[0]["text"], style), rng) if rng.random() < IMAGE_TWIN_RATE else None
    if twin is not None and all(twin[0] != t["text"] for t in truth):
        # The last candidate becomes the first one's image twin: the same words but for flaws only the frames show.
        text, knobs = twin
        comp = components(scene, text, style)
        origin = candidates[0]["origin"]
        candidates[-1] = {"text": text, "origin": origin, "gen_params": {"quality": candidates[0]["gen_params"]["quality"], "image_twin_of": 0}}
        truth[-1] = {"text": text, "origin": origin, **comp.to_dict(), "flaws": knobs.flaws(style)}
        slices["image-only"] = [[0, len(candidates) - 1]]
    sft_knobs = random_knobs(rng, SFT_QUALITY)
    sft_knobs.tags = False
    item = {"external_id": item_id, "image_paths": paths, "instruction": instruction, "style": style, "context": context,
            "candidates": candidates}  # fmt: skip
    if slices:
        item["slices"] = slices  # pairs that differ only by image-only flaws: an evaluation slice, through to export
    best = max(range(len(truth)), key=lambda k: truth[k]["utility"])
    worst = min(range(len(truth)), key=lambda k: truth[k]["utility"])
    if truth[best]["utility"] - truth[worst]["utility"] >= GOLD_GAP:
        item["gold"] = [[best, worst]]  # an answer any careful annotator gives: for quality control
    sft = {"item_id": item_id, "image_paths": paths, "instruction": instruction, "style": style, "context": context,
           "story": write_story(scene, style, sft_knobs, rng, frame_tags=frame_tags)}  # fmt: skip
    world = {"external_id": item_id, "image_paths": paths, "instruction": instruction, "style": style, "context": context,
             "scene": scene.to_dict(), "candidates": truth, "slices": slices}  # fmt: skip
    return item, sft, world


def make_world(
    out: str | Path,
    n_items: int,
    seed: int = 0,
    frames: tuple[int, int] = (1, 4),
    image_size: tuple[int, int] = (128, 96),
    progress: bool = False,
    frame_tags: bool = False,
) -> Path:
    """Write a world of `n_items` items to `out`; the same seed always writes the same world.

    `frame_tags`: the SFT stories mark each frame's sentences with `<gdi imageN>` (the StoryReasoning
    schema), so that `--window K` cuts them at the frames' own boundaries.
    """
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    indices: Iterator[int] = iter(range(n_items))
    if progress:
        from tqdm import tqdm

        indices = iter(tqdm(range(n_items), desc="storyworld make", unit="item"))
    with (
        (out / "items.jsonl").open("w") as items_f,
        (out / "sft.jsonl").open("w") as sft_f,
        (out / "world.jsonl").open("w") as world_f,
    ):
        for i in indices:
            item, sft, world = _item(seed, i, frames, image_size, images, frame_tags)
            items_f.write(json.dumps(item) + "\n")
            sft_f.write(json.dumps(sft) + "\n")
            world_f.write(json.dumps(world) + "\n")
    (out / "README.txt").write_text(
        "storyworld: items.jsonl -> annotate.ingest; sft.jsonl -> rlhf.sft; world.jsonl is the hidden truth.\n"
    )
    return out


def read_world(world_dir: str | Path) -> list[dict]:
    path = Path(world_dir) / "world.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make a world first with `python -m storyworld make --out {world_dir}`")
    return [json.loads(line) for line in path.open()]


def world_frames(world_dir: str | Path, held_every: int = 10) -> tuple[list[tuple[Path, Frame]], list[tuple[Path, Frame]]]:
    """(image path, frame) of every frame of the world, split by item: every `held_every`-th item is held out.

    The split the world's tiny models (its CLIP and ViT) train and report on.
    """
    world_dir = Path(world_dir)
    train: list[tuple[Path, Frame]] = []
    held: list[tuple[Path, Frame]] = []
    for i, item in enumerate(read_world(world_dir)):
        scene = Scene.from_dict(item["scene"])
        rows = [(world_dir / p, f) for p, f in zip(item["image_paths"], scene.frames)]
        (held if i % held_every == 0 else train).extend(rows)
    return train, held


def fresh_frames(n_scenes: int, seed: int = 0, image_size: tuple[int, int] = (128, 96)) -> list[tuple[Image.Image, Frame]]:
    """(image, frame) of every frame of `n_scenes` new random scenes, rendered in memory.

    The world's own frames are few (about 2.3 per item); a tiny model pretrained on them alone
    memorizes them. These play the part of a real model's web-scale pretraining images: more of the
    same kind of picture, none of them an item of the world (their scenes have their own seeds).
    """
    rows = []
    for i in range(n_scenes):
        for frame in make_scene(f"pretrain:{seed}:{i}").frames:
            rows.append((render_frame(frame, image_size), frame))
    return rows


def annotate_world(
    world_dir: str | Path,
    out: str | Path,
    pairs_per_item: int | None = None,
    n_annotators: int = 5,
    votes_per_pair: int = 3,
    seed: int = 0,
    pool: list[SimAnnotator] | None = None,
    marks: bool = False,
) -> dict:
    """Simulated votes on the world's candidate pairs, one pairs-format line per vote. Returns counts.

    With `marks`, each voter also marks the flaws it notices in the two stories (`utility.flaw_spans`,
    each with its `mark_recall`), written as the line's `spans` as annotate.export writes them.
    """
    world_dir, out = Path(world_dir), Path(out)
    pool = pool or default_pool(n_annotators)
    if votes_per_pair > len(pool):
        raise ValueError(f"--votes-per-pair {votes_per_pair} exceeds the pool of {len(pool)} annotators")
    rng = random.Random(f"annotate:{seed}")
    rel = os.path.relpath(world_dir.resolve(), out.resolve().parent)
    n_votes = n_ties = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w") as f:
        for item in read_world(world_dir):
            cands = item["candidates"]
            pairs = list(combinations(range(len(cands)), 2))
            if pairs_per_item is not None and pairs_per_item < len(pairs):
                pairs = rng.sample(pairs, pairs_per_item)
            for i, j in pairs:
                for ann in rng.sample(pool, votes_per_pair):
                    shown_left = rng.choice("ab")
                    left, right = (i, j) if shown_left == "a" else (j, i)
                    said = ann.choose(cands[left]["utility"], cands[right]["utility"], rng)
                    pref = "tie" if said == "tie" else "response_a" if (said == "left") == (shown_left == "a") else "response_b"
                    n_votes, n_ties = n_votes + 1, n_ties + (pref == "tie")
                    line = {
                        "image_paths": [os.path.join(rel, p) for p in item["image_paths"]],
                        "instruction": item["instruction"],
                        "style": item["style"],
                        "context": item.get("context"),  # worlds made before contexts have none
                        "response_a": cands[i]["text"],
                        "response_b": cands[j]["text"],
                        "origin_a": cands[i]["origin"],
                        "origin_b": cands[j]["origin"],
                        "preference": pref,
                        "item_id": item["external_id"],
                        "comparison_id": f"{item['external_id']}/{i}-{j}",
                        "annotator": ann.name,
                        "shown_left": shown_left,
                    }
                    if marks:
                        scene = Scene.from_dict(item["scene"])
                        found = {side: [{"start": a, "end": b, "label": lab, "text": cands[k]["text"][a:b]}
                                        for a, b, lab in ann.mark(flaw_spans(scene, cands[k]["text"]), rng)]
                                 for side, k in (("response_a", i), ("response_b", j))}  # fmt: skip
                        if found["response_a"] or found["response_b"]:
                            line["spans"] = found
                    names = [name for name, pairs in (item.get("slices") or {}).items() if sorted([i, j]) in map(sorted, pairs)]
                    if names:
                        line["slices"] = names
                    f.write(json.dumps(line) + "\n")
    os.replace(tmp, out)
    return {"votes": n_votes, "ties": n_ties, "annotators": [a.name for a in pool]}


def window_scene(world: dict[str, dict], item_id: str) -> tuple[Scene, str] | None:
    """(the one-frame scene of frame T, style) for a next-frame window's id `ID/T` (`rlhf --window`), else None.

    The hidden utility of a next part is that of a story of frame T alone: its mentions grounded in
    that frame, its recall of what that frame holds, its style, fluency and length for one frame.
    """
    base, _, t = item_id.rpartition("/")
    if base not in world or not t.isdigit():
        return None
    scene = Scene.from_dict(world[base]["scene"])
    if not 1 <= int(t) <= len(scene.frames):
        return None
    return Scene(f"{scene.id}/{t}", [scene.frames[int(t) - 1]]), world[base]["style"]


def score_stories(world_dir: str | Path, stories_file: str | Path) -> dict:
    """Hidden utility of each story in `stories_file` (JSONL with item_id/external_id and story/text).

    An id `ID/T` of a next-frame window scores the next part against frame T (`window_scene`).
    """
    world = {w["external_id"]: w for w in read_world(world_dir)}
    rows = []
    for lineno, line in enumerate(Path(stories_file).open(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        item_id = d.get("item_id") or d.get("external_id")
        story = d.get("story") or d.get("text")
        part = window_scene(world, item_id) if isinstance(item_id, str) and item_id not in world else None
        if (item_id not in world and part is None) or not isinstance(story, str):
            raise ValueError(f"{stories_file}:{lineno}: needs an item_id of this world (or ID/T, a next-frame window of one) and a story (or text)")
        scene, style = part if part else (Scene.from_dict(world[item_id]["scene"]), world[item_id]["style"])
        comp = components(scene, story, d.get("style") or style)
        rows.append({"item_id": item_id, **comp.to_dict()})
    keys = [k for k in (rows[0] if rows else {}) if k != "item_id"]
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys} if rows else {}
    return {"n": len(rows), "mean_utility": mean.get("utility"), "mean": mean, "stories": rows}


def make_demo(out: str | Path, n_items: int = 50, seed: int = 0) -> Path:
    """The labeling app's demo content: a small world; returns its items.jsonl."""
    return make_world(out, n_items, seed=seed) / "items.jsonl"


__all__ = ["Knobs", "annotate_world", "cast_context", "fresh_frames", "make_demo", "make_world", "read_world", "score_stories", "window_scene",
           "world_frames"]  # fmt: skip

"""Reading image-story examples: SFT data, prompts for generation and PPO, items to evaluate.

Two sources, detected from the path:

* **JSONL**, one example per line: `image_paths` (relative to the file's directory, or absolute),
  `instruction`, optional `style`, `context` and `story`, and an id (`item_id` or `external_id`).
  storyworld's `sft.jsonl` and `items.jsonl` and `annotate.ingest`'s jsonl files all read as is.
* **A Hugging Face dataset** (a `save_to_disk` directory or a hub id) with the StoryReasoning
  schema: `story_id`, `images`, `story`.

Every image path is checked before any model work starts, and a bad line is named by file:line.

`window=K` (the `--window K` of rlhf.sft, generate, ppo, dpo and evaluate) turns each story into
its next-frame examples (`annotate.formats.next_frame_windows`): example `ID/T` has the images of
frames T−K..T, the text of the frames before T as its context, and frame T's text as its story.
A story of K frames or fewer gives none. `story_id` in each example's meta keeps the windows of one
story together, so splits are by story (`StoryExample.group`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

DEFAULT_INSTRUCTION = "Write a story about these images."


class StoryDataError(ValueError):
    """Bad story data; the message names the file and line and says how to fix it."""


@dataclass
class StoryExample:
    item_id: str
    images: list  # paths, or PIL images for HF datasets
    instruction: str
    style: str | None = None
    context: str | None = None
    story: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        """The unit of a train/test split: the story a next-frame window came from, else the item."""
        return str(self.meta.get("story_id", self.item_id))

    def load_images(self) -> list[Image.Image]:
        return [Image.open(i).convert("RGB") if isinstance(i, (str, Path)) else i.convert("RGB") for i in self.images]


def read_examples(source: str, *, need_story: bool = False, split: str = "train", instruction: str = DEFAULT_INSTRUCTION,
                  limit: int | None = None, window: int = 0) -> list[StoryExample]:  # fmt: skip
    """All examples of `source` (see the module docstring), checked; `need_story` demands a story each;
    `window` K cuts each story into its next-frame examples."""
    path = Path(source)
    if path.is_file():
        examples = _read_jsonl(path, need_story or window > 0)
    else:
        examples = _read_hf(source, split, instruction)
    if window:
        examples = windows(examples, window, source)
    if not examples:
        raise StoryDataError(f"{source}: no examples")
    return examples[:limit] if limit else examples


def windows(examples: list[StoryExample], k: int, source: str = "") -> list[StoryExample]:
    """Each example's next-frame windows of K frames of context (see the module docstring)."""
    from annotate.formats import next_frame_windows

    if k < 1:
        raise StoryDataError(f"--window must be 1 or more frames of context, got {k}")
    out, short = [], 0
    for e in examples:
        if not e.story:
            raise StoryDataError(f"{source}: example {e.item_id!r} has no story to cut into --window {k} examples")
        cut = next_frame_windows(e.story, len(e.images), k)
        short += not cut
        for t, context, target in cut:
            before = " ".join(x for x in (e.context, context) if x) or None
            out.append(StoryExample(f"{e.item_id}/{t + 1}", e.images[t - k : t + 1], e.instruction, e.style, before, target,
                                    {**e.meta, "story_id": e.item_id, "frame": t + 1, "window": k}))  # fmt: skip
    if not out:
        raise StoryDataError(f"{source}: every one of its {len(examples)} stories has {k} frames or fewer: too short for --window {k}")
    if short:
        print(f"--window {k}: {short} of {len(examples)} stories skipped ({k} frames or fewer), {len(out)} next-frame examples")
    return out


def _read_jsonl(path: Path, need_story: bool) -> list[StoryExample]:
    out = []
    for lineno, line in enumerate(path.open(encoding="utf-8"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise StoryDataError(f"{where}: not valid JSON ({e.msg})") from None
        paths = d.get("image_paths") or d.get("images")
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise StoryDataError(f"{where}: needs `image_paths`, a non-empty list of image file paths")
        images = []
        for p in paths:
            full = Path(p) if Path(p).is_absolute() else path.parent / p
            if not full.is_file():
                raise StoryDataError(f"{where}: image {p!r} not found (looked for {full}); paths are relative to the JSONL file")
            images.append(str(full.resolve()))
        if not isinstance(d.get("instruction"), str) or not d["instruction"].strip():
            raise StoryDataError(f"{where}: needs an `instruction` string")
        story = d.get("story")
        if need_story and (not isinstance(story, str) or not story.strip()):
            raise StoryDataError(f"{where}: needs a non-empty `story` for supervised fine-tuning")
        item_id = d.get("item_id") or d.get("external_id") or f"{path.stem}-{lineno}"
        out.append(StoryExample(str(item_id), images, d["instruction"], d.get("style"), d.get("context"), story,
                                {"line": lineno}))  # fmt: skip
    return out


def _read_hf(source: str, split: str, instruction: str) -> list[StoryExample]:
    import datasets

    path = Path(source)
    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source)
    except Exception as e:
        raise StoryDataError(f"{source}: neither a JSONL file nor a loadable dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise StoryDataError(f"{source}: no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    missing = {"images", "story"} - set(ds.column_names)
    if missing:
        raise StoryDataError(f"{source}: missing columns {sorted(missing)} (the StoryReasoning schema: story_id, images, story)")
    out = []
    for i, row in enumerate(ds):
        if not row["images"]:
            raise StoryDataError(f"{source}[{split}][{i}]: no images")
        out.append(StoryExample(str(row.get("story_id", i)), list(row["images"]), row.get("instruction") or instruction,
                                row.get("style"), row.get("context"), row["story"]))  # fmt: skip
    return out

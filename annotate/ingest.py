"""Bring items, candidates and old preference data into a storypref database.

    python -m annotate.ingest SOURCE --db URL --project NAME [--format jsonl|csv|folder|pairs|storyreasoning]

Ingest runs in two phases. First every line is parsed and checked (fields, text sizes, image paths
that must stay inside the source directory, every image fully decoded) without touching the
database. Only if all of it is good are images copied into the content-addressed media root and the
rows written, in one transaction. A bad line therefore stops the import with `file:line: what is wrong
and how to fix it`, and leaves the database as it was. Items are keyed by (project, source,
external_id) and candidates by their text hash, so re-ingesting the same file adds nothing twice.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import json
import random
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from annotate import media
from annotate.formats import next_frame_windows
from db import (
    ASPECTS,
    DEFAULT_MEDIA_ROOT,
    MAX_RANK_K,
    MODES,
    SPAN_LABELS,
    Annotator,
    Candidate,
    Comparison,
    Item,
    ItemImage,
    Project,
    Vote,
    get_meta,
    open_db,
    set_meta,
)

FORMATS = ("jsonl", "csv", "folder", "pairs", "storyreasoning")
DEFAULT_INSTRUCTION = "Write a story about these images."
MAX_TEXT_CHARS = 20_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
IMPORTED_ANNOTATOR = "imported"
SLICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Accepted spellings of a preference in pairs files, mapped to (a | b | tie | both_bad) of the line.
PREFERENCES = {
    "response_a": "a", "a": "a", "1": "a",
    "response_b": "b", "b": "b", "2": "b",
    "tie": "tie", "both_bad": "both_bad",
}  # fmt: skip


class IngestError(ValueError):
    """A bad source. The message starts with `file:line:` and says how to fix it."""


@dataclass
class CandidateRecord:
    text: str
    origin: str = "human"
    gen_params: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass
class VoteRecord:
    """One vote of a pairs line, in terms of the record's candidate indices."""

    where: str
    annotator: str
    first: int  # index into ItemRecord.candidates of the line's response_a
    second: int  # ... and of its response_b
    preference: str  # a | b | tie | both_bad, relative to (first, second)
    shown_left: str | None = None  # a | b, relative to (first, second)
    strength: int | None = None
    aspects: dict[str, str] = field(default_factory=dict)
    rationale: str | None = None
    token: str = ""
    spans: dict[str, list[dict]] = field(default_factory=dict)  # "a"/"b" (relative to first, second) -> marks


@dataclass
class ItemRecord:
    where: str
    external_id: str
    instruction: str
    images: list[media.CheckedImage]
    candidates: list[CandidateRecord] = field(default_factory=list)
    style: str | None = None
    context: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    votes: list[VoteRecord] = field(default_factory=list)
    gold: list[tuple[int, int]] = field(default_factory=list)  # (better, worse) candidate indices
    gold_rank: list[int] = field(default_factory=list)  # rank mode: candidate indices, best first
    slices: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # named evaluation slices: candidate index pairs


@dataclass
class IngestStats:
    items_added: int = 0
    items_existing: int = 0
    images_stored: int = 0
    candidates_added: int = 0
    comparisons_added: int = 0
    votes_added: int = 0
    notes: list[str] = field(default_factory=list)  # what the reader left out, and why

    def summary(self) -> str:
        return (
            f"{self.items_added} items added ({self.items_existing} already there), "
            f"{self.candidates_added} candidates, {self.comparisons_added} comparisons, "
            f"{self.votes_added} votes, {self.images_stored} new image files" + "".join(f"; {n}" for n in self.notes)
        )


# --------------------------------------------------------------------------------------------
# Phase 1: read and check. Nothing here touches the database.
# --------------------------------------------------------------------------------------------


class _Reader:
    """Shared checks for one source: image paths stay under `image_root`, texts stay short."""

    def __init__(self, source: Path, image_root: Path | None, max_text_chars: int):
        self.source = source
        self.base_dir = source if source.is_dir() else source.parent
        self.image_root = (image_root or self.base_dir).resolve()
        self.max_text_chars = max_text_chars
        self._image_cache: dict[Path, media.CheckedImage] = {}

    def image(self, raw: Any, where: str, field_name: str) -> media.CheckedImage:
        if not isinstance(raw, str) or not raw.strip():
            raise IngestError(f"{where}: `{field_name}` must be a non-empty path string, got {raw!r}")
        path = Path(raw)
        path = (path if path.is_absolute() else self.base_dir / path).resolve()
        if not path.is_relative_to(self.image_root):
            raise IngestError(
                f"{where}: image path {raw!r} escapes the source directory {self.image_root}. "
                "Keep images inside it, or pass --image-root with a directory that holds them."
            )
        if path not in self._image_cache:
            try:
                self._image_cache[path] = media.check_image_file(path)
            except media.BadImage as e:
                raise IngestError(f"{where}: {field_name} {raw!r}: {e}") from None
        return self._image_cache[path]

    def text(self, d: dict, key: str, where: str, *, required: bool = False) -> str | None:
        value = d.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise IngestError(f"{where}: missing field `{key}`; every line needs a non-empty `{key}` string")
            return None
        if not isinstance(value, str):
            raise IngestError(f"{where}: `{key}` must be a string, got {type(value).__name__}")
        return self.check_length(value, where, key)

    def check_length(self, value: str, where: str, key: str) -> str:
        if len(value) > self.max_text_chars:
            raise IngestError(
                f"{where}: `{key}` has {len(value):,} characters, over the limit of {self.max_text_chars:,}. "
                "Shorten it or raise --max-text-chars."
            )
        return value

    def images_of(self, d: dict, where: str) -> list[media.CheckedImage]:
        if "image_paths" in d:
            paths = d["image_paths"]
            if isinstance(paths, str):
                paths = json.loads(paths) if paths.strip().startswith("[") else re.split(r"[|;]", paths)
            if not isinstance(paths, list) or not paths:
                raise IngestError(f"{where}: `image_paths` must be a non-empty list of paths")
            return [self.image(p, where, f"image_paths[{i}]") for i, p in enumerate(paths)]
        if d.get("image_path"):
            return [self.image(d["image_path"], where, "image_path")]
        raise IngestError(f"{where}: missing field `image_paths` (a list) or `image_path`; every item needs images")

    def candidates_of(self, d: dict, where: str) -> list[CandidateRecord]:
        raw = d.get("candidates") or []
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise IngestError(f"{where}: `candidates` is not valid JSON ({e.msg})") from None
        # CSV-friendly spelling: candidate_1, origin_1, candidate_2, ...
        numbered = sorted((k for k in d if re.fullmatch(r"candidate_\d+", k)), key=lambda k: int(k.split("_")[1]))
        raw = list(raw) + [{"text": d[k], "origin": d.get(f"origin_{k.split('_')[1]}")} for k in numbered if d[k]]
        out = []
        for i, c in enumerate(raw):
            c = {"text": c} if isinstance(c, str) else c
            if not isinstance(c, dict) or not isinstance(c.get("text"), str) or not c["text"].strip():
                raise IngestError(f"{where}: candidates[{i}] needs a non-empty `text` string")
            params = c.get("gen_params") or {}
            if not isinstance(params, dict):
                raise IngestError(f"{where}: candidates[{i}].gen_params must be an object")
            text = self.check_length(c["text"], where, f"candidates[{i}].text")
            out.append(CandidateRecord(text, str(c.get("origin") or "human"), params))
        return out

    def item(self, d: dict, where: str) -> ItemRecord:
        style = self.text(d, "style", where)
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise IngestError(f"{where}: `meta` must be an object")
        images = self.images_of(d, where)
        instruction = self.text(d, "instruction", where, required=True)
        candidates = self.candidates_of(d, where)
        gold = d.get("gold") or []
        if isinstance(gold, str):
            gold = json.loads(gold)
        if not isinstance(gold, list) or not all(
            isinstance(g, list) and len(g) == 2 and all(isinstance(i, int) and 0 <= i < len(candidates) for i in g) and g[0] != g[1]
            for g in gold
        ):
            raise IngestError(f"{where}: `gold` must be a list of [better, worse] candidate indices, e.g. [[0, 2]]")
        gold_rank = d.get("gold_rank") or []
        if isinstance(gold_rank, str):
            gold_rank = json.loads(gold_rank)
        if not isinstance(gold_rank, list) or not all(isinstance(i, int) and 0 <= i < len(candidates) for i in gold_rank) or (
            gold_rank and (len(gold_rank) < 2 or len(set(gold_rank)) != len(gold_rank) or len(gold_rank) > MAX_RANK_K)
        ):
            raise IngestError(f"{where}: `gold_rank` must list 2 to {MAX_RANK_K} distinct candidate indices, best first, e.g. [2, 0, 1]")
        slices = d.get("slices") or {}
        if not isinstance(slices, dict) or not all(
            isinstance(name, str) and SLICE_NAME.fullmatch(name) and isinstance(pairs, list)
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) and 0 <= i < len(candidates) for i in p)
                    and p[0] != p[1] for p in pairs)
            for name, pairs in slices.items()
        ):  # fmt: skip
            raise IngestError(f"{where}: `slices` must map a name (letters, digits, -, _) to candidate index pairs, "
                              'e.g. {"image-only": [[0, 3]]}')  # fmt: skip
        return ItemRecord(
            where=where,
            external_id=str(d.get("external_id") or d.get("item_id") or content_id(images, instruction)),
            instruction=instruction,
            images=images,
            candidates=candidates,
            style=style,
            context=self.text(d, "context", where),
            meta=meta,
            gold=[(g[0], g[1]) for g in gold],
            gold_rank=list(gold_rank),
            slices={name: [(p[0], p[1]) for p in pairs] for name, pairs in slices.items()},
        )


def content_id(images: list[media.CheckedImage], instruction: str) -> str:
    """An item id from its content, for sources that give none: stable across re-ingests."""
    key = "|".join(i.sha256 for i in images) + "|" + instruction
    return "sha-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise IngestError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise IngestError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(reader: _Reader) -> Iterator[ItemRecord]:
    for lineno, obj in _json_lines(reader.source):
        yield reader.item(obj, f"{reader.source}:{lineno}")


def read_csv(reader: _Reader) -> Iterator[ItemRecord]:
    with reader.source.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f)
        for row in rows:
            where = f"{reader.source}:{rows.line_num}"
            row = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
            yield reader.item(row, where)


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def read_folder(reader: _Reader, instruction: str) -> Iterator[ItemRecord]:
    """Each image directly in the folder is one item; each sub-folder of images is one multi-frame item."""
    root = reader.source
    for entry in sorted(root.iterdir(), key=_natural_key):
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            frames = [entry]
        elif entry.is_dir():
            frames = sorted((p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
            if not frames:
                continue
        else:
            continue
        where = str(entry)
        images = [reader.image(str(p), where, "image") for p in frames]
        yield ItemRecord(where, entry.relative_to(root).as_posix(), instruction, images)


def read_pairs(reader: _Reader) -> Iterator[ItemRecord]:
    """Pairs JSONL (one line per vote) → items with candidates and votes, grouped by item."""
    items: dict[str, ItemRecord] = {}
    for lineno, obj in _json_lines(reader.source):
        where = f"{reader.source}:{lineno}"
        for key in ("response_a", "response_b", "preference"):
            if key not in obj:
                raise IngestError(f"{where}: missing field `{key}`; pairs lines need response_a, response_b, preference")
        record = reader.item({k: v for k, v in obj.items() if k != "slices"}, where)  # a line's slices name its own pair
        item = items.setdefault(record.external_id, record)
        index = {(c.origin, c.text): i for i, c in enumerate(item.candidates)}

        def candidate(side: str) -> int:
            text = obj.get(f"response_{side}")
            if not isinstance(text, str) or not text.strip():
                raise IngestError(f"{where}: `response_{side}` must be a non-empty string")
            origin = str(obj.get(f"origin_{side}") or "imported")
            key = (origin, reader.check_length(text, where, f"response_{side}"))
            if key not in index:
                index[key] = len(item.candidates)
                item.candidates.append(CandidateRecord(text, origin))
            return index[key]

        first, second = candidate("a"), candidate("b")
        if item.candidates[first].text == item.candidates[second].text:
            raise IngestError(f"{where}: response_a and response_b are the same text; drop the line")
        names = obj.get("slices") or []
        if not isinstance(names, list) or not all(isinstance(n, str) and SLICE_NAME.fullmatch(n) for n in names):
            raise IngestError(f'{where}: `slices` of a pairs line must be a list of slice names, e.g. ["image-only"]')
        for name in names:
            if (first, second) not in item.slices.setdefault(name, []):
                item.slices[name].append((first, second))
        pref = PREFERENCES.get(str(obj["preference"]).strip().lower())
        if pref is None:
            raise IngestError(
                f"{where}: `preference` is {obj['preference']!r}; use response_a, response_b, tie or both_bad"
            )
        strength = obj.get("strength")
        if strength is not None and (not isinstance(strength, int) or not 1 <= strength <= 4):
            raise IngestError(f"{where}: `strength` must be an integer 1-4 (Llama 2 scale), got {strength!r}")
        aspects = obj.get("aspects") or {}
        if not isinstance(aspects, dict) or any(
            k not in ASPECTS or PREFERENCES.get(str(v)) is None for k, v in aspects.items()
        ):
            raise IngestError(f"{where}: `aspects` must map {', '.join(ASPECTS)} to a preference")
        shown_left = obj.get("shown_left")
        if shown_left not in (None, "a", "b"):
            raise IngestError(f"{where}: `shown_left` must be \"a\" or \"b\", got {shown_left!r}")
        spans = _line_spans(obj.get("spans"), item.candidates[first].text, item.candidates[second].text, where)
        annotator = str(obj.get("annotator") or IMPORTED_ANNOTATOR)
        if len(annotator) > 64:
            raise IngestError(f"{where}: annotator name over 64 characters")
        item.votes.append(
            VoteRecord(
                where=where,
                annotator=annotator,
                first=first,
                second=second,
                preference=pref,
                shown_left=shown_left,
                strength=strength,
                aspects={k: PREFERENCES[str(v)] for k, v in aspects.items()},
                rationale=obj.get("rationale"),
                token="import-" + hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:40],
                spans=spans,
            )
        )
    yield from items.values()


def _line_spans(value: Any, text_a: str, text_b: str, where: str) -> dict[str, list[dict]]:
    """A pairs line's `spans` ({"response_a": [...], "response_b": [...]}, as export writes them), checked."""
    if not value:
        return {}
    if not isinstance(value, dict) or not set(value) <= {"response_a", "response_b"}:
        raise IngestError(f'{where}: `spans` must map response_a and response_b to lists of marks, e.g. '
                          '{"response_b": [{"start": 4, "end": 12, "label": "hallucinated"}]}')  # fmt: skip
    out = {}
    for key, marks in value.items():
        text = text_a if key == "response_a" else text_b
        checked = []
        for m in marks or []:
            if not (isinstance(m, dict) and isinstance(m.get("start"), int) and isinstance(m.get("end"), int)
                    and 0 <= m["start"] < m["end"] <= len(text) and m.get("label") in SPAN_LABELS):  # fmt: skip
                raise IngestError(f"{where}: span mark {m!r} of {key} must have 0 <= start < end <= {len(text)} (the story's length) "
                                  f"and a label of {', '.join(SPAN_LABELS)}")  # fmt: skip
            checked.append({"start": m["start"], "end": m["end"], "label": m["label"], "text": text[m["start"] : m["end"]]})
        if checked:
            out[key[-1]] = checked
    return out


def read_storyreasoning(
    source: str, split: str, instruction: str, reader: _Reader, window: int = 0, notes: list[str] | None = None
) -> Iterator[ItemRecord]:
    """A Hugging Face dataset with the StoryReasoning schema (story_id, images, frame_count, story, ...).

    With `window` K, each story becomes its next-frame examples (`formats.next_frame_windows`): item
    `STORY/T` shows frames T−K..T, carries the text of the frames before T as its context, and has
    frame T's text as its reference candidate. Stories of K frames or fewer give none; `notes`
    gets how many were skipped."""
    try:
        import datasets
    except ImportError:
        raise IngestError('the storyreasoning format needs `datasets`: pip install -e ".[train]"') from None
    path = Path(source)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(source)
    except Exception as e:
        raise IngestError(f"{source}: cannot load the dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise IngestError(f"{source}: no split {split!r}; it has {', '.join(ds)}. Pass --split")
        ds = ds[split]
    missing = {"story_id", "images", "story"} - set(ds.column_names)
    if missing:
        raise IngestError(f"{source}: not the StoryReasoning schema, missing columns {sorted(missing)}")
    short = 0
    for row_no, row in enumerate(ds):
        where = f"{source}[{split}][{row_no}]"
        images = []
        for i, img in enumerate(row["images"] or []):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            try:
                images.append(media.check_image_bytes(buf.getvalue()))
            except media.BadImage as e:
                raise IngestError(f"{where}: images[{i}]: {e}") from None
        if not images:
            raise IngestError(f"{where}: story {row['story_id']!r} has no images")
        story = reader.check_length(row["story"], where, "story")
        if window:
            examples = next_frame_windows(story, len(images), window)
            short += not examples
            for t, context, target in examples:
                meta = {"story_id": str(row["story_id"]), "frame": t + 1, "window": window}
                yield ItemRecord(f"{where} frame {t + 1}", f"{row['story_id']}/{t + 1}", instruction, images[t - window : t + 1],
                                 [CandidateRecord(target, "reference")] if target else [], context=context or None, meta=meta)  # fmt: skip
            continue
        meta = {k: row[k] for k in ("frame_count", "chain_of_thought") if row.get(k) is not None}
        yield ItemRecord(where, str(row["story_id"]), instruction, images, [CandidateRecord(story, "reference")], meta=meta)
    if window and notes is not None:
        notes.append(f"{short} of {len(ds)} stories skipped: {window} frames or fewer, too short for --window {window}")


def detect_format(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        hf = any((path / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))
        return "storyreasoning" if hf else "folder"
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            keys = set(json.loads(first)) if first else set()
        except (json.JSONDecodeError, TypeError):
            raise IngestError(f"{path}:1: cannot detect the format (first line is not JSON); pass --format") from None
        return "pairs" if {"response_a", "response_b"} <= keys else "jsonl"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return "storyreasoning"  # a Hugging Face hub id
    raise IngestError(f"{source}: no such file or directory")


def read_source(
    source: str,
    fmt: str | None = None,
    *,
    image_root: Path | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    split: str = "train",
    max_text_chars: int = MAX_TEXT_CHARS,
    window: int = 0,
    notes: list[str] | None = None,
) -> tuple[str, list[ItemRecord]]:
    """Parse and check the whole source. Returns (format, records) or raises IngestError.

    `window` K (storyreasoning only) turns each story into next-frame examples; `notes` collects
    what the reader left out."""
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if window and fmt != "storyreasoning":
        raise IngestError(f"--window applies to the storyreasoning format, not {fmt}; for your own data, write one item per window")
    if window < 0:
        raise IngestError(f"--window must be 1 or more frames of context, got {window}")
    path = Path(source)
    if fmt != "storyreasoning" and not path.exists():
        raise IngestError(f"{source}: no such file or directory")
    reader = _Reader(path, image_root, max_text_chars)
    readers = {
        "jsonl": lambda: read_jsonl(reader),
        "csv": lambda: read_csv(reader),
        "folder": lambda: read_folder(reader, instruction),
        "pairs": lambda: read_pairs(reader),
        "storyreasoning": lambda: read_storyreasoning(source, split, instruction, reader, window, notes),
    }
    try:
        records = list(readers[fmt]())
    except UnicodeDecodeError as e:
        raise IngestError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    seen: dict[str, str] = {}
    if fmt != "pairs":
        for r in records:
            if r.external_id in seen:
                raise IngestError(f"{r.where}: external_id {r.external_id!r} repeats {seen[r.external_id]}; ids must be unique")
            seen[r.external_id] = r.where
    return fmt, records


# --------------------------------------------------------------------------------------------
# Phase 2: write, in one transaction.
# --------------------------------------------------------------------------------------------


def get_or_create_project(session: Session, name: str, **settings: Any) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name, **{k: v for k, v in settings.items() if v is not None})
        session.add(project)
        session.flush()
    return project


def _sample_pairs(n: int, k: int | None, seed_key: str) -> list[tuple[int, int]]:
    pairs = list(itertools.combinations(range(n), 2))
    if k is None or k >= len(pairs):
        return pairs
    rng = random.Random(hashlib.sha256(seed_key.encode()).digest())  # deterministic per item
    return sorted(rng.sample(pairs, k))


def rank_sets(ids: list[int], k: int) -> list[list[int]]:
    """The rank sets of one item's candidates (ids, any order): windows of K over them ascending, the
    last one moved back to end at the last candidate, so every candidate is in one set and the last
    set is full. Fewer than two candidates give none; K or fewer, one set of them all.

    >>> rank_sets([5, 1, 2, 3, 4, 6, 7], 3)
    [[1, 2, 3], [4, 5, 6], [5, 6, 7]]
    >>> rank_sets([9, 4], 4)
    [[4, 9]]
    """
    ids = sorted(set(ids))
    if len(ids) < 2:
        return []
    if len(ids) <= k:
        return [ids]
    starts = list(range(0, len(ids) - k + 1, k))
    if starts[-1] + k < len(ids):
        starts.append(len(ids) - k)
    return [ids[s : s + k] for s in starts]


def implied_choice(ranks: dict[int, int], a: int, b: int) -> str:
    """What a ranking (candidate id -> rank, 1 best) says about candidates a and b: 'a', 'b' or 'tie'."""
    return "a" if ranks[a] < ranks[b] else "b" if ranks[b] < ranks[a] else "tie"


def _canonical(choice: str, swapped: bool) -> str:
    return {"a": "b", "b": "a"}.get(choice, choice) if swapped else choice


def write_records(
    session: Session,
    project: Project,
    records: Iterable[ItemRecord],
    *,
    source: str,
    media_root: Path,
    pairs_per_item: int | None = None,
    created_files: list[Path] | None = None,
) -> IngestStats:
    """Add `records` to `project`. Call inside a transaction; files created are appended to `created_files`."""
    stats = IngestStats()
    existing = {
        i.external_id: i for i in session.scalars(select(Item).where(Item.project_id == project.id, Item.source == source))
    }
    annotators = {a.username: a for a in session.scalars(select(Annotator))}
    for record in records:
        item = existing.get(record.external_id)
        if item is None:
            item = Item(
                project=project,
                source=source,
                external_id=record.external_id,
                instruction=record.instruction,
                style=record.style,
                context=record.context,
                meta=record.meta,
            )
            for pos, img in enumerate(record.images):
                if media.store(media_root, img):
                    stats.images_stored += 1
                    if created_files is not None:
                        created_files.append(media_root / img.rel_path)
                item.images.append(ItemImage(position=pos, sha256=img.sha256, path=img.rel_path, width=img.width, height=img.height))
            session.add(item)
            session.flush()
            existing[record.external_id] = item
            stats.items_added += 1
        else:
            stats.items_existing += 1

        cands = {(c.origin, c.text_sha256): c for c in session.scalars(select(Candidate).where(Candidate.item_id == item.id))}
        ids: list[int] = []
        for c in record.candidates:
            row = cands.get((c.origin, c.sha256))
            if row is None:
                row = Candidate(item_id=item.id, text=c.text, text_sha256=c.sha256, origin=c.origin, gen_params=c.gen_params)
                session.add(row)
                session.flush()
                cands[(c.origin, c.sha256)] = row
                stats.candidates_added += 1
            ids.append(row.id)

        rows = list(session.scalars(select(Comparison).where(Comparison.item_id == item.id)))
        comps = {(c.candidate_a_id, c.candidate_b_id): c for c in rows if not c.candidate_ids}  # pairs
        sets = {tuple(c.candidate_ids): c for c in rows if c.candidate_ids}  # rank sets
        comps.update({(c.candidate_a_id, c.candidate_b_id): c for c in sets.values()})  # their pair columns are taken too

        def rank_set(members: list[int]) -> Comparison:
            members = sorted(members)
            found = sets.get(tuple(members))
            if found is None:  # its pair columns: a pair of the set that no other comparison of the item uses,
                free = [p for p in itertools.combinations(members, 2) if p not in comps]  # and none a gold pair asks for
                if not free:
                    raise IngestError(f"{record.where}: every pair of the rank set {members} is taken by another comparison")
                a, b = next((p for p in free if p not in reserved), free[0])
                found = comps[(a, b)] = sets[tuple(members)] = Comparison(
                    project_id=project.id, item_id=item.id, candidate_a_id=a, candidate_b_id=b, candidate_ids=members)
                session.add(found)
                stats.comparisons_added += 1
            return found

        reserved = {tuple(sorted((ids[i], ids[j]))) for i, j in record.gold}

        def comparison(i: int, j: int) -> Comparison:
            a, b = sorted((ids[i], ids[j]))
            if (a, b) in comps and comps[(a, b)].candidate_ids:
                raise IngestError(f"{record.where}: the pair of candidates {a} and {b} already stands for a rank set of this item; "
                                  "import pairs into a pairwise project")  # fmt: skip
            if (a, b) not in comps:
                comps[(a, b)] = Comparison(project_id=project.id, item_id=item.id, candidate_a_id=a, candidate_b_id=b)
                session.add(comps[(a, b)])
                stats.comparisons_added += 1
            return comps[(a, b)]

        if record.votes:  # pairs: exactly the compared pairs
            for v in record.votes:
                comp = comparison(v.first, v.second)
                session.flush()
                user = annotators.get(v.annotator)
                if user is None:
                    user = annotators[v.annotator] = Annotator(username=v.annotator, password_hash=None, role="annotator")
                    session.add(user)
                    session.flush()
                if session.scalar(select(Vote.id).where(Vote.annotator_id == user.id, Vote.client_token == v.token)):
                    continue  # this very line was imported before
                clash = session.scalar(
                    select(Vote.id).where(
                        Vote.comparison_id == comp.id, Vote.annotator_id == user.id, Vote.active, ~Vote.is_repeat
                    )
                )
                if clash:
                    raise IngestError(
                        f"{v.where}: annotator {v.annotator!r} already has a vote on this pair. Give each line "
                        "its own `annotator`, or drop the repeated line."
                    )
                swapped = ids[v.first] > ids[v.second]  # the line's response_a is canonical b
                marks = [{"candidate_id": ids[v.first] if side == "a" else ids[v.second], **m} for side, found in sorted(v.spans.items())
                         for m in found]  # fmt: skip
                session.add(
                    Vote(
                        comparison_id=comp.id,
                        annotator_id=user.id,
                        choice=_canonical(v.preference, swapped),
                        strength=v.strength,
                        aspects={k: _canonical(c, swapped) for k, c in v.aspects.items()},
                        rationale=v.rationale,
                        shown_left=_canonical(v.shown_left or "a", swapped),
                        client_token=v.token,
                        spans=sorted(marks, key=lambda m: (m["candidate_id"], m["start"], m["end"], m["label"])) or None,
                    )
                )
                comp.n_votes += 1
                stats.votes_added += 1
        elif project.mode == "rank":  # every candidate in one rank set of up to rank_k
            for members in rank_sets(ids, project.rank_k):
                rank_set(members)
        else:
            for i, j in _sample_pairs(len(ids), pairs_per_item, f"{source}/{record.external_id}"):
                if ids[i] != ids[j]:  # the same story listed twice is one candidate, never compared with itself
                    comparison(i, j)
        if record.gold_rank:  # a gold ranking: its own rank set, scored against the order given
            order = [ids[i] for i in record.gold_rank]
            if len(set(order)) != len(order):
                raise IngestError(f"{record.where}: `gold_rank` names the same story twice (two candidates with one text)")
            comp = rank_set(order)
            comp.is_gold, comp.gold_ranks = True, {str(c): r + 1 for r, c in enumerate(order)}
            comp.gold_choice = implied_choice({c: r for r, c in enumerate(order)}, comp.candidate_a_id, comp.candidate_b_id)
        for better, worse in record.gold:  # gold: served at the project's gold rate, scored against the answer
            if project.mode == "rank" and not record.votes:  # a ranking of the two
                comp = rank_set([ids[better], ids[worse]])
                comp.gold_ranks = {str(ids[better]): 1, str(ids[worse]): 2}
            else:
                comp = comparison(better, worse)
            comp.is_gold, comp.gold_choice = True, "a" if ids[better] < ids[worse] else "b"
        if record.slices:  # named evaluation slices, as canonical candidate id pairs: export tags their rows
            known = {name: {tuple(p) for p in pairs} for name, pairs in (item.meta or {}).get("slices", {}).items()}
            for name, pairs in record.slices.items():
                for i, j in pairs:
                    if ids[i] != ids[j]:
                        if project.mode != "rank":  # in rank mode the pair is inside a ranking, which export expands
                            comparison(i, j)
                        known.setdefault(name, set()).add(tuple(sorted((ids[i], ids[j]))))
            item.meta = {**(item.meta or {}), "slices": {name: sorted(map(list, pairs)) for name, pairs in sorted(known.items())}}
        session.flush()
    return stats


@contextlib.contextmanager
def write_transaction(session_factory, media_root: str | Path | None = None) -> Iterator[tuple[Session, Path, list[Path]]]:
    """One all-or-nothing write: yields (session, media root, created files) for `write_records` calls.

    The media root is the database's own (recorded on first use); on any error the transaction rolls
    back and the image files it stored are removed, so neither the database nor the media root
    keeps half of an import.
    """
    created: list[Path] = []
    try:
        with session_factory.begin() as session:
            stored_root = get_meta(session, "media_root")
            root = Path(media_root or stored_root or DEFAULT_MEDIA_ROOT).resolve()
            if stored_root and Path(stored_root) != root:
                raise IngestError(
                    f"this database keeps its images under {stored_root}; pass --media-root {stored_root} or leave it out"
                )
            set_meta(session, "media_root", str(root))
            yield session, root, created
    except BaseException:
        for path in created:  # the transaction rolled back: leave no orphan files either
            path.unlink(missing_ok=True)
        raise


def ingest(
    session_factory,
    source: str,
    project: str,
    *,
    fmt: str | None = None,
    media_root: str | Path | None = None,
    image_root: Path | None = None,
    pairs_per_item: int | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    split: str = "train",
    max_text_chars: int = MAX_TEXT_CHARS,
    source_name: str | None = None,
    project_settings: dict[str, Any] | None = None,
    window: int = 0,
) -> tuple[str, IngestStats]:
    """Read, check and write `source` all-or-nothing. Returns (format, stats)."""
    notes: list[str] = []
    fmt, records = read_source(
        source, fmt, image_root=image_root, instruction=instruction, split=split, max_text_chars=max_text_chars, window=window, notes=notes
    )
    with write_transaction(session_factory, media_root) as (session, root, created):
        proj = get_or_create_project(session, project, **(project_settings or {}))
        name = source_name or (Path(source).name if Path(source).exists() else source)
        stats = write_records(
            session, proj, records, source=name, media_root=root, pairs_per_item=pairs_per_item, created_files=created
        )
    stats.notes.extend(notes)
    return fmt, stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m annotate.ingest",
        description=__doc__.split("\n\n")[0] + "\n\nFormats:\n"
        "  jsonl/csv       one item per line: image_paths (or image_path), instruction, optional style,\n"
        "                  context, external_id, candidates [{text, origin}]\n"
        "  folder          a directory of images (one item each) or of sub-directories of frames\n"
        "  pairs           preference lines: image_path(s), instruction, response_a, response_b, preference\n"
        "                  (+ optional annotator, strength, aspects, shown_left); votes are imported\n"
        "  storyreasoning  a Hugging Face dataset id or save_to_disk dir with the StoryReasoning schema\n"
        "                  (--window K: next-frame windows, K frames of context each)\n\n"
        "All or nothing: any bad line stops the import with file:line and nothing is written.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="file, folder, dataset dir or Hugging Face dataset id")
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: $STORYPREF_DB or sqlite:///data/storypref.db)")
    p.add_argument("--project", default="default", help="project to add the items to; created if new")
    p.add_argument("--format", choices=FORMATS, default=None, help="source format (default: detected)")
    p.add_argument("--media-root", default=None, help=f"where images are copied (default: the db's, else {DEFAULT_MEDIA_ROOT})")
    p.add_argument("--image-root", type=Path, default=None, help="image paths must lie under this (default: the source's dir)")
    p.add_argument("--pairs-per-item", type=int, default=None, help="compare K sampled candidate pairs per item (default: all)")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="instruction for folder/storyreasoning items")
    p.add_argument("--split", default="train", help="dataset split for storyreasoning")
    p.add_argument("--window", type=int, default=0, metavar="K",
                   help="storyreasoning: one item per frame T after the K-th, showing frames T-K..T with the text before T "
                        "as context and frame T's text as the reference (next-frame windows; default 0: whole stories)")  # fmt: skip
    p.add_argument("--max-text-chars", type=int, default=MAX_TEXT_CHARS, help="longest text accepted")
    p.add_argument("--source-name", default=None, help="the name items are keyed under (default: the file name)")
    g = p.add_argument_group("settings for a new project (ignored if the project exists)")
    g.add_argument("--overlap", type=int, default=None, help="votes wanted per comparison (default 3)")
    g.add_argument("--guidelines", type=Path, default=None, help="Markdown file shown to annotators")
    g.add_argument("--aspects", default=None, help=f"comma-separated aspects to ask: {','.join(ASPECTS)}")
    g.add_argument("--ask-strength", action="store_true", default=None, help="ask the 4-level strength of preference")
    g.add_argument("--gold-rate", type=float, default=None, help="share of gold comparisons served")
    g.add_argument("--repeat-rate", type=float, default=None, help="share of position-swapped repeats served")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="pairwise (default): choose the better of two stories; rank: order K stories at once (ties allowed)")  # fmt: skip
    g.add_argument("--rank-k", type=int, default=None, metavar="K", help=f"rank mode: stories per ranking, 2 to {MAX_RANK_K} (default 4)")
    g.add_argument("--span-marks", action="store_true", default=None,
                   help="let annotators mark the words that are wrong (hallucinated, contradicts itself, other), in either mode")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    aspects = [a.strip() for a in args.aspects.split(",")] if args.aspects else None
    if aspects and not set(aspects) <= set(ASPECTS):
        print(f"error: --aspects takes {', '.join(ASPECTS)}", file=sys.stderr)
        return 2
    settings = {
        "overlap": args.overlap,
        "guidelines": args.guidelines.read_text(encoding="utf-8") if args.guidelines else None,
        "aspects": aspects,
        "ask_strength": args.ask_strength,
        "gold_rate": args.gold_rate,
        "repeat_rate": args.repeat_rate,
        "mode": args.mode,
        "rank_k": args.rank_k,
        "span_marks": args.span_marks,
    }
    if args.rank_k is not None and not 2 <= args.rank_k <= MAX_RANK_K:
        print(f"error: --rank-k takes 2 to {MAX_RANK_K} stories per ranking, not {args.rank_k}", file=sys.stderr)
        return 2
    try:
        _, session_factory = open_db(args.db)
        fmt, stats = ingest(
            session_factory,
            args.source,
            args.project,
            fmt=args.format,
            media_root=args.media_root,
            image_root=args.image_root,
            pairs_per_item=args.pairs_per_item,
            instruction=args.instruction,
            split=args.split,
            max_text_chars=args.max_text_chars,
            source_name=args.source_name,
            project_settings=settings,
            window=args.window,
        )
    except (IngestError, RuntimeError) as e:
        print(f"error: {e}\nNothing was written.", file=sys.stderr)
        return 1
    print(f"ingested {args.source} as {fmt} into project {args.project!r}: {stats.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

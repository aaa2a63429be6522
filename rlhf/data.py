"""Read preference data for reward-model training, in any of the formats `annotate.export` writes.

`load_preferences(path)` detects the format and says which it found:

* TRL preference JSONL: a directory with `train.jsonl` (and `test.jsonl`), or one such file;
* pairs JSONL: one line per vote (`response_a, response_b, preference`), aggregated by comparison
  with `aggregate="majority"` (ties become soft 0.5 targets), `"soft"` (the target is the share of
  votes for the winner, ties counting half) or `"none"` (every vote is a pair);
* a Hugging Face `DatasetDict` saved with `save_to_disk` (images as `datasets.Image`).

A TRL or HF export holds one row per comparison, already aggregated: its decisive rows are targets
of 1, unless `aggregate="soft"`, which takes each row's `agreement` (the share of the comparison's
votes for the chosen story, written by `annotate.export`) as its target, so a 2-to-1 pair counts for
less than a unanimous one.

Everything becomes `PreferencePair`s. Without a test split the data is split by item
(deterministically, by the item's images), so no image is on both sides. Bad data stops with the
file, the line and the fix: an empty set, a set without a single decisive pair, a missing image.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annotate.formats import STRENGTH_MARGIN, format_prompt

TEST_FRACTION = 0.1


class DataError(ValueError):
    """Unusable preference data; the message names the file and the fix."""


_PATH_KEYS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: hash each file once per process


class ImageRef:
    """An image by path or in memory, with a content key (sha256) for caching its embedding."""

    def __init__(self, path: str | Path | None = None, image: Any = None):
        self.path = Path(path) if path is not None else None
        self.image = image
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None and self.path is not None:  # PPO scores the same frames every iteration: hash each once
            st = self.path.stat()
            stamp = (str(self.path), st.st_size, st.st_mtime_ns)
            if stamp not in _PATH_KEYS:
                _PATH_KEYS[stamp] = hashlib.sha256(self.path.read_bytes()).hexdigest()
            self._key = _PATH_KEYS[stamp]
        elif self._key is None:  # its pixels, mode and size: 40× cheaper than hashing a PNG of it (1 ms at 512²)
            self._key = hashlib.sha256(f"{self.image.mode}:{self.image.size}:".encode() + self.image.tobytes()).hexdigest()
        return self._key

    def load(self):
        from PIL import Image

        return (Image.open(self.path) if self.path is not None else self.image).convert("RGB")

    def __repr__(self) -> str:
        return f"ImageRef({self.path or 'in-memory'})"


@dataclass
class PreferencePair:
    images: list[ImageRef]
    prompt: str  # instruction, style and context, as annotate.formats.format_prompt writes them
    chosen: str
    rejected: str
    target: float = 1.0  # P(chosen ≻ rejected): 1 decisive, 0.5 tie, in between for soft labels
    margin: float = 0.0
    aspects: dict[str, str] = field(default_factory=dict)  # aspect -> chosen | rejected | tie
    item_id: str = ""
    where: str = ""
    slices: tuple[str, ...] = ()  # named evaluation slices the pair belongs to, e.g. ("image-only",)
    weight: float = 1.0  # its share of the loss: < 1 for the pairs a ranking implies (annotate.export --rank-weight)
    # Span marks: {"chosen": [...], "rejected": [...]}, each {"start", "end", "label", "text"?}, offsets into that story.
    spans: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def tie(self) -> bool:
        return self.target == 0.5


def _message_text(value: Any) -> str:
    """A TRL field is a string (standard) or a list of chat messages (conversational)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(m["content"] if isinstance(m.get("content"), str) else
                         " ".join(c.get("text", "") for c in m.get("content", []) if isinstance(c, dict))
                         for m in value)  # fmt: skip
    raise TypeError(f"expected a string or a list of messages, got {type(value).__name__}")


def _images(paths: list, base: Path, where: str) -> list[ImageRef]:
    refs = []
    for p in paths or []:
        if not isinstance(p, str):  # a PIL image (HF datasets with an Image feature)
            refs.append(ImageRef(image=p))
            continue
        path = Path(p) if Path(p).is_absolute() else base / p
        if not path.is_file():
            raise DataError(f"{where}: image not found: {p}. Re-export with the media root that holds it, or fix the path.")
        refs.append(ImageRef(path))
    return refs


def _jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); each line must be one JSON object") from None


def _trl_row(row: dict, base: Path, where: str, soft: bool = False) -> PreferencePair:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing `{key}`; TRL preference rows need prompt, chosen and rejected")
    tie = bool(row.get("tie"))
    target = 0.5 if tie else 1.0
    if soft and not tie:  # the share of the comparison's votes that chose `chosen` (annotate.export's `agreement`)
        share = row.get("agreement")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 < share <= 1.0:
            raise DataError(f"{where}: aggregate soft takes each pair's target from `agreement` (the share of votes for the chosen "
                            f"story, in (0, 1]), got {share!r}; export with annotate.export, which writes it, or use aggregate majority")  # fmt: skip
        target = max(0.5, float(share))
    return PreferencePair(
        images=_images(row.get("images") or ([row["image"]] if row.get("image") else []), base, where),
        prompt=_message_text(row["prompt"]),
        chosen=_message_text(row["chosen"]),
        rejected=_message_text(row["rejected"]),
        target=target,
        margin=float(row.get("margin") or 0.0),
        aspects=row["aspects"] if isinstance(row.get("aspects"), dict) else json.loads(row.get("aspects") or "{}"),
        item_id=str(row.get("item_id") or ""),
        where=where,
        slices=_slices(row.get("slices"), where),
        weight=_weight(row.get("weight"), where),
        spans=_spans(row.get("spans"), {"chosen": _message_text(row["chosen"]), "rejected": _message_text(row["rejected"])}, where),
    )


def _weight(value: Any, where: str) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise DataError(f"{where}: `weight` must be a positive number (1 for a vote of its own), got {value!r}")
    return float(value)


def _spans(value: Any, texts: dict[str, str], where: str) -> dict[str, list[dict]]:
    """Span marks by story ({"chosen": [...], "rejected": [...]}, or JSON text of it), checked against the stories."""
    if value in (None, "", "{}"):
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict) or not set(value) <= set(texts):
        raise DataError(f"{where}: `spans` must map {' and '.join(texts)} to lists of marks, got {value!r}")
    out = {}
    for side, marks in value.items():
        for m in marks or []:
            if not (isinstance(m, dict) and isinstance(m.get("start"), int) and isinstance(m.get("end"), int)
                    and 0 <= m["start"] < m["end"] <= len(texts[side])):  # fmt: skip
                raise DataError(f"{where}: a span mark of `{side}` ({m!r}) does not fit its story of {len(texts[side])} characters")
        if marks:
            out[side] = list(marks)
    return out


def _slices(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: `slices` must be a list of slice names, e.g. [\"image-only\"], got {value!r}")
    return tuple(sorted(set(value)))


def _pairs(path: Path, aggregate: str) -> list[PreferencePair]:
    groups: dict[Any, list[tuple[int, dict]]] = defaultdict(list)
    for lineno, row in _jsonl(path):
        for key in ("instruction", "response_a", "response_b", "preference"):
            if key not in row:
                raise DataError(f"{path}:{lineno}: missing `{key}`; pairs lines need instruction, response_a, response_b, preference")
        # a comparison's votes; a ranking's (source: rank) share its comparison id, so the pair is part of the key
        key = (row.get("comparison_id"), row["response_a"], row["response_b"]) if row.get("comparison_id") else (row.get("item_id"), row["response_a"], row["response_b"])
        groups[key if aggregate != "none" else (key, lineno)].append((lineno, row))
    out = []
    for votes in groups.values():
        lineno, first = votes[0]
        where = f"{path}:{lineno}"
        counts = Counter(r["preference"] for _, r in votes if r["preference"] in ("response_a", "response_b", "tie"))
        n = sum(counts.values())
        if not n:
            continue  # only both-bad answers: no preference to learn
        wins_a = counts["response_a"] + 0.5 * counts["tie"]
        a_first = wins_a >= n - wins_a
        chosen, rejected = ("response_a", "response_b") if a_first else ("response_b", "response_a")
        if aggregate == "soft":
            target = max(wins_a, n - wins_a) / n
        else:  # majority (or a single vote): an a-b draw or a tie majority is a tie
            top = counts.most_common()
            tied_top = len(top) > 1 and top[0][1] == top[1][1]
            target = 0.5 if tied_top or top[0][0] == "tie" else 1.0
        agreeing = [r for _, r in votes if r["preference"] == chosen]
        strengths = [r["strength"] for r in agreeing if r.get("strength") in STRENGTH_MARGIN]
        aspects: dict[str, str] = {}
        for aspect in {k for _, r in votes for k in (r.get("aspects") or {})}:
            said = Counter((r.get("aspects") or {}).get(aspect) for _, r in votes if (r.get("aspects") or {}).get(aspect))
            winner = said.most_common(1)[0][0]
            aspects[aspect] = "tie" if winner == "tie" else "chosen" if winner == chosen else "rejected"
        paths = first.get("image_paths") or ([first["image_path"]] if first.get("image_path") else [])
        marks: dict[str, list[dict]] = {}
        for lineno, r in votes:
            for side, found in _spans(r.get("spans"), {"response_a": first["response_a"], "response_b": first["response_b"]},
                                      f"{path}:{lineno}").items():  # fmt: skip
                role = "chosen" if side == chosen else "rejected"
                marks.setdefault(role, []).extend(m for m in found if m not in marks.get(role, []))
        out.append(
            PreferencePair(
                images=_images(paths, path.parent, where),
                prompt=format_prompt(first["instruction"], first.get("style"), first.get("context")),
                chosen=first[chosen],
                rejected=first[rejected],
                target=target,
                margin=sum(STRENGTH_MARGIN[s] for s in strengths) / len(strengths) if strengths and target > 0.5 else 0.0,
                aspects=aspects,
                item_id=str(first.get("item_id") or ""),
                where=where,
                slices=tuple(sorted({s for lineno, r in votes for s in _slices(r.get("slices"), f"{path}:{lineno}")})),
                weight=sum(_weight(r.get("weight"), f"{path}:{n}") for n, r in votes) / len(votes),
                spans=marks,
            )
        )
    return out


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "hf"
        if (path / "train.jsonl").exists():
            return "trl"
        raise DataError(f"{path}: a directory without train.jsonl or a saved dataset; pass an export of annotate.export")
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    first = next((row for _, row in _jsonl(path)), None)
    if first is None:
        raise DataError(f"{path}: empty file; export some votes first (python -m annotate.export)")
    if {"response_a", "response_b"} <= set(first):
        return "pairs"
    if {"chosen", "rejected"} <= set(first):
        return "trl"
    raise DataError(f"{path}:1: neither a pairs line (response_a/response_b) nor a TRL row (chosen/rejected)")


def split_key(pair: PreferencePair) -> str:
    return pair.item_id or "|".join(sorted(i.key for i in pair.images)) or pair.prompt


def split_by_item(pairs: list[PreferencePair], test_fraction: float = TEST_FRACTION) -> tuple[list, list]:
    """Deterministic: an item (and so its images) is always on the same side."""
    train, test = [], []
    for p in pairs:
        bucket = int(hashlib.sha256(split_key(p).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (test if bucket < test_fraction else train).append(p)
    return train, test


def _check(pairs: list[PreferencePair], source: str) -> None:
    if not pairs:
        raise DataError(f"{source}: no preference pairs. Export votes first: python -m annotate.export --format trl")
    if all(p.tie for p in pairs):
        raise DataError(
            f"{source}: all {len(pairs)} pairs are ties, so there is nothing to learn which story is better. "
            "Collect decisive votes, or export without --include-ties."
        )


def load_preferences(
    path: str | Path, aggregate: str = "majority", test_fraction: float = TEST_FRACTION
) -> tuple[list[PreferencePair], list[PreferencePair], str]:
    """(train, test, message about the format found and the split)."""
    path = Path(path)
    if aggregate not in ("majority", "soft", "none"):
        raise DataError(f"unknown aggregate rule {aggregate!r}; use majority, soft or none")
    fmt = detect_format(path)
    soft = aggregate == "soft"  # TRL and HF rows: the target is the row's `agreement`
    test: list[PreferencePair] | None = None
    if fmt == "trl":
        files = [path / "train.jsonl", path / "test.jsonl"] if path.is_dir() else [path]
        loaded = [[_trl_row(row, f.parent, f"{f}:{n}", soft) for n, row in _jsonl(f)] if f.exists() else None for f in files]
        train, test = loaded[0], (loaded[1] if len(loaded) > 1 else None)
    elif fmt == "pairs":
        train = _pairs(path, aggregate)
    else:
        import datasets

        dd = datasets.load_from_disk(str(path))
        splits = dd if isinstance(dd, datasets.DatasetDict) else {"train": dd}
        rows = {name: [_trl_row(r, path, f"{path}[{name}][{i}]", soft) for i, r in enumerate(ds)] for name, ds in splits.items()}
        train, test = rows.get("train", []), rows.get("test")
    message = f"found {fmt} data in {path}"
    if fmt == "pairs":
        message += f" (votes aggregated by comparison: {aggregate})"
    elif soft:
        message += " (targets: each pair's share of votes, from `agreement`)"
    if not test:
        train, test = split_by_item(train, test_fraction)
        message += f"; no test split, so {len(test)} pairs of {test_fraction:.0%} of the items were held out"
    _check(train, str(path))
    return train, test, message


# Contrast pairs: synthetic minimal pairs that only the frames can settle -------------------------


def read_contrast_words(path: str | Path) -> list[tuple[str, ...]]:
    """Groups of interchangeable words or phrases, one group per line, comma-separated
    ("red, blue, green" / "circle, square" / "one sunny day, one moonlit night"); `#` starts a comment.
    A bad file stops with its line and the fix: a group of one, a phrase in two groups."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such word-group file; write one group of interchangeable words per line, comma-separated")
    groups: list[tuple[str, ...]] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = tuple(dict.fromkeys(w.strip() for w in line.split("#", 1)[0].split(",") if w.strip()))
        if not words:
            continue
        if len(words) < 2:
            raise DataError(f"{path}:{n}: the group {words[0]!r} has one phrase; a group needs two or more, comma-separated")
        for w in words:
            if w.lower() in seen:
                raise DataError(f"{path}:{n}: {w!r} is already in the group of line {seen[w.lower()]}; give each phrase one group")
            seen[w.lower()] = n
        groups.append(words)
    if not groups:
        raise DataError(f"{path}: no word groups; write one group of interchangeable words per line, comma-separated")
    return groups


@functools.lru_cache(maxsize=8)
def _contrast_matcher(groups: tuple[tuple[str, ...], ...]):
    """Each phrase's group (by its lower case) and one pattern for all phrases, longest first: built once per word list."""
    import re

    group_of = {w.lower(): g for g in groups for w in g}
    return group_of, re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(group_of, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def contrast_story(story: str, groups: list[tuple[str, ...]], rng) -> tuple[str, str, str] | None:
    """The story with one phrase of a group swapped for another of its group, as (story, old, new),
    or None where no phrase of any group occurs. Half the time every mention of the phrase is swapped
    (a consistent error: only the frames show it), else one mention (where the phrase recurs, the
    story now also contradicts itself). Whole words, case-insensitive; a capital stays a capital."""
    group_of, pattern = _contrast_matcher(tuple(groups))
    hits = list(pattern.finditer(story))
    if not hits:
        return None
    old = hits[int(rng.integers(len(hits)))].group(0).lower()
    options = [w for w in group_of[old] if w.lower() != old]
    new = options[int(rng.integers(len(options)))]
    mentions = [m for m in hits if m.group(0).lower() == old]
    chosen = mentions if rng.random() < 0.5 else [mentions[int(rng.integers(len(mentions)))]]
    out, last = [], 0
    for m in chosen:
        word = new[0].upper() + new[1:] if m.group(0)[0].isupper() else new
        out += [story[last:m.start()], word]
        last = m.end()
    return "".join(out) + story[last:], old, new


def contrast_pairs(pairs: list[PreferencePair], groups: list[tuple[str, ...]], share: float, seed: int = 0) -> list[PreferencePair]:
    """New pairs (story ≻ the same story with one look, object or scene word swapped) for a `share` of
    the decisive pairs, built from their chosen stories, as POVID builds dispreferred answers by
    injecting hallucinations (Zhou et al., 2024). Each new pair keeps its source's frames and prompt,
    is decisive and belongs to the slice "contrast"; pairs whose story holds no grouped phrase give none."""
    import numpy as np

    if not 0.0 < share <= 1.0:
        raise DataError(f"contrast share {share}: use a value in (0, 1], the share of decisive pairs that get a contrast pair")
    rng = np.random.default_rng(seed)
    out = []
    for p in pairs:
        if p.target <= 0.5 or rng.random() >= share:
            continue
        made = contrast_story(p.chosen, groups, rng)
        if made is None or made[0] == p.chosen:
            continue
        story, old, new = made
        out.append(PreferencePair(images=p.images, prompt=p.prompt, chosen=p.chosen, rejected=story, item_id=p.item_id,
                                  where=f"{p.where} (contrast: {old!r} → {new!r})", slices=("contrast",)))  # fmt: skip
    return out

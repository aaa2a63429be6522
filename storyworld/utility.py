"""The hidden utility: how much a simulated human likes a story for a scene, asked in a style.

    utility = fluency × ( 3.0 * grounding_precision   share of things mentioned that are really in the scene
                        + 2.0 * grounding_recall      share of the scene (cast, setting, events) that is mentioned
                        + 1.5 * non_repetition        unique sentences and distinct word trigrams
                        + 1.5 * consistency           no character bound to two different looks in the words
                        + 1.0 * style_match           share of style words that belong to the asked style
                        + 1.0 * length )              1 for 10-30 words per frame, falling off outside

    fluency: the share of sentences that read as the grammar's language and end in a full stop
    (`grammar.sentences_well_formed`). Every story the grammar writes has fluency 1, so this
    factor only judges free text: a reader does not credit a garbled sentence, or a story cut off
    mid-sentence, for the facts it happens to get right.

Each component lies in [0, 1], so the utility lies in [0, 10]. The grounding components are the
ones only the frames can judge; the others read the words alone (a character given one wrong look
in every mention loses grounding precision, not consistency). It reads any text, not only the
grammar's: mentions are found as "<color> <shape>" pairs, setting and time words, and character
names. This module is the ground truth of storyworld; code in `rlhf/` must never import it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from storyworld.grammar import STYLE_WORDS, sentences_well_formed
from storyworld.scene import COLORS, NAMES, SETTINGS, SHAPES, Scene

WEIGHTS = {
    "grounding_precision": 3.0,
    "grounding_recall": 2.0,
    "non_repetition": 1.5,
    "consistency": 1.5,
    "style_match": 1.0,
    "length": 1.0,
}
TIME_WORDS = {"sun": "day", "sunny": "day", "day": "day", "morning": "day", "rose": "day",
              "night": "night", "moon": "night", "moonlit": "night", "midnight": "night", "fell": "night"}  # fmt: skip
EVENT_WORDS = {
    "meet": {"met", "meets", "meeting"},
    "pickup": {"picked", "grabbed", "took"},
    "lights": {"rose", "fell"},
    "move": {w for s in ("dashed", "charged", "raced", "wobbled", "hopped", "tumbled", "crept", "slunk", "shivered",
                         "drifted", "strolled", "glided", "across", "moved", "walked", "ran") for w in [s]},
}  # fmt: skip
LENGTH_RANGE = (10, 30)  # preferred words per frame
_TAG = re.compile(r"</?gd[a-z]\b[^>]*>")
_WORD = re.compile(r"[A-Za-z]+")


@dataclass
class Components:
    grounding_precision: float
    grounding_recall: float
    non_repetition: float
    consistency: float
    style_match: float
    length: float
    fluency: float

    @property
    def utility(self) -> float:
        return self.fluency * sum(WEIGHTS[k] * v for k, v in asdict(self).items() if k != "fluency")

    def to_dict(self) -> dict[str, float]:
        return {**{k: round(v, 4) for k, v in asdict(self).items()}, "utility": round(self.utility, 4)}


def strip_tags(story: str) -> str:
    return re.sub(r"\s+", " ", _TAG.sub(" ", story)).strip()


def name_bindings(text: str) -> dict[str, set[tuple[str, str]]]:
    """Each character name the text writes as "Pip the red circle", and the looks (color, shape) it gives it."""
    words = _WORD.findall(text)
    lower = [w.lower() for w in words]
    out: dict[str, set[tuple[str, str]]] = {}
    for i in range(2, len(words) - 1):
        if lower[i] in COLORS and lower[i + 1] in SHAPES and lower[i - 1] == "the" and words[i - 2] in NAMES:
            out.setdefault(words[i - 2], set()).add((lower[i], lower[i + 1]))
    return out


def components(scene: Scene, story: str, style: str) -> Components:
    """Score `story` against the ground truth of `scene`; see the module docstring."""
    text = strip_tags(story)
    words = _WORD.findall(text)
    lower = [w.lower() for w in words]
    cast = scene.all_entities()
    looks = {(e.color, e.shape) for f in scene.frames for e in f.entities}
    names = {e.name: (e.color, e.shape) for e in cast.values() if e.name}
    times = {f.time for f in scene.frames}

    # Grounding: every mention is right or wrong.
    right = wrong = 0
    seen_looks, seen_names = set(), set()
    for i, w in enumerate(lower[:-1]):
        if w in COLORS and lower[i + 1] in SHAPES:
            look = (w, lower[i + 1])
            right, wrong = (right + 1, wrong) if look in looks else (right, wrong + 1)
            seen_looks.add(look)
    for w, lw in zip(words, lower):
        if w in NAMES:
            right, wrong = (right + 1, wrong) if w in names else (right, wrong + 1)
            seen_names.add(w)
        elif lw in SETTINGS:
            right, wrong = (right + 1, wrong) if lw == scene.setting else (right, wrong + 1)
        elif lw in TIME_WORDS:
            right, wrong = (right + 1, wrong) if TIME_WORDS[lw] in times else (right, wrong + 1)
    precision = right / (right + wrong) if right + wrong else 0.0

    entity_hits = sum(1 for e in cast.values() if (e.color, e.shape) in seen_looks or (e.name and e.name in seen_names))
    events = [f.event for f in scene.frames[1:]]
    event_hits = sum(1 for ev in set(events) if EVENT_WORDS[ev] & set(lower))
    recall = (
        0.6 * entity_hits / len(cast)
        + 0.2 * (scene.setting in lower)
        + 0.2 * (event_hits / len(set(events)) if events else 1.0)
    )

    sentences = [s.strip().lower() for s in re.split(r"[.!?]+", text) if s.strip()]
    trigrams = list(zip(lower, lower[1:], lower[2:]))
    non_repetition = (
        0.5 * (len(set(sentences)) / len(sentences) if sentences else 0.0)
        + 0.5 * (len(set(trigrams)) / len(trigrams) if trigrams else 0.0)
    )

    # Consistency: a name seen with two looks contradicts itself, which the words alone show. A name
    # given one look that is not its own is a grounding error (a wrong mention above), seen only in
    # the frames, and not counted again here.
    bindings = name_bindings(text)
    bad = sum(1 for ls in bindings.values() if len(ls) > 1)
    consistency = 1.0 - bad / len(bindings) if bindings else 1.0

    counts = {s: sum(w in vocab for w in lower) for s, vocab in STYLE_WORDS.items()}
    total = sum(counts.values())
    style_match = counts.get(style, 0) / total if total else 0.0

    per_frame = len(words) / len(scene.frames)
    lo, hi = LENGTH_RANGE
    length = per_frame / lo if per_frame < lo else max(0.0, 1.0 - (per_frame - hi) / hi) if per_frame > hi else 1.0
    well_formed = sentences_well_formed(text)
    fluency = sum(well_formed) / len(well_formed) if well_formed else 0.0
    return Components(precision, recall, non_repetition, consistency, style_match, length, fluency)


def mentions(scene: Scene, story: str) -> list[tuple[int, int, str | None]]:
    """Every checkable mention of `story` (a look, a name, a setting, a time) as (start, end, flaw),
    character offsets into the story as given (tags included). `flaw` is what a careful reader who
    sees the frames would mark: "hallucinated" (the frames do not hold it), "contradicts" (a look a
    name is given after a first, different one), or None (right). The same mentions `components`
    counts.
    """
    blank = _TAG.sub(lambda m: " " * len(m.group()), story)
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(blank)]
    cast = scene.all_entities()
    looks = {(e.color, e.shape) for f in scene.frames for e in f.entities}
    names = {e.name for e in cast.values() if e.name}
    times = {f.time for f in scene.frames}
    out: list[tuple[int, int, str | None]] = []
    first_look: dict[str, tuple[str, str]] = {}
    lower = [w.lower() for w, _, _ in words]
    for i, (w, start, end) in enumerate(words):
        lw = lower[i]
        if lw in COLORS and i + 1 < len(words) and lower[i + 1] in SHAPES:
            look, span_end = (lw, lower[i + 1]), words[i + 1][2]
            named = words[i - 2][0] if i >= 2 and lower[i - 1] == "the" and words[i - 2][0] in NAMES else None
            if named and named in first_look and first_look[named] != look:
                out.append((start, span_end, "contradicts"))
            else:
                out.append((start, span_end, None if look in looks else "hallucinated"))
            if named:
                first_look.setdefault(named, look)
        elif w in NAMES:
            out.append((start, end, None if w in names else "hallucinated"))
        elif lw in SETTINGS:
            out.append((start, end, None if lw == scene.setting else "hallucinated"))
        elif lw in TIME_WORDS:
            out.append((start, end, None if TIME_WORDS[lw] in times else "hallucinated"))
    return out


def flaw_spans(scene: Scene, story: str) -> list[tuple[int, int, str]]:
    """The mentions a careful reader would mark (see `mentions`), as (start, end, label)."""
    return [(s, e, flaw) for s, e, flaw in mentions(scene, story) if flaw]


def hallucination_rate(scene: Scene, story: str) -> float:
    """The share of a story's checkable mentions that the frames do not hold (0 for a story with none)."""
    found = mentions(scene, story)
    return sum(f == "hallucinated" for _, _, f in found) / len(found) if found else 0.0


def utility(scene: Scene, story: str, style: str) -> float:
    """The hidden utility of `story` for `scene` asked in `style`, in [0, 10]."""
    return components(scene, story, style).utility

"""The contract between `annotate` (which writes preference files) and `rlhf` (which reads them).

Pure standard library, so both sides import it: how a prompt is written from an item, how a
preference strength maps to a Bradley-Terry margin, and how a story is split over its frames and
freed of its grounding tags. Changing anything here changes the files on both sides.
"""

from __future__ import annotations

import re

# Llama 2's "margin small": strength 1 (negligibly better) .. 4 (significantly better).
STRENGTH_MARGIN = {1: 0.0, 2: 1 / 3, 3: 2 / 3, 4: 1.0}

_FRAME = re.compile(r"<gdi\s+image(\d+)\s*>(.*?)</gdi>", re.S | re.I)
_ANY_TAG = re.compile(r"</?gd[a-z]\b[^>]*>", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def format_prompt(instruction: str, style: str | None = None, context: str | None = None) -> str:
    """The text a model sees besides the images.

    >>> format_prompt("Tell a story.", "spooky", "A cat left home.")
    'Tell a story.\\nStyle: spooky\\nStory so far: A cat left home.'
    """
    parts = [instruction]
    if style:
        parts.append(f"Style: {style}")
    if context:
        parts.append(f"Story so far: {context}")
    return "\n".join(parts)


def parse_prompt(prompt: str) -> tuple[str, str | None, str | None]:
    """`format_prompt`'s inverse: (instruction, style, context).

    >>> parse_prompt('Tell a story.\\nStyle: spooky\\nStory so far: A cat left home.')
    ('Tell a story.', 'spooky', 'A cat left home.')
    >>> parse_prompt('Tell a story.')
    ('Tell a story.', None, None)
    """
    context = style = None
    head, sep, tail = prompt.rpartition("\nStory so far: ")  # the context comes last and may hold newlines of its own
    if sep:
        prompt, context = head, tail
    head, sep, tail = prompt.rpartition("\nStyle: ")
    if sep and "\n" not in tail:
        prompt, style = head, tail
    return prompt, style, context


def split_frames(story: str, n_frames: int) -> list[list[str]]:
    """The story's parts per frame, as raw text. `<gdi>` tags win; otherwise sentences in order.

    >>> split_frames("One. Two. Three. Four.", 2)
    [['One.', 'Two.'], ['Three.', 'Four.']]
    >>> split_frames("<gdi image2>Later.</gdi><gdi image1>First.</gdi>", 2)
    [['First.'], ['Later.']]
    """
    n_frames = max(1, n_frames)
    parts: list[list[str]] = [[] for _ in range(n_frames)]
    tagged = _FRAME.findall(story)
    if tagged:
        for index, text in tagged:
            parts[min(max(int(index) - 1, 0), n_frames - 1)].append(text.strip())
        leftover = _FRAME.sub(" ", story).strip()
        if leftover:  # text outside any frame tag goes with the last frame
            parts[-1].append(leftover)
        return parts
    sentences = split_sentences(story)
    for i, sentence in enumerate(sentences):
        parts[i * n_frames // max(len(sentences), 1)].append(sentence)
    return parts


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if s]


def frame_sentences(story: str, n_frames: int) -> list[list[str]]:
    """The story's plain sentences, frame by frame (`split_frames`): what CLIP embeds for each frame.

    >>> frame_sentences("<gdi image2>Later.</gdi><gdi image1>First. Then.</gdi>", 2)
    [['First.', 'Then.'], ['Later.']]
    """
    return [[s for p in part for s in split_sentences(plain_text(p))] for part in split_frames(story, n_frames)]


def plain_text(story: str) -> str:
    """The story without grounding tags (a tag's place leaves no space before punctuation).

    >>> plain_text("<gdo char1>Ana</gdo>, <gdo char2>Bo</gdo>.")
    'Ana, Bo.'
    """
    return re.sub(r"\s+([.,!?;:])", r"\1", re.sub(r"\s+", " ", _ANY_TAG.sub(" ", story))).strip()


def plain_text_offsets(story: str) -> tuple[str, list[int]]:
    """`plain_text(story)`, and for each of its characters the offset of the character of `story` it
    came from: how a span mark (offsets into the story as stored and shown) finds its words in the
    plain text that models read.

    >>> text, at = plain_text_offsets("<gdo char1>Ana</gdo> , ran.")
    >>> text, [at[i] for i in range(len(text))]
    ('Ana, ran.', [11, 12, 13, 21, 22, 23, 24, 25, 26])
    """
    chars = []  # (character, offset in story)
    for m in re.finditer(r"(?P<tag>" + _ANY_TAG.pattern + r")|(?P<ch>.)", story, re.S | re.I):
        chars.append((" ", m.start()) if m.group("tag") else (m.group("ch"), m.start()))
    out: list[tuple[str, int]] = []
    for ch, at in chars:  # whitespace runs → one space
        if ch.isspace():
            if out and out[-1][0] == " ":
                continue
            ch = " "
        out.append((ch, at))
    kept = [c for k, c in enumerate(out) if not (c[0] == " " and k + 1 < len(out) and out[k + 1][0] in ".,!?;:")]
    while kept and kept[0][0] == " ":
        kept.pop(0)
    while kept and kept[-1][0] == " ":
        kept.pop()
    return "".join(c for c, _ in kept), [at for _, at in kept]


def plain_spans(story: str, spans: list[dict]) -> list[tuple[int, int]]:
    """Span marks (`start`/`end` into `story`) as (start, end) into `plain_text(story)`; a mark that
    covers no plain character (only a tag) is left out.

    >>> plain_spans("<gdo c1>Pip</gdo> the red star.", [{"start": 18, "end": 30}])
    [(4, 16)]
    """
    _, at = plain_text_offsets(story)
    out = []
    for m in spans:
        inside = [i for i, a in enumerate(at) if m["start"] <= a < m["end"]]
        if inside:
            out.append((inside[0], inside[-1] + 1))
    return out


def next_frame_windows(story: str, n_frames: int, k: int) -> list[tuple[int, str, str]]:
    """Next-frame examples of a story of `n_frames` frames, K frames of context each.

    One example per frame t after the K-th (0-based t = K .. n_frames − 1), as (t, context, target):
    the images of frames t−K..t go with it (the caller slices them), `context` is the plain text of
    every frame before t (the story so far), and `target` is frame t's own text. The per-frame text
    comes from the story's `<gdi imageN>` tags, else from its sentences in order (`split_frames`). A
    tagged target is kept tagged, re-numbered as the window's last image (image K+1), so that it
    still sits beside its frame when shown; an untagged one stays plain. A story of K frames or
    fewer gives no example.

    >>> next_frame_windows("<gdi image1>A cat.</gdi><gdi image2>It runs.</gdi><gdi image3>It naps.</gdi>", 3, 1)
    [(1, 'A cat.', '<gdi image2>It runs.</gdi>'), (2, 'A cat. It runs.', '<gdi image2>It naps.</gdi>')]
    >>> next_frame_windows("One. Two. Three.", 3, 2)
    [(2, 'One. Two.', 'Three.')]
    """
    if k < 1:
        raise ValueError(f"--window must be 1 or more frames of context, got {k}")
    if n_frames <= k:
        return []
    tagged = bool(_FRAME.search(story))
    parts = [" ".join(p) for p in split_frames(story, n_frames)]
    out = []
    for t in range(k, n_frames):
        context = plain_text(" ".join(parts[:t]))
        target = parts[t].strip()
        if tagged and target:
            target = f"<gdi image{k + 1}>{target}</gdi>"
        out.append((t, context, target))
    return out

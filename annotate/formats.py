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
    """The story without grounding tags."""
    return re.sub(r"\s+", " ", _ANY_TAG.sub(" ", story)).strip()

"""Turn two candidate stories and their frames into safe HTML for the comparison view.

Candidate text is untrusted (model output, imported data). Everything is escaped with
`html.escape`; the only markup on the page is the markup built here. StoryReasoning tags are parsed
out of the raw text before escaping:
`<gdi imageN>…</gdi>` assigns a part of the story to frame N, and `<gdo|gda|gdl ID>…</gdo>` marks
an entity, which is shown as a highlight whose color depends only on the ID, so the same character
has the same color in both stories. Stories without frame tags are split into sentences and spread
over the frames in order. The optional diff marks the words one story has and the other lacks.
"""

from __future__ import annotations

import difflib
import hashlib
import html
import re

from annotate.formats import plain_text, split_frames

_ENTITY = re.compile(r"<(gdo|gda|gdl)\s+([\w-]{1,40})\s*>(.*?)</\1>", re.S | re.I)
_ANY_TAG = re.compile(r"</?gd[a-z]\b[^>]*>", re.I)
PALETTE = ("#ffd6a5", "#caffbf", "#9bf6ff", "#bdb2ff", "#ffc6ff", "#fdffb6", "#a0c4ff", "#ffadad")
KIND_LABEL = {"gdo": "object", "gda": "action", "gdl": "location"}


def entity_color(entity_id: str) -> str:
    """The same entity id always gets the same color (in both stories, on every page)."""
    return PALETTE[int(hashlib.sha256(entity_id.lower().encode()).hexdigest(), 16) % len(PALETTE)]


def _words(text: str) -> list[str]:
    return plain_text(text).split()


def diff_words(left: str, right: str) -> tuple[set[int], set[int]]:
    """Indices of the words of `left` and of `right` that the other story does not have."""
    a, b = [w.lower().strip(".,!?;:") for w in _words(left)], [w.lower().strip(".,!?;:") for w in _words(right)]
    only_a, only_b = set(), set()
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("replace", "delete"):
            only_a.update(range(i1, i2))
        if op in ("replace", "insert"):
            only_b.update(range(j1, j2))
    return only_a, only_b


def _blank_tags(text: str) -> str:
    """The text with its grounding tags blanked out, character for character, so offsets still hold."""
    return _ANY_TAG.sub(lambda m: " " * len(m.group()), text)


def render_part(text: str, marked: set[int] | None = None, offset: int = 0, *, base: int | None = None) -> tuple[str, int]:
    """HTML for one part: entities highlighted, diff words marked. Returns (html, words consumed).

    With `base` (the part's offset in its story's text), every word is a `<span class="sp-w">` that
    carries its character offsets into the story (`data-s`, `data-e`): what span marks are made of.
    """
    out, pos, word_index = [], 0, offset
    marked = marked or set()

    def words_html(chunk: str, at: int) -> str:
        """Escaped words; runs of marked words (with the spaces between them) share one <mark>."""
        nonlocal word_index
        tokens = [t for t in re.split(r"(\s+)", chunk) if t]
        flags, starts, p = [], [], at
        for token in tokens:
            starts.append(p)
            p += len(token)
            if token.isspace():
                flags.append(None)
            else:
                flags.append(word_index in marked)
                word_index += 1
        pieces, open_run = [], False
        for k, (token, flag) in enumerate(zip(tokens, flags)):
            if flag is None:  # a space is inside a run only if the words on both sides are marked
                inside = open_run and k + 1 < len(flags) and flags[k + 1]
                if open_run and not inside:
                    pieces.append("</mark>")
                    open_run = False
                pieces.append(" " if base is not None else token)
                continue
            if flag and not open_run:
                pieces.append('<mark class="sp-diff">')
                open_run = True
            elif not flag and open_run:
                pieces.append("</mark>")
                open_run = False
            word = html.escape(token)
            if base is not None:
                word = f'<span class="sp-w" data-s="{base + starts[k]}" data-e="{base + starts[k] + len(token)}">{word}</span>'
            pieces.append(word)
        if open_run:
            pieces.append("</mark>")
        return "".join(pieces)

    for m in _ENTITY.finditer(text):
        out.append(words_html(_blank_tags(text[pos : m.start()]), pos))
        kind, eid, inner = m.group(1).lower(), m.group(2), _blank_tags(m.group(3))
        title = html.escape(f"{KIND_LABEL[kind]} {eid}", quote=True)
        out.append(f'<span class="sp-entity" style="background:{entity_color(eid)}" title="{title}">{words_html(inner, m.start(3))}</span>')
        pos = m.end()
    out.append(words_html(_blank_tags(text[pos:]), pos))
    return "".join(out), word_index - offset


def _part_offsets(story: str, parts: list[list[str]]) -> list[list[int | None]]:
    """Where each part of `split_frames` starts in the story (None: not a piece of it verbatim)."""
    taken: set[int] = set()
    out = []
    for frame in parts:
        row = []
        for part in frame:
            at = story.find(part)
            while at in taken and at >= 0:
                at = story.find(part, at + 1)
            row.append(at if at >= 0 else None)
            if at >= 0:
                taken.add(at)
        out.append(row)
    return out


def render_stories(
    stories: list[str],
    image_urls: list[str],
    *,
    show_diff: bool = False,
    labels: list[str] | None = None,
    word_offsets: bool = False,
) -> str:
    """One table row per frame: the frame, then the part of each story that belongs to it.

    Two stories (a pair) or more (a ranking). `show_diff` marks, for a pair, the words one story has
    and the other lacks. `word_offsets` wraps every word in a span with its offsets into its story
    (`render_part`), and tags each story's cells with `data-p` (its index here): span marking.
    """
    n = max(1, len(image_urls))
    labels = labels or [chr(ord("A") + i) for i in range(len(stories))]
    parts = [split_frames(story, n) for story in stories]
    starts = [_part_offsets(story, p) for story, p in zip(stories, parts)] if word_offsets else None
    marked = list(diff_words(stories[0], stories[1])) if show_diff and len(stories) == 2 else [set() for _ in stories]
    offsets = [0] * len(stories)
    rows = []
    for i in range(n):
        cells = []
        for k in range(len(stories)):
            html_parts = []
            for j, part in enumerate(parts[k][i]):
                base = starts[k][i][j] if starts is not None else None
                h, used = render_part(part, marked[k], offsets[k], base=base)
                offsets[k] += used
                html_parts.append(h)
            body = " ".join(html_parts) or '<span class="sp-empty">(nothing for this frame)</span>'
            cells.append(f'<td class="sp-story" data-p="{k}">{body}</td>' if word_offsets else f'<td class="sp-story">{body}</td>')
        img = (
            f'<img src="{html.escape(image_urls[i], quote=True)}" alt="frame {i + 1}" loading="lazy">'
            if i < len(image_urls)
            else ""
        )
        rows.append(f'<tr><td class="sp-frame"><div class="sp-frame-no">{i + 1}</div>{img}</td>{"".join(cells)}</tr>')
    head = "<tr><th>Frame</th>" + "".join(f"<th>Story {html.escape(label)}</th>" for label in labels) + "</tr>"
    klass = "sp-compare" + (" sp-rank" if len(stories) > 2 else "") + (" sp-markable" if word_offsets else "")
    return f'<table class="{klass}">{head}{"".join(rows)}</table>'


def render_comparison(
    left: str,
    right: str,
    image_urls: list[str],
    *,
    show_diff: bool = False,
    labels: tuple[str, str] = ("A", "B"),
    word_offsets: bool = False,
) -> str:
    """A pair: `render_stories` of (left, right)."""
    return render_stories([left, right], image_urls, show_diff=show_diff, labels=list(labels), word_offsets=word_offsets)


CSS = """
.sp-compare { width: 100%; border-collapse: separate; border-spacing: 0 6px; margin: 0 !important; border: none !important; }
.sp-compare th, .sp-compare td { border: none !important; }
.sp-compare th { text-align: left; font-size: 0.85em; color: var(--body-text-color-subdued); padding: 0 12px !important; }
.sp-compare td { vertical-align: top; padding: 10px 12px !important; background: var(--block-background-fill); }
.sp-compare td:first-child { border-radius: 8px 0 0 8px; }
.sp-compare td:last-child { border-radius: 0 8px 8px 0; }
.sp-frame { width: 20%; }
.sp-frame img { width: 100%; max-width: 240px; border-radius: 6px; image-rendering: pixelated; display: block; margin: 0 !important; }
.sp-frame-no { font-weight: 600; font-size: 0.8em; margin-bottom: 4px; color: var(--body-text-color-subdued); }
.sp-compare.sp-rank { table-layout: fixed; }
.sp-rank .sp-story { width: auto; font-size: 0.98em; }
.sp-w.sp-marked-hallucinated { background: #ff8fa3; color: #111; }
.sp-w.sp-marked-contradicts { background: #ffb347; color: #111; }
.sp-w.sp-marked-other { background: #b3b3ff; color: #111; }
.sp-markable .sp-story { cursor: text; }
.sp-hidden { display: none !important; }
.sp-marks-list li { font-size: 0.9em; }
.sp-story { width: 40%; font-size: 1.05em; line-height: 1.6; border-left: 3px solid var(--border-color-primary) !important; }
.sp-entity { border-radius: 4px; padding: 0 3px; color: #111; }
.sp-diff { background: #ffe066; color: #111; border-radius: 3px; padding: 0 1px; }
.sp-empty { color: var(--body-text-color-subdued); font-style: italic; }
.sp-keys { font-size: 0.9em; color: var(--body-text-color-subdued); padding-top: 8px; }
.sp-keys kbd { border: 1px solid var(--border-color-primary); border-radius: 4px; padding: 0 5px; font-family: monospace; }
#sp-actions { position: sticky; bottom: 0; z-index: 20; background: var(--background-fill-primary);
              padding: 10px 0 8px; border-top: 1px solid var(--border-color-primary); }
"""

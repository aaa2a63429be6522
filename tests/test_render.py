"""annotate.render: escaping, frame alignment, entity colors shared between stories, the diff."""

import re

import pytest

from annotate.render import entity_color, render_comparison, split_frames

XSS = [
    "<script>window.__xss = 1</script>",
    '<img src=x onerror="window.__xss = 2">',
    '<a href="javascript:window.__xss = 3">click me</a>',
    "<gdo char1 onmouseover=alert(1)>Pip</gdo>",  # a tag-lookalike with an attribute
    '<gdi image1"><svg onload=alert(1)></gdi>',
]


@pytest.mark.parametrize("payload", XSS)
def test_untrusted_text_renders_inert(payload):
    out = render_comparison(payload, "a safe story.", ["/x.png"], show_diff=True)
    # The only tags are ours: table structure, img of the frame, spans, marks.
    tags = set(re.findall(r"<\s*([a-zA-Z]+)", out))
    assert tags <= {"table", "tr", "th", "td", "div", "img", "span", "mark"}
    assert "<script" not in out
    assert out.count("<img") == 1  # just the frame; the payload's <img> is text
    # Attributes appear only as escaped text: no live on*= handler, no live javascript: URL.
    assert not re.search(r"<[^>]*\son\w+\s*=", out) and not re.search(r"<[^>]*href", out)


def test_frame_alignment_by_tags_and_by_sentences():
    assert split_frames("<gdi image1>A.</gdi> <gdi image2>B. C.</gdi>", 2) == [["A."], ["B. C."]]
    assert split_frames("One. Two. Three.", 3) == [["One."], ["Two."], ["Three."]]
    assert split_frames("Only one sentence.", 3) == [["Only one sentence."], [], []]
    assert split_frames("<gdi image9>late</gdi>", 2) == [[], ["late"]]  # out-of-range frames clamp
    out = render_comparison("<gdi image1>First frame.</gdi><gdi image2>Second frame.</gdi>", "x. y.", ["/1.png", "/2.png"])
    rows = out.split("<tr>")[2:]
    assert "First frame." in rows[0] and "Second frame." in rows[1] and "x." in rows[0] and "y." in rows[1]


def test_entities_share_colors_across_stories_and_tags_are_hidden():
    left = "<gdo char1>Ana</gdo> met <gdo char2>Bo</gdo>."
    right = "<gdo char2>Bo</gdo> waved at <gdo char1>Ana</gdo> in <gdl loc1>the park</gdl>."
    out = render_comparison(left, right, ["/1.png"])
    assert "gdo" not in out.replace('title="object', "") and "&lt;gdo" not in out
    color = entity_color("char1")
    assert out.count(f"background:{color}") == 2  # Ana, in both stories
    assert out.count(f"background:{entity_color('char2')}") == 2  # Bo, in both stories
    assert entity_color("char1") != entity_color("char2")
    assert entity_color("char1") == entity_color("CHAR1")  # ids are case-insensitive


def test_diff_marks_exactly_the_changed_words():
    out = render_comparison("Pip the red star ran home.", "Pip the blue star ran home.", ["/1.png"], show_diff=True)
    assert re.findall(r'<mark class="sp-diff">(.*?)</mark>', out) == ["red", "blue"]
    assert "<mark" not in render_comparison("same words.", "same words.", ["/1.png"], show_diff=True)

"""rlhf.data: how per-vote pairs become training pairs, by hand."""

import json

import pytest

from rlhf.data import ImageRef, load_preferences
from tests.conftest import make_image


def _votes(tmp_path, prefs, strengths=None, aspects=None):
    make_image(tmp_path / "f.png")
    rows = []
    for k, pref in enumerate(prefs):
        rows.append({"image_path": "f.png", "instruction": "Tell a story.", "style": "calm", "response_a": "Story A.",
                     "response_b": "Story B.", "preference": pref, "comparison_id": 7, "item_id": "it",
                     "annotator": f"a{k}", "strength": (strengths or [None] * len(prefs))[k],
                     "aspects": (aspects or [{}] * len(prefs))[k]})  # fmt: skip
    path = tmp_path / "votes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _only(path, rule):
    train, test, message = load_preferences(path, rule, test_fraction=0.0)
    return train, message


def test_majority_two_to_one(tmp_path):
    (pair,), message = _only(_votes(tmp_path, ["response_b", "response_b", "response_a"], strengths=[4, 2, 1],
                                     aspects=[{"grounding": "response_b"}, {"grounding": "response_b"}, {}]), "majority")  # fmt: skip
    assert (pair.chosen, pair.rejected, pair.target) == ("Story B.", "Story A.", 1.0)
    assert pair.margin == pytest.approx((1.0 + 1 / 3) / 2)  # Llama 2 margins of the agreeing strengths 4 and 2
    assert pair.aspects == {"grounding": "chosen"} and pair.prompt == "Tell a story.\nStyle: calm"
    assert "pairs" in message and "majority" in message


def test_soft_target_is_the_share_of_votes(tmp_path):
    (pair,), _ = _only(_votes(tmp_path, ["response_a", "response_a", "tie", "response_b"]), "soft")
    assert pair.chosen == "Story A." and pair.target == pytest.approx((2 + 0.5) / 4) and pair.margin == 0.0


def test_draw_is_a_tie_and_none_keeps_each_vote(tmp_path):
    path = _votes(tmp_path, ["response_a", "response_b", "response_a", "response_b"])
    # A 2-2 draw trains as a soft tie; but a file of ties alone is refused, so add a decisive vote.
    with pytest.raises(Exception, match="ties"):
        _only(path, "majority")
    pairs, _ = _only(path, "none")
    assert len(pairs) == 4 and all(p.target == 1.0 for p in pairs)
    assert [p.chosen for p in pairs] == ["Story A.", "Story B.", "Story A.", "Story B."]


def test_image_keys_are_content_hashes_computed_once_per_file(tmp_path):
    import hashlib

    from PIL import Image

    from rlhf.data import ImageRef

    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4), "red").save(path)
    first = ImageRef(path).key
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ImageRef(path).key == first  # from the per-process cache
    Image.new("RGB", (4, 4), "blue").save(path)  # the file changed: a new key
    import os

    os.utime(path, ns=(1, 1))
    assert ImageRef(path).key == hashlib.sha256(path.read_bytes()).hexdigest() != first


def test_trim_cache_keeps_the_newer_half():
    from rlhf.clip import trim_cache

    cache = {i: i for i in range(10)}
    trim_cache(cache, limit=8)
    assert list(cache) == [5, 6, 7, 8, 9]
    trim_cache(cache, limit=8)
    assert len(cache) == 5


def test_slices_are_read_and_a_bad_one_is_named(tmp_path):
    make_image(tmp_path / "f.png")
    row = {"prompt": "Tell a story.", "chosen": "A.", "rejected": "B.", "images": ["f.png"], "item_id": "it"}
    (tmp_path / "ok.jsonl").write_text(json.dumps({**row, "slices": ["image-only", "image-only"]}) + "\n" + json.dumps(row) + "\n")
    train, _, _ = load_preferences(tmp_path / "ok.jsonl", test_fraction=0.0)
    assert [p.slices for p in train] == [("image-only",), ()]
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "slices": "image-only"}) + "\n")
    from rlhf.data import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:2: `slices` must be a list of slice names"):
        load_preferences(tmp_path / "bad.jsonl", test_fraction=0.0)


def test_an_in_memory_image_is_keyed_by_its_pixels():
    from PIL import Image

    red, also_red = Image.new("RGB", (4, 3), (255, 0, 0)), Image.new("RGB", (4, 3), (255, 0, 0))
    assert ImageRef(image=red).key == ImageRef(image=also_red).key  # the same pixels: one cache entry
    assert ImageRef(image=red).key != ImageRef(image=Image.new("RGB", (4, 3), (255, 0, 1))).key  # one channel of one pixel
    assert ImageRef(image=red).key != ImageRef(image=Image.new("RGB", (3, 4), (255, 0, 0))).key  # the same bytes, another shape


# Contrast pairs (rlhf.data.contrast_pairs): synthetic minimal pairs whose only difference is a grouped phrase.


def _groups(tmp_path, text: str):
    from rlhf.data import read_contrast_words

    (tmp_path / "words.txt").write_text(text)
    return read_contrast_words(tmp_path / "words.txt")


def test_contrast_word_groups_are_read_and_a_bad_file_is_named(tmp_path):
    from rlhf.data import DataError

    groups = _groups(tmp_path, "# looks\nred, blue ,green\n\ncircle, square  # shapes\none sunny day, one moonlit night\n")
    assert groups == [("red", "blue", "green"), ("circle", "square"), ("one sunny day", "one moonlit night")]
    with pytest.raises(DataError, match=r"words.txt:2: the group 'blue' has one phrase"):
        _groups(tmp_path, "red, green\nblue\n")
    with pytest.raises(DataError, match=r"words.txt:2: 'Red' is already in the group of line 1"):
        _groups(tmp_path, "red, green\nRed, pink\n")
    with pytest.raises(DataError, match="no word groups"):
        _groups(tmp_path, "# nothing\n\n")
    with pytest.raises(DataError, match="missing.txt: no such word-group file"):
        from rlhf.data import read_contrast_words

        read_contrast_words(tmp_path / "missing.txt")


def test_contrast_story_swaps_one_phrase_for_another_of_its_group(tmp_path):
    import re

    import numpy as np

    from rlhf.data import contrast_story

    groups = _groups(tmp_path, "red, blue, green\ncircle, square\none sunny day, one moonlit night\n")
    rng = np.random.default_rng(0)
    assert contrast_story("Nothing here is reddish or squared.", groups, rng) is None  # whole words only
    story = "One sunny day, Pip the red square waited. Red leaves fell. Pip the red square slept."
    modes = set()
    for _ in range(300):
        new_story, old, new = contrast_story(story, groups, rng)
        group = next(g for g in groups if old in [w.lower() for w in g])
        assert new in group and new.lower() != old
        before = [m.group(0) for m in re.finditer(re.escape(old), story, re.IGNORECASE)]
        # what changed: `old` gave way to `new` at one mention or at every mention, and nothing else moved
        after_old = len(re.findall(r"\b" + re.escape(old) + r"\b", new_story, re.IGNORECASE))
        swapped = len(before) - after_old
        assert swapped == 1 or swapped == len(before)
        modes.add("all" if swapped == len(before) and len(before) > 1 else "one" if len(before) > 1 else "single")
        assert re.sub(r"\b(" + "|".join(map(re.escape, group)) + r")\b", "X", new_story, flags=re.IGNORECASE) == \
            re.sub(r"\b(" + "|".join(map(re.escape, group)) + r")\b", "X", story, flags=re.IGNORECASE)  # fmt: skip
        if old == "red" and swapped == len(before):  # a sentence's capital stays a capital
            assert f"{new[0].upper()}{new[1:]} leaves fell." in new_story
    assert modes == {"all", "one", "single"}  # "one sunny day" occurs once; red and square recur, swapped at one or all mentions
    # the longer phrase wins over a word inside it
    only_time = _groups(tmp_path, "day, night\none sunny day, one moonlit night\n")
    assert contrast_story("It was one sunny day.", only_time, np.random.default_rng(1))[1] == "one sunny day"


def test_contrast_pairs_come_from_decisive_chosen_stories(tmp_path):
    from rlhf.data import DataError, PreferencePair, contrast_pairs

    groups = _groups(tmp_path, "red, blue\n")
    img = [ImageRef(path="a.png")]
    pairs = [PreferencePair(images=img, prompt="p1", chosen="A red fox.", rejected="A fox.", item_id="i1", where="f:1"),
             PreferencePair(images=img, prompt="p2", chosen="A red fox.", rejected="A blue fox.", target=0.5, item_id="i2"),  # a tie
             PreferencePair(images=img, prompt="p3", chosen="No look at all.", rejected="A red fox.", item_id="i3"),  # nothing to swap
             PreferencePair(images=img, prompt="p4", chosen="A blue bird.", rejected="A bird.", target=2 / 3, item_id="i4")]  # fmt: skip
    made = contrast_pairs(pairs, groups, share=1.0, seed=0)
    assert [(p.item_id, p.prompt, p.chosen, p.rejected) for p in made] == [("i1", "p1", "A red fox.", "A blue fox."), ("i4", "p4", "A blue bird.", "A red bird.")]
    assert all(p.target == 1.0 and p.slices == ("contrast",) and p.images == img for p in made)
    assert "f:1 (contrast: 'red' → 'blue')" == made[0].where
    many = [pairs[0]] * 2000
    assert 900 < len(contrast_pairs(many, groups, share=0.5, seed=3)) < 1100
    assert contrast_pairs(many, groups, share=0.5, seed=3) == contrast_pairs(many, groups, share=0.5, seed=3)
    with pytest.raises(DataError, match=r"contrast share 0: use a value in \(0, 1\]"):
        contrast_pairs(pairs, groups, share=0)

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

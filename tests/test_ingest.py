"""annotate.ingest: every format, idempotent re-ingest, and all-or-nothing on each kind of bad input."""

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from annotate.ingest import IngestError, detect_format, ingest, main, read_source
from db import Annotator, Candidate, Comparison, Item, ItemImage, Vote
from tests.conftest import count_rows, make_image


def test_jsonl_items_images_candidates_and_all_pairs(session_factory, items_source, tmp_path):
    media = tmp_path / "media"
    fmt, stats = ingest(session_factory, str(items_source), "p", media_root=media)
    assert fmt == "jsonl"
    assert (stats.items_added, stats.candidates_added, stats.comparisons_added) == (3, 9, 9)  # 3 pairs of 3, per item
    with session_factory() as s:
        item = s.scalar(select(Item).where(Item.external_id == "item-2"))
        assert [img.position for img in item.images] == [0, 1, 2]
        stored = media / item.images[1].path
        assert stored.is_file() and stored.name == f"{item.images[1].sha256}.png"
        assert item.style == "calm" and item.instruction == "Tell a story about scene 2."
        for comp in s.scalars(select(Comparison)):
            assert comp.candidate_a_id < comp.candidate_b_id
    # Re-ingesting the same file adds nothing.
    _, again = ingest(session_factory, str(items_source), "p", media_root=media)
    assert (again.items_added, again.items_existing, again.candidates_added, again.comparisons_added) == (0, 3, 0, 0)


def test_pairs_per_item_samples_k_pairs_deterministically(session_factory, items_source, tmp_path):
    _, stats = ingest(session_factory, str(items_source), "p", media_root=tmp_path / "m", pairs_per_item=2)
    assert stats.comparisons_added == 6
    with session_factory() as s:
        first = sorted(s.execute(select(Comparison.candidate_a_id, Comparison.candidate_b_id)).all())
    _, again = ingest(session_factory, str(items_source), "p", media_root=tmp_path / "m", pairs_per_item=2)
    assert again.comparisons_added == 0  # same sample, nothing new
    assert len(first) == 6


def test_csv(session_factory, tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", (0, 0, 255))
    (tmp_path / "items.csv").write_text(
        "external_id,image_paths,instruction,style,candidate_1,origin_1,candidate_2\n"
        'c1,a.png|b.png,"Tell a story, please.",funny,"A red box, then a blue one.",gpt,Two boxes.\n'
    )
    fmt, stats = ingest(session_factory, str(tmp_path / "items.csv"), "p", media_root=tmp_path / "m")
    assert fmt == "csv" and (stats.items_added, stats.candidates_added, stats.comparisons_added) == (1, 2, 1)
    with session_factory() as s:
        assert sorted(c.origin for c in s.scalars(select(Candidate))) == ["gpt", "human"]
        assert s.scalar(select(Item.instruction)) == "Tell a story, please."


def test_folder_flat_images_and_frame_subfolders(session_factory, tmp_path):
    src = tmp_path / "folder"
    make_image(src / "single.png")
    for i in (10, 2, 1):  # natural order: 1, 2, 10
        make_image(src / "story" / f"frame{i}.png", (i * 20, 0, 0))
    (src / "notes.txt").write_text("ignored")
    fmt, stats = ingest(session_factory, str(src), "p", media_root=tmp_path / "m", instruction="Narrate.")
    assert fmt == "folder" and stats.items_added == 2
    with session_factory() as s:
        story = s.scalar(select(Item).where(Item.external_id == "story"))
        assert len(story.images) == 3 and story.instruction == "Narrate."
        assert s.scalar(select(func.count(ItemImage.id))) == 4


def _pairs_file(tmp_path: Path) -> Path:
    make_image(tmp_path / "p.png")
    lines = [
        {"image_path": "p.png", "instruction": "Story?", "response_a": "Good story.", "response_b": "Bad story.",
         "preference": "response_a", "annotator": "ann", "strength": 3, "shown_left": "b", "aspects": {"grounding": "response_a"}},
        # The same pair in the other order, by someone else, preferring the same story.
        {"image_path": "p.png", "instruction": "Story?", "response_a": "Bad story.", "response_b": "Good story.",
         "preference": "response_b", "annotator": "bob"},
        {"image_path": "p.png", "instruction": "Story?", "response_a": "Good story.", "response_b": "Odd story.",
         "preference": "tie"},
    ]  # fmt: skip
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_pairs_import_votes_in_canonical_terms(session_factory, tmp_path):
    path = _pairs_file(tmp_path)
    assert detect_format(str(path)) == "pairs"
    fmt, stats = ingest(session_factory, str(path), "p", media_root=tmp_path / "m")
    assert (stats.items_added, stats.candidates_added, stats.comparisons_added, stats.votes_added) == (1, 3, 2, 3)
    with session_factory() as s:
        good = s.scalar(select(Candidate.id).where(Candidate.text == "Good story."))
        votes = {v.annotator.username: v for v in s.scalars(select(Vote))}
        for name in ("ann", "bob"):  # both preferred "Good story.", whatever side it was on
            comp = votes[name].comparison
            winner = comp.candidate_a_id if votes[name].choice == "a" else comp.candidate_b_id
            assert winner == good
        assert votes["ann"].strength == 3 and votes["ann"].aspects == {"grounding": votes["ann"].choice}
        # ann saw the line's response_b ("Bad story.") on the left.
        comp = votes["ann"].comparison
        left = comp.candidate_a_id if votes["ann"].shown_left == "a" else comp.candidate_b_id
        assert left != good
        assert votes["imported"].choice == "tie"
        assert s.scalar(select(Annotator.password_hash).where(Annotator.username == "ann")) is None  # cannot log in
        assert s.scalar(select(Comparison.n_votes).where(Comparison.id == comp.id)) == 2
    _, again = ingest(session_factory, str(path), "p", media_root=tmp_path / "m")
    assert again.votes_added == 0


def test_storyreasoning_dataset_keeps_grounding_tags(session_factory, tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    story = "<gdi image1><gdo char1>Ana</gdo> walks.</gdi><gdi image2><gdo char1>She</gdo> waves.</gdi>"
    ds = datasets.Dataset.from_dict(
        {
            "story_id": ["s1"],
            "images": [[Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")]],
            "frame_count": [2],
            "chain_of_thought": ["Ana is a girl."],
            "story": [story],
        },
        features=datasets.Features(
            {
                "story_id": datasets.Value("string"),
                "images": datasets.Sequence(datasets.Image()),
                "frame_count": datasets.Value("int32"),
                "chain_of_thought": datasets.Value("string"),
                "story": datasets.Value("string"),
            }
        ),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "sr"))
    fmt, stats = ingest(session_factory, str(tmp_path / "sr"), "p", media_root=tmp_path / "m")
    assert fmt == "storyreasoning" and stats.items_added == 1
    with session_factory() as s:
        cand = s.scalar(select(Candidate))
        assert cand.text == story and cand.origin == "reference"
        assert len(s.scalar(select(Item)).images) == 2


def _bad_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    good = {"image_paths": ["ok.png"], "instruction": "x", "candidates": ["a story"]}
    make_image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    make_image(tmp_path.parent / "outside.png")
    return {
        "malformed": ('{"image_paths": ["ok.png"], "instruction": ', r"items.jsonl:2: malformed JSON"),
        "missing_field": (json.dumps({"image_paths": ["ok.png"]}), r"items.jsonl:2: missing field `instruction`"),
        "missing_image": (json.dumps({**good, "image_paths": ["nope.png"]}), r"items.jsonl:2: .*image not found"),
        "undecodable": (json.dumps({**good, "image_paths": ["broken.png"]}), r"items.jsonl:2: .*cannot decode image"),
        "escaping_path": (json.dumps({**good, "image_paths": ["../outside.png"]}), r"items.jsonl:2: .*escapes the source"),
        "too_long": (json.dumps({**good, "candidates": ["x" * 20_001]}), r"items.jsonl:2: .*over the limit"),
        "bad_candidate": (json.dumps({**good, "candidates": [{"origin": "m"}]}), r"items.jsonl:2: candidates\[0\]"),
        "bad_slices": (json.dumps({**good, "slices": {"image-only": [[0, 5]]}}), r"items.jsonl:2: `slices` must map a name"),
    }


@pytest.mark.parametrize("case", ["malformed", "missing_field", "missing_image", "undecodable", "escaping_path", "too_long", "bad_candidate",
                                  "bad_slices"])
def test_bad_line_stops_import_and_writes_nothing(session_factory, tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    bad_line, message = _bad_cases(src)[case]
    make_image(src / "first.png", (1, 2, 3))
    first = json.dumps({"image_paths": ["first.png"], "instruction": "fine", "candidates": ["s1", "s2"]})
    (src / "items.jsonl").write_text(first + "\n" + bad_line + "\n")
    before = count_rows(session_factory)
    with pytest.raises(IngestError, match=message):
        ingest(session_factory, str(src / "items.jsonl"), "p", media_root=tmp_path / "media", fmt="jsonl")
    assert count_rows(session_factory) == before
    assert not (tmp_path / "media").exists() or not any(p.is_file() for p in (tmp_path / "media").rglob("*"))


def test_db_failure_midway_rolls_back_rows_and_files(session_factory, tmp_path, monkeypatch, items_source):
    import annotate.ingest as ing

    real = ing.write_records

    def explode(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(ing, "write_records", explode)
    before = count_rows(session_factory)
    with pytest.raises(RuntimeError, match="disk full"):
        ingest(session_factory, str(items_source), "p", media_root=tmp_path / "media")
    assert count_rows(session_factory) == before
    assert not any(p.is_file() for p in (tmp_path / "media").rglob("*"))


def test_pairs_duplicate_vote_by_same_annotator_is_a_clear_error(session_factory, tmp_path):
    make_image(tmp_path / "p.png")
    line = {"image_path": "p.png", "instruction": "S", "response_a": "x", "response_b": "y", "preference": "tie"}
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "preference": "response_a"}) + "\n")
    with pytest.raises(IngestError, match=r"d.jsonl:2: annotator 'imported' already has a vote"):
        ingest(session_factory, str(tmp_path / "d.jsonl"), "p", media_root=tmp_path / "m")


def test_cli_reports_error_with_location_and_exit_code(sqlite_url, tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text("not json\n")
    assert main([str(tmp_path / "x.jsonl"), "--db", sqlite_url, "--format", "jsonl"]) == 1
    err = capsys.readouterr().err
    assert "x.jsonl:1: malformed JSON" in err and "Nothing was written" in err


def test_cli_ingest_prints_summary(sqlite_url, items_source, tmp_path, capsys):
    assert main([str(items_source), "--db", sqlite_url, "--project", "demo", "--media-root", str(tmp_path / "m"),
                 "--overlap", "5", "--aspects", "grounding,style"]) == 0  # fmt: skip
    assert "3 items added" in capsys.readouterr().out
    # A second run with another media root is refused: the db already keeps its images elsewhere.
    assert main([str(items_source), "--db", sqlite_url, "--media-root", str(tmp_path / "other")]) == 1


def test_storyreasoning_windows_become_next_frame_items(session_factory, tmp_path):
    """--window 2 on stories of 2, 3 and 5 frames: 0 + 1 + 3 items, each showing frames T-2..T with the
    text before T as context and frame T's text (re-tagged as the window's last image) as the reference."""
    pytest.importorskip("datasets")
    from tests.fixtures.storyreasoning import tiny_storyreasoning

    src = tiny_storyreasoning(tmp_path / "sr", [2, 3, 5])
    fmt, stats = ingest(session_factory, str(src), "w", media_root=tmp_path / "m", window=2)
    assert stats.items_added == 4 and "1 of 3 stories skipped: 2 frames or fewer" in stats.summary()
    with session_factory() as s:
        items = {i.external_id: i for i in s.scalars(select(Item))}
        assert sorted(items) == ["s1/3", "s2/3", "s2/4", "s2/5"]
        last = items["s2/5"]
        assert [img.position for img in last.images] == [0, 1, 2] and last.meta == {"story_id": "s2", "frame": 5, "window": 2}
        assert last.context == "Ana sees blue in frame 1 of s2. Ana sees green in frame 2 of s2. Ana sees yellow in frame 3 of s2. Ana sees purple in frame 4 of s2."
        assert last.candidates[0].text == "<gdi image3><gdo char1>Ana</gdo> sees orange in frame 5 of s2.</gdi>"
        # The window's images are frames 3..5 of the story: the same files as the whole story's frames.
        whole = tiny_storyreasoning(tmp_path / "whole", [2, 3, 5])
    _, _ = ingest(session_factory, str(whole), "whole", media_root=tmp_path / "m")
    with session_factory() as s:
        story = s.scalar(select(Item).where(Item.external_id == "s2", Item.project.has(name="whole")))
        assert [i.sha256 for i in story.images[2:5]] == [i.sha256 for i in s.scalar(select(Item).where(Item.external_id == "s2/5")).images]
    with pytest.raises(IngestError, match="--window applies to the storyreasoning format"):
        read_source(str(tmp_path / "m"), "folder", window=2)

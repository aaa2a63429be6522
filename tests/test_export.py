"""annotate.export: pairs round trip, majority aggregation by hand, the split, atomic writes, TRL/HF loading."""

import json
from pathlib import Path

import pytest

from annotate.export import ExportError, export, is_test, main
from annotate.ingest import ingest
from db import open_db
from tests.conftest import make_image


def _write_pairs(tmp_path: Path, n_items: int = 12) -> Path:
    """n_items items; item i has one pair voted by 3 annotators: a, a, b (item 0: a, b, tie)."""
    lines = []
    for i in range(n_items):
        make_image(tmp_path / f"img{i}.png", (i * 20 % 255, 0, 0))
        choices = ["response_a", "response_b", "tie"] if i == 0 else ["response_a", "response_a", "response_b"]
        for name, pref in zip(["ann", "bob", "cy"], choices):
            lines.append({"image_path": f"img{i}.png", "instruction": f"Story {i}", "external_id": f"it{i}",
                          "response_a": f"good {i}", "response_b": f"bad {i}", "preference": pref,
                          "annotator": name, "strength": 4 if name == "ann" else 2, "shown_left": "a",
                          "aspects": {"grounding": pref, "style": "response_b"} if name != "cy" else {}})  # fmt: skip
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def voted(session_factory, tmp_path):
    ingest(session_factory, str(_write_pairs(tmp_path)), "p", media_root=tmp_path / "media")
    return session_factory


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_per_vote_and_round_trip(voted, tmp_path):
    with voted() as s:
        stats = export(s, tmp_path / "out.jsonl", "pairs", include_ties=True)
    lines = _read(tmp_path / "out.jsonl")
    assert stats.rows == len(lines) == 36
    first = lines[0]
    assert set(first) >= {"image_paths", "image_path", "instruction", "response_a", "response_b", "preference",
                          "strength", "aspects", "item_id", "comparison_id", "annotator", "shown_left"}  # fmt: skip
    assert Path(first["image_path"]).is_file() and first["image_paths"] == [first["image_path"]]
    # Round trip: the export ingests into a new database and exports to the same votes.
    _, factory2 = open_db(f"sqlite:///{tmp_path}/second.db")
    ingest(factory2, str(tmp_path / "out.jsonl"), "p", media_root=tmp_path / "media2", image_root=Path("/"))
    with factory2() as s:
        export(s, tmp_path / "again.jsonl", "pairs", include_ties=True)
    key = lambda d: (d["item_id"], d["annotator"], d["response_a"], d["response_b"], d["preference"], d["strength"],  # noqa: E731
                     json.dumps(d["aspects"], sort_keys=True))
    assert sorted(map(key, _read(tmp_path / "again.jsonl"))) == sorted(map(key, lines))


def test_majority_by_hand(voted, tmp_path):
    with voted() as s:
        stats = export(s, tmp_path / "maj.jsonl", "pairs", aggregate="majority")
    lines = {d["item_id"]: d for d in _read(tmp_path / "maj.jsonl")}
    # Item 0 votes a, b, tie: no single winner, a tie, dropped by default.
    assert "it0" not in lines and stats.skipped_ties == 1
    one = lines["it1"]  # a, a, b
    assert one["preference"] == "response_a" and one["n_votes"] == 3 and one["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert one["strength"] == 3  # mean of the agreeing votes' strengths 4 and 2
    assert one["aspects"] == {"grounding": "response_a", "style": "response_b"}  # per-aspect majority
    with voted() as s:
        export(s, tmp_path / "maj2.jsonl", "pairs", aggregate="majority", include_ties=True)
        stats = export(s, tmp_path / "maj4.jsonl", "pairs", aggregate="majority", min_votes=4)
    assert {d["item_id"]: d["preference"] for d in _read(tmp_path / "maj2.jsonl")}["it0"] == "tie"
    assert stats.rows == 0 and stats.skipped_min_votes == 12


def test_trl_split_by_item_is_deterministic_and_loads(voted, tmp_path):
    datasets = pytest.importorskip("datasets")
    with voted() as s:
        stats = export(s, tmp_path / "trl", "trl", aggregate="majority", test_fraction=0.3)
        export(s, tmp_path / "trl2", "trl", aggregate="majority", test_fraction=0.3)
    train, test = _read(tmp_path / "trl" / "train.jsonl"), _read(tmp_path / "trl" / "test.jsonl")
    assert stats.train == len(train) and stats.test == len(test) and len(train) + len(test) == 11
    assert test, "with 11 items and 30% test, some items must land in test"
    assert not {x["item_id"] for x in train} & {x["item_id"] for x in test}
    assert not {p for x in train for p in x["images"]} & {p for x in test for p in x["images"]}
    assert (tmp_path / "trl" / "test.jsonl").read_text() == (tmp_path / "trl2" / "test.jsonl").read_text()
    row = train[0]
    assert row["chosen"] == [{"role": "assistant", "content": f"good {row['item_id'][2:]}"}]
    assert row["margin"] == pytest.approx((1.0 + 1 / 3) / 2)  # strengths 4 and 2 → Llama-2 margins 1 and 1/3
    assert row["aspects"] == {"grounding": "chosen", "style": "rejected"}
    ds = datasets.load_dataset("json", data_files={"train": str(tmp_path / "trl" / "train.jsonl"),
                                                   "test": str(tmp_path / "trl" / "test.jsonl")})  # fmt: skip
    assert set(ds["train"].column_names) >= {"prompt", "chosen", "rejected", "images", "margin", "item_id", "n_votes", "agreement"}


def test_soft_targets_read_a_trl_exports_vote_shares(voted, tmp_path):
    """aggregate soft on a TRL export: each row's target is its `agreement` (2 of 3 votes: ⅔); majority keeps 1."""
    from rlhf.data import DataError, load_preferences

    with voted() as s:
        export(s, tmp_path / "trl", "trl", aggregate="majority", include_ties=True, test_fraction=0.0)
    soft, _, message = load_preferences(tmp_path / "trl", "soft", test_fraction=0.0)
    majority, _, _ = load_preferences(tmp_path / "trl", "majority", test_fraction=0.0)
    by_item = {p.item_id: p.target for p in soft}
    assert by_item["it0"] == 0.5  # a, b, tie: a tie row stays a tie
    assert all(by_item[f"it{i}"] == pytest.approx(2 / 3, abs=1e-4) for i in range(1, 12)) and "agreement" in message
    assert {p.target for p in majority if p.item_id != "it0"} == {1.0}
    rows = _read(tmp_path / "trl" / "train.jsonl")
    del rows[1]["agreement"]
    (tmp_path / "trl" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train\.jsonl:2: aggregate soft .*`agreement`"):
        load_preferences(tmp_path / "trl", "soft", test_fraction=0.0)


def test_split_groups_items_that_share_an_image():
    # is_test is a pure function of the key; items sharing images share a key (tested through export above).
    keys = [f"k{i}" for i in range(2000)]
    share = sum(is_test(k, 0.1) for k in keys) / len(keys)
    assert 0.08 < share < 0.12
    assert [is_test(k, 0.1) for k in keys] == [is_test(k, 0.1) for k in keys]


def test_hf_save_to_disk_with_image_feature(voted, tmp_path):
    datasets = pytest.importorskip("datasets")
    with voted() as s:
        export(s, tmp_path / "hf", "hf", aggregate="majority", test_fraction=0.3)
    dd = datasets.load_from_disk(str(tmp_path / "hf"))
    assert set(dd) == {"train", "test"}
    assert isinstance(dd["train"].features["images"].feature, datasets.Image)
    assert dd["train"][0]["images"][0].size == (32, 24)


def test_export_is_atomic(voted, tmp_path, monkeypatch):
    import annotate.export as exp

    target = tmp_path / "out.jsonl"
    target.write_text("previous export\n")

    def broken(path, lines):
        path.write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(exp, "_write_jsonl", broken)
    with voted() as s, pytest.raises(OSError):
        export(s, target, "pairs")
    assert target.read_text() == "previous export\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_bad_arguments(voted, tmp_path):
    with voted() as s:
        with pytest.raises(ExportError, match="no project named 'nope'.*projects: p"):
            export(s, tmp_path / "x", "pairs", project="nope")
        with pytest.raises(ExportError, match="test-fraction"):
            export(s, tmp_path / "x", "trl", test_fraction=1.5)


def test_cli(voted, db_url, tmp_path, capsys):
    assert main(["--db", db_url, "--out", str(tmp_path / "cli.jsonl"), "--aggregate", "majority"]) == 0
    assert "11 rows" in capsys.readouterr().out


@pytest.fixture
def voted_sqlite(sqlite_url, tmp_path):
    """The same votes in SQLite only: the TRL consumers read files, not the database."""
    factory = open_db(sqlite_url)[1]
    ingest(factory, str(_write_pairs(tmp_path)), "p", media_root=tmp_path / "media")
    return factory


def test_trl_reward_trainer_consumes_standard_export(voted_sqlite, tmp_path):
    """TRL's RewardTrainer trains on `--format trl --trl-style standard` output, loaded unchanged."""
    pytest.importorskip("trl")
    from tests.fixtures.make_tiny import tiny_text_classifier

    datasets = pytest.importorskip("datasets")
    from trl import RewardConfig, RewardTrainer

    with voted_sqlite() as s:
        export(s, tmp_path / "trl", "trl", aggregate="majority", trl_style="standard", test_fraction=0.3)
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "trl" / "train.jsonl"), split="train")
    model, tokenizer = tiny_text_classifier(tmp_path / "tiny-rm")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = RewardConfig(output_dir=str(tmp_path / "rm-out"), max_steps=2, per_device_train_batch_size=4,
                        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no")  # fmt: skip
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()
    assert any(not (p.detach() == before[n]).all() for n, p in model.named_parameters())


def test_trl_dpo_trainer_consumes_conversational_vision_export(voted_sqlite, tmp_path):
    """TRL's DPOTrainer trains a tiny LLaVA on the default `--format trl` output (images as paths), unchanged."""
    pytest.importorskip("trl")
    from tests.fixtures.make_tiny import tiny_llava

    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    with voted_sqlite() as s:
        export(s, tmp_path / "trl", "trl", aggregate="majority", test_fraction=0.3)
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "trl" / "train.jsonl"), split="train")
    model, processor = tiny_llava(tmp_path / "tiny-llava")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(output_dir=str(tmp_path / "dpo-out"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, logging_steps=1, save_strategy="no", learning_rate=1e-3)  # fmt: skip
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=processor)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    changed = [n for n, p in model.named_parameters() if not (p.detach() == before[n]).all()]
    assert any("vision_tower" in n for n in changed) and any("language_model" in n for n in changed)


def test_slices_travel_from_storyworld_through_ingest_and_export_to_training_data(session_factory, tmp_path):
    """storyworld marks its image twins; the mark survives ingest, votes, every export format, and rlhf.data."""
    from rlhf.data import load_preferences
    from storyworld import annotate_world, make_world

    world = make_world(tmp_path / "w", 16, seed=3)
    twins = {json.loads(x)["external_id"] for x in (world / "items.jsonl").open() if "slices" in json.loads(x)}
    assert twins
    annotate_world(world, world / "votes.jsonl")
    votes = _read(world / "votes.jsonl")
    assert {v["item_id"] for v in votes if v.get("slices") == ["image-only"]} == twins
    ingest(session_factory, str(world / "items.jsonl"), "sw", media_root=tmp_path / "m")
    _, stats = ingest(session_factory, str(world / "votes.jsonl"), "sw", media_root=tmp_path / "m", source_name="items.jsonl")
    assert stats.items_added == 0 and stats.votes_added == len(votes)
    with session_factory() as s:
        export(s, tmp_path / "pairs.jsonl", "pairs", include_ties=True)
        export(s, tmp_path / "trl", "trl", aggregate="majority", include_ties=True, test_fraction=0.5)
    marked = [(x["item_id"], x["response_a"], x["response_b"]) for x in _read(tmp_path / "pairs.jsonl") if x.get("slices") == ["image-only"]]
    voted = [(v["item_id"], v["response_a"], v["response_b"]) for v in votes if v.get("slices")]
    assert sorted({tuple(sorted(m[1:])) for m in marked}) == sorted({tuple(sorted(v[1:])) for v in voted}) and len(marked) == len(voted)
    rows = _read(tmp_path / "trl" / "train.jsonl") + _read(tmp_path / "trl" / "test.jsonl")
    assert {r["item_id"] for r in rows if r["slices"] == ["image-only"]} == twins
    assert sum(r["slices"] == ["image-only"] for r in rows) == len(twins) and all(r["slices"] in ([], ["image-only"]) for r in rows)
    train, test, _ = load_preferences(tmp_path / "trl")
    assert {p.item_id for p in train + test if p.slices == ("image-only",)} == twins
    train, _, _ = load_preferences(tmp_path / "pairs.jsonl", test_fraction=0.0)  # per-vote lines, aggregated by comparison
    assert sum(p.slices == ("image-only",) for p in train) == sum(1 for r in rows if r["slices"])


def test_slices_from_pairs_lines_alone(session_factory, tmp_path):
    lines = []
    for i in range(3):
        make_image(tmp_path / f"img{i}.png", (i * 40, 0, 0))
        lines.append({"image_path": f"img{i}.png", "instruction": "x", "external_id": f"it{i}", "response_a": f"a{i}",
                      "response_b": f"b{i}", "preference": "response_a", "annotator": "ann", **({"slices": ["image-only"]} if i else {})})  # fmt: skip
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ingest(session_factory, str(tmp_path / "p.jsonl"), "p", media_root=tmp_path / "m")
    with session_factory() as s:
        export(s, tmp_path / "out.jsonl", "pairs")
        export(s, tmp_path / "hf", "hf", test_fraction=0.0)
    assert [x.get("slices") for x in _read(tmp_path / "out.jsonl")] == [None, ["image-only"], ["image-only"]]
    import datasets

    assert datasets.load_from_disk(str(tmp_path / "hf"))["train"]["slices"] == [[], ["image-only"], ["image-only"]]
    (tmp_path / "bad.jsonl").write_text(json.dumps({**lines[0], "slices": "image-only"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: `slices` of a pairs line must be a list"):
        ingest(session_factory, str(tmp_path / "bad.jsonl"), "p", media_root=tmp_path / "m")


# ------------------------------------------------------------------------------------------------
# Quality-weighted aggregation (crowd-kit) and the annotator filters.
# ------------------------------------------------------------------------------------------------


def _crowd(tmp_path: Path, n_items: int = 60, seed: int = 0) -> tuple[Path, dict[str, str]]:
    """Two careful annotators (90% right), three who answer at random and one who always picks the
    left story; the truth per item is response_a or response_b."""
    import random

    rng = random.Random(seed)
    lines, truth = [], {}
    for i in range(n_items):
        make_image(tmp_path / f"c{i}.png", (i * 4 % 255, 9, 9))
        truth[f"c{i}"] = rng.choice(["response_a", "response_b"])
        wrong = {"response_a": "response_b", "response_b": "response_a"}
        for name in ("careful1", "careful2", "spam1", "spam2", "spam3", "lefty"):
            shown_left = rng.choice("ab")
            if name.startswith("careful"):
                pref = truth[f"c{i}"] if rng.random() < 0.9 else wrong[truth[f"c{i}"]]
            elif name.startswith("spam"):
                pref = rng.choice(["response_a", "response_b"])
            else:
                pref = f"response_{shown_left}"
            lines.append({"image_path": f"c{i}.png", "instruction": f"Story {i}", "external_id": f"c{i}", "response_a": f"first {i}",
                          "response_b": f"second {i}", "preference": pref, "annotator": name, "shown_left": shown_left})  # fmt: skip
    path = tmp_path / "crowd.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path, truth


def test_dawid_skene_trusts_the_careful_annotators_more_than_majority_does(session_factory, tmp_path):
    pytest.importorskip("crowdkit")
    path, truth = _crowd(tmp_path)
    ingest(session_factory, str(path), "crowd", media_root=tmp_path / "media")
    accuracy = {}
    for method in ("majority", "dawid-skene", "one-coin-dawid-skene"):
        with session_factory() as s:
            export(s, tmp_path / f"{method}.jsonl", "pairs", aggregate=method)
        got = {d["item_id"]: d["preference"] for d in _read(tmp_path / f"{method}.jsonl")}
        accuracy[method] = sum(got.get(i) == t for i, t in truth.items()) / len(truth)
    assert accuracy["dawid-skene"] >= 0.85 and accuracy["dawid-skene"] >= accuracy["majority"] + 0.1, accuracy
    assert accuracy["one-coin-dawid-skene"] >= accuracy["majority"], accuracy


def test_annotator_filters_leave_out_the_named_the_inaccurate_and_the_side_biased(session_factory, tmp_path):
    from sqlalchemy import update

    from db import Comparison

    path, truth = _crowd(tmp_path, n_items=30)
    ingest(session_factory, str(path), "crowd", media_root=tmp_path / "media")
    with session_factory.begin() as s:  # ten gold comparisons, answered as the truth says
        for cid, ext in s.execute(select_comparisons()).all()[:10]:
            s.execute(update(Comparison).where(Comparison.id == cid).values(gold_choice=truth[ext][-1]))
    with session_factory() as s:
        stats = export(s, tmp_path / "x.jsonl", "pairs", exclude_annotators=["spam1", "spam2"])
        assert stats.excluded_annotators == ("spam1", "spam2") and stats.excluded_votes == 60
        assert {d["annotator"] for d in _read(tmp_path / "x.jsonl")}.isdisjoint({"spam1", "spam2"})
        assert "left out 60 votes of 2 annotators" in stats.summary()
        stats = export(s, tmp_path / "l.jsonl", "pairs", max_left_share=0.8)
        assert "lefty" in stats.excluded_annotators and not {"careful1", "careful2"} & set(stats.excluded_annotators)
        stats = export(s, tmp_path / "g.jsonl", "pairs", min_gold_accuracy=0.75)
        assert not {"careful1", "careful2"} & set(stats.excluded_annotators) and len(stats.excluded_annotators) >= 2
        with pytest.raises(ExportError, match="no annotator named nobody"):
            export(s, tmp_path / "n.jsonl", "pairs", exclude_annotators=["nobody"])
        with pytest.raises(ExportError, match="--max-left-share must be a share"):
            export(s, tmp_path / "n.jsonl", "pairs", max_left_share=1.5)
    assert not (tmp_path / "n.jsonl").exists()


def select_comparisons():
    from sqlalchemy import select

    from db import Comparison, Item

    return select(Comparison.id, Item.external_id).join(Item, Comparison.item_id == Item.id).order_by(Comparison.id)

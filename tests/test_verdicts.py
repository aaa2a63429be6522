"""rlhf.verdicts: the signals' picks go into the project, and the Admin tab sets them beside the annotators."""

import gradio as gr
import pytest
from sqlalchemy import select

from annotate.demo import DEMO_PROJECT, seed_demo
from annotate.ui import LabelingApp, build_app
from annotate.users import add_user
from db import Comparison, Item, Vote, open_db
from rlhf.loading import ModelLoadError
from rlhf.verdicts import VerdictsConfig, main, parse_args
from tests.fixtures.make_tiny import tiny_clip


@pytest.fixture
def demo(tmp_path):
    url = f"sqlite:///{tmp_path}/v.db"
    _, factory = open_db(url)
    seed_demo(factory, tmp_path / "data", n_items=10, media_root=tmp_path / "media")  # 60 comparisons, 20 voted
    with factory.begin() as s:
        add_user(s, "boss", "boss-password", admin=True)
    return url, factory


def test_verdicts_score_the_voted_comparisons_and_show_in_the_admin_tab(demo, tmp_path):
    url, factory = demo
    app = LabelingApp(factory, DEMO_PROJECT, build_app(factory).storypref_media_root)
    *_, summary, table = app.admin_refresh(request=gr.Request(username="boss"))
    assert table is None and "python -m rlhf.verdicts" in summary  # before: how to get them

    clip = tiny_clip(tmp_path / "clip")
    out = main(VerdictsConfig(project=DEMO_PROJECT, db=url, clip_model=str(clip), clip_pretrained=None, cache_dir=str(tmp_path / "cache")))
    with factory() as s:
        voted = set(s.scalars(select(Vote.comparison_id)))
        pairs = s.execute(select(Comparison.candidate_a_id, Comparison.candidate_b_id).where(Comparison.id.in_(voted))).all()
    assert out == {"project": DEMO_PROJECT, "comparisons": 20, "candidates": len({c for p in pairs for c in p}), "signals": ["clip"]}
    with factory() as s:
        scored = {}
        for item in s.scalars(select(Item)):
            for key, v in (item.meta.get("verdicts") or {}).items():
                a, b = map(int, key.split("-"))
                comp = s.scalar(select(Comparison).where(Comparison.candidate_a_id == a, Comparison.candidate_b_id == b))
                scored[comp.id] = v["clip"]
        assert set(scored) == voted and all(len(v) == 2 for v in scored.values())
        assert item.meta["verdicts_from"]["clip"] == str(clip)

    *_, summary, table = app.admin_refresh(request=gr.Request(username="boss"))
    assert len(table) == 20 and set(table.columns) >= {"comparison", "item", "majority", "clip", "clip_margin", "disagree"}
    assert "**clip** agrees with the majority on" in summary
    first_agree = table["disagree"].tolist().index(False) if not table["disagree"].all() else len(table)
    assert table["disagree"].tolist() == [True] * first_agree + [False] * (len(table) - first_agree)  # disagreements first
    for _, row in table.iterrows():  # each pick follows the stored scores
        a, b = scored[row["comparison"]]
        assert row["clip"] == ("a" if a > b else "b" if b > a else "tie") and row["clip_margin"] == pytest.approx(a - b, abs=1e-3)
    assert app.admin_refresh(request=gr.Request(username="nobody"))[-2:] == ("", None)  # annotators see nothing

    # --all scores every comparison; a second run replaces, never duplicates.
    out = main(VerdictsConfig(project=DEMO_PROJECT, db=url, clip_model=str(clip), clip_pretrained=None, all=True, cache_dir=str(tmp_path / "cache")))
    assert out["comparisons"] == 60
    with factory() as s:
        assert sum(len(i.meta["verdicts"]) for i in s.scalars(select(Item))) == 60


def test_verdicts_refuse_clearly(demo, tmp_path):
    url, _ = demo
    with pytest.raises(ModelLoadError, match="name at least one verdict"):
        main(VerdictsConfig(project=DEMO_PROJECT, db=url))
    with pytest.raises(ModelLoadError, match="no project 'nope'.*storyworld-demo"):
        main(VerdictsConfig(project="nope", db=url, clip_model=str(tiny_clip(tmp_path / "clip")), clip_pretrained=None))
    with pytest.raises(ModelLoadError, match="no reward_config.json"):
        main(VerdictsConfig(project=DEMO_PROJECT, db=url, reward_model=str(tmp_path)))
    assert parse_args(["--project", "p", "--all"]).all is True


def test_scoring_holds_no_write_lock(demo, tmp_path, monkeypatch):
    """Annotators keep voting while the models score: a write during scoring goes through at once."""
    import time

    from sqlalchemy import text

    import rlhf.rewards
    from db import make_engine, make_session_factory

    url, _ = demo
    writer = make_session_factory(make_engine(url))
    waited = []
    score = rlhf.rewards.ClipReward.__call__

    def scoring_while_someone_writes(self, *args):
        start = time.perf_counter()
        with writer.begin() as s:  # BEGIN IMMEDIATE: it would wait for a lock held across the scoring
            s.execute(text("UPDATE project SET guidelines = guidelines"))
        waited.append(time.perf_counter() - start)
        return score(self, *args)

    monkeypatch.setattr(rlhf.rewards.ClipReward, "__call__", scoring_while_someone_writes)
    main(VerdictsConfig(project=DEMO_PROJECT, db=url, clip_model=str(tiny_clip(tmp_path / "clip")), clip_pretrained=None))
    assert waited and max(waited) < 1.0

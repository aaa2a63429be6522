"""rlhf.prioritize: priorities from reward margins (hand-computed), written per open comparison, served first."""

import math
import random

import pytest
import torch
from sqlalchemy import func, select

from annotate.demo import DEMO_PROJECT, seed_demo
from annotate.scheduler import next_assignment, record_vote
from annotate.users import add_user
from db import Annotator, Comparison, ComparisonPriority, Project, open_db
from rlhf.loading import ModelLoadError
from rlhf.prioritize import PrioritizeConfig, main, parse_args, priorities
from rlhf.reward_model import RewardModel, RewardModelConfig
from rlhf.rewards import HumanReward
from rlhf.verdicts import read_candidates
from tests.fixtures import make_tiny

LN3 = math.log(3)  # σ(ln 3) = 0.75


def test_priorities_against_hand_computed_numbers():
    # One model: p = 0.5, 0.75, 0.25, ~1  ->  1 − |2p − 1| = 1, 0.5, 0.5, ~0.
    assert priorities([[0.0, LN3, -LN3, 40.0]]) == pytest.approx([1.0, 0.5, 0.5, 0.0], abs=1e-9)
    # Two models: p = (0.5, 0.75) and (0.5, 0.25). Mean p 0.625 / 0.375 -> margin 0.75 each;
    # population sd 0.125 each -> disagreement 0.25; mixed (0.75 + 0.25) / 2 = 0.5.
    two = [[0.0, 0.0], [LN3, -LN3]]
    assert priorities(two, "margin") == pytest.approx([0.75, 0.75])
    assert priorities(two, "disagreement") == pytest.approx([0.25, 0.25])
    assert priorities(two, "mixed") == pytest.approx([0.5, 0.5])
    # Agreeing models: no disagreement at all, whatever their margin.
    assert priorities([[LN3, 0.0], [LN3, 0.0]], "disagreement") == pytest.approx([0.0, 0.0])
    with pytest.raises(ValueError, match="two or more"):
        priorities([[0.1]], "disagreement")
    with pytest.raises(ValueError, match="use one of"):
        priorities([[0.1]], "entropy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The demo project (10 items, 20 of 60 comparisons voted) and two tiny reward models with opinions."""
    root = tmp_path_factory.mktemp("prio")
    url = f"sqlite:///{root}/p.db"
    _, factory = open_db(url)
    seed_demo(factory, root / "data", n_items=10, media_root=root / "media")
    make_tiny.tiny_text_encoder(root / "enc")
    make_tiny.tiny_clip(root / "clip")
    for seed in (0, 1):
        torch.manual_seed(seed)
        rm = RewardModel.build(RewardModelConfig(text_model=str(root / "enc"), clip_model=str(root / "clip"), clip_pretrained=None))
        with torch.no_grad():
            for p in rm.module.head.parameters():
                p.normal_(0, 0.5)
        rm.save_pretrained(root / f"rm{seed}")
    return root, url, factory


def _rows(factory):
    with factory() as s:
        return {r.comparison_id: r for r in s.scalars(select(ComparisonPriority))}


def test_prioritize_scores_the_open_comparisons_and_the_app_serves_them_first(setup):
    root, url, factory = setup
    cfg = PrioritizeConfig(project=DEMO_PROJECT, db=url, reward_model=[str(root / "rm0")], cache_dir=str(root / "cache"))
    out = main(cfg)
    rows = _rows(factory)
    with factory() as s:
        project = s.scalar(select(Project).where(Project.name == DEMO_PROJECT))
        open_ids = set(s.scalars(select(Comparison.id).where(~Comparison.is_gold, Comparison.n_votes < project.overlap)))
        full = s.scalar(select(func.count(Comparison.id)).where(~Comparison.is_gold, Comparison.n_votes >= project.overlap))
        assert set(rows) == open_ids and out["comparisons"] == len(open_ids) and full > 0  # the full ones are not scored
        # Each priority is 1 − |2σ(r_a − r_b) − 1| of the model's own scores.
        some = sorted(open_ids)[:6]
        pairs = [(s.get(Comparison, c).candidate_a_id, s.get(Comparison, c).candidate_b_id) for c in some]
        cands = read_candidates(s, {x for p in pairs for x in p})
    model = HumanReward(str(root / "rm0"), cache_dir=str(root / "cache"))
    ids = sorted(cands)
    _, images, instructions, contexts, styles, texts = zip(*(cands[i] for i in ids))
    score = dict(zip(ids, model(list(images), list(instructions), list(contexts), list(styles), list(texts)).tolist()))
    for cid, (a, b) in zip(some, pairs):
        p = 1 / (1 + math.exp(-(score[a] - score[b])))
        assert rows[cid].priority == pytest.approx(1 - abs(2 * p - 1), abs=1e-4)
    assert len({round(r.priority, 6) for r in rows.values()}) > 5  # the random head has opinions
    # The scheduler now serves the highest-priority open comparison first.
    with factory.begin() as s:
        add_user(s, "ann", "ann-password")
    with factory.begin() as s:
        project = s.scalar(select(Project).where(Project.name == DEMO_PROJECT))
        project.gold_rate = project.repeat_rate = 0.0
        ann = s.scalar(select(Annotator).where(Annotator.username == "ann"))
        a = next_assignment(s, ann.id, project, rng=random.Random(0))
        assert rows[a.comparison_id].priority == max(r.priority for r in rows.values())
        record_vote(s, ann.id, a, "left", client_token="t1")
    # Running it again replaces the project's priorities; --clear removes them.
    again = main(PrioritizeConfig(project=DEMO_PROJECT, db=url, reward_model=[str(root / "rm0"), str(root / "rm1")],
                                  strategy="disagreement", cache_dir=str(root / "cache")))  # fmt: skip
    assert again["strategy"] == "disagreement" and len(_rows(factory)) == again["comparisons"]
    assert all(r.scored_by.startswith("disagreement: ") for r in _rows(factory).values())
    assert main(PrioritizeConfig(project=DEMO_PROJECT, db=url, clear=True))["cleared"] == again["comparisons"]
    assert _rows(factory) == {}


def test_prioritize_refuses_clearly(setup):
    root, url, _ = setup
    with pytest.raises(ModelLoadError, match="no project 'nope'"):
        main(PrioritizeConfig(project="nope", db=url, reward_model=[str(root / "rm0")]))
    with pytest.raises(ModelLoadError, match="--reward_model"):
        main(PrioritizeConfig(project=DEMO_PROJECT, db=url))
    with pytest.raises(ValueError, match="two or more"):
        main(PrioritizeConfig(project=DEMO_PROJECT, db=url, reward_model=[str(root / "rm0")], strategy="disagreement"))
    with pytest.raises(ModelLoadError, match="reward_config.json"):
        main(PrioritizeConfig(project=DEMO_PROJECT, db=url, reward_model=[str(root)]))
    cfg = parse_args(["--project", "p", "--reward_model", "a", "b", "--strategy", "mixed"])
    assert cfg.reward_model == ["a", "b"] and cfg.strategy == "mixed"

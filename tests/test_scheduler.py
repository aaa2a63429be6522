"""annotate.scheduler: what is served next, idempotent votes, undo/edit, gold, repeats, concurrency."""

import random
import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from annotate.ingest import ingest
from annotate.scheduler import (
    VoteError,
    next_assignment,
    progress,
    record_vote,
    shown_left_for,
    to_canonical,
    undo_last,
)
from db import Annotator, Comparison, Project, Vote
from storyworld import make_world


@pytest.fixture
def project(session_factory, tmp_path):
    """20 storyworld items, 6 comparisons each, overlap 2, and four annotators."""
    make_world(tmp_path / "w", 20, seed=4)
    ingest(session_factory, str(tmp_path / "w" / "items.jsonl"), "p", media_root=tmp_path / "m", project_settings={"overlap": 2})
    with session_factory.begin() as s:
        s.add_all([Annotator(username=f"u{i}", password_hash="x") for i in range(4)])
    return session_factory


def _ids(s):
    return s.scalar(select(Project).where(Project.name == "p")), {a.username: a.id for a in s.scalars(select(Annotator))}


def test_left_right_mapping():
    assert to_canonical("left", "b") == "b" and to_canonical("right", "b") == "a" and to_canonical("tie", "a") == "tie"
    with pytest.raises(VoteError):
        to_canonical("up", "a")
    assert {shown_left_for(1, c) for c in range(50)} == {"a", "b"}  # both orders occur
    assert shown_left_for(3, 7) == shown_left_for(3, 7)  # stable across reloads


def test_fewest_votes_first_never_twice_never_same_item(project):
    rng = random.Random(0)
    with project.begin() as s:
        p, users = _ids(s)
        a = next_assignment(s, users["u0"], p, rng=rng)
        record_vote(s, users["u0"], a, "left", client_token="t0")
        # u1 is served a comparison with no votes yet, and never one of the item u1 just saw.
        b = next_assignment(s, users["u1"], p, last_item_id=a.item_id, rng=rng)
        assert s.get(Comparison, b.comparison_id).n_votes == 0 and b.item_id != a.item_id
    seen, last = set(), None
    for k in range(120):  # u0 answers everything that is left for them
        with project.begin() as s:
            nxt = next_assignment(s, users["u0"], p, last_item_id=last, rng=rng)
            if nxt is None:
                break
            assert nxt.comparison_id not in seen
            seen.add(nxt.comparison_id)
            record_vote(s, users["u0"], nxt, "right", client_token=f"k{k}")
            last = nxt.item_id
    with project() as s:
        n_regular = s.scalar(select(func.count(Comparison.id)).where(~Comparison.is_gold))
        assert len(seen) == n_regular - 1  # every regular comparison, less the one answered before
        assert s.scalar(select(func.count(Vote.id)).where(Vote.annotator_id == users["u0"])) == n_regular


def test_overlap_is_respected(project):
    rng = random.Random(1)
    for name in ("u0", "u1", "u2", "u3"):
        for k in range(200):
            with project.begin() as s:
                p, users = _ids(s)
                nxt = next_assignment(s, users[name], p, rng=rng)
                if nxt is None:
                    break
                record_vote(s, users[name], nxt, "tie", client_token=f"{name}{k}")
    with project() as s:
        counts = s.scalars(select(Comparison.n_votes).where(~Comparison.is_gold)).all()
        assert max(counts) == 2 and min(counts) == 2  # exactly the overlap, sequentially
        assert set(s.scalars(select(Comparison.n_votes).where(Comparison.is_gold))) == {0}  # gold rate 0: never served
        p, users = _ids(s)
        assert progress(s, users["u0"], p).fraction == 1.0


def test_vote_is_idempotent_and_a_second_answer_is_refused(project):
    with project.begin() as s:
        p, users = _ids(s)
        a = next_assignment(s, users["u0"], p, rng=random.Random(0))
        v1, created1 = record_vote(s, users["u0"], a, "left", client_token="same")
        v2, created2 = record_vote(s, users["u0"], a, "right", client_token="same")  # double click / retry
        assert (created1, created2) == (True, False) and v1.id == v2.id and v1.choice == a.shown_left
        with pytest.raises(VoteError, match="already answered"):
            record_vote(s, users["u0"], a, "right", client_token="other")
        assert s.get(Comparison, a.comparison_id).n_votes == 1


def test_undo_supersedes_and_never_deletes(project):
    with project.begin() as s:
        p, users = _ids(s)
        a = next_assignment(s, users["u0"], p, rng=random.Random(0))
        old, _ = record_vote(s, users["u0"], a, "left", client_token="t1", strength=3, aspects={"grounding": "left"})
        again = undo_last(s, users["u0"], p)
        assert again.comparison_id == a.comparison_id and again.shown_left == a.shown_left and again.editing_vote_id == old.id
        assert not old.active and s.get(Comparison, a.comparison_id).n_votes == 0
        new, _ = record_vote(s, users["u0"], again, "right", client_token="t2")
        assert old.superseded_by_id == new.id and new.active
        assert s.get(Comparison, a.comparison_id).n_votes == 1
        assert s.scalar(select(func.count(Vote.id))) == 2  # both rows kept
        assert old.aspects == {"grounding": a.shown_left} and old.strength == 3
        assert undo_last(s, users["u1"], p) is None


def test_repeats_swap_sides_and_gold_is_served(project):
    with project.begin() as s:
        p, users = _ids(s)
        rng = random.Random(0)
        for k in range(6):
            nxt = next_assignment(s, users["u0"], p, rng=rng)
            record_vote(s, users["u0"], nxt, "left", client_token=f"r{k}")
        p.repeat_rate = 1.0
        rep = next_assignment(s, users["u0"], p, rng=rng)
        original = s.scalar(select(Vote).where(Vote.comparison_id == rep.comparison_id, Vote.annotator_id == users["u0"]))
        assert rep.is_repeat and rep.shown_left != original.shown_left
        before = s.get(Comparison, rep.comparison_id).n_votes
        vote, _ = record_vote(s, users["u0"], rep, "right", client_token="rep")  # same story, now on the right
        assert vote.is_repeat and vote.choice == original.choice
        assert s.get(Comparison, rep.comparison_id).n_votes == before  # repeats do not count towards overlap
        p.repeat_rate, p.gold_rate = 0.0, 1.0
        gold = next_assignment(s, users["u1"], p, rng=rng)
        assert gold.is_gold and s.get(Comparison, gold.comparison_id).gold_choice in ("a", "b")


def test_concurrent_annotators_respect_overlap_and_never_repeat(project):
    """16 threads vote at once; overlap 2 may only be exceeded by in-flight slack, never twice by one."""
    with project.begin() as s:
        s.add_all([Annotator(username=f"c{i}", password_hash="x") for i in range(16)])
    errors = []

    def worker(name: str, seed: int):
        rng = random.Random(seed)
        try:
            for k in range(10):
                with project.begin() as s:
                    p, users = _ids(s)
                    nxt = next_assignment(s, users[name], p, rng=rng)
                if nxt is None:
                    return
                with project.begin() as s:  # the answer comes in a later request, as in the app
                    record_vote(s, users[name], nxt, "left", client_token=f"{name}-{k}")
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(f"c{i}", i)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with project() as s:
        per_pair = Counter(s.execute(select(Vote.comparison_id, Vote.annotator_id).where(Vote.active)).all())
        assert max(per_pair.values()) == 1  # no annotator answered a comparison twice
        counts = s.scalars(select(Comparison.n_votes)).all()
        assert sum(counts) == 160 and max(counts) <= 2 + 15  # overlap + at most the other 15 in flight
        assert sum(c > 2 for c in counts) <= 16


@pytest.mark.parametrize("fetch", [None, (5, 8), (50, 8)], ids=["small", "dense", "mixed"])
def test_priorities_serve_breadth_first_by_priority_and_keep_the_overlap(project, fetch, monkeypatch):
    """With `rlhf.prioritize`'s rows, each scored comparison gets its first vote, highest priority
    first, before any gets a second; each up to its overlap, never twice to one annotator; unscored
    comparisons wait until the scored ones are done. `small`: every scored comparison fits on the
    first page of the priority walk; `dense` and `mixed` shrink the scheduler's reads so that a vote
    count holds more comparisons than it reads at once (it walks the index a page at a time) and,
    later, fewer (it reads them whole and sorts), as over a large campaign."""
    import annotate.scheduler as scheduler
    from db import ComparisonPriority

    if fetch:
        monkeypatch.setattr(scheduler, "LEVEL_FETCH", fetch[0])
        monkeypatch.setattr(scheduler, "DENSE_WALK", fetch[1])

    rng = random.Random(2)
    with project.begin() as s:
        p, users = _ids(s)
        ids = s.scalars(select(Comparison.id).where(Comparison.project_id == p.id, ~Comparison.is_gold).order_by(Comparison.id)).all()
        top = set(ids[-20:])  # the 20 newest get a high priority, 40 more a low one, the rest none
        s.add_all([ComparisonPriority(comparison_id=c, project_id=p.id, priority=0.9 if c in top else 0.1) for c in ids[-60:]])
    served = []
    for k in range(100):  # 2 annotators: the top 20 once, the low 40 once, then the top 20 again (overlap 2), then the low 40
        name = ("u0", "u1")[k % 2]
        with project.begin() as s:
            p, users = _ids(s)
            a = next_assignment(s, users[name], p, rng=rng)
            served.append((name, a.comparison_id))
            record_vote(s, users[name], a, "left", client_token=f"p{k}")
    order = [c for _, c in served]
    assert set(order[:20]) == top and len(set(order[:20])) == 20  # level 0, highest priority first
    assert set(order[20:60]) == set(ids[-60:-20]) and len(set(order[20:60])) == 40  # level 0, then the low ones
    assert set(order[60:80]) == top  # level 1: the top ones again, now at their overlap of 2
    assert set(order[80:]) <= set(ids[-60:-20])
    assert max(Counter(served).values()) == 1  # never twice to one annotator
    with project.begin() as s:
        p, users = _ids(s)
        assert all(s.get(Comparison, c).n_votes == 2 for c in top)
        nxt = next_assignment(s, users["u2"], p, rng=rng)
        assert nxt.comparison_id in set(ids[-60:-20])  # the low-priority ones, still before the unscored
        assert s.get(Comparison, nxt.comparison_id).n_votes == 1

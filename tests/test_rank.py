"""Rank mode and span marks on the labeling side: ingest's rank sets, the scheduler, recording, undo."""

import doctest

import pytest
from sqlalchemy import select

import annotate.ingest
import annotate.scheduler
from annotate.ingest import IngestError, ingest, rank_sets
from annotate.scheduler import (
    RankError,
    SpanError,
    check_ranks,
    next_assignment,
    record_vote,
    shown_order_for,
    undo_last,
)
from db import Annotator, Candidate, Comparison, Project, Vote
from storyworld import make_world


@pytest.mark.parametrize("module", [annotate.ingest, annotate.scheduler])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_rank_sets_cover_every_candidate_with_full_sets():
    assert rank_sets([3, 1, 2], 4) == [[1, 2, 3]]
    assert rank_sets([7], 4) == [] and rank_sets([], 3) == []
    assert rank_sets(list(range(1, 9)), 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    sets = rank_sets(list(range(1, 10)), 4)  # 9 candidates: the last window moves back to stay full
    assert sets == [[1, 2, 3, 4], [5, 6, 7, 8], [6, 7, 8, 9]] and {c for x in sets for c in x} == set(range(1, 10))


@pytest.fixture
def ranked(session_factory, tmp_path):
    """12 storyworld items (4 candidates each) in a rank project of K = 3, overlap 2; three annotators."""
    make_world(tmp_path / "w", 12, seed=5)
    settings = {"overlap": 2, "mode": "rank", "rank_k": 3, "span_marks": True}
    ingest(session_factory, str(tmp_path / "w" / "items.jsonl"), "r", media_root=tmp_path / "m", project_settings=settings)
    with session_factory.begin() as s:
        s.add_all([Annotator(username=f"u{i}", password_hash="x") for i in range(3)])
    return session_factory


def _ids(s):
    return s.scalar(select(Project).where(Project.name == "r")), {a.username: a.id for a in s.scalars(select(Annotator))}


def test_rank_project_gets_rank_sets_not_pairs(ranked, tmp_path):
    with ranked() as s:
        comps = list(s.scalars(select(Comparison)))
        gold = [c for c in comps if c.is_gold]  # storyworld's gold pairs: rankings of the two
        assert len(comps) - len(gold) == 12 * 2 and len(gold) == 4  # 4 candidates, K = 3: [1, 2, 3] and [2, 3, 4] per item
        assert all(len(g.candidate_ids) == 2 and sorted(g.gold_ranks.values()) == [1, 2] for g in gold)
        for c in comps:
            assert len(c.candidate_ids) == (2 if c.is_gold else 3) and c.candidate_ids == sorted(c.candidate_ids)
            assert {c.candidate_a_id, c.candidate_b_id} <= set(c.candidate_ids) and c.candidate_a_id < c.candidate_b_id
    # ingesting the same file again adds nothing
    _, stats = ingest(ranked, str(tmp_path / "w" / "items.jsonl"), "r", media_root=tmp_path / "m")
    assert stats.comparisons_added == 0


def test_gold_rank_is_a_gold_rank_set(session_factory, tmp_path, items_source):
    import json

    lines = [json.loads(x) for x in items_source.read_text().splitlines()]
    lines[0]["gold_rank"] = [2, 0, 1]
    src = items_source.parent / "gold.jsonl"  # beside the images
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ingest(session_factory, str(src), "g", media_root=tmp_path / "m", project_settings={"mode": "rank"})
    with session_factory() as s:
        gold = s.scalar(select(Comparison).where(Comparison.is_gold))
        item_cands = [c.id for c in s.scalars(select(Candidate).where(Candidate.item_id == gold.item_id).order_by(Candidate.id))]
        expected = {str(item_cands[2]): 1, str(item_cands[0]): 2, str(item_cands[1]): 3}
        assert gold.gold_ranks == expected
        ranks = {int(k): v for k, v in expected.items()}
        a, b = gold.candidate_a_id, gold.candidate_b_id
        assert gold.gold_choice == ("a" if ranks[a] < ranks[b] else "b")
    lines[0]["gold_rank"] = [0, 0]
    src.write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(IngestError, match=r"gold\.jsonl:1: `gold_rank` must list 2 to 8 distinct"):
        ingest(session_factory, str(src), "g2", media_root=tmp_path / "m")


def test_check_ranks_dense_ties_and_refusals():
    assert check_ranks([1, 1, 3], 3) == [1, 1, 2] and check_ranks([2, 3, 1], 3) == [2, 3, 1]
    for bad in ([1, 2], [1, None, 2], [0, 1, 2], [1, 2, 4], "123", [1, 2, True]):
        with pytest.raises(RankError):
            check_ranks(bad, 3)


def test_ranking_is_stored_as_given_with_the_implied_pair_choice(ranked):
    with ranked.begin() as s:
        project, users = _ids(s)
        a = next_assignment(s, users["u0"], project)
        comp = s.get(Comparison, a.comparison_id)
        order = shown_order_for(users["u0"], comp)
        assert sorted(order) == comp.candidate_ids and order == shown_order_for(users["u0"], comp)  # stable
        vote, created = record_vote(s, users["u0"], a, "rank", ranks=[2, 1, 2], client_token="t1", time_spent_ms=1500)
        assert created and vote.ranking == {"shown": order, "ranks": [2, 1, 2], "all_bad": False}
        by_id = dict(zip(order, [2, 1, 2]))
        ra, rb = by_id[comp.candidate_a_id], by_id[comp.candidate_b_id]
        assert vote.choice == ("a" if ra < rb else "b" if rb < ra else "tie")
        assert vote.shown_left == ("a" if order.index(comp.candidate_a_id) < order.index(comp.candidate_b_id) else "b")
        assert comp.n_votes == 1 and vote.time_spent_ms == 1500
        again, created = record_vote(s, users["u0"], a, "rank", ranks=[1, 2, 3], client_token="t1")  # a double click
        assert not created and again.id == vote.id and again.ranking["ranks"] == [2, 1, 2]
        with pytest.raises(RankError, match="give every one of the 3 stories a rank"):
            record_vote(s, users["u1"], a, "rank", ranks=[1, 2], client_token="t2")
        with pytest.raises(RankError, match="ranking of 3 stories"):
            record_vote(s, users["u1"], a, "left", client_token="t3")
        bad, _ = record_vote(s, users["u1"], a, "all_bad", client_token="t4")
        assert bad.choice == "both_bad" and bad.ranking["all_bad"] and bad.ranking["ranks"] is None


def test_undo_and_edit_keep_the_ranking_history(ranked):
    with ranked.begin() as s:
        project, users = _ids(s)
        a = next_assignment(s, users["u0"], project)
        first, _ = record_vote(s, users["u0"], a, "rank", ranks=[1, 2, 3], client_token="t1",
                               spans=[{"pos": 0, "start": 0, "end": 4, "label": "hallucinated"}])  # fmt: skip
        again = undo_last(s, users["u0"], project)
        assert again.comparison_id == a.comparison_id and again.editing_vote_id == first.id
        second, _ = record_vote(s, users["u0"], again, "rank", ranks=[3, 2, 1], client_token="t2")
        assert not first.active and first.superseded_by_id == second.id and first.spans[0]["label"] == "hallucinated"
        assert second.ranking["shown"] == first.ranking["shown"] and second.ranking["ranks"] == [3, 2, 1] and second.spans is None
        assert s.get(Comparison, a.comparison_id).n_votes == 1


def test_repeat_of_a_ranking_shows_the_stories_reversed(ranked):
    with ranked.begin() as s:
        project, users = _ids(s)
        project.repeat_rate = 1.0
        answered = []
        for k in range(5):  # a repeat needs a few answers behind it
            project.repeat_rate = 0.0
            a = next_assignment(s, users["u0"], project)
            answered.append(record_vote(s, users["u0"], a, "rank", ranks=[1, 2, 3], client_token=f"t{k}")[0])
        project.repeat_rate = 1.0
        rep = next_assignment(s, users["u0"], project)
        assert rep.is_repeat
        original = next(v for v in answered if v.comparison_id == rep.comparison_id)
        vote, _ = record_vote(s, users["u0"], rep, "rank", ranks=[3, 2, 1], client_token="rep")
        assert vote.ranking["shown"] == original.ranking["shown"][::-1] and vote.is_repeat
        assert vote.choice == original.choice  # the same judgement, given from the other end


def test_span_marks_map_to_candidates_and_offsets(ranked):
    with ranked.begin() as s:
        project, users = _ids(s)
        a = next_assignment(s, users["u0"], project)
        order = shown_order_for(users["u0"], s.get(Comparison, a.comparison_id))
        text = s.get(Candidate, order[1]).text
        marks = [{"pos": 1, "start": 0, "end": 5, "label": "hallucinated"}, {"pos": 0, "start": 3, "end": 9, "label": "other"}]
        vote, _ = record_vote(s, users["u0"], a, "rank", ranks=[1, 2, 3], client_token="t1", spans=marks)
        got = {m["candidate_id"]: m for m in vote.spans}
        assert got[order[1]] == {"candidate_id": order[1], "start": 0, "end": 5, "label": "hallucinated", "text": text[:5]}
        assert got[order[0]]["label"] == "other" and got[order[0]]["text"] == s.get(Candidate, order[0]).text[3:9]
        a2 = next_assignment(s, users["u1"], project)
        for bad, msg in [
            ([{"pos": 3, "start": 0, "end": 2, "label": "other"}], "not on the page"),
            ([{"pos": 0, "start": 5, "end": 5, "label": "other"}], "outside the story"),
            ([{"pos": 0, "start": 0, "end": 10**6, "label": "other"}], "outside the story"),
            ([{"pos": 0, "start": 0, "end": 2, "label": "boring"}], "unknown span label"),
            ([["pos", 0]], "must be an object"),
            ([{"pos": 0, "start": 0, "end": 2, "label": "other"}] * 51, "at most 50"),
        ]:
            with pytest.raises(SpanError, match=msg):
                record_vote(s, users["u1"], a2, "rank", ranks=[1, 2, 3], client_token="bad", spans=bad)
        assert s.scalar(select(Vote).where(Vote.client_token == "bad")) is None  # refused before anything was written


def test_span_marks_on_a_pair_follow_left_and_right(session_factory, items_source, tmp_path):
    ingest(session_factory, str(items_source), "p", media_root=tmp_path / "m", project_settings={"span_marks": True})
    with session_factory.begin() as s:
        s.add(Annotator(username="ann", password_hash="x"))
        s.flush()
        user = s.scalar(select(Annotator.id))
        project = s.scalar(select(Project))
        a = next_assignment(s, user, project)
        comp = s.get(Comparison, a.comparison_id)
        left = comp.candidate_a if a.shown_left == "a" else comp.candidate_b
        vote, _ = record_vote(s, user, a, "left", client_token="t", spans=[{"pos": 0, "start": 0, "end": 3, "label": "contradicts"}])
        assert vote.spans == [{"candidate_id": left.id, "start": 0, "end": 3, "label": "contradicts", "text": left.text[:3]}]
        assert vote.ranking is None and vote.choice == a.shown_left

"""Rank mode and span marks on the labeling side: ingest's rank sets, the scheduler, recording, undo."""

import doctest

import pytest
from sqlalchemy import func, select

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


# -- export ----------------------------------------------------------------------------------------


def _rank_votes(factory):
    """Two annotators rank the first rank set (K = 3): u0 with a tie and a mark, u1 strictly; u2 says all bad."""
    with factory.begin() as s:
        project, users = _ids(s)
        comp = s.scalars(select(Comparison).where(~Comparison.is_gold).order_by(Comparison.id)).first()
        from annotate.scheduler import Assignment

        a = Assignment(comp.id, comp.item_id, "a")
        by_rank = {}  # annotator -> {candidate id: rank}
        for name, wanted in (("u0", [1, 1, 2]), ("u1", [1, 2, 3])):  # ranks of the set's candidates in id order
            order = shown_order_for(users[name], comp)
            ranks = [wanted[comp.candidate_ids.index(c)] for c in order]
            spans = [{"pos": order.index(comp.candidate_ids[2]), "start": 0, "end": 4, "label": "hallucinated"}] if name == "u0" else None
            record_vote(s, users[name], a, "rank", ranks=ranks, client_token=name, spans=spans)
            by_rank[name] = dict(zip(comp.candidate_ids, wanted))
        record_vote(s, users["u2"], a, "all_bad", client_token="u2")
        return comp.id, list(comp.candidate_ids)


def test_export_expands_rankings_into_weighted_pairs(ranked, tmp_path):
    import json

    from annotate.export import export

    comp_id, (c1, c2, c3) = _rank_votes(ranked)
    with ranked() as s:
        texts = dict(s.execute(select(Candidate.id, Candidate.text)).all())
        stats = export(s, tmp_path / "p.jsonl", "pairs", include_ties=True, include_both_bad=True)
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert stats.rows == 9 and len(lines) == 9  # 3 annotators × 3 pairs
    assert all(x["source"] == "rank" and x["weight"] == pytest.approx(2 / 3) and x["comparison_id"] == comp_id for x in lines)
    got = {(x["annotator"], x["response_a"], x["response_b"]): x["preference"] for x in lines}
    # u0 ranked c1 = c2 > c3; u1 c1 > c2 > c3; u2 all bad
    expected = {
        ("u0", c1, c2): "tie", ("u0", c1, c3): "response_a", ("u0", c2, c3): "response_a",
        ("u1", c1, c2): "response_a", ("u1", c1, c3): "response_a", ("u1", c2, c3): "response_a",
        ("u2", c1, c2): "both_bad", ("u2", c1, c3): "both_bad", ("u2", c2, c3): "both_bad",
    }  # fmt: skip
    assert got == {(u, texts[a], texts[b]): p for (u, a, b), p in expected.items()}
    marked = [x for x in lines if x["annotator"] == "u0" and texts[c3] in (x["response_a"], x["response_b"])]
    assert len(marked) == 2 and all(x["spans"]["response_b"] == [{"start": 0, "end": 4, "label": "hallucinated", "text": texts[c3][:4]}]
                                    and x["spans"]["response_a"] == [] for x in marked)  # fmt: skip

    # majority per implied pair: (c1, c2) is a draw between a tie and a → tie; the other two are a
    with ranked() as s:
        export(s, tmp_path / "m.jsonl", "pairs", aggregate="majority", include_ties=True)
    major = {(x["response_a"], x["response_b"]): (x["preference"], x["n_votes"]) for x in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())}
    assert major == {(texts[c1], texts[c2]): ("tie", 3), (texts[c1], texts[c3]): ("response_a", 3), (texts[c2], texts[c3]): ("response_a", 3)}

    # trl: spans by chosen/rejected; the weight per --rank-weight
    for mode, w in (("ranking", 2 / 3), ("pair", 1.0), ("instructgpt", 1 / 3)):
        with ranked() as s:
            export(s, tmp_path / f"trl-{mode}", "trl", test_fraction=0.0, rank_weight=mode)
        rows = [json.loads(x) for x in (tmp_path / f"trl-{mode}" / "train.jsonl").read_text().splitlines()]
        assert len(rows) == 5 and all(r["weight"] == pytest.approx(w) and r["source"] == "rank" for r in rows)  # u0's tie left out
    spans = [r["spans"] for r in rows if r["spans"]["rejected"]]
    assert len(spans) == 2 and all(x["rejected"][0]["label"] == "hallucinated" and x["chosen"] == [] for x in spans)


def test_export_hf_and_read_back_carry_weights_and_spans(ranked, tmp_path):
    pytest.importorskip("datasets")
    from annotate.export import export
    from rlhf.data import load_preferences

    _rank_votes(ranked)
    with ranked() as s:
        export(s, tmp_path / "hf", "hf", test_fraction=0.0)
        export(s, tmp_path / "trl", "trl", test_fraction=0.0)
        export(s, tmp_path / "p.jsonl", "pairs")
    for src in ("hf", "trl", "p.jsonl"):
        pairs, _, _ = load_preferences(tmp_path / src, test_fraction=0.0)
        assert len(pairs) == (3 if src == "p.jsonl" else 5), src  # pairs: one per implied pair; trl/hf: one per vote
        assert all(p.weight == pytest.approx(2 / 3) for p in pairs), src
        marked = [p for p in pairs if p.spans.get("rejected")]
        assert marked and all(m["label"] == "hallucinated" and p.rejected[m["start"]:m["end"]] == m["text"]
                              for p in marked for m in p.spans["rejected"]), src  # fmt: skip


def test_bad_rank_weight_is_refused_before_anything_is_written(ranked, tmp_path):
    from annotate.export import ExportError, export

    with ranked() as s, pytest.raises(ExportError, match="unknown --rank-weight 'votes'"):
        export(s, tmp_path / "x.jsonl", "pairs", rank_weight="votes")
    assert not (tmp_path / "x.jsonl").exists()


def test_span_marks_round_trip_through_pairs_export_and_ingest(session_factory, tmp_path):
    """storyworld's marking annotators → pairs JSONL → ingest → export: the marks come back as given."""
    import json

    from annotate.export import export
    from storyworld.world import annotate_world

    make_world(tmp_path / "w", 8, seed=2)
    annotate_world(tmp_path / "w", tmp_path / "votes.jsonl", votes_per_pair=1, marks=True)
    ingest(session_factory, str(tmp_path / "votes.jsonl"), "m", media_root=tmp_path / "m")
    with session_factory() as s:
        export(s, tmp_path / "out.jsonl", "pairs", include_ties=True)
        assert s.scalar(select(Vote).where(Vote.spans.is_not(None))) is not None
    before = {(x["response_a"], x["response_b"], x["annotator"]): x.get("spans") for x in map(json.loads, open(tmp_path / "votes.jsonl"))}
    after = {(x["response_a"], x["response_b"], x["annotator"]): x.get("spans") for x in map(json.loads, open(tmp_path / "out.jsonl"))}
    assert sum(v is not None for v in before.values()) > 5 and after == before


def test_bad_span_marks_in_a_pairs_file_stop_the_import(session_factory, tmp_path):
    import json

    from storyworld.world import annotate_world

    make_world(tmp_path / "w", 2, seed=2)
    annotate_world(tmp_path / "w", tmp_path / "votes.jsonl", votes_per_pair=1)
    lines = [json.loads(x) for x in open(tmp_path / "votes.jsonl")]
    lines[1]["spans"] = {"response_a": [{"start": 5, "end": 10**6, "label": "hallucinated"}]}
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(IngestError, match=r"bad\.jsonl:2: span mark .* of response_a must have 0 <= start < end"):
        ingest(session_factory, str(tmp_path / "bad.jsonl"), "m", media_root=tmp_path / "m")


def test_plain_text_offsets_agree_with_plain_text():
    import random

    from annotate.formats import plain_text, plain_text_offsets

    rng = random.Random(0)
    pieces = ["<gdi image1>", "</gdi>", "<gdo char1>", "</gdo>", " ", "  ", "\n", ".", ",", "Pip", "red", "star", "!"]
    for _ in range(2000):
        story = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        text, at = plain_text_offsets(story)
        assert text == plain_text(story) and len(at) == len(text)
        assert all(text[i] == story[at[i]] or (text[i] == " " and (story[at[i]].isspace() or story[at[i]] == "<")) for i in range(len(text)))


def test_rank_sets_are_scheduled_with_overlap_gold_and_leases(ranked):
    """Rank sets are served as pairs are: never twice to one annotator, up to the overlap, held ones
    counted; gold rank sets at the gold rate, and a ranking's gold accuracy read from its implied pair."""
    from annotate.export import vote_facts_query
    from annotate.stats import VoteFact, annotator_report

    with ranked.begin() as s:
        project, users = _ids(s)
        regular = s.scalar(select(func.count(Comparison.id)).where(Comparison.project_id == project.id, ~Comparison.is_gold))
        served = {name: set() for name in users}
        for _ in range(regular):  # every annotator answers until nothing is left for them
            for name, uid in users.items():
                a = next_assignment(s, uid, project)
                if a is None:
                    continue
                assert not a.is_gold and a.comparison_id not in served[name]
                served[name].add(a.comparison_id)
                record_vote(s, uid, a, "rank", ranks=[1, 2, 3], client_token=f"{name}-{a.comparison_id}")
        counts = [c.n_votes for c in s.scalars(select(Comparison).where(Comparison.project_id == project.id, ~Comparison.is_gold))]
        assert counts and all(n == project.overlap for n in counts)  # overlap 2, three annotators: each set exactly twice
        assert next_assignment(s, users["u0"], project) is None  # every set has its overlap; gold is off (rate 0)
        project.gold_rate = 1.0
        g = next_assignment(s, users["u0"], project)
        assert g is not None and g.is_gold
        gold = s.get(Comparison, g.comparison_id)
        order = shown_order_for(users["u0"], gold)
        ranks = [gold.gold_ranks[str(c)] for c in order]  # the expected ranking, in the order shown
        record_vote(s, users["u0"], g, "rank", ranks=ranks, client_token="gold-1")
        facts = [VoteFact(*r) for r in s.execute(vote_facts_query("r"))]
    row = next(r for r in annotator_report(facts) if r["annotator"] == "u0")
    assert row["gold_accuracy"] == 1.0

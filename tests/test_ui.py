"""The labeling app's handlers, called directly with a gr.Request, as Gradio would call them."""

import gradio as gr
import pytest
from sqlalchemy import func, select

from annotate.demo import DEMO_PROJECT, ensure_admin, seed_demo
from annotate.ui import STRENGTHS, LabelingApp, Session, build_app
from annotate.users import add_user
from db import Comparison, Vote, open_db

# view = (state, token, header, progress, compare, strength, *aspects, rationale, notice)
TOKEN, HEADER, COMPARE, NOTICE = 1, 2, 4, -1


@pytest.fixture
def app(tmp_path):
    _, factory = open_db(f"sqlite:///{tmp_path}/ui.db")
    assert seed_demo(factory, tmp_path / "data", n_items=12, media_root=tmp_path / "media", simulated_votes=False) == DEMO_PROJECT
    with factory.begin() as s:
        add_user(s, "ann", "ann-password")
        add_user(s, "bob", "bob-password")
        add_user(s, "boss", "boss-password", admin=True)
    demo = build_app(factory)
    return LabelingApp(factory, DEMO_PROJECT, demo.storypref_media_root), factory


def req(name):
    return gr.Request(username=name)


def _vote(app, view, answer, name, strength=None, aspects=(None,) * 4, rationale=""):
    return app.vote_handler(answer)(view[TOKEN], strength, *aspects, rationale, False, view[0], request=req(name))


def test_load_shows_a_comparison_with_frames(app):
    app, _ = app
    *view, guidelines, admin_tab, _, _ = app.load(request=req("ann"))
    assert view[COMPARE].startswith('<table class="sp-compare">') and "/gradio_api/file=" in view[COMPARE]
    assert view[HEADER].startswith("### Tell ") and "Which story is better" in guidelines
    assert admin_tab["visible"] is False
    assert app.load(request=req("boss"))[-3]["visible"] is True


def test_vote_uses_the_login_identity_and_maps_sides(app):
    app, factory = app
    *view, _, _, _, _ = app.load(request=req("ann"))
    a = view[0].assignment
    nxt = _vote(app, view, "right", "ann", strength=STRENGTHS[3], aspects=("left", None, "tie", None), rationale="B is grounded")
    with factory() as s:
        vote = s.scalar(select(Vote))
        assert vote.annotator.username == "ann" and vote.comparison_id == a.comparison_id
        assert vote.choice == ("b" if a.shown_left == "a" else "a")  # "right" is the one not on the left
        assert vote.strength == 4 and vote.rationale == "B is grounded" and vote.time_spent_ms is not None
        assert vote.aspects == {"grounding": a.shown_left, "style": "tie"}
        assert s.get(Comparison, a.comparison_id).n_votes == 1
    assert nxt[0].assignment.comparison_id != a.comparison_id and nxt[TOKEN] != view[TOKEN]


def test_double_submit_records_one_vote(app):
    app, factory = app
    *view, _, _, _, _ = app.load(request=req("ann"))
    after_first = _vote(app, view, "left", "ann")
    # The second click of a double click carries the same token; the server state has moved on.
    again = app.vote_handler("left")(view[TOKEN], None, *(None,) * 4, "", False, after_first[0], request=req("ann"))
    with factory() as s:
        assert len(s.scalars(select(Vote)).all()) == 1
    assert again[0].assignment == after_first[0].assignment  # nothing advanced


def test_unauthenticated_and_disabled_users_are_refused(app):
    app, factory = app
    with pytest.raises(gr.Error, match="not logged in"):
        app.load(request=gr.Request())
    with pytest.raises(gr.Error, match="not logged in"):
        app.vote_handler("left")("tok", None, *(None,) * 4, "", False, Session(), request=req("mallory"))
    with factory.begin() as s:
        from annotate.users import set_active

        set_active(s, "bob", False)
    with pytest.raises(gr.Error):
        app.load(request=req("bob"))


def test_one_annotator_cannot_vote_with_anothers_state(app):
    """Even holding ann's state and token, bob's request records a vote for bob, never for ann."""
    app, factory = app
    *ann_view, _, _, _, _ = app.load(request=req("ann"))
    _vote(app, ann_view, "left", "bob")
    with factory() as s:
        assert [v.annotator.username for v in s.scalars(select(Vote))] == ["bob"]


def test_skip_and_undo(app):
    app, factory = app
    *view, _, _, _, _ = app.load(request=req("ann"))
    first = view[0].assignment
    skipped = app.skip(False, view[0], request=req("ann"))
    assert skipped[0].assignment.comparison_id != first.comparison_id
    assert first.comparison_id in skipped[0].skipped
    voted = _vote(app, skipped, "left", "ann")
    undone = app.undo(False, voted[0], request=req("ann"))
    assert undone[0].assignment.comparison_id == skipped[0].assignment.comparison_id
    assert "withdrawn" in undone[NOTICE]
    redo = _vote(app, undone, "tie", "ann")
    with factory() as s:
        votes = s.scalars(select(Vote).order_by(Vote.id)).all()
        assert [(v.choice, v.active) for v in votes][-1] == ("tie", True) and not votes[0].active
        assert votes[0].superseded_by_id == votes[1].id
    assert "Nothing to undo" in app.undo(False, redo[0], request=req("bob"))[NOTICE]


def test_admin_views_return_nothing_to_annotators(app, tmp_path):
    app, _ = app
    *view, _, _, _, _ = app.load(request=req("ann"))
    for k in range(3):
        view = _vote(app, view, "left", "ann")
    assert app.admin_refresh(request=req("ann")) == (None, "", None, None, None, "", None)
    assert app.admin_export("pairs", "none", request=req("ann")) == (None, "")
    people, summary, board, *_ = app.admin_refresh(request=req("boss"))
    assert list(people["annotator"]) == ["ann"] and int(people["votes"][0]) == 3
    assert "Krippendorff" in summary and set(board.columns) >= {"origin", "strength", "ci_low", "ci_high"}
    path, message = app.admin_export("pairs", "none", request=req("boss"))
    assert "3 rows" in message and sum(1 for _ in open(path)) == 3


def test_admin_statistics_are_cached_until_the_votes_change(app):
    app, _ = app
    *view, _, _, _, _ = app.load(request=req("ann"))
    view = _vote(app, view, "left", "ann")
    people, *_ = app.admin_refresh(request=req("boss"))
    assert app.last_refresh_seconds["cached"] == 0.0
    again, *_ = app.admin_refresh(request=req("boss"))
    assert app.last_refresh_seconds["cached"] == 1.0 and again.equals(people)  # nothing changed: no recompute
    view = _vote(app, view, "right", "ann")  # a new vote
    people, *_ = app.admin_refresh(request=req("boss"))
    assert app.last_refresh_seconds["cached"] == 0.0 and int(people["votes"][0]) == int(again["votes"][0]) + 1
    app.undo(False, None, request=req("ann"))  # an undo
    people, *_ = app.admin_refresh(request=req("boss"))
    assert app.last_refresh_seconds["cached"] == 0.0 and int(people["votes"][0]) == int(again["votes"][0])


def test_first_run_creates_one_admin(tmp_path):
    _, factory = open_db(f"sqlite:///{tmp_path}/first.db")
    password = ensure_admin(factory)
    assert password and len(password) >= 12
    assert ensure_admin(factory) is None  # only once
    from annotate.auth import authenticate

    with factory() as s:
        assert authenticate(s, "admin", password).role == "admin"
        assert authenticate(s, "admin", "wrong") is None



def test_a_fresh_app_shows_agreement_leaderboard_and_plots(tmp_path):
    """`python app.py` on a new database: the Admin tab has statistics before anybody votes."""
    import app as app_py

    args = app_py.build_parser().parse_args(["--db", f"sqlite:///{tmp_path}/fresh.db", "--data-dir", str(tmp_path / "data")])
    demo, factory, password = app_py.prepare(args)
    assert password
    admin = LabelingApp(factory, DEMO_PROJECT, demo.storypref_media_root)
    people, summary, board, votes_plot, board_plot, models, verdicts = admin.admin_refresh(request=req("admin"))
    assert sorted(people["annotator"]) == ["demo-sim1", "demo-sim2-leftbias", "demo-sim3-careless", "demo-sim4", "demo-sim5"]
    assert people["votes"].sum() == 300  # 50 items x 2 comparisons x 3 votes
    alpha = float(summary.split("**Krippendorff's α** (−1/0/+1): ")[1].split(" ")[0])
    assert 0.2 < alpha < 0.9 and "comparisons with 2+ votes: 100" in summary
    assert len(board) == 3 and board["strength"].is_monotonic_decreasing
    assert list(board["origin"]) == ["storyworld/good", "storyworld/fair", "storyworld/poor"]  # the world's quality bands, in order
    assert len(votes_plot) == 5 and len(board_plot) == 3
    assert verdicts is None and "python -m rlhf.verdicts" in models  # no model has judged yet: how to
    with factory() as s:  # the simulated annotators cannot log in, and left real work for real annotators
        from annotate.auth import authenticate
        from db import Annotator

        assert all(a.password_hash is None for a in s.scalars(select(Annotator).where(Annotator.username.like("demo-%"))))
        assert authenticate(s, "demo-sim1", "") is None
        assert s.scalar(select(func.count(Comparison.id)).where(Comparison.n_votes == 0)) == 200


def test_no_demo_starts_empty(tmp_path):
    import app as app_py

    args = app_py.build_parser().parse_args(["--db", f"sqlite:///{tmp_path}/empty.db", "--data-dir", str(tmp_path / "data"), "--no-demo"])
    with pytest.raises(ValueError, match="no project yet; ingest items first"):
        app_py.prepare(args)
    _, factory = open_db(f"sqlite:///{tmp_path}/empty.db")
    with factory() as s:
        assert s.scalar(select(func.count(Vote.id))) == 0 and s.scalar(select(func.count(Comparison.id))) == 0


def test_every_handler_gets_the_request(app):
    """Gradio injects gr.Request only into parameters it can see typed as such: check every event."""
    from gradio.utils import get_type_hints

    _, factory = app
    demo = build_app(factory)
    for fn in demo.fns.values():
        if fn.fn is None:
            continue
        import inspect

        if "request" in inspect.signature(fn.fn).parameters:
            assert get_type_hints(fn.fn).get("request") in (gr.Request, gr.Request | None), fn.name


def test_admin_statistics_on_each_database(session_factory, tmp_path):
    """The Admin refresh reads the votes through the database driver's own cursor: SQLite and PostgreSQL."""
    seed_demo(session_factory, tmp_path / "data", n_items=12, media_root=tmp_path / "media", simulated_votes=True)
    with session_factory.begin() as s:
        add_user(s, "boss", "boss-password", admin=True)
    app = LabelingApp(session_factory, DEMO_PROJECT, tmp_path / "media")
    people, summary, board, *_ = app.admin_refresh(request=req("boss"))
    with session_factory() as s:
        votes = s.scalar(select(func.count(Vote.id)).where(Vote.active, ~Vote.is_repeat))
    assert int(people["votes"].sum()) == votes > 0
    assert "Krippendorff's α** (−1/0/+1): 0." in summary and len(board) >= 2


@pytest.fixture
def two_projects(app, tmp_path):
    """The demo project plus a second one, `captions`, from a tiny items file; ann is assigned to captions."""
    from annotate.ingest import ingest
    from annotate.users import assign
    from storyworld import make_world

    app, factory = app
    make_world(tmp_path / "w2", 4, seed=9, frames=(1, 1), image_size=(32, 32))
    ingest(factory, str(tmp_path / "w2" / "items.jsonl"), "captions", media_root=tmp_path / "media",
           project_settings={"overlap": 1, "guidelines": "Caption rules."})  # fmt: skip
    with factory.begin() as s:
        assign(s, "ann", "captions")
    return app, factory


def test_annotators_see_and_pick_only_their_projects(two_projects):
    """ann (assigned to captions) sees the open demo project and captions; bob (no assignment) sees only
    the demo; an admin sees both; a project ann is not assigned to is refused, whatever the client sends."""
    from annotate.users import assign, unassign

    app, factory = two_projects
    *view, guidelines, _, picker, _ = app.load(request=req("ann"))
    assert picker["choices"] == ["captions", DEMO_PROJECT] and picker["value"] == DEMO_PROJECT and picker["visible"]
    *bob_view, _, _, bob_picker, _ = app.load(request=req("bob"))
    assert bob_picker["choices"] == [DEMO_PROJECT] and bob_picker["visible"] is False  # one project: no picker
    *switched, guidelines = app.switch("captions", False, view[0], request=req("ann"))
    assert guidelines == "Caption rules." and switched[0].project == "captions"
    with factory() as s:
        comp = s.get(Comparison, switched[0].assignment.comparison_id)
        assert comp.project.name == "captions"
    assert switched[5]["visible"] is False  # captions asks no strength (the demo does)
    nxt = _vote(app, switched, "left", "ann")  # the vote lands in captions, and the next one comes from it
    with factory() as s:
        assert s.get(Comparison, nxt[0].assignment.comparison_id).project.name == "captions"
        assert s.scalar(select(func.count(Vote.id)).join(Comparison).where(Comparison.project_id == comp.project_id)) == 1
    with pytest.raises(gr.Error, match="not assigned to the project 'captions'"):
        app.switch("captions", False, bob_view[0], request=req("bob"))
    with pytest.raises(gr.Error, match="not assigned"):
        app.switch("no-such-project", False, bob_view[0], request=req("bob"))
    # Once the demo has a member too, bob (not one) sees no project at all, and is told why.
    with factory.begin() as s:
        assign(s, "ann", DEMO_PROJECT)
    *bob_view, _, _, bob_picker, _ = app.load(request=req("bob"))
    assert bob_picker["choices"] == [] and "not assigned to any project" in bob_view[HEADER] and bob_view[0].assignment is None
    # ann, unassigned from captions mid-session, is stopped on her next event there.
    with factory.begin() as s:
        unassign(s, "ann", "captions")
        assign(s, "bob", "captions")
    with factory() as s:
        before = s.scalar(select(func.count(Vote.id)))
    with pytest.raises(gr.Error, match="not assigned to the project 'captions'"):
        _vote(app, nxt, "left", "ann")
    with factory() as s:
        assert s.scalar(select(func.count(Vote.id))) == before  # refused, not recorded
    assert app.load(request=req("boss"))[-1]["choices"] == ["captions", DEMO_PROJECT]  # admins see every project


def test_admin_statistics_and_export_are_per_project(two_projects):
    app, _ = two_projects
    *view, _, _, _, _ = app.load(request=req("ann"))
    view = _vote(app, view, "left", "ann")  # one vote in the demo
    *cap, _ = app.switch("captions", False, view[0], request=req("ann"))
    cap = _vote(app, cap, "left", "ann")
    cap = _vote(app, cap, "right", "ann")  # two in captions
    demo_people, *_ = app.admin_refresh(DEMO_PROJECT, request=req("boss"))
    cap_people, *_ = app.admin_refresh("captions", request=req("boss"))
    assert int(demo_people["votes"].sum()) == 1 and int(cap_people["votes"].sum()) == 2
    path, message = app.admin_export("pairs", "none", "captions", request=req("boss"))
    assert message.startswith("Exported captions:") and sum(1 for _ in open(path)) == 2
    with pytest.raises(gr.Error, match="no project 'nope'"):
        app.admin_refresh("nope", request=req("boss"))
    assert app.admin_refresh("captions", request=req("ann"))[0] is None  # still nothing for annotators


@pytest.fixture
def rank_app(tmp_path, items_source):
    """A rank project (K = 3, span marks on) of the three-candidate items, and one annotator."""
    from annotate.ingest import ingest

    _, factory = open_db(f"sqlite:///{tmp_path}/rank.db")
    ingest(factory, str(items_source), "rank", media_root=tmp_path / "media", project_settings={"mode": "rank", "rank_k": 3, "span_marks": True})
    with factory.begin() as s:
        add_user(s, "ann", "ann-password")
    demo = build_app(factory, "rank")
    return LabelingApp(factory, "rank", demo.storypref_media_root), factory


# the view's rank radios, the pair and rank button rows, the span box and tools sit between the rationale and the notice
RANKS, PAIR_ROW, RANK_ROW, SPANS, SPAN_TOOLS = slice(11, 19), 19, 20, 21, 22


def _rank(app, view, ranks, spans="", answer="rank"):
    radios = [str(r) if r else None for r in ranks] + [None] * (8 - len(ranks))
    return app.rank_handler(answer)(view[TOKEN], *radios, spans, "", False, view[0], request=req("ann"))


def test_rank_view_asks_for_ranks_and_records_them_with_marks(rank_app):
    import json

    app, factory = rank_app
    *view, _, _, _, _ = app.load(request=req("ann"))
    assert 'class="sp-compare sp-markable"' in view[COMPARE] or "sp-rank" in view[COMPARE]
    assert view[COMPARE].count('class="sp-story"') >= 3 and "rank these 3 stories" in view[HEADER]
    radios = view[RANKS]
    assert [r["visible"] for r in radios] == [True] * 3 + [False] * 5 and radios[0]["choices"] == ["1", "2", "3"]
    assert view[PAIR_ROW]["visible"] is False and view[RANK_ROW]["visible"] is True and view[SPAN_TOOLS]["visible"] is True
    with pytest.raises(gr.Error, match="missing: B"):  # an incomplete ranking is refused, the page kept
        _rank(app, view, [1, None, 2])
    with pytest.raises(gr.Error, match="could not be read"):
        _rank(app, view, [1, 2, 3], spans="{not json")
    marks = json.dumps([{"pos": 2, "start": 0, "end": 5, "label": "hallucinated"}])
    nxt = _rank(app, view, [2, 1, 2], spans=marks)
    with factory() as s:
        vote = s.scalar(select(Vote))
        comp = s.get(Comparison, vote.comparison_id)
        assert vote.ranking["ranks"] == [2, 1, 2] and sorted(vote.ranking["shown"]) == comp.candidate_ids
        assert vote.spans[0]["candidate_id"] == vote.ranking["shown"][2] and vote.time_spent_ms is not None
    assert nxt[0].assignment.comparison_id != vote.comparison_id and nxt[SPANS]["value"] == ""
    # Undo brings the ranking back with its marks, to edit.
    again = app.undo(False, nxt[0], request=req("ann"))
    assert again[0].assignment.comparison_id == vote.comparison_id and json.loads(again[SPANS]["value"]) == json.loads(marks)
    _rank(app, again, [1, 2, 3], answer="all_bad")
    with factory() as s:
        votes = s.scalars(select(Vote).order_by(Vote.id)).all()
        assert [v.active for v in votes] == [False, True] and votes[1].choice == "both_bad" and votes[1].ranking["all_bad"]


def test_pair_view_hides_the_rank_controls(app):
    app, _ = app
    *view, _, _, _, _ = app.load(request=req("ann"))
    assert [r["visible"] for r in view[RANKS]] == [False] * 8
    assert view[PAIR_ROW]["visible"] is True and view[RANK_ROW]["visible"] is False and view[SPAN_TOOLS]["visible"] is False
    assert "data-s=" not in view[COMPARE]  # words carry offsets only where marks are asked


def test_admin_reports_ranking_agreement(rank_app):
    app, factory = rank_app
    with factory.begin() as s:
        add_user(s, "boss", "boss-password", admin=True)
    for name in ("ann", "boss"):
        *view, _, _, _, _ = app.load(request=req(name))
        # both rank the first set the same way: best is story shown first
        app.rank_handler("rank")(view[TOKEN], "1", "2", "3", *[None] * 5, "", "", False, view[0], request=req(name))
    _, summary, *_ = app.admin_refresh("rank", request=req("boss"))
    assert "**Rankings**: 2" in summary and "Kendall's τ-b" in summary and "α over the pairs they imply" in summary

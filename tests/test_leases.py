"""Leases in the database: app workers on one database see each other's hand-outs, and a lease left
by a closed tab or a dead worker expires. On SQLite and, when reachable, PostgreSQL."""

from __future__ import annotations

import time

import gradio as gr
from sqlalchemy import func, select

from annotate.ingest import ingest
from annotate.scheduler import DbLeases
from annotate.ui import LabelingApp
from annotate.users import add_user
from db import Lease

N = 9  # comparisons in the project (3 items × 3 pairs)


def _project(session_factory, items_source, tmp_path, names):
    ingest(session_factory, str(items_source), "p", media_root=tmp_path / "media", project_settings={"overlap": 1})
    with session_factory.begin() as s:
        for name in names:
            add_user(s, name, f"{name}-password")


def _served(app: LabelingApp, name: str):
    state = app.load(request=gr.Request(username=name))[0]
    return state, state.assignment.comparison_id if state.assignment else None


def test_two_workers_share_their_leases(session_factory, items_source, tmp_path):
    names = [f"ann{i}" for i in range(N)]
    _project(session_factory, items_source, tmp_path, names)
    workers = [LabelingApp(session_factory, "p", tmp_path / "media", leases="db") for _ in range(2)]
    assert all(isinstance(w.leases, DbLeases) for w in workers)
    served = [_served(workers[i % 2], name)[1] for i, name in enumerate(names)]
    # Overlap 1 and every open assignment counted as a vote, whichever worker handed it out:
    # nine annotators at once get the nine comparisons, one each.
    assert sorted(served) == sorted(set(served)) and len(set(served)) == N
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Lease)) == N


def test_a_vote_releases_its_lease_and_an_abandoned_one_expires(session_factory, items_source, tmp_path):
    _project(session_factory, items_source, tmp_path, ["ann", "bob", "cy"])
    quick = LabelingApp(session_factory, "p", tmp_path / "media", leases="db", lease_seconds=0.5)
    slow = LabelingApp(session_factory, "p", tmp_path / "media", leases="db", lease_seconds=600)
    state, first = _served(quick, "ann")  # ann closes her tab: her lease expires in 0.5 s
    _, second = _served(slow, "bob")
    with session_factory() as s:
        pid = s.scalar(select(Lease.project_id).limit(1))
    assert quick.leases.counts(pid) == {first: 1, second: 1}
    time.sleep(0.7)
    assert slow.leases.counts(pid) == {second: 1}  # ann's lease no longer counts; bob's does
    # bob answers: his lease goes with the vote's commit.
    view = slow.load(request=gr.Request(username="bob"))
    token = view[1]
    slow.vote("left", token, None, (None,) * 4, "", False, view[0], request=gr.Request(username="bob"))
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Lease).where(Lease.token == token)) == 0


def test_three_workers_on_postgresql_then_kill_9_one(tmp_path):
    """3 app processes on one PostgreSQL, 24 annotators through gradio_client: nothing lost or
    doubled, no comparison over its overlap; a worker killed with its assignments open: they expire
    and are served again, until every comparison has exactly its overlap."""
    import threading
    from collections import Counter

    import pytest

    from db import Annotator, Comparison, Vote, open_db
    from storyworld import make_world
    from tests.conftest import fresh_postgres_url
    from tests.server import AppServer

    gradio_client = pytest.importorskip("gradio_client")
    pg_url = fresh_postgres_url()
    # Leases must outlive phase 1 (24 annotators through 3 workers; far longer than 4 s on a loaded
    # machine), or they expire before they are counted; phase 2 waits them out.
    overlap, lease_seconds, n_annotators = 3, 15.0, 24
    make_world(tmp_path / "w", 7, seed=21)  # 7 items × 6 pairs = 42 comparisons (2 of them gold, not served here)
    _, factory = open_db(pg_url)
    ingest(factory, str(tmp_path / "w" / "items.jsonl"), "multi", media_root=tmp_path / "media", project_settings={"overlap": overlap})
    with factory.begin() as s:
        for i in range(n_annotators):
            add_user(s, f"w{i}", f"password-{i}")
        n_comparisons = s.scalar(select(func.count(Comparison.id)).where(~Comparison.is_gold))
    args = ["--leases", "db", "--lease-seconds", str(lease_seconds)]
    workers = [AppServer(pg_url, tmp_path / f"worker{k}.log", project="multi", extra_args=args).start() for k in range(3)]
    acked, errors = [], []

    def annotate(url: str, name: str, password: str, n: int | None) -> None:
        try:
            client = gradio_client.Client(url, auth=(name, password), verbose=False)
            out = client.predict(False, api_name="/load")
            k = 0
            while out[0] and (n is None or k < n):
                token = out[0]
                out = client.predict(token, None, None, None, None, None, "", False, api_name="/vote_left")
                acked.append((name, token))
                k += 1
        except Exception as e:  # noqa: BLE001 - collected, then asserted on
            errors.append(f"{name}: {type(e).__name__}: {e}")

    try:
        # Phase 1: 24 annotators at once, spread over the 3 workers, 2 votes each; each leaves one
        # assignment open (the comparison its last answer served).
        threads = [threading.Thread(target=annotate, args=(workers[i % 3].url, f"w{i}", f"password-{i}", 2)) for i in range(n_annotators)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors[:3]
        assert len(acked) == 2 * n_annotators
        with factory() as s:
            open_before = s.scalar(select(func.count()).select_from(Lease))
        assert open_before >= n_annotators - 2  # the open assignments, in the database
        # Worker 0's annotators go on voting; worker 0 is killed mid-load.
        before = len(acked)
        threads = [threading.Thread(target=annotate, args=(workers[0].url, f"w{i}", f"password-{i}", 6)) for i in range(0, n_annotators, 3)]
        for t in threads:
            t.start()
        deadline = time.time() + 120
        while len(acked) < before + 4 and time.time() < deadline:
            time.sleep(0.05)
        workers[0].kill9()
        for t in threads:
            t.join(timeout=60)
        assert len(acked) > before, "no vote was acknowledged before the kill"
        assert all(e.split(":")[0] in {f"w{i}" for i in range(0, n_annotators, 3)} for e in errors)  # only the dead worker's clients failed
        errors.clear()
        time.sleep(lease_seconds + 0.5)  # every open assignment expires, the dead worker's too
        # Phase 2: the annotators of the live workers, one at a time, answer until nothing is left.
        for i in range(n_annotators):
            if i % 3:
                annotate(workers[i % 3].url, f"w{i}", f"password-{i}", None)
        assert not errors, errors[:3]
        with factory() as s:
            tokens = set(s.scalars(select(Vote.client_token)))
            assert all(token in tokens for _, token in acked)  # 0 acknowledged votes lost
            # 0 duplicated: one vote per acknowledged answer, plus at most the few the dead worker
            # committed and never got to acknowledge.
            assert len(acked) <= s.scalar(select(func.count(Vote.id))) <= len(acked) + n_annotators // 3
            pairs = Counter(s.execute(select(Vote.comparison_id, Vote.annotator_id)).all())
            assert max(pairs.values()) == 1  # nobody answered a comparison twice
            counts = s.scalars(select(Comparison.n_votes).where(~Comparison.is_gold)).all()  # (a gold rate of 0 serves no gold)
            # The dead worker's comparisons were served again, and none went over its overlap.
            assert len(counts) == n_comparisons and set(counts) == {overlap}, Counter(counts)
            assert s.scalar(select(func.count(Annotator.id))) == n_annotators
    finally:
        for w in workers:
            w.stop()

"""The real app over HTTP: login required everywhere, identity from the session, a bounded load test
with 16 concurrent annotators through gradio_client, and every acknowledged vote surviving kill -9."""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request
from collections import Counter

import pytest
from sqlalchemy import func, select

from annotate.ingest import ingest
from annotate.users import add_user
from db import Annotator, Comparison, Vote, open_db
from storyworld import make_world
from storyworld.annotators import default_pool
from tests.server import AppServer

gradio_client = pytest.importorskip("gradio_client")
N_ANNOTATORS, VOTES_EACH, OVERLAP = 16, 50, 3


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """60 storyworld items (360 comparisons, overlap 3: room for 1,080 votes) and 16 annotators."""
    tmp = tmp_path_factory.mktemp("server")
    make_world(tmp / "w", 60, seed=11)
    url = f"sqlite:///{tmp}/app.db"
    _, factory = open_db(url)
    ingest(factory, str(tmp / "w" / "items.jsonl"), "load", media_root=tmp / "media", project_settings={"overlap": OVERLAP})
    with factory.begin() as s:
        for i in range(N_ANNOTATORS):
            add_user(s, f"ann{i}", f"password-{i}")
    return url, factory, tmp


def _vote_loop(url: str, name: str, password: str, n: int, acked: list, errors: list) -> None:
    try:
        client = gradio_client.Client(url, auth=(name, password), verbose=False)
        out = client.predict(False, api_name="/load")
        for _ in range(n):
            token = out[0]
            if not token:
                return  # nothing left for this annotator
            out = client.predict(token, None, None, None, None, None, "", False, api_name="/vote_left")
            acked.append((name, token))  # the server answered: this vote is acknowledged
    except Exception as e:  # noqa: BLE001 - collected and asserted on by the test
        errors.append(f"{name}: {type(e).__name__}: {e}")


def test_unauthenticated_requests_are_refused(database):
    url, _, tmp = database
    server = AppServer(url, tmp / "auth.log", project="load").start()
    try:
        for path in ("/gradio_api/info", "/config", "/gradio_api/queue/join"):
            with pytest.raises(urllib.error.HTTPError) as e:
                body = json.dumps({"data": [], "fn_index": 1, "session_hash": "x"}).encode() if "join" in path else None
                urllib.request.urlopen(urllib.request.Request(server.url + path, data=body,
                                                              headers={"Content-Type": "application/json"}))  # fmt: skip
            assert e.value.code in (401, 403), path
        with pytest.raises(Exception):
            gradio_client.Client(server.url, auth=("ann0", "wrong-password"), verbose=False)
        # With a login, the same endpoints answer.
        client = gradio_client.Client(server.url, auth=("ann0", "password-0"), verbose=False)
        assert "/vote_left" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    finally:
        server.stop()


def test_load_16_annotators_then_kill_9_loses_no_acknowledged_vote(database):
    url, factory, tmp = database
    server = AppServer(url, tmp / "load.log", project="load").start()
    try:
        # Phase 1: 16 annotators × 50 votes at once, over loopback.
        acked, errors = [], []
        threads = [threading.Thread(target=_vote_loop, args=(server.url, f"ann{i}", f"password-{i}", VOTES_EACH, acked, errors))
                   for i in range(N_ANNOTATORS)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not errors, errors[:3]
        assert len(acked) == N_ANNOTATORS * VOTES_EACH
        with factory() as s:
            tokens = set(s.scalars(select(Vote.client_token)))
            assert all(token in tokens for _, token in acked)  # no vote lost
            per_user = Counter(s.scalars(select(Annotator.username).join(Vote, Vote.annotator_id == Annotator.id)))
            assert all(per_user[f"ann{i}"] == VOTES_EACH for i in range(N_ANNOTATORS))  # none duplicated
            pairs = Counter(s.execute(select(Vote.comparison_id, Vote.annotator_id)).all())
            assert max(pairs.values()) == 1  # nobody got a comparison twice
            counts = s.scalars(select(Comparison.n_votes)).all()
            assert max(counts) <= OVERLAP + N_ANNOTATORS - 1  # overlap + in-flight slack
            # Leases make the app count open assignments as votes: in one process a run overshoots by
            # 0 in practice. A rare 1 was seen under a loaded CI machine and is not yet explained.
            overshoot = sum(max(0, c - OVERLAP) for c in counts)
            assert overshoot <= 2, overshoot
            n_before = s.scalar(select(func.count(Vote.id)))

        # Phase 2: kill -9 the server in the middle of a second wave, restart, count.
        acked2, errors2 = [], []
        threads = [threading.Thread(target=_vote_loop, args=(server.url, f"ann{i}", f"password-{i}", 10, acked2, errors2))
                   for i in range(N_ANNOTATORS)]  # fmt: skip
        for t in threads:
            t.start()
        deadline = threading.Event()
        while len(acked2) < 20 and not deadline.wait(0.05):
            pass
        server.kill9()
        for t in threads:
            t.join(timeout=60)
        assert acked2, "no vote was acknowledged before the kill"
        server.start()
        with factory() as s:
            tokens = set(s.scalars(select(Vote.client_token)))
            assert all(token in tokens for _, token in acked2)  # every acknowledged vote survived
            assert s.scalar(select(func.count(Vote.id))) >= n_before + len(acked2)
        client = gradio_client.Client(server.url, auth=("ann0", "password-0"), verbose=False)
        assert client.predict(False, api_name="/load")[0]  # and the app serves again
    finally:
        server.stop()


def test_storyworld_annotators_vote_through_the_app(tmp_path):
    """`python -m storyworld annotate --app URL --users FILE`: simulated annotators as real clients."""
    from storyworld.__main__ import main as storyworld_main

    make_world(tmp_path / "w", 12, seed=21)
    url = f"sqlite:///{tmp_path}/sim.db"
    _, factory = open_db(url)
    ingest(factory, str(tmp_path / "w" / "items.jsonl"), "sim", media_root=tmp_path / "media")
    with factory.begin() as s:
        for i in range(3):
            add_user(s, f"sim{i}", f"sim-password-{i}")
    (tmp_path / "users.txt").write_text("".join(f"sim{i}:sim-password-{i}\n" for i in range(3)))
    server = AppServer(url, tmp_path / "sim.log", project="sim").start()
    try:
        code = storyworld_main(["annotate", "--world", str(tmp_path / "w"), "--app", server.url,
                                "--users", str(tmp_path / "users.txt"), "--votes-per-user", "8"])  # fmt: skip
        assert code == 0
    finally:
        server.stop()
    world = {c["text"]: c["utility"] for line in (tmp_path / "w" / "world.jsonl").open() for c in json.loads(line)["candidates"]}
    # Replay each simulated annotator on the pairs the app recorded, in the order it voted: its seeded
    # choices must be exactly the stored votes, read back through `shown_left` (which story was on
    # the left). This checks the app's left/right -> canonical a/b mapping on every vote, whatever the
    # annotators' noise and whichever pairs the scheduler served to whom.
    pool = default_pool(3)
    with factory() as s:
        assert s.scalar(select(func.count(Vote.id))) == 24
        for i in range(3):
            votes = s.scalars(select(Vote).join(Annotator).where(Annotator.username == f"sim{i}").order_by(Vote.id)).all()
            assert len(votes) == 8
            rng = random.Random(f"0:sim{i}")  # annotate_app's seed for this account (--seed 0)
            for v in votes:
                comp = s.get(Comparison, v.comparison_id)
                left, right = (comp.candidate_a, comp.candidate_b) if v.shown_left == "a" else (comp.candidate_b, comp.candidate_a)
                stored = "tie" if v.choice == "tie" else ("left" if v.choice == v.shown_left else "right")
                assert stored == pool[i].choose(world[left.text], world[right.text], rng), (f"sim{i}", v)

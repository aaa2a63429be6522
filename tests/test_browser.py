"""One real-browser test of the labeling page: Debian's chromium driven by Playwright.

It logs in, votes with a click and with a keyboard shortcut, undoes, checks the database, and
checks that a candidate made of XSS payloads rendered as inert text. A screenshot of the
comparison view is saved in the test's tmp dir.
"""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import select

from annotate.ingest import ingest
from annotate.users import add_user
from db import Annotator, Vote, open_db
from tests.conftest import make_image
from tests.server import AppServer

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = ('<script>window.__xss = 1</script> <img src=x onerror="window.__xss = 2"> '
       '<a href="javascript:window.__xss = 3">click</a> <gdo char1>Pip</gdo> the red circle.')  # fmt: skip

pytestmark = pytest.mark.browser


def _serve(tmp_path, candidates, project: str, settings: dict | None = None):
    """The app on a project of 4 two-frame items whose candidates are `candidates(i)`, and an annotator `ann`."""
    pytest.importorskip("playwright")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    src = tmp_path / "src"
    lines = []
    for i in range(4):
        frames = [make_image(src / f"i{i}_{k}.png", (60 * k, 40 * i, 200)) for k in range(2)]
        lines.append({"external_id": f"x{i}", "image_paths": [p.name for p in frames], "instruction": f"Tell a story {i}.",
                      "style": "calm", "candidates": candidates(i)})  # fmt: skip
    (src / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    url = f"sqlite:///{tmp_path}/browser.db"
    _, factory = open_db(url)
    ingest(factory, str(src / "items.jsonl"), project, media_root=tmp_path / "media", project_settings=settings)
    with factory.begin() as s:
        add_user(s, "ann", "ann-password")
    return AppServer(url, tmp_path / "app.log", project=project).start(), factory


@pytest.fixture
def server(tmp_path):
    app, factory = _serve(tmp_path, lambda i: [XSS, f"<gdi image1>A calm scene {i}.</gdi><gdi image2>It rests.</gdi>"], "xss")
    yield app, factory
    app.stop()


def wait_votes(page, factory, n: int) -> list:
    """The database's votes once there are `n` (up to 15 s), else a failure that shows the page."""
    for _ in range(150):
        with factory() as s:
            votes = s.scalars(select(Vote).order_by(Vote.id)).all()
        if len(votes) == n:
            return votes
        page.wait_for_timeout(100)
    raise AssertionError(f"expected {n} votes, have {len(votes)}: {page.inner_text('body')[:2000]}")


def login(browser, url: str, name: str, password: str):
    """A new page, logged in as `name`, with its first comparison on screen."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(url)
    page.get_by_label("username").fill(name)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector(".sp-compare img", timeout=30_000)
    return page


def test_login_vote_click_and_key_undo_and_xss_inert(server, tmp_path):
    from playwright.sync_api import sync_playwright

    app, factory = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = login(browser, app.url, "ann", "ann-password")
        page.screenshot(path=str(tmp_path / "comparison.png"), full_page=True)

        # The payloads are visible as text, and none of them ran.
        assert "<script>window.__xss = 1</script>" in page.inner_text("#sp-compare")
        assert page.evaluate("window.__xss") is None
        assert page.locator("#sp-compare script").count() == 0 and page.locator("#sp-compare a").count() == 0
        assert page.locator(".sp-entity").count() >= 1  # <gdo> became a highlight
        assert page.locator("#sp-compare img").count() == 2  # the two frames, not the payload's img

        page.click("#sp-a")  # a click
        first = wait_votes(page, factory, 1)[0]
        with factory() as s:
            ann_id = s.scalar(select(Annotator.id).where(Annotator.username == "ann"))
        assert first.annotator_id == ann_id and first.choice == first.shown_left  # A = the left story
        page.wait_for_timeout(500)
        page.locator("body").click(position={"x": 5, "y": 5})  # focus the page, not a text field
        page.keyboard.press("0")  # a keyboard shortcut: tie
        assert wait_votes(page, factory, 2)[1].choice == "tie"
        page.wait_for_timeout(500)
        page.keyboard.press("u")  # undo the tie
        for _ in range(50):
            with factory() as s:
                if not s.scalars(select(Vote).order_by(Vote.id)).all()[1].active:
                    break
            page.wait_for_timeout(100)
        with factory() as s:
            votes = s.scalars(select(Vote).order_by(Vote.id)).all()
            assert [v.active for v in votes] == [True, False]  # withdrawn, kept
        page.wait_for_function("document.querySelector('#sp-notice').innerText.includes('withdrawn')", timeout=10_000)
        assert page.evaluate("window.__xss") is None
        browser.close()
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def test_an_annotator_picks_another_project(server, tmp_path):
    """Two projects on one server: the picker lists them, and picking one serves and records votes there."""
    from playwright.sync_api import sync_playwright

    from db import Comparison, Project

    app, factory = server
    src = tmp_path / "src2"
    frame = make_image(src / "f.png", (10, 200, 10))
    lines = [{"external_id": f"y{i}", "image_paths": [frame.name], "instruction": f"Caption the green square {i}.",
              "candidates": [f"A green square {i}.", f"A red circle {i}."]} for i in range(3)]  # fmt: skip
    (src / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ingest(factory, str(src / "items.jsonl"), "captions", media_root=tmp_path / "media")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = login(browser, app.url, "ann", "ann-password")
        assert "Tell a story" in page.inner_text("body")  # the app's --project first
        page.locator("#sp-project input").click()
        page.get_by_role("option", name="captions").click()
        page.wait_for_function("document.body.innerText.includes('Caption the green square')", timeout=20_000)
        # A click that races the switch's update reaches the server with the old comparison's token, which the app
        # answers as a stale page (shown again, nothing recorded), as it must: click again then, as a person would.
        vote = None
        for _ in range(3):
            page.wait_for_function("document.querySelectorAll('.pending, .generating').length === 0", timeout=20_000)
            page.click("#sp-a")
            for _ in range(30):
                with factory() as s:
                    vote = s.scalar(select(Vote))
                if vote is not None:
                    break
                page.wait_for_timeout(100)
            if vote is not None:
                break
        assert vote is not None, page.inner_text("body")[:3000]
        with factory() as s:
            assert s.scalar(select(Project.name).join(Comparison).where(Comparison.id == vote.comparison_id)) == "captions"
        browser.close()


def test_a_fresh_app_shows_statistics_in_the_admin_tab_at_once(tmp_path):
    """A new user's `python app.py`: log in as the printed admin, open Admin, and the demo's statistics are there."""
    pytest.importorskip("playwright")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    app = AppServer(f"sqlite:///{tmp_path}/fresh.db", tmp_path / "app.log", demo=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(app.url)
            page.get_by_label("username").fill("admin")
            page.get_by_label("password").fill(app.admin_password())
            page.get_by_role("button", name="Login").click()
            page.wait_for_selector(".sp-compare img", timeout=30_000)
            page.get_by_role("tab", name="Admin").click()  # selecting the tab refreshes; no button pressed
            page.wait_for_function("document.body.innerText.includes('demo-sim3-careless')", timeout=30_000)
            page.wait_for_function("document.body.innerText.includes('storyworld/poor')", timeout=30_000)
            text = page.inner_text("body")
            assert "Krippendorff's α" in text and "comparisons with 2+ votes: 100" in text
            page.wait_for_selector("canvas, svg.marks", timeout=30_000)  # the plots drew
            page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)
            browser.close()
    finally:
        app.stop()
    assert (tmp_path / "admin.png").stat().st_size > 10_000


def test_a_throttled_login_shows_the_servers_message(tmp_path):
    pytest.importorskip("playwright")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    url = f"sqlite:///{tmp_path}/throttle.db"
    _, factory = open_db(url)
    with factory.begin() as s:
        add_user(s, "ann", "ann-password")
    app = AppServer(url, tmp_path / "app.log", demo=True, data_dir=tmp_path / "data",
                    extra_args=["--login-max-failures", "2", "--login-lockout", "60"]).start()  # fmt: skip
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            page.goto(app.url)
            page.get_by_label("username").wait_for(timeout=30_000)
            assert "pause for 60 s" in page.inner_text("body")  # the login page says the rule
            for attempt in range(3):
                page.get_by_label("username").fill("ann")
                page.get_by_label("password").fill(f"wrong-{attempt}")
                page.get_by_role("button", name="Login").click()
                page.wait_for_timeout(700)
            notice = page.wait_for_selector("#sp-login-notice", timeout=10_000)
            assert "Too many failed logins" in notice.inner_text() and "Try again in" in notice.inner_text()
            browser.close()
    finally:
        app.stop()


@pytest.fixture
def rank_server(tmp_path):
    """A rank project (K = 3, span marks on): three stories per item, one of them made of XSS payloads."""
    app, factory = _serve(tmp_path, lambda i: [XSS, f"A calm scene {i}. It rests.", f"A blue dog {i} runs. The dog naps."], "rank",
                          {"mode": "rank", "rank_k": 3, "span_marks": True})  # fmt: skip
    yield app, factory
    app.stop()


def test_rank_by_keyboard_and_mark_a_span_with_xss_inert(rank_server, tmp_path):
    """Rank three stories from the keyboard (with a tie), then mark words as hallucinated and rank by
    clicking; the database holds both rankings as given and the mark's offsets; no payload runs."""
    from playwright.sync_api import sync_playwright

    from db import Candidate

    app, factory = rank_server

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = login(browser, app.url, "ann", "ann-password")
        page.wait_for_selector(".sp-compare.sp-rank")
        assert page.locator(".sp-rank th").count() == 4  # the frame column and stories A, B, C
        assert "<script>window.__xss = 1</script>" in page.inner_text("#sp-compare") and page.evaluate("window.__xss") is None
        page.screenshot(path=str(tmp_path / "ranking.png"), full_page=True)

        # Keyboard: B best, C tied with it (=), then A.
        page.locator("body").click(position={"x": 5, "y": 5})
        for key in ["2", "=", "3", "1"]:
            page.keyboard.press(key)
            page.wait_for_timeout(150)
        checked = page.evaluate("[0, 1, 2].map(i => (document.querySelector(`#sp-rank-${i} input:checked`) || {}).value)")
        assert checked == ["3", "1", "1"]
        page.keyboard.press("Enter")
        first = wait_votes(page, factory, 1)[0]
        assert first.ranking["ranks"] == [2, 1, 1] and not first.ranking["all_bad"]

        # A span mark: select the first two words of story A (a range, as a mouse drag makes), press h.
        page.wait_for_function("document.querySelectorAll('#sp-rank-0 input:checked').length === 0", timeout=20_000)
        page.wait_for_timeout(300)
        words = page.evaluate("""() => {
            const ws = [...document.querySelectorAll('#sp-compare [data-p="0"] .sp-w')].slice(0, 2);
            const r = document.createRange(); r.setStartBefore(ws[0]); r.setEndAfter(ws[1]);
            const sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(r);
            return ws.map(w => [w.textContent, +w.dataset.s, +w.dataset.e]);
        }""")
        page.keyboard.press("h")
        page.wait_for_selector("#sp-marks-list li")
        assert "wrong in the picture" in page.inner_text("#sp-marks-list")
        assert page.locator("#sp-compare .sp-marked-hallucinated").count() == 2
        for i, rank in ((0, "3"), (1, "2"), (2, "1")):  # clicks this time
            page.locator(f"#sp-rank-{i} input[value='{rank}']").check()
        page.click("#sp-rank-submit")
        second = wait_votes(page, factory, 2)[1]
        assert second.ranking["ranks"] == [3, 2, 1] and len(second.spans) == 1
        mark = second.spans[0]
        with factory() as s:
            text = s.get(Candidate, mark["candidate_id"]).text
        assert mark["candidate_id"] == second.ranking["shown"][0] and mark["label"] == "hallucinated"
        assert (mark["start"], mark["end"]) == (words[0][1], words[1][2]) and mark["text"] == text[mark["start"]:mark["end"]]
        assert mark["text"].startswith(words[0][0]) and mark["text"].endswith(words[1][0])
        assert page.evaluate("window.__xss") is None  # marked payload words stay text too
        browser.close()

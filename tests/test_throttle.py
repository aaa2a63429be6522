"""Login throttling: the bookkeeping by hand, then a burst of wrong passwords against the running app."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from annotate.throttle import LoginThrottle


def test_failures_within_the_window_pause_the_name_and_the_address():
    t = LoginThrottle(max_failures=3, window_s=60, lockout_s=300)
    for now in (0, 10, 20):
        assert t.wait("Ann", "1.2.3.4", now) == 0
        t.record("Ann", "1.2.3.4", success=False, now=now)
    assert t.wait("ann", "9.9.9.9", 21) == pytest.approx(299)  # the name, from anywhere, case-insensitively
    assert t.wait("bob", "1.2.3.4", 21) == pytest.approx(299)  # the address, for any name
    assert t.wait("bob", "9.9.9.9", 21) == 0  # others are unaffected
    assert t.wait("ann", "9.9.9.9", 320) == 0  # and the pause ends


def test_failures_outside_the_window_do_not_add_up():
    t = LoginThrottle(max_failures=3, window_s=60, lockout_s=300)
    for now in (0, 50, 111, 170):  # never 3 within 60 s
        t.record("ann", "1.2.3.4", success=False, now=now)
        assert t.wait("ann", "1.2.3.4", now) == 0


def test_a_success_clears_the_name_but_not_the_address():
    t = LoginThrottle(max_failures=3, window_s=60, lockout_s=300)
    for now in (0, 1):
        t.record("ann", "1.2.3.4", success=False, now=now)
    t.record("ann", "1.2.3.4", success=True, now=2)
    t.record("ann", "5.6.7.8", success=False, now=3)  # the name's count restarted: 1 of 3
    assert t.wait("ann", "5.6.7.8", 3) == 0
    t.record("eve", "1.2.3.4", success=False, now=4)  # the address's count did not: 3 of 3
    assert t.wait("zed", "1.2.3.4", 4) == pytest.approx(300)
    for now in range(10, 20):  # successes never count against anyone
        t.record("bob", "7.7.7.7", success=True, now=now)
    assert t.wait("bob", "7.7.7.7", 20) == 0


def test_memory_is_bounded():
    t = LoginThrottle(max_failures=5, window_s=60, lockout_s=300, max_keys=100)
    for i in range(1000):
        t.record(f"user{i}", f"10.0.{i // 256}.{i % 256}", success=False, now=i * 0.001)
    assert len(t._failures) <= 100


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_failures"):
        LoginThrottle(max_failures=0)


def _login(url: str, name: str, password: str) -> tuple[int, dict, dict]:
    data = urllib.parse.urlencode({"username": name, "password": password}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/login", data=data), timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


def test_a_burst_of_wrong_passwords_is_refused_and_the_right_one_works_after_the_wait(tmp_path):
    from annotate.users import add_user
    from db import open_db
    from tests.server import AppServer

    url = f"sqlite:///{tmp_path}/app.db"
    _, factory = open_db(url)
    with factory.begin() as s:
        add_user(s, "ann", "right-password")
        add_user(s, "bob", "bob-password")
    from annotate.ingest import ingest
    from storyworld import make_world

    make_world(tmp_path / "w", 4, seed=1)
    ingest(factory, str(tmp_path / "w" / "items.jsonl"), "p", media_root=tmp_path / "media")
    server = AppServer(url, tmp_path / "app.log", project="p",
                       extra_args=["--login-max-failures", "3", "--login-window", "60", "--login-lockout", "4"]).start()  # fmt: skip
    try:
        with urllib.request.urlopen(server.url + "/", timeout=10) as r:  # the login page carries the notice script
            assert b"sp-login-notice" in r.read()
        for _ in range(5):  # successful logins are never throttled
            assert _login(server.url, "bob", "bob-password")[0] == 200
        codes = [_login(server.url, "ann", f"wrong-{i}")[0] for i in range(6)]  # a bounded burst
        assert codes[:3] == [400, 400, 400] and set(codes[3:]) == {429}, codes
        status, headers, body = _login(server.url, "ann", "right-password")  # refused too while paused
        assert status == 429 and "Try again in" in body["detail"] and int(headers["retry-after"]) >= 1
        time.sleep(4.5)
        assert _login(server.url, "ann", "right-password")[0] == 200
    finally:
        server.stop()

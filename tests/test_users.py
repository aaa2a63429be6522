"""annotate.users and annotate.auth: hashed passwords, the CLI, disable/enable/passwd."""

import io

import pytest
from sqlalchemy import select

from annotate.auth import authenticate, hash_password, verify_password
from annotate.users import UserError, add_user, main
from db import Annotator, open_db


def test_hash_is_salted_scrypt_and_verifies():
    h1, h2 = hash_password("correct horse"), hash_password("correct horse")
    assert h1.startswith("scrypt$") and h1 != h2 and "correct horse" not in h1  # salted, never plain
    assert verify_password("correct horse", h1) and not verify_password("wrong horse", h1)
    assert not verify_password("x", None) and not verify_password("x", "md5$abc")
    with pytest.raises(ValueError, match="at least 8"):
        hash_password("short")


def test_cli_add_list_disable_enable_passwd(sqlite_url, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("first-password\n"))
    assert main(["--db", sqlite_url, "add", "alice", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("boss-password\n"))
    assert main(["add", "boss", "--admin", "--password-stdin", "--db", sqlite_url]) == 0  # --db after the command too
    out = capsys.readouterr().out
    assert "added annotator 'alice'" in out and "added admin 'boss'" in out and "password" not in out.replace("--password", "")
    _, factory = open_db(sqlite_url)
    with factory() as s:
        stored = s.scalar(select(Annotator.password_hash).where(Annotator.username == "alice"))
        assert "first-password" not in stored and authenticate(s, "alice", "first-password").role == "annotator"
    assert main(["--db", sqlite_url, "disable", "alice"]) == 0
    with factory() as s:
        assert authenticate(s, "alice", "first-password") is None  # disabled: no login
    assert main(["--db", sqlite_url, "enable", "alice"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("second-password\n"))
    assert main(["--db", sqlite_url, "passwd", "alice", "--password-stdin"]) == 0
    with factory() as s:
        assert authenticate(s, "alice", "second-password") and authenticate(s, "alice", "first-password") is None
    capsys.readouterr()
    assert main(["--db", sqlite_url, "list"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "admin" in listing and "second-password" not in listing


def test_cli_errors(sqlite_url, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("a-password\n"))
    assert main(["--db", sqlite_url, "add", "bob", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("b-password\n"))
    assert main(["--db", sqlite_url, "add", "bob", "--password-stdin"]) == 1
    assert "exists; use `passwd`" in capsys.readouterr().err
    assert main(["--db", sqlite_url, "disable", "nobody"]) == 1
    assert "no user named 'nobody'" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["--db", sqlite_url, "add", "carol", "--password-stdin"]) == 1
    assert "at least 8" in capsys.readouterr().err


def test_imported_annotator_becomes_a_login(sqlite_url):
    _, factory = open_db(sqlite_url)
    with factory.begin() as s:
        s.add(Annotator(username="imported-ann", password_hash=None))
    with factory.begin() as s:
        with pytest.raises(UserError, match="bad username"):
            add_user(s, "has space", "a-password")
        user = add_user(s, "imported-ann", "now-a-password")
        assert user.password_hash and user.active
    with factory() as s:
        assert authenticate(s, "imported-ann", "now-a-password") is not None


def test_cli_assign_and_unassign(tmp_path, monkeypatch, capsys):
    from annotate.ingest import ingest
    from annotate.users import may_label, visible_projects
    from db import Project
    from storyworld import make_world

    url = f"sqlite:///{tmp_path}/a.db"
    _, factory = open_db(url)
    make_world(tmp_path / "w", 2, seed=1, frames=(1, 1), image_size=(32, 32))
    for name in ("p1", "p2"):
        ingest(factory, str(tmp_path / "w" / "items.jsonl"), name, media_root=tmp_path / "m")
    with factory.begin() as s:
        add_user(s, "ann", "ann-password")
        add_user(s, "bob", "bob-password")
    capsys.readouterr()
    assert main(["--db", url, "assign", "ann", "p1", "p2"]) == 0
    out = capsys.readouterr().out
    assert "'ann' added to 'p1' (members: ann)" in out and "'ann' added to 'p2'" in out
    assert main(["--db", url, "assign", "ann", "p1"]) == 0 and "already a member" in capsys.readouterr().out
    with factory() as s:
        bob = s.scalar(select(Annotator).where(Annotator.username == "bob"))
        assert visible_projects(s, bob) == [] and not may_label(s, bob, s.scalar(select(Project).where(Project.name == "p1")))
    assert main(["--db", url, "unassign", "ann", "p2"]) == 0
    assert "no members: open to every annotator" in capsys.readouterr().out
    with factory() as s:
        bob = s.scalar(select(Annotator).where(Annotator.username == "bob"))
        assert [p.name for p in visible_projects(s, bob)] == ["p2"]
    assert main(["--db", url, "list"]) == 0
    listing = capsys.readouterr().out
    assert "ann" in listing and "p1, p2" in listing.split("ann", 1)[1].splitlines()[0]
    assert main(["--db", url, "assign", "ann", "p9"]) == 1 and "no project named 'p9' (projects: p1, p2)" in capsys.readouterr().err
    assert main(["--db", url, "assign", "zed", "p1"]) == 1 and "no user named 'zed'" in capsys.readouterr().err

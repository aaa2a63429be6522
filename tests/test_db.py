"""The data layer: schema version checks, SQLite pragmas, constraints and the indexes the app needs."""

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from db import (
    SCHEMA_VERSION,
    Annotator,
    Candidate,
    Comparison,
    Item,
    Meta,
    Project,
    SchemaVersionError,
    Vote,
    make_engine,
    open_db,
)


def _seed(s):
    project = Project(name="p")
    item = Item(project=project, external_id="x", instruction="Tell a story.")
    c1, c2 = Candidate(item=item, text="one", text_sha256="1"), Candidate(item=item, text="two", text_sha256="2")
    user = Annotator(username="ann", password_hash=None)
    s.add_all([project, item, c1, c2, user])
    s.flush()
    comp = Comparison(project_id=project.id, item_id=item.id, candidate_a_id=c1.id, candidate_b_id=c2.id)
    s.add(comp)
    s.flush()
    return comp, user


def test_fresh_database_records_schema_version(db_url):
    engine, factory = open_db(db_url)
    with factory() as s:
        assert s.scalar(select(Meta.value).where(Meta.key == "schema_version")) == str(SCHEMA_VERSION)
    indexes = {ix["name"] for t in ("comparison", "vote") for ix in inspect(engine).get_indexes(t)}
    assert {"ix_comparison_pending", "uq_vote_active", "ix_vote_annotator"} <= indexes
    engine.dispose()
    open_db(db_url)[0].dispose()  # re-opening a good database works


@pytest.mark.parametrize("version, hint", [(SCHEMA_VERSION + 1, "Upgrade storypref"), (0, "Export it")])
def test_other_schema_version_is_refused(db_url, version, hint):
    engine, factory = open_db(db_url)
    with factory.begin() as s:
        s.get(Meta, "schema_version").value = str(version)
    engine.dispose()
    with pytest.raises(SchemaVersionError, match=f"schema version {version}.*{hint}"):
        open_db(db_url)


def test_foreign_database_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/other.db"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE users (id INTEGER)"))
    with pytest.raises(SchemaVersionError, match="not a storypref database"):
        open_db(url)


def test_sqlite_pragmas(sqlite_url):
    engine, _ = open_db(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_one_active_vote_per_comparison_and_annotator(db_url):
    engine, factory = open_db(db_url)
    with factory.begin() as s:
        comp, user = _seed(s)
        first = Vote(comparison_id=comp.id, annotator_id=user.id, choice="a", shown_left="a", client_token="t1")
        s.add(first)
        s.flush()
        # An edit supersedes: the old row stays, inactive, pointing at its replacement.
        second = Vote(comparison_id=comp.id, annotator_id=user.id, choice="b", shown_left="b", client_token="t2")
        first.active = False
        s.add(second)
        s.flush()
        first.superseded_by_id = second.id
        # A position-swapped repeat may sit beside the active vote.
        s.add(Vote(comparison_id=comp.id, annotator_id=user.id, choice="b", shown_left="a", client_token="t3", is_repeat=True))
    with pytest.raises(IntegrityError):
        with factory.begin() as s:
            s.add(Vote(comparison_id=comp.id, annotator_id=user.id, choice="tie", shown_left="a", client_token="t4"))
    with pytest.raises(IntegrityError):  # the same client token twice is one vote
        with factory.begin() as s:
            s.add(Vote(comparison_id=comp.id, annotator_id=user.id, choice="tie", shown_left="a", client_token="t2", active=False))
    with factory() as s:
        assert s.scalar(select(Vote).where(Vote.client_token == "t1")).superseded_by_id is not None
        assert len(s.scalars(select(Vote)).all()) == 3
    engine.dispose()


@pytest.mark.parametrize(
    "field, value", [("choice", "maybe"), ("shown_left", "c"), ("strength", 5)]
)
def test_vote_check_constraints(db_url, field, value):
    engine, factory = open_db(db_url)
    with factory.begin() as s:
        comp, user = _seed(s)
    kwargs = dict(comparison_id=comp.id, annotator_id=user.id, choice="a", shown_left="a", client_token="t")
    kwargs[field] = value
    with pytest.raises(IntegrityError):
        with factory.begin() as s:
            s.add(Vote(**kwargs))
    engine.dispose()


def test_comparison_must_be_canonical_and_foreign_keys_hold(db_url):
    engine, factory = open_db(db_url)
    with factory.begin() as s:
        comp, _ = _seed(s)
    with pytest.raises(IntegrityError):
        with factory.begin() as s:
            s.add(Comparison(project_id=comp.project_id, item_id=comp.item_id, candidate_a_id=comp.candidate_b_id,
                             candidate_b_id=comp.candidate_a_id))  # fmt: skip
    with pytest.raises(IntegrityError):
        with factory.begin() as s:
            s.add(Vote(comparison_id=999, annotator_id=999, choice="a", shown_left="a", client_token="x"))
    engine.dispose()


NEW_IN_2 = {"project": ["mode", "rank_k", "span_marks"], "comparison": ["candidate_ids", "gold_ranks"], "vote": ["ranking", "spans"]}


def test_version_1_database_is_upgraded_in_place(db_url):
    """A database made before rank mode and span marks (schema 1) opens: the new columns are added, its
    rows keep their data and get the defaults, and the new fields can be written."""
    engine, factory = open_db(db_url)
    with factory.begin() as s:
        comp, user = _seed(s)
        s.add(Vote(comparison_id=comp.id, annotator_id=user.id, choice="a", shown_left="a", client_token="t1"))
        s.get(Meta, "schema_version").value = "1"
    with engine.begin() as conn:  # what schema 1 lacked
        for table, columns in NEW_IN_2.items():
            for column in columns:
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
    engine.dispose()

    engine, factory = open_db(db_url)
    for table, columns in NEW_IN_2.items():
        assert set(columns) <= {c["name"] for c in inspect(engine).get_columns(table)}
    with factory.begin() as s:
        assert s.get(Meta, "schema_version").value == str(SCHEMA_VERSION)
        project, vote = s.scalar(select(Project)), s.scalar(select(Vote))
        assert (project.mode, project.rank_k, project.span_marks) == ("pairwise", 4, False)
        assert (vote.choice, vote.ranking, vote.spans) == ("a", None, None)
        vote.spans = [{"candidate_id": 1, "start": 0, "end": 3, "label": "other", "text": "one"}]
        project.mode = "rank"
    with factory() as s:
        assert s.scalar(select(Vote)).spans[0]["end"] == 3 and s.scalar(select(Project)).mode == "rank"
    engine.dispose()

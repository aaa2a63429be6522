"""Engines, sessions and the schema version.

`make_engine(url)` accepts any SQLAlchemy URL. For SQLite it turns on WAL, foreign keys, a busy
timeout and full fsync on commit (an acknowledged vote must survive a crash), and it starts write
transactions with `BEGIN IMMEDIATE` so concurrent writers queue on the busy timeout instead of
failing on a lock upgrade. `open_db(url)` is what every command calls: it creates a fresh schema, or
checks an existing one and refuses a database whose schema version is not ours.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from db.models import Base, Meta

DEFAULT_URL = "sqlite:///data/storypref.db"
DEFAULT_MEDIA_ROOT = "data/media"
SCHEMA_VERSION = 2
# Versions this storypref upgrades in place on open, and what each upgrade adds.
UPGRADES = {1: "rank mode and span marks: project.mode/rank_k/span_marks, comparison.candidate_ids/gold_ranks, vote.ranking/spans"}
SQLITE_BUSY_TIMEOUT_MS = 30_000


class SchemaVersionError(RuntimeError):
    """The database was made by another version of storypref (or is not a storypref database)."""


def default_url() -> str:
    return os.environ.get("STORYPREF_DB", DEFAULT_URL)


def make_engine(url: str | None = None, *, echo: bool = False) -> Engine:
    """Create an engine for `url` (default: $STORYPREF_DB or sqlite:///data/storypref.db).

    >>> make_engine("sqlite://").dialect.name
    'sqlite'
    """
    url = url or default_url()
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, echo=echo, pool_pre_ping=True)

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):
        # Let SQLAlchemy, not the driver, decide when transactions begin (see the "begin" hook).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        # IMMEDIATE takes the write lock up front; readers are never blocked under WAL.
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'IMMEDIATE')}")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def read_session_factory(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Sessions for reads only. On SQLite they begin DEFERRED, so under WAL they neither wait for
    nor block writers; elsewhere they are ordinary sessions."""
    engine = session_factory.kw["bind"]
    return sessionmaker(engine.execution_options(sqlite_begin="DEFERRED"), expire_on_commit=False)


def check_schema(engine: Engine) -> None:
    """Raise SchemaVersionError unless `engine` holds storypref schema version SCHEMA_VERSION."""
    url = engine.url.render_as_string(hide_password=True)
    tables = set(inspect(engine).get_table_names())
    if Meta.__tablename__ not in tables:
        raise SchemaVersionError(
            f"{url} has tables ({', '.join(sorted(tables))}) but no {Meta.__tablename__} table, so it is "
            "not a storypref database. Point --db at an empty or storypref database."
        )
    with Session(engine) as s:
        found = s.scalar(select(Meta.value).where(Meta.key == "schema_version"))
    if found is not None and int(found) in UPGRADES:
        return  # init_db upgrades it
    if found is None or int(found) != SCHEMA_VERSION:
        newer = found is not None and int(found) > SCHEMA_VERSION
        raise SchemaVersionError(
            f"{url} has storypref schema version {found}, but this storypref uses version {SCHEMA_VERSION}. "
            + (
                "Upgrade storypref to open it."
                if newer
                else "Export it with the storypref version that made it, then ingest into a new database."
            )
        )


def init_db(engine: Engine) -> None:
    """Create the schema in an empty database, or check the version of an existing one."""
    tables = set(inspect(engine).get_table_names())
    if not tables:
        Base.metadata.create_all(engine)
        with Session(engine) as s, s.begin():
            s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
        return
    check_schema(engine)
    upgrade(engine)
    # Same version, possibly from a build that lacked a table we added since: create what is missing.
    Base.metadata.create_all(engine, checkfirst=True)


def _add_column_sql(engine: Engine, table, column) -> str:
    sql = f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(engine.dialect)}"
    default = column.server_default
    if default is not None:
        arg = default.arg
        literal = f"'{arg}'" if isinstance(arg, str) and not arg.isdigit() else arg
        if not isinstance(literal, str):
            literal = str(arg.compile(dialect=engine.dialect))
        sql += f" DEFAULT {literal}" + ("" if column.nullable else " NOT NULL")
    return sql


def upgrade(engine: Engine) -> list[int]:
    """Bring an older storypref database up to SCHEMA_VERSION in place, in one transaction: the
    columns added since (all nullable or with a default, so every row stays valid) and the version.
    Returns the versions it upgraded from (empty when it was current)."""
    with Session(engine) as s:
        found = int(s.scalar(select(Meta.value).where(Meta.key == "schema_version")) or SCHEMA_VERSION)
    if found >= SCHEMA_VERSION:
        return []
    with engine.begin() as conn:
        inspector = inspect(conn)  # on this connection: another one would wait on this transaction's lock
        for table in Base.metadata.sorted_tables:
            if not inspector.has_table(table.name):
                continue  # create_all makes it whole
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have:
                    conn.exec_driver_sql(_add_column_sql(engine, table, column))
        conn.execute(Meta.__table__.update().where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION)))
    return list(range(found, SCHEMA_VERSION))


def open_db(url: str | None = None) -> tuple[Engine, sessionmaker[Session]]:
    """Engine and session factory for `url`, with the schema created or checked."""
    engine = make_engine(url)
    init_db(engine)
    return engine, make_session_factory(engine)


def get_meta(session: Session, key: str) -> str | None:
    return session.scalar(select(Meta.value).where(Meta.key == key))


def set_meta(session: Session, key: str, value: str) -> None:
    row = session.get(Meta, key)
    if row is None:
        session.add(Meta(key=key, value=value))
    else:
        row.value = value

"""Shared fixtures: databases (SQLite always, PostgreSQL when reachable) and small image sources."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import text

from db import Base, make_engine, make_session_factory, open_db

PG_URL = os.environ.get("STORYPREF_TEST_PG_URL", "postgresql+psycopg://storypref:storypref@127.0.0.1:5432/storypref_test")


def _postgres_reachable() -> bool:
    try:
        engine = make_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


_PG = None


def pg_available() -> bool:
    global _PG
    if _PG is None:
        _PG = _postgres_reachable()
    return _PG


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database URL: SQLite in tmp_path, and PostgreSQL where a server is reachable."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/test.db"
    return fresh_postgres_url()


def fresh_postgres_url() -> str:
    """The test PostgreSQL, emptied; skips the test where no server is reachable."""
    if not pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_URL} (set STORYPREF_TEST_PG_URL)")
    engine = make_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return PG_URL


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/test.db"


@pytest.fixture
def session_factory(db_url):
    engine, factory = open_db(db_url)
    yield factory
    engine.dispose()


def make_image(path: Path, color=(200, 30, 30), size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def items_source(tmp_path) -> Path:
    """A JSONL source of 3 items (1, 2 and 3 frames) with 3 candidates each, images beside it."""
    src = tmp_path / "src"
    lines = []
    for i in range(3):
        frames = [make_image(src / "img" / f"item{i}_{f}.png", (40 * i, 60 * f, 90)) for f in range(i + 1)]
        lines.append(
            {
                "external_id": f"item-{i}",
                "image_paths": [str(p.relative_to(src)) for p in frames],
                "instruction": f"Tell a story about scene {i}.",
                "style": "calm" if i else None,
                "candidates": [{"text": f"Story {k} for scene {i}.", "origin": f"model-{k}"} for k in range(3)],
            }
        )
    path = src / "items.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def count_rows(session_factory) -> dict[str, int]:
    with session_factory() as s:
        return {t.name: s.execute(text(f"SELECT COUNT(*) FROM {t.name}")).scalar_one() for t in Base.metadata.sorted_tables}


__all__ = ["count_rows", "make_image", "make_session_factory"]


@pytest.fixture
def fresh_accelerate_state():
    """Each training run builds its own Accelerator; an earlier one (ours or TRL's) leaves its state behind."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield

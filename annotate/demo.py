"""First-run setup for the labeling app: the storyworld demo project and the first admin account.

`seed_demo` renders a small storyworld (see `storyworld.make_demo`) and ingests it as a project
that shows every feature: multi-frame items, grounding tags, strength, aspects, gold and
position-swapped repeats. `ensure_admin` creates an `admin` account with a random password when
the database has no account that can log in; the caller prints that password once.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from annotate.auth import random_password
from annotate.ingest import ingest
from annotate.users import add_user
from db import ASPECTS, Annotator, Item

DEMO_PROJECT = "storyworld-demo"
DEMO_GUIDELINES = """\
**Which story is better for these images?**

Read both stories next to the frames they describe, then pick the one a reader would prefer.

- **Grounding**: does the story describe what is in the pictures (colors, shapes, place, time)?
  Anything invented, or the wrong color or shape, is a serious flaw.
- **Coherence**: does each character keep its name and look from frame to frame?
- **Style**: does it read in the asked style (adventurous, funny, spooky or calm)?
- **Fluency**: is it free of repeated sentences, and neither a bare caption nor padded?

Choose **Tie** when neither is better, and **Both bad** when neither is acceptable. Use **Skip**
when you cannot judge. Keys: `1` A, `2` B, `0` tie, `x` both bad, `s` skip, `u` undo.
"""


def seed_demo(session_factory, data_dir: str | Path, n_items: int = 50, media_root: str | Path | None = None) -> str:
    """Create the demo project if the database has no items. Returns the project name."""
    from storyworld import make_demo

    with session_factory() as s:
        if s.scalar(select(func.count(Item.id))):
            return DEMO_PROJECT
    items = make_demo(Path(data_dir) / "demo-world", n_items=n_items)
    ingest(
        session_factory,
        str(items),
        DEMO_PROJECT,
        media_root=media_root,
        project_settings={
            "guidelines": DEMO_GUIDELINES,
            "overlap": 3,
            "aspects": list(ASPECTS),
            "ask_strength": True,
            "gold_rate": 0.1,
            "repeat_rate": 0.05,
        },
    )
    return DEMO_PROJECT


def ensure_admin(session_factory) -> str | None:
    """If no account can log in, create `admin` with a random password and return that password."""
    with session_factory.begin() as s:
        if s.scalar(select(func.count(Annotator.id)).where(Annotator.password_hash.is_not(None), Annotator.active)):
            return None
        password = random_password()
        add_user(s, "admin", password, admin=True)
        return password

"""First-run setup for the labeling app: the storyworld demo project and the first admin account.

`seed_demo` renders a small storyworld (see `storyworld.make_demo`) and ingests it as a project
that shows every feature: multi-frame items, grounding tags, strength, aspects, gold and
position-swapped repeats. It also imports a few hundred votes from storyworld's simulated
annotators, under their own accounts (`demo-sim1`, `demo-sim2-leftbias`, ...), which have no
password and cannot log in. So the Admin tab shows agreement, a leaderboard and plots at once; the
votes fill two of each item's six comparisons, and the rest wait for real annotators.
`ensure_admin` creates an `admin` account with a random password when
the database has no account that can log in; the caller prints that password once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sqlalchemy import func, select

from annotate.auth import random_password
from annotate.ingest import get_or_create_project, read_source, write_records, write_transaction
from annotate.users import add_user
from db import ASPECTS, Annotator, Item

DEMO_PROJECT = "storyworld-demo"
DEMO_VOTER_PREFIX = "demo-"  # the simulated annotators' accounts: demo-sim1, demo-sim2-leftbias, ...
DEMO_SETTINGS = {"overlap": 3, "aspects": list(ASPECTS), "ask_strength": True, "gold_rate": 0.1, "repeat_rate": 0.05}
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


def seed_demo(
    session_factory, data_dir: str | Path, n_items: int = 50, media_root: str | Path | None = None, simulated_votes: bool = True
) -> str:
    """Create the demo project if the database has no items. Returns the project name.

    With `simulated_votes`, storyworld's five simulated annotators (one with a left bias, one
    careless) vote 3 times on 2 comparisons per item: 300 votes for the default 50 items. Items
    and votes go in in one transaction, so a failure leaves the database empty, as it was.
    """
    from storyworld import annotate_world, default_pool, make_demo

    with session_factory() as s:
        if s.scalar(select(func.count(Item.id))):
            return DEMO_PROJECT
    world = Path(data_dir) / "demo-world"
    items = make_demo(world, n_items=n_items)
    _, records = read_source(str(items), "jsonl")
    if simulated_votes:
        pool = [replace(a, name=DEMO_VOTER_PREFIX + a.name) for a in default_pool(5)]
        annotate_world(world, world / "demo-votes.jsonl", pairs_per_item=2, votes_per_pair=3, pool=pool)
        _, votes = read_source(str(world / "demo-votes.jsonl"), "pairs")
    with write_transaction(session_factory, media_root) as (session, root, created):
        project = get_or_create_project(session, DEMO_PROJECT, guidelines=DEMO_GUIDELINES, **DEMO_SETTINGS)
        write_records(session, project, records, source=items.name, media_root=root, created_files=created)
        if simulated_votes:  # the same source name: the votes land on the items and candidates just written
            write_records(session, project, votes, source=items.name, media_root=root, created_files=created)
    return DEMO_PROJECT


def ensure_admin(session_factory) -> str | None:
    """If no account can log in, create `admin` with a random password and return that password."""
    with session_factory.begin() as s:
        if s.scalar(select(func.count(Annotator.id)).where(Annotator.password_hash.is_not(None), Annotator.active)):
            return None
        password = random_password()
        add_user(s, "admin", password, admin=True)
        return password

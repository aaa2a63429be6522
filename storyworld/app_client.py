"""Simulated annotators that label through the running labeling app, as real clients.

    python -m storyworld annotate --world DIR --app URL --users FILE [--votes-per-user 50]

Each account in FILE (`name:password` per line) logs in with `gradio_client` and is paired with
a simulated annotator of the default pool. It reads the two stories from the page it is served,
looks up their hidden utility in the world, and answers through the same endpoints the buttons
use. Stories the world does not know (not from this world) are skipped. This load-tests the app
with realistic answers, and fills a demo database with plausible votes. It talks to the app only
over HTTP and imports nothing else of storypref.
"""

from __future__ import annotations

import html
import random
import re
import threading
from pathlib import Path

from storyworld.annotators import default_pool
from storyworld.utility import strip_tags
from storyworld.world import read_world

_CELL = re.compile(r'<td class="sp-story">(.*?)</td>', re.S)
_TAG = re.compile(r"<[^>]+>")
_PLACEHOLDER = "(nothing for this frame)"


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", strip_tags(text)).strip()


def stories_on_page(compare_html: str) -> tuple[str, str]:
    """The left and right story as plain text, read back from the comparison table."""
    cells = [html.unescape(_TAG.sub("", c)).replace(_PLACEHOLDER, "") for c in _CELL.findall(compare_html)]
    return _normalize(" ".join(cells[0::2])), _normalize(" ".join(cells[1::2]))


def read_users(path: str | Path) -> list[tuple[str, str]]:
    users = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            name, sep, password = line.partition(":")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected name:password")
            users.append((name.strip(), password.strip()))
    return users


def annotate_app(world_dir: str | Path, app_url: str, users_file: str | Path, votes_per_user: int = 50, seed: int = 0) -> dict:
    """Vote through the app with every account in `users_file`, concurrently. Returns counts."""
    from gradio_client import Client

    utilities = {_normalize(c["text"]): c["utility"] for item in read_world(world_dir) for c in item["candidates"]}
    users = read_users(users_file)
    pool = default_pool(max(len(users), 1))
    counts: dict[str, dict[str, int]] = {}
    errors: list[str] = []

    def run(index: int, name: str, password: str) -> None:
        sim, rng = pool[index % len(pool)], random.Random(f"{seed}:{name}")
        tally = counts.setdefault(name, {"votes": 0, "skipped": 0})
        try:
            client = Client(app_url, auth=(name, password), verbose=False)
            out = client.predict(False, api_name="/load")
            while tally["votes"] < votes_per_user and out[0]:
                left, right = stories_on_page(out[3])
                if left not in utilities or right not in utilities:
                    tally["skipped"] += 1
                    out = client.predict(False, api_name="/skip")
                    continue
                answer = {"left": "left", "right": "right", "tie": "tie"}[sim.choose(utilities[left], utilities[right], rng)]
                out = client.predict(out[0], None, None, None, None, None, "", False, api_name=f"/vote_{answer}")
                tally["votes"] += 1
        except Exception as e:  # noqa: BLE001 - reported to the caller
            errors.append(f"{name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i, n, p)) for i, (n, p) in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"votes": sum(c["votes"] for c in counts.values()), "per_user": counts, "errors": errors}

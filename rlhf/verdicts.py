"""Set the reward model's and CLIPScore's verdicts beside the annotators', in the app's Admin tab.

    python -m rlhf.verdicts --project demo --reward_model runs/rm --clip_model ViT-B-32 [--db URL]

Every candidate of the project's voted comparisons (all comparisons with `--all`) is scored once by
each signal: `human` (a reward model from `rlhf.train_rm`) and `clip` (CLIPScore per frame and
sentence, `rlhf.clip.clip_score`). The scores go into each item's meta, under `verdicts`, keyed by the
comparison's canonical candidate ids, in one transaction; running it again replaces them. The Admin
tab then shows, per comparison, which story each signal prefers next to the annotators' majority,
disagreements first, and how often each signal agrees: where a project lead finds what the model
has not learned, or what the people missed.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

from rlhf.loading import ModelLoadError


@dataclass
class VerdictsConfig:
    project: str = field(metadata={"help": "the project whose comparisons to score"})
    db: str = field(default=os.environ.get("STORYPREF_DB", "sqlite:///data/storypref.db"), metadata={"help": "SQLAlchemy URL (default: $STORYPREF_DB or sqlite:///data/storypref.db)"})
    reward_model: str | None = field(default=None, metadata={"help": "reward model dir (rlhf.train_rm) for the `human` verdict"})
    clip_model: str | None = field(default=None, metadata={"help": "open_clip name or local dir for the `clip` verdict (CLIPScore)"})
    clip_pretrained: str | None = field(default="laion2b_s34b_b79k", metadata={"help": "open_clip pretrained tag (ignored for a local dir)"})
    all: bool = field(default=False, metadata={"help": "score every comparison, not only the ones with votes"})
    batch_size: int = field(default=16, metadata={"help": "stories scored per call of each signal"})
    cache_dir: str | None = field(default=None, metadata={"help": "CLIP embedding cache (default: ~/.cache/storypref/clip)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda … (default: cuda if available)"})


def read_comparisons(session, project: str, everything: bool) -> tuple[list[tuple[int, int, int]], dict[int, tuple]]:
    """The project's comparisons to score, as (item id, candidate a, candidate b), with at least one
    active vote unless `everything`; and their candidates (see `read_candidates`)."""
    from sqlalchemy import select

    from db import Comparison, Project, Vote

    proj = session.scalar(select(Project).where(Project.name == project))
    if proj is None:
        names = ", ".join(session.scalars(select(Project.name))) or "none yet"
        raise ModelLoadError(f"no project {project!r} in the database (projects: {names}); pass one of them as --project")
    query = select(Comparison.item_id, Comparison.candidate_a_id, Comparison.candidate_b_id).where(Comparison.project_id == proj.id)
    if not everything:
        query = query.where(Comparison.id.in_(select(Vote.comparison_id).where(Vote.active)))
    comparisons = [tuple(row) for row in session.execute(query.order_by(Comparison.id))]
    return comparisons, read_candidates(session, {c for _, a, b in comparisons for c in (a, b)})


def read_candidates(session, ids) -> dict[int, tuple]:
    """Each candidate of `ids` as (item id, image paths, instruction, context, style, text)."""
    from pathlib import Path

    from sqlalchemy import select

    from db import Candidate, Item, get_meta

    root = Path(get_meta(session, "media_root") or ".")
    items: dict[int, Item] = {}
    candidates = {}
    for cand in session.scalars(select(Candidate).where(Candidate.id.in_(ids))):
        item = items.get(cand.item_id) or items.setdefault(cand.item_id, session.get(Item, cand.item_id))
        candidates[cand.id] = (item.id, [str(root / img.path) for img in item.images], item.instruction, item.context, item.style, cand.text)
    return candidates


def main(cfg: VerdictsConfig) -> dict:
    from tqdm import tqdm

    from db import Item, open_db, read_session_factory
    from rlhf.rewards import ClipReward, HumanReward

    # 1. The signals, refused before any work when none is named.
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    signals = {}
    if cfg.reward_model:
        signals["human"] = HumanReward(cfg.reward_model, device, cfg.cache_dir)
    if cfg.clip_model:
        signals["clip"] = ClipReward(cfg.clip_model, cfg.clip_pretrained, device, cfg.cache_dir)
    if not signals:
        raise ModelLoadError("name at least one verdict: --reward_model DIR (rlhf.train_rm) and/or --clip_model NAME_OR_DIR")
    # 2. The comparisons and their candidates, read without holding a lock (SQLite writers keep voting).
    _, factory = open_db(cfg.db)
    with read_session_factory(factory)() as session:
        comparisons, candidates = read_comparisons(session, cfg.project, cfg.all)
    # 3. Every candidate scored once by each signal, outside any transaction.
    order = sorted(candidates)
    scores: dict[str, dict[int, float]] = {name: {} for name in signals}
    for k in tqdm(range(0, len(order), cfg.batch_size), desc="verdicts", unit="batch"):
        ids = order[k : k + cfg.batch_size]
        _, images, instructions, contexts, styles, texts = zip(*(candidates[i] for i in ids))
        for name, signal in signals.items():
            for cand_id, value in zip(ids, signal(list(images), list(instructions), list(contexts), list(styles), list(texts)).tolist()):
                scores[name][cand_id] = round(value, 4)
    # 4. Into each item's meta in one short transaction, replacing earlier verdicts of the same comparisons.
    by_item: dict[int, dict] = {}
    for item_id, a, b in comparisons:
        by_item.setdefault(item_id, {})[f"{a}-{b}"] = {name: [scores[name][a], scores[name][b]] for name in signals}
    source = {"human": cfg.reward_model, "clip": cfg.clip_model, "date": time.strftime("%Y-%m-%d")}
    with factory.begin() as session:
        for item_id, verdicts in by_item.items():
            item = session.get(Item, item_id)
            item.meta = {**(item.meta or {}), "verdicts": {**(item.meta or {}).get("verdicts", {}), **verdicts}, "verdicts_from": source}
    summary = {"project": cfg.project, "comparisons": len(comparisons), "candidates": len(order), "signals": sorted(signals)}
    print(summary)
    return summary


def parse_args(argv: list[str] | None = None) -> VerdictsConfig:
    from trl import TrlParser

    (cfg,) = TrlParser(dataclass_types=[VerdictsConfig], description=__doc__.split("\n\n")[0]).parse_args_and_config(argv)
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

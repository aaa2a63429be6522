"""Active pair selection: score a project's open comparisons with reward models, so the labeling
app serves the most informative ones first.

    python -m rlhf.prioritize --project NAME --reward_model runs/rm [runs/rm-seed1 ...] [--strategy margin] [--db URL]
    python -m rlhf.prioritize --project NAME --clear          (back to fewest-votes-first)

Every open comparison of the project (not gold, still under its overlap) gets a priority in [0, 1],
written to the `comparison_priority` table in one transaction that replaces the project's earlier
priorities. The app's scheduler (`annotate.scheduler`, which never imports torch) then serves the
highest-priority comparison left under its overlap first; overlap, gold, repeats and "never twice
to one annotator" hold as before. Comparisons added later have no priority and wait until the
scored ones are done: run this again after `annotate.ingest` or `rlhf.generate` adds pairs, and
after each retrained reward model (score, label a batch, retrain, score again).

Strategies (`--strategy`), on p = σ(r_a − r_b), the Bradley–Terry probability that a beats b:
- `margin` (default): 1 − |2p − 1|, with p averaged over the models; highest where the model is least
  sure which story is better (uncertainty sampling, Lewis & Gale 1994).
- `disagreement` (two or more `--reward_model`): the spread (population standard deviation) of p
  over the models, ×2 so that it spans [0, 1]; highest where an ensemble (e.g. reward models trained
  with different seeds) disagrees (query by committee, Seung et al. 1992).
- `mixed`: the mean of the two (two or more models).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlhf.loading import ModelLoadError

STRATEGIES = ("margin", "disagreement", "mixed")


@dataclass
class PrioritizeConfig:
    project: str = field(metadata={"help": "the project whose open comparisons to score"})
    db: str = field(default=os.environ.get("STORYPREF_DB", "sqlite:///data/storypref.db"), metadata={"help": "SQLAlchemy URL (default: $STORYPREF_DB or sqlite:///data/storypref.db)"})
    reward_model: list[str] = field(default_factory=list, metadata={"help": "reward model dir(s) from rlhf.train_rm; list two or more after the flag for an ensemble"})
    strategy: str = field(default="margin", metadata={"help": "margin (uncertainty), disagreement (ensemble spread; 2+ models) or mixed", "choices": STRATEGIES})
    clear: bool = field(default=False, metadata={"help": "remove the project's priorities (the app goes back to fewest votes first) and exit"})
    batch_size: int = field(default=16, metadata={"help": "stories scored per call of a model"})
    cache_dir: str | None = field(default=None, metadata={"help": "CLIP embedding cache (default: ~/.cache/storypref/clip)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda … (default: cuda if available)"})


def priorities(margins: Sequence[Sequence[float]], strategy: str = "margin") -> list[float]:
    """Priority per comparison from each model's reward margins r_a − r_b (one list per model).

    >>> [round(x, 3) for x in priorities([[0.0, 1.0986123]])]  # log 3: p = 0.5 and 0.75
    [1.0, 0.5]
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if not margins or not margins[0]:
        return []
    if strategy != "margin" and len(margins) < 2:
        raise ValueError(f"--strategy {strategy} needs two or more --reward_model (an ensemble); with one, use margin")
    p = torch.sigmoid(torch.tensor(margins, dtype=torch.float64))  # models × comparisons
    margin = 1 - (2 * p.mean(0) - 1).abs()
    spread = 2 * p.std(0, unbiased=False)
    out = {"margin": margin, "disagreement": spread, "mixed": (margin + spread) / 2}[strategy]
    return out.tolist()


def read_open(session, project: str) -> tuple[int, list[tuple[int, int, int]]]:
    """The project's id and its open comparisons (not gold, under their overlap) as (id, a, b)."""
    from sqlalchemy import func, select

    from db import Comparison, Project

    proj = session.scalar(select(Project).where(Project.name == project))
    if proj is None:
        names = ", ".join(session.scalars(select(Project.name))) or "none yet"
        raise ModelLoadError(f"no project {project!r} in the database (projects: {names}); pass one of them as --project")
    rows = session.execute(
        select(Comparison.id, Comparison.candidate_a_id, Comparison.candidate_b_id)
        .where(Comparison.project_id == proj.id, ~Comparison.is_gold, Comparison.n_votes < func.coalesce(Comparison.overlap, proj.overlap))
        .order_by(Comparison.id)
    )  # fmt: skip
    return proj.id, [tuple(r) for r in rows]


def main(cfg: PrioritizeConfig) -> dict:
    from sqlalchemy import delete
    from tqdm import tqdm

    from db import ComparisonPriority, open_db, read_session_factory
    from rlhf.rewards import HumanReward
    from rlhf.verdicts import read_candidates

    _, factory = open_db(cfg.db)
    if cfg.clear:
        with factory.begin() as session:
            project_id, _ = read_open(session, cfg.project)
            n = session.execute(delete(ComparisonPriority).where(ComparisonPriority.project_id == project_id)).rowcount
        print(f"removed {n} priorities of {cfg.project!r}: the app serves fewest votes first again")
        return {"project": cfg.project, "cleared": n}
    # 1. Refuse before any work: no model, or a strategy the models cannot support.
    if not cfg.reward_model:
        raise ModelLoadError("name at least one --reward_model DIR (rlhf.train_rm); two or more for --strategy disagreement")
    priorities([[0.0]] * len(cfg.reward_model), cfg.strategy)  # checks the strategy against the number of models
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = [HumanReward(path, device, cfg.cache_dir) for path in cfg.reward_model]
    # 2. The open comparisons and their candidates, read without holding a lock (annotators keep voting).
    with read_session_factory(factory)() as session:
        project_id, comparisons = read_open(session, cfg.project)
        candidates = read_candidates(session, {c for _, a, b in comparisons for c in (a, b)})
    # 3. Every candidate scored once by each model, outside any transaction.
    order = sorted(candidates)
    scores: list[dict[int, float]] = [{} for _ in models]
    for k in tqdm(range(0, len(order), cfg.batch_size), desc="prioritize", unit="batch"):
        ids = order[k : k + cfg.batch_size]
        _, images, instructions, contexts, styles, texts = zip(*(candidates[i] for i in ids))
        for model, out in zip(models, scores):
            out.update(zip(ids, model(list(images), list(instructions), list(contexts), list(styles), list(texts)).tolist()))
    values = priorities([[s[a] - s[b] for _, a, b in comparisons] for s in scores], cfg.strategy)
    # 4. One transaction: the project's old priorities out, the new ones in.
    scored_by = f"{cfg.strategy}: {', '.join(cfg.reward_model)}"[:255]
    with factory.begin() as session:
        session.execute(delete(ComparisonPriority).where(ComparisonPriority.project_id == project_id))
        session.add_all([ComparisonPriority(comparison_id=cid, project_id=project_id, priority=v, scored_by=scored_by)
                         for (cid, _, _), v in zip(comparisons, values)])  # fmt: skip
    top = sorted(values, reverse=True)
    summary = {"project": cfg.project, "comparisons": len(comparisons), "candidates": len(order), "strategy": cfg.strategy,
               "models": len(models), "priority_median": round(top[len(top) // 2], 4) if top else None,
               "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    print(summary)
    return summary


def parse_args(argv: list[str] | None = None) -> PrioritizeConfig:
    from trl import TrlParser

    (cfg,) = TrlParser(dataclass_types=[PrioritizeConfig], description=__doc__.split("\n\n")[0]).parse_args_and_config(argv)
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

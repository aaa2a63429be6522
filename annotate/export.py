"""Build preference datasets from the votes in a storypref database.

    python -m annotate.export --db URL --out PATH --format pairs|trl|hf [--aggregate none|majority|dawid-skene|...]

Three formats (docs/data.md documents each field):

* `pairs`: one JSONL line per vote (or per comparison with `--aggregate majority`), in the field
  names of the visual-instruction RLHF seed (`image_paths, instruction, response_a, response_b,
  preference, ...`). `annotate.ingest` reads it back.
* `trl`: `train.jsonl` and `test.jsonl` with `prompt, chosen, rejected, images, margin, item_id,
  n_votes, agreement`, loadable unchanged by `datasets.load_dataset("json")`, TRL's `RewardTrainer`
  and, for VLMs, `DPOTrainer`. Prompts are conversational by default (`--trl-style standard` gives
  plain strings for encoders without a chat template).
* `hf`: the same rows as a `datasets.DatasetDict` saved with `save_to_disk`, images as `Image`.

A ranking (rank mode) becomes the K(K-1)/2 pairs it implies, marked `source: rank` and weighted
(`--rank-weight`) so that one ranking counts as K-1 votes by default; span marks travel as `spans`,
by story (`response_a`/`response_b` in pairs, `chosen`/`rejected` in trl and hf).

The split is by item and deterministic: items that share any image are grouped, and each group goes
to test when a hash of its images falls under `--test-fraction`, so train and test never share an
image and every export of the same data splits it the same way. Output is written to a temporary
path and renamed into place, so a reader never sees a half-written export.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session, aliased

from annotate.formats import STRENGTH_MARGIN, format_prompt
from db import (
    DEFAULT_MEDIA_ROOT,
    Annotator,
    Candidate,
    Comparison,
    Item,
    ItemImage,
    Project,
    Vote,
    get_meta,
    open_db,
)

FORMATS = ("pairs", "trl", "hf")
# --aggregate: per vote, majority, or a crowd-kit model of annotator reliability (class name)
CROWDKIT = {"dawid-skene": "DawidSkene", "one-coin-dawid-skene": "OneCoinDawidSkene"}
AGGREGATES = ("none", "majority", *CROWDKIT)
PREFERENCE = {"a": "response_a", "b": "response_b", "tie": "tie", "both_bad": "both_bad"}


class ExportError(ValueError):
    pass


@dataclass
class ExportStats:
    rows: int = 0
    train: int = 0
    test: int = 0
    skipped_ties: int = 0
    skipped_min_votes: int = 0
    excluded_annotators: tuple[str, ...] = ()
    excluded_votes: int = 0

    def summary(self) -> str:
        split = f" ({self.train} train / {self.test} test)" if self.train or self.test else ""
        left_out = (f"; left out {self.excluded_votes} votes of {len(self.excluded_annotators)} annotators "
                    f"({', '.join(self.excluded_annotators)})") if self.excluded_annotators else ""  # fmt: skip
        return (
            f"{self.rows} rows{split}; skipped {self.skipped_ties} ties/both-bad and "
            f"{self.skipped_min_votes} comparisons under --min-votes{left_out}"
        )


# ------------------------------------------------------------------------------------------------
# Reading: one streaming query for the votes, one for the images.
# ------------------------------------------------------------------------------------------------


class VoteRow(NamedTuple):
    choice: str
    strength: int | None
    aspects: str | dict  # raw JSON text on SQLite, decoded only when not empty (most votes have none)
    shown_left: str
    username: str
    comparison_id: int
    item_id: int
    external_id: str
    instruction: str
    style: str | None
    context: str | None
    text_a: str
    text_b: str
    candidate_a_id: int
    candidate_b_id: int
    ranking: str | dict | None  # rank mode: the ranking as given (raw JSON)
    spans: str | list | None  # span marks (raw JSON)
    # Set by `_expand_rankings`: one row per implied pair of a ranking.
    source: str = "pair"  # pair | rank
    weight: float = 1.0


RANK_WEIGHTS = ("ranking", "pair", "instructgpt")  # what one ranking of K stories counts as: K − 1 votes, C(K, 2), or 1


def rank_pair_weight(k: int, mode: str = "ranking") -> float:
    """The weight of each of the K(K−1)/2 pairs a ranking of K stories implies.

    `ranking` (the default): 2/K, so the ranking's pairs together count as K − 1 votes, the
    comparisons a sort of K needs and no more: its pairs are not independent votes, and counting each
    as one would let one reader's ranking outweigh K − 1 separate votes. `pair`: 1 each (the ranking
    counts as C(K, 2) votes). `instructgpt`: 1/C(K, 2) each (the ranking counts as one vote, as
    InstructGPT's loss averages a ranking's pairs as one batch element).

    >>> rank_pair_weight(4), rank_pair_weight(4, "pair"), round(rank_pair_weight(4, "instructgpt"), 4)
    (0.5, 1.0, 0.1667)
    """
    pairs = k * (k - 1) / 2
    if mode == "ranking":
        return (k - 1) / pairs
    if mode == "pair":
        return 1.0
    if mode == "instructgpt":
        return 1.0 / pairs
    raise ExportError(f"unknown --rank-weight {mode!r}; use one of {', '.join(RANK_WEIGHTS)}")


def _json(raw):
    return json.loads(raw) if isinstance(raw, str) else raw


def _expand_rankings(rows: Iterator[VoteRow], texts: dict[int, str], weight_mode: str) -> Iterator[VoteRow]:
    """Pair votes as they are; each ranking as the pairs it implies, canonical (lower candidate id as
    a), with `source="rank"` and its weight (`rank_pair_weight`). A tie in the ranking is a tie; "all
    bad" makes every pair both_bad. Rows stay grouped by (comparison, pair), as aggregation needs."""
    pending: list[VoteRow] = []

    def flush():
        expanded = []
        for r in pending:
            ranking = _json(r.ranking)
            shown = ranking["shown"]
            weight = rank_pair_weight(len(shown), weight_mode)
            ranks = dict(zip(shown, ranking["ranks"] or [1] * len(shown)))
            for a, b in itertools.combinations(sorted(shown), 2):
                choice = "both_bad" if ranking.get("all_bad") else "a" if ranks[a] < ranks[b] else "b" if ranks[b] < ranks[a] else "tie"
                expanded.append(r._replace(choice=choice, strength=None, aspects="{}", candidate_a_id=a, candidate_b_id=b,
                                           text_a=texts[a], text_b=texts[b], shown_left="a" if shown.index(a) < shown.index(b) else "b",
                                           source="rank", weight=weight))  # fmt: skip
        pending.clear()
        expanded.sort(key=lambda r: (r.candidate_a_id, r.candidate_b_id))  # stable: votes keep their order within a pair
        return expanded

    for r in rows:
        if pending and r.comparison_id != pending[0].comparison_id:
            yield from flush()
        if r.ranking is None or r.ranking == "null":
            yield r
        else:
            pending.append(r)
    yield from flush()


def _aspects(raw: str | dict | None) -> dict:
    if isinstance(raw, dict):  # psycopg decodes JSON columns itself
        return raw
    return json.loads(raw) if raw and raw != "{}" else {}


def _vote_rows(session: Session, project: str | None) -> Iterator[VoteRow]:
    cand_a, cand_b = aliased(Candidate), aliased(Candidate)
    query = (
        select(
            Vote.choice,
            Vote.strength,
            cast(Vote.aspects, Text),  # text, so the many empty ones skip JSON decoding
            Vote.shown_left,
            Annotator.username,
            Comparison.id.label("comparison_id"),
            Comparison.item_id,
            Item.external_id,
            Item.instruction,
            Item.style,
            Item.context,
            cand_a.text.label("text_a"),
            cand_b.text.label("text_b"),
            Comparison.candidate_a_id,
            Comparison.candidate_b_id,
            Vote.ranking,
            Vote.spans,
        )
        .join(Comparison, Vote.comparison_id == Comparison.id)
        .join(Item, Comparison.item_id == Item.id)
        .join(cand_a, Comparison.candidate_a_id == cand_a.id)
        .join(cand_b, Comparison.candidate_b_id == cand_b.id)
        .join(Annotator, Vote.annotator_id == Annotator.id)
        .where(Vote.active, ~Vote.is_repeat)
        .order_by(Comparison.id, Vote.id)
    )
    if project is not None:
        query = query.join(Project, Item.project_id == Project.id).where(Project.name == project)
    # Core, not ORM, execution: plain tuples, streamed in chunks (the ORM layer doubled export time).
    result = session.connection().execution_options(yield_per=5000).execute(query)
    for chunk in result.partitions():
        for r in chunk:
            yield VoteRow(*r)


def _rank_texts(session: Session, project: str | None) -> dict[int, str]:
    """The text of every candidate in a rank set (of `project`): what expanding a ranking needs."""
    query = select(Comparison.candidate_ids).where(Comparison.candidate_ids.is_not(None))
    if project is not None:
        query = query.join(Project, Comparison.project_id == Project.id).where(Project.name == project)
    ids = {c for raw in session.scalars(query) for c in (_json(raw) or [])}
    texts: dict[int, str] = {}
    ids_list = sorted(ids)
    for k in range(0, len(ids_list), 5000):
        texts.update(session.execute(select(Candidate.id, Candidate.text).where(Candidate.id.in_(ids_list[k : k + 5000]))).all())
    return texts


def _item_images(session: Session, media_root: Path) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Absolute image paths per item id, and each item's split key (shared by items that share images)."""
    paths: dict[int, list[str]] = defaultdict(list)
    shas: dict[int, list[str]] = defaultdict(list)
    for item_id, path, sha in session.execute(
        select(ItemImage.item_id, ItemImage.path, ItemImage.sha256).order_by(ItemImage.item_id, ItemImage.position)
    ):
        paths[item_id].append(str(media_root / path))
        shas[item_id].append(sha)
    # Union-find over images, so no image can end up on both sides of the split.
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for item_shas in shas.values():
        for sha in item_shas[1:]:
            a, b = find(item_shas[0]), find(sha)
            if a != b:
                parent[max(a, b)] = min(a, b)
    split_key = {item_id: find(s[0]) for item_id, s in shas.items()}
    return paths, split_key


def _pair_slices(session: Session) -> dict[tuple[int, int, int], list[str]]:
    """(item id, candidate a, candidate b) → the named evaluation slices the pair belongs to (ingest
    keeps them in item meta), whether the pair was voted on alone or inside a ranking."""
    names: dict[tuple[int, int, int], list[str]] = defaultdict(list)  # (item id, candidate a, candidate b) → slices
    for item_id, meta in session.execute(select(Item.id, Item.meta).where(cast(Item.meta, Text).like('%"slices"%'))):
        meta = json.loads(meta) if isinstance(meta, str) else meta or {}
        for name, pairs in (meta.get("slices") or {}).items():
            for a, b in pairs:
                names[(item_id, a, b)].append(name)
    return {key: sorted(v) for key, v in names.items()}


def is_test(split_key: str, test_fraction: float) -> bool:
    """Deterministic split: the same key always lands on the same side."""
    bucket = int(hashlib.sha256(split_key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < test_fraction


# ------------------------------------------------------------------------------------------------
# Rows: per vote, or aggregated per comparison.
# ------------------------------------------------------------------------------------------------


def _pair_spans(votes: list[VoteRow]) -> dict[str, list[dict]]:
    """The span marks of `votes` on this row's two stories: {"a": [...], "b": [...]}, each mark
    {start, end, label, text} and, where several votes made the same mark, `n` (how many)."""
    if not any(v.spans for v in votes):  # most votes: no marks, nothing to count
        return {"a": [], "b": []}
    found: dict[str, Counter] = {"a": Counter(), "b": Counter()}
    for v in votes:
        for m in _json(v.spans) or []:
            side = "a" if m["candidate_id"] == v.candidate_a_id else "b" if m["candidate_id"] == v.candidate_b_id else None
            if side:
                found[side][(m["start"], m["end"], m["label"], m.get("text", ""))] += 1
    many = len(votes) > 1
    return {side: [{"start": s, "end": e, "label": lab, "text": t, **({"n": n} if many else {})}
                   for (s, e, lab, t), n in sorted(c.items())] for side, c in found.items()}  # fmt: skip


def _key(r: VoteRow) -> tuple[int, int, int]:
    """What aggregation groups by: the comparison, and for a ranking the pair within it."""
    return (r.comparison_id, r.candidate_a_id, r.candidate_b_id)


def _per_vote(rows: Iterator[VoteRow]) -> Iterator[dict]:
    for r in rows:
        yield {
            "spans": _pair_spans([r]),
            "row": r,
            "choice": r.choice,
            "strength": r.strength,
            "aspects": _aspects(r.aspects),
            "annotator": r.username,
            "shown_left": r.shown_left,
            "n_votes": 1,
            "agreement": 1.0,
            "margin": STRENGTH_MARGIN.get(r.strength, 0.0),
        }


def _groups(rows: Iterator[VoteRow]) -> Iterator[list[VoteRow]]:
    """The votes of each comparison together (the query orders them by comparison)."""
    group: list[VoteRow] = []
    for r in rows:
        if group and _key(r) != _key(group[0]):
            yield group
            group = []
        group.append(r)
    if group:
        yield group


def _majority(rows: Iterator[VoteRow]) -> Iterator[dict]:
    """One row per comparison: the most frequent of a/b/tie; an a-b draw counts as a tie."""
    for group in _groups(rows):
        yield _aggregate(group)


def _crowdkit(rows: Iterator[VoteRow], method: str) -> Iterator[dict]:
    """One row per comparison, its answer from a crowd-kit model of each annotator's reliability."""
    try:
        import crowdkit.aggregation as ck
        import pandas as pd
    except ImportError:
        raise ExportError(f"--aggregate {method} needs crowd-kit: pip install crowd-kit (or pip install -e \".[quality]\")") from None
    groups = list(_groups(rows))
    task = lambda r: "%d:%d:%d" % _key(r)  # noqa: E731
    answers = pd.DataFrame([(task(r), r.username, r.choice) for g in groups for r in g if r.choice in ("a", "b", "tie")],
                           columns=["task", "worker", "label"])  # fmt: skip
    labels = getattr(ck, CROWDKIT[method])().fit_predict(answers) if len(answers) else pd.Series(dtype=object)
    labels = labels.to_dict()
    for group in groups:
        yield _aggregate(group, choice=labels.get(task(group[0])))


def _aggregate(votes: list[VoteRow], choice: str | None = None) -> dict:
    """One comparison's row: `choice` (a model's answer), else the majority of a/b/tie (a draw is a tie)."""
    votes = [v._replace(aspects=_aspects(v.aspects)) for v in votes]
    counted = [v for v in votes if v.choice != "both_bad"]
    counts = Counter(v.choice for v in counted)
    if not counted:
        choice = "both_bad"
    elif choice is None:
        (choice, top), *rest = counts.most_common()
        if rest and rest[0][1] == top:
            choice = "tie"  # no single winner
    agreeing = [v for v in votes if v.choice == choice]
    strengths = [v.strength for v in agreeing if v.strength is not None]
    aspects = {}
    for aspect in {k for v in counted for k in (v.aspects or {})}:
        aspect_counts = Counter((v.aspects or {}).get(aspect) for v in counted if (v.aspects or {}).get(aspect))
        aspects[aspect] = aspect_counts.most_common(1)[0][0]
    return {
        "spans": _pair_spans(votes),
        "row": votes[0],
        "choice": choice,
        "strength": round(sum(strengths) / len(strengths)) if strengths else None,
        "aspects": aspects,
        "annotator": None,
        "shown_left": None,
        "n_votes": len(votes),
        "agreement": round(len(agreeing) / len(votes), 4),
        "margin": sum(STRENGTH_MARGIN[s] for s in strengths) / len(strengths) if strengths else 0.0,
    }


def _pairs_line(rec: dict, images: list[str], slices: list[str]) -> dict:
    r = rec["row"]
    line = {
        "image_paths": images,
        "image_path": images[0] if images else None,
        "instruction": r.instruction,
        "response_a": r.text_a,
        "response_b": r.text_b,
        "preference": PREFERENCE[rec["choice"]],
        "strength": rec["strength"],
        "aspects": {k: PREFERENCE[v] for k, v in rec["aspects"].items()},
        "item_id": r.external_id,
        "comparison_id": r.comparison_id,
        "annotator": rec["annotator"],
        "shown_left": rec["shown_left"],
    }
    if r.style:
        line["style"] = r.style
    if r.context:
        line["context"] = r.context
    if rec["n_votes"] != 1 or rec["annotator"] is None:
        line["n_votes"], line["agreement"] = rec["n_votes"], rec["agreement"]
    if slices:
        line["slices"] = slices
    if r.source == "rank":
        line["source"], line["weight"] = "rank", r.weight
    spans = rec["spans"]
    if spans["a"] or spans["b"]:
        line["spans"] = {"response_a": spans["a"], "response_b": spans["b"]}
    return line


def _trl_line(rec: dict, images: list[str], style: str, slices: list[str]) -> dict:
    r = rec["row"]
    chosen, rejected = (r.text_b, r.text_a) if rec["choice"] == "b" else (r.text_a, r.text_b)
    spans = rec["spans"]
    spans = {"chosen": spans["b"], "rejected": spans["a"]} if rec["choice"] == "b" else {"chosen": spans["a"], "rejected": spans["b"]}
    # Aspects relative to this row: "chosen" means the aspect agrees with the overall preference.
    chosen_side = "b" if rec["choice"] == "b" else "a"
    aspects = {k: v if v in ("tie", "both_bad") else "chosen" if v == chosen_side else "rejected" for k, v in rec["aspects"].items()}
    prompt = format_prompt(r.instruction, r.style, r.context)
    if style == "conversational":
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "images": images,
        "margin": rec["margin"],
        "tie": rec["choice"] == "tie",
        "aspects": aspects,
        "item_id": r.external_id,
        "comparison_id": r.comparison_id,
        "n_votes": rec["n_votes"],
        "agreement": rec["agreement"],
        "slices": slices,
        "source": r.source,
        "weight": r.weight,
        "spans": spans,
    }


# ------------------------------------------------------------------------------------------------
# Writing, atomically.
# ------------------------------------------------------------------------------------------------


@contextmanager
def atomic_path(dest: Path, *, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it replaces `dest` in one rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    target = tmp if is_dir else tmp / dest.name
    try:
        yield target
        if is_dir:
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_jsonl(path: Path, lines: list[dict] | Iterator[dict]) -> None:
    dumps = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode  # flat lines: no cycles
    with path.open("w", encoding="utf-8") as f:
        f.writelines(dumps(line) + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())


def export(
    session: Session,
    out: str | Path,
    fmt: str = "pairs",
    *,
    aggregate: str = "none",
    min_votes: int = 1,
    include_ties: bool = False,
    include_both_bad: bool = False,
    test_fraction: float = 0.1,
    project: str | None = None,
    media_root: str | Path | None = None,
    trl_style: str = "conversational",
    exclude_annotators: tuple[str, ...] | list[str] = (),
    min_gold_accuracy: float | None = None,
    max_left_share: float | None = None,
    rank_weight: str = "ranking",
) -> ExportStats:
    """Write the votes of `session`'s database to `out`. Returns counts of what was written and skipped."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if aggregate not in AGGREGATES:
        raise ExportError(f"unknown --aggregate {aggregate!r}; use one of {', '.join(AGGREGATES)}")
    for flag, value in (("--min-gold-accuracy", min_gold_accuracy), ("--max-left-share", max_left_share)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ExportError(f"{flag} must be a share in [0, 1], got {value}")
    if not 0.0 <= test_fraction < 1.0:
        raise ExportError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if project is not None and session.scalar(select(Project.id).where(Project.name == project)) is None:
        names = ", ".join(session.scalars(select(Project.name))) or "none"
        raise ExportError(f"no project named {project!r} (projects: {names})")
    root = Path(media_root or get_meta(session, "media_root") or DEFAULT_MEDIA_ROOT).resolve()
    images, split_key = _item_images(session, root)
    slices = _pair_slices(session)

    stats = ExportStats()
    excluded = _excluded_annotators(session, project, exclude_annotators, min_gold_accuracy, max_left_share)
    rank_pair_weight(2, rank_weight)  # a bad --rank-weight fails here, before any work
    rows = _expand_rankings(_vote_rows(session, project), _rank_texts(session, project), rank_weight)
    if excluded:
        stats.excluded_annotators = tuple(sorted(excluded))
        rows = _leave_out(rows, excluded, stats)
    if aggregate in CROWDKIT:
        records = _crowdkit(rows, aggregate)
    else:
        records = (_majority if aggregate == "majority" else _per_vote)(rows)
    train: list[dict] = []
    test: list[dict] = []
    for rec in records:
        if rec["n_votes"] < min_votes:
            stats.skipped_min_votes += 1
            continue
        # chosen/rejected cannot express "both bad", so only pairs files carry it.
        if (rec["choice"] == "tie" and not include_ties) or (
            rec["choice"] == "both_bad" and not (include_both_bad and fmt == "pairs")
        ):
            stats.skipped_ties += 1
            continue
        r = rec["row"]
        item_images = images.get(r.item_id, [])
        pair_slices = slices.get((r.item_id, r.candidate_a_id, r.candidate_b_id), [])
        if fmt == "pairs":
            train.append(_pairs_line(rec, item_images, pair_slices))
        else:
            line = _trl_line(rec, item_images, trl_style, pair_slices)
            key = split_key.get(rec["row"].item_id, rec["row"].external_id)
            (test if is_test(key, test_fraction) else train).append(line)
    stats.rows = len(train) + len(test)

    out = Path(out)
    if fmt == "pairs":
        with atomic_path(out, is_dir=False) as tmp:
            _write_jsonl(tmp, train)
    elif fmt == "trl":
        stats.train, stats.test = len(train), len(test)
        with atomic_path(out, is_dir=True) as tmp:
            _write_jsonl(tmp / "train.jsonl", train)
            _write_jsonl(tmp / "test.jsonl", test)
    else:
        stats.train, stats.test = len(train), len(test)
        with atomic_path(out, is_dir=True) as tmp:
            _save_hf(tmp, train, test)
    return stats


def vote_facts_query(project: str | None):
    """The active votes as `annotate.stats.VoteFact` columns, of one project or all: what the Admin
    statistics and the annotator filters read."""
    query = (
        select(Annotator.username, Vote.comparison_id, Vote.choice, Vote.shown_left, Vote.time_spent_ms, Vote.is_repeat, Comparison.gold_choice)
        .join(Annotator, Vote.annotator_id == Annotator.id)
        .join(Comparison, Vote.comparison_id == Comparison.id)
        .where(Vote.active)
    )  # fmt: skip
    if project is not None:
        query = query.join(Project, Comparison.project_id == Project.id).where(Project.name == project)
    return query


def _excluded_annotators(session: Session, project: str | None, names, min_gold_accuracy: float | None,
                         max_left_share: float | None) -> set[str]:  # fmt: skip
    """The annotators `--exclude-annotators`, `--min-gold-accuracy` and `--max-left-share` leave out."""
    names = {n.strip() for n in names if n.strip()}
    known = set(session.scalars(select(Annotator.username)))
    if unknown := sorted(names - known):
        raise ExportError(f"--exclude-annotators: no annotator named {', '.join(unknown)}")
    if min_gold_accuracy is None and max_left_share is None:
        return names
    from annotate.stats import VoteFact, annotator_report

    for row in annotator_report([VoteFact(*r) for r in session.execute(vote_facts_query(project))]):
        gold, left = row["gold_accuracy"], row["left_share"]
        if min_gold_accuracy is not None and gold is not None and gold < min_gold_accuracy:
            names.add(row["annotator"])
        if max_left_share is not None and left is not None and left > max_left_share:
            names.add(row["annotator"])
    return names


def _leave_out(rows: Iterator[VoteRow], excluded: set[str], stats: ExportStats) -> Iterator[VoteRow]:
    """The rows of everyone not in `excluded`, still streamed; counts the votes left out."""
    for r in rows:
        if r.username in excluded:
            stats.excluded_votes += 1
        else:
            yield r


def _save_hf(path: Path, train: list[dict], test: list[dict]) -> None:
    try:
        import datasets
    except ImportError:
        raise ExportError('--format hf needs `datasets`: pip install -e ".[train]"') from None
    splits = {}
    for name, rows in (("train", train), ("test", test)):
        ds = datasets.Dataset.from_list([{**r, "aspects": json.dumps(r["aspects"]), "spans": json.dumps(r["spans"])} for r in rows]) if rows else None
        if ds is not None:
            ds = ds.cast_column("slices", datasets.Sequence(datasets.Value("string")))  # all empty: no type to infer
            splits[name] = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    datasets.DatasetDict(splits).save_to_disk(str(path))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m annotate.export",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: $STORYPREF_DB or sqlite:///data/storypref.db)")
    p.add_argument("--out", required=True, type=Path, help="output file (pairs) or directory (trl, hf)")
    p.add_argument("--format", choices=FORMATS, default="pairs", help="output format (default: pairs)")
    p.add_argument("--aggregate", choices=AGGREGATES, default="none",
                   help="one row per vote (none), or one per comparison: majority, or an annotator-reliability model from "
                        "crowd-kit (dawid-skene, one-coin-dawid-skene)")  # fmt: skip
    p.add_argument("--min-votes", type=int, default=1, help="when aggregating: drop comparisons with fewer votes")
    p.add_argument("--exclude-annotators", default="", metavar="A,B", help="leave out these annotators' votes")
    p.add_argument("--min-gold-accuracy", type=float, default=None, metavar="X",
                   help="leave out annotators whose accuracy on gold comparisons is under X (those without gold answers stay)")  # fmt: skip
    p.add_argument("--max-left-share", type=float, default=None, metavar="Y",
                   help="leave out annotators who chose the story shown on the left in more than Y of their decisive answers")  # fmt: skip
    p.add_argument("--rank-weight", choices=RANK_WEIGHTS, default="ranking",
                   help="rankings become the pairs they imply, each weighted so that one ranking of K stories counts as K-1 votes "
                        "(ranking, the default), as K(K-1)/2 (pair), or as 1 (instructgpt)")  # fmt: skip
    p.add_argument("--include-ties", action="store_true", help="keep ties (trl/hf: as rows with tie=true)")
    p.add_argument("--include-both-bad", action="store_true", help="keep both-bad answers (pairs only)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of items in test.jsonl (trl, hf)")
    p.add_argument("--project", default=None, help="only this project (default: all)")
    p.add_argument("--media-root", default=None, help="where the images live (default: the one stored in the db)")
    p.add_argument("--trl-style", choices=("conversational", "standard"), default="conversational",
                   help="trl/hf prompts as chat messages (VLMs, chat RMs) or plain strings (encoders)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        engine, session_factory = open_db(args.db)
        with session_factory() as session:
            stats = export(
                session,
                args.out,
                args.format,
                aggregate=args.aggregate,
                min_votes=args.min_votes,
                include_ties=args.include_ties,
                include_both_bad=args.include_both_bad,
                test_fraction=args.test_fraction,
                project=args.project,
                media_root=args.media_root,
                trl_style=args.trl_style,
                exclude_annotators=args.exclude_annotators.split(","),
                min_gold_accuracy=args.min_gold_accuracy,
                max_left_share=args.max_left_share,
                rank_weight=args.rank_weight,
            )
    except (ExportError, RuntimeError) as e:
        print(f"error: {e}\nNothing was written.", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.format}): {stats.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which comparison an annotator sees next, and how an answer becomes a vote.

Every function takes a `session` inside a transaction (one per user event) and the annotator's id,
which the caller took from the login session (never from a form field).

A comparison is a pair of candidates, or in rank mode a rank set of K (`Comparison.candidate_ids`):
both are scheduled alike. A rank set's stories are shown in a stable random order per (annotator,
comparison) (`shown_order_for`), reversed on a repeat, and its answer is a ranking (`record_vote`
with `ranks`), stored as given. Span marks (`spans`) ride on an answer of either kind.

Scheduling: a comparison of the project that still needs votes (`n_votes < overlap`, fewest first),
that this annotator never answered and did not skip, and that is not of the item just seen. A
random pick among the least-voted few spreads concurrent annotators over different comparisons.
Where `rlhf.prioritize` has written priorities for the project (active pair selection), the scored
comparisons come first, breadth-first by priority: the highest-priority one among the least voted
(every scored comparison gets its first vote, most informative first, before any gets a second);
the overlap, gold, repeats and the rules above still hold. With probability `gold_rate` a gold
comparison is served instead, and with `repeat_rate` one the annotator already answered, with left
and right swapped (to measure self-consistency and left bias). Left/right order is a hash of
(annotator, comparison), so a reload shows the same order.

Correctness under concurrency: a vote is one INSERT plus `n_votes = n_votes + 1` in the same
transaction. The unique index on active votes forbids a second answer by the same annotator, and
the unique client token makes a double submit or a retried request return the first vote. Only
comparisons under their overlap are served, so a comparison can exceed it by at most the number of
annotators who hold it open at the same time (the in-flight slack). Open assignments (leases) are
kept in this process (`Leases`) or, where several app workers share a database, in it (`DbLeases`).
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import case, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import ASPECTS, CHOICES, SPAN_LABELS, Annotator, Candidate, Comparison, ComparisonPriority, Lease, Project, Vote

CANDIDATE_WINDOW = 64  # look at this many least-voted (or highest-priority) comparisons, then pick the least held
LEVEL_FETCH = 4096  # prioritized: read at most this many comparisons of one vote count and sort them by priority here
DENSE_WALK = 64  # prioritized: walk the priority index this many rows at a time for a vote count's best,
DENSE_PAGES = 32  # for at most this many pages
LEASE_SECONDS = 600  # an assignment nobody answered for this long is no longer counted as in flight
MAX_SPANS = 50  # span marks per answer


class VoteError(ValueError):
    """An answer that cannot be recorded; the message is shown to the annotator."""


class RankError(VoteError):
    """A ranking that is incomplete or malformed: the annotator can fix it on the same page."""


class SpanError(VoteError):
    """A span mark that does not fit the story shown: the annotator can fix it on the same page."""


@dataclass(frozen=True)
class Assignment:
    comparison_id: int
    item_id: int
    shown_left: str  # canonical side shown on the left: "a" | "b"
    is_repeat: bool = False
    is_gold: bool = False
    editing_vote_id: int | None = None  # set when re-answering after an undo


def shown_left_for(annotator_id: int, comparison_id: int) -> str:
    """A stable coin flip per (annotator, comparison)."""
    digest = hashlib.sha256(f"{annotator_id}:{comparison_id}".encode()).digest()
    return "a" if digest[0] % 2 == 0 else "b"


def shown_order_for(annotator_id: int, comparison: Comparison, repeat: bool = False) -> list[int]:
    """The candidate ids of a comparison in the order this annotator sees them, stable per
    (annotator, comparison); a repeat shows them reversed. For a pair, left then right."""
    ids = comparison.candidate_id_list
    if comparison.candidate_ids:
        seed = hashlib.sha256(f"{annotator_id}:{comparison.id}:order".encode()).digest()
        random.Random(seed).shuffle(ids)
        return ids[::-1] if repeat else ids
    side = shown_left_for(annotator_id, comparison.id)
    order = ids if side == "a" else ids[::-1]
    return order[::-1] if repeat else order


def _other(side: str) -> str:
    return "b" if side == "a" else "a"


def _answered_by(annotator_id: int):
    # IN over the annotator's own votes, read once (a list the database builds per query), rather than
    # a correlated EXISTS per comparison, which SQLite may answer by scanning all of the annotator's
    # votes for every comparison it looks at (minutes at 100k votes).
    return Comparison.id.in_(select(Vote.comparison_id).where(Vote.annotator_id == annotator_id))


def _pending(
    project: Project, annotator_id: int, last_item_id: int | None, skipped: frozenset[int], gold: bool, prioritized: bool = False,
    level: int | None = None,
):
    query = select(Comparison.id, Comparison.item_id, Comparison.n_votes).where(
        Comparison.project_id == project.id, Comparison.is_gold == gold, ~_answered_by(annotator_id)
    )
    if not gold:
        query = query.where(Comparison.n_votes < func.coalesce(Comparison.overlap, project.overlap))
    if last_item_id is not None:
        query = query.where(Comparison.item_id != last_item_id)
    if skipped:
        query = query.where(Comparison.id.not_in(skipped))
    if prioritized and not gold:  # `rlhf.prioritize` scored them (see _by_priority)
        query = query.add_columns(ComparisonPriority.priority).join(ComparisonPriority, ComparisonPriority.comparison_id == Comparison.id)
        query = query.where(ComparisonPriority.project_id == project.id)
        if level is not None:  # one vote count's comparisons, unordered: the caller sorts at most LEVEL_FETCH of them
            return query.where(Comparison.n_votes == level).limit(LEVEL_FETCH)
        return query.order_by(ComparisonPriority.priority.desc()).limit(DENSE_WALK)  # walks ix_priority_project (no tiebreak: it would sort)
    return query.order_by(Comparison.n_votes, Comparison.id).limit(CANDIDATE_WINDOW)


def _by_priority(session: Session, pending, overlap: int, pick, any_at):
    """The scored comparisons breadth-first: for each vote count from 0 up, `pick` (see `_pick`) among
    that count's highest-priority comparisons; the first row picked, or None.

    `pending(level)` gives one count's comparisons unordered (at most LEVEL_FETCH), `pending(None)`
    all scored ones down the priority index (DENSE_WALK rows a page). Neither a sort of the project
    nor a walk down the index filtered to one count stays fast at every stage of a campaign (the walk
    is slow once the count is rare), so: one walk's first page, which holds a count's best wherever
    that count is common (and every scored comparison left, when it is short); else that count read
    whole and sorted here, where it is rare; else (common, but not near the top) the walk a page at
    a time, DENSE_PAGES pages at most, after which the best of the rows read stands in. `any_at(level)`
    says whether the project has any comparison with that count at all (an index probe), so a count
    nobody is at costs no read of this annotator's votes.
    """
    best = lambda rows: sorted(rows, key=lambda r: -r.priority)[:CANDIDATE_WINDOW]  # noqa: E731
    page = session.execute(pending(None)).all()
    if not page:
        return None  # nothing scored is left for this annotator
    levels = range(overlap) if len(page) == DENSE_WALK else sorted({r.n_votes for r in page})
    for level in levels:
        found = [r for r in page if r.n_votes == level]
        if not found and len(page) == DENSE_WALK:
            if not any_at(level):
                continue
            rows = session.execute(pending(level)).all()
            if len(rows) == LEVEL_FETCH:
                for k in range(1, DENSE_PAGES):
                    walked = session.execute(pending(None).offset(k * DENSE_WALK)).all()
                    found = [r for r in walked if r.n_votes == level]
                    if found or len(walked) < DENSE_WALK:
                        break
            found = found or rows
        row = pick(best(found)) if found else None
        if row is not None:
            return row
    return pick(page)  # above the project's overlap: comparisons with a higher overlap of their own


def _any_at(session: Session, project: Project, level: int) -> bool:
    """Whether any regular comparison of the project has `level` votes (reads ix_comparison_pending only)."""
    probe = select(Comparison.id).where(Comparison.project_id == project.id, ~Comparison.is_gold, Comparison.n_votes == level).limit(1)
    return session.scalar(probe) is not None


def is_prioritized(session: Session, project: Project) -> bool:
    """Whether `rlhf.prioritize` has scored any comparison of the project."""
    return session.scalar(select(exists().where(ComparisonPriority.project_id == project.id))) or False


def _pick(session: Session, query, rng: random.Random, in_flight: Mapping[int, int], cap: int | None):
    """Among the least-voted rows, counting the ones handed out and not yet answered as votes; where
    the rows carry a priority, the highest priority among those least voted (breadth-first)."""
    rows = [(r.n_votes + in_flight.get(r.id, 0), r) for r in (query if isinstance(query, list) else session.execute(query))]
    if cap is not None:
        rows = [(n, r) for n, r in rows if n < cap]
    if not rows:
        return None
    fewest = min(n for n, _ in rows)
    rows = [(n, r) for n, r in rows if n == fewest]
    if "priority" in rows[0][1]._fields:
        best = max(r.priority for _, r in rows)
        rows = [(n, r) for n, r in rows if r.priority == best]
    return rng.choice([r for _, r in rows])


def _repeat(session: Session, project: Project, annotator_id: int, last_item_id: int | None, rng: random.Random):
    already = select(Vote.comparison_id).where(Vote.annotator_id == annotator_id, Vote.is_repeat)
    query = (
        select(Vote.comparison_id, Vote.shown_left, Comparison.item_id)
        .join(Comparison, Vote.comparison_id == Comparison.id)
        .where(Vote.annotator_id == annotator_id, Vote.active, ~Vote.is_repeat, Comparison.project_id == project.id)
        .where(Vote.comparison_id.not_in(already))
        .order_by(Vote.id.desc())
        .limit(50)
    )
    if last_item_id is not None:
        query = query.where(Comparison.item_id != last_item_id)
    rows = session.execute(query).all()[3:]  # not one answered just now: that would test memory
    if not rows:
        return None
    row = rng.choice(rows)
    return Assignment(row.comparison_id, row.item_id, _other(row.shown_left), is_repeat=True)


def next_assignment(
    session: Session,
    annotator_id: int,
    project: Project,
    *,
    last_item_id: int | None = None,
    skipped: frozenset[int] = frozenset(),
    rng: random.Random | None = None,
    in_flight: Mapping[int, int] | None = None,
) -> Assignment | None:
    """The next comparison for this annotator, or None when nothing is left for them.

    `in_flight` counts, per comparison, the assignments handed out and not answered yet (see
    `Leases`); they count as votes, so concurrent annotators spread out instead of colliding.
    """
    in_flight = in_flight or {}
    rng = rng or random.Random()
    if project.repeat_rate and rng.random() < project.repeat_rate:
        repeat = _repeat(session, project, annotator_id, last_item_id, rng)
        if repeat:
            return repeat
    # Gold first at the gold rate; regular comparisons otherwise, then gold once they run out.
    # A project with a gold rate of 0 never serves gold.
    if not project.gold_rate:
        order: tuple[bool, ...] = (False,)
    else:
        order = (True, False) if rng.random() < project.gold_rate else (False, True)
    # Prioritized: the scored comparisons first, breadth-first (each vote count from 0 up, by priority
    # within it); once none of them is left for this annotator, the rest (unscored ones) in the usual order.
    tiers = (True, False) if is_prioritized(session, project) else (False,)
    for gold in order:
        cap = None if gold else project.overlap
        row = None
        for ranked in tiers if not gold else (False,):

            def choose(last: int | None, held: Mapping[int, int]):
                pick = lambda rows: _pick(session, rows, rng, held, cap)  # noqa: E731
                if ranked:
                    return _by_priority(session, lambda lv: _pending(project, annotator_id, last, skipped, gold, True, lv), project.overlap, pick,
                                        lambda lv: _any_at(session, project, lv))  # fmt: skip
                return pick(_pending(project, annotator_id, last, skipped, gold))

            row = choose(last_item_id, in_flight)
            if row is None and last_item_id is not None:  # only the last item is left: better than nothing
                row = choose(None, in_flight)
            if row is None and in_flight and not gold:  # all remaining ones are held by others: share
                row = choose(None, {})
            if row is not None:
                break
        if row is not None:
            return Assignment(row.id, row.item_id, shown_left_for(annotator_id, row.id), is_gold=gold)
    return None


class Leases:
    """Assignments handed out and not yet answered, per comparison, in this process.

    The app holds one `Leases`; serving takes a lease under its lock (so two annotators asking at
    the same moment see each other's), and answering or skipping releases it once the vote is
    committed. Leases expire after LEASE_SECONDS, so a closed tab does not hold a comparison.
    """

    def __init__(self, seconds: float = LEASE_SECONDS):
        self.seconds = seconds
        self.lock = threading.Lock()
        self._held: dict[str, tuple[int, float]] = {}  # token -> (comparison id, taken at)

    def counts(self) -> Counter:
        now = time.monotonic()
        self._held = {t: (c, at) for t, (c, at) in self._held.items() if now - at < self.seconds}
        return Counter(c for c, _ in self._held.values())

    def take(self, token: str, comparison_id: int) -> None:
        self._held[token] = (comparison_id, time.monotonic())

    def release(self, token: str) -> None:
        with self.lock:
            self._held.pop(token, None)


class DbLeases:
    """`Leases` kept in the database (the `lease` table), shared by every app process on it.

    With several app workers on one PostgreSQL database, each worker's in-process `Leases` would
    see only its own hand-outs. Here choosing and leasing happen in one write transaction that
    first locks the project's row (`SELECT … FOR UPDATE` on PostgreSQL; on SQLite the transaction's
    `BEGIN IMMEDIATE` write lock does the same), so two workers serving at the same moment see each
    other's leases; the fairness rules (fewest votes first, the overlap, never twice to one
    annotator) then hold across processes. A lease is deleted after its vote commits, and one left
    by a closed tab or a killed worker stops counting after `seconds`.
    """

    def __init__(self, session_factory, seconds: float = LEASE_SECONDS):
        self.sessions, self.seconds = session_factory, seconds

    def serve(self, token: str, annotator_id: int, project: Project, choose) -> Assignment | None:
        """`choose(session, in_flight)` under the project's lock; lease what it picked (not repeats)."""
        with self.sessions.begin() as w:
            w.execute(select(Project.id).where(Project.id == project.id).with_for_update())
            now = time.time()
            w.execute(delete(Lease).where(Lease.project_id == project.id, Lease.expires_at <= now))
            held = w.execute(select(Lease.comparison_id, func.count()).where(Lease.project_id == project.id).group_by(Lease.comparison_id))
            assignment = choose(w, Counter(dict(held.all())))
            if assignment is not None and not assignment.is_repeat:
                self.take(token, annotator_id, project.id, assignment.comparison_id, session=w)
        return assignment

    def take(self, token: str, annotator_id: int, project_id: int, comparison_id: int, session: Session | None = None) -> None:
        """Lease one known comparison (undo serves it again), in `session`'s transaction or a new one."""
        lease = Lease(token=token, project_id=project_id, comparison_id=comparison_id, annotator_id=annotator_id,
                      expires_at=time.time() + self.seconds)  # fmt: skip
        if session is not None:
            session.add(lease)
            return
        with self.sessions.begin() as w:
            w.add(lease)

    def release(self, token: str) -> None:
        with self.sessions.begin() as w:
            w.execute(delete(Lease).where(Lease.token == token))

    def counts(self, project_id: int) -> Counter:
        with self.sessions() as s:
            rows = s.execute(select(Lease.comparison_id, func.count())
                             .where(Lease.project_id == project_id, Lease.expires_at > time.time()).group_by(Lease.comparison_id))  # fmt: skip
            return Counter(dict(rows.all()))


def to_canonical(answer: str, shown_left: str) -> str:
    """'left'/'right' (what the annotator saw) → canonical 'a'/'b'; tie and both_bad pass through."""
    if answer == "left":
        return shown_left
    if answer == "right":
        return _other(shown_left)
    if answer in ("tie", "both_bad"):
        return answer
    raise VoteError(f"unknown answer {answer!r}; use left, right, tie or both_bad")


def check_spans(spans: list[dict] | None, shown: list[Candidate]) -> list[dict] | None:
    """Span marks as sent by the page ({"pos": shown story index, "start", "end", "label"}, offsets
    into that story's text) → stored marks ({"candidate_id", "start", "end", "label", "text"})."""
    if not spans:
        return None
    if not isinstance(spans, list) or len(spans) > MAX_SPANS:
        raise SpanError(f"span marks must be a list of at most {MAX_SPANS}; reload the page")
    out = []
    for mark in spans:
        if not isinstance(mark, dict):
            raise SpanError("a span mark must be an object with pos, start, end and label; reload the page")
        pos, start, end, label = mark.get("pos"), mark.get("start"), mark.get("end"), mark.get("label")
        if not isinstance(pos, int) or not 0 <= pos < len(shown):
            raise SpanError(f"a span mark names story {pos!r}, which is not on the page; reload the page")
        text = shown[pos].text
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)):
            raise SpanError(f"a span mark's offsets {start!r}..{end!r} fall outside the story; reload the page")
        if label not in SPAN_LABELS:
            raise SpanError(f"unknown span label {label!r}; use {', '.join(SPAN_LABELS)}")
        out.append({"candidate_id": shown[pos].id, "start": start, "end": end, "label": label, "text": text[start:end]})
    return sorted(out, key=lambda m: (m["candidate_id"], m["start"], m["end"], m["label"]))


def check_ranks(ranks: list, n: int) -> list[int]:
    """A ranking as sent: one rank per shown story (1 best; equal ranks tie). Returned as dense ranks.

    >>> check_ranks([3, 1, 3, 2], 4)
    [3, 1, 3, 2]
    >>> check_ranks([4, 1, 4, 1], 4)
    [2, 1, 2, 1]
    """
    if not isinstance(ranks, list) or len(ranks) != n or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise RankError(f"give every one of the {n} stories a rank (1 = best; the same rank for a tie), or choose All bad")
    if any(not 1 <= r <= n for r in ranks):
        raise RankError(f"ranks go from 1 (best) to {n}")
    dense = {r: i + 1 for i, r in enumerate(sorted(set(ranks)))}
    return [dense[r] for r in ranks]


def record_vote(
    session: Session,
    annotator_id: int,
    assignment: Assignment,
    answer: str,
    *,
    client_token: str,
    strength: int | None = None,
    aspects: dict[str, str] | None = None,
    rationale: str | None = None,
    time_spent_ms: int | None = None,
    ranks: list[int] | None = None,
    spans: list[dict] | None = None,
) -> tuple[Vote, bool]:
    """Record an answer given in displayed terms. Returns (vote, created).

    A pair: `answer` is left/right/tie/both_bad. A rank set: `answer` is "rank" with `ranks`, one per
    story in the order shown (1 best, equal ranks tie), or "all_bad"; the vote keeps the ranking as
    given and, in `choice`, what it implies for the comparison's candidates a and b. `spans` are span
    marks in displayed terms (see `check_spans`). Idempotent on `client_token`: the same token
    returns the vote it made the first time.
    """
    if not client_token or len(client_token) > 64:
        raise VoteError("missing or malformed client token; reload the page")
    existing = session.scalar(select(Vote).where(Vote.annotator_id == annotator_id, Vote.client_token == client_token))
    if existing is not None:
        return existing, False
    comparison = session.get(Comparison, assignment.comparison_id)
    order = shown_order_for(annotator_id, comparison, assignment.is_repeat) if comparison.candidate_ids else None
    ranking = None
    if order is not None:  # a rank set
        shown_left = "a" if order.index(comparison.candidate_a_id) < order.index(comparison.candidate_b_id) else "b"
        if answer == "all_bad":
            ranking, choice = {"shown": order, "ranks": None, "all_bad": True}, "both_bad"
        elif answer == "rank":
            dense = check_ranks(ranks, len(order))
            ranking = {"shown": order, "ranks": dense, "all_bad": False}
            by_id = dict(zip(order, dense))
            a, b = by_id[comparison.candidate_a_id], by_id[comparison.candidate_b_id]
            choice = "a" if a < b else "b" if b < a else "tie"
        else:
            raise RankError(f"this is a ranking of {len(order)} stories: give each a rank, or choose All bad (not {answer!r})")
        strength, aspects = None, None  # asked of a pair only
    else:
        shown_left = assignment.shown_left
        choice = to_canonical(answer, shown_left)
        order = [comparison.candidate_a_id, comparison.candidate_b_id][:: 1 if shown_left == "a" else -1]
    if strength is not None and (choice not in ("a", "b") or not 1 <= int(strength) <= 4):
        strength = None  # strength only qualifies a preference for one side
    canonical_aspects = {}
    for aspect, value in (aspects or {}).items():
        if aspect not in ASPECTS:
            raise VoteError(f"unknown aspect {aspect!r}")
        if value:
            canonical_aspects[aspect] = to_canonical(value, shown_left)
    if rationale is not None and len(rationale) > 5000:
        raise VoteError("the rationale is over 5,000 characters; shorten it")
    if spans:
        texts = {c.id: c for c in session.scalars(select(Candidate).where(Candidate.id.in_(order)))}
        spans = check_spans(spans, [texts[i] for i in order])

    editing = session.get(Vote, assignment.editing_vote_id) if assignment.editing_vote_id else None
    if editing is not None and (editing.annotator_id != annotator_id or editing.comparison_id != assignment.comparison_id):
        raise VoteError("that answer is not yours to edit")
    if not assignment.is_repeat:
        clash = session.scalar(
            select(Vote.id).where(
                Vote.comparison_id == assignment.comparison_id, Vote.annotator_id == annotator_id, Vote.active, ~Vote.is_repeat
            )
        )
        if clash is not None:
            raise VoteError("you already answered this comparison; use Undo to change your answer")
    vote = Vote(
        comparison_id=assignment.comparison_id,
        annotator_id=annotator_id,
        choice=choice,
        strength=strength,
        aspects=canonical_aspects,
        rationale=(rationale or "").strip() or None,
        shown_left=shown_left,
        time_spent_ms=time_spent_ms,
        client_token=client_token,
        is_repeat=assignment.is_repeat,
        ranking=ranking,
        spans=spans or None,
    )
    try:
        with session.begin_nested():
            session.add(vote)
            session.flush()
    except IntegrityError:
        # A concurrent request with the same token (a double click) or a second tab won the race.
        existing = session.scalar(select(Vote).where(Vote.annotator_id == annotator_id, Vote.client_token == client_token))
        if existing is not None:
            return existing, False
        raise VoteError("you already answered this comparison; use Undo to change your answer") from None
    if editing is not None:
        editing.superseded_by_id = vote.id
    if not assignment.is_repeat:
        session.execute(update(Comparison).where(Comparison.id == vote.comparison_id).values(n_votes=Comparison.n_votes + 1))
    return vote, True


def undo_last(session: Session, annotator_id: int, project: Project) -> Assignment | None:
    """Withdraw the annotator's latest active answer in `project` (kept, marked inactive) and
    return its comparison to answer again; None if there is nothing to undo."""
    vote = session.scalar(
        select(Vote)
        .join(Comparison, Vote.comparison_id == Comparison.id)
        .where(Vote.annotator_id == annotator_id, Vote.active, Comparison.project_id == project.id)
        .order_by(Vote.id.desc())
        .limit(1)
    )
    if vote is None:
        return None
    vote.active = False
    if not vote.is_repeat:
        session.execute(update(Comparison).where(Comparison.id == vote.comparison_id).values(n_votes=Comparison.n_votes - 1))
    comparison = session.get(Comparison, vote.comparison_id)
    return Assignment(
        vote.comparison_id, comparison.item_id, vote.shown_left, is_repeat=vote.is_repeat,
        is_gold=comparison.is_gold, editing_vote_id=vote.id,
    )  # fmt: skip


@dataclass
class Progress:
    mine: int  # my active answers in this project (repeats not counted)
    done: int  # votes towards the project's target (each comparison counted up to its overlap)
    target: int  # comparisons × overlap

    @property
    def fraction(self) -> float:
        return self.done / self.target if self.target else 1.0


def project_progress(session: Session, project: Project) -> tuple[int, int]:
    """(votes done towards the target, target): a scan of the project's comparisons."""
    wanted = func.coalesce(Comparison.overlap, project.overlap)
    capped = case((Comparison.n_votes < wanted, Comparison.n_votes), else_=wanted)
    done, target = session.execute(
        select(func.coalesce(func.sum(capped), 0), func.coalesce(func.sum(wanted), 0)).where(
            Comparison.project_id == project.id, ~Comparison.is_gold
        )
    ).one()
    return int(done or 0), int(target or 0)


def progress(session: Session, annotator_id: int, project: Project, project_totals: tuple[int, int] | None = None) -> Progress:
    """My answers, and the project's progress (pass `project_totals` to reuse a recent scan)."""
    done, target = project_totals or project_progress(session, project)
    mine = session.scalar(
        select(func.count(Vote.id))
        .join(Comparison, Vote.comparison_id == Comparison.id)
        .where(Vote.annotator_id == annotator_id, Vote.active, ~Vote.is_repeat, Comparison.project_id == project.id)
    )
    return Progress(int(mine or 0), done, target)


def annotator_by_name(session: Session, username: str | None) -> Annotator | None:
    """The active annotator behind a login name (None if unknown or disabled)."""
    if not username:
        return None
    user = session.scalar(select(Annotator).where(Annotator.username == username))
    return user if user is not None and user.active else None


__all__ = ["CHOICES", "Assignment", "Leases", "Progress", "RankError", "SpanError", "VoteError", "annotator_by_name", "check_ranks", "check_spans", "next_assignment",
           "progress", "project_progress", "record_vote", "shown_left_for", "shown_order_for", "to_canonical", "undo_last"]  # fmt: skip

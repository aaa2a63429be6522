"""The Gradio labeling app: `build_app(session_factory, ...) -> gr.Blocks`, launched by `app.py`.

Handlers live on `LabelingApp` as plain methods, so tests call them directly with a
`gr.Request(username=...)`. The annotator is always `request.username`, which Gradio's login sets
(checked against the annotator table on every event, so a disabled account stops at once); no form
field can say who is voting. Per-user state lives in `gr.State`, never in globals.

One server serves every project of the database: each annotator picks one of the projects they
may label (`annotate.users assign`; admins see all), and the app's `--project` is only the one
shown first. The chosen project is checked against the account on every event.

Each served comparison comes with a client token that the page sends back with the answer. A
double click or a retried request therefore records one vote (see `annotate.scheduler`). Gradio
runs one event at a time by default; here every event may run `concurrency_limit` at once
(default 16), because the handlers are short database transactions. SQLite serializes the writes
itself (BEGIN IMMEDIATE and a busy timeout), so a limit of 1 would only queue annotators behind
each other.
"""

from __future__ import annotations

import html
import json
import secrets
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import gradio as gr
import pandas as pd
from sqlalchemy import Text, cast, func, select
from sqlalchemy.orm import aliased

from annotate import stats
from annotate.auth import authenticate
from annotate.export import AGGREGATES, export, vote_facts_query
from annotate.render import CSS, render_stories
from annotate.scheduler import (
    LEASE_SECONDS,
    Assignment,
    DbLeases,
    Leases,
    RankError,
    SpanError,
    VoteError,
    annotator_by_name,
    next_assignment,
    progress,
    project_progress,
    record_vote,
    shown_order_for,
    undo_last,
)
from annotate.throttle import LoginThrottle, LoginThrottleMiddleware
from annotate.users import may_label, visible_projects
from db import (
    ASPECTS,
    DEFAULT_MEDIA_ROOT,
    MAX_RANK_K,
    Annotator,
    Candidate,
    Comparison,
    Item,
    Project,
    Vote,
    get_meta,
    read_session_factory,
)

PROGRESS_TTL_SECONDS = 5.0  # the project-wide progress bar may lag this much
STRENGTHS = ["Negligibly better / unsure", "Slightly better", "Better", "Significantly better"]  # Llama 2 scale
ASPECT_CHOICES = [("A", "left"), ("B", "right"), ("Same", "tie")]
ANSWERS = {"left": "sp-a", "right": "sp-b", "tie": "sp-tie", "both_bad": "sp-bad"}
KEYS_JS = """
<script>
(() => {
  // Keys, span marks and rank keys. Everything the page sends is checked again by the server.
  const shown = (id) => { const el = document.getElementById(id); return el && el.offsetParent !== null ? el : null; };
  const press = (id) => { const el = document.getElementById(id); if (el) (el.tagName === 'BUTTON' ? el : el.querySelector('button') || el).click(); };
  const LABELS = {h: 'hallucinated', c: 'contradicts', o: 'other'};
  const NAMES = {hallucinated: 'wrong in the picture', contradicts: 'contradicts itself', other: 'other'};
  const box = () => document.querySelector('#sp-spans textarea, #sp-spans input');
  const marks = () => { try { const v = JSON.parse((box() || {}).value || '[]'); return Array.isArray(v) ? v : []; } catch (_) { return []; } };
  function save(list) {
    const b = box(); if (!b) return;
    b.value = list.length ? JSON.stringify(list) : '';
    b.dispatchEvent(new Event('input', {bubbles: true}));
    paint(true);
  }
  const cellOf = (w) => w.closest('[data-p]');
  let painted = '';
  function paint(force) {
    const table = document.querySelector('#sp-compare table');
    const sig = ((box() || {}).value || '') + '|' + (table ? table.dataset.spSeen || (table.dataset.spSeen = String(Math.random())) : '');
    if (!force && sig === painted) return;
    painted = sig;
    const list = marks();
    document.querySelectorAll('#sp-compare .sp-w').forEach((w) => w.classList.remove('sp-marked-hallucinated', 'sp-marked-contradicts', 'sp-marked-other'));
    list.forEach((m) => document.querySelectorAll(`#sp-compare [data-p="${Number(m.pos)}"] .sp-w`).forEach((w) => {
      if (+w.dataset.s >= m.start && +w.dataset.e <= m.end) w.classList.add('sp-marked-' + m.label);
    }));
    const ul = document.getElementById('sp-marks-list');
    if (!ul) return;
    ul.replaceChildren();
    list.forEach((m, i) => {
      const words = [...document.querySelectorAll(`#sp-compare [data-p="${Number(m.pos)}"] .sp-w`)]
        .filter((w) => +w.dataset.s >= m.start && +w.dataset.e <= m.end).map((w) => w.textContent).join(' ');
      const li = document.createElement('li');
      li.textContent = `Story ${String.fromCharCode(65 + Number(m.pos))}: “${words}” (${NAMES[m.label] || m.label}) `;
      const rm = document.createElement('button');
      rm.type = 'button'; rm.className = 'sp-unmark'; rm.dataset.i = String(i); rm.textContent = '×';
      rm.setAttribute('aria-label', 'remove this mark');
      li.appendChild(rm); ul.appendChild(li);
    });
  }
  setInterval(() => paint(false), 250);
  function markSelection(label) {
    const sel = window.getSelection();
    if (!sel || sel.isCollapsed || !sel.rangeCount) return false;
    const range = sel.getRangeAt(0);
    const words = [...document.querySelectorAll('#sp-compare .sp-markable .sp-w')].filter((w) => range.intersectsNode(w));
    if (!words.length) return false;
    const pos = cellOf(words[0]).dataset.p;
    const mine = words.filter((w) => cellOf(w).dataset.p === pos);
    const start = Math.min(...mine.map((w) => +w.dataset.s)), end = Math.max(...mine.map((w) => +w.dataset.e));
    save([...marks(), {pos: Number(pos), start, end, label}]);
    sel.removeAllRanges();
    return true;
  }
  document.addEventListener('mousedown', (e) => { if (e.target.closest && e.target.closest('.sp-mark')) e.preventDefault(); });
  document.addEventListener('click', (e) => {
    const mark = e.target.closest && e.target.closest('.sp-mark');
    if (mark) { markSelection(mark.dataset.label); return; }
    const rm = e.target.closest && e.target.closest('.sp-unmark');
    if (rm) { const list = marks(); list.splice(Number(rm.dataset.i), 1); save(list); }
  });
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
    const key = e.key.toLowerCase();
    if (LABELS[key] && shown('sp-span-tools') && markSelection(LABELS[key])) { e.preventDefault(); return; }
    let id;
    if (shown('sp-rank-actions')) {
      if (/^[1-8]$/.test(key) && document.getElementById('sp-rank-' + (+key - 1))) {
        // The next story in order of preference: its rank is the next free one, or, after '=', the last one given.
        const checked = [...document.querySelectorAll('[id^="sp-rank-"] input[type="radio"]:checked')].map((i) => +i.value);
        const rank = document.body.dataset.spTie === '1' && checked.length ? Math.max(...checked) : checked.length + 1;
        document.body.dataset.spTie = '';
        const input = document.querySelector(`#sp-rank-${+key - 1} input[type="radio"][value="${rank}"]`);
        if (input) { e.preventDefault(); input.click(); }
        return;
      }
      if (key === '=') { document.body.dataset.spTie = '1'; e.preventDefault(); return; }
      id = {'enter': 'sp-rank-submit', 'backspace': 'sp-rank-clear', 'x': 'sp-all-bad', 's': 'sp-rank-skip', 'u': 'sp-rank-undo'}[key];
    } else {
      id = {'1': 'sp-a', '2': 'sp-b', '0': 'sp-tie', 'x': 'sp-bad', 's': 'sp-skip', 'u': 'sp-undo'}[key];
    }
    if (id && document.getElementById(id)) { e.preventDefault(); press(id); }
  });
})();
</script>
"""
KEYS_HELP = (
    '<div class="sp-keys">Keys: <kbd>1</kbd> A &nbsp; <kbd>2</kbd> B &nbsp; <kbd>0</kbd> tie &nbsp; '
    "<kbd>x</kbd> both bad &nbsp; <kbd>s</kbd> skip &nbsp; <kbd>u</kbd> undo. Ranking: press the stories' numbers best first "
    "(<kbd>=</kbd> before one ties it with the last), <kbd>Enter</kbd> submits, <kbd>Backspace</kbd> clears.</div>"
)
SPAN_TOOLS = (
    '<div class="sp-span-tools">Select words in a story, then mark them: '
    '<button type="button" class="sp-mark" data-label="hallucinated">Wrong in the picture <kbd>h</kbd></button> '
    '<button type="button" class="sp-mark" data-label="contradicts">Contradicts itself <kbd>c</kbd></button> '
    '<button type="button" class="sp-mark" data-label="other">Other <kbd>o</kbd></button>'
    '<ul id="sp-marks-list" class="sp-marks-list"></ul></div>'
)


@dataclass(frozen=True)
class Session:
    """What one browser tab remembers between events."""

    assignment: Assignment | None = None
    token: str = ""
    served_at: float = 0.0
    last_item_id: int | None = None
    skipped: frozenset[int] = field(default_factory=frozenset)
    project: str | None = None  # the project picked in this tab (None: the app's default)


class LabelingApp:
    """The handlers of the labeling app, bound to a database; `project` is the one shown first."""

    def __init__(self, session_factory, project: str, media_root: Path, *, leases: str = "auto", lease_seconds: float = LEASE_SECONDS):
        self.sessions = session_factory
        self.project_name = project  # the default; each tab may pick another (Session.project)
        self.media_root = media_root
        # What is handed out and not answered yet, shared by all users on purpose. In the database
        # (`DbLeases`) wherever several app processes may share it, PostgreSQL by default; in this
        # process on SQLite, which one process serves.
        if leases == "auto":
            leases = "process" if session_factory.kw["bind"].dialect.name == "sqlite" else "db"
        if leases not in ("db", "process"):
            raise ValueError(f"leases: db, process or auto, not {leases!r}")
        self.leases = DbLeases(session_factory, lease_seconds) if leases == "db" else Leases(lease_seconds)
        self.reads = read_session_factory(session_factory)  # choosing and rendering never block voting
        self._totals: dict[int, tuple[float, tuple[int, int]]] = {}  # project id -> progress, refreshed every few s
        self._stats_cache: dict[str, tuple[tuple, tuple]] = {}  # project -> (the votes' fingerprint, the vote statistics)
        self.last_refresh_seconds: dict[str, float] = {}  # where the last Admin refresh spent its time

    # -- helpers ------------------------------------------------------------------------------

    def _user(self, s, request: gr.Request | None) -> Annotator:
        user = annotator_by_name(s, getattr(request, "username", None))
        if user is None:
            raise gr.Error("You are not logged in (or your account is disabled). Reload the page and log in.")
        return user

    def _project(self, s, user: Annotator, state: Session | None = None) -> Project | None:
        """The tab's project if `user` may label it; with none picked, the app's default, or else the
        newest project they may label; None when they may label none."""
        name = state.project if state is not None and state.project else None
        project = s.scalar(select(Project).where(Project.name == (name or self.project_name)))
        if project is not None and may_label(s, user, project):
            return project
        if name is not None:  # picked in this tab, then unassigned (or never theirs): say so
            raise gr.Error(f"You are not assigned to the project {name!r}. Pick another project, or ask an admin to assign you.")
        visible = visible_projects(s, user)
        return visible[0] if visible else None

    def _serve(self, s, user: Annotator, project: Project | None, state: Session, assignment: Assignment | None = None) -> Session:
        token = secrets.token_hex(16)
        if project is None:  # no project this annotator may label
            return replace(state, assignment=None, token=token, served_at=time.time())
        if isinstance(self.leases, DbLeases):  # choose and lease in one write transaction, across workers
            if assignment is None:
                assignment = self.leases.serve(token, user.id, project, lambda w, held: next_assignment(
                    w, user.id, project, last_item_id=state.last_item_id, skipped=state.skipped, in_flight=held))  # fmt: skip
            elif not assignment.is_repeat:  # undo re-serves a known comparison inside its own write (`s`)
                self.leases.take(token, user.id, project.id, assignment.comparison_id, session=s)
            return replace(state, assignment=assignment, token=token, served_at=time.time())
        with self.leases.lock:  # choose and lease in one step, so concurrent annotators spread out
            # A fresh snapshot: votes are committed before their leases are released, so inside the
            # lock every released lease's vote is visible and nothing is counted zero times.
            if assignment is None:
                s.commit()  # (undo re-serves a known comparison inside its write; it chooses nothing)
                assignment = next_assignment(
                    s, user.id, project, last_item_id=state.last_item_id, skipped=state.skipped, in_flight=self.leases.counts()
                )
            if assignment is not None and not assignment.is_repeat:
                self.leases.take(token, assignment.comparison_id)
        return replace(state, assignment=assignment, token=token, served_at=time.time())

    def _project_totals(self, s, project: Project) -> tuple[int, int]:
        at, totals = self._totals.get(project.id, (0.0, (0, 0)))
        if time.monotonic() - at > PROGRESS_TTL_SECONDS:  # a scan of every comparison: not on every click
            totals = project_progress(s, project)
            self._totals[project.id] = (time.monotonic(), totals)
        return totals

    @staticmethod
    def _controls(project: Project | None, n_ranked: int = 0, spans: str = "") -> list:
        """Updates for what is asked besides the view: strength, aspects, rationale, the rank radios, the
        pair and rank buttons, the span box and tools. `n_ranked`: the stories of a ranking (0: a pair)."""
        pair = n_ranked == 0
        aspects = set(project.aspects or []) if project is not None and pair else set()
        ask_strength = project is not None and project.ask_strength and pair
        ranks = [gr.update(value=None, visible=i < n_ranked, choices=[str(r) for r in range(1, n_ranked + 1)] or ["1"],
                           label=f"Rank of story {chr(ord('A') + i)} (1 = best)") for i in range(MAX_RANK_K)]  # fmt: skip
        return ([gr.update(value=None, visible=ask_strength)] + [gr.update(value=None, visible=x in aspects) for x in ASPECTS]
                + [gr.update(value="")] + ranks + [gr.update(visible=pair), gr.update(visible=not pair), gr.update(value=spans),
                   gr.update(visible=bool(project is not None and project.span_marks))])  # fmt: skip

    def _view(self, s, user: Annotator, project: Project | None, state: Session, show_diff: bool, notice: str = "") -> tuple:
        if project is None:
            reset = [gr.update(value=None, visible=False) for _ in range(1 + len(ASPECTS))] + self._controls(None)[1 + len(ASPECTS):]
            nothing = "### No project for you yet\nYou are not assigned to any project. Ask your project admin to assign you."
            return (state, "", nothing, "", "", *reset, notice)
        prog = progress(s, user.id, project, self._project_totals(s, project))
        bar = (
            f'<div class="sp-progress">You: <b>{prog.mine}</b> answers · project: <b>{prog.done}</b> / {prog.target} votes '
            f'<progress max="{max(prog.target, 1)}" value="{prog.done}" style="width:40%"></progress> {prog.fraction:.0%}</div>'
        )
        a = state.assignment
        if a is None:
            done = "### All done\nThere is nothing left for you to label in this project. Thank you!"
            return (state, "", done, bar, "", *self._controls(project), notice)
        comp = s.get(Comparison, a.comparison_id)
        item = s.get(Item, comp.item_id)
        if comp.candidate_ids:  # a ranking: every story of the set, in this annotator's order
            order = shown_order_for(user.id, comp, a.is_repeat)
        else:
            order = [comp.candidate_a_id, comp.candidate_b_id][:: 1 if a.shown_left == "a" else -1]
        texts = dict(s.execute(select(Candidate.id, Candidate.text).where(Candidate.id.in_(order))).all())
        urls = [f"/gradio_api/file={self.media_root / img.path}" for img in item.images]
        style = f" &nbsp;·&nbsp; style: **{html.escape(item.style)}**" if item.style else ""
        header = f"### {html.escape(item.instruction)}\n{len(urls)} frame{'s' if len(urls) != 1 else ''}{style}"
        if comp.candidate_ids:
            header += f" &nbsp;·&nbsp; **rank these {len(order)} stories** (1 = best; equal ranks for a tie)"
        if item.context:
            header += f"\n\n> Story so far: {html.escape(item.context)}"
        table = render_stories([texts[i] for i in order], urls, show_diff=show_diff and len(order) == 2, word_offsets=project.span_marks)
        spans = ""
        if a.editing_vote_id and project.span_marks:  # undo: the marks of the withdrawn answer, to edit
            old = s.get(Vote, a.editing_vote_id)
            shown = [{"pos": order.index(m["candidate_id"]), "start": m["start"], "end": m["end"], "label": m["label"]}
                     for m in (old.spans or []) if m["candidate_id"] in order]  # fmt: skip
            spans = json.dumps(shown) if shown else ""
        controls = self._controls(project, len(order) if comp.candidate_ids else 0, spans)
        return (state, state.token, header, bar, table, *controls, notice)

    # -- events -------------------------------------------------------------------------------

    def load(self, show_diff: bool = False, request: gr.Request | None = None):
        """The first view of a tab: the default project (or the newest the annotator may label), the
        project picker filled with the projects they may label, and the Admin tab for admins."""
        with self.reads() as s:
            user = self._user(s, request)
            project = self._project(s, user)
            state = self._serve(s, user, project, Session(project=project.name if project else None))
            view = self._view(s, user, project, state, show_diff)
            names = [p.name for p in visible_projects(s, user)]
            admin = user.role == "admin"
            picker = gr.update(choices=names, value=project.name if project else None, visible=len(names) > 1)
            admin_picker = gr.update(choices=names, value=project.name if project else None) if admin else gr.update()
            return (*view, self._guidelines(project), gr.update(visible=admin), picker, admin_picker)

    def switch(self, name: str, show_diff: bool, state: Session | None, request: gr.Request | None = None):
        """Label another project: the one picked, if this annotator may label it."""
        state = state or Session()
        with self.reads() as s:
            user = self._user(s, request)
            project = s.scalar(select(Project).where(Project.name == name)) if name else None
            if project is None or not may_label(s, user, project):
                raise gr.Error(f"You are not assigned to the project {name!r}. Ask an admin to assign you.")
            old_token = state.token
            state = self._serve(s, user, project, Session(project=project.name))
            view = self._view(s, user, project, state, show_diff)
        self.leases.release(old_token)
        return (*view, self._guidelines(project))

    @staticmethod
    def _guidelines(project: Project | None) -> str:
        return (project.guidelines or "_No guidelines for this project._") if project else ""

    def vote(
        self,
        answer: str,
        token: str,
        strength: str | None,
        aspect_values: tuple[str | None, ...],
        rationale: str,
        show_diff: bool,
        state: Session | None,
        request: gr.Request | None = None,
        *,
        ranks: list[int] | None = None,
        spans: str | None = None,
    ):
        """Record the answer on the page and serve the next one. A pair: `answer` is left, right, tie or
        both_bad. A ranking: "rank" with `ranks` (one per story shown), or "all_bad". `spans`: the span
        marks as the page keeps them (JSON). An incomplete ranking or an unreadable mark is refused with
        the page left as it is, so nothing typed is lost."""
        state = state or Session()
        if state.assignment is None or token != state.token:
            # A second click on an answer already recorded, or a stale page: show where we are.
            with self.reads() as s:
                user = self._user(s, request)
                return self._view(s, user, self._project(s, user, state), state, show_diff)
        try:
            marks = json.loads(spans) if spans and spans.strip() else None
        except ValueError:
            raise gr.Error("The word marks on this page could not be read; remove them and mark again.") from None
        a = state.assignment
        with self.sessions.begin() as s:  # the write: one short transaction
            user = self._user(s, request)
            self._project(s, user, state)  # still theirs? (an unassigned annotator's answer is refused)
            try:
                _, created = record_vote(
                    s,
                    user.id,
                    a,
                    answer,
                    client_token=token,
                    strength=STRENGTHS.index(strength) + 1 if strength in STRENGTHS else None,
                    aspects={k: v for k, v in zip(ASPECTS, aspect_values) if v},
                    rationale=rationale,
                    time_spent_ms=int((time.time() - state.served_at) * 1000) if state.served_at else None,
                    ranks=ranks,
                    spans=marks,
                )
                notice = ""
            except (RankError, SpanError) as e:  # fixable on this page: keep it
                raise gr.Error(str(e)) from None
            except VoteError as e:
                gr.Warning(str(e))
                notice = f"⚠️ {e}"
        self.leases.release(token)  # after the commit: until then the lease stands in for the vote
        with self.reads() as s:
            project = self._project(s, user, state)
            state = self._serve(s, user, project, replace(state, last_item_id=a.item_id))
            return self._view(s, user, project, state, show_diff, notice)

    def vote_handler(self, answer: str):
        """`vote` bound to one answer, as a plain function with type hints. (A functools.partial hides
        its hints from Gradio, which then never passes the gr.Request, so no user would be known.)"""

        def handler(token, strength, grounding, coherence, style, fluency, rationale, show_diff, state, spans: str | None = None,
                    request: gr.Request = None):  # fmt: skip
            aspects = (grounding, coherence, style, fluency)  # the order of db.ASPECTS
            return self.vote(answer, token, strength, aspects, rationale, show_diff, state, request=request, spans=spans)

        handler.__name__ = f"vote_{answer}"
        return handler

    def rank_handler(self, answer: str):
        """`vote` for a ranking: "rank" (the rank radios, in the order shown) or "all_bad"."""

        def handler(token, r0, r1, r2, r3, r4, r5, r6, r7, spans, rationale, show_diff, state, request: gr.Request):
            state = state or Session()
            ranks = None
            if answer == "rank":
                given = [r0, r1, r2, r3, r4, r5, r6, r7]
                n = self._ranked_count(state, request)
                ranks = [int(r) if r not in (None, "") else None for r in given[:n]]
                if any(r is None for r in ranks):
                    missing = ", ".join(chr(ord("A") + i) for i, r in enumerate(ranks) if r is None)
                    raise gr.Error(f"Give every story a rank first (missing: {missing}); equal ranks make a tie.")
            return self.vote(answer, token, None, (None,) * len(ASPECTS), rationale, show_diff, state, request=request, ranks=ranks,
                             spans=spans)  # fmt: skip

        handler.__name__ = f"rank_{answer}"
        return handler

    def _ranked_count(self, state: Session, request) -> int:
        """How many stories the tab's current assignment shows (0 without one)."""
        if state.assignment is None:
            return 0
        with self.reads() as s:
            self._user(s, request)
            return len(s.get(Comparison, state.assignment.comparison_id).candidate_id_list)

    def clear_ranks(self):
        return [gr.update(value=None) for _ in range(MAX_RANK_K)]

    def skip(self, show_diff: bool, state: Session | None, request: gr.Request | None = None):
        state = state or Session()
        with self.reads() as s:
            user = self._user(s, request)
            project = self._project(s, user, state)
            a = state.assignment
            skipped = state.skipped | {a.comparison_id} if a else state.skipped
            old_token = state.token
            state = self._serve(s, user, project, replace(state, skipped=skipped, last_item_id=a.item_id if a else None))
            view = self._view(s, user, project, state, show_diff)
        self.leases.release(old_token)
        return view

    def undo(self, show_diff: bool, state: Session | None, request: gr.Request | None = None):
        state = state or Session()
        with self.sessions.begin() as s:
            user = self._user(s, request)
            project = self._project(s, user, state)
            again = undo_last(s, user.id, project) if project is not None else None
            if again is None:
                return self._view(s, user, project, state, show_diff, "Nothing to undo.")
            old_token = state.token
            state = self._serve(s, user, project, state, assignment=again)
            view = self._view(s, user, project, state, show_diff, "Your last answer was withdrawn: answer it again.")
        self.leases.release(old_token)
        return view

    def redraw(self, show_diff: bool, state: Session | None, request: gr.Request | None = None):
        with self.reads() as s:
            user = self._user(s, request)
            state = state or Session()
            return self._view(s, user, self._project(s, user, state), state, show_diff)

    # -- admin --------------------------------------------------------------------------------

    def _admin_or_none(self, s, request) -> Annotator | None:
        user = annotator_by_name(s, getattr(request, "username", None))
        return user if user is not None and user.role == "admin" else None

    def clear_stats_cache(self) -> None:
        self._stats_cache = {}

    def _admin_project(self, s, name: str | None) -> str:
        """The project an admin view is about: the one picked in the Admin tab, else the app's default."""
        name = name or self.project_name
        if s.scalar(select(Project.id).where(Project.name == name)) is None:
            raise gr.Error(f"There is no project {name!r}; pick one from the list.")
        return name

    def admin_refresh(self, project: str | None = None, request: gr.Request | None = None):
        """Statistics of `project` (default: the app's) for admins; for anybody else, nothing at all.

        The vote statistics are cached per project until its votes change (a new vote, an edit or an
        undo changes the fingerprint: the number of active votes and the newest vote id).
        """
        empty = (None, "", None, None, None, "", None)
        timing, t = {}, time.perf_counter()
        with self.reads() as s:
            if self._admin_or_none(s, request) is None:
                return empty
            project = self._admin_project(s, project)
            key = self._votes_fingerprint(s, project)
            cached = project in self._stats_cache and self._stats_cache[project][0] == key
            if not cached:
                votes, cells = self._vote_facts(s, project)
                rankings = self._rankings(s, project)
            verdicts = self._verdicts(s, project)
        timing["query"] = time.perf_counter() - t
        if cached:
            people, summary, board, majorities = self._stats_cache[project][1]
        else:
            t = time.perf_counter()
            people = pd.DataFrame(stats.annotator_report(votes))
            timing["annotators"] = time.perf_counter() - t
            t = time.perf_counter()
            agreement = stats.agreement_report(votes)
            timing["agreement"] = time.perf_counter() - t
            t = time.perf_counter()
            board = pd.DataFrame(
                [{"origin": b.name, "strength": round(b.strength, 3), "ci_low": round(b.low, 3), "ci_high": round(b.high, 3),
                  "games": b.games} for b in stats.bradley_terry_counts(cells)],  # fmt: skip
                columns=["origin", "strength", "ci_low", "ci_high", "games"],  # an empty board keeps its header
            )
            timing["bradley_terry"] = time.perf_counter() - t
            kappas = "".join(f"<li>{html.escape(k)}: κ = {v}</li>" for k, v in agreement["kappa_per_annotator"].items())
            summary = (
                f"**Krippendorff's α** (−1/0/+1): {agreement['krippendorff_alpha']} · **mean pairwise Cohen's κ**: "
                f"{agreement['mean_pairwise_kappa']} · comparisons with 2+ votes: {agreement['units_with_2plus_votes']}"
                f"<ul>{kappas}</ul>"
            )
            if rankings:
                ranked = stats.ranking_agreement(rankings)
                summary += (f"\n\n**Rankings**: {len(rankings)} · **mean Kendall's τ-b** between annotators: {ranked['mean_kendall_tau']} "
                            f"· **α over the pairs they imply**: {ranked['alpha_implied_pairs']} · sets with 2+ rankings: "
                            f"{ranked['sets_with_2plus_rankings']}")  # fmt: skip
            majorities = stats.majorities(votes)
            self._stats_cache[project] = (key, (people, summary, board, majorities))
        t = time.perf_counter()
        counts_plot = people[["annotator", "votes"]] if len(people) else None
        table, tally = stats.model_verdicts((cid, item, majorities.get(cid), v) for cid, item, v in verdicts)
        if tally:
            share = lambda t: f" ({t['share']:.0%})" if t["decided"] else ""  # noqa: E731
            models = " · ".join(f"**{html.escape(name)}** agrees with the majority on {t['agree']} of {t['decided']}{share(t)}"
                                for name, t in tally.items())  # fmt: skip
            models += " decided comparisons. Disagreements first: where the model has not learned what people see, or people missed it."
        else:
            models = "No model verdicts yet: `python -m rlhf.verdicts --project NAME --reward_model DIR --clip_model NAME` sets them here."
        timing["verdicts"] = time.perf_counter() - t
        timing["cached"] = float(cached)
        self.last_refresh_seconds = timing
        return people, summary, board, counts_plot, board if len(board) else None, models, pd.DataFrame(table) if table else None

    def _votes_fingerprint(self, s, project: str) -> tuple:
        """(active votes, newest vote id) of the project: any vote, edit or undo changes it."""
        row = s.execute(
            select(func.count(Vote.id), func.max(Vote.id))
            .join(Comparison, Vote.comparison_id == Comparison.id)
            .join(Project, Comparison.project_id == Project.id)
            .where(Vote.active, Project.name == project)
        ).one()  # fmt: skip
        return (project, row[0], row[1])

    def _rankings(self, s, project: str) -> list[tuple[str, int, dict[int, int]]]:
        """The project's active rankings (not all-bad, not repeats) as (annotator, rank set, {candidate: rank})."""
        rows = s.execute(
            select(Annotator.username, Vote.comparison_id, Vote.ranking)
            .join(Annotator, Vote.annotator_id == Annotator.id)
            .join(Comparison, Vote.comparison_id == Comparison.id)
            .join(Project, Comparison.project_id == Project.id)
            .where(Vote.active, ~Vote.is_repeat, Vote.ranking.is_not(None), Project.name == project)
        ).all()  # fmt: skip
        return [(name, cid, dict(zip(r["shown"], r["ranks"]))) for name, cid, r in rows if r and r.get("ranks")]

    def _verdicts(self, s, project: str) -> list[tuple[int, str, dict]]:
        """(comparison id, item, {signal: (score a, score b)}) for the comparisons `rlhf.verdicts` scored."""
        rows = s.execute(
            select(Comparison.id, Comparison.candidate_a_id, Comparison.candidate_b_id, Item.external_id, Item.meta)
            .join(Item, Comparison.item_id == Item.id)
            .join(Project, Comparison.project_id == Project.id)
            .where(Project.name == project, cast(Item.meta, Text).like('%"verdicts"%'))
        ).all()  # fmt: skip
        out = []
        for cid, a, b, item, meta in rows:
            meta = json.loads(meta) if isinstance(meta, str) else meta or {}
            if (v := meta.get("verdicts", {}).get(f"{a}-{b}")) is not None:
                out.append((cid, item, v))
        return out

    def _vote_facts(self, s, project: str) -> tuple[pd.DataFrame, dict[tuple[str, str, float], int]]:
        """The project's active votes as a frame (`stats.VOTE_COLUMNS`), and the Bradley–Terry outcome
        counts per (origin of a, origin of b, score of a), counted in the database."""
        ca, cb = aliased(Candidate), aliased(Candidate)
        votes = _frame(s, vote_facts_query(project), stats.VOTE_COLUMNS)
        counted = s.execute(
            select(ca.origin, cb.origin, Vote.choice, func.count())
            .join(Comparison, Vote.comparison_id == Comparison.id)
            .join(ca, Comparison.candidate_a_id == ca.id)
            .join(cb, Comparison.candidate_b_id == cb.id)
            .join(Project, Comparison.project_id == Project.id)
            .where(Vote.active, ~Vote.is_repeat, Vote.choice.in_(["a", "b", "tie"]), Project.name == project)
            .group_by(ca.origin, cb.origin, Vote.choice)
        ).all()  # fmt: skip
        score = {"a": 1.0, "b": 0.0, "tie": 0.5}
        cells = {(a, b, score[c]): n for a, b, c, n in counted if a != b}
        return votes, cells

    def admin_export(self, fmt: str, aggregate: str, project: str | None = None, request: gr.Request | None = None):
        """The votes of `project` (default: the app's), for admins only."""
        with self.sessions() as s:
            if self._admin_or_none(s, request) is None:
                return None, ""
            project = self._admin_project(s, project)
            out_dir = Path(tempfile.mkdtemp(prefix="storypref-export-"))
            target = out_dir / ("preferences.jsonl" if fmt == "pairs" else f"preferences-{fmt}")
            result = export(s, target, fmt, aggregate=aggregate, project=project)
        if fmt != "pairs":  # a directory: hand it over as one zip
            import shutil

            target = Path(shutil.make_archive(str(target), "zip", target))
        return str(target), f"Exported {html.escape(project)}: {result.summary()}."


def _frame(s, stmt, columns: list[str]) -> pd.DataFrame:
    """The rows of `stmt` as a frame, fetched through the database driver's own cursor.

    At 100k rows SQLAlchemy's row objects (and pandas reading them) cost several times the query
    itself; the statement is still built and compiled by SQLAlchemy, its bound values rendered as
    escaped literals for this dialect.
    """
    conn = s.connection()
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(sql)
        return pd.DataFrame.from_records(cursor.fetchall(), columns=columns)
    finally:
        cursor.close()


def build_app(session_factory, project: str | None = None, *, concurrency_limit: int = 16, title: str = "storypref",
              leases: str = "auto", lease_seconds: float = LEASE_SECONDS) -> gr.Blocks:  # fmt: skip
    """The labeling UI for every project of the database; `project` (default: the most recent) is
    the one shown first to those who may label it."""
    with session_factory() as s:
        query = select(Project).order_by(Project.id.desc())
        row = s.scalar(query.where(Project.name == project) if project else query)
        if row is None:
            names = ", ".join(s.scalars(select(Project.name))) or "none yet"
            if project:
                raise ValueError(f"no project {project!r} (projects: {names}); pass one of them as --project, or ingest "
                                 f"items into it first: python -m annotate.ingest SOURCE --project {project}")  # fmt: skip
            raise ValueError("the database has no project yet; ingest items first (python -m annotate.ingest SOURCE "
                             "--project NAME), or start without --no-demo for the storyworld demo")  # fmt: skip
        media_root = Path(get_meta(s, "media_root") or DEFAULT_MEDIA_ROOT).resolve()
        settings = (row.name, row.ask_strength, list(row.aspects or []), row.span_marks)
    name, ask_strength, aspects, span_marks = settings
    app = LabelingApp(session_factory, name, media_root, leases=leases, lease_seconds=lease_seconds)

    with gr.Blocks(title=title) as demo:
        state = gr.State(None)
        with gr.Tab("Label"):
            picker = gr.Dropdown([name], value=name, label="Project", visible=False, elem_id="sp-project", interactive=True)
            with gr.Row():
                header = gr.Markdown()
                progress_bar = gr.HTML()
            with gr.Accordion("Guidelines", open=False):
                guidelines = gr.Markdown()
            compare = gr.HTML(elem_id="sp-compare")
            with gr.Row():
                show_diff = gr.Checkbox(label="Highlight differences", value=False, scale=1)
                gr.HTML(KEYS_HELP)
            with gr.Row():  # what each project asks besides the choice; the view shows the project's own
                strength = gr.Radio(STRENGTHS, label="How much better is your choice?", visible=ask_strength, scale=2)
                aspect_radios = [
                    gr.Radio(ASPECT_CHOICES, label=f"Better {aspect}", visible=aspect in aspects, scale=1)
                    for aspect in ASPECTS
                ]
            with gr.Row(elem_id="sp-ranks"):  # rank mode: one rank per story shown (the view shows as many as it has)
                rank_radios = [gr.Radio(["1"], label=f"Rank of story {chr(ord('A') + i)}", visible=False, elem_id=f"sp-rank-{i}",
                                        min_width=120) for i in range(MAX_RANK_K)]  # fmt: skip
            span_tools = gr.HTML(SPAN_TOOLS, visible=span_marks, elem_id="sp-span-tools")
            spans_box = gr.Textbox(value="", elem_id="sp-spans", elem_classes=["sp-hidden"], show_label=False, container=False)
            rationale = gr.Textbox(label="Why? (optional)", lines=1, max_lines=4)
            with gr.Row(elem_id="sp-rank-actions", visible=False) as rank_actions:
                rank_submit = gr.Button("Submit ranking", variant="primary", elem_id="sp-rank-submit")
                all_bad = gr.Button("All bad", variant="stop", elem_id="sp-all-bad")
                rank_clear = gr.Button("Clear ranks", elem_id="sp-rank-clear", variant="secondary")
                rank_skip = gr.Button("Skip", elem_id="sp-rank-skip", variant="secondary")
                rank_undo = gr.Button("Undo last", elem_id="sp-rank-undo", variant="secondary")
            with gr.Row(elem_id="sp-actions") as pair_actions:
                buttons = {
                    "left": gr.Button("A is better", variant="primary", elem_id="sp-a"),
                    "right": gr.Button("B is better", variant="primary", elem_id="sp-b"),
                    "tie": gr.Button("Tie", elem_id="sp-tie"),
                    "both_bad": gr.Button("Both bad", variant="stop", elem_id="sp-bad"),
                }
                skip = gr.Button("Skip", elem_id="sp-skip", variant="secondary")
                undo = gr.Button("Undo last", elem_id="sp-undo", variant="secondary")
            notice = gr.Markdown(elem_id="sp-notice")
            token = gr.Textbox(visible=False, elem_id="sp-token")
        with gr.Tab("Admin", visible=False) as admin_tab:
            with gr.Row():
                admin_project = gr.Dropdown([name], value=name, label="Project", elem_id="sp-admin-project", interactive=True, scale=3)
                refresh = gr.Button("Refresh statistics", scale=1)
            people = gr.Dataframe(label="Annotators: votes, speed, gold accuracy, left share (0.5 = unbiased), self-consistency")
            agreement = gr.Markdown()
            board = gr.Dataframe(label="Bradley–Terry leaderboard of candidate origins (log-strength, 95% bootstrap CI)")
            with gr.Row():
                votes_plot = gr.BarPlot(x="annotator", y="votes", title="Votes per annotator", y_lim=[0, None])
                board_plot = gr.BarPlot(x="origin", y="strength", title="Origin strength (Bradley–Terry)", sort="-y")
            model_summary = gr.Markdown()
            model_table = gr.Dataframe(label="Model vs people: each signal's pick (a / b) beside the annotators' majority, disagreements first")
            with gr.Row():
                fmt = gr.Dropdown(["pairs", "trl", "hf"], value="trl", label="Export format")
                aggregate = gr.Dropdown(list(AGGREGATES), value="majority", label="Aggregate")
                export_btn = gr.Button("Export")
            export_file = gr.File(label="Download")
            export_msg = gr.Markdown()

        view = [state, token, header, progress_bar, compare, strength, *aspect_radios, rationale, *rank_radios, pair_actions, rank_actions,
                spans_box, span_tools, notice]  # fmt: skip
        demo.load(app.load, inputs=[show_diff], outputs=[*view, guidelines, admin_tab, picker, admin_project], api_name="load",
                  concurrency_limit=concurrency_limit)  # fmt: skip
        picker.input(app.switch, [picker, show_diff, state], [*view, guidelines], api_name="switch_project", concurrency_limit=concurrency_limit)
        for answer, button in buttons.items():  # one handler, bound per answer
            button.click(
                app.vote_handler(answer),
                inputs=[token, strength, *aspect_radios, rationale, show_diff, state, spans_box],
                outputs=view,
                api_name=f"vote_{answer}",
                concurrency_limit=concurrency_limit,
            )
        for answer, button in (("rank", rank_submit), ("all_bad", all_bad)):
            button.click(app.rank_handler(answer), inputs=[token, *rank_radios, spans_box, rationale, show_diff, state], outputs=view,
                         api_name=f"rank_{answer}", concurrency_limit=concurrency_limit)  # fmt: skip
        rank_clear.click(app.clear_ranks, None, rank_radios, api_name=False, queue=False)
        for button, name in ((skip, "skip"), (rank_skip, False)):
            button.click(app.skip, [show_diff, state], view, api_name=name, concurrency_limit=concurrency_limit)
        for button, name in ((undo, "undo"), (rank_undo, False)):
            button.click(app.undo, [show_diff, state], view, api_name=name, concurrency_limit=concurrency_limit)
        show_diff.change(app.redraw, [show_diff, state], view, api_name="redraw", concurrency_limit=concurrency_limit)
        admin_outputs = [people, agreement, board, votes_plot, board_plot, model_summary, model_table]
        refresh.click(app.admin_refresh, [admin_project], admin_outputs, api_name="admin_stats")
        admin_tab.select(app.admin_refresh, [admin_project], admin_outputs, api_name=False)
        admin_project.input(app.admin_refresh, [admin_project], admin_outputs, api_name=False)
        export_btn.click(app.admin_export, [fmt, aggregate, admin_project], [export_file, export_msg], api_name="admin_export")
    demo.storypref_media_root = media_root  # for launch(): the only directory served besides the app
    return demo


def launch(demo: gr.Blocks, session_factory, *, host: str = "127.0.0.1", port: int = 7860, concurrency_limit: int = 16,
           login_throttle: LoginThrottle | None = None, **kwargs):  # fmt: skip
    """Serve `demo` with login against the annotator table. Binds to 127.0.0.1 unless told otherwise.

    Logins are throttled (`annotate.throttle`): by default 5 failures for one name or from one
    address within a minute pause that name or address for 5 minutes.
    """
    from starlette.middleware import Middleware

    throttle = login_throttle or LoginThrottle()

    def check_login(username: str, password: str) -> bool:
        with session_factory() as s:
            return authenticate(s, username, password) is not None

    app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(LoginThrottleMiddleware, throttle=throttle)]
    demo.queue(default_concurrency_limit=concurrency_limit)
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=check_login,
        auth_message=f"Log in with the account your project admin gave you. After {throttle.max_failures} failed attempts "
        f"within {throttle.window_s:g} s, logins for that name or from that address pause for {throttle.lockout_s:g} s.",
        app_kwargs=app_kwargs,
        allowed_paths=[str(demo.storypref_media_root)],
        css=CSS,
        head=KEYS_JS,
        footer_links=[],
        **kwargs,
    )

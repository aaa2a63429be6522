"""The storypref data model, in SQLAlchemy 2.0 typed style.

One table per noun of the data model (docs/DESIGN.md): annotator, project, item, item_image, candidate, comparison
and vote, plus `storypref_meta` (schema version and media root). Votes are never deleted: an edit or
an undo marks the old row inactive and points it at the row that replaced it, so the full history of
every answer stays auditable. Comparisons keep their candidates in canonical order (lower id first),
and votes store the choice in those canonical terms plus which candidate was shown on the left.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

CHOICES = ("a", "b", "tie", "both_bad")
ROLES = ("annotator", "admin")
ASPECTS = ("grounding", "coherence", "style", "fluency")
MODES = ("pairwise", "rank")  # what an annotator is shown: two stories to choose from, or K to order
SPAN_LABELS = ("hallucinated", "contradicts", "other")  # what a span mark says is wrong with the words
MAX_RANK_K = 8


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, list[int]: JSON, dict[str, int]: JSON, list[dict[str, Any]]: JSON}


class Meta(Base):
    """Key/value facts about the database itself: `schema_version`, `media_root`."""

    __tablename__ = "storypref_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"Meta({self.key}={self.value!r})"


class Annotator(Base):
    __tablename__ = "annotator"
    __table_args__ = (CheckConstraint("role IN ('annotator', 'admin')", name="ck_annotator_role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # None for annotators that only exist through imported votes: they cannot log in.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    votes: Mapped[list[Vote]] = relationship(back_populates="annotator")

    def __repr__(self) -> str:
        return f"Annotator(id={self.id}, username={self.username!r}, role={self.role!r}, active={self.active})"


class Project(Base):
    __tablename__ = "project"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")
    overlap: Mapped[int] = mapped_column(Integer, default=3)  # votes wanted per comparison
    aspects: Mapped[list[str]] = mapped_column(JSON, default=list)  # subset of ASPECTS asked per vote
    ask_strength: Mapped[bool] = mapped_column(Boolean, default=False)
    gold_rate: Mapped[float] = mapped_column(Float, default=0.0)  # share of gold comparisons served
    repeat_rate: Mapped[float] = mapped_column(Float, default=0.0)  # share of position-swapped repeats
    # Schema 2: the kind of feedback asked. (Server defaults, so that an upgraded database fills them.)
    mode: Mapped[str] = mapped_column(String(16), default="pairwise", server_default="pairwise")  # MODES
    rank_k: Mapped[int] = mapped_column(Integer, default=4, server_default="4")  # stories per ranking (rank mode)
    span_marks: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # may mark words
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    items: Mapped[list[Item]] = relationship(back_populates="project")
    comparisons: Mapped[list[Comparison]] = relationship(back_populates="project")

    def __repr__(self) -> str:
        return f"Project(id={self.id}, name={self.name!r}, overlap={self.overlap})"


class Item(Base):
    __tablename__ = "item"
    __table_args__ = (UniqueConstraint("project_id", "source", "external_id", name="uq_item_external"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(255), default="")  # where the item came from
    external_id: Mapped[str] = mapped_column(String(255))
    instruction: Mapped[str] = mapped_column(Text)
    style: Mapped[str | None] = mapped_column(String(64))
    context: Mapped[str | None] = mapped_column(Text)  # the previous frames' story, if any
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    project: Mapped[Project] = relationship(back_populates="items")
    images: Mapped[list[ItemImage]] = relationship(
        back_populates="item", order_by="ItemImage.position", cascade="all, delete-orphan"
    )
    candidates: Mapped[list[Candidate]] = relationship(back_populates="item", cascade="all, delete-orphan")

    def __repr__(self) -> str:
        return f"Item(id={self.id}, external_id={self.external_id!r}, frames={len(self.images)})"


class ItemImage(Base):
    __tablename__ = "item_image"
    __table_args__ = (UniqueConstraint("item_id", "position", name="uq_item_image_position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("item.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # frame order, from 0
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(512))  # relative to the media root
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)

    item: Mapped[Item] = relationship(back_populates="images")

    def __repr__(self) -> str:
        return f"ItemImage(item_id={self.item_id}, position={self.position}, path={self.path!r})"


class Candidate(Base):
    __tablename__ = "candidate"
    __table_args__ = (UniqueConstraint("item_id", "origin", "text_sha256", name="uq_candidate_text"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("item.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    text_sha256: Mapped[str] = mapped_column(String(64))  # dedup key; long texts cannot be indexed
    origin: Mapped[str] = mapped_column(String(255), default="human")  # model@version, human, reference
    gen_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    item: Mapped[Item] = relationship(back_populates="candidates")

    def __repr__(self) -> str:
        return f"Candidate(id={self.id}, item_id={self.item_id}, origin={self.origin!r})"


class Comparison(Base):
    __tablename__ = "comparison"
    __table_args__ = (
        UniqueConstraint("candidate_a_id", "candidate_b_id", name="uq_comparison_pair"),
        CheckConstraint("candidate_a_id < candidate_b_id", name="ck_comparison_canonical"),
        CheckConstraint(
            "gold_choice IS NULL OR gold_choice IN ('a', 'b', 'tie', 'both_bad')", name="ck_comparison_gold"
        ),
        # The scheduler's query: comparisons of a project that still need votes, fewest first.
        Index("ix_comparison_pending", "project_id", "is_gold", "n_votes"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("item.id", ondelete="CASCADE"), index=True)
    candidate_a_id: Mapped[int] = mapped_column(ForeignKey("candidate.id", ondelete="CASCADE"))
    candidate_b_id: Mapped[int] = mapped_column(ForeignKey("candidate.id", ondelete="CASCADE"))
    overlap: Mapped[int | None] = mapped_column(Integer)  # votes wanted; None = the project's overlap
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    gold_choice: Mapped[str | None] = mapped_column(String(16))
    # Count of active, non-repeat votes, kept in the same transaction as the vote rows.
    n_votes: Mapped[int] = mapped_column(Integer, default=0)
    # Rank mode: every candidate shown together, ascending (candidate_a/b are its two lowest ids); None for a pair.
    candidate_ids: Mapped[list[int] | None] = mapped_column(JSON(none_as_null=True))
    gold_ranks: Mapped[dict[str, int] | None] = mapped_column(JSON(none_as_null=True))  # rank-mode gold: candidate id -> rank (1 best)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    @property
    def candidate_id_list(self) -> list[int]:
        """Every candidate this comparison shows, ascending: the pair, or the rank set."""
        return list(self.candidate_ids) if self.candidate_ids else [self.candidate_a_id, self.candidate_b_id]

    project: Mapped[Project] = relationship(back_populates="comparisons")
    item: Mapped[Item] = relationship()
    candidate_a: Mapped[Candidate] = relationship(foreign_keys=[candidate_a_id])
    candidate_b: Mapped[Candidate] = relationship(foreign_keys=[candidate_b_id])
    votes: Mapped[list[Vote]] = relationship(back_populates="comparison")

    def __repr__(self) -> str:
        return f"Comparison(id={self.id}, a={self.candidate_a_id}, b={self.candidate_b_id}, n_votes={self.n_votes})"


class Vote(Base):
    __tablename__ = "vote"
    __table_args__ = (
        CheckConstraint("choice IN ('a', 'b', 'tie', 'both_bad')", name="ck_vote_choice"),
        CheckConstraint("shown_left IN ('a', 'b')", name="ck_vote_shown_left"),
        CheckConstraint("strength IS NULL OR (strength BETWEEN 1 AND 4)", name="ck_vote_strength"),
        # At most one active labeling vote per (comparison, annotator); position-swapped repeats
        # (is_repeat) are quality-control probes and live beside it.
        Index(
            "uq_vote_active",
            "comparison_id",
            "annotator_id",
            unique=True,
            sqlite_where=text("active AND NOT is_repeat"),
            postgresql_where=text("active AND NOT is_repeat"),
        ),
        Index("ix_vote_annotator", "annotator_id", "created_at"),
        UniqueConstraint("annotator_id", "client_token", name="uq_vote_client_token"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparison.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"))
    choice: Mapped[str] = mapped_column(String(16))  # canonical: a = lower candidate id
    strength: Mapped[int | None] = mapped_column(Integer)  # 1 negligible .. 4 significantly better
    aspects: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # aspect -> canonical choice
    rationale: Mapped[str | None] = mapped_column(Text)
    shown_left: Mapped[str] = mapped_column(String(1))  # which canonical candidate was on the left
    time_spent_ms: Mapped[int | None] = mapped_column(Integer)
    client_token: Mapped[str] = mapped_column(String(64))  # idempotency key from the client
    is_repeat: Mapped[bool] = mapped_column(Boolean, default=False)
    # Rank mode, as given: {"shown": [candidate ids in the order shown], "ranks": [rank per shown story, 1 best,
    # equal = tie], "all_bad": bool}; `choice` then holds what it implies for candidates a and b.
    ranking: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    # Span marks: [{"candidate_id", "start", "end", "label", "text"}], offsets into the candidate's text.
    spans: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("vote.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    comparison: Mapped[Comparison] = relationship(back_populates="votes")
    annotator: Mapped[Annotator] = relationship(back_populates="votes")

    def __repr__(self) -> str:
        return (
            f"Vote(id={self.id}, comparison_id={self.comparison_id}, annotator_id={self.annotator_id}, "
            f"choice={self.choice!r}, active={self.active})"
        )


class ProjectMember(Base):
    """An annotator assigned to a project (`annotate.users assign NAME PROJECT`).

    A project with no members is open to every annotator; once it has one, only its members (and
    admins) see it in the app.
    """

    __tablename__ = "project_member"

    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id", ondelete="CASCADE"), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def __repr__(self) -> str:
        return f"ProjectMember(project_id={self.project_id}, annotator_id={self.annotator_id})"


class ComparisonPriority(Base):
    """How soon a comparison should get its votes (higher first), written by `rlhf.prioritize`.

    The scheduler serves a project's scored comparisons breadth-first: the highest priority among the
    least voted; it still honours the overlap, gold and repeats. Comparisons without a row wait until the scored ones are done.
    """

    __tablename__ = "comparison_priority"
    __table_args__ = (Index("ix_priority_project", "project_id", "priority"),)

    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparison.id", ondelete="CASCADE"), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    priority: Mapped[float] = mapped_column(Float)
    scored_by: Mapped[str] = mapped_column(String(255), default="")  # strategy and model, for the record
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def __repr__(self) -> str:
        return f"ComparisonPriority(comparison_id={self.comparison_id}, priority={self.priority:.3f})"


class Lease(Base):
    """An assignment handed out and not answered yet, shared by every app process on the database.

    It counts as a vote while the scheduler chooses, so concurrent annotators (on any worker) spread
    out instead of over-voting a comparison; it is deleted once the vote is committed, and one whose
    tab was closed (or whose worker died) stops counting at `expires_at` (Unix seconds).
    """

    __tablename__ = "lease"

    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparison.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id", ondelete="CASCADE"))
    expires_at: Mapped[float] = mapped_column(Float, index=True)

    def __repr__(self) -> str:
        return f"Lease(token={self.token[:8]}…, comparison={self.comparison_id}, annotator={self.annotator_id}, expires_at={self.expires_at:.0f})"


"""storypref's database layer: SQLAlchemy models, engine and session factory, schema version.

No UI code and no torch here. Import the names below; everything else is an implementation detail.
"""

from db.engine import (
    DEFAULT_MEDIA_ROOT,
    DEFAULT_URL,
    SCHEMA_VERSION,
    SchemaVersionError,
    check_schema,
    get_meta,
    init_db,
    make_engine,
    make_session_factory,
    open_db,
    read_session_factory,
    set_meta,
)
from db.models import (
    ASPECTS,
    CHOICES,
    Annotator,
    Base,
    Candidate,
    Comparison,
    ComparisonPriority,
    Item,
    ItemImage,
    Lease,
    Meta,
    Project,
    ProjectMember,
    Vote,
)

__all__ = [
    "ASPECTS",
    "CHOICES",
    "DEFAULT_MEDIA_ROOT",
    "DEFAULT_URL",
    "SCHEMA_VERSION",
    "Annotator",
    "Base",
    "Candidate",
    "Comparison",
    "ComparisonPriority",
    "Item",
    "ItemImage",
    "Lease",
    "Meta",
    "Project",
    "ProjectMember",
    "SchemaVersionError",
    "Vote",
    "check_schema",
    "get_meta",
    "init_db",
    "make_engine",
    "make_session_factory",
    "open_db",
    "read_session_factory",
    "set_meta",
]

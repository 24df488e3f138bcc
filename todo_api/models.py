"""The tasks table."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Index,
    MetaData,
    String,
    TypeDecorator,
    Uuid,
    case,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

STATUSES = ("pending", "in_progress", "completed")
PRIORITIES = ("low", "medium", "high")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """timestamptz in, aware UTC datetimes out, whatever the session's time zone (PostgreSQL returns that zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String(255))
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(String(1000))
    # `completed` is derived from status, so the two can never disagree in storage.
    status: Mapped[str] = mapped_column(String(16), default="pending")
    priority: Mapped[str] = mapped_column(String(8), default="medium")
    due_date: Mapped[datetime | None] = mapped_column(UTCDateTime)
    tags: Mapped[list[str]] = mapped_column(JSONB, default=list)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        CheckConstraint(f"status IN {STATUSES}", name="status"),
        CheckConstraint(f"priority IN {PRIORITIES}", name="priority"),
        CheckConstraint("(status = 'completed') = (completed_at IS NOT NULL)", name="completed_at"),
        Index("ix_tasks_user_created", "user_id", "created_at", "id"),
    )

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    is_completed = completed


# What every task read selects, in this order. schemas.task_to_dict unpacks rows and Task objects by these positions
# (its test holds its output equal to TaskSchema's, byte for byte).
TASK_COLUMNS = (
    Task.id, Task.user_id, Task.title, Task.description, Task.status, Task.priority, Task.due_date, Task.tags,
    Task.completed_at, Task.created_at, Task.updated_at,
)

class TaskCount(Base):
    """Each user's number of tasks, kept exact by database triggers on tasks (migration 0003), never by the app."""

    __tablename__ = "task_counts"

    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger)


# Sort keys: priority by rank (high > medium > low), titles case-insensitively. The indexes use the same expressions.
PRIORITY_RANK = case({"low": 1, "medium": 2, "high": 3}, value=Task.priority, else_=0)
TITLE_KEY = func.lower(Task.title)

# Each index lets one sort order be read from the index within one user's rows, instead of sorting them.
Index("ix_tasks_user_updated", Task.user_id, Task.updated_at, Task.id)
Index("ix_tasks_user_due", Task.user_id, Task.due_date, Task.id)
Index("ix_tasks_user_title", Task.user_id, TITLE_KEY, Task.id)
Index("ix_tasks_user_priority", Task.user_id, PRIORITY_RANK.self_group(), Task.id)

# Alembic cannot compare expression indexes faithfully (PostgreSQL reflects them with casts).
EXPRESSION_INDEXES = frozenset({"ix_tasks_user_priority", "ix_tasks_user_title"})


def include_in_autogenerate(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic `include_object` hook: leave expression indexes to hand-written migrations."""
    return not (type_ == "index" and name in EXPRESSION_INDEXES)


class JWKSDocument(Base):
    """The last good JWKS document fetched from each auth server, shared by every worker and instance (jwks.py)."""

    __tablename__ = "jwks_documents"

    url: Mapped[str] = mapped_column(String(2048), primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSONB)
    fetched_at: Mapped[datetime] = mapped_column(UTCDateTime)

"""Data access for tasks. Every function takes the user's id and filters on it; none commits."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import case, delete, func, literal, select, update
from sqlalchemy.orm import Session

from .models import Task, UTCDateTime, utcnow


class TaskNotFound(LookupError):
    """No such task for this user (it may exist for another user)."""


def _resolve_status(current: str, completed: bool | None, status: str | None) -> str:
    """The schema has already rejected contradictions between completed and status."""
    if status is not None:
        return status
    if completed is True:
        return "completed"
    if completed is False and current == "completed":
        return "pending"
    return current


def _apply(task: Task, changes: dict[str, Any], now: datetime) -> None:
    changes = dict(changes)
    new_status = _resolve_status(task.status, changes.pop("completed", None), changes.pop("status", None))
    for field, value in changes.items():
        setattr(task, field, value)
    if new_status != task.status:
        task.completed_at = now if new_status == "completed" else None
        task.status = new_status
    task.updated_at = now


def list_tasks(session: Session, user_id: str, *, page: int, page_size: int) -> tuple[list[Task], int]:
    """One page of the user's tasks, newest first, and the total count."""
    owned = Task.user_id == user_id
    total = session.scalar(select(func.count()).select_from(Task).where(owned)) or 0
    rows = session.scalars(
        select(Task)
        .where(owned)
        .order_by(Task.created_at.desc(), Task.id.desc())
        .limit(page_size)
        .offset((page - 1) * page_size)
    ).all()
    return list(rows), total


def get_task(session: Session, user_id: str, task_id: uuid.UUID) -> Task:
    task = session.scalar(select(Task).where(Task.id == task_id, Task.user_id == user_id))
    if task is None:
        raise TaskNotFound(task_id)
    return task


def create_task(session: Session, user_id: str, data: dict[str, Any]) -> Task:
    now = utcnow()
    task = Task(id=uuid.uuid4(), user_id=user_id, status="pending", priority="medium", tags=[], created_at=now)
    _apply(task, data, now)
    session.add(task)
    session.flush()
    return task


def update_task(session: Session, user_id: str, task_id: uuid.UUID, changes: dict[str, Any]) -> Task:
    task = get_task(session, user_id, task_id)
    _apply(task, changes, utcnow())
    session.flush()
    return task


def delete_task(session: Session, user_id: str, task_id: uuid.UUID) -> None:
    result = session.execute(delete(Task).where(Task.id == task_id, Task.user_id == user_id))
    if result.rowcount == 0:
        raise TaskNotFound(task_id)


def set_completed(session: Session, user_id: str, task_id: uuid.UUID, completed: bool | None) -> Task:
    """Toggle (completed=None) or set completion in one UPDATE, so concurrent toggles never lose an update."""
    now = utcnow()
    stamp = literal(now, UTCDateTime)
    was_completed = Task.status == "completed"
    if completed is None:
        values = {
            "status": case((was_completed, "pending"), else_="completed"),
            "completed_at": case((was_completed, None), else_=stamp),
        }
    elif completed:
        values = {"status": "completed", "completed_at": case((was_completed, Task.completed_at), else_=stamp)}
    else:
        values = {"status": case((was_completed, "pending"), else_=Task.status), "completed_at": None}
    task = session.scalar(
        update(Task)
        .where(Task.id == task_id, Task.user_id == user_id)
        .values(**values, updated_at=now)
        .returning(Task),
        execution_options={"synchronize_session": False, "populate_existing": True},
    )
    if task is None:
        raise TaskNotFound(task_id)
    return task

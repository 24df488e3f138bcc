"""Data access for tasks. Every lookup takes the user's id and filters on it; writes act on what a lookup returned.

Nothing here commits: the view commits once per request.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    Update,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal_column,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from .models import PRIORITIES, PRIORITY_RANK, TASK_COLUMNS, TITLE_KEY, Task, TaskCount, UTCDateTime, utcnow
from .web import to_json

SORT_KEYS: dict[str, ColumnElement[Any]] = {
    "created_at": Task.created_at,
    "updated_at": Task.updated_at,
    "due_date": Task.due_date,
    "priority": PRIORITY_RANK,
    "title": TITLE_KEY,
}


MAX_OFFSET = 2**53
ONE_MICROSECOND = timedelta(microseconds=1)
ONE_MICROSECOND_INTERVAL = literal_column("interval '1 microsecond'")


class TaskNotFound(LookupError):
    """No such task for this user (it may exist for another user)."""


class QuotaExceeded(Exception):
    """The user already holds as many tasks as the quota allows."""

    def __init__(self, quota: int) -> None:
        super().__init__(quota)
        self.quota = quota


def _resolve_status(current: str, completed: bool | None, status: str | None) -> str:
    """The schema has already rejected contradictions between completed and status."""
    if status is not None:
        return status
    if completed is True:
        return "completed"
    if completed is False and current == "completed":
        return "pending"
    return current


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _overdue(now: datetime) -> ColumnElement[bool]:
    # The IS NOT NULL keeps the expression two-valued, so NOT(overdue) includes tasks without a due date.
    return and_(Task.due_date.is_not(None), Task.due_date < now, Task.status != "completed")


def _text_matches(text: str) -> ColumnElement[bool]:
    pattern = f"%{_escape_like(text)}%"
    return or_(Task.title.ilike(pattern, escape="\\"), Task.description.ilike(pattern, escape="\\"))


def _true_or_not(condition: ColumnElement[bool], wanted: bool) -> ColumnElement[bool]:
    return condition if wanted else not_(condition)


# Each list parameter and the condition it puts on the tasks; a parameter that is absent or None adds none.
FILTERS: dict[str, Any] = {
    "completed": lambda value: _true_or_not(Task.status == "completed", value),
    "status": lambda value: None if value == "all" else Task.status == value,
    "priority": lambda values: Task.priority.in_(values) if values else None,
    # JSONB containment (@>): every tag given, served by a GIN index if one is ever added.
    "tag": lambda tags: Task.tags.contains(list(dict.fromkeys(tags))) if tags else None,
    "q": lambda text: _text_matches(text) if text else None,
    "due_before": lambda moment: Task.due_date < moment,
    "due_after": lambda moment: Task.due_date >= moment,
    "overdue": lambda value: _true_or_not(_overdue(utcnow()), value),
}


def _filters(params: dict[str, Any]) -> list[ColumnElement[bool]]:
    """Turn validated list parameters into WHERE conditions."""
    conditions = (make(params[name]) for name, make in FILTERS.items() if params.get(name) is not None)
    return [condition for condition in conditions if condition is not None]


def _ordering(sort: str, order: str) -> list[ColumnElement[Any]]:
    key = SORT_KEYS[sort]
    descending = order == "desc"
    primary = key.desc() if descending else key.asc()
    if sort == "due_date":
        primary = primary.nulls_last()
    return [primary, Task.id.desc() if descending else Task.id.asc()]


USER_TOTAL = select(TaskCount.total).where(TaskCount.user_id == bindparam("user_id"))


@functools.cache
def _unfiltered_page(sort: str, order: str) -> Select[Any]:
    """The page query of an unfiltered list, with the user's total; built once per ordering, as it is the hot path:
    SQLAlchemy then skips building the expression, its cache key and the adaptation of its cached result columns."""
    return (
        select(*TASK_COLUMNS, USER_TOTAL.scalar_subquery().label("user_total"))
        .where(Task.user_id == bindparam("user_id"))
        .order_by(*_ordering(sort, order))
        .limit(bindparam("page_size"))
        .offset(bindparam("offset"))
    )


def is_newest_unfiltered(params: dict[str, Any]) -> bool:
    """Whether validated list parameters ask for list_tasks' default: no filter, newest first (fetch_newest_page)."""
    return params.get("sort", "created_at") == "created_at" and params.get("order", "desc") == "desc" and (
        not _filters(params)
    )


def list_tasks(
    session: Session, user_id: str, params: dict[str, Any], *, page: int, page_size: int
) -> tuple[list[Sequence[Any]], int]:
    """One page of the user's tasks (rows of TASK_COLUMNS), filtered and ordered, and the total under the filters.

    Core rows rather than ORM objects: a 1,000-task page is read-only and this halves its cost. Without filters the
    total is the user's row in task_counts, read by the page's own query (one round trip, one snapshot). With
    filters it is counted (a scan of the user's matching rows), and only when the page cannot tell it: a page that
    is neither full nor empty ends the list, so the total is its offset plus its length.
    """
    filters = _filters(params)
    sort, order = params.get("sort", "created_at"), params.get("order", "desc")
    offset = (page - 1) * page_size
    if offset >= MAX_OFFSET:  # no database accepts such an OFFSET, and no user has that many tasks
        return [], _count(session, user_id, filters)
    total = None
    if filters:
        query = (
            select(*TASK_COLUMNS)
            .where(Task.user_id == user_id, *filters)
            .order_by(*_ordering(sort, order))
            .limit(page_size)
            .offset(offset)
        )
        rows = list(session.connection().execute(query))
    else:
        bounds = {"user_id": user_id, "page_size": page_size, "offset": offset}
        page_rows = session.connection().execute(_unfiltered_page(sort, order), bounds).all()
        rows = [row[:-1] for row in page_rows]  # the user's total rides as the last column
        total = page_rows[0][-1] if page_rows else None
    if 0 < len(rows) < page_size:
        return rows, offset + len(rows)
    return rows, total if total is not None else _count(session, user_id, filters)


def _count(session: Session, user_id: str, filters: list[ColumnElement[bool]]) -> int:
    if not filters:
        return session.scalar(USER_TOTAL, {"user_id": user_id}) or 0
    return session.scalar(select(func.count()).select_from(Task).where(Task.user_id == user_id, *filters)) or 0


def summarize(session: Session, user_id: str) -> dict[str, Any]:
    """Counts by status and priority, and overdue, in one query."""
    def count_where(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.count().filter(condition)

    columns = [
        func.count().label("total"),
        *(count_where(Task.status == status).label(status) for status in ("completed", "pending", "in_progress")),
        count_where(_overdue(utcnow())).label("overdue"),
        *(count_where(Task.priority == priority).label(priority) for priority in PRIORITIES),
    ]
    row = session.execute(select(*columns).where(Task.user_id == user_id)).one()._mapping
    return {
        "total": row["total"],
        "completed": row["completed"],
        "pending": row["pending"],
        "in_progress": row["in_progress"],
        "overdue": row["overdue"],
        "by_priority": {priority: row[priority] for priority in PRIORITIES},
    }


# Built once: SQLAlchemy then reuses its compiled form without rebuilding the expression or its cache key.
READ_TASK = select(*TASK_COLUMNS).where(Task.id == bindparam("task_id"), Task.user_id == bindparam("user_id"))
LOAD_TASK = select(Task).where(Task.id == bindparam("task_id"), Task.user_id == bindparam("user_id"))
LOCK_TASK = LOAD_TASK.with_for_update()  # for writes: the row stays as read and checked until the write commits


def read_task(session: Session, user_id: str, task_id: uuid.UUID) -> Row[Any]:
    """The user's task as a Core row of TASK_COLUMNS, for reads: no ORM object to build, track and discard."""
    row = session.connection().execute(READ_TASK, {"task_id": task_id, "user_id": user_id}).first()
    if row is None:
        raise TaskNotFound(task_id)
    return row


def get_task(session: Session, user_id: str, task_id: uuid.UUID, *, for_update: bool = False) -> Task:
    """The user's task; `for_update` locks the row until commit (for writes)."""
    task = session.scalar(LOCK_TASK if for_update else LOAD_TASK, {"task_id": task_id, "user_id": user_id})
    if task is None:
        raise TaskNotFound(task_id)
    return task


def delete_task(session: Session, task: Task) -> None:
    """Delete a task loaded through get_task; TaskNotFound if a concurrent request deleted it first."""
    deleted = session.execute(delete(Task).where(Task.id == task.id, Task.user_id == task.user_id))
    if deleted.rowcount == 0:
        raise TaskNotFound(task.id)


@functools.cache
def _completion_update(completed: bool | None) -> Update:
    """UPDATE ... RETURNING for a toggle (None) or a set; built once per kind."""
    now = bindparam("now", type_=UTCDateTime())
    was_completed = Task.status == "completed"
    if completed is None:
        values = {
            "status": case((was_completed, "pending"), else_="completed"),
            "completed_at": case((was_completed, None), else_=now),
        }
    elif completed:
        values = {"status": "completed", "completed_at": case((was_completed, Task.completed_at), else_=now)}
    else:
        values = {"status": case((was_completed, "pending"), else_=Task.status), "completed_at": None}
    return (
        update(Task)
        .where(Task.id == bindparam("task"), Task.user_id == bindparam("owner"))  # not column names: SET uses those
        # Strictly after the version it replaces (see update_task): a toggle that waited for another's row lock
        # computes this on the version that one wrote, whatever the clocks say.
        .values(**values, updated_at=func.greatest(now, Task.updated_at + ONE_MICROSECOND_INTERVAL))
        .returning(Task)
    )


def set_completed(session: Session, user_id: str, task_id: uuid.UUID, completed: bool | None) -> Task:
    """Toggle (completed=None) or set completion in one UPDATE, so concurrent toggles never lose an update."""
    task = session.scalar(
        _completion_update(completed),
        {"task": task_id, "owner": user_id, "now": utcnow()},
        execution_options={"synchronize_session": False, "populate_existing": True},
    )
    if task is None:
        raise TaskNotFound(task_id)
    return task


# --- The hot path: one constant SQL string per statement, on the request's DBAPI connection (db.HotConnection) ------
# The same statements as READ_TASK, _unfiltered_page("created_at", "desc") and _completion_update(None), written
# out: Core's execution cost about 250 µs of CPU per request around them (bench/inprocess.py). Rows are tuples of
# TASK_COLUMNS, typed as Core's (UUID, UTC datetimes, the tags list): the engine's connections parse them so.


class Executor(Protocol):
    def execute(self, statement: str, parameters: dict[str, Any]) -> Any: ...


TASK_SELECT_LIST = ", ".join(column.key for column in TASK_COLUMNS)
FETCH_TASK_SQL = f"SELECT {TASK_SELECT_LIST} FROM tasks WHERE id = %(task_id)s AND user_id = %(user_id)s"
# The page's ids as text: orjson writes the string as it would the UUID (PostgreSQL's text form is the canonical
# one, as str(uuid)), and psycopg2's uuid.UUID for each of 50 rows was ~12% of the page's CPU.
PAGE_SELECT_LIST = TASK_SELECT_LIST.replace("id, ", "id::text AS text_id, ", 1)
FETCH_NEWEST_PAGE_SQL = (
    f"SELECT {PAGE_SELECT_LIST}, (SELECT total FROM task_counts WHERE user_id = %(user_id)s) FROM tasks "
    # Qualified: the index's own columns (ix_tasks_user_created), never an output column of the same name.
    "WHERE tasks.user_id = %(user_id)s ORDER BY tasks.created_at DESC, tasks.id DESC "
    "LIMIT %(page_size)s OFFSET %(offset)s"
)
TOGGLE_TASK_SQL = (
    "UPDATE tasks SET status = CASE WHEN status = 'completed' THEN 'pending' ELSE 'completed' END, "
    "completed_at = CASE WHEN status = 'completed' THEN NULL ELSE %(now)s END, "
    "updated_at = GREATEST(%(now)s, updated_at + interval '1 microsecond') "
    f"WHERE id = %(task_id)s AND user_id = %(user_id)s RETURNING {TASK_SELECT_LIST}"
)


def _utc_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """Datetimes in UTC whatever the session's time zone, as models.UTCDateTime gives them. psycopg2 gives the
    timezone.utc singleton for a zero offset, so the usual case is four identity checks."""
    due, completed_at, created, updated = row[6], row[8], row[9], row[10]
    if updated.tzinfo is UTC and created.tzinfo is UTC and (due is None or due.tzinfo is UTC) and (
        completed_at is None or completed_at.tzinfo is UTC
    ):
        return row
    return tuple(value.astimezone(UTC) if isinstance(value, datetime) else value for value in row)


def fetch_task(connection: Executor, user_id: str, task_id: uuid.UUID) -> tuple[Any, ...]:
    """read_task on a DBAPI connection: the user's task as a tuple of TASK_COLUMNS; TaskNotFound if none."""
    row = connection.execute(FETCH_TASK_SQL, {"task_id": str(task_id), "user_id": user_id}).fetchone()
    if row is None:
        raise TaskNotFound(task_id)
    return _utc_row(row)


def fetch_newest_page(connection: Executor, user_id: str, *, page: int, page_size: int) -> tuple[list[Any], int]:
    """list_tasks without filters, newest first (its default order), on a DBAPI connection: the page's rows and
    the user's total. The same totals rule as list_tasks. The rows' ids are strings (the same JSON)."""
    offset = (page - 1) * page_size
    if offset >= MAX_OFFSET:
        return [], _user_total(connection, user_id)
    page_rows = connection.execute(
        FETCH_NEWEST_PAGE_SQL, {"user_id": user_id, "page_size": page_size, "offset": offset}
    ).fetchall()
    rows = [_utc_row(row[:-1]) for row in page_rows]  # the user's total rides as the last column
    if 0 < len(rows) < page_size:
        return rows, offset + len(rows)
    if page_rows:
        return rows, page_rows[0][-1] or 0
    return rows, _user_total(connection, user_id)


def _user_total(connection: Executor, user_id: str) -> int:
    row = connection.execute("SELECT total FROM task_counts WHERE user_id = %(user_id)s", {"user_id": user_id})
    found = row.fetchone()
    return found[0] if found else 0


def toggle_task(connection: Executor, user_id: str, task_id: uuid.UUID, now: datetime | None = None) -> tuple[Any, ...]:
    """set_completed(..., None) on a DBAPI connection: toggle in one UPDATE, the task as a tuple of TASK_COLUMNS;
    TaskNotFound if the user has no such task. The caller commits."""
    parameters = {"task_id": str(task_id), "user_id": user_id, "now": now or utcnow()}
    row = connection.execute(TOGGLE_TASK_SQL, parameters).fetchone()
    if row is None:
        raise TaskNotFound(task_id)
    return _utc_row(row)


# A create in one string, so one round trip: PostgreSQL runs the statements of a simple query as one transaction
# (an implicit one in autocommit; inside the request's transaction otherwise). The first locks the user's
# task_counts row until that transaction ends, creating it at 0 for a user's first task: concurrent creates of one
# user queue there, and each INSERT then reads the count the previous one committed (every statement takes a new
# snapshot under READ COMMITTED), so none overshoots the quota, and no task is counted by a scan (1.6-1.8 ms at
# 10,000 tasks). The insert trigger (migration 0003) updates the row the transaction holds. No row back: the quota.
# Measured with wrk against the Session and ORM create (BEGIN, lock, INSERT, COMMIT): see README, Performance.
LOCK_USER_TOTAL_SQL = (
    "INSERT INTO task_counts (user_id, total) VALUES (%(user_id)s, 0) "
    "ON CONFLICT (user_id) DO UPDATE SET total = task_counts.total"
)
CREATE_TASK_SQL = (
    f"{LOCK_USER_TOTAL_SQL}; "
    f"INSERT INTO tasks ({TASK_SELECT_LIST}) "
    "SELECT %(id)s::uuid, %(user_id)s, %(title)s, %(description)s, %(status)s, %(priority)s, "
    "%(due_date)s::timestamptz, %(tags)s::jsonb, %(completed_at)s::timestamptz, %(now)s, %(now)s "
    "WHERE (SELECT total FROM task_counts WHERE user_id = %(user_id)s) < %(quota)s "
    f"RETURNING {TASK_SELECT_LIST}"
)


def create_task(connection: Executor, user_id: str, data: dict[str, Any], *, quota: int) -> tuple[Any, ...]:
    """A new task for the user, from validated fields (TaskCreateSchema's), as a tuple of TASK_COLUMNS;
    QuotaExceeded if the user already holds `quota` tasks. The caller commits (a no-op in autocommit)."""
    now = utcnow()
    status = _resolve_status("pending", data.get("completed"), data.get("status"))
    parameters = {
        "id": str(uuid.uuid4()), "user_id": user_id, "title": data["title"], "description": data.get("description"),
        "status": status, "priority": data.get("priority", "medium"), "due_date": data.get("due_date"),
        "tags": to_json(data.get("tags", [])).decode(), "completed_at": now if status == "completed" else None,
        "now": now, "quota": quota,
    }
    row = connection.execute(CREATE_TASK_SQL, parameters).fetchone()
    if row is None:
        raise QuotaExceeded(quota)
    return _utc_row(row)


# The fields an update may set as sent; status and completed_at follow from `status` and `completed`.
UPDATABLE_FIELDS = ("title", "description", "priority", "due_date", "tags")


@functools.cache
def _update_task_sql(fields: tuple[str, ...], sets_status: bool, sets_completed: bool) -> str:
    """The UPDATE ... RETURNING for one combination of fields sent, built once. The status rules are
    _resolve_status's, on the row's current status (SET reads the old values): `status` wins; completed=true
    completes; completed=false reopens a completed task and leaves any other status. completed_at changes only
    with the status: now on completing, NULL on reopening."""
    sets = [f"{name} = %({name})s::jsonb" if name == "tags" else f"{name} = %({name})s" for name in fields]
    new_status = "status"
    if sets_status:
        new_status = "%(status)s"
    elif sets_completed:
        new_status = "CASE WHEN %(completed)s THEN 'completed' WHEN status = 'completed' THEN 'pending' ELSE status END"
    if new_status != "status":
        sets.append(f"status = {new_status}")
        sets.append(f"completed_at = CASE WHEN ({new_status}) = status THEN completed_at "
                    f"WHEN ({new_status}) = 'completed' THEN %(now)s END")
    # Strictly after the version it replaces, whatever the clocks say (a clock step, another instance's skew, two
    # writes within one microsecond): the ETag is made of id and updated_at (tasks.task_etag). A write that waited
    # for another's row lock evaluates this on the version that one wrote.
    sets.append("updated_at = GREATEST(%(now)s, updated_at + interval '1 microsecond')")
    return (f"UPDATE tasks SET {', '.join(sets)} WHERE id = %(task_id)s AND user_id = %(user_id)s "
            f"RETURNING {TASK_SELECT_LIST}")


def update_task(connection: Executor, user_id: str, task_id: uuid.UUID, changes: dict[str, Any]) -> tuple[Any, ...]:
    """Apply validated changes (TaskWriteSchema's) to the user's task in one UPDATE; the task as a tuple of
    TASK_COLUMNS; TaskNotFound if the user has no such task. One statement, so in autocommit it is its own
    transaction; a caller that checked preconditions first runs it in the transaction that locked the row."""
    fields = tuple(name for name in UPDATABLE_FIELDS if name in changes)
    parameters = {name: changes[name] for name in fields}
    if "tags" in parameters:
        parameters["tags"] = to_json(parameters["tags"]).decode()
    sets_status, sets_completed = changes.get("status") is not None, changes.get("completed") is not None
    parameters.update(task_id=str(task_id), user_id=user_id, now=utcnow(), status=changes.get("status"),
                      completed=changes.get("completed"))
    row = connection.execute(_update_task_sql(fields, sets_status, sets_completed), parameters).fetchone()
    if row is None:
        raise TaskNotFound(task_id)
    return _utc_row(row)

"""Marshmallow schemas: strict input validation, the task representation, and the error envelope."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from .models import PRIORITIES, STATUSES, TASK_COLUMNS, Task

SERVER_MANAGED = ("id", "user_id", "created_at", "updated_at", "completed_at")
MAX_TAGS = 20
TITLE_RULES = [
    validate.Length(min=1, error="Title must not be blank."),
    validate.Length(max=200, error="Title must be at most 200 characters."),
]


class StrictBoolean(fields.Boolean):
    """Only JSON true/false: "true" or 1 are not booleans."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class Text(fields.String):
    """A string without NUL characters (PostgreSQL cannot store them), optionally trimmed."""

    def __init__(self, *, trim: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trim = trim

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise ValidationError("Must not contain NUL characters.")
        return text.strip() if self.trim else text


class UTCDateTime(fields.AwareDateTime):
    """RFC 3339 in, UTC out; a timestamp without an offset is read as UTC."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(format="iso", default_timezone=UTC, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        parsed = super()._deserialize(value, attr, data, **kwargs)
        try:
            return parsed.astimezone(UTC)
        except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00 is in year 10000 in UTC
            raise self.make_error("invalid", input=value, obj_type=self.OBJ_TYPE) from None


class Tags(fields.List):
    """Trimmed, de-duplicated tags, at most MAX_TAGS of them."""

    def __init__(self, **kwargs: Any) -> None:
        tag = Text(trim=True, validate=validate.Length(1, 50, error="Each tag must be 1 to 50 characters."))
        super().__init__(tag, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        tags = list(dict.fromkeys(super()._deserialize(value, attr, data, **kwargs)))
        if len(tags) > MAX_TAGS:
            raise ValidationError(f"At most {MAX_TAGS} distinct tags.")
        return tags


def _one_of(choices: tuple[str, ...]) -> validate.OneOf:
    return validate.OneOf(choices, error=f"Must be one of: {', '.join(choices)}.")


class CompletionSchema(Schema):
    """Body of PATCH .../complete (optional: no body toggles, a value sets it); also the rules every write shares."""

    class Meta:
        unknown = RAISE

    completed = StrictBoolean()
    is_completed = StrictBoolean()

    @validates_schema
    def check_completion_agrees(self, data: dict[str, Any], **_kwargs: Any) -> None:
        completed, is_completed = data.get("completed"), data.get("is_completed")
        if completed is not None and is_completed is not None and completed != is_completed:
            raise ValidationError("completed and is_completed disagree.", "is_completed")
        completed = completed if completed is not None else is_completed
        status = data.get("status")
        if completed is not None and status is not None and completed != (status == "completed"):
            raise ValidationError(f"status {status!r} contradicts completed={str(completed).lower()}.", "status")

    @post_load
    def merge_completed(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        is_completed = data.pop("is_completed", None)
        if "completed" not in data and is_completed is not None:
            data["completed"] = is_completed
        return data


class TaskWriteSchema(CompletionSchema):
    """Fields a client may send on update; all optional."""

    title = Text(trim=True, validate=TITLE_RULES)
    description = Text(
        allow_none=True, validate=validate.Length(max=1000, error="Description must be at most 1000 characters.")
    )
    status = fields.String(validate=_one_of(STATUSES))
    priority = fields.String(validate=_one_of(PRIORITIES))
    due_date = UTCDateTime(allow_none=True)
    tags = Tags()

    @pre_load
    def drop_server_managed(self, data: Any, **_kwargs: Any) -> Any:
        """So a client can send back the object it received."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in SERVER_MANAGED}
        return data


class TaskCreateSchema(TaskWriteSchema):
    title = Text(trim=True, required=True, validate=TITLE_RULES)


def _task_dict(
    task_id: Any, user_id: str, title: str, description: str | None, status: str, priority: str,
    due_date: datetime | None, tags: list[str], completed_at: datetime | None, created_at: datetime,
    updated_at: datetime,
) -> dict[str, Any]:
    completed = status == "completed"
    return {
        "id": task_id, "user_id": user_id, "title": title, "description": description,
        "completed": completed, "is_completed": completed, "status": status, "priority": priority,
        "due_date": due_date, "tags": tags, "completed_at": completed_at,
        "created_at": created_at, "updated_at": updated_at,
    }


_task_values = attrgetter(*(column.key for column in TASK_COLUMNS))


def task_to_dict(task: Task | Sequence[Any]) -> dict[str, Any]:
    """TaskSchema's output, written out, for a Task or for a row of exactly TASK_COLUMNS (a row with any other
    columns is a TypeError, not a silently wrong task).

    The id and datetimes stay objects: orjson writes them in C exactly as marshmallow's fields would (str(uuid),
    isoformat()), and tests check the JSON is byte for byte marshmallow's. A 50-task page: ~0.4 ms -> ~0.04 ms.
    """
    return _task_dict(*(_task_values(task) if isinstance(task, Task) else task))


class TaskSchema(Schema):
    """A task as the API returns it. The fields document it; `dump` is the fast equivalent, ready for orjson."""

    id = fields.UUID(required=True)
    user_id = fields.String(required=True)
    title = fields.String(required=True)
    description = fields.String(allow_none=True, required=True)
    completed = fields.Boolean(required=True)
    is_completed = fields.Boolean(required=True)
    status = fields.String(required=True, validate=_one_of(STATUSES))
    priority = fields.String(required=True, validate=_one_of(PRIORITIES))
    due_date = fields.DateTime(format="iso", allow_none=True, required=True)
    tags = fields.List(fields.String(), required=True)
    completed_at = fields.DateTime(format="iso", allow_none=True, required=True)
    created_at = fields.DateTime(format="iso", required=True)
    updated_at = fields.DateTime(format="iso", required=True)

    def dump(self, obj: Any, *, many: bool | None = None) -> Any:
        many = self.many if many is None else many
        return [task_to_dict(task) for task in obj] if many else task_to_dict(obj)


class QueryBoolean(fields.Field):
    """Exactly `true` or `false` in a query string."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if value not in ("true", "false"):
            raise ValidationError("Must be true or false.")
        return value == "true"


SORT_FIELDS = ("created_at", "updated_at", "due_date", "priority", "title")
SORT_ALIASES = {"created": "created_at"}  # the plans' frontends send sort=created


class TaskListQuerySchema(Schema):
    """Filters and ordering of the list; unknown parameters are ignored."""

    class Meta:
        unknown = EXCLUDE

    completed = QueryBoolean()
    status = fields.String(load_default="all", validate=_one_of(("all", *STATUSES)))
    priority = fields.List(fields.String(validate=_one_of(PRIORITIES)), metadata={"description": "Repeatable."})
    tag = Tags(metadata={"description": f"Repeatable; the task must carry every tag given (at most {MAX_TAGS})."})
    q = Text(validate=validate.Length(max=200), metadata={"description": "Case-insensitive substring of title "
                                                                        "or description; % and _ are literal."})
    search = Text(validate=validate.Length(max=200), metadata={"description": "Alias of q."})
    due_before = UTCDateTime(metadata={"description": "due_date < this."})
    due_after = UTCDateTime(metadata={"description": "due_date >= this."})
    overdue = QueryBoolean(metadata={"description": "true: due before now and not completed."})
    sort = fields.String(load_default="created_at", validate=_one_of((*SORT_FIELDS, *SORT_ALIASES)),
                         metadata={"description": "created is an alias of created_at."})
    order = fields.String(load_default="desc", validate=_one_of(("asc", "desc")))

    @post_load
    def resolve_aliases(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        search = data.pop("search", None)
        data.setdefault("q", search)
        data["sort"] = SORT_ALIASES.get(data["sort"], data["sort"])
        return data


class SummarySchema(Schema):
    total = fields.Integer(required=True)
    completed = fields.Integer(required=True)
    pending = fields.Integer(required=True)
    in_progress = fields.Integer(required=True)
    overdue = fields.Integer(required=True)
    by_priority = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True,
                              metadata={"description": '{"low", "medium", "high"}'})


class MeSchema(Schema):
    user_id = fields.String(required=True)
    email = fields.String(allow_none=True, required=True)
    name = fields.String(allow_none=True, required=True)


class ErrorSchema(Schema):
    """The error envelope: every error response has this body."""

    detail = fields.String(required=True)
    errors = fields.Dict(
        keys=fields.String(), values=fields.List(fields.String()), metadata={"description": "422 only"}
    )


class HealthSchema(Schema):
    status = fields.String(required=True)

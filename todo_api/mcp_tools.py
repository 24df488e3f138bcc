"""The MCP tools: what an agent may do with the signed-in user's tasks, on the REST API's schemas and repositories.

Each tool's arguments are a marshmallow schema built from the ones that validate the REST API (schemas.py), and its
`inputSchema` is generated from that schema by apispec's converter (the one behind /openapi.json): one source for
both, never a hand-written copy. Results are dumped as the REST API dumps them (task_to_dict), and each tool's
`outputSchema` is generated from TaskSchema / SummarySchema the same way.

A handler gets the request's session and the token's user id; it reads and writes through repositories.py exactly
as the views of tasks.py do (writes lock the row FOR UPDATE first, completion is repo.set_completed's one UPDATE),
and never commits: the MCP view commits once, after a tool succeeded. A failure an agent can act on is a ToolError,
answered as a tool result with isError: true.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import current_app
from marshmallow import RAISE, Schema, ValidationError, fields, validate
from sqlalchemy.orm import Session
from werkzeug.http import quote_etag

from . import repositories as repo
from .db import SessionExecutor
from .models import Task
from .schemas import (
    CompletionSchema,
    StrictBoolean,
    SummarySchema,
    TaskCreateSchema,
    TaskListQuerySchema,
    TaskSchema,
    TaskWriteSchema,
    task_to_dict,
)
from .tasks import task_etag

LIST_PAGE_SIZE = 20
# A list page costs one rate-limit unit per 100 tasks on REST (limits.py); a tool call costs one, so its page is 100
# at most. Agents read the first page and narrow the filters rather than page through thousands of tasks.
MAX_LIST_PAGE_SIZE = 100
TASK_NOT_FOUND = "Task not found: no task with this task_id belongs to the signed-in user"


class ToolError(Exception):
    """A failure the agent can act on: answered as a tool result with isError: true, and nothing changed."""


# --- Arguments: the REST schemas, plus the ids a tool names its task and user by ---------------------------------


class UserArgument(Schema):
    user_id = fields.String(metadata={"description": "Optional: the signed-in user's id (the token's sub). Any "
                                                     "other value is refused; leave it out to act as the "
                                                     "signed-in user."})


class TaskIdArgument(Schema):
    task_id = fields.UUID(required=True, metadata={"description": "The task's id, as returned by add_task or "
                                                                  "list_tasks."})


class IfMatchArgument(Schema):
    if_match = fields.String(metadata={"description": "Optional: the etag of the task as last read (a result's "
                                                      "_meta[\"todo-api/etag\"], or REST's ETag). The change is "
                                                      "refused if the task has changed since."})


class AddTaskArguments(TaskCreateSchema, UserArgument):
    """POST /api/{user_id}/tasks's body."""


class UpdateTaskArguments(TaskWriteSchema, TaskIdArgument, IfMatchArgument, UserArgument):
    """PATCH /api/{user_id}/tasks/{id}'s body, plus the task."""


class CompleteTaskArguments(CompletionSchema, TaskIdArgument, IfMatchArgument, UserArgument):
    """PATCH .../complete's body, plus the task; `completed` defaults to true here (REST's empty body toggles, which
    an agent retrying a call would undo)."""

    completed = StrictBoolean(load_default=True, metadata={"description": "false marks the task not completed "
                                                                          "again. Default true."})


class TaskArguments(TaskIdArgument, UserArgument):
    """get_task."""

    class Meta:
        unknown = RAISE


class DeleteTaskArguments(TaskIdArgument, IfMatchArgument, UserArgument):
    class Meta:
        unknown = RAISE


class ListTasksArguments(TaskListQuerySchema, UserArgument):
    """GET /api/{user_id}/tasks's query, with JSON booleans instead of the query string's "true"/"false", a page size
    bounded for an agent's context, and unknown arguments refused (a misspelt filter must not silently list all)."""

    class Meta:
        unknown = RAISE

    overdue = StrictBoolean(metadata={"description": "true: due before now and not completed; false: the others."})
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=2**31 - 1),
                          metadata={"description": "Page number, from 1."})
    page_size = fields.Integer(load_default=LIST_PAGE_SIZE, validate=validate.Range(min=1, max=MAX_LIST_PAGE_SIZE),
                               metadata={"description": f"Tasks per page, at most {MAX_LIST_PAGE_SIZE}."})


class SummaryArguments(UserArgument):
    class Meta:
        unknown = RAISE


# --- Outputs --------------------------------------------------------------------------------------------------------


class TaskListSchema(Schema):
    tasks = fields.List(fields.Nested(TaskSchema), required=True)
    total = fields.Integer(required=True, metadata={"description": "Tasks matching the filters, on all pages."})
    page = fields.Integer(required=True)
    page_size = fields.Integer(required=True)
    has_more = fields.Boolean(required=True, metadata={"description": "Whether a later page has more tasks."})


class DeletedSchema(Schema):
    deleted = fields.Boolean(required=True)
    task_id = fields.UUID(required=True)


# --- Handlers -------------------------------------------------------------------------------------------------------


# A tool that returns a task returns the Task (or row): call() writes it as REST does and adds its ETag.


def add_task(session: Session, user_id: str, data: dict[str, Any]) -> tuple[Any, ...]:
    return repo.create_task(SessionExecutor(session), user_id, data, quota=current_app.config["TASK_QUOTA"])


def list_tasks(session: Session, user_id: str, params: dict[str, Any]) -> dict[str, Any]:
    page, page_size = params.pop("page"), params.pop("page_size")
    rows, total = repo.list_tasks(session, user_id, params, page=page, page_size=page_size)
    return {"tasks": [task_to_dict(row) for row in rows], "total": total, "page": page, "page_size": page_size,
            "has_more": page * page_size < total}


def get_task(session: Session, user_id: str, params: dict[str, Any]) -> Any:
    return repo.read_task(session, user_id, params["task_id"])


def find_unchanged(session: Session, user_id: str, task_id: uuid.UUID, if_match: str | None) -> Task:
    """The task for a write, locked FOR UPDATE until the write commits, as tasks._find_unchanged; with `if_match`,
    a ToolError unless it is the task's current ETag (quoted as REST sends it, or bare)."""
    task = repo.get_task(session, user_id, task_id, for_update=True)
    if if_match is not None:
        etag = task_etag(task)
        if if_match.strip() not in (etag, quote_etag(etag)):
            raise ToolError(f"if_match: the task has changed since that etag was read (it is now {quote_etag(etag)});"
                            " read it again before changing it")
    return task


def update_task(session: Session, user_id: str, params: dict[str, Any]) -> tuple[Any, ...]:
    task_id = params.pop("task_id")
    find_unchanged(session, user_id, task_id, params.pop("if_match", None))
    return repo.update_task(SessionExecutor(session), user_id, task_id, params)


def complete_task(session: Session, user_id: str, params: dict[str, Any]) -> Task:
    if params.get("if_match") is not None:  # the row stays locked, as checked, until the UPDATE commits
        find_unchanged(session, user_id, params["task_id"], params["if_match"])
    return repo.set_completed(session, user_id, params["task_id"], params["completed"])


def delete_task(session: Session, user_id: str, params: dict[str, Any]) -> dict[str, Any]:
    repo.delete_task(session, find_unchanged(session, user_id, params["task_id"], params.get("if_match")))
    return {"deleted": True, "task_id": params["task_id"]}


def task_summary(session: Session, user_id: str, _params: dict[str, Any]) -> dict[str, Any]:
    return repo.summarize(session, user_id)


# --- The registry ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str
    title: str
    description: str
    arguments: Schema
    output: Schema
    handler: Callable[[Session, str, dict[str, Any]], Any]
    read_only: bool = False
    destructive: bool = False
    idempotent: bool = False


TOOLS: dict[str, Tool] = {tool.name: tool for tool in (
    Tool("add_task", "Add a task",
         "Create a task for the signed-in user. Only title is required; priority defaults to medium.",
         AddTaskArguments(exclude=("completed", "is_completed")), TaskSchema(), add_task),
    Tool("list_tasks", "List tasks",
         "List the signed-in user's tasks, newest first unless sorted otherwise. Filters combine: status, q (text in "
         "title or description), priority (any of), tag (all of), overdue, due_before/due_after. Returns one page "
         f"(page_size, default {LIST_PAGE_SIZE}, at most {MAX_LIST_PAGE_SIZE}) and the total.",
         ListTasksArguments(exclude=("completed", "search")), TaskListSchema(), list_tasks, read_only=True),
    Tool("get_task", "Get a task", "One of the signed-in user's tasks, by task_id.",
         TaskArguments(), TaskSchema(), get_task, read_only=True),
    Tool("update_task", "Update a task",
         "Change the fields given (title, description, status, priority, due_date, tags, completed) of one of the "
         "signed-in user's tasks; the others stay as they are. description and due_date may be null to clear them.",
         UpdateTaskArguments(exclude=("is_completed",)), TaskSchema(), update_task, idempotent=True),
    Tool("complete_task", "Complete a task",
         "Mark one of the signed-in user's tasks completed (or, with completed: false, not completed). Calling it "
         "twice changes nothing more.",
         CompleteTaskArguments(exclude=("is_completed",)), TaskSchema(), complete_task, idempotent=True),
    Tool("delete_task", "Delete a task", "Delete one of the signed-in user's tasks, for good.",
         DeleteTaskArguments(), DeletedSchema(), delete_task, destructive=True),
    Tool("task_summary", "Summarize tasks",
         "Counts of the signed-in user's tasks: total, by status, overdue, and by priority.",
         SummaryArguments(), SummarySchema(), task_summary, read_only=True),
)}


def json_schema(schema: Schema) -> dict[str, Any]:
    """JSON Schema of a marshmallow schema, by apispec's converter (OpenAPI 3.1's dialect is JSON Schema; nested
    schemas inlined, since a tool's schema must stand alone)."""
    plugin = MarshmallowPlugin(schema_name_resolver=lambda _schema: None)
    APISpec("todo-api MCP tools", "1", "3.1.0", plugins=[plugin])  # binds the plugin's converter
    assert plugin.converter is not None
    generated = plugin.converter.schema2jsonschema(schema)
    generated.setdefault("properties", {})
    return generated


def tool_definitions() -> list[dict[str, Any]]:
    """The tools/list entries (plain dicts; the MCP view checks them against mcp.types.Tool once)."""
    definitions = []
    for tool in TOOLS.values():
        definitions.append({
            "name": tool.name,
            "title": tool.title,
            "description": tool.description,
            "inputSchema": json_schema(tool.arguments),
            "outputSchema": json_schema(tool.output),
            "annotations": {
                "title": tool.title,
                "readOnlyHint": tool.read_only,
                "destructiveHint": tool.destructive,
                "idempotentHint": tool.idempotent or tool.read_only,
                "openWorldHint": False,
            },
        })
    return definitions


def load_arguments(tool: Tool, arguments: dict[str, Any], user_id: str) -> dict[str, Any]:
    """The arguments validated by the tool's schema; ToolError naming each field that fails, or a foreign user_id."""
    arguments = dict(arguments)
    claimed = arguments.pop("user_id", None)
    if claimed is not None and claimed != user_id:
        raise ToolError("user_id: Must be the signed-in user's id, or left out. Tools act on the signed-in user's "
                        "tasks only.")
    try:
        return tool.arguments.load(arguments)
    except ValidationError as error:
        raise ToolError(f"Invalid arguments: {describe(error.messages)}") from None


def describe(messages: Any, prefix: str = "") -> str:
    """marshmallow's messages as one line an agent can act on: `title: Title must not be blank.; tags.0: ...`."""
    if isinstance(messages, dict):
        parts = []
        for field, inner in messages.items():
            name = "arguments" if field == "_schema" else f"{prefix}{field}"
            parts.append(describe(inner, f"{name}.") if isinstance(inner, dict) else f"{name}: {describe(inner)}")
        return "; ".join(parts)
    if isinstance(messages, list):
        return " ".join(str(message) for message in messages)
    return str(messages)


def call(tool: Tool, session: Session, user_id: str, arguments: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Run a tool for the user: its output and, for a task, the task's ETag (REST's, quoted). ToolError for what the
    agent can fix (arguments, an unknown task, a stale if_match, the quota)."""
    params = load_arguments(tool, arguments, user_id)
    try:
        result = tool.handler(session, user_id, params)
        if isinstance(tool.output, TaskSchema):
            return task_to_dict(result), quote_etag(task_etag(result))
        return result, None
    except repo.TaskNotFound:
        raise ToolError(TASK_NOT_FOUND) from None
    except repo.QuotaExceeded as error:
        raise ToolError(f"Task quota reached: a user may hold at most {error.quota} tasks; delete some to add "
                        "more") from None


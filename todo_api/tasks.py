"""The tasks blueprint: /api/{user_id}/tasks."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import flask_smorest
from flask import Response, current_app, url_for
from flask.views import MethodView
from flask_smorest.pagination import PaginationMetadataSchema, PaginationParameters
from werkzeug.http import quote_etag

from . import conditional, web
from . import repositories as repo
from .auth import require_path_user
from .db import SessionExecutor, get_hot_connection, get_session
from .errors import error_response
from .models import Task
from .parser import JSONParser
from .schemas import (
    CompletionSchema,
    SummarySchema,
    TaskCreateSchema,
    TaskListQuerySchema,
    TaskSchema,
    TaskWriteSchema,
    task_to_dict,
)

TASK_NOT_FOUND = "Task not found"
ETAG_DOC = {"ETag": conditional.ETAG}


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's, with the JSON-object body parser and decorators documenting errors and preconditions."""

    ARGUMENTS_PARSER = PAGINATION_ARGUMENTS_PARSER = JSONParser()

    # The two pagination hooks are the ones flask-smorest's docstrings invite overriding.
    @staticmethod
    def _make_pagination_metadata(page: int, page_size: int, item_count: int) -> dict[str, int]:
        # flask-smorest's, without dumping the plain dict of ints through a new PaginationMetadataSchema each time.
        if item_count == 0:
            return {"total": 0, "total_pages": 0}
        last_page = (item_count - 1) // page_size + 1
        metadata = {"total": item_count, "total_pages": last_page, "first_page": 1, "last_page": last_page}
        if page <= last_page:
            metadata["page"] = page
            if page > 1:
                metadata["previous_page"] = page - 1
            if page < last_page:
                metadata["next_page"] = page + 1
        return metadata

    def _document_pagination_metadata(self, spec: Any, resp_doc: dict[str, Any]) -> None:
        # X-Pagination's value is JSON, so OpenAPI 3 documents it with `content`: a `schema` of type object means
        # the `simple` style ("total,3,page,1"), which is not what is sent.
        resp_doc.setdefault("headers", {})[self.PAGINATION_HEADER_NAME] = {
            "description": "Pagination metadata, as JSON",
            "content": {"application/json": {"schema": PaginationMetadataSchema}},
        }

    def errors(self, *statuses: int) -> Callable[[Any], Any]:
        """Document error responses with the envelope (flask-smorest registers one component per status)."""

        def decorator(func: Any) -> Any:
            for status in statuses:
                func = self.alt_response(status, response=HTTPStatus(status).name)(func)
            return func

        return decorator

    def preconditions(self, *, not_modified: bool = False) -> Callable[[Any], Any]:
        """Document the optional If-Match and If-None-Match headers and their 412, and on reads the 304 (the view
        evaluates them: see conditional.py). The operation's parameters are these two: its path parameters are
        documented on the path, and its body as the request body."""

        def decorator(func: Any) -> Any:
            func = self.doc(parameters=[conditional.IF_MATCH, conditional.IF_NONE_MATCH])(func)
            func = self.errors(412)(func)
            if not_modified:
                func = self.alt_response(304, description="Not Modified: If-None-Match matched (no body)",
                                         headers=ETAG_DOC)(func)
            return func

        return decorator


blp = Blueprint(
    "tasks", __name__, url_prefix="/api/<string:user_id>/tasks", description="The signed-in user's tasks"
)
blp.before_request(require_path_user)


@blp.route("")
class Tasks(MethodView):
    @blp.errors(401, 403, 503)
    @blp.arguments(TaskListQuerySchema, location="query")
    @blp.response(200, TaskSchema(many=True), headers={"X-Total-Count": {"schema": {"type": "integer"}}})
    @blp.paginate(page_size=100, max_page_size=1000)
    def get(self, params: dict[str, Any], user_id: str, pagination_parameters: PaginationParameters) -> Any:
        """List the user's tasks: filters, sorting and paging."""
        if repo.is_newest_unfiltered(params):  # the frontend's list: the hot path
            rows, total = repo.fetch_newest_page(
                get_hot_connection(autocommit=True), user_id,
                page=pagination_parameters.page, page_size=pagination_parameters.page_size,
            )
            pagination_parameters.item_count = total
            return web.json_response([task_to_dict(row) for row in rows]), {"X-Total-Count": str(total)}
        tasks, total = repo.list_tasks(
            get_session(), user_id, params,
            page=pagination_parameters.page, page_size=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return tasks, {"X-Total-Count": str(total)}

    @blp.errors(400, 401, 403, 413, 415, 503)
    @blp.alt_response(409, schema="Error", description="The user's task quota (TASK_QUOTA) is reached")
    @blp.arguments(TaskCreateSchema)
    @blp.response(201, TaskSchema, headers={"Location": {"schema": {"type": "string"}}})
    def post(self, data: dict[str, Any], user_id: str) -> Any:
        """Create a task."""
        # The quota's lock and the INSERT in one string, which autocommit makes one transaction (repositories).
        connection = get_hot_connection(autocommit=True)
        task = repo.create_task(connection, user_id, data, quota=current_app.config["TASK_QUOTA"])
        connection.commit()
        response = web.json_response(task_to_dict(task), status=201)
        response.headers["Location"] = url_for("tasks.TaskById", user_id=user_id, task_id=task[0])
        return response


@blp.route("/summary")
class TaskSummary(MethodView):
    @blp.errors(401, 403, 503)
    @blp.response(200, SummarySchema)
    def get(self, user_id: str) -> dict[str, Any]:
        """Counts by status and priority, and overdue tasks, for dashboards."""
        return repo.summarize(get_session(), user_id)


@blp.errorhandler(repo.TaskNotFound)
def task_not_found(_error: repo.TaskNotFound) -> Response:
    """An unknown task, or another user's, whatever the preconditions."""
    return error_response(404, TASK_NOT_FOUND)


@blp.route("/<uuid:task_id>")
class TaskById(MethodView):
    @blp.preconditions(not_modified=True)
    @blp.errors(401, 403, 404, 503)
    @blp.response(200, TaskSchema, headers=ETAG_DOC)
    def get(self, user_id: str, task_id: uuid.UUID) -> Any:
        """Get one task (ETag; If-None-Match gives 304)."""
        task = repo.fetch_task(get_hot_connection(autocommit=True), user_id, task_id)
        etag = task_etag(task)
        conditional.evaluate(etag)
        return task_response(task, etag)

    @blp.preconditions()
    @blp.errors(400, 401, 403, 404, 413, 415, 503)
    @blp.arguments(TaskWriteSchema, required=False)  # optional: no body changes no field
    @blp.response(200, TaskSchema, headers=ETAG_DOC)
    def put(self, changes: dict[str, Any], user_id: str, task_id: uuid.UUID) -> Any:
        """Update the fields sent (If-Match gives 412 when stale)."""
        return _update(user_id, task_id, changes)

    @blp.preconditions()
    @blp.errors(400, 401, 403, 404, 413, 415, 503)
    @blp.arguments(TaskWriteSchema, required=False)  # optional: no body changes no field
    @blp.response(200, TaskSchema, headers=ETAG_DOC)
    def patch(self, changes: dict[str, Any], user_id: str, task_id: uuid.UUID) -> Any:
        """Update the fields sent; same as PUT."""
        return _update(user_id, task_id, changes)

    @blp.preconditions()
    @blp.errors(401, 403, 404, 503)
    @blp.response(204)
    def delete(self, user_id: str, task_id: uuid.UUID) -> Response:
        """Delete a task (If-Match honoured)."""
        session = get_session()
        repo.delete_task(session, _find_unchanged(user_id, task_id))
        session.commit()
        return web.no_content()


@blp.route("/<uuid:task_id>/complete")
class TaskCompletion(MethodView):
    @blp.preconditions()
    @blp.errors(400, 401, 403, 404, 413, 415, 503)
    @blp.arguments(CompletionSchema, required=False)
    @blp.response(200, TaskSchema, headers=ETAG_DOC)
    def patch(self, body: dict[str, Any], user_id: str, task_id: uuid.UUID) -> Any:
        """Toggle completion atomically, or set it with {"completed": true|false}."""
        if body.get("completed") is None and not conditional.requested():  # a plain toggle: the hot path
            # One UPDATE: in autocommit it is its own transaction, committed as it ends (no BEGIN, no COMMIT).
            connection = get_hot_connection(autocommit=True)
            task = repo.toggle_task(connection, user_id, task_id)
            connection.commit()
            return task_response(task)
        session = get_session()
        if conditional.requested():
            _find_unchanged(user_id, task_id)  # the row stays locked, as checked, until the UPDATE commits
        task = repo.set_completed(session, user_id, task_id, body.get("completed"))
        session.commit()
        return with_etag(task)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Part of every ETag: changing how a task is represented (a field added, a format changed) without its updated_at
# changing must change this, so that no client's 304 or If-Match holds across the change.
REPRESENTATION_VERSION = 1


def task_etag(task: Any) -> str:
    """The task's strong ETag (unquoted), from a Task, a Core row or a tuple of TASK_COLUMNS: its id and its
    updated_at in microseconds, in hex.

    Every write moves updated_at strictly forward (repositories.update_task and the completion UPDATEs), even when
    two writes serialise on the row's lock within one clock tick, and the representation is a function of the
    row: so the tag changes whenever the representation does. This replaced the SHA-1 of the task's sorted JSON,
    which dumped the task a second time: GET one 2 dumps -> 1 (see README, Performance).
    """
    if isinstance(task, Task):
        task_id, updated_at = task.id, task.updated_at
    else:
        task_id, updated_at = task[0], task[10]  # TASK_COLUMNS' id and updated_at
    return f"{task_id.hex}-{(updated_at - EPOCH) // repo.ONE_MICROSECOND:x}-{REPRESENTATION_VERSION}"


def task_response(task: Any, etag: str | None = None) -> Response:
    """The task's 200 response with its ETag, as bytes built once (@blp.response passes a Response through)."""
    response = web.json_response(task_to_dict(task))
    response.headers["ETag"] = quote_etag(etag or task_etag(task))
    return response


def with_etag(task: Any, etag: str | None = None) -> tuple[Any, dict[str, str]]:
    """The task and its ETag header, for @blp.response."""
    return task, {"ETag": quote_etag(etag or task_etag(task))}


def _find_unchanged(user_id: str, task_id: uuid.UUID) -> Task:
    """The task for a write, locked (FOR UPDATE) until the write commits, after its preconditions: 412 if they
    fail. The lock keeps the row as checked, and as read: a PUT that sets status writes completed_at from the row
    it read, which a concurrent toggle must not change in between (ck_tasks_completed_at, and the answer sent)."""
    task = repo.get_task(get_session(), user_id, task_id, for_update=True)
    if conditional.requested():
        conditional.evaluate(task_etag(task))
    return task


def _update(user_id: str, task_id: uuid.UUID, changes: dict[str, Any]) -> Response:
    if conditional.requested():  # the row locked and checked, then the UPDATE in the same transaction
        session = get_session()
        _find_unchanged(user_id, task_id)
        task = repo.update_task(SessionExecutor(session), user_id, task_id, changes)
        session.commit()
    else:  # one UPDATE: in autocommit it is its own transaction (no BEGIN, no lock taken ahead, no COMMIT)
        connection = get_hot_connection(autocommit=True)
        task = repo.update_task(connection, user_id, task_id, changes)
        connection.commit()
    return task_response(task)

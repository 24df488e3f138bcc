"""The tasks blueprint: /api/{user_id}/tasks."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import flask_smorest
from flask import Response, request, url_for
from flask.views import MethodView
from flask_smorest.etag import _get_etag_ctx
from flask_smorest.exceptions import NotModified
from flask_smorest.pagination import PaginationParameters

from . import repositories as repo
from .auth import require_path_user
from .db import get_session
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
)

TASK_NOT_FOUND = "Task not found"
OPTIONAL_IF_MATCH = {
    "name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "ETag from a previous response: 412 if the task changed since.",
}


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's ETag support, with If-Match optional (the contract asks for 412, never 428)."""

    ARGUMENTS_PARSER = PAGINATION_ARGUMENTS_PARSER = JSONParser()

    def _check_precondition(self) -> None:
        pass

    def check_etag(self, etag_data: Any, etag_schema: Any = None) -> None:
        if request.if_match:
            super().check_etag(etag_data, etag_schema)
        else:
            _get_etag_ctx()["etag_checked"] = True

    def _prepare_etag_doc(self, doc: dict[str, Any], doc_info: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        doc = super()._prepare_etag_doc(doc, doc_info, **kwargs)
        doc.get("responses", {}).pop(428, None)
        if "parameters" in doc:
            doc["parameters"] = [OPTIONAL_IF_MATCH if p == "IF_MATCH" else p for p in doc["parameters"]]
        return doc

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

    def errors(self, *statuses: int) -> Callable[[Any], Any]:
        """Document error responses with the envelope (flask-smorest registers one component per status)."""

        def decorator(func: Any) -> Any:
            for status in statuses:
                func = self.alt_response(status, response=HTTPStatus(status).name)(func)
            return func

        return decorator

    def _check_not_modified(self, etag: str) -> None:
        # A 304 carries the ETag it validated.
        if request.method in self.METHODS_CHECKING_NOT_MODIFIED and etag in request.if_none_match:
            not_modified = NotModified()
            not_modified.data = {"headers": {"ETag": f'"{etag}"'}}
            raise not_modified


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
        tasks, total = repo.list_tasks(
            get_session(), user_id, params,
            page=pagination_parameters.page, page_size=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return tasks, {"X-Total-Count": str(total)}

    @blp.errors(400, 401, 403, 413, 415, 503)
    @blp.arguments(TaskCreateSchema)
    @blp.response(201, TaskSchema, headers={"Location": {"schema": {"type": "string"}}})
    def post(self, data: dict[str, Any], user_id: str) -> Any:
        """Create a task."""
        session = get_session()
        task = repo.create_task(session, user_id, data)
        session.commit()
        return task, {"Location": url_for("tasks.TaskById", user_id=user_id, task_id=task.id)}


@blp.route("/summary")
class TaskSummary(MethodView):
    @blp.errors(401, 403, 503)
    @blp.response(200, SummarySchema)
    def get(self, user_id: str) -> dict[str, Any]:
        """Counts by status and priority, and overdue tasks, for dashboards."""
        return repo.summarize(get_session(), user_id)


@blp.errorhandler(repo.TaskNotFound)
def task_not_found(_error: repo.TaskNotFound) -> Response:
    """An unknown task, or another user's: one 404 for every view of the blueprint."""
    return error_response(404, TASK_NOT_FOUND)


@blp.route("/<uuid:task_id>")
class TaskById(MethodView):
    @blp.etag
    @blp.errors(401, 403, 404, 503)
    @blp.response(200, TaskSchema)
    def get(self, user_id: str, task_id: uuid.UUID) -> Any:
        """Get one task (ETag; If-None-Match gives 304)."""
        return repo.read_task(get_session(), user_id, task_id)

    @blp.etag
    @blp.errors(400, 401, 403, 404, 413, 415, 503)
    @blp.arguments(TaskWriteSchema, required=False)  # optional: no body changes no field
    @blp.response(200, TaskSchema)
    def put(self, changes: dict[str, Any], user_id: str, task_id: uuid.UUID) -> Any:
        """Update the fields sent (If-Match gives 412 when stale)."""
        return _update(user_id, task_id, changes)

    @blp.etag
    @blp.errors(400, 401, 403, 404, 413, 415, 503)
    @blp.arguments(TaskWriteSchema, required=False)  # optional: no body changes no field
    @blp.response(200, TaskSchema)
    def patch(self, changes: dict[str, Any], user_id: str, task_id: uuid.UUID) -> Any:
        """Update the fields sent; same as PUT."""
        return _update(user_id, task_id, changes)

    @blp.etag
    @blp.errors(401, 403, 404, 503)
    @blp.response(204)
    def delete(self, user_id: str, task_id: uuid.UUID) -> Response:
        """Delete a task (If-Match honoured)."""
        session = get_session()
        repo.delete_task(session, _find_unchanged(user_id, task_id))
        session.commit()
        return no_content()


@blp.route("/<uuid:task_id>/complete")
class TaskCompletion(MethodView):
    @blp.etag
    @blp.errors(400, 401, 403, 404, 413, 415, 503)
    @blp.arguments(CompletionSchema, required=False)
    @blp.response(200, TaskSchema)
    def patch(self, body: dict[str, Any], user_id: str, task_id: uuid.UUID) -> Any:
        """Toggle completion atomically, or set it with {"completed": true|false}."""
        session = get_session()
        if request.if_match:
            _find_unchanged(user_id, task_id)
        else:
            blp.check_etag(None)
        task = repo.set_completed(session, user_id, task_id, body.get("completed"))
        session.commit()
        return task


def _find_unchanged(user_id: str, task_id: uuid.UUID) -> Task:
    """The task, locked and compared with If-Match when the client sent one: 412 if it changed since."""
    task = repo.get_task(get_session(), user_id, task_id, for_update=bool(request.if_match))
    blp.check_etag(task, TaskSchema)
    return task


def _update(user_id: str, task_id: uuid.UUID, changes: dict[str, Any]) -> Task:
    session = get_session()
    task = repo.update_task(session, _find_unchanged(user_id, task_id), changes)
    session.commit()
    return task


def no_content() -> Response:
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response

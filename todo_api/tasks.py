"""The tasks blueprint: /api/{user_id}/tasks."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Response, url_for
from flask.views import MethodView
from flask_smorest import Blueprint, abort
from flask_smorest.pagination import PaginationParameters

from . import repositories as repo
from .auth import require_path_user
from .db import get_session
from .parser import JSONParser
from .schemas import CompletionSchema, TaskCreateSchema, TaskListQuerySchema, TaskSchema, TaskWriteSchema

blp = Blueprint(
    "tasks", __name__, url_prefix="/api/<string:user_id>/tasks", description="The signed-in user's tasks"
)
blp.ARGUMENTS_PARSER = JSONParser()
blp.before_request(require_path_user)

TASK_NOT_FOUND = "Task not found"


@blp.route("")
class Tasks(MethodView):
    @blp.arguments(TaskListQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, TaskSchema(many=True))
    @blp.paginate(page_size=100, max_page_size=1000)
    def get(self, user_id: str, pagination_parameters: PaginationParameters, **_filters: Any) -> Any:
        """List the user's tasks, newest first."""
        tasks, total = repo.list_tasks(
            get_session(), user_id, page=pagination_parameters.page, page_size=pagination_parameters.page_size
        )
        pagination_parameters.item_count = total
        return tasks, {"X-Total-Count": str(total)}

    @blp.arguments(TaskCreateSchema)
    @blp.response(201, TaskSchema, headers={"Location": {"schema": {"type": "string"}}})
    def post(self, data: dict[str, Any], user_id: str) -> Any:
        """Create a task."""
        session = get_session()
        task = repo.create_task(session, user_id, data)
        session.commit()
        location = url_for("tasks.TaskById", user_id=user_id, task_id=task.id)
        return task, {"Location": location}


@blp.route("/<uuid:task_id>")
class TaskById(MethodView):
    @blp.response(200, TaskSchema)
    def get(self, user_id: str, task_id: uuid.UUID) -> Any:
        """Get one task."""
        try:
            return repo.get_task(get_session(), user_id, task_id)
        except repo.TaskNotFound:
            abort(404, message=TASK_NOT_FOUND)

    @blp.arguments(TaskWriteSchema)
    @blp.response(200, TaskSchema)
    def put(self, changes: dict[str, Any], user_id: str, task_id: uuid.UUID) -> Any:
        """Update the fields sent."""
        return _update(user_id, task_id, changes)

    @blp.arguments(TaskWriteSchema)
    @blp.response(200, TaskSchema)
    def patch(self, changes: dict[str, Any], user_id: str, task_id: uuid.UUID) -> Any:
        """Update the fields sent (same as PUT)."""
        return _update(user_id, task_id, changes)

    @blp.response(204)
    def delete(self, user_id: str, task_id: uuid.UUID) -> Response:
        """Delete a task."""
        session = get_session()
        try:
            repo.delete_task(session, user_id, task_id)
        except repo.TaskNotFound:
            abort(404, message=TASK_NOT_FOUND)
        session.commit()
        return no_content()


@blp.route("/<uuid:task_id>/complete")
class TaskCompletion(MethodView):
    @blp.arguments(CompletionSchema, required=False)
    @blp.response(200, TaskSchema)
    def patch(self, body: dict[str, Any], user_id: str, task_id: uuid.UUID) -> Any:
        """Toggle completion atomically, or set it with {"completed": true|false}."""
        session = get_session()
        try:
            task = repo.set_completed(session, user_id, task_id, body.get("completed"))
        except repo.TaskNotFound:
            abort(404, message=TASK_NOT_FOUND)
        session.commit()
        return task


def no_content() -> Response:
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


def _update(user_id: str, task_id: uuid.UUID, changes: dict[str, Any]) -> Any:
    session = get_session()
    try:
        task = repo.update_task(session, user_id, task_id, changes)
    except repo.TaskNotFound:
        abort(404, message=TASK_NOT_FOUND)
    session.commit()
    return task

"""The task resource: CRUD, validation, completion rules.

Ownership is in test_authz_matrix.py, task ids in test_http.py, list queries in test_listing.py.
"""

from __future__ import annotations

import json
import uuid

import orjson
import pytest

TASK_FIELDS = {
    "id", "user_id", "title", "description", "completed", "is_completed", "status", "priority",
    "due_date", "tags", "completed_at", "created_at", "updated_at",
}


def test_create_returns_201_with_location_and_exactly_the_contract_fields(client, auth):
    response = client.post("/api/alice/tasks", json={"title": "  Buy milk  ", "description": "2 liters"},
                           headers=auth())
    assert response.status_code == 201
    task = response.json
    assert set(task) == TASK_FIELDS
    assert response.headers["Location"] == f"/api/alice/tasks/{task['id']}"
    assert task["title"] == "Buy milk"
    assert task["user_id"] == "alice"
    assert task["completed"] is task["is_completed"] is False
    assert task["status"] == "pending" and task["priority"] == "medium"
    assert task["tags"] == [] and task["due_date"] is None and task["completed_at"] is None
    assert task["created_at"].endswith("+00:00") and task["created_at"] == task["updated_at"]
    uuid.UUID(task["id"])


def test_created_task_can_be_read_back(client, auth, create_task):
    created = create_task(tags=["home", "errands"], priority="high", due_date="2026-12-01T10:00:00Z")
    response = client.get(f"/api/alice/tasks/{created['id']}", headers=auth())
    assert response.status_code == 200
    assert response.json == created
    assert created["due_date"] == "2026-12-01T10:00:00+00:00"


def test_due_date_without_offset_is_read_as_utc_and_offsets_are_converted(client, auth, create_task):
    assert create_task(due_date="2026-12-01T10:00:00")["due_date"] == "2026-12-01T10:00:00+00:00"
    assert create_task(due_date="2026-12-01T12:00:00+02:00")["due_date"] == "2026-12-01T10:00:00+00:00"


def test_tags_are_trimmed_and_deduplicated(create_task):
    assert create_task(tags=[" home ", "home", "work"])["tags"] == ["home", "work"]


def test_list_returns_own_tasks_newest_first_with_totals(client, auth, create_task):
    first, second = create_task(title="first"), create_task(title="second")
    create_task(user="bob", title="bob's")
    response = client.get("/api/alice/tasks", headers=auth())
    assert response.status_code == 200
    assert [task["id"] for task in response.json] == [second["id"], first["id"]]
    assert response.headers["X-Total-Count"] == "2"
    assert '"total": 2' in response.headers["X-Pagination"]


def test_list_pages(client, auth, create_task):
    ids = [create_task(title=f"t{n}")["id"] for n in range(5)]
    page2 = client.get("/api/alice/tasks?page=2&page_size=2", headers=auth())
    assert [task["id"] for task in page2.json] == ids[::-1][2:4]
    assert page2.headers["X-Total-Count"] == "5"
    past_end = client.get("/api/alice/tasks?page=9&page_size=2", headers=auth())
    assert past_end.status_code == 200 and past_end.json == []


@pytest.mark.parametrize("method", ["put", "patch"])
def test_update_changes_only_the_fields_sent(client, auth, create_task, method):
    task = create_task(description="keep me", priority="low")
    response = getattr(client, method)(f"/api/alice/tasks/{task['id']}", json={"title": "New"}, headers=auth())
    assert response.status_code == 200
    assert response.json["title"] == "New"
    assert response.json["description"] == "keep me" and response.json["priority"] == "low"
    assert response.json["updated_at"] > task["updated_at"]
    assert response.json["created_at"] == task["created_at"]


def test_a_client_can_put_back_the_object_it_got(client, auth, create_task):
    task = create_task()
    task["title"] = "Edited"
    response = client.put(f"/api/alice/tasks/{task['id']}", json=task, headers=auth())
    assert response.status_code == 200
    assert response.json["title"] == "Edited" and response.json["id"] == task["id"]


def test_server_managed_fields_are_ignored(client, auth, create_task):
    task = create_task(id=str(uuid.uuid4()), user_id="mallory", created_at="2000-01-01T00:00:00Z")
    assert task["user_id"] == "alice" and not task["created_at"].startswith("2000")


def test_clearing_nullable_fields(client, auth, create_task):
    task = create_task(description="x", due_date="2026-12-01T00:00:00Z")
    response = client.patch(f"/api/alice/tasks/{task['id']}", json={"description": None, "due_date": None},
                            headers=auth())
    assert response.json["description"] is None and response.json["due_date"] is None


def test_delete_returns_204_without_body_then_404(client, auth, create_task):
    task = create_task()
    response = client.delete(f"/api/alice/tasks/{task['id']}", headers=auth())
    assert response.status_code == 204
    assert response.data == b"" and "json" not in (response.content_type or "")
    assert client.get(f"/api/alice/tasks/{task['id']}", headers=auth()).status_code == 404
    assert client.delete(f"/api/alice/tasks/{task['id']}", headers=auth()).status_code == 404


# --- completion --------------------------------------------------------------------------------------------


def test_complete_without_body_toggles(client, auth, create_task):
    task = create_task()
    done = client.patch(f"/api/alice/tasks/{task['id']}/complete", headers=auth()).json
    assert done["completed"] is done["is_completed"] is True
    assert done["status"] == "completed" and done["completed_at"] is not None
    undone = client.patch(f"/api/alice/tasks/{task['id']}/complete", headers=auth()).json
    assert undone["completed"] is False and undone["status"] == "pending" and undone["completed_at"] is None
    assert undone["updated_at"] > done["updated_at"]


@pytest.mark.parametrize("field", ["completed", "is_completed"])
def test_complete_with_a_value_is_idempotent(client, auth, create_task, field):
    task = create_task()
    url = f"/api/alice/tasks/{task['id']}/complete"
    first = client.patch(url, json={field: True}, headers=auth()).json
    second = client.patch(url, json={field: True}, headers=auth()).json
    assert first["completed"] is second["completed"] is True
    assert second["completed_at"] == first["completed_at"]
    assert client.patch(url, json={field: False}, headers=auth()).json["completed"] is False
    assert client.patch(url, json={field: False}, headers=auth()).json["completed"] is False


def test_complete_rejects_a_non_boolean(client, auth, create_task):
    task = create_task()
    response = client.patch(f"/api/alice/tasks/{task['id']}/complete", json={"completed": "yes"}, headers=auth())
    assert response.status_code == 422 and "completed" in response.json["errors"]


def test_uncompleting_an_in_progress_task_keeps_in_progress(client, auth, create_task):
    task = create_task(status="in_progress")
    response = client.patch(f"/api/alice/tasks/{task['id']}/complete", json={"completed": False}, headers=auth())
    assert response.json["status"] == "in_progress"


@pytest.mark.parametrize(
    ("body", "status", "completed"),
    [
        ({"completed": True}, "completed", True),
        ({"is_completed": True}, "completed", True),
        ({"status": "completed"}, "completed", True),
        ({"status": "in_progress"}, "in_progress", False),
        ({"completed": False, "status": "in_progress"}, "in_progress", False),
        ({"completed": True, "status": "completed"}, "completed", True),
    ],
)
def test_status_and_completed_always_agree(create_task, body, status, completed):
    task = create_task(**body)
    assert (task["status"], task["completed"], task["is_completed"]) == (status, completed, completed)
    assert (task["completed_at"] is not None) is completed


def test_setting_completed_false_on_a_completed_task_makes_it_pending(client, auth, create_task):
    task = create_task(completed=True)
    response = client.put(f"/api/alice/tasks/{task['id']}", json={"completed": False}, headers=auth())
    assert response.json["status"] == "pending" and response.json["completed_at"] is None


@pytest.mark.parametrize(
    "body",
    [
        {"completed": True, "status": "pending"},
        {"completed": False, "status": "completed"},
        {"completed": True, "is_completed": False},
    ],
)
def test_contradicting_completion_input_is_422_and_changes_nothing(client, auth, create_task, body):
    task = create_task()
    response = client.put(f"/api/alice/tasks/{task['id']}", json=body, headers=auth())
    assert response.status_code == 422
    assert client.get(f"/api/alice/tasks/{task['id']}", headers=auth()).json == task


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "title"),
        ({"title": "   "}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": 123}, "title"),
        ({"title": None}, "title"),
        ({"title": "a\x00b"}, "title"),
        ({"title": "ok", "description": "x" * 1001}, "description"),
        ({"title": "ok", "description": 5}, "description"),
        ({"title": "ok", "completed": "true"}, "completed"),
        ({"title": "ok", "completed": 1}, "completed"),
        ({"title": "ok", "completed": None}, "completed"),
        ({"title": "ok", "status": "done"}, "status"),
        ({"title": "ok", "priority": "urgent"}, "priority"),
        ({"title": "ok", "priority": None}, "priority"),
        ({"title": "ok", "due_date": "tomorrow"}, "due_date"),
        ({"title": "ok", "due_date": 1700000000}, "due_date"),
        ({"title": "ok", "tags": "home"}, "tags"),
        ({"title": "ok", "tags": [""]}, "tags"),
        ({"title": "ok", "tags": ["x" * 51]}, "tags"),
        ({"title": "ok", "tags": [1]}, "tags"),
        ({"title": "ok", "tags": [f"t{n}" for n in range(21)]}, "tags"),
        ({"title": "ok", "tags": None}, "tags"),
        ({"title": "ok", "colour": "blue"}, "colour"),
    ],
)
def test_invalid_create_is_422_keyed_by_field(client, auth, body, field):
    response = client.post("/api/alice/tasks", json=body, headers=auth())
    assert response.status_code == 422
    assert response.json["detail"] == "Validation failed"
    assert field in response.json["errors"]
    assert all(isinstance(message, str) for messages in response.json["errors"].values() for message in messages)
    assert client.get("/api/alice/tasks", headers=auth()).json == []


def test_blank_title_message(client, auth):
    response = client.post("/api/alice/tasks", json={"title": " "}, headers=auth())
    assert response.json["errors"] == {"title": ["Title must not be blank."]}


def test_twenty_distinct_tags_are_accepted(create_task):
    assert len(create_task(tags=[f"t{n}" for n in range(20)] + ["t0"])["tags"]) == 20


def test_invalid_update_changes_nothing(client, auth, create_task):
    task = create_task()
    response = client.patch(f"/api/alice/tasks/{task['id']}", json={"title": "new", "priority": "x"},
                            headers=auth())
    assert response.status_code == 422
    assert client.get(f"/api/alice/tasks/{task['id']}", headers=auth()).json == task


# --- the fast dump ---------------------------------------------------------------------------------------


def test_fast_task_dump_is_marshmallows_json_byte_for_byte(client, auth, create_task, app):
    from marshmallow import Schema

    from todo_api.db import get_session
    from todo_api.repositories import get_task, list_tasks, read_task
    from todo_api.schemas import TaskSchema
    from todo_api.web import to_json

    created = create_task(description="d", tags=["a", "b"], due_date="2026-12-01T10:00:00.5Z", completed=True)
    create_task(title="plain", due_date="0001-01-01T00:00:00Z")
    create_task(title="late", due_date="9999-12-31T23:59:59.999999Z")
    with app.app_context():
        session = get_session()
        task = get_task(session, "alice", uuid.UUID(created["id"]))
        rows, _ = list_tasks(session, "alice", {}, page=1, page_size=10)
        schema, many = TaskSchema(), TaskSchema(many=True)
        assert to_json(schema.dump(task)) == to_json(Schema.dump(schema, task))
        # Rows of the list query give the same JSON as the ORM objects would through marshmallow.
        objects = [get_task(session, "alice", row[0]) for row in rows]  # rows of TASK_COLUMNS: the id first
        assert to_json(many.dump(rows)) == to_json(Schema.dump(many, objects))
        assert to_json(schema.dump(read_task(session, "alice", task.id))) == to_json(Schema.dump(schema, task))
        assert orjson.loads(to_json(schema.dump(task))) == created
        # The json fallback (for what orjson refuses) writes the objects as marshmallow would too.
        fallback = json.loads(to_json({"task": schema.dump(task), "odd": "\ud800"}))["task"]
        assert fallback == Schema.dump(schema, task)

"""The hot path (GET one task, the unfiltered page, the plain toggle): its constant SQL on the request's DBAPI
connection gives what the Core statements give, row for row, and the same answers over HTTP; reads run in
autocommit; a database error there is a 503 as anywhere else."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from flask import g
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from todo_api import repositories
from todo_api.db import get_hot_connection, get_session
from todo_api.errors import handle_database_error
from todo_api.models import STATUSES
from todo_api.schemas import task_to_dict
from todo_api.web import to_json

from .helpers import assert_error, delete_tasks_of, make_config

USER = "alice"


@pytest.fixture
def tasks(app, create_task) -> list[dict]:
    """Seven tasks of alice's, created a minute apart, newest last; one of bob's."""
    created = [create_task(title=f"task {n}", tags=["b", "a"] if n % 2 else [],
                           due_date="2027-01-02T03:04:05.678901Z" if n % 3 else None) for n in range(7)]
    create_task("bob", title="bob's")
    return created


def test_fetch_task_is_read_task_row_for_row(app, tasks):
    with app.test_request_context("/"):
        for task in tasks:
            task_id = uuid.UUID(task["id"])
            hot = repositories.fetch_task(get_hot_connection(autocommit=True), USER, task_id)
            assert hot == tuple(repositories.read_task(get_session(), USER, task_id))


def test_fetch_task_of_another_user_is_not_found(app, tasks):
    with app.test_request_context("/"), pytest.raises(repositories.TaskNotFound):
        repositories.fetch_task(get_hot_connection(autocommit=True), "bob", uuid.UUID(tasks[0]["id"]))


@pytest.mark.parametrize(("page", "page_size"), [(1, 50), (1, 3), (2, 3), (3, 3), (4, 3), (1, 7), (2, 7), (9, 1)])
def test_fetch_newest_page_is_list_tasks_without_filters(app, tasks, page, page_size):
    with app.test_request_context("/"):
        hot_rows, hot_total = repositories.fetch_newest_page(get_hot_connection(autocommit=True), USER, page=page,
                                                             page_size=page_size)
        rows, total = repositories.list_tasks(get_session(), USER, {}, page=page, page_size=page_size)
    assert hot_total == total
    assert [(uuid.UUID(row[0]), *row[1:]) for row in hot_rows] == [tuple(row) for row in rows]
    assert [to_json(task_to_dict(row)) for row in hot_rows] == [to_json(task_to_dict(row)) for row in rows]


def test_fetch_newest_page_of_a_user_without_tasks_is_empty(app):
    with app.test_request_context("/"):
        assert repositories.fetch_newest_page(get_hot_connection(autocommit=True), "nobody", page=1,
                                              page_size=50) == ([], 0)


@pytest.mark.parametrize("query", ["", "?page_size=50", "?sort=created_at&order=desc&status=all",
                                   "?sort=created&page=2&page_size=2"])
def test_the_hot_page_answers_as_the_filtered_path_would(client, auth, tasks, query):
    """Same body and headers as the Core path, reached here with a filter that keeps every task."""
    hot = client.get(f"/api/{USER}/tasks{query}", headers=auth())
    separator = "&" if query else "?"
    core = client.get(f"/api/{USER}/tasks{query}{separator}due_before=9999-01-01T00:00:00Z", headers=auth())
    assert hot.status_code == 200 and hot.data != b"[]"
    if query == "":  # due_before drops the tasks without a due date: compare with what the filter kept
        kept = {task["id"] for task in core.json}
        assert [task for task in hot.json if task["id"] in kept] == core.json
        return
    core = client.get(f"/api/{USER}/tasks{query}{separator}overdue=false&status=all", headers=auth())
    assert hot.data == core.data
    for header in ("X-Total-Count", "X-Pagination", "Content-Type", "Content-Length"):
        assert hot.headers[header] == core.headers[header], header


def test_datetimes_are_utc_whatever_the_sessions_time_zone(app, client, auth, tasks):
    """PostgreSQL sends timestamptz in the session's zone; the API always answers in UTC."""
    connection = app.extensions["db"].hot_connection_factory.keywords["connection"]
    connection.execute(text("SET LOCAL TimeZone = 'Asia/Kolkata'"))  # until the test's rollback
    task = tasks[1]
    got = client.get(f"/api/{USER}/tasks/{task['id']}", headers=auth()).json
    assert got == task and got["due_date"] == "2027-01-02T03:04:05.678901+00:00"
    page = client.get(f"/api/{USER}/tasks", headers=auth()).json
    assert page[-2] == task
    toggled = client.patch(f"/api/{USER}/tasks/{task['id']}/complete", headers=auth()).json
    assert toggled["completed_at"].endswith("+00:00") and toggled["updated_at"].endswith("+00:00")


def test_the_toggle_answers_as_the_session_path_does(client, auth, tasks):
    """A plain toggle runs on the hot path; {"completed": ...} on the session: same fields, same rules."""
    task = tasks[0]
    path = f"/api/{USER}/tasks/{task['id']}/complete"
    toggled = client.patch(path, headers=auth())
    assert toggled.status_code == 200 and toggled.json["status"] == "completed"
    assert toggled.headers["ETag"] == client.get(f"/api/{USER}/tasks/{task['id']}", headers=auth()).headers["ETag"]
    completed_at = datetime.fromisoformat(toggled.json["completed_at"])
    assert completed_at == datetime.fromisoformat(toggled.json["updated_at"])
    assert abs(completed_at - datetime.now(UTC)) < timedelta(minutes=1)
    set_again = client.patch(path, json={"completed": True}, headers=auth())
    assert set_again.json["completed_at"] == toggled.json["completed_at"]  # already completed: kept
    back = client.patch(path, headers=auth())
    assert back.json["status"] == "pending" and back.json["completed_at"] is None
    unchanged = {key: value for key, value in back.json.items() if key not in ("updated_at",)}
    assert unchanged == {key: value for key, value in task.items() if key not in ("updated_at",)}


def test_the_toggle_of_another_users_task_is_404_and_changes_nothing(client, auth, tasks):
    task = tasks[0]
    assert_error(client.patch(f"/api/bob/tasks/{task['id']}/complete", headers=auth("bob")), 404,
                 {"detail": "Task not found"})
    assert client.get(f"/api/{USER}/tasks/{task['id']}", headers=auth()).json == task


@pytest.mark.parametrize("current", STATUSES)
def test_an_update_resolves_status_and_completed_at_by_the_rules(app, create_task, current):
    """Every combination of status and completed the schema lets through, from each current status: the UPDATE's
    CASEs give _resolve_status's status; completed_at is kept when the status stays, set on completing, cleared
    otherwise; updated_at moves forward; fields not sent are kept."""
    task = create_task(title="kept", tags=["t"], status=current)
    task_id = uuid.UUID(task["id"])
    combinations = [(status, completed) for status in (None, *STATUSES) for completed in (None, True, False)
                    if status is None or completed is None or completed == (status == "completed")]
    with app.test_request_context("/"):
        hot = get_hot_connection(autocommit=True)
        for status, completed in combinations:
            before = repositories.update_task(hot, USER, task_id, {"status": current})
            changes = {key: value for key, value in (("status", status), ("completed", completed)) if value is not None}
            after = task_to_dict(repositories.update_task(hot, USER, task_id, changes))
            expected = repositories._resolve_status(current, completed, status)
            assert after["status"] == expected, (status, completed)
            if expected == current:
                assert after["completed_at"] == before[8]
            elif expected == "completed":
                assert after["completed_at"] is not None and after["completed_at"] <= after["updated_at"]
            else:
                assert after["completed_at"] is None
            assert after["updated_at"] > before[10] and (after["title"], after["tags"]) == ("kept", ["t"])


def test_reads_run_in_autocommit_and_give_their_connection_back_as_they_found_it(database_url):
    """The pool's own connection, as in production: autocommit for the read, off again once it is back."""
    from todo_api import create_app

    app = create_app(make_config(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0))
    try:
        with app.test_request_context("/"):
            hot = get_hot_connection(autocommit=True)
            dbapi = hot.connection.dbapi_connection
            assert dbapi.autocommit
            assert repositories.fetch_newest_page(hot, "nobody", page=1, page_size=5) == ([], 0)
        assert not dbapi.autocommit and dbapi.status == 1  # STATUS_READY: no transaction left open
        with app.test_request_context("/"):
            write = get_hot_connection(autocommit=False)
            assert write.connection.dbapi_connection is dbapi and not dbapi.autocommit
            assert "db_hot" in g
    finally:
        app.extensions["db"].engine.dispose()


def test_a_plain_toggle_is_committed_by_its_own_statement(database_url, auth):
    """The toggle runs in autocommit: its UPDATE is a transaction of its own, committed as it ends (another
    connection sees it before the view's commit, which then has nothing to send), and no transaction stays open."""
    from todo_api import create_app

    user = f"toggler-{uuid.uuid4()}"
    app = create_app(make_config(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0))
    admin = create_engine(database_url)
    try:
        task = app.test_client().post(f"/api/{user}/tasks", json={"title": "t"}, headers=auth(user)).json
        with app.test_request_context("/"):
            hot = get_hot_connection(autocommit=True)
            toggled = repositories.toggle_task(hot, user, uuid.UUID(task["id"]))
            assert toggled[4] == "completed" and hot.connection.dbapi_connection.status == 1  # STATUS_READY
            with admin.connect() as connection:
                seen = connection.scalar(text("SELECT status FROM tasks WHERE id = :id"), {"id": task["id"]})
            assert seen == "completed"
        response = app.test_client().patch(f"/api/{user}/tasks/{task['id']}/complete", headers=auth(user))
        assert response.status_code == 200 and response.json["status"] == "pending"
        with admin.connect() as connection:
            assert connection.scalar(text("SELECT status FROM tasks WHERE id = :id"), {"id": task["id"]}) == "pending"
    finally:
        app.extensions["db"].engine.dispose()
        admin.dispose()
        delete_tasks_of(database_url, [user])


def test_a_lost_server_connection_on_the_hot_path_is_sqlalchemys_disconnect_and_is_replaced(database_url, auth):
    """The server ends the connection under the request: the error is SQLAlchemy's OperationalError with the
    connection invalidated, as through a session (errors.py answers it 503); the pool drops the connection and the
    next request is served on a new one."""
    from todo_api import create_app

    app = create_app(make_config(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0))
    engine = app.extensions["db"].engine
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    client = app.test_client()
    path = f"/api/{USER}/tasks/{uuid.uuid4()}"
    try:
        assert client.get(path, headers=auth()).status_code == 404
        with app.test_request_context("/"):
            hot = get_hot_connection(autocommit=True)
            pid = hot.connection.dbapi_connection.get_backend_pid()
            with admin.connect() as connection:
                connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(OperationalError) as raised:
                for _ in range(50):  # until the termination has reached the socket
                    hot.execute("SELECT 1", {})
                    time.sleep(0.01)
            assert raised.value.connection_invalidated
            assert handle_database_error(raised.value).status_code == 503
        response = client.get(path, headers=auth())
        assert response.status_code == 404, response.data  # served again, on a new connection
    finally:
        engine.dispose()
        admin.dispose()


def test_the_hot_path_answers_503_while_the_database_is_known_unreachable(database_url, auth):
    from todo_api import create_app

    app = create_app(make_config(database_url))
    app.extensions["db"].outage.unreachable_since = 0.0  # as the breaker leaves it during an outage
    client = app.test_client()
    try:
        for path in (f"/api/{USER}/tasks/{uuid.uuid4()}", f"/api/{USER}/tasks"):
            response = client.get(path, headers=auth())
            assert_error(response, 503, {"detail": "Database unavailable"})
            assert response.headers["Retry-After"] == "5"
        response = client.patch(f"/api/{USER}/tasks/{uuid.uuid4()}/complete", headers=auth())
        assert response.status_code == 503
    finally:
        app.extensions["db"].outage.unreachable_since = None
        app.extensions["db"].engine.dispose()


def test_a_query_string_parsed_before_gives_the_same_answer_and_errors_are_never_remembered(client, auth, tasks):
    """The list's query strings are parsed once per parser (parser.JSONParser.parse): the same answers, each
    request with its own pagination (X-Pagination from its own total), and a bad query string is 422 each time."""
    first = client.get(f"/api/{USER}/tasks?page_size=3&page=2", headers=auth())
    again = client.get(f"/api/{USER}/tasks?page_size=3&page=2", headers=auth())
    assert first.data == again.data and first.headers["X-Pagination"] == again.headers["X-Pagination"]
    assert json.loads(first.headers["X-Pagination"])["total"] == 7
    other_user = client.get("/api/bob/tasks?page_size=3&page=2", headers=auth("bob"))  # same query, other total
    assert other_user.json == [] and json.loads(other_user.headers["X-Pagination"])["total"] == 1
    for _ in range(2):
        assert_error(client.get(f"/api/{USER}/tasks?page_size=0", headers=auth()), 422, "page_size")
        assert_error(client.get(f"/api/{USER}/tasks?sort=nope", headers=auth()), 422, "sort")
    assert client.get(f"/api/{USER}/tasks?page_size=3&page=3", headers=auth()).json == [tasks[0]]

"""Conditional requests (RFC 9110 §13): strong ETags, If-Match (strong comparison, optional, 412), If-None-Match
(weak comparison: 304 on reads, 412 on writes), malformed precondition headers (412), and nothing changed after a
412."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, event

from todo_api import repositories
from todo_api.models import Task

# (method, path suffix, body, success status) of every write on one task.
WRITES = [
    pytest.param("put", "", {"title": "x"}, 200, id="put"),
    pytest.param("patch", "", {"title": "x"}, 200, id="patch"),
    pytest.param("delete", "", None, 204, id="delete"),
    pytest.param("patch", "/complete", None, 200, id="complete-toggle"),
    pytest.param("patch", "/complete", {"completed": True}, 200, id="complete-set"),
]
# Writes whose response is the task, with its new ETag.
WRITES_RETURNING_THE_TASK = [write for write in WRITES if write.values[3] == 200]
# Header values that hold no entity-tag at all.
NO_VALID_TAG = ["", ",,,", '"', "garbage", "W/", "abc, def", '"unterminated']


def url(task) -> str:
    return f"/api/alice/tasks/{task['id']}"


def write(client, auth, task, method, suffix, body, **headers):
    return getattr(client, method)(f"{url(task)}{suffix}", json=body, headers={**auth(), **headers})


def snapshot(client, auth, task) -> tuple[int, bytes, str | None]:
    """What a GET of the task answers: status, exact body and ETag."""
    response = client.get(url(task), headers=auth())
    return response.status_code, response.data, response.headers.get("ETag")


def etag_of(client, auth, task) -> str:
    return client.get(url(task), headers=auth()).headers["ETag"]


def assert_precondition_failed(response) -> None:
    assert response.status_code == 412, response.data
    assert set(response.json) == {"detail"}
    assert "ETag" not in response.headers


# --- The ETag ------------------------------------------------------------------------------------------------------


def test_get_returns_a_strong_etag_and_if_none_match_gives_304(client, auth, create_task):
    task = create_task()
    response = client.get(url(task), headers=auth())
    etag = response.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    not_modified = client.get(url(task), headers={**auth(), "If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.data == b""
    assert not_modified.headers["ETag"] == etag


def test_etag_is_the_task_id_and_its_updated_at_in_microseconds(client, auth, create_task):
    """The rule since issue #15 (before: the SHA-1 of the task's sorted JSON, which dumped the task a second time):
    id in hex, updated_at in microseconds since the epoch in hex, and the representation's version. Every write
    moves updated_at strictly forward (tests below), so the tag still changes whenever the representation does."""
    task = create_task(title="Café ☕", tags=["b", "a"], due_date="2026-12-01T10:00:00Z")
    response = client.get(url(task), headers=auth())
    updated_at = datetime.fromisoformat(response.json["updated_at"])
    microseconds = (updated_at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert response.headers["ETag"] == f'"{uuid.UUID(task["id"]).hex}-{microseconds:x}-1"'


def test_etag_changes_whenever_the_task_changes(client, auth, create_task):
    task = create_task()
    before = etag_of(client, auth, task)
    client.patch(f"{url(task)}/complete", headers=auth())
    after = etag_of(client, auth, task)
    assert before != after
    assert client.get(url(task), headers={**auth(), "If-None-Match": before}).status_code == 200


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES_RETURNING_THE_TASK)
def test_write_response_carries_the_new_etag(client, auth, create_task, method, suffix, body, status):
    task = create_task()
    before = etag_of(client, auth, task)
    response = write(client, auth, task, method, suffix, body)
    assert response.status_code == status
    assert response.headers["ETag"] == etag_of(client, auth, task) != before


def test_delete_response_has_no_etag(client, auth, create_task):
    task = create_task()
    response = client.delete(url(task), headers={**auth(), "If-Match": etag_of(client, auth, task)})
    assert response.status_code == 204 and "ETag" not in response.headers


# --- If-Match: strong comparison, optional -------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_stale_if_match_is_412_and_the_task_is_unchanged(client, auth, create_task, method, suffix, body, status):
    task = create_task()
    stale = etag_of(client, auth, task)
    client.patch(url(task), json={"description": "changed by another tab"}, headers=auth())
    before = snapshot(client, auth, task)
    assert_precondition_failed(write(client, auth, task, method, suffix, body, **{"If-Match": stale}))
    assert snapshot(client, auth, task) == before


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_current_if_match_succeeds(client, auth, create_task, method, suffix, body, status):
    task = create_task()
    etag = etag_of(client, auth, task)
    assert write(client, auth, task, method, suffix, body, **{"If-Match": etag}).status_code == status


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_if_match_star_matches_any_existing_task(client, auth, create_task, method, suffix, body, status):
    task = create_task()
    assert write(client, auth, task, method, suffix, body, **{"If-Match": "*"}).status_code == status


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_writes_without_preconditions_are_allowed(client, auth, create_task, method, suffix, body, status):
    task = create_task()
    assert write(client, auth, task, method, suffix, body).status_code == status


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_weak_if_match_on_a_write_is_412_as_if_match_compares_strongly(client, auth, create_task, method, suffix,
                                                                       body, status):
    task = create_task()
    weak = f"W/{etag_of(client, auth, task)}"
    before = snapshot(client, auth, task)
    assert_precondition_failed(write(client, auth, task, method, suffix, body, **{"If-Match": weak}))
    assert snapshot(client, auth, task) == before


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_if_match_listing_several_tags_passes_when_one_matches(client, auth, create_task, method, suffix, body,
                                                               status):
    task = create_task()
    tags = f'"stale", W/"weak", {etag_of(client, auth, task)}, "other"'
    assert write(client, auth, task, method, suffix, body, **{"If-Match": tags}).status_code == status


def test_if_match_with_another_etag_on_get_is_412(client, auth, create_task):
    task, other = create_task(), create_task(title="other")
    response = client.get(url(task), headers={**auth(), "If-Match": etag_of(client, auth, other)})
    assert_precondition_failed(response)


def test_current_if_match_on_get_is_200(client, auth, create_task):
    task = create_task()
    response = client.get(url(task), headers={**auth(), "If-Match": etag_of(client, auth, task)})
    assert response.status_code == 200 and response.json == task


def test_if_match_is_evaluated_before_if_none_match(client, auth, create_task):
    """RFC 9110 §13.2.2: a failed If-Match is 412, even on a GET whose If-None-Match would give 304."""
    task = create_task()
    etag = etag_of(client, auth, task)
    response = client.get(url(task), headers={**auth(), "If-Match": '"stale"', "If-None-Match": etag})
    assert_precondition_failed(response)


# --- If-None-Match: weak comparison, 304 on reads, 412 on writes ---------------------------------------------------


@pytest.mark.parametrize("method", ["get", "head"])
@pytest.mark.parametrize("tag", ["current", "weak", "star", "in-a-list"])
def test_matching_if_none_match_on_a_read_is_304_with_the_etag(client, auth, create_task, method, tag):
    task = create_task()
    etag = etag_of(client, auth, task)
    header = {"current": etag, "weak": f"W/{etag}", "star": "*", "in-a-list": f'"stale", W/{etag}'}[tag]
    response = getattr(client, method)(url(task), headers={**auth(), "If-None-Match": header})
    assert response.status_code == 304
    assert response.data == b""
    assert response.headers["ETag"] == etag


def test_if_none_match_star_on_put_is_412(client, auth, create_task):
    task = create_task()
    before = snapshot(client, auth, task)
    response = client.put(url(task), json={"title": "overwritten"}, headers={**auth(), "If-None-Match": "*"})
    assert_precondition_failed(response)
    assert snapshot(client, auth, task) == before


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
@pytest.mark.parametrize("tag", ["current", "weak", "star"])
def test_matching_if_none_match_on_a_write_is_412_and_the_task_is_unchanged(client, auth, create_task, method,
                                                                            suffix, body, status, tag):
    task = create_task()
    etag = etag_of(client, auth, task)
    header = {"current": etag, "weak": f"W/{etag}", "star": "*"}[tag]
    before = snapshot(client, auth, task)
    assert_precondition_failed(write(client, auth, task, method, suffix, body, **{"If-None-Match": header}))
    assert snapshot(client, auth, task) == before


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_if_none_match_with_another_tag_on_a_write_is_carried_out(client, auth, create_task, method, suffix, body,
                                                                  status):
    task = create_task()
    response = write(client, auth, task, method, suffix, body, **{"If-None-Match": '"other", W/"another"'})
    assert response.status_code == status


def test_if_none_match_with_another_tag_on_get_is_200(client, auth, create_task):
    task = create_task()
    response = client.get(url(task), headers={**auth(), "If-None-Match": '"other"'})
    assert response.status_code == 200 and response.json == task


def test_if_none_match_with_an_empty_quoted_tag_matches_nothing(client, auth, create_task):
    """"" is a valid entity-tag (RFC 9110 §8.8.3: zero etagc), which no ETag of ours equals."""
    task = create_task()
    assert client.get(url(task), headers={**auth(), "If-None-Match": '""'}).status_code == 200


def test_passing_if_match_then_matching_if_none_match_on_a_write_is_412(client, auth, create_task):
    task = create_task()
    etag = etag_of(client, auth, task)
    before = snapshot(client, auth, task)
    response = client.put(url(task), json={"title": "x"}, headers={**auth(), "If-Match": etag, "If-None-Match": "*"})
    assert_precondition_failed(response)
    assert snapshot(client, auth, task) == before


# --- Headers without a valid tag ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ['""', *NO_VALID_TAG])
@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_if_match_without_a_valid_tag_on_a_write_is_412_and_the_task_is_unchanged(client, auth, create_task, method,
                                                                                 suffix, body, status, value):
    task = create_task()
    before = snapshot(client, auth, task)
    assert_precondition_failed(write(client, auth, task, method, suffix, body, **{"If-Match": value}))
    assert snapshot(client, auth, task) == before


@pytest.mark.parametrize("value", NO_VALID_TAG)
@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_if_none_match_without_a_valid_tag_on_a_write_is_412_and_the_task_is_unchanged(client, auth, create_task,
                                                                                      method, suffix, body, status,
                                                                                      value):
    task = create_task()
    before = snapshot(client, auth, task)
    assert_precondition_failed(write(client, auth, task, method, suffix, body, **{"If-None-Match": value}))
    assert snapshot(client, auth, task) == before


@pytest.mark.parametrize("value", NO_VALID_TAG)
@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
def test_precondition_without_a_valid_tag_on_get_is_412(client, auth, create_task, header, value):
    task = create_task()
    assert_precondition_failed(client.get(url(task), headers={**auth(), header: value}))


def test_an_unquoted_current_etag_is_not_a_valid_tag(client, auth, create_task):
    task = create_task()
    unquoted = etag_of(client, auth, task).strip('"')
    assert_precondition_failed(client.put(url(task), json={"title": "x"}, headers={**auth(), "If-Match": unquoted}))


# --- Unknown tasks: 404 whatever the headers ----------------------------------------------------------------------

PRECONDITIONS = [{"If-Match": "*"}, {"If-None-Match": "*"}, {"If-Match": '"stale"'}, {"If-Match": ",,,"},
                 {"If-None-Match": "garbage"}]


@pytest.mark.parametrize("headers", PRECONDITIONS, ids=lambda headers: repr(headers))
@pytest.mark.parametrize(("method", "suffix", "body", "status"),
                         [pytest.param("get", "", None, 200, id="get"), *WRITES])
def test_unknown_task_is_404_whatever_the_preconditions(client, auth, method, suffix, body, status, headers):
    response = getattr(client, method)(f"/api/alice/tasks/{uuid.uuid4()}{suffix}", json=body,
                                       headers={**auth(), **headers})
    assert response.status_code == 404
    assert response.json == {"detail": "Task not found"}


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_if_match_star_on_another_users_task_is_404_and_it_is_unchanged(client, auth, create_task, method, suffix,
                                                                        body, status):
    bobs = create_task(user="bob")
    before = client.get(f"/api/bob/tasks/{bobs['id']}", headers=auth("bob")).data
    response = getattr(client, method)(f"/api/alice/tasks/{bobs['id']}{suffix}", json=body,
                                       headers={**auth(), "If-Match": "*"})
    assert response.status_code == 404 and response.json == {"detail": "Task not found"}
    assert client.get(f"/api/bob/tasks/{bobs['id']}", headers=auth("bob")).data == before


# --- Check and write are atomic -----------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES)
def test_a_conditional_write_locks_the_task_before_comparing(app, client, auth, create_task, method, suffix, body,
                                                             status, header):
    engine = app.extensions["db"].engine
    task = create_task()
    value = etag_of(client, auth, task) if header == "If-Match" else '"other"'
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert write(client, auth, task, method, suffix, body, **{header: value}).status_code == status
    finally:
        event.remove(engine, "before_cursor_execute", record)
    loads = [statement for statement in statements if statement.lstrip().startswith("SELECT")]
    assert loads and "FOR UPDATE" in loads[0], statements


# --- The OpenAPI document -----------------------------------------------------------------------------------------

CONDITIONAL_OPERATIONS = [("get", "/api/{user_id}/tasks/{task_id}"), ("put", "/api/{user_id}/tasks/{task_id}"),
                          ("patch", "/api/{user_id}/tasks/{task_id}"), ("delete", "/api/{user_id}/tasks/{task_id}"),
                          ("patch", "/api/{user_id}/tasks/{task_id}/complete")]


@pytest.mark.parametrize(("method", "path"), CONDITIONAL_OPERATIONS)
def test_openapi_documents_the_optional_preconditions_their_412_and_the_etag(client, method, path):
    spec = client.get("/openapi.json").json
    operation = spec["paths"][path][method]
    headers = {p["name"]: p for p in operation["parameters"] if p["in"] == "header"}
    assert set(headers) == {"If-Match", "If-None-Match"}
    assert not any(p.get("required") for p in headers.values())
    assert "412" in operation["responses"] and "428" not in operation["responses"]
    success = operation["responses"]["204" if method == "delete" else "200"]
    assert ("ETag" in success.get("headers", {})) == (method != "delete")
    assert ("304" in operation["responses"]) == (method == "get")
    if method == "get":
        assert "ETag" in operation["responses"]["304"]["headers"]


def test_openapi_never_mentions_428(client):
    assert b"428" not in client.get("/openapi.json").data


def test_updated_at_sort_follows_updates(client, auth, create_task):
    first, _second = create_task(title="first"), create_task(title="second")
    client.patch(url(first), json={"priority": "high"}, headers=auth())
    listed = client.get("/api/alice/tasks?sort=updated_at", headers=auth()).json
    assert listed[0]["id"] == first["id"]


# --- updated_at, of which the ETag is made, moves strictly forward on every write --------------------------------


@pytest.mark.parametrize(("method", "suffix", "body", "status"), WRITES_RETURNING_THE_TASK)
def test_two_writes_within_one_clock_tick_still_change_the_etag(client, auth, create_task, monkeypatch, method,
                                                                 suffix, body, status):
    """A clock that does not move (two writes in one microsecond, or a clock stepped back): each write still gives
    a new updated_at, one microsecond after the last, and so a new ETag."""
    task = create_task()
    frozen = datetime.fromisoformat(task["updated_at"]) - timedelta(seconds=5)  # the clock went back, too
    monkeypatch.setattr(repositories, "utcnow", lambda: frozen)
    first = write(client, auth, task, method, suffix, body)
    second = write(client, auth, task, method, suffix, body)
    assert first.status_code == second.status_code == status
    stamps = [datetime.fromisoformat(task["updated_at"]), *(datetime.fromisoformat(response.json["updated_at"])
                                                           for response in (first, second))]
    assert stamps[0] < stamps[1] < stamps[2]
    assert len({task_etag_of(response) for response in (first, second)}) == 2


def task_etag_of(response) -> str:
    return response.headers["ETag"]


def test_toggles_serialised_on_the_row_lock_get_increasing_updated_at(database_url, monkeypatch):
    """Two toggles of one task from two transactions: the second waits for the first's row lock, and although its
    clock reads earlier than the first's (PostgreSQL's now() would even be its transaction's start), its updated_at
    comes after the first's, as computed on the row version the first wrote."""
    engine = create_engine(database_url)
    user, task_id = f"lock-{uuid.uuid4().hex[:8]}", uuid.uuid4()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as connection:
        connection.execute(Task.__table__.insert(), {
            "id": task_id, "user_id": user, "title": "t", "status": "pending", "priority": "low", "tags": [],
            "created_at": start, "updated_at": start,
        })
    first_connection, second_connection = engine.raw_connection(), engine.raw_connection()
    results: dict[str, tuple] = {}
    try:
        results["first"] = repositories.toggle_task(Cursor(first_connection), user, task_id,
                                                    now=start + timedelta(seconds=10))
        second = threading.Thread(target=lambda: results.setdefault("second", repositories.toggle_task(
            Cursor(second_connection), user, task_id, now=start + timedelta(seconds=5))))
        second.start()
        second.join(0.3)
        assert second.is_alive(), "the second toggle should wait for the first's row lock"
        first_connection.commit()
        second.join(5)
        second_connection.commit()
    finally:
        first_connection.close()
        second_connection.close()
        with engine.begin() as connection:
            connection.execute(Task.__table__.delete().where(Task.user_id == user))
        engine.dispose()
    first_updated, second_updated = results["first"][10], results["second"][10]
    assert first_updated == start + timedelta(seconds=10)
    assert second_updated == first_updated + timedelta(microseconds=1)
    assert results["second"][4] == "pending"  # toggled back: it saw the first's write


class Cursor:
    """A raw DBAPI connection as repositories' hot functions take it."""

    def __init__(self, connection) -> None:
        self.connection = connection

    def execute(self, statement, parameters):
        cursor = self.connection.cursor()
        cursor.execute(statement, parameters)
        return cursor

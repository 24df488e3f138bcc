"""Ownership: user A (alice) attacks user B (bob) through every task operation, and the path-user guard.

- Through B's path: 403, whatever the body, the task id or the preconditions (no 304, no 412, no 404 that
  would tell whether a task exists), before the body is read or the database is touched.
- Through B's task id under A's own path: 404, exactly as for a task that does not exist.
- Through A's own path with B's ids in the body or the query: A's own data only.

After each attack, B's data is byte-for-byte what it was: B's lists, summary, every task and its ETag, read with
B's own token.
"""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from .helpers import assert_error, bearer, make_token, no_database

A, B = "alice", "bob"
FORBIDDEN = {"detail": "You may only access your own tasks"}
NOT_FOUND = {"detail": "Task not found"}


class World:
    """Bob's three tasks and Alice's one, and a byte-exact snapshot of everything Bob can read."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client
        bob = bearer(make_token(B))
        self.b_tasks = [
            self.create(B, title="bob plain"),
            self.create(B, title="bob secret plans", description="launch codes", tags=["bob-only", "x"],
                        priority="high", due_date="2020-01-01T00:00:00Z"),
            self.create(B, title="bob in progress", status="in_progress", due_date="2099-01-01T00:00:00Z"),
        ]
        assert client.patch(f"/api/{B}/tasks/{self.b_tasks[0]['id']}/complete", headers=bob).status_code == 200
        self.a_task = self.create(A, title="alice own")
        self.b_task = self.b_tasks[1]["id"]
        self.b_etag = client.get(f"/api/{B}/tasks/{self.b_task}", headers=bob).headers["ETag"]

    def create(self, user: str, **fields: Any) -> dict[str, Any]:
        response = self.client.post(f"/api/{user}/tasks", json=fields, headers=bearer(make_token(user)))
        assert response.status_code == 201, response.json
        return response.json

    def snapshot(self) -> list[tuple[str, int, bytes, str | None, str | None]]:
        """(what, status, exact body, ETag, X-Total-Count) for everything Bob can read."""
        bob = bearer(make_token(B))
        reads = [f"/api/{B}/tasks", f"/api/{B}/tasks?sort=title&order=asc&page_size=1000",
                 f"/api/{B}/tasks?status=completed", f"/api/{B}/tasks/summary",
                 *(f"/api/{B}/tasks/{task['id']}" for task in self.b_tasks)]
        shots = []
        for path in reads:
            response = self.client.get(path, headers=bob)
            shots.append((path, response.status_code, response.data, response.headers.get("ETag"),
                          response.headers.get("X-Total-Count")))
        return shots


@pytest.fixture
def world(client: FlaskClient) -> World:
    return World(client)


# (token's sub, method, path, request kwargs, expected status, expected body); {b_task}, {a_task}, {b_etag} are
# filled in from the world.
Attack = tuple[str, str, str, dict[str, Any], int, dict[str, Any] | None]
B_TASK = "/api/bob/tasks/{b_task}"
STOLEN_TASK = "/api/alice/tasks/{b_task}"
ATTACKS: dict[str, Attack] = {
    # --- B's path: 403 for every operation, before anything else -------------------------------------------------
    "list": (A, "GET", "/api/bob/tasks", {}, 403, FORBIDDEN),
    "list-head": (A, "HEAD", "/api/bob/tasks", {}, 403, None),
    "list-with-a-user-id-query": (A, "GET", "/api/bob/tasks?user_id=alice", {}, 403, FORBIDDEN),
    "list-trailing-slash": (A, "GET", "/api/bob/tasks/", {}, 403, FORBIDDEN),
    "create": (A, "POST", "/api/bob/tasks", {"json": {"title": "planted"}}, 403, FORBIDDEN),
    "create-claiming-bob": (A, "POST", "/api/bob/tasks", {"json": {"title": "planted", "user_id": B}}, 403,
                            FORBIDDEN),
    "create-with-an-invalid-body": (A, "POST", "/api/bob/tasks", {"data": b"{", "content_type": "application/json"},
                                    403, FORBIDDEN),
    "summary": (A, "GET", "/api/bob/tasks/summary", {}, 403, FORBIDDEN),
    "get": (A, "GET", B_TASK, {}, 403, FORBIDDEN),
    "get-with-a-body": (A, "GET", B_TASK, {"json": {"title": "x"}}, 403, FORBIDDEN),
    "get-if-none-match-bobs-etag": (A, "GET", B_TASK, {"headers": {"If-None-Match": "{b_etag}"}}, 403, FORBIDDEN),
    "get-upper-case-id": (A, "GET", "/api/bob/tasks/{B_TASK_UPPER}", {}, 403, FORBIDDEN),
    "put": (A, "PUT", B_TASK, {"json": {"title": "owned"}}, 403, FORBIDDEN),
    "put-if-match-bobs-etag": (A, "PUT", B_TASK, {"json": {"title": "owned"}, "headers": {"If-Match": "{b_etag}"}},
                               403, FORBIDDEN),
    "put-if-match-stale": (A, "PUT", B_TASK, {"json": {"title": "owned"}, "headers": {"If-Match": '"stale"'}}, 403,
                           FORBIDDEN),
    "put-moving-it-to-alice": (A, "PUT", B_TASK, {"json": {"user_id": A}}, 403, FORBIDDEN),
    "patch": (A, "PATCH", B_TASK, {"json": {"completed": True, "tags": []}}, 403, FORBIDDEN),
    "patch-no-body": (A, "PATCH", B_TASK, {}, 403, FORBIDDEN),
    "delete": (A, "DELETE", B_TASK, {}, 403, FORBIDDEN),
    "delete-with-a-body": (A, "DELETE", B_TASK, {"json": {"title": "x"}}, 403, FORBIDDEN),
    "delete-if-match-bobs-etag": (A, "DELETE", B_TASK, {"headers": {"If-Match": "{b_etag}"}}, 403, FORBIDDEN),
    "delete-if-match-any": (A, "DELETE", B_TASK, {"headers": {"If-Match": "*"}}, 403, FORBIDDEN),
    "complete-toggle": (A, "PATCH", B_TASK + "/complete", {}, 403, FORBIDDEN),
    "complete-set-true": (A, "PATCH", B_TASK + "/complete", {"json": {"completed": True}}, 403, FORBIDDEN),
    "complete-set-false": (A, "PATCH", B_TASK + "/complete", {"json": {"completed": False}}, 403, FORBIDDEN),
    "complete-with-a-field-it-refuses": (A, "PATCH", B_TASK + "/complete", {"json": {"title": "x"}}, 403, FORBIDDEN),
    "complete-if-match-bobs-etag": (A, "PATCH", B_TASK + "/complete", {"headers": {"If-Match": "{b_etag}"}}, 403,
                                    FORBIDDEN),
    "unknown-task-under-bobs-path": (A, "GET", "/api/bob/tasks/00000000-0000-0000-0000-000000000000", {}, 403,
                                     FORBIDDEN),
    # tokens that are almost Bob's
    "token-of-Bob": ("Bob", "GET", "/api/bob/tasks", {}, 403, FORBIDDEN),
    "token-of-bob-space": ("bob ", "DELETE", B_TASK, {}, 403, FORBIDDEN),
    "token-of-bob-zero-width-space": ("bob\u200b", "DELETE", B_TASK, {}, 401,
                                      {"detail": "Invalid authentication token"}),
    # --- B's task id under A's own path: 404, as if it did not exist ------------------------------------------------
    "stolen-get": (A, "GET", STOLEN_TASK, {}, 404, NOT_FOUND),
    "stolen-get-if-none-match-bobs-etag": (A, "GET", STOLEN_TASK, {"headers": {"If-None-Match": "{b_etag}"}}, 404,
                                           NOT_FOUND),
    "stolen-get-if-none-match-any": (A, "GET", STOLEN_TASK, {"headers": {"If-None-Match": "*"}}, 404, NOT_FOUND),
    "stolen-get-upper-case-id": (A, "GET", "/api/alice/tasks/{B_TASK_UPPER}", {}, 404, NOT_FOUND),
    "stolen-put": (A, "PUT", STOLEN_TASK, {"json": {"title": "owned"}}, 404, NOT_FOUND),
    "stolen-put-if-match-bobs-etag": (A, "PUT", STOLEN_TASK,
                                      {"json": {"title": "owned"}, "headers": {"If-Match": "{b_etag}"}}, 404,
                                      NOT_FOUND),
    "stolen-put-if-match-any": (A, "PUT", STOLEN_TASK, {"json": {"title": "owned"}, "headers": {"If-Match": "*"}},
                                404, NOT_FOUND),
    "stolen-put-no-body": (A, "PUT", STOLEN_TASK, {}, 404, NOT_FOUND),
    "stolen-patch": (A, "PATCH", STOLEN_TASK, {"json": {"status": "completed"}}, 404, NOT_FOUND),
    "stolen-patch-title": (A, "PATCH", STOLEN_TASK, {"json": {"title": "owned"}}, 404, NOT_FOUND),
    "stolen-patch-if-match-bobs-etag": (A, "PATCH", STOLEN_TASK,
                                        {"json": {"title": "owned"}, "headers": {"If-Match": "{b_etag}"}}, 404,
                                        NOT_FOUND),
    "stolen-delete": (A, "DELETE", STOLEN_TASK, {}, 404, NOT_FOUND),
    "stolen-delete-if-match-bobs-etag": (A, "DELETE", STOLEN_TASK, {"headers": {"If-Match": "{b_etag}"}}, 404,
                                         NOT_FOUND),
    "stolen-delete-if-match-any": (A, "DELETE", STOLEN_TASK, {"headers": {"If-Match": "*"}}, 404, NOT_FOUND),
    "stolen-complete-toggle": (A, "PATCH", STOLEN_TASK + "/complete", {}, 404, NOT_FOUND),
    "stolen-complete-set-true": (A, "PATCH", STOLEN_TASK + "/complete", {"json": {"completed": True}}, 404,
                                 NOT_FOUND),
    "stolen-complete-set-false": (A, "PATCH", STOLEN_TASK + "/complete", {"json": {"completed": False}}, 404,
                                  NOT_FOUND),
    "stolen-complete-if-match-bobs-etag": (A, "PATCH", STOLEN_TASK + "/complete",
                                           {"headers": {"If-Match": "{b_etag}"}}, 404, NOT_FOUND),
    # --- A's own path, with B's ids in the body or the query: A's own data only ------------------------------------
    "own-create-claiming-bobs-ids": (A, "POST", "/api/alice/tasks",
                                     {"json": {"title": "mine", "user_id": B, "id": "{b_task}"}}, 201, None),
    "own-put-claiming-bobs-ids": (A, "PUT", "/api/alice/tasks/{a_task}",
                                  {"json": {"title": "mine", "user_id": B, "id": "{b_task}"}}, 200, None),
    "own-list-searching-bobs-title": (A, "GET", "/api/alice/tasks?q=secret%20plans&search=launch", {}, 200, None),
    "own-list-filtering-bobs-tag": (A, "GET", "/api/alice/tasks?tag=bob-only", {}, 200, None),
    "own-list-with-a-user-id-query": (A, "GET", "/api/alice/tasks?user_id=bob&page_size=1000", {}, 200, None),
    "own-summary": (A, "GET", "/api/alice/tasks/summary?user_id=bob", {}, 200, None),
    "own-me": (A, "GET", "/api/me?user_id=bob", {}, 200, None),
}


def fill(value: Any, names: dict[str, str]) -> Any:
    """Put the world's ids and ETag into a path, header or JSON value."""
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {key: fill(item, names) for key, item in value.items()}
    return value


def assert_only_alices(response: Any, world: World) -> None:
    """Nothing of Bob's in an answer to Alice."""
    for task in world.b_tasks:
        assert task["id"].encode() not in response.data
        assert task["title"].encode() not in response.data
    body = response.json
    items = body if isinstance(body, list) else [body]
    for item in items:
        if "user_id" in item:
            assert item["user_id"] == A
    if isinstance(body, dict) and "total" in body:
        assert body["total"] == 1  # Alice's own task only


@pytest.mark.parametrize("name", list(ATTACKS))
def test_alice_cannot_read_or_change_bobs_tasks(world, client, name):
    sub, method, path, kwargs, status, body = ATTACKS[name]
    names = {"b_task": world.b_task, "a_task": world.a_task["id"], "b_etag": world.b_etag,
             "B_TASK_UPPER": world.b_task.upper()}
    before = world.snapshot()
    kwargs = fill(kwargs, names)
    headers = {**bearer(make_token(sub)), **kwargs.pop("headers", {})}
    response = client.open(fill(path, names), method=method, headers=headers, **kwargs)
    assert response.status_code == status, response.data[:300]
    if body is not None:
        assert response.json == body
    if method == "HEAD":
        assert response.data == b""
    if status < 400 and method != "HEAD":
        assert_only_alices(response, world)
    assert "ETag" not in response.headers or status < 400
    assert world.snapshot() == before


def test_the_matrix_covers_every_task_operation(client):
    """Every operation of the spec under /api/{user_id} appears in the matrix, both ways where it has a task id."""
    spec = client.get("/openapi.json").json
    operations = {(method.upper(), path) for path, item in spec["paths"].items() if path.startswith("/api/{user_id}")
                  for method in item if method != "parameters"}
    covered = set()
    for sub, method, path, _, status, _ in ATTACKS.values():
        if sub != A or status not in (403, 404):
            continue
        template = (path.split("?")[0].rstrip("/").replace("{b_task}", "{task_id}")
                    .replace("{B_TASK_UPPER}", "{task_id}").replace("/bob/", "/{user_id}/")
                    .replace("/alice/", "/{user_id}/"))
        covered.add((method, template, status))
    for method, path in operations:
        assert (method, path, 403) in covered, (method, path)
        if "{task_id}" in path:
            assert (method, path, 404) in covered, (method, path)


LONG = "a" * 10_000


@pytest.mark.parametrize(
    "user_id",
    ["bob", LONG, "alice%00", "%00", "alic%C3%A9", "%E2%80%AEecila", "alice%20", "ALICE", "alice'%20OR%20'1'='1", "*",
     "..", "%2e%2e", "me"],
)
def test_any_other_user_id_in_the_path_is_403_before_the_body_or_the_database(send, app, user_id):
    with no_database(app):  # any query would fail
        for method, path in (("get", "/tasks"), ("post", "/tasks"), ("get", "/tasks/summary"),
                             ("delete", "/tasks/00000000-0000-0000-0000-000000000000")):
            response = send(method, f"/api/{user_id}{path}", data=b"{not json", content_type="application/json")
            assert_error(response, 403, FORBIDDEN)

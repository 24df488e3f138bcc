"""Cross-cutting HTTP behaviour: routes, slashes and task ids, CORS, request ids, caching, logs, the error envelope,
health, and the docs. Request bodies are in test_request_bodies.py, query strings in test_listing.py.
"""

from __future__ import annotations

import json

import pytest
from flask import Flask
from sqlalchemy.exc import OperationalError

from todo_api import create_app

from .helpers import UNREACHABLE_DATABASE_URL, assert_error, make_config, no_database

ORIGIN = "http://localhost:3000"
NOT_FOUND = {"detail": "Not found"}
LONG = "a" * 10_000


# --- routes -------------------------------------------------------------------------------------------------------

def test_method_not_allowed_is_405_json_with_allow(client, auth):
    response = client.post("/api/alice/tasks/3f6c1c1e-8a1d-4d53-9a9f-0c1b2d3e4f50", headers=auth())
    assert response.status_code == 405
    assert response.json == {"detail": "Method not allowed"}
    assert "GET" in response.headers["Allow"]


@pytest.mark.parametrize("path", ["/nowhere", "/api//tasks", "/api/alice//tasks", "//api/alice/tasks",
                                  "/api/alice/tasks//", "/api/alice/tasks/summary/x", f"/{LONG}", "/api/%00"])
def test_paths_that_match_no_route_are_404_json(client, send, path):
    assert_error(client.get(path), 404, NOT_FOUND)  # with no token
    assert_error(send("get", path), 404, NOT_FOUND)


@pytest.mark.parametrize("path", ["/api/alice/tasks/", "/api/me/", "/health/", "/health/ready/"])
def test_trailing_slash_works_without_redirect(client, auth, path):
    response = client.get(path, headers=auth())
    assert response.status_code == 200


def test_trailing_slash_on_create_is_not_redirected(client, auth):
    assert client.post("/api/alice/tasks/", json={"title": "x"}, headers=auth()).status_code == 201


# --- task ids ---------------------------------------------------------------------------------------------------

MALFORMED_TASK_IDS = [
    "not-a-uuid",
    "12345",
    "3f6c1c1e-8a1d-4d53-9a9f-0c1b2d3e4f5",  # a digit short
    "00000000-0000-0000-0000-00000000000g",
    "00000000000000000000000000000000",
    "{00000000-0000-0000-0000-000000000000}",
    "urn:uuid:00000000-0000-0000-0000-000000000000",
    "00000000-0000-0000-0000-000000000000%00",
    LONG,
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "..%252F..%252Fetc%252Fpasswd",
    "%2F",
    "%2e%2e",
    "..",
    "%E2%98%83",  # a snowman
    "%F0%9F%98%80",
    "%27%20OR%201=1",
    "'%20OR%20'1'='1",
    "1'%3B%20DROP%20TABLE%20tasks%3B--",
    '"x"',
    "%22%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    "%00",
    "%ff%fe",
    "-1",
    "0",
    "null",
    "%20",
]


@pytest.mark.parametrize("task_id", MALFORMED_TASK_IDS)
@pytest.mark.parametrize(("method", "suffix"), [("get", ""), ("put", ""), ("patch", ""), ("delete", ""),
                                                ("patch", "/complete")])
def test_malformed_task_ids_are_404(send, method, suffix, task_id):
    assert_error(send(method, f"/api/alice/tasks/{task_id}{suffix}", json={}), 404, NOT_FOUND)


@pytest.mark.parametrize("task_id", ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
                                     "3f6c1c1e-8a1d-4d53-9a9f-0c1b2d3e4f50"])
def test_well_formed_unknown_task_ids_are_404(send, task_id):
    assert_error(send("get", f"/api/alice/tasks/{task_id}"), 404, {"detail": "Task not found"})


def test_an_upper_case_task_id_is_the_same_task(send, create_task):
    task = create_task()
    assert send("get", f"/api/alice/tasks/{task['id'].upper()}").json["id"] == task["id"]


# --- CORS, request ids, caching, logs -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/api/alice/tasks", "/api/alice/tasks/3f6c1c1e-8a1d-4d53-9a9f-0c1b2d3e4f50/complete", "/api/me",
    "/api/alice/tasks/5", "/api/alice/tasks/not-a-uuid/", "/api/bob/tasks/summary", "/api/nowhere",
])
def test_cors_preflight_from_allowed_origin_is_204_on_every_api_path(client, path):
    """Whatever the path's id looks like: the browser must get to send the real request and read its status."""
    response = client.options(path, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "Authorization, Content-Type, If-Match, If-None-Match"})
    assert response.status_code == 204
    assert response.data == b"" and "Content-Type" not in response.headers
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "if-match", "if-none-match"} <= allowed
    assert "PATCH" in response.headers["Access-Control-Allow-Methods"]


def test_cors_exposes_headers_to_allowed_origin(client, auth):
    response = client.get("/api/alice/tasks", headers={"Origin": ORIGIN, **auth()})
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = {h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"X-Total-Count", "X-Pagination", "ETag", "Location", "X-Request-ID", "Retry-After",
            "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= exposed


def test_other_origins_get_no_cors_headers(client, auth):
    response = client.get("/api/alice/tasks", headers={"Origin": "https://evil.example.com", **auth()})
    assert not any(name.startswith("Access-Control-") for name in response.headers.keys())
    preflight = client.options("/api/alice/tasks", headers={
        "Origin": "https://evil.example.com", "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in preflight.headers


@pytest.mark.parametrize("frontends", [[ORIGIN], [ORIGIN, "https://app.example.com"]], ids=["one", "two"])
def test_cors_headers_only_for_requests_that_carry_an_origin_and_every_api_response_varies_on_it(frontends):
    """flask-cors runs only for requests with an Origin (web.WithOrigin), which browsers send on every cross-origin
    request; a request without one gets no Access-Control-* header. So an /api/ response depends on the Origin,
    and each says so, once."""
    app = create_app(make_config(UNREACHABLE_DATABASE_URL, FRONTEND_URL=frontends))
    client = app.test_client()
    plain = client.get("/api/alice/tasks")
    assert plain.status_code == 401
    assert not any(name.startswith("Access-Control-") for name in plain.headers.keys())
    assert plain.headers.get_all("Vary") == ["Origin"]
    for origin in (*frontends, "https://evil.example.com"):
        response = client.get("/api/alice/tasks", headers={"Origin": origin})
        assert response.headers.get("Access-Control-Allow-Origin") == (origin if origin in frontends else None)
        assert response.headers.get_all("Vary") == ["Origin"], origin
    assert "Vary" not in client.get("/health").headers  # not a CORS resource


def test_errors_carry_cors_headers_for_an_allowed_origin(client):
    """So the browser app can read a 401 or a 404 (flask-cors' after-request hook runs on error responses too)."""
    for path in ("/api/alice/tasks", "/api/nowhere"):
        response = client.get(path, headers={"Origin": ORIGIN})
        assert response.status_code in (401, 404) and response.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_generated_request_ids_are_unique_and_drawn_again_in_a_forked_worker():
    from todo_api.observability import RequestIds

    ids = RequestIds()
    drawn = {ids.next() for _ in range(1000)}
    assert len(drawn) == 1000 and all(len(value) == 32 and int(value, 16) >= 0 for value in drawn)
    prefix = ids.prefix
    ids.reset()  # what os.register_at_fork runs in a gunicorn worker
    assert ids.prefix != prefix


def test_ensure_sync_remembers_sync_functions_and_still_refuses_coroutines(app):
    def view() -> str:
        return "ok"

    async def coroutine_view() -> str:
        return "ok"

    assert app.ensure_sync(view) is view and view in app.known_sync
    assert app.ensure_sync(view) is view
    with pytest.raises(RuntimeError, match="async"):  # Flask's own answer without asgiref installed
        app.ensure_sync(coroutine_view)
    assert coroutine_view not in app.known_sync


def test_request_id_is_echoed_or_generated(client, auth):
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    generated = client.get("/health").headers["X-Request-ID"]
    assert len(generated) == 32
    assert client.get("/api/alice/tasks").headers["X-Request-ID"]  # errors carry it too


def test_unsafe_request_id_is_replaced(client):
    assert client.get("/health", headers={"X-Request-ID": "a b<script>"}).headers["X-Request-ID"] != "a b<script>"


def test_api_responses_are_private_no_cache(client, auth):
    assert client.get("/api/alice/tasks", headers=auth()).headers["Cache-Control"] == "private, no-cache"
    assert client.get("/api/alice/tasks").headers["Cache-Control"] == "private, no-cache"


def test_log_lines_carry_request_id_and_never_the_token(client, auth, capsys):
    headers = auth()
    client.get("/api/alice/tasks", headers={"X-Request-ID": "trace-me", **headers})
    err = capsys.readouterr().err
    line = next(json.loads(line) for line in err.splitlines() if "trace-me" in line)
    assert line["method"] == "GET" and line["path"] == "/api/alice/tasks" and line["status"] == 200
    assert line["user_id"] == "alice" and isinstance(line["duration_ms"], float)
    assert headers["Authorization"].split()[1] not in err


# --- errors, health, docs -----------------------------------------------------------------------------------------

def test_health_touches_no_database(client, app):
    with no_database(app):
        response = client.get("/health")
    assert response.status_code == 200 and response.json == {"status": "ok"}


def test_ready_checks_the_database(client):
    assert client.get("/health/ready").json == {"status": "ok"}


def test_ready_is_503_when_the_database_is_unreachable():
    app = create_app(make_config(UNREACHABLE_DATABASE_URL, DB_CONNECT_TIMEOUT=1))
    response = app.test_client().get("/health/ready")
    assert response.status_code == 503
    assert response.json == {"detail": "Database unavailable"}
    assert response.headers["Retry-After"]


@pytest.fixture
def failing_app(database_url) -> Flask:
    app = create_app(make_config(database_url))

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    @app.get("/db-down")
    def db_down():
        raise OperationalError("SELECT secret", {}, Exception("connection refused"))

    yield app
    app.extensions["db"].engine.dispose()


def test_unexpected_error_is_generic_500_json(failing_app, capsys):
    response = failing_app.test_client().get("/boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.json == {"detail": "Internal server error"}
    err = capsys.readouterr().err
    logged = next(json.loads(line) for line in err.splitlines() if '"unhandled error"' in line)
    assert logged["request_id"] == "boom-1" and "secret internals" in logged["exc"]


def test_database_outage_is_503_with_retry_after_and_no_sql(failing_app):
    response = failing_app.test_client().get("/db-down")
    assert response.status_code == 503
    assert response.json == {"detail": "Database unavailable"}
    assert response.headers["Retry-After"] == "5"
    assert b"SELECT" not in response.data


def test_openapi_spec_documents_the_api_and_bearer_auth(client):
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    paths = spec["paths"]
    assert {"get", "post"} <= set(paths["/api/{user_id}/tasks"])
    assert {"get", "put", "patch", "delete"} <= set(paths["/api/{user_id}/tasks/{task_id}"])
    assert "patch" in paths["/api/{user_id}/tasks/{task_id}/complete"]
    assert paths["/api/{user_id}/tasks"]["post"]["summary"] == "Create a task."


def test_docs_are_served_with_local_assets(client):
    page = client.get("/docs")
    assert page.status_code == 200 and b"/docs/assets/swagger-ui-bundle.js" in page.data
    assert b"https://" not in page.data
    asset = client.get("/docs/assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.data) > 100_000
    asset.close()

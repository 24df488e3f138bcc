"""Spec-driven fuzzing: schemathesis generates requests for every operation of the app's own /openapi.json.

Every response, errors included, must be documented for its operation and match the documented schema; no 5xx.
Requests go to the WSGI app in-process (the `app` fixture: one rolled-back transaction per operation).

- The owner run fixes `user_id` to the token's user, and points half of the task ids at a fresh real task, so
  success paths, ETags and 412s are reached too; schemathesis' negative mode sends non-UUID task ids (404).
- The intruder run keeps the token's user but sends another user id: every operation must answer 403, even with
  an invalid body, a non-UUID task id or odd parameters.

Coverage and fuzzing phases, positive and negative data, deterministic (derandomized) and bounded: see CONFIG.
schemathesis' lazy `from_fixture` loader does not work with pytest 9.2 (it sets `Item._nodeid`), so the schema is
loaded at import from an app that only serves the spec, and each call goes to the fixture's app.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings

from todo_api import create_app
from todo_api.web import API_CSP

from .helpers import UNREACHABLE_DATABASE_URL, bearer, make_config, make_token

OWNER = "fuzz-owner"
TOKEN = make_token(OWNER, ttl=24 * 3600)
# Per operation and run: fuzzing examples on top of the coverage phase's deterministic cases.
MAX_EXAMPLES = 20
# Generated requests each operation item must have sent, in each run (owner, intruder): about 3/4 of what this
# pinned schemathesis sends (about 1,500), and well over 1,000 in all.
MIN_REQUESTS = {
    "GET /api/{user_id}/tasks": 150,
    "POST /api/{user_id}/tasks": 85,
    "GET /api/{user_id}/tasks/summary": 24,
    "GET /api/{user_id}/tasks/{task_id}": 26,
    "PUT /api/{user_id}/tasks/{task_id}": 90,
    "PATCH /api/{user_id}/tasks/{task_id}": 90,
    "DELETE /api/{user_id}/tasks/{task_id}": 24,
    "PATCH /api/{user_id}/tasks/{task_id}/complete": 45,
    "GET /api/me": 22,
    "GET /health": 8,
    "GET /health/ready": 8,
}

CONFIG = schemathesis.Config.from_dict({
    "generation": {"max-examples": MAX_EXAMPLES, "mode": "all", "deterministic": True, "database": "none"},
    "phases": {
        "examples": {"enabled": False},  # the spec has no examples
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        "stateful": {"enabled": False},
    },
    "checks": {
        # The spec cannot say that `completed`, `is_completed` and `status` must agree, that a title of spaces is
        # blank once trimmed, or that strings may not hold NUL: schema-valid data may get the documented 422.
        # Anything else (400, 405, 413, 415) would still fail the check.
        "positive_data_acceptance": {"expected-statuses": ["2XX", "304", "401", "403", "404", "412", "422"]},
    },
})


def _load_schema() -> Any:
    spec_app = create_app(make_config(UNREACHABLE_DATABASE_URL, LOG_LEVEL="WARNING"))
    try:
        return schemathesis.openapi.from_wsgi("/openapi.json", spec_app, config=CONFIG)
    finally:
        spec_app.extensions["db"].engine.dispose()


schema = _load_schema()
API_OPERATIONS = schema.include(path_regex=r"^/api/\{user_id\}/")

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": API_CSP,
}
PAGINATION_KEYS = {"total", "total_pages", "first_page", "last_page", "page", "previous_page", "next_page"}
LEAKS = re.compile(rb"Traceback|SELECT |INSERT |UPDATE |DELETE FROM|psycopg2|sqlalchemy", re.IGNORECASE)


def security_headers_on_every_response(ctx: Any, response: Any, case: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == [value], f"{name}: {response.headers.get(name)}"
    assert "server" not in response.headers


def pagination_header_is_json_metadata(ctx: Any, response: Any, case: Any) -> None:
    """X-Pagination is JSON (documented with `content`, which schemathesis does not validate)."""
    if "x-pagination" in response.headers:
        metadata = json.loads(response.headers["x-pagination"][0])
        assert set(metadata) <= PAGINATION_KEYS and all(type(v) is int for v in metadata.values()), metadata


def no_internals_in_the_body(ctx: Any, response: Any, case: Any) -> None:
    assert not LEAKS.search(response.content or b""), response.content[:500]
    assert TOKEN.encode() not in (response.content or b"")


EXTRA_CHECKS = [security_headers_on_every_response, pagination_header_is_json_metadata, no_internals_in_the_body]


@pytest.fixture
def sent(request: pytest.FixtureRequest) -> Iterator[list[int]]:
    """Statuses of the generated requests of this operation item, at least MIN_REQUESTS[operation] of them."""
    statuses: list[int] = []
    failures = request.session.testsfailed
    yield statuses
    if request.session.testsfailed == failures:  # a failing example stops early: its own report says enough
        operation = re.search(r"\[([A-Z]+ [^]]+)\]", request.node.name).group(1)
        assert len(statuses) >= MIN_REQUESTS[operation], f"{operation}: only {len(statuses)} requests"


@pytest.fixture
def fresh_task(app: Flask) -> Callable[[], str]:
    """A new task of OWNER's, created outside the generated traffic; returns its id."""
    client = app.test_client()

    def create() -> str:
        response = client.post(f"/api/{OWNER}/tasks", json={"title": "fuzz target", "tags": ["x"]},
                               headers=bearer(TOKEN))
        assert response.status_code == 201
        return response.json["id"]

    return create


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


FUZZ_SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@schema.parametrize()
@FUZZ_SETTINGS
def test_generated_requests_from_the_owner_get_documented_answers(case, app, sent, fresh_task):
    parameters = case.path_parameters or {}
    if "user_id" in parameters:
        parameters["user_id"] = OWNER
    # Every other well-formed task id is a real task, so GET/PUT/PATCH/DELETE/complete also succeed (or 412).
    if "task_id" in parameters and _is_uuid(parameters["task_id"]) and len(sent) % 2 == 0:
        parameters["task_id"] = fresh_task()
    response = case.call_and_validate(headers=bearer(TOKEN), app=app, additional_checks=EXTRA_CHECKS)
    sent.append(response.status_code)




@API_OPERATIONS.parametrize()
@FUZZ_SETTINGS
def test_generated_requests_for_another_users_path_are_403(case, app, sent):
    parameters = case.path_parameters
    # The generated id (sent percent-encoded), unless it cannot be one path segment (a route that does not exist
    # for it, so 404 or 405) or happens to be the owner's.
    decoded = unquote(str(parameters["user_id"]))
    if decoded in ("", ".", "..", OWNER) or any(char in decoded for char in "/?#"):
        parameters["user_id"] = "mallory"
    response = case.call_and_validate(headers=bearer(TOKEN), app=app, additional_checks=EXTRA_CHECKS)
    sent.append(response.status_code)
    # Requests that reach the operation (not another method: 405; not a non-UUID task id: 404) stop at the guard.
    reached = response.request.method.upper() == case.operation.method.upper() and _is_uuid(
        parameters.get("task_id", uuid.UUID(int=0)))
    if reached:
        authorized = response.request.headers.get("Authorization") == f"Bearer {TOKEN}"
        assert response.status_code == (403 if authorized else 401), response.content[:200]

"""MCP at /mcp (todo_api/mcp_server.py, mcp_tools.py).

The protocol and the tools through the Flask test client, each test in a rolled-back transaction; then the official
clients against a real gunicorn: the Python SDK (pinned in requirements-dev.txt) in handshake mode and in its default
mode, and the TypeScript SDK (tests/mcp_ts) under Node.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import jwt
import mcp_types
import pytest
from alembic import command
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from todo_api import create_app, mcp_server, mcp_tools
from todo_api.cli import alembic_config
from todo_api.schemas import TaskCreateSchema

from .helpers import (
    MCP_HEADERS,
    assert_error,
    bearer,
    delete_tasks_of,
    make_config,
    make_token,
    mcp_post,
    mcp_tool,
    rolled_back,
)
from .live_server import ROOT, LiveServer, call, live_server, server_env

TOOL_NAMES = {"add_task", "list_tasks", "get_task", "update_task", "complete_task", "delete_task", "task_summary"}
MISSING_TASK = "00000000-0000-4000-8000-000000000000"
TS_CLIENT_DIR = Path(__file__).resolve().parent / "mcp_ts"


def rpc(method: str, params: dict[str, Any] | None = None, request_id: Any = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def initialize(version: str) -> dict[str, Any]:
    return rpc("initialize", {"protocolVersion": version, "capabilities": {},
                              "clientInfo": {"name": "pytest", "version": "1"}})


def tools_by_name(client: Any, token: str) -> dict[str, dict[str, Any]]:
    response = mcp_post(client, token, rpc("tools/list"))
    assert response.status_code == 200
    return {tool["name"]: tool for tool in response.json["result"]["tools"]}


def rpc_error(response: Any, http_status: int, code: int, request_id: Any = 1) -> str:
    """Assert a JSON-RPC error answer; return its message."""
    assert response.status_code == http_status, response.get_data()[:300]
    assert response.content_type == "application/json"
    body = response.json
    assert body["jsonrpc"] == "2.0" and body["id"] == request_id and body["error"]["code"] == code, body
    assert "result" not in body
    return body["error"]["message"]


def tool_error(result: dict[str, Any]) -> str:
    """Assert a tool result with isError: true; return its text."""
    assert result["isError"] is True, result
    assert "structuredContent" not in result
    [content] = result["content"]
    assert content["type"] == "text"
    return content["text"]


def rest_tasks(client: Any, user: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/{user}/tasks", headers=bearer(make_token(user)))
    assert response.status_code == 200
    return response.json


# --- Transport and JSON-RPC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25", "2025-03-26", "2024-11-05"])
def test_initialize_answers_the_clients_protocol_version_when_supported(client, version):
    response = mcp_post(client, make_token(), initialize(version))
    assert response.status_code == 200
    result = response.json["result"]
    assert result["protocolVersion"] == version
    assert result["capabilities"] == {"tools": {"listChanged": False}}
    assert result["serverInfo"]["name"] == "todo-api"
    mcp_types.InitializeResult.model_validate(result)
    assert "Mcp-Session-Id" not in response.headers  # stateless: no session to keep


def test_initialize_with_an_unknown_version_answers_the_latest_supported(client):
    response = mcp_post(client, make_token(), initialize("2099-01-01"))
    assert response.json["result"]["protocolVersion"] == "2025-11-25"


def test_an_unsupported_protocol_version_header_is_400_naming_the_supported_ones(client):
    response = mcp_post(client, make_token(), rpc("tools/list"), headers={"MCP-Protocol-Version": "2026-07-28"})
    rpc_error(response, 400, -32022)
    assert response.json["error"]["data"] == {
        "supported": ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"], "requested": "2026-07-28"}


def test_ping_answers_an_empty_result(client):
    response = mcp_post(client, make_token(), rpc("ping", request_id="p-1"))
    assert response.status_code == 200 and response.json == {"jsonrpc": "2.0", "id": "p-1", "result": {}}


@pytest.mark.parametrize("message", [
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 3}},
    {"jsonrpc": "2.0", "id": 5, "result": {}},  # a response: this server asks nothing, but accepts it
], ids=["initialized", "cancelled", "response"])
def test_notifications_and_responses_are_202_without_a_body(client, message):
    response = mcp_post(client, make_token(), message)
    assert response.status_code == 202 and response.get_data() == b""


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT"])
def test_methods_other_than_post_are_405_with_the_json_envelope(client, method):
    response = client.open("/mcp", method=method, headers={**MCP_HEADERS, **bearer(make_token())})
    assert_error(response, 405, {"detail": "Method not allowed"})
    assert "POST" in response.headers["Allow"]


def test_a_body_that_is_not_json_is_a_parse_error(client):
    response = client.post("/mcp", data=b'{"jsonrpc": "2.0", "id": 1,', content_type="application/json",
                           headers={**MCP_HEADERS, **bearer(make_token())})
    assert "Parse error" in rpc_error(response, 400, -32700, None)


@pytest.mark.parametrize(("message", "request_id"), [
    ([rpc("ping")], None),
    ("ping", None),
    ({"jsonrpc": "2.0", "id": 4}, 4),
    ({"jsonrpc": "1.0", "id": 4, "method": "ping"}, 4),
    ({"jsonrpc": "2.0", "id": 4.5, "method": "ping"}, None),
    ({"jsonrpc": "2.0", "id": 4, "method": "ping", "params": [1]}, 4),
], ids=["batch", "string", "no-method", "jsonrpc-1.0", "float-id", "array-params"])
def test_a_message_that_is_not_a_request_is_an_invalid_request(client, message, request_id):
    rpc_error(mcp_post(client, make_token(), message), 400, -32600, request_id)


def test_an_unknown_method_is_method_not_found(client):
    assert "resources/list" in rpc_error(mcp_post(client, make_token(), rpc("resources/list")), 200, -32601)


@pytest.mark.parametrize("message", [
    rpc("tools/call", {"arguments": {}}),
    rpc("tools/call", {"name": "add_task", "arguments": ["Buy milk"]}),
    rpc("initialize", {"protocolVersion": "2025-06-18"}),
    rpc("tools/list", {"cursor": "page-2"}),
], ids=["no-tool-name", "arguments-not-an-object", "initialize-without-client-info", "unknown-cursor"])
def test_bad_params_are_invalid_params(client, message):
    rpc_error(mcp_post(client, make_token(), message), 200, -32602)


def test_an_unknown_tool_is_invalid_params_naming_the_tools(client):
    message = rpc_error(mcp_post(client, make_token(), rpc("tools/call", {"name": "drop_tables"})), 200, -32602)
    assert "drop_tables" in message and "add_task" in message


def test_a_body_that_is_not_json_by_content_type_is_415(client):
    response = client.post("/mcp", data=json.dumps(rpc("ping")), content_type="text/plain",
                           headers={**MCP_HEADERS, **bearer(make_token())})
    assert_error(response, 415, {"detail": "Content-Type must be application/json"})


def test_a_client_that_accepts_only_sse_is_406_and_one_that_says_nothing_gets_json(client):
    response = mcp_post(client, make_token(), rpc("ping"), headers={"Accept": "text/event-stream"})
    assert response.status_code == 406 and "application/json" in response.json["detail"]
    response = client.post("/mcp", json=rpc("ping"), headers=bearer(make_token()))
    assert response.status_code == 200 and response.json["result"] == {}


def test_mcp_responses_carry_the_security_headers_and_no_store(client):
    response = mcp_post(client, make_token(), rpc("ping"))
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Request-ID"]


def test_a_browser_preflight_from_the_frontend_allows_the_mcp_headers(client):
    response = client.options("/mcp", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, mcp-protocol-version"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "mcp-protocol-version" in allowed and "authorization" in allowed


def test_a_foreign_origin_is_403(client):
    response = mcp_post(client, make_token(), rpc("ping"), headers={"Origin": "https://evil.example"})
    assert_error(response, 403, {"detail": "Origin not allowed"})
    assert mcp_post(client, make_token(), rpc("ping"), headers={"Origin": "http://localhost:3000"}).status_code == 200


# --- Authentication -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("token", "challenge", "detail"), [
    (None, "Bearer", "Missing authentication token"),
    ("not-a-jwt", 'Bearer error="invalid_token"', "Invalid authentication token"),
    (make_token(ttl=-3600), 'Bearer error="invalid_token"', "Authentication token expired"),
], ids=["missing", "garbage", "expired"])
def test_a_missing_or_bad_token_is_401_with_www_authenticate(client, token, challenge, detail):
    response = mcp_post(client, token, rpc("tools/list"))
    assert_error(response, 401, {"detail": detail})
    assert response.headers["WWW-Authenticate"] == challenge


@pytest.fixture
def better_auth_app(database_url: str) -> Iterator[Flask]:
    """An app whose tokens come from a Better Auth at an address where nothing listens (and HS256 as usual)."""
    app = create_app(make_config(database_url, BETTER_AUTH_URL="http://127.0.0.1:1"))
    with rolled_back(app):
        yield app
    app.extensions["db"].engine.dispose()


def test_with_better_auth_the_401_points_to_the_protected_resource_metadata(better_auth_app):
    client = better_auth_app.test_client()
    metadata = "http://localhost/.well-known/oauth-protected-resource/mcp"
    missing = mcp_post(client, None, rpc("tools/list"))
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == f'Bearer resource_metadata="{metadata}"'
    invalid = mcp_post(client, "not-a-jwt", rpc("tools/list"))
    assert invalid.headers["WWW-Authenticate"] == f'Bearer error="invalid_token", resource_metadata="{metadata}"'

    response = client.get("/.well-known/oauth-protected-resource/mcp")
    assert response.status_code == 200
    assert response.json == {
        "resource": "http://localhost/mcp", "authorization_servers": ["http://127.0.0.1:1"],
        "bearer_methods_supported": ["header"], "resource_name": "todo-api MCP tools",
        "resource_documentation": "http://localhost/docs"}
    root = client.get("/.well-known/oauth-protected-resource", headers={"Origin": "https://inspector.example"})
    assert root.json["resource"] == "http://localhost" and root.headers["Access-Control-Allow-Origin"] == "https://inspector.example"


def test_without_better_auth_there_is_no_protected_resource_metadata(client):
    assert client.get("/.well-known/oauth-protected-resource/mcp").status_code == 404
    assert mcp_post(client, None, rpc("ping")).headers["WWW-Authenticate"] == "Bearer"


def test_an_unreachable_jwks_is_503_with_retry_after_as_on_rest(better_auth_app):
    key = Ed25519PrivateKey.generate()
    token = jwt.encode({"sub": "alice", "exp": 2**31, "iss": "http://127.0.0.1:1", "aud": "http://127.0.0.1:1"},
                       key, algorithm="EdDSA", headers={"kid": "k1"})
    response = mcp_post(better_auth_app.test_client(), token, rpc("tools/list"))
    assert_error(response, 503, {"detail": "Authentication service unavailable"})
    assert int(response.headers["Retry-After"]) > 0


# --- Tool definitions -----------------------------------------------------------------------------------------------


def test_tools_list_names_the_tools_with_input_and_output_schemas(client):
    tools = tools_by_name(client, make_token())
    assert set(tools) == TOOL_NAMES
    for tool in tools.values():
        mcp_types.Tool.model_validate(tool)
        assert tool["inputSchema"]["type"] == "object" and tool["outputSchema"]["type"] == "object"
        assert "user_id" in tool["inputSchema"]["properties"]
        jsonschema.Draft202012Validator.check_schema(tool["inputSchema"])
        jsonschema.Draft202012Validator.check_schema(tool["outputSchema"])
    assert tools["add_task"]["inputSchema"]["required"] == ["title"]
    assert tools["delete_task"]["annotations"]["destructiveHint"] is True
    assert tools["list_tasks"]["annotations"]["readOnlyHint"] is True
    assert tools["list_tasks"]["outputSchema"]["required"] == ["has_more", "page", "page_size", "tasks", "total"]


def test_input_schemas_say_what_the_rest_apis_openapi_says(client):
    """Generated from the REST schemas: the field rules of POST /tasks's body are those of add_task."""
    spec = client.get("/openapi.json").json
    create = spec["components"]["schemas"]["TaskCreate"]["properties"]
    tools = tools_by_name(client, make_token())
    add_task = tools["add_task"]["inputSchema"]["properties"]
    for field in ("title", "status", "priority", "tags"):
        assert add_task[field] == create[field]
    assert set(add_task) == set(TaskCreateSchema().fields) - {"completed", "is_completed"} | {"user_id"}
    listing = tools["list_tasks"]["inputSchema"]["properties"]
    query = {parameter["name"]: parameter["schema"] for parameter in spec["paths"]["/api/{user_id}/tasks"]["get"]
             ["parameters"] if parameter["in"] == "query"}
    for field in ("status", "sort", "order", "q"):
        assert {k: v for k, v in listing[field].items() if k != "description"} == \
            {k: v for k, v in query[field].items() if k != "description"}
    assert listing["page_size"]["maximum"] == mcp_tools.MAX_LIST_PAGE_SIZE


# --- Tools, checked through the REST API ----------------------------------------------------------------------------


def test_add_task_creates_what_rest_then_lists(client):
    result = mcp_tool(client, make_token(), "add_task", {
        "title": "  Buy milk ", "description": "2 liters", "priority": "high", "due_date": "2030-01-02T03:04:05Z",
        "tags": ["home", "home", "errand"]})
    assert result["isError"] is False
    task = result["structuredContent"]
    assert json.loads(result["content"][0]["text"]) == task
    [listed] = rest_tasks(client, "alice")
    assert listed == task
    assert (task["title"], task["priority"], task["tags"], task["due_date"]) == (
        "Buy milk", "high", ["home", "errand"], "2030-01-02T03:04:05+00:00")


def test_structured_results_match_their_output_schemas(client):
    token = make_token()
    tools = tools_by_name(client, token)
    task_id = mcp_tool(client, token, "add_task", {"title": "Checked"})["structuredContent"]["id"]
    calls = [("add_task", {"title": "Another"}), ("list_tasks", {}), ("get_task", {"task_id": task_id}),
             ("update_task", {"task_id": task_id, "due_date": None}), ("complete_task", {"task_id": task_id}),
             ("task_summary", {}), ("delete_task", {"task_id": task_id})]
    assert {name for name, _ in calls} == TOOL_NAMES
    for name, arguments in calls:
        result = mcp_tool(client, token, name, arguments)
        mcp_types.CallToolResult.model_validate(result)
        jsonschema.validate(result["structuredContent"], tools[name]["outputSchema"])


@pytest.mark.parametrize("etag", [None, '"0123abcd"'])
def test_the_written_out_tool_result_is_the_sdks_call_tool_result(client, create_task, etag):
    task = mcp_tool(client, make_token(), "get_task", {"task_id": create_task()["id"]})["structuredContent"]
    sdk = mcp_types.CallToolResult(content=[mcp_types.TextContent(type="text", text=json.dumps(task))],
                                   structured_content=task, meta={"todo-api/etag": etag} if etag else None)
    sdk_dict = sdk.model_dump(by_alias=True, exclude_none=True)
    ours = mcp_server.tool_result(task, etag)
    assert json.loads(ours["content"][0].pop("text")) == json.loads(sdk_dict["content"][0].pop("text"))
    assert ours == sdk_dict


def test_task_results_carry_rests_etag_and_if_match_refuses_a_stale_one(client, create_task):
    task = create_task()
    token = make_token()
    rest_etag = client.get(f"/api/alice/tasks/{task['id']}", headers=bearer(token)).headers["ETag"]
    read = mcp_tool(client, token, "get_task", {"task_id": task["id"]})
    assert read["_meta"] == {"todo-api/etag": rest_etag}
    updated = mcp_tool(client, token, "update_task", {"task_id": task["id"], "title": "New", "if_match": rest_etag})
    assert updated["isError"] is False and updated["_meta"]["todo-api/etag"] != rest_etag
    for name, arguments in (("update_task", {"title": "Lost update"}), ("complete_task", {}), ("delete_task", {})):
        stale = mcp_tool(client, token, name, {"task_id": task["id"], "if_match": rest_etag, **arguments})
        assert tool_error(stale).startswith("if_match: the task has changed")
    assert [(listed["title"], listed["status"]) for listed in rest_tasks(client, "alice")] == [("New", "pending")]
    current = updated["_meta"]["todo-api/etag"].strip('"')  # bare, as some clients keep it
    assert mcp_tool(client, token, "complete_task", {"task_id": task["id"], "if_match": current})["isError"] is False
    assert "_meta" not in mcp_tool(client, token, "list_tasks")


def test_list_tasks_filters_sorts_and_pages_like_rest(client, create_task):
    for title, priority, tags in (("Alpha", "low", ["a"]), ("Beta", "high", ["a", "b"]), ("Gamma", "high", [])):
        create_task(title=title, priority=priority, tags=tags)
    token = make_token()

    def titles(**arguments: Any) -> list[str]:
        result = mcp_tool(client, token, "list_tasks", arguments)
        assert result["isError"] is False, result
        return [task["title"] for task in result["structuredContent"]["tasks"]]

    assert titles(sort="title", order="asc") == ["Alpha", "Beta", "Gamma"]
    assert titles(priority=["high"], sort="title", order="asc") == ["Beta", "Gamma"]
    assert titles(tag=["a", "b"]) == ["Beta"]
    assert titles(q="ALP") == ["Alpha"]
    assert titles(status="completed") == []
    page = mcp_tool(client, token, "list_tasks", {"sort": "title", "order": "asc", "page": 2, "page_size": 2})
    assert page["structuredContent"]["total"] == 3 and page["structuredContent"]["has_more"] is False
    assert [task["title"] for task in page["structuredContent"]["tasks"]] == ["Gamma"]


def test_list_tasks_overdue_takes_a_json_boolean(client, create_task):
    create_task(title="Late", due_date="2001-01-01T00:00:00Z")
    create_task(title="Later", due_date="2999-01-01T00:00:00Z")
    result = mcp_tool(client, make_token(), "list_tasks", {"overdue": True})
    assert [task["title"] for task in result["structuredContent"]["tasks"]] == ["Late"]
    assert "overdue" in tool_error(mcp_tool(client, make_token(), "list_tasks", {"overdue": "true"}))


@pytest.mark.parametrize(("arguments", "field"), [
    ({"page_size": mcp_tools.MAX_LIST_PAGE_SIZE + 1}, "page_size"),
    ({"page_size": 0}, "page_size"),
    ({"status": "done"}, "status"),
    ({"sort": "owner"}, "sort"),
    ({"priority": "high"}, "priority"),
    ({"completed": True}, "completed"),  # REST's query flag; status says it here
    ({"stauts": "pending"}, "stauts"),
])
def test_bad_list_arguments_are_tool_errors_naming_the_field(client, arguments, field):
    assert f"{field}:" in tool_error(mcp_tool(client, make_token(), "list_tasks", arguments))


def test_update_task_changes_only_the_fields_given(client, create_task):
    task = create_task(title="Draft", description="keep me", tags=["x"])
    result = mcp_tool(client, make_token(), "update_task", {"task_id": task["id"], "title": "Final",
                                                            "status": "in_progress"})
    assert result["isError"] is False
    [listed] = rest_tasks(client, "alice")
    assert (listed["title"], listed["description"], listed["tags"], listed["status"]) == (
        "Final", "keep me", ["x"], "in_progress")
    assert listed == result["structuredContent"]


def test_complete_task_completes_and_stays_completed_when_called_again(client, create_task):
    task = create_task()
    token = make_token()
    for _ in range(2):
        result = mcp_tool(client, token, "complete_task", {"task_id": task["id"]})
        assert result["structuredContent"]["completed"] is True
    [listed] = rest_tasks(client, "alice")
    assert listed["status"] == "completed" and listed["completed_at"] is not None
    undone = mcp_tool(client, token, "complete_task", {"task_id": task["id"], "completed": False})
    assert undone["structuredContent"]["status"] == "pending"


def test_delete_task_deletes_and_a_second_delete_is_not_found(client, create_task):
    task = create_task()
    token = make_token()
    result = mcp_tool(client, token, "delete_task", {"task_id": task["id"]})
    assert result["structuredContent"] == {"deleted": True, "task_id": task["id"]}
    assert client.get(f"/api/alice/tasks/{task['id']}", headers=bearer(token)).status_code == 404
    assert "not found" in tool_error(mcp_tool(client, token, "delete_task", {"task_id": task["id"]}))


def test_get_task_and_task_summary_read_what_rest_reads(client, create_task):
    task = create_task(priority="low")
    token = make_token()
    assert mcp_tool(client, token, "get_task", {"task_id": task["id"]})["structuredContent"] == task
    summary = client.get("/api/alice/tasks/summary", headers=bearer(token)).json
    assert mcp_tool(client, token, "task_summary")["structuredContent"] == summary


@pytest.mark.parametrize(("name", "arguments"), [
    ("get_task", {}),
    ("update_task", {"title": "x"}),
    ("complete_task", {}),
    ("delete_task", {}),
])
def test_other_users_task_is_not_found_over_mcp_and_stays_unchanged(client, create_task, name, arguments):
    task = create_task(title="Alice's")
    result = mcp_tool(client, make_token("bob"), name, {"task_id": task["id"], **arguments})
    assert tool_error(result) == mcp_tools.TASK_NOT_FOUND
    assert rest_tasks(client, "alice") == [task]


def test_other_users_tasks_are_not_listed_over_mcp(client, create_task):
    create_task(title="Alice's")
    result = mcp_tool(client, make_token("bob"), "list_tasks")
    assert result["structuredContent"]["tasks"] == [] and result["structuredContent"]["total"] == 0
    assert mcp_tool(client, make_token("bob"), "task_summary")["structuredContent"]["total"] == 0


@pytest.mark.parametrize("name", sorted(TOOL_NAMES))
def test_a_foreign_user_id_is_a_tool_error_and_changes_nothing(client, create_task, name):
    task = create_task()
    result = mcp_tool(client, make_token(), name, {"user_id": "bob", "task_id": task["id"], "title": "Bob's"})
    assert tool_error(result).startswith("user_id:")
    assert rest_tasks(client, "alice") == [task] and rest_tasks(client, "bob") == []


def test_the_users_own_user_id_is_accepted(client):
    result = mcp_tool(client, make_token(), "add_task", {"user_id": "alice", "title": "Mine"})
    assert result["isError"] is False and result["structuredContent"]["user_id"] == "alice"


@pytest.mark.parametrize(("arguments", "field", "message"), [
    ({"title": "   "}, "title", "Title must not be blank."),
    ({}, "title", "Missing data for required field."),
    ({"title": "x" * 201}, "title", "Title must be at most 200 characters."),
    ({"title": "x", "priority": "urgent"}, "priority", "Must be one of: low, medium, high."),
    ({"title": "x", "due_date": "tomorrow"}, "due_date", "Not a valid datetime."),
    ({"title": "x", "tags": ["ok", ""]}, "tags.1", "Each tag must be 1 to 50 characters."),
    ({"title": "x", "completed": True}, "completed", "Unknown field."),
])
def test_invalid_add_task_arguments_are_tool_errors_naming_the_field(client, arguments, field, message):
    assert f"{field}: {message}" in tool_error(mcp_tool(client, make_token(), "add_task", arguments))
    assert rest_tasks(client, "alice") == []


@pytest.mark.parametrize("task_id", ["nope", "", 42, None, "3f6c1c1e-xxxx"])
def test_a_malformed_task_id_is_a_tool_error(client, create_task, task_id):
    task = create_task()
    for name in ("get_task", "update_task", "complete_task", "delete_task"):
        assert "task_id:" in tool_error(mcp_tool(client, make_token(), name, {"task_id": task_id}))
    assert rest_tasks(client, "alice") == [task]


def test_a_contradictory_update_is_a_tool_error_and_changes_nothing(client, create_task):
    task = create_task()
    result = mcp_tool(client, make_token(), "update_task", {"task_id": task["id"], "title": "New",
                                                            "completed": True, "status": "pending"})
    assert "status:" in tool_error(result)
    assert rest_tasks(client, "alice") == [task]


def test_the_task_quota_is_a_tool_error(client, app, monkeypatch):
    monkeypatch.setitem(app.config, "TASK_QUOTA", 1)
    token = make_token()
    assert mcp_tool(client, token, "add_task", {"title": "One"})["isError"] is False
    assert tool_error(mcp_tool(client, token, "add_task", {"title": "Two"})).startswith("Task quota reached")
    assert [task["title"] for task in rest_tasks(client, "alice")] == ["One"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@pytest.mark.parametrize("name", sorted(TOOL_NAMES))
def test_any_json_arguments_get_a_tool_result_never_a_crash(client, create_task, name):
    """Whatever an agent sends as arguments: a result, an error result naming what is wrong, never a 500."""
    token = make_token()
    tool = tools_by_name(client, token)[name]
    fields = sorted(tool["inputSchema"]["properties"]) + ["unknown"]
    task_id = create_task()["id"]
    values = JSON_VALUES | st.just(task_id) | st.just("2030-01-01T00:00:00Z") | st.just(["a", "b"])

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
              database=None)
    @given(st.dictionaries(st.sampled_from(fields), values, max_size=4))
    def check(arguments: dict[str, Any]) -> None:
        result = mcp_tool(client, token, name, arguments)
        assert isinstance(result["isError"], bool)
        if result["isError"]:
            assert result["content"][0]["text"]
        else:
            jsonschema.validate(result["structuredContent"], tool["outputSchema"])

    check()


def test_each_call_is_one_log_line_naming_the_tool(client, capsys):
    capsys.readouterr()
    mcp_tool(client, make_token(), "add_task", {"title": "Logged"})
    mcp_tool(client, make_token(), "get_task", {"task_id": "bad"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"todo_api.access"' in line]
    assert [(line["path"], line["mcp_method"], line["tool"], line.get("tool_error")) for line in lines] == [
        ("/mcp", "tools/call", "add_task", None), ("/mcp", "tools/call", "get_task", True)]
    assert all(line["user_id"] == "alice" for line in lines)


@pytest.fixture
def limited_client(database_url: str) -> Iterator[Any]:
    app = create_app(make_config(database_url, RATELIMIT_ENABLED=True, RATELIMIT_STORAGE_URI="memory://",
                                 RATELIMIT_APPLICATION="3 per minute", RATELIMIT_ANONYMOUS="100 per minute"))
    with rolled_back(app):
        yield app.test_client()
    app.extensions["db"].engine.dispose()


def test_mcp_calls_count_against_the_users_rate_limit_with_rest(limited_client):
    alice = make_token("alice")
    assert limited_client.get("/api/alice/tasks", headers=bearer(alice)).status_code == 200
    assert [mcp_post(limited_client, alice, rpc("ping")).status_code for _ in range(3)] == [200, 200, 429]
    limited = mcp_post(limited_client, alice, rpc("tools/list"))
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    assert mcp_post(limited_client, make_token("bob"), rpc("ping")).status_code == 200


# --- The official clients against a real gunicorn ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One gunicorn (two workers) for the module's client tests; the tables are migrated, the users unique."""
    command.upgrade(alembic_config(postgres_url), "head")
    with live_server(server_env(postgres_url), log_dir=tmp_path_factory.mktemp("mcp")) as server:
        yield server
        assert "Traceback" not in server.output()


@pytest.fixture
def users(postgres_url: str) -> Iterator[Callable[[], str]]:
    """users() -> a new user id; their tasks are deleted at the end."""
    made: list[str] = []

    def new() -> str:
        made.append(f"mcp-test-{uuid.uuid4()}")
        return made[-1]

    yield new
    delete_tasks_of(postgres_url, made)


class Transcript:
    """What a session did, as a reader would want to see it (printed; pytest -s shows it)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)
        print(line)


async def sdk_session(url: str, token: str, mode: str, body: Callable[[Any], Any]) -> Any:
    """Run `body(client)` in a session of the official Python SDK's client, with the bearer header."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            return await body(client)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["legacy", "auto"], ids=["handshake", "sdk-default"])
def test_python_sdk_client_manages_tasks_as_rest_sees_them(served, users, mode):
    user = users()
    token = make_token(user)
    tasks_url = f"{served.base_url}/api/{user}/tasks"
    log = Transcript()

    async def session(client: Any) -> None:
        log.add(f"connected ({mode}): protocol {client.protocol_version}, server {client.server_info.name}")
        assert client.protocol_version == "2025-11-25"  # the default mode's 2026-07-28 probe fell back to initialize
        tools = await client.list_tools()
        log.add(f"tools/list: {', '.join(tool.name for tool in tools.tools)}")
        assert {tool.name for tool in tools.tools} == TOOL_NAMES

        async def tool(name: str, arguments: dict[str, Any]) -> Any:
            result = await client.call_tool(name, arguments)
            log.add(f"tools/call {name} {json.dumps(arguments)} -> isError={result.is_error} "
                    f"{json.dumps(result.structured_content) if result.structured_content else result.content[0].text}")
            return result

        added = await tool("add_task", {"title": "Buy milk", "priority": "high", "tags": ["home"], "user_id": user})
        assert added.is_error is False
        task_id = added.structured_content["id"]
        assert call("GET", f"{tasks_url}/{task_id}", token)[2] == added.structured_content

        updated = await tool("update_task", {"task_id": task_id, "description": "2 liters"})
        assert call("GET", f"{tasks_url}/{task_id}", token)[2]["description"] == "2 liters" == \
            updated.structured_content["description"]
        completed = await tool("complete_task", {"task_id": task_id})
        assert call("GET", f"{tasks_url}/{task_id}", token)[2]["status"] == "completed"
        assert completed.structured_content["completed"] is True

        listed = await tool("list_tasks", {"status": "completed"})
        assert [task["id"] for task in listed.structured_content["tasks"]] == [task_id]
        assert (await tool("get_task", {"task_id": task_id})).structured_content["id"] == task_id
        assert (await tool("task_summary", {})).structured_content["completed"] == 1

        for arguments, name, expected in (({"title": "  "}, "add_task", "title:"),
                                          ({"task_id": "nope"}, "delete_task", "task_id:"),
                                          ({"task_id": task_id, "user_id": "someone-else"}, "delete_task",
                                           "user_id:")):
            failed = await tool(name, arguments)
            assert failed.is_error is True and expected in failed.content[0].text
        assert [task["id"] for task in call("GET", tasks_url, token)[2]] == [task_id]

        deleted = await tool("delete_task", {"task_id": task_id})
        assert deleted.structured_content == {"deleted": True, "task_id": task_id}
        assert call("GET", f"{tasks_url}/{task_id}", token)[0] == 404
        assert call("GET", tasks_url, token)[2] == []

    asyncio.run(sdk_session(f"{served.base_url}/mcp", token, mode, session))
    assert "Traceback" not in served.output()


@pytest.mark.slow
def test_another_users_token_can_neither_see_nor_change_tasks_over_mcp(served, users):
    alice, mallory = users(), users()
    status, _, task = call("POST", f"{served.base_url}/api/{alice}/tasks", make_token(alice), {"title": "Private"})
    assert status == 201

    async def session(client: Any) -> list[Any]:
        return [
            await client.call_tool("list_tasks", {}),
            await client.call_tool("get_task", {"task_id": task["id"]}),
            await client.call_tool("update_task", {"task_id": task["id"], "title": "Mine now"}),
            await client.call_tool("complete_task", {"task_id": task["id"]}),
            await client.call_tool("delete_task", {"task_id": task["id"]}),
            await client.call_tool("list_tasks", {"user_id": alice}),
        ]

    listed, *changes, impersonated = asyncio.run(sdk_session(f"{served.base_url}/mcp", make_token(mallory),
                                                             "legacy", session))
    assert listed.structured_content["tasks"] == [] and listed.structured_content["total"] == 0
    assert [(result.is_error, result.content[0].text) for result in changes] == \
        [(True, mcp_tools.TASK_NOT_FOUND)] * 4
    assert impersonated.is_error is True and impersonated.content[0].text.startswith("user_id:")
    assert call("GET", f"{served.base_url}/api/{alice}/tasks/{task['id']}", make_token(alice))[2] == task
    assert "Traceback" not in served.output()


@pytest.mark.slow
def test_without_a_token_the_live_server_answers_401_with_www_authenticate(served):
    status, headers, body = call("POST", f"{served.base_url}/mcp", None, rpc("tools/list"), headers=MCP_HEADERS)
    assert (status, headers["WWW-Authenticate"], body) == (401, "Bearer", {"detail": "Missing authentication token"})


def node_missing() -> str | None:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not found on PATH (needed for the TypeScript MCP client)" if missing else None


def install_ts_client() -> None:
    """npm ci in tests/mcp_ts when node_modules is missing or older than package-lock.json."""
    installed = TS_CLIENT_DIR / "node_modules" / ".package-lock.json"
    lock = TS_CLIENT_DIR / "package-lock.json"
    if installed.is_file() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=TS_CLIENT_DIR, check=True, capture_output=True,
                   timeout=600)


@pytest.mark.slow
def test_typescript_sdk_client_lists_the_tools_and_adds_a_task(served, users):
    reason = node_missing()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    install_ts_client()
    user = users()
    token = make_token(user)
    completed = subprocess.run(["node", "client.mjs", f"{served.base_url}/mcp"], cwd=TS_CLIENT_DIR,
                               env={**os.environ, "MCP_TOKEN": token}, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    print(completed.stdout)
    report = json.loads(completed.stdout.splitlines()[-1])
    assert set(report["tools"]) == TOOL_NAMES
    assert report["protocolVersion"] in ("2025-06-18", "2025-11-25")
    assert report["added"]["isError"] is False
    assert report["failed"]["isError"] is True and "task_id:" in report["failed"]["content"][0]["text"]
    task = report["added"]["structuredContent"]
    assert call("GET", f"{served.base_url}/api/{user}/tasks/{task['id']}", token)[2] == task
    assert "Traceback" not in served.output()



# --- stdio: flask mcp serve --------------------------------------------------------------------------------------


def test_flask_mcp_serve_answers_each_line_for_the_user_given(runner, client):
    lines = [initialize("2025-06-18"), {"jsonrpc": "2.0", "method": "notifications/initialized"},
             rpc("tools/list", request_id=2),
             rpc("tools/call", {"name": "add_task", "arguments": {"title": "From stdio"}}, request_id=3),
             rpc("tools/call", {"name": "add_task", "arguments": {"title": ""}}, request_id=4), "not json"]
    stdin = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    result = runner.invoke(args=["mcp", "serve", "--user", "alice"], input=stdin)
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [answer["id"] for answer in answers] == [1, 2, 3, 4, None]  # nothing for the notification
    assert answers[0]["result"]["protocolVersion"] == "2025-06-18"
    assert {tool["name"] for tool in answers[1]["result"]["tools"]} == TOOL_NAMES
    added = answers[2]["result"]["structuredContent"]
    assert answers[3]["result"]["isError"] is True and answers[4]["error"]["code"] == -32700
    assert rest_tasks(client, "alice") == [added] and added["user_id"] == "alice"


def test_flask_mcp_serve_requires_a_user(runner):
    assert runner.invoke(args=["mcp", "serve"], input="").exit_code != 0
    assert runner.invoke(args=["mcp", "serve", "--user", " "], input="").exit_code != 0


@pytest.mark.slow
def test_python_sdk_stdio_client_manages_tasks_through_flask_mcp_serve(postgres_url, users):
    from mcp import Client, StdioServerParameters

    command.upgrade(alembic_config(postgres_url), "head")
    user = users()
    server = StdioServerParameters(command=sys.executable, args=["-m", "flask", "--app", "wsgi", "mcp", "serve",
                                                                  "--user", user],
                                   env=server_env(postgres_url), cwd=str(ROOT))

    async def session() -> tuple[Any, Any, Any]:
        async with Client(server, mode="legacy") as client:
            tools = await client.list_tools()
            added = await client.call_tool("add_task", {"title": "Over stdio"})
            listed = await client.call_tool("list_tasks", {})
            return tools, added, listed

    tools, added, listed = asyncio.run(session())
    assert {tool.name for tool in tools.tools} == TOOL_NAMES
    assert added.structured_content["user_id"] == user
    assert listed.structured_content["tasks"] == [added.structured_content]

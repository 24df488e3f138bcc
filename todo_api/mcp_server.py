"""MCP at /mcp: Streamable HTTP, stateless, one JSON response per POST, for the tools of mcp_tools.py.

Why a transport of our own: the `mcp` SDK's server side (its low-level Server, MCPServer and the Streamable HTTP
session manager) is asyncio and ASGI (Starlette, anyio task groups per session). Inside this synchronous Flask app
under gunicorn's threads it would need an event loop per worker and a bridge per request, and its sessions or SSE
streams are what a stateless JSON endpoint does without. What the endpoint needs is small: read one JSON-RPC
message, answer initialize, ping, tools/list and tools/call, and say 202 to notifications. The SDK's types
validate what comes in and describe what goes out: `mcp_types`, the SDK's own package of its pydantic wire types
(the same objects as `mcp.types`), which needs only pydantic, so production installs none of the SDK's ASGI stack;
the full `mcp` SDK is a test dependency, for its client.

Per request, in the app's usual order: the token (auth.load_user), the rate limit (limits.py, per user), then
here the Origin check, the body, the JSON-RPC envelope, the protocol version, the method. The tool runs on the
request's session and this view commits once, after a tool succeeded. Errors:
- HTTP level, the REST envelope {"detail": ...}: 401 (WWW-Authenticate, with resource_metadata when
  BETTER_AUTH_URL is set), 503 (JWKS or database unavailable, Retry-After), 403 (a foreign Origin), 405 (GET,
  DELETE: no SSE stream, no session), 406, 413, 415, 429;
- JSON-RPC: -32700 (not JSON) and -32600 (not a request) with HTTP 400; -32022 (unsupported MCP-Protocol-Version
  header) with HTTP 400; -32601 and -32602 with HTTP 200;
- a tool's own failure (validation, not found, quota, a foreign user_id): a result with isError: true.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import click
import mcp_types as types
import orjson
from flask import Blueprint, Flask, Response, current_app, g, request
from flask.cli import AppGroup
from flask_smorest import abort
from mcp_types import jsonrpc
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION
from pydantic import ValidationError

from . import auth, mcp_tools
from .db import get_session
from .parser import read_body
from .web import to_json

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
METADATA_PATH = "/.well-known/oauth-protected-resource"
PROTOCOL_VERSION_HEADER = "MCP-Protocol-Version"
SUPPORTED_VERSIONS: tuple[str, ...] = HANDSHAKE_PROTOCOL_VERSIONS  # 2024-11-05 to 2025-11-25
SERVER_NAME = "todo-api"
SERVER_VERSION = "1.0.0"
INSTRUCTIONS = (
    "Tools for the signed-in user's tasks. Every tool acts on that user only: leave user_id out (or pass the "
    "signed-in user's id). Find a task's task_id with list_tasks (filters: status, q, priority, tag, overdue)."
)
EXTENSION = "todo_api.mcp"
ETAG_META_KEY = "todo-api/etag"
MAX_LOGGED_METHOD = 100  # characters of a method name in the log line: a client chooses it

blp = Blueprint("mcp", __name__)


class RPCError(Exception):
    """A JSON-RPC error answer."""

    def __init__(self, code: int, message: str, http_status: int = 200, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.http_status, self.data = code, message, http_status, data


def json_response(body: Any, status: int = 200) -> Response:
    response = Response(to_json(body), status=status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def rpc_error(request_id: Any, error: RPCError) -> Response:
    body = jsonrpc.JSONRPCError(
        jsonrpc="2.0", id=request_id, error=jsonrpc.ErrorData(code=error.code, message=error.message, data=error.data)
    ).model_dump(exclude_none=True)
    body["id"] = request_id  # JSON-RPC: id is null when it could not be read (exclude_none dropped it)
    return json_response(body, error.http_status)


def accepted() -> Response:
    response = Response(status=202)
    del response.headers["Content-Type"]
    return response


# --- Authentication and the OAuth protected-resource metadata (RFC 9728) ---------------------------------------------


def metadata_url() -> str:
    """Where this resource's metadata is (RFC 9728 §3.1: the well-known path, then the resource's path)."""
    return f"{request.host_url.rstrip('/')}{METADATA_PATH}{MCP_PATH}"


def require_user() -> None:
    """auth.require_user's rules, with the challenge pointing to the protected-resource metadata (MCP's
    authorization spec) when Better Auth is the authorization server."""
    if request.method == "OPTIONS" or g.get("user_id") is not None:
        return
    error = g.get("auth_error") or auth.MissingToken()
    if isinstance(error, auth.JWKSUnavailable):
        abort(503, message=auth.AUTH_UNAVAILABLE, headers={"Retry-After": str(error.retry_after)})
    challenge = error.challenge
    if current_app.config.get("BETTER_AUTH_URL"):
        challenge += f'{"," if " " in challenge else ""} resource_metadata="{metadata_url()}"'
    abort(401, message=error.message, headers={"WWW-Authenticate": challenge, "Cache-Control": "no-store"})


def check_origin() -> None:
    """Streamable HTTP: a request whose Origin is neither this server nor an allowed frontend is 403 (DNS
    rebinding). Clients outside browsers send none."""
    origin = request.headers.get("Origin")
    if origin is None or request.method == "OPTIONS":
        return
    if origin == request.host_url.rstrip("/") or origin in current_app.config["FRONTEND_URL"]:
        return
    abort(403, message="Origin not allowed")


@blp.before_request
def guard() -> None:
    check_origin()
    require_user()


def protected_resource_metadata(resource_path: str = MCP_PATH) -> Response:
    """RFC 9728 metadata: this endpoint is a resource whose tokens Better Auth issues. 404 without Better Auth."""
    if not current_app.config.get("BETTER_AUTH_URL"):
        abort(404, message="No authorization server is configured (BETTER_AUTH_URL)")
    authenticator: auth.Authenticator = current_app.extensions[auth.EXTENSION]
    response = json_response({
        "resource": f"{request.host_url.rstrip('/')}{resource_path}",
        "authorization_servers": authenticator.jwks_issuers,
        "bearer_methods_supported": ["header"],
        "resource_name": "todo-api MCP tools",
        "resource_documentation": f"{request.host_url.rstrip('/')}/docs",
    })
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


# --- The endpoint --------------------------------------------------------------------------------------------------


@blp.route(MCP_PATH, methods=["POST"])
def endpoint() -> Response:
    """One JSON-RPC message in, one JSON response (or 202) out."""
    if "Accept" in request.headers and not request.accept_mimetypes.accept_json:  # none sent: anything goes
        abort(406, message="Accept must allow application/json: this endpoint answers with JSON only, never SSE")
    body = read_body(request)
    if not request.is_json:
        abort(415, message="Content-Type must be application/json")
    return answer(body)


def answer(body: bytes) -> Response:
    """The answer to one JSON-RPC message, for the token's user in g.user_id (HTTP and stdio alike)."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return rpc_error(None, RPCError(jsonrpc.PARSE_ERROR, "Parse error: the body is not JSON", 400))
    request_id = message.get("id") if isinstance(message, dict) else None
    try:
        return handle(message)
    except RPCError as error:
        if not isinstance(request_id, int | str) or isinstance(request_id, bool):
            request_id = None
        return rpc_error(request_id, error)


def handle(message: Any) -> Response:
    if isinstance(message, list):
        raise RPCError(jsonrpc.INVALID_REQUEST, "Invalid request: batches are not supported", 400)
    if not isinstance(message, dict):
        raise RPCError(jsonrpc.INVALID_REQUEST, "Invalid request: expected a JSON-RPC object", 400)
    if "method" not in message:
        if "result" in message or "error" in message:  # a response: this server never asks the client anything
            validate(jsonrpc.JSONRPCResponse if "result" in message else jsonrpc.JSONRPCError, message)
            return accepted()
        raise RPCError(jsonrpc.INVALID_REQUEST, "Invalid request: no method", 400)
    if "id" not in message:
        validate(jsonrpc.JSONRPCNotification, message)
        g.mcp_method = message["method"][:MAX_LOGGED_METHOD]
        return accepted()  # notifications/initialized, cancelled...: nothing to do for a stateless server
    rpc = validate(jsonrpc.JSONRPCRequest, message)
    g.mcp_method = rpc.method[:MAX_LOGGED_METHOD]
    check_protocol_version()
    method = METHODS.get(rpc.method)
    if method is None:
        raise RPCError(jsonrpc.METHOD_NOT_FOUND, f"Method not found: {rpc.method}")
    result = method(rpc.params or {})
    return json_response({"jsonrpc": "2.0", "id": rpc.id, "result": result})


def validate(model: Any, message: dict[str, Any]) -> Any:
    try:
        return model.model_validate(message)
    except ValidationError as error:
        raise RPCError(jsonrpc.INVALID_REQUEST, f"Invalid request: {first_error(error)}", 400) from None


def first_error(error: ValidationError) -> str:
    detail = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in detail["loc"])
    return f"{where}: {detail['msg']}" if where else detail["msg"]


def check_protocol_version() -> None:
    """An MCP-Protocol-Version header this server does not speak is 400 (spec 2025-06-18, §2.7), with the versions
    it does (-32022, as 2026-07-28 clients expect, so that they fall back to initialize). Without the header, a
    client speaks 2025-03-26 or earlier, which the tools serve alike: nothing here depends on the version."""
    header = request.headers.get(PROTOCOL_VERSION_HEADER)
    if header is not None and header not in SUPPORTED_VERSIONS:
        data = types.UnsupportedProtocolVersionErrorData(supported=list(SUPPORTED_VERSIONS), requested=header)
        raise RPCError(jsonrpc.UNSUPPORTED_PROTOCOL_VERSION, f"Unsupported protocol version: {header}", 400,
                       data.model_dump())


def params_of(model: Any, params: dict[str, Any]) -> Any:
    try:
        return model.model_validate(params)
    except ValidationError as error:
        raise RPCError(jsonrpc.INVALID_PARAMS, f"Invalid params: {first_error(error)}") from None


def initialize(params: dict[str, Any]) -> dict[str, Any]:
    """Version negotiation: the client's version if this server speaks it, else the latest this server speaks
    (the client then decides whether to go on)."""
    requested = params_of(types.InitializeRequestParams, params).protocol_version
    return current_app.extensions[EXTENSION]["initialize"](
        requested if requested in SUPPORTED_VERSIONS else LATEST_HANDSHAKE_VERSION
    )


def ping(_params: dict[str, Any]) -> dict[str, Any]:
    return {}


def list_tools(params: dict[str, Any]) -> dict[str, Any]:
    if params_of(types.PaginatedRequestParams, params).cursor is not None:
        raise RPCError(jsonrpc.INVALID_PARAMS, "Invalid params: unknown cursor (all tools fit on one page)")
    return current_app.extensions[EXTENSION]["tools/list"]


def call_tool(params: dict[str, Any]) -> dict[str, Any]:
    call = params_of(types.CallToolRequestParams, params)
    tool = mcp_tools.TOOLS.get(call.name)
    if tool is None:
        raise RPCError(jsonrpc.INVALID_PARAMS, f"Unknown tool: {call.name}. Tools: {', '.join(mcp_tools.TOOLS)}")
    g.mcp_tool = tool.name
    session = get_session(read_only=tool.read_only)
    try:
        output, etag = mcp_tools.call(tool, session, g.user_id, call.arguments or {})
    except mcp_tools.ToolError as error:
        session.rollback()
        g.mcp_tool_error = True
        return types.CallToolResult(content=[types.TextContent(type="text", text=str(error))],
                                    is_error=True).model_dump(by_alias=True, exclude_none=True)
    if not tool.read_only:
        session.commit()
    return tool_result(output, etag)


def tool_result(output: dict[str, Any], etag: str | None = None) -> dict[str, Any]:
    """A successful CallToolResult: the output as structuredContent, and as JSON text for older clients; a task's
    ETag in _meta, for the if_match of a later write.

    Written out: `types.CallToolResult(...).model_dump(by_alias=True, exclude_none=True)` gives the same dict
    (tests/test_mcp.py holds them equal) for about 50 µs more per call (bench/bench_mcp.py, README)."""
    result = {"content": [{"type": "text", "text": to_json(output).decode()}], "structuredContent": output,
              "isError": False, "resultType": "complete"}
    if etag is not None:
        result["_meta"] = {ETAG_META_KEY: etag}
    return result


METHODS = {"initialize": initialize, "ping": ping, "tools/list": list_tools, "tools/call": call_tool}


def prepared_results() -> dict[str, Any]:
    """What does not change between requests, built and checked against the SDK's types once."""
    tools = [types.Tool.model_validate(definition) for definition in mcp_tools.tool_definitions()]
    tools_list = types.ListToolsResult(tools=tools).model_dump(by_alias=True, exclude_none=True)
    capabilities = types.ServerCapabilities(tools=types.ToolsCapability(list_changed=False))
    server_info = types.Implementation(name=SERVER_NAME, title="todo-api", version=SERVER_VERSION)

    def initialize_result(version: str) -> dict[str, Any]:
        return types.InitializeResult(protocol_version=version, capabilities=capabilities, server_info=server_info,
                                      instructions=INSTRUCTIONS).model_dump(by_alias=True, exclude_none=True)

    return {"tools/list": tools_list, "initialize": initialize_result}


# --- stdio: `flask mcp serve --user ID` ------------------------------------------------------------------------------

mcp_cli = AppGroup("mcp", help="MCP tools over stdio, for a local agent.")


@mcp_cli.command("serve")
@click.option("--user", "user_id", required=True, help="Whose tasks the tools act on (a Better Auth user id).")
def serve(user_id: str) -> None:
    """Serve the MCP tools over stdio (one JSON-RPC message per line) for USER: the operator of the CLI already has
    the database, so no token is asked for. Logs go to stderr; stdout carries only MCP messages."""
    if not auth.is_user_id(user_id):
        raise click.BadParameter("not a user id", param_hint="--user")
    serve_stdio(current_app._get_current_object(), user_id, sys.stdin, sys.stdout)  # type: ignore[attr-defined]


def serve_stdio(app: Flask, user_id: str, lines: Iterable[str], out: TextIO) -> None:
    """Answer each line as /mcp answers a POST, in a fresh app context (its own g and session) per message."""
    for line in lines:
        if not line.strip():
            continue
        with app.app_context(), app.test_request_context(MCP_PATH, method="POST"):
            g.user_id = user_id
            try:
                response = answer(line.encode())
            except Exception as error:  # the HTTP app's error handlers are not here: stay up, answer, log
                log.error("mcp stdio call failed", exc_info=error)
                response = rpc_error(None, RPCError(jsonrpc.INTERNAL_ERROR, "Internal error", 500))
            log.info("mcp stdio call", extra={"user_id": user_id, "mcp_method": g.get("mcp_method"),
                                              "tool": g.get("mcp_tool"), "tool_error": g.get("mcp_tool_error")})
            if response.status_code != 202:
                out.write(response.get_data(as_text=True) + "\n")
                out.flush()


def init_app(app: Flask) -> None:
    app.cli.add_command(mcp_cli)
    app.extensions[EXTENSION] = prepared_results()
    app.register_blueprint(blp)
    app.add_url_rule(METADATA_PATH, "oauth_protected_resource", lambda: protected_resource_metadata(""))
    app.add_url_rule(f"{METADATA_PATH}{MCP_PATH}", "oauth_protected_resource_mcp", protected_resource_metadata)

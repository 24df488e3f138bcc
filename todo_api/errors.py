"""One JSON error envelope, {"detail": ...}, for every error from every layer."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, jsonify
from gunicorn.http.errors import ParseException
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from .outage import DatabaseUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "5"

DEFAULT_DETAILS = {
    400: "Bad request",
    401: "Missing authentication token",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    412: "Precondition failed: the task has changed",
    413: "Request body too large (limit 64 KiB)",
    415: "Content-Type must be application/json",
    422: "Validation failed",
    428: "Precondition required",
    500: "Internal server error",
    503: "Service unavailable",
}


def flatten_validation_errors(messages: Any) -> dict[str, list[str]]:
    """webargs nests messages by location ({"json": {...}, "query": {...}}); clients want field names on top."""
    flat: dict[str, list[str]] = {}
    if not isinstance(messages, dict):
        return {"_schema": [str(messages)]}
    for location_messages in messages.values():
        if not isinstance(location_messages, dict):
            flat.setdefault("_schema", []).extend(map(str, _as_list(location_messages)))
            continue
        for field, field_messages in location_messages.items():
            flat.setdefault(str(field), []).extend(_flatten_messages(field_messages))
    return flat


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _flatten_messages(value: Any) -> list[str]:
    """Nested messages (e.g. per list item: {"0": [...]}) become plain strings."""
    if isinstance(value, dict):
        return [f"{key}: {message}" for key, inner in value.items() for message in _flatten_messages(inner)]
    return [str(message) for message in _as_list(value)]


def error_response(status: int, detail: str | None = None, headers: dict[str, str] | None = None,
                   errors: dict[str, list[str]] | None = None) -> Response:
    body: dict[str, Any] = {"detail": detail or DEFAULT_DETAILS.get(status, "Error")}
    if errors is not None:
        body["errors"] = errors
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def http_error_response(error: HTTPException) -> Response:
    """The envelope for an HTTP error, with the headers its class defines (Allow, WWW-Authenticate...) and those
    given to abort(); TodoApi.handle_http_exception, flask-smorest's hook, answers with it."""
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    headers = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
    headers.update(data.get("headers") or {})
    if status == 304:
        return Response(status=304, headers=headers)
    detail = data.get("message") or DEFAULT_DETAILS.get(status) or error.name
    errors = flatten_validation_errors(data.get("messages")) if status == 422 else None
    return error_response(status, detail, headers, errors)


def handle_database_error(error: SQLAlchemyError) -> Response:
    """Unreachable or dropped database: 503 so clients retry; anything else is a plain 500."""
    if isinstance(error, OperationalError | PoolTimeoutError | DatabaseUnavailable) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    ):
        log.warning("database unavailable: %s", type(error).__name__, extra={"request_id": g.get("request_id")})
        return error_response(503, "Database unavailable", {"Retry-After": RETRY_AFTER_SECONDS})
    return handle_unexpected(error)


def handle_bad_framing(error: ParseException) -> Response:
    """A chunked body gunicorn's parser refused while the app read it (a bad chunk size, no CRLF after a chunk's
    data, a forbidden trailer...): the client's fault, so 400 and one WARNING line, never a traceback. gunicorn
    closes the connection after the answer: where the next request would start is unknown. (A client that left
    mid-body raises an OSError, which werkzeug already answers 400.)"""
    log.warning("malformed request body: %s", type(error).__name__, extra={"request_id": g.get("request_id")})
    return error_response(400, "Malformed request body")


def handle_unexpected(error: BaseException) -> Response:
    log.error("unhandled error", exc_info=error, extra={"request_id": g.get("request_id")})
    return error_response(500)


def init_app(app: Flask) -> None:
    """Errors that are not HTTP errors; those get the envelope from TodoApi.handle_http_exception."""
    app.register_error_handler(SQLAlchemyError, handle_database_error)
    app.register_error_handler(ParseException, handle_bad_framing)
    app.register_error_handler(Exception, handle_unexpected)

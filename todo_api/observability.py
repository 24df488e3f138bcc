"""Request ids and one-line JSON logs (request id, method, path, status, duration, user id)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
import time
from typing import Any

from flask import Flask, Response, g, request

REQUEST_ID_HEADER = "X-Request-ID"
# Echo only ids that cannot inject anything into headers or logs.
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

access_log = logging.getLogger("todo_api.access")


class RequestIds:
    """32 hex digits, unique without asking the uuid module on every request (uuid4: about 2 µs): a random prefix
    per process, drawn again in each forked worker, and a counter (itertools.count is atomic under the GIL)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


request_ids = RequestIds()


class JSONFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields are kept."""

    RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self.RESERVED and v is not None})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


JSONFormatter.converter = time.gmtime


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, so redirections (and test capture) are honoured."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the package's loggers; the access line per request is ours, not gunicorn's."""
    logger = logging.getLogger("todo_api")
    if not any(getattr(h, "todo_api_handler", False) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(JSONFormatter())
        handler.todo_api_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def start_request() -> None:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = incoming if incoming and SAFE_REQUEST_ID.match(incoming) else request_ids.next()
    g.request_started = time.perf_counter()


def finish_request(response: Response) -> Response:
    request_id = g.get("request_id") or request_ids.next()
    response.headers[REQUEST_ID_HEADER] = request_id
    started = g.get("request_started")
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(
            "request",
            extra={
                "request_id": request_id,
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2) if started else None,
                "user_id": g.get("user_id"),
                # MCP (mcp_server.py): the JSON-RPC method, the tool called and whether it failed; absent elsewhere
                "mcp_method": g.get("mcp_method"),
                "tool": g.get("mcp_tool"),
                "tool_error": g.get("mcp_tool_error"),
            },
        )
    return response


def init_app(app: Flask) -> None:
    configure_logging(app.config.get("LOG_LEVEL", "INFO"))
    app.before_request(start_request)
    app.after_request(finish_request)

"""What several test modules share: the test secret and tokens (also hand-made ones), the app's test config,
database isolation, and running a helper server process.

Fixtures live in conftest.py and build on these; test modules import from here, never from conftest or from
each other.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
from flask import Flask
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.orm import sessionmaker

from todo_api.db import HotConnection
from todo_api.embedded_postgres import port_open

SECRET = "test-secret-that-is-long-enough-for-hs256-and-hs512-0123456789abcdef"
# PostgreSQL where nothing listens: for apps that must not, or need not, reach a database (engines connect lazily).
UNREACHABLE_DATABASE_URL = "postgresql+psycopg2://nobody@127.0.0.1:1/none"


def make_token(sub: Any = "alice", *, secret: str = SECRET, ttl: int = 3600, **claims: Any) -> str:
    """An HS256 token for `sub`, valid for `ttl` seconds; a claim given as None is left out."""
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_config(database_url: str, **overrides: Any) -> dict[str, Any]:
    """The app's config for tests: HS256 with SECRET, no Better Auth, no iss/aud checks."""
    config = {
        "APP_ENV": "test",
        "DATABASE_URL": database_url,
        "MIGRATIONS_DATABASE_URL": database_url,
        "BETTER_AUTH_SECRET": SECRET,
        "BETTER_AUTH_URL": None,
        "JWT_ISSUER": [],
        "JWT_AUDIENCE": [],
        "JWT_LEEWAY": 30,
        "FRONTEND_URL": ["http://localhost:3000"],
        "RATELIMIT_ENABLED": False,  # tests about limits turn them on (tests/test_limits.py)
    }
    config.update(overrides)
    return config


def assert_error(response: Any, status: int, expected: dict[str, Any] | str) -> None:
    """The JSON error envelope with `status`: exactly `expected`, or, given a field name, a 422 naming that field."""
    assert response.status_code == status, response.get_data()[:300]
    assert response.content_type == "application/json"
    body = response.json
    if isinstance(expected, dict):
        assert body == expected
    else:
        assert body["detail"] == "Validation failed" and expected in body["errors"], body
    assert b"Traceback" not in response.data


class JoinedHotConnection(HotConnection):
    """The hot path's connection in a test: the outer connection, each request in a savepoint of its own, as the
    sessions (join_transaction_mode="create_savepoint")."""

    def __init__(self, db: Any, autocommit: bool, connection: Connection) -> None:
        super().__init__(db, autocommit)
        self.connection = connection
        self.savepoint = connection.begin_nested()

    def execute(self, statement: str, parameters: dict[str, Any]) -> Any:
        cursor = self.connection.connection.cursor()
        cursor.execute(statement, parameters)
        return cursor

    def commit(self) -> None:
        self.savepoint.commit()

    def close(self) -> None:
        if self.savepoint.is_active:
            self.savepoint.rollback()


@contextmanager
def rolled_back(app: Flask) -> Iterator[Flask]:
    """Every request's database work, sessions and hot path, read or write, joins one outer transaction that is
    rolled back at the end."""
    db = app.extensions["db"]
    original = db.sessionmaker, db.read_sessionmaker, db.hot_connection_factory
    with db.engine.connect() as connection:
        transaction = connection.begin()
        db.sessionmaker = sessionmaker(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        db.read_sessionmaker = None
        db.hot_connection_factory = functools.partial(JoinedHotConnection, connection=connection)
        try:
            yield app
        finally:
            db.sessionmaker, db.read_sessionmaker, db.hot_connection_factory = original
            transaction.rollback()


@contextmanager
def no_database(app: Flask) -> Iterator[None]:
    """Any attempt to open a session or a hot-path connection fails while this is active."""
    db = app.extensions["db"]
    original = db.sessionmaker, db.read_sessionmaker, db.hot_connection_factory
    db.sessionmaker = db.read_sessionmaker = db.hot_connection_factory = None
    try:
        yield
    finally:
        db.sessionmaker, db.read_sessionmaker, db.hot_connection_factory = original


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    """A token segment from a JSON value, or from raw JSON text when given a string."""
    return b64url((value if isinstance(value, str) else json.dumps(value)).encode())


def hs256(header: Any, payload: Any, secret: bytes = SECRET.encode()) -> str:
    """Sign header.payload with HMAC-SHA256 whatever they contain (PyJWT refuses odd headers and PEM secrets)."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


@contextmanager
def running_server(command: list[str], port: int, log_path: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """A server process (PgBouncer, HAProxy) until the block ends, once it listens on 127.0.0.1:port."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


MCP_HEADERS = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}


def mcp_post(client: Any, token: str | None, message: Any, *, headers: dict[str, str] | None = None) -> Any:
    """POST one JSON-RPC message to /mcp through the Flask test client, as the SDK clients send it."""
    sent = {**MCP_HEADERS, **(bearer(token) if token else {}), **(headers or {})}
    return client.post("/mcp", json=message, headers=sent)


def mcp_tool(client: Any, token: str, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """tools/call through the test client: the CallToolResult (asserting a 200 JSON-RPC result)."""
    response = mcp_post(client, token, {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                                        "params": {"name": name, "arguments": arguments or {}}})
    assert response.status_code == 200, response.get_data()[:300]
    body = response.json
    assert body["id"] == 7 and "result" in body, body
    return body["result"]


def delete_tasks_of(database_url: str, users: list[str]) -> None:
    """Delete the tasks these users left through a live server, whose writes no test transaction can roll back."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM tasks WHERE user_id = ANY(:users)"), {"users": users})
    finally:
        engine.dispose()

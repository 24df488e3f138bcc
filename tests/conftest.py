"""Fixtures: the app on each dialect, per-test transactions rolled back at teardown, and token helpers.

Every test that uses `app` runs twice: on PostgreSQL and on SQLite.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from alembic import command
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from tests.throwaway_postgres import port_open, start_embedded_postgres
from todo_api import create_app
from todo_api.cli import alembic_config
from todo_api.config import normalize_database_url

SECRET = "test-secret-that-is-long-enough-for-hs256-and-hs512-0123456789abcdef"
LOCAL_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """TEST_DATABASE_URL, else the local server, else a throwaway embedded one."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield normalize_database_url(os.environ["TEST_DATABASE_URL"])
    elif port_open("127.0.0.1", 5432):
        yield LOCAL_POSTGRES
    else:
        parent = Path(tempfile.mkdtemp(prefix="todo-api-pg-"))
        parent.chmod(0o711)  # as root, the server runs as another user, which must reach its data dir
        url, stop = start_embedded_postgres(parent / "data")
        try:
            yield url
        finally:
            stop()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'test.db'}"


def reset_schema(url: str) -> None:
    """Drop what a previous run left, then migrate to head."""
    engine = create_engine(url)
    with engine.begin() as connection:
        for table in ("tasks", "task_counts", "alembic_version"):
            connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
        if connection.dialect.name == "postgresql":
            for function in ("task_counts_add", "task_counts_remove", "task_counts_clear", "tasks_keep_owner"):
                connection.execute(text(f"DROP FUNCTION IF EXISTS {function}()"))
    engine.dispose()
    command.upgrade(alembic_config(url), "head")


@pytest.fixture(scope="session", params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    url = request.getfixturevalue("postgres_url" if request.param == "postgresql" else "sqlite_url")
    reset_schema(url)
    return url


def make_config(database_url: str, **overrides: Any) -> dict[str, Any]:
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
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def session_app(database_url: str) -> Iterator[Flask]:
    app = create_app(make_config(database_url))
    yield app
    app.extensions["db"].engine.dispose()


@contextmanager
def rolled_back(app: Flask) -> Iterator[Flask]:
    """Every request session, read or write, joins one outer transaction that is rolled back at the end."""
    db = app.extensions["db"]
    original = db.sessionmaker, db.read_sessionmaker
    with db.engine.connect() as connection:
        transaction = connection.begin()
        db.sessionmaker = sessionmaker(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        db.read_sessionmaker = None
        try:
            yield app
        finally:
            db.sessionmaker, db.read_sessionmaker = original
            transaction.rollback()


@pytest.fixture
def app(session_app: Flask) -> Iterator[Flask]:
    """The session app, isolated: what a test writes is rolled back at teardown."""
    with rolled_back(session_app):
        yield session_app


@contextmanager
def no_database(app: Flask) -> Iterator[None]:
    """Any attempt to open a session fails while this is active."""
    db = app.extensions["db"]
    original = db.sessionmaker, db.read_sessionmaker
    db.sessionmaker = db.read_sessionmaker = None
    try:
        yield
    finally:
        db.sessionmaker, db.read_sessionmaker = original


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


def make_token(sub: Any = "alice", *, secret: str = SECRET, ttl: int = 3600, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def auth() -> Callable[..., dict[str, str]]:
    """auth("bob", email=...) -> headers with a valid token for that user."""

    def headers(sub: str = "alice", **claims: Any) -> dict[str, str]:
        return bearer(make_token(sub, **claims))

    return headers


@pytest.fixture
def create_task(client: FlaskClient, auth: Callable[..., dict[str, str]]) -> Callable[..., dict[str, Any]]:
    def create(user: str = "alice", **fields: Any) -> dict[str, Any]:
        response = client.post(f"/api/{user}/tasks", json={"title": "A task", **fields}, headers=auth(user))
        assert response.status_code == 201, response.json
        return response.json

    return create

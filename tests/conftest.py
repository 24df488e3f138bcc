"""Fixtures: the app on PostgreSQL, each test in a transaction rolled back at teardown, and token helpers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from alembic import command
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import create_engine, text

from tests.helpers import bearer, make_config, make_token, rolled_back
from todo_api import create_app
from todo_api.cli import alembic_config
from todo_api.config import normalize_database_url
from todo_api.embedded_postgres import port_open, throwaway

LOCAL_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
FAST = 2.0  # seconds for any answer to a hostile request: generous for this machine, far from a hang


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """TEST_DATABASE_URL, else the local server, else a throwaway embedded one."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield normalize_database_url(os.environ["TEST_DATABASE_URL"])
    elif port_open("127.0.0.1", 5432):
        yield LOCAL_POSTGRES
    else:
        with throwaway("test") as server:
            yield server.url("test")


def reset_schema(url: str) -> None:
    """Drop what a previous run left, then migrate to head."""
    engine = create_engine(url)
    with engine.begin() as connection:
        for table in ("tasks", "task_counts", "jwks_documents", "alembic_version"):
            connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
        for function in ("task_counts_add", "task_counts_remove", "task_counts_clear", "tasks_keep_owner"):
            connection.execute(text(f"DROP FUNCTION IF EXISTS {function}()"))
    engine.dispose()
    command.upgrade(alembic_config(url), "head")


@pytest.fixture(scope="session")
def database_url(postgres_url: str) -> str:
    """postgres_url, its schema migrated to head from scratch once per run."""
    reset_schema(postgres_url)
    return postgres_url


@pytest.fixture(scope="session")
def session_app(database_url: str) -> Iterator[Flask]:
    app = create_app(make_config(database_url))
    yield app
    app.extensions["db"].engine.dispose()


@pytest.fixture
def app(session_app: Flask) -> Iterator[Flask]:
    """The session app, isolated: what a test writes is rolled back at teardown."""
    with rolled_back(session_app):
        yield session_app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


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


@pytest.fixture
def send(client: FlaskClient) -> Callable[..., Any]:
    """send(method, path, **kwargs) -> the response to a request as alice, asserting it came within FAST seconds."""

    def call(method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        started = time.perf_counter()
        response = client.open(path, method=method.upper(), headers={**bearer(make_token("alice")), **(headers or {})},
                               **kwargs)
        assert time.perf_counter() - started < FAST, f"{method} {path[:80]} took too long"
        return response

    return call

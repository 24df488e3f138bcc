"""Through PgBouncer in transaction mode (Neon's pooled endpoint): the statement timeout holds on every statement,
without session state that leaks to or from other clients of the pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg2
import pytest
from alembic import command
from flask import Flask
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from todo_api import create_app
from todo_api.cli import alembic_config

from .fault_injection import scratch_database
from .helpers import bearer, make_config, make_token
from .pooler import transaction_pooler

pytestmark = pytest.mark.slow

TIMEOUT_MS = 1500
STATEMENTS = 12  # more than the pooler's server connections, so every one of them is used


@pytest.fixture(scope="module")
def direct_url(postgres_url: str) -> Iterator[str]:
    with scratch_database(postgres_url, prefix="pooler") as url:
        command.upgrade(alembic_config(url), "head")
        yield url


@pytest.fixture
def pooled_url(direct_url: str) -> Iterator[str]:
    """A new pooler per test: a foreign client's session SET stays on the pooler's server connections."""
    with transaction_pooler(direct_url) as url:
        yield url


@pytest.fixture
def pooled_app(pooled_url: str) -> Iterator[Flask]:
    app = create_app(make_config(pooled_url, DB_STATEMENT_TIMEOUT_MS=TIMEOUT_MS, DB_POOL_SIZE=3))
    yield app
    app.extensions["db"].engine.dispose()


def foreign_client(url: str) -> psycopg2.extensions.connection:
    """Another application sharing the pooler, in autocommit as most tools are."""
    connection = psycopg2.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
    connection.autocommit = True
    return connection


def app_timeouts(app: Flask) -> list[str]:
    """statement_timeout as the app's statements see it: reads in autocommit, writes in a transaction."""
    engine = app.extensions["db"].engine
    seen = []
    for index in range(STATEMENTS):
        options = {"isolation_level": "AUTOCOMMIT"} if index % 2 else {}
        with engine.connect().execution_options(**options) as connection:
            seen.append(connection.execute(text("SHOW statement_timeout")).scalar())
            connection.rollback()
    return seen


def terminate_server_connections(direct_url: str) -> None:
    """What a compute restart, server_lifetime or pg_terminate_backend does to the pooler's server side."""
    admin = create_engine(direct_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
    finally:
        admin.dispose()


def test_the_timeout_holds_on_every_statement_after_the_pooler_replaces_its_server_connections(
    pooled_app, direct_url
):
    client, headers = pooled_app.test_client(), bearer(make_token("alice"))
    assert client.post("/api/alice/tasks", json={"title": "through the pooler"}, headers=headers).status_code == 201
    assert app_timeouts(pooled_app) == [f"{TIMEOUT_MS}ms"] * STATEMENTS
    terminate_server_connections(direct_url)
    time.sleep(0.2)
    assert client.get("/api/alice/tasks", headers=headers).status_code == 200
    assert app_timeouts(pooled_app) == [f"{TIMEOUT_MS}ms"] * STATEMENTS


def test_a_foreign_clients_session_setting_does_not_reach_the_app(pooled_app, pooled_url):
    foreign = foreign_client(pooled_url)
    try:
        with foreign.cursor() as cursor:
            cursor.execute("SET statement_timeout = '1ms'")  # a session SET: it stays on that server connection
        engine = pooled_app.extensions["db"].engine
        for index in range(STATEMENTS):
            options = {"isolation_level": "AUTOCOMMIT"} if index % 2 else {}
            with engine.connect().execution_options(**options) as connection:
                connection.execute(text("SELECT pg_sleep(0.01)"))  # cancelled after 1 ms if the SET leaked
        assert app_timeouts(pooled_app) == [f"{TIMEOUT_MS}ms"] * STATEMENTS
    finally:
        foreign.close()


def test_the_apps_timeout_does_not_reach_a_foreign_client(pooled_app, pooled_url, direct_url):
    """Such as a migration run through the pooled URL by mistake, which used to inherit the app's 5 s."""
    with foreign_client(direct_url) as direct, direct.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        server_default = cursor.fetchone()[0]
    assert server_default != f"{TIMEOUT_MS}ms"
    app_timeouts(pooled_app)
    foreign = foreign_client(pooled_url)
    try:
        seen = []
        for _ in range(STATEMENTS):
            with foreign.cursor() as cursor:
                cursor.execute("SHOW statement_timeout")
                seen.append(cursor.fetchone()[0])
        assert seen == [server_default] * STATEMENTS
    finally:
        foreign.close()


@pytest.mark.parametrize(("suffix", "body"), [
    pytest.param("", {"title": "writer"}, id="update, through the session"),
    pytest.param("/complete", None, id="toggle, on the hot path's DBAPI connection"),
])
def test_writes_blocked_on_a_locked_row_get_503_at_the_timeout_and_leave_no_backend_waiting(
    pooled_app, direct_url, suffix, body
):
    client, headers = pooled_app.test_client(), bearer(make_token("alice"))
    task = client.post("/api/alice/tasks", json={"title": "locked"}, headers=headers).json
    holder = foreign_client(direct_url)
    holder.autocommit = False
    answers: list[tuple[int, float]] = []
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (task["id"],))

        def patch() -> None:
            started = time.monotonic()
            response = pooled_app.test_client().patch(f"/api/alice/tasks/{task['id']}{suffix}", json=body,
                                                      headers=headers)
            answers.append((response.status_code, time.monotonic() - started))

        writers = [threading.Thread(target=patch) for _ in range(3)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(timeout=30)
        with holder.cursor() as cursor:  # the lock is still held: nobody may still be waiting on it
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock'")
            waiting = cursor.fetchone()[0]
    finally:
        holder.rollback()
        holder.close()
    assert [status for status, _ in answers] == [503] * 3, answers
    assert max(seconds for _, seconds in answers) < TIMEOUT_MS / 1000 + 2, answers
    assert waiting == 0
    after = client.get(f"/api/alice/tasks/{task['id']}", headers=headers).json
    assert after["title"] == "locked" and after["status"] == "pending"

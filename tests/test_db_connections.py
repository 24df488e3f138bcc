"""The pool survives connections the server closed (restart, pg_terminate_backend, Neon suspending)."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import create_engine, text

from todo_api import create_app

from .conftest import bearer, make_config, make_token


def test_requests_succeed_after_the_server_terminates_pooled_connections(database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    name = f"todo-api-test-{uuid.uuid4().hex[:8]}"
    app = create_app(make_config(f"{database_url}?application_name={name}", DB_POOL_SIZE=3))
    client, headers = app.test_client(), bearer(make_token("alice"))
    admin = create_engine(database_url)
    try:
        assert client.get("/api/alice/tasks", headers=headers).status_code == 200
        with admin.connect() as connection:
            killed = connection.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :name"
            ), {"name": name}).scalar()
            assert killed >= 1
            deadline = time.monotonic() + 5
            while connection.execute(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                                     {"name": name}).scalar() and time.monotonic() < deadline:
                time.sleep(0.05)
        statuses = [client.get("/api/alice/tasks", headers=headers).status_code for _ in range(5)]
        assert statuses == [200] * 5
    finally:
        app.extensions["db"].engine.dispose()
        admin.dispose()

"""The pool survives connections the server closed (restart, pg_terminate_backend, Neon suspending)."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import create_engine, text

from todo_api import create_app
from todo_api.deadlines import StatementTimeoutCursor

from .helpers import bearer, make_config, make_token


def test_requests_succeed_after_the_server_terminates_pooled_connections(database_url):
    name = f"todo-api-test-{uuid.uuid4().hex[:8]}"
    app = create_app(make_config(f"{database_url}?application_name={name}", DB_POOL_SIZE=3))
    client, headers = app.test_client(), bearer(make_token("alice"))
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")  # pg_stat_activity is fresh per statement
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


def test_reads_and_single_query_writes_run_in_autocommit_and_other_writes_in_a_transaction(database_url, monkeypatch):
    """GETs skip BEGIN/ROLLBACK round trips, and so do the writes of one query string (a create: the quota's lock
    and the INSERT, which PostgreSQL runs as one transaction; a toggle's or an update's UPDATE); the statements of
    any other write (an update with If-Match: the row locked and checked, then updated) share one transaction.
    Through the session and on the hot path's DBAPI connection alike: every statement is seen at the cursor."""
    app = create_app(make_config(database_url))
    user_id = f"reader-{uuid.uuid4().hex[:8]}"
    client, headers = app.test_client(), bearer(make_token(user_id))
    seen: list[tuple[str, bool]] = []
    execute = StatementTimeoutCursor.execute

    def record(cursor, query, vars=None):
        seen.append((str(query).split()[0].upper(), cursor.connection.autocommit))
        return execute(cursor, query, vars)

    monkeypatch.setattr(StatementTimeoutCursor, "execute", record)
    try:
        created = client.post(f"/api/{user_id}/tasks", json={"title": "x"}, headers=headers)
        assert created.status_code == 201
        toggled = client.patch(f"/api/{user_id}/tasks/{created.json['id']}/complete", headers=headers)
        assert toggled.status_code == 200
        updated = client.put(f"/api/{user_id}/tasks/{created.json['id']}", json={"title": "y"}, headers=headers)
        assert updated.status_code == 200
        single_query_writes, seen[:] = [kind for kind in seen if kind[0] in ("INSERT", "UPDATE")], []
        checked = client.put(f"/api/{user_id}/tasks/{created.json['id']}", json={"title": "z"},
                             headers={**headers, "If-Match": updated.headers["ETag"]})
        assert checked.status_code == 200
        writes, seen[:] = list(seen), []
        for path in ("", "?q=x", f"/{created.json['id']}", "/summary"):  # hot path and session reads
            assert client.get(f"/api/{user_id}/tasks{path}", headers=headers).status_code == 200
        reads = list(seen)
        client.delete(f"/api/{user_id}/tasks/{created.json['id']}", headers=headers)
    finally:
        app.extensions["db"].engine.dispose()
    assert single_query_writes == [("INSERT", True), ("UPDATE", True), ("UPDATE", True)]
    assert [kind for kind, _ in writes] == ["SELECT", "UPDATE"] and all(autocommit is False for _, autocommit in writes)
    assert len(reads) >= 4 and all(autocommit is True for _, autocommit in reads)

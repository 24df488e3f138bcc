"""The real server: gunicorn with gunicorn.conf.py, over HTTP, against PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from alembic import command

from todo_api.cli import alembic_config

from .helpers import delete_tasks_of, make_token
from .live_server import REQUEST_TIMEOUT, call, live_server, server_env

CONCURRENT_TOGGLES = 20  # even, so the task ends where it started

pytestmark = pytest.mark.slow


@pytest.fixture
def user_id(postgres_url: str) -> Iterator[str]:
    """A user of this test alone; whatever it leaves behind is deleted."""
    user = f"server-test-{uuid.uuid4()}"
    yield user
    delete_tasks_of(postgres_url, [user])


def test_gunicorn_serves_the_task_lifecycle_and_atomic_toggles(postgres_url, user_id, tmp_path):
    command.upgrade(alembic_config(postgres_url), "head")  # idempotent; does not touch other tests' data
    token = make_token(user_id)

    with live_server(server_env(postgres_url), log_dir=tmp_path) as server:
        base_url = server.base_url
        assert call("GET", f"{base_url}/health/ready")[0] == 200

        status, headers, task = call("POST", f"{base_url}/api/{user_id}/tasks", token, {"title": "Served by gunicorn"})
        assert status == 201, task
        task_url = f"{base_url}/api/{user_id}/tasks/{task['id']}"
        assert headers["Location"] == f"/api/{user_id}/tasks/{task['id']}"

        status, _, fetched = call("GET", task_url, token)
        assert status == 200 and fetched["title"] == "Served by gunicorn" and fetched["completed"] is False

        status, _, toggled = call("PATCH", f"{task_url}/complete", token)
        assert status == 200 and toggled["completed"] is True and toggled["status"] == "completed"

        # Every toggle is one UPDATE ... RETURNING: each sees the previous one, so the answers alternate.
        start = threading.Barrier(CONCURRENT_TOGGLES, timeout=REQUEST_TIMEOUT)

        def toggle(_: int) -> tuple[int, Any]:
            start.wait()
            status, _, body = call("PATCH", f"{task_url}/complete", token)
            return status, body

        with ThreadPoolExecutor(max_workers=CONCURRENT_TOGGLES) as pool:
            results = list(pool.map(toggle, range(CONCURRENT_TOGGLES)))
        assert [status for status, _ in results] == [200] * CONCURRENT_TOGGLES, results
        assert [body["completed"] for _, body in results].count(True) == CONCURRENT_TOGGLES // 2

        status, _, final = call("GET", task_url, token)
        assert status == 200 and final["completed"] is True and final["status"] == "completed"

        status, headers, body = call("DELETE", task_url, token)
        assert status == 204 and body is None
        status, _, body = call("GET", task_url, token)
        assert status == 404 and body == {"detail": "Task not found"}

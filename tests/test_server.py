"""The real server: gunicorn with gunicorn.conf.py, over HTTP, against PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from todo_api.cli import alembic_config

from .conftest import SECRET, make_token

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 20
REQUEST_TIMEOUT = 10
CONCURRENT_TOGGLES = 20  # even, so the task ends where it started

# Variables the app reads: the test's environment must not leak into the server.
APP_VARIABLES = (
    "APP_ENV", "DATABASE_URL", "MIGRATIONS_DATABASE_URL", "BETTER_AUTH_SECRET", "BETTER_AUTH_URL",
    "BETTER_AUTH_JWKS_URL", "JWT_ISSUER", "JWT_AUDIENCE", "JWT_LEEWAY", "FRONTEND_URL", "LOG_LEVEL",
    "GUNICORN_CMD_ARGS", "GUNICORN_THREADS", "GUNICORN_MAX_REQUESTS", "GUNICORN_TIMEOUT",
)

# No proxy from the environment may see loopback traffic.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, dict[str, str], Any]:
    """One request; returns (status, headers, parsed JSON body or None)."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with OPENER.open(request, timeout=REQUEST_TIMEOUT) as response:
            return response.status, dict(response.headers), _json(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), _json(error.read())


def _json(raw: bytes) -> Any:
    return json.loads(raw) if raw else None


@contextmanager
def gunicorn(env: dict[str, str], port: int, log_path: Path) -> Iterator[str]:
    """Serve wsgi:app with the project's config; print its output if the block fails, and always stop it."""
    command_line = [
        sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
        "--bind", f"127.0.0.1:{port}",  # the config binds 0.0.0.0; keep the test on loopback
        "--no-control-socket",  # the default socket path is shared with any other gunicorn of this user
        "wsgi:app",
    ]
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command_line, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_live(process, base_url)
        yield base_url
    except BaseException:
        print(f"--- gunicorn output ({' '.join(command_line)}) ---\n{log_path.read_text(errors='replace')}")
        raise
    finally:
        _stop(process)


def _wait_until_live(process: subprocess.Popen[bytes], base_url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {process.returncode} during start-up")
        try:
            if call("GET", f"{base_url}/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"gunicorn did not answer /health within {STARTUP_TIMEOUT} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
def server_env(postgres_url: str) -> dict[str, str]:
    command.upgrade(alembic_config(postgres_url), "head")  # idempotent; does not touch other tests' data
    env = {key: value for key, value in os.environ.items() if key not in APP_VARIABLES}
    env.update({
        "DATABASE_URL": postgres_url,
        "BETTER_AUTH_SECRET": SECRET,
        "APP_ENV": "production",
        "WEB_CONCURRENCY": "2",
        "GUNICORN_GRACEFUL_TIMEOUT": "5",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture
def user_id(postgres_url: str) -> Iterator[str]:
    """A user of this test alone; whatever it leaves behind is deleted."""
    user = f"server-test-{uuid.uuid4()}"
    yield user
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM tasks WHERE user_id = :user"), {"user": user})
    finally:
        engine.dispose()


def test_gunicorn_serves_the_task_lifecycle_and_atomic_toggles(server_env, user_id, tmp_path):
    port = free_port()
    server_env["PORT"] = str(port)
    token = make_token(user_id)

    with gunicorn(server_env, port, tmp_path / "gunicorn.log") as base_url:
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

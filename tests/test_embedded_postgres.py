"""The embedded PostgreSQL of `make run`: data kept across runs, leftovers recovered, stopped after the app."""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from todo_api.embedded_postgres import EmbeddedPostgres, EmbeddedPostgresError, free_port, port_open, serve

pytestmark = pytest.mark.slow


@pytest.fixture
def instance() -> Iterator[Path]:
    """A folder the server's account can reach when root runs the tests (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="todo-api-instance-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def scalar(url: str, sql: str) -> object:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(sql))
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def test_data_survives_a_restart(instance):
    first = EmbeddedPostgres(instance / "postgres", free_port(), durable=False)
    url = first.start("todo")
    try:
        scalar(url, "CREATE TABLE kept AS SELECT 42 AS answer")
    finally:
        first.stop()
    again = EmbeddedPostgres(instance / "postgres", first.port, durable=False)
    try:
        assert scalar(again.start("todo"), "SELECT answer FROM kept") == 42
    finally:
        again.stop()


def test_a_server_left_by_a_killed_run_is_stopped_and_replaced(instance):
    port = free_port()
    leftover = EmbeddedPostgres(instance / "postgres", port, durable=False)
    leftover.start("todo")  # never stopped by its owner, as when `make run` is killed
    replacement = EmbeddedPostgres(instance / "postgres", port, durable=False)
    try:
        assert scalar(replacement.start("todo"), "SELECT 1") == 1
        assert leftover.server is not None and leftover.server.wait(timeout=5) is not None
    finally:
        replacement.stop()
        leftover.stop()


def test_a_port_taken_by_another_program_is_one_clear_error(instance):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedPostgres(instance / "postgres", port, durable=False)
        with pytest.raises(EmbeddedPostgresError, match=f"port {port} is taken"):
            server.start("todo")


def test_serve_migrates_runs_the_app_on_it_and_stops_the_server_after(instance, monkeypatch):
    port = free_port()
    monkeypatch.setenv("EMBEDDED_POSTGRES_PORT", str(port))
    app = (
        "import os, sqlalchemy as sa; engine = sa.create_engine(os.environ['DATABASE_URL']);"
        "c = engine.connect(); print(c.execute(sa.text('SELECT version_num FROM alembic_version')).scalar());"
        "raise SystemExit(7)"
    )
    assert serve([sys.executable, "-c", app], instance=instance) == 7  # the app's own exit status
    assert not port_open("127.0.0.1", port)
    assert (instance / "postgres" / "PG_VERSION").exists()

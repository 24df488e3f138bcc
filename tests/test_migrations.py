"""Alembic migrations: reversible, and in step with the models."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, create_engine, inspect, text

from todo_api.cli import alembic_config
from todo_api.models import Base, include_in_autogenerate


@pytest.fixture
def empty_database(database_url: str) -> Iterator[Connection]:
    """A connection to a fresh, empty schema, dropped at teardown."""
    schema = f"migrations_{uuid.uuid4().hex[:8]}"
    engine = create_engine(database_url)
    with engine.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        connection.execute(text(f'SET search_path TO "{schema}"'))
        connection.commit()
        try:
            yield connection
        finally:
            connection.rollback()
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            connection.commit()
    engine.dispose()


def migrate(connection: Connection, direction: str, revision: str) -> None:
    config = alembic_config(connection.engine.url.render_as_string(hide_password=False))  # the connection is used
    config.attributes["connection"] = connection
    getattr(command, direction)(config, revision)
    connection.commit()


def model_differences(connection: Connection) -> list:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_object": include_in_autogenerate}
    )
    return compare_metadata(context, Base.metadata)


def test_upgrade_downgrade_upgrade(empty_database):
    migrate(empty_database, "upgrade", "head")
    assert "tasks" in inspect(empty_database).get_table_names()
    migrate(empty_database, "downgrade", "base")
    assert "tasks" not in inspect(empty_database).get_table_names()
    migrate(empty_database, "upgrade", "head")
    assert "tasks" in inspect(empty_database).get_table_names()


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index")
def test_autogenerate_finds_no_difference_from_the_models(empty_database):
    migrate(empty_database, "upgrade", "head")
    assert model_differences(empty_database) == []


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
def test_the_list_indexes_exist(empty_database):
    migrate(empty_database, "upgrade", "head")
    indexes = {index["name"]: index["column_names"] for index in inspect(empty_database).get_indexes("tasks")}
    assert indexes["ix_tasks_user_created"] == ["user_id", "created_at", "id"]
    assert indexes["ix_tasks_user_updated"] == ["user_id", "updated_at", "id"]
    assert indexes["ix_tasks_user_due"] == ["user_id", "due_date", "id"]
    assert indexes["ix_tasks_user_priority"][0] == "user_id"
    assert indexes["ix_tasks_user_title"][0] == "user_id"


def test_task_counts_are_backfilled_from_existing_tasks(empty_database):
    migrate(empty_database, "upgrade", "0002")
    for user, n in (("alice", 3), ("bob", 1)):
        for _ in range(n):
            empty_database.execute(text(
                "INSERT INTO tasks (id, user_id, title, status, priority, tags, created_at, updated_at) "
                "VALUES (:id, :user, 't', 'pending', 'medium', '[]', '2026-01-01', '2026-01-01')"
            ), {"id": uuid.uuid4().hex, "user": user})
    empty_database.commit()
    migrate(empty_database, "upgrade", "head")
    counts = dict(empty_database.execute(text("SELECT user_id, total FROM task_counts")).all())
    assert counts == {"alice": 3, "bob": 1}
    migrate(empty_database, "downgrade", "0002")
    assert "task_counts" not in inspect(empty_database).get_table_names()

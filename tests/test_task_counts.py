"""task_counts: each user's number of tasks, kept by triggers, read as the unfiltered list's X-Total-Count."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import create_engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from todo_api.models import Task, TaskCount, utcnow

USERS = ("alice", "bob", "carol")  # other tests may have committed tasks of other users


def stored_counts(app) -> dict[str, int]:
    session = app.extensions["db"].sessionmaker()
    try:
        query = select(TaskCount.user_id, TaskCount.total).where(TaskCount.user_id.in_(USERS), TaskCount.total != 0)
        return dict(session.execute(query).all())
    finally:
        session.close()


def actual_counts(app) -> dict[str, int]:
    session = app.extensions["db"].sessionmaker()
    try:
        query = select(Task.user_id, func.count()).where(Task.user_id.in_(USERS)).group_by(Task.user_id)
        return dict(session.execute(query).all())
    finally:
        session.close()


def total_of(client, auth, user: str, query: str = "") -> int:
    response = client.get(f"/api/{user}/tasks?{query}", headers=auth(user))
    assert response.status_code == 200
    return int(response.headers["X-Total-Count"])


def test_the_total_follows_creates_and_deletes(app, client, auth, create_task):
    alice = [create_task("alice")["id"] for _ in range(3)]
    for _ in range(2):
        create_task("bob")
    assert client.delete(f"/api/alice/tasks/{alice[0]}", headers=auth("alice")).status_code == 204
    assert client.delete(f"/api/alice/tasks/{alice[0]}", headers=auth("alice")).status_code == 404

    assert total_of(client, auth, "alice", "page_size=1") == 2
    assert total_of(client, auth, "bob", "page_size=2") == 2
    assert stored_counts(app) == actual_counts(app) == {"alice": 2, "bob": 2}


def test_updates_and_toggles_leave_the_total_alone(app, client, auth, create_task):
    task = create_task("alice")
    create_task("alice")
    headers = auth("alice")
    assert client.put(f"/api/alice/tasks/{task['id']}", json={"title": "New"}, headers=headers).status_code == 200
    assert client.patch(f"/api/alice/tasks/{task['id']}/complete", headers=headers).status_code == 200
    assert total_of(client, auth, "alice", "page_size=1") == 2
    assert stored_counts(app) == {"alice": 2}


def test_a_user_without_tasks_has_a_total_of_zero(client, auth, create_task):
    create_task("alice")
    assert total_of(client, auth, "nobody") == 0


def test_a_page_past_the_end_reports_the_total(client, auth, create_task):
    for _ in range(3):
        create_task("alice")
    assert total_of(client, auth, "alice", "page=5&page_size=2") == 3


def test_a_user_whose_tasks_were_all_deleted_has_a_total_of_zero(client, auth, create_task):
    task = create_task("alice")
    assert client.delete(f"/api/alice/tasks/{task['id']}", headers=auth("alice")).status_code == 204
    assert total_of(client, auth, "alice") == 0


def test_filtered_totals_are_still_counted(client, auth, create_task):
    create_task("alice", priority="high")
    create_task("alice", priority="low")
    create_task("alice", priority="low")
    assert total_of(client, auth, "alice", "priority=low&page_size=1") == 2
    assert total_of(client, auth, "alice", "page_size=1") == 3


def test_bulk_seeding_counts_every_row(app, runner):
    result = runner.invoke(args=["seed", "--user", "carol", "--count", "2500", "--random-seed", "1"])
    assert result.exit_code == 0, result.output
    assert stored_counts(app)["carol"] == 2500 == actual_counts(app)["carol"]


def test_a_tasks_owner_cannot_change(app, create_task):
    task_id = uuid.UUID(create_task("alice")["id"])
    session = app.extensions["db"].sessionmaker()
    try:
        with pytest.raises(IntegrityError, match="user_id cannot change"):
            session.execute(update(Task).where(Task.id == task_id).values(user_id="mallory"))
        session.rollback()
        session.execute(update(Task).where(Task.id == task_id).values(user_id="alice", title="Same owner"))
    finally:
        session.close()


def test_concurrent_writers_keep_the_count_exact(database_url):
    """Committed, concurrent inserts and deletes for the same users from many connections."""
    users = [f"counts-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    engine = create_engine(database_url, pool_size=8)
    errors: list[BaseException] = []

    def row(user: str) -> dict:
        now = utcnow()
        return {"id": uuid.uuid4(), "user_id": user, "title": "t", "status": "pending", "priority": "medium",
                "tags": [], "created_at": now, "updated_at": now}

    def writer() -> None:
        try:
            for _ in range(15):
                with engine.begin() as connection:
                    rows = [row(users[0]), row(users[1]), row(users[0])]  # both users in one statement
                    connection.execute(insert(Task.__table__), rows)
                with engine.begin() as connection:
                    connection.execute(delete(Task).where(Task.id == rows[2]["id"]))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        with engine.connect() as connection:
            stored = dict(connection.execute(
                select(TaskCount.user_id, TaskCount.total).where(TaskCount.user_id.in_(users))).all())
            actual = dict(connection.execute(
                select(Task.user_id, func.count()).where(Task.user_id.in_(users)).group_by(Task.user_id)).all())
        assert stored == actual == {users[0]: 8 * 15, users[1]: 8 * 15}
    finally:
        with engine.begin() as connection:
            connection.execute(delete(Task).where(Task.user_id.in_(users)))
            connection.execute(delete(TaskCount).where(TaskCount.user_id.in_(users)))
        engine.dispose()

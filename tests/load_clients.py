"""Ledgered load: keep-alive clients that create, update, toggle and delete tasks and record every answer, and
the audit of the database against what they were told. Used by the load and multi-instance tests."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import create_engine, text

from .helpers import make_token
from .live_server import KeepAliveClient

THINK_SECONDS = 0.005  # a pause between a client's requests keeps the test process from starving the server
# Mix of operations on existing tasks; a client creates whenever its user has few tasks.
OPERATIONS = (("create", 25), ("update", 25), ("toggle", 35), ("delete", 15))


@dataclass
class TaskRecord:
    titles: set[str]
    toggles: int = 0  # successful ones
    deleted: bool = False  # a 204 was received


@dataclass
class Ledger:
    """What the clients were told, by task, and every answer's status by operation."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    live: dict[str, list[str]] = field(default_factory=dict)  # per user, tasks not being deleted
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    not_found: list[tuple[str, str]] = field(default_factory=list)  # (operation, task id), allowed if deleted
    errors: list[str] = field(default_factory=list)
    slowest: float = 0.0


def run_client(index: int, base_url: str, users: list[str], ledger: Ledger, deadline: float) -> None:
    """One client's loop until the deadline, on one keep-alive connection."""
    rng = random.Random(index)
    user = users[index % len(users)]
    http = KeepAliveClient(base_url, make_token(user, ttl=7200), timeout=30)  # outlives any bounded run
    tasks = f"/api/{user}/tasks"
    names, weights = zip(*OPERATIONS, strict=True)
    step = 0
    try:
        while time.monotonic() < deadline:
            step += 1
            with ledger.lock:
                live = ledger.live[user]
                operation = "create" if len(live) < 5 else rng.choices(names, weights)[0]
                task_id = None
                if operation != "create":
                    position = rng.randrange(len(live))
                    task_id = live[position]
                    if operation == "delete":  # nobody else picks it from now on
                        live[position] = live[-1]
                        live.pop()
            title = f"c{index} s{step}"
            if operation == "create":
                method, path, body = "POST", tasks, {"title": title, "priority": rng.choice(["low", "high"])}
            elif operation == "update":
                method, path, body = rng.choice(["PUT", "PATCH"]), f"{tasks}/{task_id}", {"title": title}
                with ledger.lock:
                    ledger.tasks[task_id].titles.add(title)  # before sending: it may land even if we time out
            elif operation == "toggle":
                method, path, body = "PATCH", f"{tasks}/{task_id}/complete", None
            else:
                method, path, body = "DELETE", f"{tasks}/{task_id}", None
            started = time.monotonic()
            try:
                status, _, answer = http.request(method, path, body)
            except OSError as error:
                with ledger.lock:
                    ledger.errors.append(f"{operation} {task_id}: {error!r}")
                continue
            elapsed = time.monotonic() - started
            with ledger.lock:
                ledger.statuses[operation, status] += 1
                ledger.slowest = max(ledger.slowest, elapsed)
                if status == 201 and operation == "create":
                    ledger.tasks[answer["id"]] = TaskRecord({title})
                    ledger.live[user].append(answer["id"])
                elif status == 200 and operation == "toggle":
                    ledger.tasks[task_id].toggles += 1
                elif status == 200 and operation == "update" and answer["title"] != title:
                    ledger.errors.append(f"update {task_id} answered title {answer['title']!r}, sent {title!r}")
                elif status == 204 and operation == "delete":
                    ledger.tasks[task_id].deleted = True
                elif status == 404 and operation in ("toggle", "update"):
                    ledger.not_found.append((operation, task_id))
                else:
                    expected = {"create": 201, "update": 200, "toggle": 200, "delete": 204}[operation]
                    if status != expected:
                        ledger.errors.append(f"{operation} {task_id}: {status} {answer}")
            time.sleep(THINK_SECONDS)
    finally:
        http.close()


def audit(ledger: Ledger, database_url: str, users: list[str]) -> None:
    """What the database holds is exactly what the clients were told."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, user_id, title, status FROM tasks WHERE user_id = ANY(:users)"),
                                      {"users": users}).all()
    finally:
        engine.dispose()
    stored = {str(row.id): row for row in rows}
    expected = {task_id for task_id, record in ledger.tasks.items() if not record.deleted}
    deleted = {task_id for task_id, record in ledger.tasks.items() if record.deleted}
    assert set(stored) - set(ledger.tasks) == set(), "tasks nobody was told about"
    assert expected - set(stored) == set(), "created tasks that are missing"
    assert deleted & set(stored) == set(), "deleted tasks that are still there"
    wrong_state = [task_id for task_id in expected
                   if (stored[task_id].status == "completed") != (ledger.tasks[task_id].toggles % 2 == 1)]
    assert wrong_state == [], f"{len(wrong_state)} tasks whose completion is not the parity of their toggles"
    wrong_title = [task_id for task_id in expected if stored[task_id].title not in ledger.tasks[task_id].titles]
    assert wrong_title == []
    assert all(ledger.tasks[task_id].deleted for _, task_id in ledger.not_found), "404 for a task never deleted"


"""Cost per request of the rate limiter (off, in memory, in Redis; with and without its headers) and of the quota's
lock on the user's count row, in process through the Flask test client.

Run: TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test_limits .venv/bin/python -m bench.bench_limits
(REDIS_URL, default redis://127.0.0.1:6379/0; its keys get a prefix of their own.)

GET one task: the configurations take turns in blocks of 100 requests, so the machine's drift hits them alike. Wall:
the median of every request's wall time. CPU: this process's CPU time per request (all its threads; Redis's own CPU is
not in it), the median and the best of the 30 blocks: on a shared machine the best is the least disturbed.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from typing import Any

from alembic import command
from flask import Flask
from sqlalchemy import delete, text

from tests.helpers import bearer, make_config, make_token
from todo_api import create_app
from todo_api.cli import alembic_config
from todo_api.config import normalize_database_url, rate_limit_storage
from todo_api.models import Task, TaskCount
from todo_api.repositories import LOCK_USER_TOTAL_SQL

BLOCK, ROUNDS = 100, 30
USER = f"bench-limits-{uuid.uuid4().hex[:8]}"
GENEROUS = "1000000 per hour"  # never reached here: the cost measured is the counting, not the 429


def app_for(database_url: str, storage: str | None, headers: bool = True) -> Flask:
    limits: dict[str, Any] = {"RATELIMIT_ENABLED": False}
    if storage is not None:
        limits = {"RATELIMIT_ENABLED": True, "RATELIMIT_STORAGE_URI": storage, "RATELIMIT_HEADERS_ENABLED": headers,
                  "RATELIMIT_STORAGE_OPTIONS": rate_limit_storage({"RATELIMIT_STORAGE_URI": storage})[1],
                  "RATELIMIT_KEY_PREFIX": f"bench-{uuid.uuid4().hex}", "RATELIMIT_APPLICATION": GENEROUS}
    return create_app(make_config(database_url, LOG_LEVEL="WARNING", **limits))


def main() -> None:
    database_url = normalize_database_url(os.environ["TEST_DATABASE_URL"])
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    command.upgrade(alembic_config(database_url), "head")
    apps = {
        "limits off": app_for(database_url, None),
        "memory": app_for(database_url, "memory://"),
        "memory, no headers": app_for(database_url, "memory://", headers=False),
        "Redis": app_for(database_url, redis_url),
        "Redis, no headers": app_for(database_url, redis_url, headers=False),
    }
    auth = bearer(make_token(USER, ttl=3600))
    created = apps["limits off"].test_client().post(f"/api/{USER}/tasks", json={"title": "bench"}, headers=auth)
    assert created.status_code == 201, created.json
    path = created.headers["Location"]
    clients = {name: app.test_client() for name, app in apps.items()}
    samples: dict[str, list[float]] = {name: [] for name in apps}
    cpu: dict[str, list[float]] = {name: [] for name in apps}
    try:
        for name, client in clients.items():  # warm up: connections, the token cache, Redis's scripts
            for _ in range(BLOCK):
                assert client.get(path, headers=auth).status_code == 200, name
        for _ in range(ROUNDS):
            for name, client in clients.items():
                cpu_started = time.process_time()
                for _ in range(BLOCK):
                    started = time.perf_counter()
                    client.get(path, headers=auth)
                    samples[name].append(time.perf_counter() - started)
                cpu[name].append((time.process_time() - cpu_started) / BLOCK)
        figures = {name: (statistics.median(samples[name]) * 1e6, statistics.median(cpu[name]) * 1e6,
                          min(cpu[name]) * 1e6) for name in apps}
        base = figures["limits off"]
        print(f"GET one task, {BLOCK * ROUNDS} requests each (test client): wall median, CPU median, CPU best block")
        for name, figure in figures.items():
            deltas = (f"{value:7.0f} us ({value - off:+5.0f})" for value, off in zip(figure, base, strict=True))
            print(f"  {name:20}{''.join(deltas)}")
        quota_lock(apps["limits off"])
    finally:
        engine = apps["limits off"].extensions["db"].engine
        with engine.begin() as connection:
            connection.execute(delete(Task).where(Task.user_id == USER))
            connection.execute(delete(TaskCount).where(TaskCount.user_id == USER))
        for app in apps.values():
            app.extensions["db"].engine.dispose()


def quota_lock(app: Flask) -> None:
    """The quota's statement in a transaction, against the same transaction without it."""
    engine = app.extensions["db"].engine
    timings: dict[str, list[float]] = {"BEGIN; SELECT 1; ROLLBACK": [], "BEGIN; lock the count row; ROLLBACK": []}
    with engine.connect() as connection:
        for _ in range(ROUNDS):
            for name, values in timings.items():
                for _ in range(BLOCK):
                    started = time.perf_counter()
                    with connection.begin() as transaction:
                        if "lock" in name:
                            connection.exec_driver_sql(LOCK_USER_TOTAL_SQL, {"user_id": USER})
                        else:
                            connection.execute(text("SELECT 1"))
                        transaction.rollback()
                    values.append(time.perf_counter() - started)
    base = statistics.median(timings["BEGIN; SELECT 1; ROLLBACK"]) * 1e6
    lock = statistics.median(timings["BEGIN; lock the count row; ROLLBACK"]) * 1e6
    print(f"Quota check: one statement and round trip, {lock - base:.0f} us more than a SELECT 1 "
          f"({lock:.0f} vs {base:.0f} us for the transaction)")


if __name__ == "__main__":
    main()

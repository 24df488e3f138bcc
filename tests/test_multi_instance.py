"""Two instances behind a real load balancer, one of them through PgBouncer in transaction mode: under a bounded,
ledgered mixed load nothing is lost, counts agree with the database, and what one instance says holds on the other.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from todo_api.cli import alembic_config

from .balancer import load_balancer
from .fault_injection import scratch_database
from .helpers import make_token
from .live_server import call, live_server, server_env
from .load_clients import Ledger, audit, run_client
from .pooler import transaction_pooler

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("MULTI_INSTANCE_SECONDS", "15"))
CLIENTS = 16
USERS = 4


@pytest.fixture(scope="module")
def database(postgres_url: str) -> Iterator[str]:
    with scratch_database(postgres_url, prefix="instances") as url:
        command.upgrade(alembic_config(url), "head")
        yield url


@pytest.fixture(scope="module")
def instances(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(balancer, direct instance, pooled instance) base URLs."""
    logs = tmp_path_factory.mktemp("instances")
    with transaction_pooler(database) as pooled_url, \
            live_server(server_env(database, LOG_LEVEL="WARNING"), log_dir=logs) as direct, \
            live_server(server_env(pooled_url, LOG_LEVEL="WARNING"), log_dir=logs) as pooled, \
            load_balancer([direct.base_url, pooled.base_url]) as balancer:
        yield balancer, direct.base_url, pooled.base_url


def test_mixed_load_across_two_instances_loses_nothing_and_counts_agree(instances, database):
    balancer, _, _ = instances
    users = [f"multi-{uuid.uuid4().hex[:8]}-{n}" for n in range(USERS)]
    ledger = Ledger(live={user: [] for user in users})
    deadline = time.monotonic() + SECONDS
    threads = [threading.Thread(target=run_client, args=(index, balancer, users, ledger, deadline), daemon=True)
               for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SECONDS + 60)
    requests = sum(ledger.statuses.values())
    print(f"\n{requests} requests through the balancer in {SECONDS:.0f} s; statuses {dict(ledger.statuses)}")
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert all(status < 500 for _, status in ledger.statuses), ledger.statuses
    assert not ledger.errors, ledger.errors[:20]
    audit(ledger, database, users)

    engine = create_engine(database)
    try:
        with engine.connect() as connection:
            stored = dict(connection.execute(text(
                "SELECT user_id, count(*) FROM tasks WHERE user_id = ANY(:users) GROUP BY user_id"
            ), {"users": users}).all())
    finally:
        engine.dispose()
    for user in users:
        token = make_token(user)
        for _ in range(2):  # one answer from each instance
            status, headers, _ = call("GET", f"{balancer}/api/{user}/tasks?page_size=1", token)
            total = {name.lower(): value for name, value in headers.items()}["x-total-count"]  # HAProxy lowercases
            assert status == 200 and int(total) == stored.get(user, 0), (user, headers)
            status, _, summary = call("GET", f"{balancer}/api/{user}/tasks/summary", token)
            assert status == 200 and summary["total"] == stored.get(user, 0), (user, summary)


def test_an_etag_from_one_instance_holds_on_the_other(instances):
    _, direct, pooled = instances
    user = f"multi-{uuid.uuid4().hex[:8]}"
    token = make_token(user)
    status, _, task = call("POST", f"{direct}/api/{user}/tasks", token, {"title": "seen by both"})
    assert status == 201
    path = f"/api/{user}/tasks/{task['id']}"
    _, headers, _ = call("GET", f"{direct}{path}", token)
    etag = headers["ETag"]
    status, not_modified_headers, _ = call("GET", f"{pooled}{path}", token, headers={"If-None-Match": etag})
    assert status == 304 and not_modified_headers["ETag"] == etag
    status, _, updated = call("PUT", f"{pooled}{path}", token, {"title": "changed"}, headers={"If-Match": etag})
    assert status == 200 and updated["title"] == "changed"
    status, _, _ = call("PUT", f"{direct}{path}", token, {"title": "stale"}, headers={"If-Match": etag})
    assert status == 412

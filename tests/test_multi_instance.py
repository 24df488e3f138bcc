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
from todo_api.jwks import FETCH_TIMEOUT

from .balancer import load_balancer
from .fault_injection import scratch_database
from .helpers import make_token
from .jwks_server import JWKSServer, Tokens, new_key
from .live_server import call, live_server, server_env
from .load_clients import Ledger, audit, run_client
from .pooler import transaction_pooler

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("MULTI_INSTANCE_SECONDS", "15"))
CLIENTS = 16
USERS = 4
JWKS_MAX_AGE = 30  # the shortest the app allows; production's 300 s bound works the same, ten times slower


@pytest.fixture(scope="module")
def database(postgres_url: str) -> Iterator[str]:
    with scratch_database(postgres_url, prefix="instances") as url:
        command.upgrade(alembic_config(url), "head")
        yield url


@pytest.fixture(scope="module")
def jwks() -> Iterator[JWKSServer]:
    """Better Auth's JWKS as both instances see it: a key that stays, and one the removal test takes away."""
    server = JWKSServer([new_key("ES256", "staying").jwk])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def instances(database: str, jwks: JWKSServer,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(balancer, direct instance, pooled instance) base URLs."""
    logs = tmp_path_factory.mktemp("instances")
    settings = {"LOG_LEVEL": "WARNING", "BETTER_AUTH_URL": jwks.origin, "JWKS_MAX_AGE": str(JWKS_MAX_AGE)}
    with transaction_pooler(database) as pooled_url, \
            live_server(server_env(database, **settings), log_dir=logs) as direct, \
            live_server(server_env(pooled_url, **settings), log_dir=logs) as pooled, \
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


def test_a_key_removed_from_the_jwks_is_refused_by_both_instances_within_max_age(instances, jwks):
    """Every worker of both instances accepted (and cached) the key's token; within JWKS_MAX_AGE of the removal,
    plus one fetch's deadline, none accepts it, while the key that stays keeps working."""
    _, direct, pooled = instances
    user = f"multi-{uuid.uuid4().hex[:8]}"
    leaving, kept = new_key("EdDSA", "leaving"), new_key("ES256", "kept")
    jwks.keys = [*jwks.keys, leaving.jwk, kept.jwk]
    # Signed a minute ago, as a signed-in user's token is: past the leeway of the last check's start (jwks.py)
    removed_token = Tokens(jwks.origin, {"EdDSA": leaving}).sign("EdDSA", user, iat=int(time.time()) - 60)
    kept_token = Tokens(jwks.origin, {"ES256": kept}).sign("ES256", user)
    for base in (direct, pooled):  # several requests, so that each worker checks and caches the token
        assert [call("GET", f"{base}/api/me", removed_token)[0] for _ in range(8)] == [200] * 8

    jwks.keys = [key for key in jwks.keys if key["kid"] != "leaving"]
    removed_at = time.monotonic()
    last_accepted = {direct: 0.0, pooled: 0.0}
    bound = JWKS_MAX_AGE + FETCH_TIMEOUT + 1  # a worker past max age waits for its re-check, at most the deadline
    while time.monotonic() - removed_at < bound:
        for base in (direct, pooled):
            status, headers, body = call("GET", f"{base}/api/me", removed_token)
            assert status in (200, 401), (base, time.monotonic() - removed_at, status, headers, body)
            if status == 200:
                last_accepted[base] = time.monotonic() - removed_at
        time.sleep(0.25)
    print(f"\nlast 200 after the removal: direct {last_accepted[direct]:.1f} s, pooled {last_accepted[pooled]:.1f} s "
          f"(JWKS_MAX_AGE {JWKS_MAX_AGE} s)")
    for base in (direct, pooled):
        assert [call("GET", f"{base}/api/me", removed_token)[0] for _ in range(8)] == [401] * 8, base
        assert call("GET", f"{base}/api/me", kept_token)[0] == 200, base

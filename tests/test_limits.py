"""Resource limits (issue 12, OWASP API4): rate limits per user and per client address, in memory and in Redis,
and the per-user task quota."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, delete, func, select, text

from todo_api import create_app, limits
from todo_api.config import ConfigError, load_config, rate_limit_storage
from todo_api.errors import RETRY_AFTER_SECONDS
from todo_api.models import Task, TaskCount

from .helpers import UNREACHABLE_DATABASE_URL, assert_error, bearer, make_config, make_token, no_database, rolled_back
from .live_server import call, free_port, live_server, server_env

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
USER_LIMIT, ANONYMOUS_LIMIT = 5, 3
PREFLIGHT = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """TEST_REDIS_URL, else the local Redis, else a throwaway redis-server; skipped only if there is none at all."""
    url = os.environ.get("TEST_REDIS_URL") or LOCAL_REDIS
    if redis_answers(url):
        yield url
        return
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip(f"no Redis answers at {url} and redis-server is not installed (.ci/run installs it)")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        arguments = ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", directory]
        process = subprocess.Popen([server, *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 10
            while not redis_answers(url):
                assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(params=["memory", "redis"])
def storage_uri(request: pytest.FixtureRequest) -> str:
    return "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")


@pytest.fixture
def key_prefix() -> str:
    """Counters of this test alone, in a Redis that other runs may share."""
    return f"test_limits-{uuid.uuid4().hex}"


def limit_settings(storage_uri: str, key_prefix: str) -> dict[str, Any]:
    return {
        "RATELIMIT_ENABLED": True,
        "RATELIMIT_STORAGE_URI": storage_uri,
        "RATELIMIT_STORAGE_OPTIONS": rate_limit_storage({"RATELIMIT_STORAGE_URI": storage_uri})[1],
        "RATELIMIT_KEY_PREFIX": key_prefix,
        "RATELIMIT_APPLICATION": f"{USER_LIMIT} per minute",
        "RATELIMIT_ANONYMOUS": f"{ANONYMOUS_LIMIT} per minute",
    }


@pytest.fixture
def limited_app(database_url: str, storage_uri: str, key_prefix: str) -> Iterator[Callable[..., Flask]]:
    """limited_app(**config) -> an app with rate limits on (5 per minute per user, 3 per address), isolated as
    `app` is; apps of one test share the counters' key prefix."""
    stack = ExitStack()
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        settings = limit_settings(overrides.pop("RATELIMIT_STORAGE_URI", storage_uri), key_prefix)
        app = create_app(make_config(database_url, **{**settings, **overrides}))
        apps.append(app)
        stack.enter_context(rolled_back(app))
        return app

    yield make
    stack.close()
    for app in apps:
        app.extensions["db"].engine.dispose()


def from_address(client: FlaskClient, address: str) -> FlaskClient:
    client.environ_base["REMOTE_ADDR"] = address
    return client


def statuses(responses: list[Any]) -> list[int]:
    return [response.status_code for response in responses]


# Rate limits per user


def test_a_user_over_the_rate_limit_gets_429_with_retry_after_and_the_ratelimit_headers(limited_app):
    client = limited_app().test_client()
    alice = bearer(make_token("alice"))
    for remaining in reversed(range(USER_LIMIT)):
        response = client.get("/api/alice/tasks", headers=alice)
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == str(USER_LIMIT)
        assert response.headers["X-RateLimit-Remaining"] == str(remaining)
        assert "Retry-After" not in response.headers  # only a 429 (or a 503) says when to come back

    response = client.get("/api/alice/tasks", headers=alice)
    assert_error(response, 429, {"detail": f"Rate limit exceeded: {USER_LIMIT} per 1 minute"})
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers.getlist("X-RateLimit-Limit") == [str(USER_LIMIT)]  # once, not once per writer
    assert response.headers.getlist("X-RateLimit-Remaining") == ["0"]
    assert 0 < int(response.headers["X-RateLimit-Reset"]) - time.time() <= 61  # a Unix time
    assert int(response.headers["X-RateLimit-Reset-After"]) == int(response.headers["Retry-After"])


def test_with_the_ratelimit_headers_off_only_the_429_has_them(limited_app):
    client = limited_app(RATELIMIT_HEADERS_ENABLED=False).test_client()
    alice = bearer(make_token("alice"))
    allowed = [client.get("/api/me", headers=alice) for _ in range(USER_LIMIT)]
    assert statuses(allowed) == [200] * USER_LIMIT
    assert not any("X-RateLimit-Limit" in response.headers for response in allowed)
    response = client.get("/api/me", headers=alice)
    assert response.status_code == 429 and 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers.getlist("X-RateLimit-Limit") == [str(USER_LIMIT)]
    assert response.headers.getlist("X-RateLimit-Remaining") == ["0"]
    assert 0 < int(response.headers["X-RateLimit-Reset"]) - time.time() <= 61


def test_a_users_limit_counts_every_route_together_and_each_user_apart(limited_app):
    client = limited_app().test_client()
    alice = bearer(make_token("alice"))
    created = client.post("/api/alice/tasks", json={"title": "one"}, headers=alice)
    task_url = created.headers["Location"]
    answers = [
        client.get("/api/alice/tasks", headers=alice),
        client.get(task_url, headers=alice),
        client.patch(f"{task_url}/complete", headers=alice),
        client.get("/api/me", headers=alice),
        client.get("/api/alice/tasks/summary", headers=alice),
    ]
    assert statuses([created, *answers]) == [201, 200, 200, 200, 200, 429]
    assert client.get("/api/bob/tasks", headers=bearer(make_token("bob"))).status_code == 200


def test_a_429_comes_before_the_path_guard_the_body_and_the_database(limited_app):
    app = limited_app()
    client = app.test_client()
    alice = bearer(make_token("alice"))
    for _ in range(USER_LIMIT):
        client.get("/api/me", headers=alice)
    with no_database(app):  # any session opened now would fail the request with a 500
        assert client.post("/api/alice/tasks", data="{not json", content_type="application/json",
                           headers=alice).status_code == 429  # not 400
        assert client.get("/api/bob/tasks", headers=alice).status_code == 429  # not 403


def test_a_list_page_costs_one_request_per_100_tasks_it_asks_for(limited_app):
    client = limited_app(RATELIMIT_APPLICATION="20 per minute").test_client()
    alice = bearer(make_token("alice"))
    remaining = []
    for query in ("page_size=1000", "page_size=150", "", "page_size=1", "page_size=x"):
        response = client.get(f"/api/alice/tasks?{query}", headers=alice)
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
    assert remaining == [10, 8, 7, 6, 5]  # 10, 2, 1, 1, and 1 for a 422
    assert client.get("/api/alice/tasks?page_size=600", headers=alice).status_code == 429


def test_a_503_keeps_its_own_retry_after(storage_uri, key_prefix):
    app = create_app(make_config(UNREACHABLE_DATABASE_URL, **limit_settings(storage_uri, key_prefix)))
    try:
        response = app.test_client().get("/api/alice/tasks", headers=bearer(make_token("alice")))
        assert_error(response, 503, {"detail": "Database unavailable"})
        assert response.headers["Retry-After"] == RETRY_AFTER_SECONDS  # not the rate limit window's end
        assert response.headers["X-RateLimit-Remaining"] == str(USER_LIMIT - 1)
    finally:
        app.extensions["db"].engine.dispose()


def test_rate_limits_are_off_when_ratelimit_enabled_is_false(limited_app):
    client = limited_app(RATELIMIT_ENABLED=False).test_client()
    alice = bearer(make_token("alice"))
    responses = [client.get("/api/alice/tasks", headers=alice) for _ in range(3 * USER_LIMIT)]
    responses += [client.get("/api/alice/tasks") for _ in range(3 * ANONYMOUS_LIMIT)]
    assert statuses(responses) == [200] * (3 * USER_LIMIT) + [401] * (3 * ANONYMOUS_LIMIT)
    assert not any("X-RateLimit-Limit" in response.headers for response in responses)


# Rate limits per client address


def test_a_401_flood_is_limited_per_client_address(limited_app):
    app = limited_app()
    flooder = from_address(app.test_client(), "203.0.113.7")
    bad_tokens = [bearer(make_token("alice", secret="x" * 40)), bearer("not-a-jwt"), {}]
    responses = [flooder.get("/api/alice/tasks", headers=headers) for headers in bad_tokens]
    responses.append(flooder.get("/api/alice/tasks", headers=bad_tokens[0]))
    assert statuses(responses) == [401] * ANONYMOUS_LIMIT + [429]
    assert_error(responses[-1], 429, {"detail": f"Rate limit exceeded: {ANONYMOUS_LIMIT} per 1 minute"})
    assert "Retry-After" in responses[-1].headers

    neighbour = from_address(app.test_client(), "203.0.113.8")
    assert neighbour.get("/api/alice/tasks").status_code == 401
    # A user with a valid token is counted as that user, even from the flooding address.
    assert flooder.get("/api/alice/tasks", headers=bearer(make_token("alice"))).status_code == 200


def test_every_request_without_a_valid_token_counts_for_its_address(limited_app):
    client = from_address(limited_app().test_client(), "198.51.100.1")
    responses = [client.get("/openapi.json"), client.get("/no/such/path"), client.delete("/api/alice/tasks")]
    assert statuses(responses) == [200, 404, 405]
    assert client.get("/docs").status_code == 429


def test_health_probes_and_cors_preflights_are_never_limited(limited_app):
    client = from_address(limited_app().test_client(), "198.51.100.2")
    for _ in range(ANONYMOUS_LIMIT):
        client.get("/api/alice/tasks")
    assert client.get("/api/alice/tasks").status_code == 429
    for _ in range(2 * ANONYMOUS_LIMIT):
        for response in (client.get("/health"), client.get("/health/ready"),
                         client.options("/api/alice/tasks", headers=PREFLIGHT)):
            assert response.status_code in (200, 204) and "X-RateLimit-Limit" not in response.headers


@pytest.mark.parametrize(
    ("hops", "forwarded_for", "same_key"),
    [
        # Without trusted proxies, X-Forwarded-For is never read: spoofing it changes nothing.
        (0, ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"], True),
        # Behind one proxy, the client is the entry that proxy appended (the last), whatever the client sent before.
        (1, ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"], False),
        (1, ["10.6.6.6, 192.0.2.9", "10.7.7.7, 192.0.2.9", "192.0.2.9", "1.2.3.4, 192.0.2.9"], True),
    ],
)
def test_x_forwarded_for_sets_the_client_address_only_through_trusted_proxies(limited_app, hops, forwarded_for,
                                                                              same_key):
    client = from_address(limited_app(TRUSTED_PROXY_HOPS=hops).test_client(), "10.0.0.1")
    answers = statuses([client.get("/api/alice/tasks", headers={"X-Forwarded-For": value}) for value in forwarded_for])
    assert answers == ([401] * ANONYMOUS_LIMIT + [429] if same_key else [401] * len(forwarded_for))


@pytest.mark.parametrize(
    ("remote_addr", "key"),
    [
        ("192.0.2.10", "192.0.2.10"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.10", "192.0.2.10"),
        ("", "unknown"),
    ],
)
def test_clients_are_counted_per_ipv4_address_and_per_ipv6_64(app, remote_addr, key):
    with app.test_request_context(environ_base={"REMOTE_ADDR": remote_addr}):
        assert limits.client_address() == key


# Where the counters live


@pytest.mark.parametrize("storage_uri", ["memory", "redis"], indirect=True)
def test_counters_in_redis_are_shared_by_every_worker_and_instance_and_in_memory_by_none(limited_app, storage_uri):
    first, second = limited_app().test_client(), limited_app().test_client()  # two workers, or two instances
    alice = bearer(make_token("alice"))
    answers = statuses([client.get("/api/me", headers=alice) for client in [first, second] * USER_LIMIT])
    if storage_uri.startswith("redis"):
        assert answers == [200] * USER_LIMIT + [429] * USER_LIMIT
    else:
        assert answers == [200] * (2 * USER_LIMIT)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers (a hung or partitioned Redis)."""
    with closing(socket.socket()) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


@pytest.mark.parametrize("storage_uri", ["memory"], indirect=True)
@pytest.mark.parametrize("outage", ["refused", "silent"])
def test_a_redis_outage_fails_no_request_and_each_worker_keeps_limiting_in_memory(limited_app, silent_server,
                                                                                  outage):
    down = f"redis://127.0.0.1:{free_port()}/0" if outage == "refused" else silent_server
    client = limited_app(RATELIMIT_STORAGE_URI=down).test_client()
    alice = bearer(make_token("alice"))
    started = time.monotonic()
    answers = statuses([client.get("/api/me", headers=alice) for _ in range(USER_LIMIT + 1)])
    assert answers == [200] * USER_LIMIT + [429]
    assert time.monotonic() - started < 3  # one Redis timeout (0.5 s) at most, then memory


@pytest.mark.slow
def test_gunicorn_workers_share_one_count_in_redis(database_url, redis_url, key_prefix, tmp_path):
    env = server_env(database_url, WEB_CONCURRENCY="2", RATELIMIT_ENABLED="true", REDIS_URL=redis_url,
                     RATELIMIT_KEY_PREFIX=key_prefix, RATELIMIT_APPLICATION="8 per minute", LOG_LEVEL="WARNING")
    token = make_token("live-limits")
    with live_server(env, log_dir=tmp_path) as server:
        server.wait_for_workers(2)
        answers = [call("GET", f"{server.base_url}/api/me", token)[0] for _ in range(16)]  # a connection each
    assert sorted(answers) == [200] * 8 + [429] * 8


# Configuration


def test_rate_limit_settings_are_read_from_the_environment():
    defaults = load_config({})
    assert defaults["RATELIMIT_ENABLED"] is True and defaults["RATELIMIT_STORAGE_URI"] == "memory://"
    assert defaults["RATELIMIT_APPLICATION"] == "1200 per minute"
    assert defaults["RATELIMIT_ANONYMOUS"] == "120 per minute"
    assert defaults["TASK_QUOTA"] == 50_000 and defaults["TRUSTED_PROXY_HOPS"] == 0

    config = load_config({"RATELIMIT_ENABLED": "false", "REDIS_URL": "redis://cache:6379/2", "TASK_QUOTA": "10",
                          "RATELIMIT_APPLICATION": "10/second; 500/hour", "TRUSTED_PROXY_HOPS": "2",
                          "RATELIMIT_HEADERS_ENABLED": "0", "RATELIMIT_STRATEGY": "moving-window"})
    assert config["RATELIMIT_ENABLED"] is False and config["RATELIMIT_HEADERS_ENABLED"] is False
    assert config["RATELIMIT_STORAGE_URI"] == "redis://cache:6379/2"
    assert config["RATELIMIT_STORAGE_OPTIONS"] == {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}
    assert config["RATELIMIT_APPLICATION"] == "10/second; 500/hour" and config["RATELIMIT_STRATEGY"] == "moving-window"
    assert config["TASK_QUOTA"] == 10 and config["TRUSTED_PROXY_HOPS"] == 2
    explicit = load_config({"REDIS_URL": "redis://cache/0", "RATELIMIT_STORAGE_URI": "redis://limits/1"})
    assert explicit["RATELIMIT_STORAGE_URI"] == "redis://limits/1"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RATELIMIT_ENABLED", "maybe"),
        ("RATELIMIT_APPLICATION", "lots"),
        ("RATELIMIT_ANONYMOUS", "10 per fortnight"),
        ("RATELIMIT_STRATEGY", "leaky-bucket"),
        ("REDIS_URL", "memcached://cache:11211"),
        ("TASK_QUOTA", "0"),
        ("TRUSTED_PROXY_HOPS", "-1"),
    ],
)
def test_a_bad_limit_setting_stops_start_up_naming_it(name, value):
    with pytest.raises(ConfigError, match=f"^{name}"):
        load_config({name: value})


# The task quota


def test_a_user_at_the_quota_gets_409_with_the_envelope_until_a_task_is_deleted(database_url):
    app = create_app(make_config(database_url, TASK_QUOTA=3))
    try:
        with rolled_back(app):
            client = app.test_client()
            alice = bearer(make_token("alice"))
            created = [client.post("/api/alice/tasks", json={"title": f"t{n}"}, headers=alice) for n in range(3)]
            assert statuses(created) == [201] * 3
            refused = client.post("/api/alice/tasks", json={"title": "one too many"}, headers=alice)
            assert_error(refused, 409, {
                "detail": "Task quota reached: a user may hold at most 3 tasks; delete some to add more"})
            assert client.get("/api/alice/tasks", headers=alice).headers["X-Total-Count"] == "3"
            assert client.post("/api/bob/tasks", json={"title": "bob's"},
                               headers=bearer(make_token("bob"))).status_code == 201

            assert client.delete(created[0].headers["Location"], headers=alice).status_code == 204
            assert client.post("/api/alice/tasks", json={"title": "fits again"}, headers=alice).status_code == 201
    finally:
        app.extensions["db"].engine.dispose()


def test_the_quota_reads_the_users_count_row_rather_than_counting_tasks(app, client):
    session = app.extensions["db"].sessionmaker()
    try:
        session.execute(text("INSERT INTO task_counts (user_id, total) VALUES ('alice', :quota)"),
                        {"quota": app.config["TASK_QUOTA"]})
        session.commit()
    finally:
        session.close()
    response = client.post("/api/alice/tasks", json={"title": "x"}, headers=bearer(make_token("alice")))
    assert response.status_code == 409  # alice holds no task row: only task_counts says she is full


def test_concurrent_creates_never_overshoot_the_quota(database_url):
    """Committed creates from 16 threads at once, 3 rounds: exactly the quota is stored, the rest get 409."""
    quota, writers = 5, 16
    app = create_app(make_config(database_url, TASK_QUOTA=quota, DB_POOL_SIZE=writers, DB_MAX_OVERFLOW=0))
    user = f"quota-race-{uuid.uuid4().hex[:12]}"
    headers = bearer(make_token(user))
    engine = create_engine(database_url)
    try:
        for _ in range(3):
            start = threading.Barrier(writers, timeout=10)

            def create(barrier: threading.Barrier) -> int:
                client = app.test_client()
                barrier.wait()
                return client.post(f"/api/{user}/tasks", json={"title": "race"}, headers=headers).status_code

            with ThreadPoolExecutor(writers) as pool:
                answers = list(pool.map(create, [start] * writers))
            assert sorted(answers) == [201] * quota + [409] * (writers - quota)
            with engine.connect() as connection:
                stored = connection.scalar(select(func.count()).select_from(Task).where(Task.user_id == user))
                counted = connection.scalar(select(TaskCount.total).where(TaskCount.user_id == user))
            assert stored == counted == quota
            with engine.begin() as connection:
                connection.execute(delete(Task).where(Task.user_id == user))
    finally:
        with engine.begin() as connection:
            connection.execute(delete(Task).where(Task.user_id == user))
            connection.execute(delete(TaskCount).where(TaskCount.user_id == user))
        engine.dispose()
        app.extensions["db"].engine.dispose()


def test_post_documents_the_quota_409_in_openapi(client):
    responses = client.get("/openapi.json").json["paths"]["/api/{user_id}/tasks"]["post"]["responses"]
    assert responses["409"]["description"] == "The user's task quota (TASK_QUOTA) is reached"
    assert responses["409"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}

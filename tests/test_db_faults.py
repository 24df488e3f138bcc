"""Database faults against the real server: gunicorn with gunicorn.conf.py and a real PostgreSQL, over loopback.

- PostgreSQL stopped, and a TCP proxy that blackholes, drops or refuses: fast 503s with Retry-After, never a hang,
  /health/ready 503, and service back with no restart when the database is;
- every app connection terminated (what Neon's suspend does) under concurrent load: the next requests succeed;
- a request whose transaction fails halfway (after two writes, or killed mid-request) leaves nothing behind;
- in process: a connection lost between a read's last statement and its check-in costs nothing, and the
  process-wide psycopg2 wait callback keeps other connections' connect_timeout.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from todo_api.cli import alembic_config

from .fault_injection import BLACKHOLE, DROP, FORWARD, REFUSE, RestartablePostgres, TcpProxy, scratch_database
from .helpers import make_token
from .live_server import KeepAliveClient, LiveServer, call, live_server, server_env

pytestmark = pytest.mark.slow

# Short server-side timeouts, so that the client-side deadline (statement timeout + connect timeout) is 4 s.
CONNECT_TIMEOUT = 2
STATEMENT_TIMEOUT_MS = 2000
IO_DEADLINE = STATEMENT_TIMEOUT_MS / 1000 + CONNECT_TIMEOUT
SLACK = 1.5  # seconds for scheduling on a loaded 2-core machine
FAIL_FAST = 2.0  # seconds to a 503 once a process knows the database is unreachable, and to recovery after
FAULT_ENV = {
    "DB_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
    "DB_STATEMENT_TIMEOUT_MS": str(STATEMENT_TIMEOUT_MS),
    "DB_POOL_TIMEOUT": "2",
    "WEB_CONCURRENCY": "2",
}
UNAVAILABLE = {"detail": "Database unavailable"}


def assert_unavailable(status: int, headers: dict[str, str], body: Any, what: str) -> None:
    assert status == 503, f"{what}: {status} {body}"
    assert body == UNAVAILABLE, f"{what}: {body}"
    assert headers.get("Content-Type", "").startswith("application/json"), f"{what}: {headers}"
    assert int(headers["Retry-After"]) > 0, f"{what}: {headers}"


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = function()
    return result, time.monotonic() - started


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until condition() held; fails after timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def faults_url(postgres_url: str) -> Iterator[str]:
    """A database of this module alone, at the schema's head, dropped at the end."""
    with scratch_database(postgres_url) as url:
        command.upgrade(alembic_config(url), "head")
        yield url


@pytest.fixture(scope="module")
def admin(faults_url: str) -> Iterator[Engine]:
    engine = create_engine(faults_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def task_ids_of(admin: Engine, user: str) -> set[str]:
    with admin.connect() as connection:
        rows = connection.execute(text("SELECT id FROM tasks WHERE user_id = :user"), {"user": user})
        return {str(row.id) for row in rows}


def task_ids_of_url(url: str, user: str) -> set[str]:
    engine = create_engine(url)
    try:
        return task_ids_of(engine, user)
    finally:
        engine.dispose()


def user_requests(base_url: str, user: str, task_id: str) -> dict[str, Callable[[], tuple[int, dict[str, str], Any]]]:
    """One request of each kind a client makes, by name."""
    token = make_token(user)
    tasks = f"{base_url}/api/{user}/tasks"
    return {
        "list": lambda: call("GET", tasks, token, timeout=30),
        "create": lambda: call("POST", tasks, token, {"title": "during the outage"}, timeout=30),
        "get": lambda: call("GET", f"{tasks}/{task_id}", token, timeout=30),
        "toggle": lambda: call("PATCH", f"{tasks}/{task_id}/complete", token, timeout=30),
        "ready": lambda: call("GET", f"{base_url}/health/ready", timeout=30),
    }


def test_stopped_postgres_gives_fast_503s_and_service_resumes_when_it_is_back(tmp_path):
    database = RestartablePostgres()
    try:
        command.upgrade(alembic_config(database.url), "head")
        with live_server(server_env(database.url, **FAULT_ENV), log_dir=tmp_path) as server:
            user = f"faults-{uuid.uuid4().hex[:8]}"
            status, _, task = call("POST", f"{server.base_url}/api/{user}/tasks", make_token(user), {"title": "kept"})
            assert status == 201, task
            requests = user_requests(server.base_url, user, task["id"])
            for _ in range(4):  # pooled connections in both workers
                assert requests["list"]()[0] == 200

            database.stop()
            slowest = 0.0
            for name, request in [*requests.items(), *requests.items()]:
                (status, headers, body), elapsed = timed(request)
                assert_unavailable(status, headers, body, name)
                slowest = max(slowest, elapsed)
            # Connection refused: no timeout is involved at all.
            assert slowest < 1 + SLACK, slowest
            print(f"PostgreSQL stopped: slowest 503 in {slowest:.3f} s")

            starting = time.monotonic()
            database.start()
            ready = time.monotonic()
            first = wait_for(lambda: requests["list"]()[0] == 200, FAIL_FAST + SLACK, "a 200 after the restart")
            print(f"PostgreSQL restarted in {ready - starting:.3f} s; the API's first 200 "
                  f"{first:.3f} s after it accepted connections")
            # That was one worker's probe; each worker probes on its own, so only past the bound is every one back.
            time.sleep(max(0.0, ready + FAIL_FAST + SLACK - time.monotonic()))
            for _ in range(3):
                for name in ("list", "get", "toggle", "ready"):
                    status, _, body = requests[name]()
                    assert status == 200, (name, status, body)
            assert requests["create"]()[0] == 201
            assert task["id"] in task_ids_of_url(database.url, user)
    finally:
        database.close()


@contextmanager
def server_behind_a_proxy(faults_url: str, log_dir: Path) -> Iterator[tuple[TcpProxy, Any, str, dict[str, Any]]]:
    """gunicorn on faults_url through a TcpProxy: (proxy, a user's task, the user, that user's requests by kind)."""
    upstream = make_url(faults_url)
    with TcpProxy(upstream.host or "127.0.0.1", upstream.port or 5432) as proxy:
        url = upstream.set(port=proxy.port).render_as_string(hide_password=False)
        with live_server(server_env(url, **FAULT_ENV), log_dir=log_dir) as server:
            user = f"faults-{uuid.uuid4().hex[:8]}"
            status, _, task = call("POST", f"{server.base_url}/api/{user}/tasks", make_token(user), {"title": "kept"})
            assert status == 201, task
            yield proxy, task, user, user_requests(server.base_url, user, task["id"])


def test_blackholed_dropped_or_refused_database_gives_bounded_503s_then_recovers(faults_url, admin, tmp_path):
    with server_behind_a_proxy(faults_url, tmp_path) as (proxy, task, user, requests):
        bounds = {
            # Pooled connections stall until the client-side deadline; new ones until the connect timeout.
            BLACKHOLE: IO_DEADLINE + SLACK,
            # Reset connections and a closed port fail at once.
            DROP: SLACK,
            REFUSE: SLACK,
        }
        for mode, bound in bounds.items():
            with ThreadPoolExecutor(max_workers=8) as pool:  # warm pooled connections in both workers
                assert set(pool.map(lambda _: requests["list"]()[0], range(8))) == {200}
            proxy.set_mode(mode)
            # All kinds, twice over, four at a time (a worker's threads): pooled and new connections. More at
            # once would also measure requests queueing for a worker thread.
            with ThreadPoolExecutor(max_workers=4) as pool:
                futures = {name: pool.submit(timed, request)
                           for name, request in [*requests.items(), *((n + "-2", r) for n, r in requests.items())]}
                results = {name: future.result() for name, future in futures.items()}
            for name, ((status, headers, body), elapsed) in results.items():
                assert_unavailable(status, headers, body, f"{mode} {name}")
                assert elapsed < bound, f"{mode} {name}: {elapsed:.2f} s"
            slowest = max(elapsed for _, elapsed in results.values())
            print(f"{mode}: slowest 503 in {slowest:.3f} s (bound {bound:.1f} s)")

            proxy.set_mode(FORWARD)
            back = time.monotonic()
            # Each worker's probe notices within FAIL_FAST; the worker serves every kind again from then on.
            wait_for(lambda: all(requests["list"]()[0] == 200 for _ in range(4)), FAIL_FAST + SLACK,
                     f"service after {mode}")
            for name, request in requests.items():
                status, _, body = request()
                assert status in (200, 201), (mode, name, status, body)
            print(f"{mode}: every kind of request succeeded again {time.monotonic() - back:.3f} s after it ended")
        assert task["id"] in task_ids_of(admin, user)


def test_once_the_database_is_known_unreachable_requests_fail_fast_and_service_resumes_by_itself(
    faults_url, tmp_path
):
    """Blackholed: the first requests of each worker wait out the timeouts; every later one gets 503 within 2 s
    instead of waiting too. When the database is back, requests succeed again within 2 s, with no restart."""
    with server_behind_a_proxy(faults_url, tmp_path) as (proxy, _task, _user, requests):
        proxy.set_mode(BLACKHOLE)
        learning = time.monotonic() + IO_DEADLINE + SLACK  # each worker learns it from its own first requests
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda _: requests["list"](), range(8)))
        assert time.monotonic() < learning + IO_DEADLINE, "the first requests were not bounded"
        later: list[float] = []
        for name in ("list", "get", "toggle", "create") * 4:
            (status, headers, body), elapsed = timed(requests[name])
            assert_unavailable(status, headers, body, f"blackholed {name}")
            later.append(elapsed)
        print(f"blackholed: later 503s took at most {max(later):.3f} s")
        assert max(later) < FAIL_FAST, later

        proxy.set_mode(FORWARD)
        back = time.monotonic()
        recovered = wait_for(lambda: requests["get"]()[0] == 200, FAIL_FAST + SLACK, "a 200 after the outage")
        # That was one worker's probe; each worker probes on its own, so only past the bound is every one back.
        time.sleep(max(0.0, back + FAIL_FAST + SLACK - time.monotonic()))
        for name, request in [*requests.items()] * 3:
            status, _, body = request()
            assert status in (200, 201), (name, status, body)
        print(f"back: first 200 after {recovered:.3f} s; all served {FAIL_FAST + SLACK:.1f} s after, on every worker")


@pytest.fixture(scope="module")
def named_server(faults_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    """A server whose connections carry an application_name of their own, so the test can find and kill them."""
    name = f"todo-api-faults-{uuid.uuid4().hex[:8]}"
    url = make_url(faults_url).update_query_dict({"application_name": name}).render_as_string(hide_password=False)
    with live_server(server_env(url, **FAULT_ENV), log_dir=tmp_path_factory.mktemp("named-server")) as server:
        yield server, name


def app_backends(admin: Engine, name: str) -> list[int]:
    with admin.connect() as connection:
        return list(connection.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE application_name = :name"), {"name": name}).scalars())


def terminate(admin: Engine, pids: list[int]) -> None:
    with admin.connect() as connection:
        connection.execute(text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:pids AS int[])) AS pid"),
                           {"pids": pids})


def test_terminating_every_app_connection_under_load_fails_no_later_request(named_server, admin):
    server, name = named_server
    user = f"faults-{uuid.uuid4().hex[:8]}"
    token = make_token(user)
    clients, seconds, kills = 6, 6.0, 3
    results: list[tuple[float, float, str, int, dict[str, str], Any]] = []
    kill_windows: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(index: int) -> None:
        http = KeepAliveClient(server.base_url, token)
        mine: list[str] = []
        try:
            for step in range(1_000_000):
                if stop.is_set():
                    return
                if not mine or step % 3 == 0:
                    method, path, body = "POST", f"/api/{user}/tasks", {"title": f"c{index} s{step}"}
                elif step % 3 == 1:
                    method, path, body = "PATCH", f"/api/{user}/tasks/{mine[-1]}/complete", None
                else:
                    method, path, body = "GET", f"/api/{user}/tasks?page_size=20", None
                started = time.monotonic()
                try:
                    status, headers, answer = http.request(method, path, body)
                except OSError as error:
                    status, headers, answer = 0, {}, repr(error)
                with lock:
                    results.append((started, time.monotonic(), method, status, headers, answer))
                if status == 201:
                    mine.append(answer["id"])
                time.sleep(0.005)
        finally:
            http.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(kills):
            time.sleep(seconds / (kills + 1))
            pids = app_backends(admin, name)
            began = time.monotonic()
            terminate(admin, pids)
            # Over once the backends have exited (the app then sees closed sockets).
            wait_for(lambda pids=pids: not set(pids) & set(app_backends(admin, name)), 5, "terminated backends")
            kill_windows.append((began, time.monotonic(), len(pids)))
        time.sleep(seconds / (kills + 1))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)

    killed = sum(count for _, _, count in kill_windows)
    failures = [r for r in results if r[3] >= 500 or r[3] == 0]
    print(f"{len(results)} requests, {kills} kills of {killed} connections in all, {len(failures)} failed in flight")
    assert killed >= kills and len(results) > 100, (killed, len(results))
    assert all(r[3] in (200, 201) for r in results if r not in failures), {r[3] for r in results}
    for started, ended, method, status, headers, body in failures:
        # Only a request whose statement was on a connection as it was killed may fail, and then with a 503.
        assert status == 503, (method, status, body)
        assert_unavailable(status, headers, body, method)
        assert any(started <= end + 0.05 and ended >= begin for begin, end, _ in kill_windows), (started, ended)
    # A killed connection can break at most the one request that was using it.
    assert len(failures) <= killed
    assert server.worker_pids() and len(server.worker_pids()) == 2


AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS task_audit (task_id uuid NOT NULL, title text NOT NULL);

-- The second write of every task write, in the same transaction; then, for marked titles, a failure or a stall.
CREATE OR REPLACE FUNCTION audit_task() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_audit (task_id, title) VALUES (NEW.id, NEW.title);
    IF NEW.title LIKE 'fail after audit%' THEN
        RAISE EXCEPTION 'injected failure after the audit row';
    END IF;
    IF NEW.title LIKE 'stall after audit%' THEN
        PERFORM pg_sleep(60);
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER tasks_audit AFTER INSERT OR UPDATE ON tasks
    FOR EACH ROW EXECUTE FUNCTION audit_task();

-- Checked at COMMIT, after both writes succeeded.
CREATE OR REPLACE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.title LIKE 'fail at commit%' THEN
        RAISE EXCEPTION 'injected failure at commit';
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS tasks_fail_at_commit ON tasks;
CREATE CONSTRAINT TRIGGER tasks_fail_at_commit AFTER INSERT OR UPDATE ON tasks
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_at_commit();
"""


def test_a_request_that_fails_halfway_leaves_nothing_behind(named_server, admin):
    server, name = named_server
    raw = admin.raw_connection()
    try:
        with raw.cursor() as cursor:
            cursor.execute(AUDIT_SQL)
    finally:
        raw.close()
    user = f"faults-{uuid.uuid4().hex[:8]}"
    http = KeepAliveClient(server.base_url, make_token(user), timeout=30)
    tasks = f"/api/{user}/tasks"

    def stored() -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        with admin.connect() as connection:
            rows = connection.execute(text(
                "SELECT id, title, status, priority, completed_at, updated_at FROM tasks WHERE user_id = :user "
                "ORDER BY created_at"), {"user": user}).mappings().all()
            audit = connection.execute(text(
                "SELECT task_id, title FROM task_audit WHERE task_id IN (SELECT id FROM tasks WHERE user_id = :user) "
                "OR title LIKE :marker ORDER BY title"), {"user": user, "marker": f"% {user}"}).all()
        return [dict(row) for row in rows], [(str(a), b) for a, b in audit]

    status, _, task = http.request("POST", tasks, {"title": "before", "priority": "low"})
    assert status == 201, task
    before = stored()
    assert len(before[0]) == 1 and before[1] == [(task["id"], "before")]

    internal_error = {"detail": "Internal server error"}
    # 1. The trigger's audit row is written, then the statement fails: 500 and neither row.
    status, _, body = http.request("POST", tasks, {"title": f"fail after audit {user}"})
    assert (status, body) == (500, internal_error)
    # 2. Both writes succeed and COMMIT fails.
    status, _, body = http.request("POST", tasks, {"title": f"fail at commit {user}"})
    assert (status, body) == (500, internal_error)
    # 3. An update of several fields (a locked read, then the write) that fails after its audit row.
    etag = http.request("GET", f"{tasks}/{task['id']}")[1]["ETag"]
    changes = {"title": f"fail after audit {user}", "completed": True, "priority": "high"}
    status, _, body = http.request("PATCH", f"{tasks}/{task['id']}", changes, headers={"If-Match": etag})
    assert (status, body) == (500, internal_error)
    # 4. A statement that outlives statement_timeout: 503, and the server rolled it back.
    stall = {"title": f"stall after audit {user}"}
    (status, headers, body), elapsed = timed(lambda: http.request("POST", tasks, stall))
    assert_unavailable(status, headers, body, "statement timeout")
    assert elapsed < STATEMENT_TIMEOUT_MS / 1000 + SLACK, elapsed
    assert stored() == before

    # 5. The connection killed mid-request, between the audit row and the end of the statement.
    def sleeping_backends() -> list[int]:
        with admin.connect() as connection:
            return list(connection.execute(text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = :name AND wait_event = 'PgSleep'"),
                {"name": name}).scalars())

    def kill_when_sleeping() -> int:
        wait_for(lambda: bool(sleeping_backends()), STATEMENT_TIMEOUT_MS / 1000, "a request in the trigger's sleep")
        pids = sleeping_backends()
        terminate(admin, pids)
        return len(pids)

    with ThreadPoolExecutor(max_workers=1) as pool:
        killer = pool.submit(kill_when_sleeping)
        status, headers, body = http.request("POST", tasks, {"title": f"stall after audit, killed {user}"})
        assert killer.result() == 1
    assert_unavailable(status, headers, body, "killed mid-request")

    assert stored() == before, "a failed request left something behind"
    # The same connections serve the next requests: nothing half-done is left on them either.
    for index in range(6):
        status, _, created = http.request("POST", tasks, {"title": f"after {index}"})
        assert status == 201, created
    status, _, body = http.request("GET", f"{tasks}/{task['id']}")
    assert status == 200 and body["title"] == "before" and body["completed"] is False and body["priority"] == "low"
    rows, audit = stored()
    assert [row["title"] for row in rows] == ["before", *(f"after {i}" for i in range(6))]
    assert sorted(title for _, title in audit) == sorted(row["title"] for row in rows)
    assert rows[0]["updated_at"] == before[0][0]["updated_at"]
    http.close()


def test_other_psycopg2_connections_in_the_process_keep_libpq_connect_timeout(faults_url):
    """The app's wait callback is process-wide; connections it did not make (migrations, scripts) keep their
    connect_timeout, which libpq itself ignores once a callback is installed."""
    import psycopg2

    from todo_api.deadlines import install_wait_callback, wait_with_deadline

    install_wait_callback()
    assert psycopg2.extensions.get_wait_callback() is wait_with_deadline
    upstream = make_url(faults_url)
    with TcpProxy(upstream.host or "127.0.0.1", upstream.port or 5432) as proxy:
        dsn = f"host=127.0.0.1 port={proxy.port} user={upstream.username} dbname={upstream.database} connect_timeout=2"
        connection = psycopg2.connect(dsn)
        with connection.cursor() as cursor:  # no deadline on statements: this one outlasts connect_timeout
            cursor.execute("SELECT pg_sleep(2.2)")
        connection.close()
        proxy.set_mode(BLACKHOLE)
        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError, match="no answer within 2 s while connecting"):
            psycopg2.connect(dsn)
        assert 2 <= time.monotonic() - started < 2 + SLACK


def test_a_connection_lost_after_a_reads_last_statement_neither_fails_it_nor_leaks_its_pool_slot(faults_url, admin):
    """Reads run in autocommit and the pool restores the isolation level at check-in. That must not need the server:
    a connection it lost in between (terminated, network gone) once turned the finished 200 into gunicorn's HTML
    500 and kept its pool slot forever, so a worker served only 503s after pool_size + max_overflow such losses."""
    from flask import g

    from todo_api import create_app

    from .helpers import bearer, make_config

    app = create_app(make_config(faults_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=1))
    lose_connection = threading.Event()

    @app.teardown_appcontext  # runs before the session's own teardown, which was registered first
    def terminate_the_requests_connection(_exc: BaseException | None) -> None:
        if lose_connection.is_set() and ("db_session" in g or "db_hot" in g):
            # The page of tasks is read on the hot path's connection (db.HotConnection), other reads by a session.
            pooled = g.db_hot.connection if "db_hot" in g else g.db_session.connection().connection
            pid = pooled.dbapi_connection.get_backend_pid()
            terminate(admin, [pid])
            with admin.connect() as connection:
                wait_for(lambda: not connection.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                                                        {"pid": pid}).scalar(), 5, "the backend to exit")

    user = f"faults-{uuid.uuid4().hex[:8]}"
    client, headers = app.test_client(), bearer(make_token(user))
    try:
        for _ in range(2):  # a write, then reads: the connection has been switched both ways before
            assert client.post(f"/api/{user}/tasks", json={"title": "x"}, headers=headers).status_code == 201
            assert client.get(f"/api/{user}/tasks", headers=headers).status_code == 200
        lose_connection.set()
        for _ in range(3):  # more than the pool holds
            response = client.get(f"/api/{user}/tasks", headers=headers)
            assert response.status_code == 200 and len(response.json) == 2
        lose_connection.clear()
        for _ in range(3):
            assert client.get(f"/api/{user}/tasks", headers=headers).status_code == 200
            assert client.post(f"/api/{user}/tasks", json={"title": "y"}, headers=headers).status_code == 201
    finally:
        app.extensions["db"].engine.dispose()

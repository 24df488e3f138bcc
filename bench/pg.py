"""PostgreSQL for the bench: find or start a server, create the bench's own databases, migrate and seed them."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy.engine import URL, make_url

from todo_api.config import normalize_database_url
from todo_api.embedded_postgres import port_open, throwaway

ROOT = Path(__file__).resolve().parent.parent
# BENCH_DATABASE_PREFIX (e.g. "alice_") keeps several people's benches on one PostgreSQL server apart: it prefixes
# the names of the databases the bench creates, todo_bench and seed_stack.
DATABASE_PREFIX = os.environ.get("BENCH_DATABASE_PREFIX", "").strip()
BENCH_DATABASE = DATABASE_PREFIX + "todo_bench"
SEED_STACK_DATABASE = DATABASE_PREFIX + "seed_stack"
LOCAL_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
# Titles of the tasks the create scenarios add; deleted after each round so every round sees the same data.
CREATED_TITLES = "bench-create%"


@dataclass(frozen=True)
class Postgres:
    """A server and the database the bench uses on it."""

    url: URL  # the bench database
    source: str  # where the server came from, for the report

    def database(self, name: str) -> URL:
        return self.url.set(database=name)


def start_postgres(stack: ExitStack) -> Postgres:
    """BENCH_DATABASE_URL as given, else TEST_DATABASE_URL's server, else 127.0.0.1:5432, else an embedded one."""
    if os.environ.get("BENCH_DATABASE_URL"):
        return Postgres(make_url(normalize_database_url(os.environ["BENCH_DATABASE_URL"])), "BENCH_DATABASE_URL")
    if os.environ.get("TEST_DATABASE_URL"):
        server = make_url(normalize_database_url(os.environ["TEST_DATABASE_URL"]))
        return Postgres(server.set(database=BENCH_DATABASE), "TEST_DATABASE_URL's server")
    if port_open("127.0.0.1", 5432):
        return Postgres(make_url(LOCAL_SERVER).set(database=BENCH_DATABASE), "local 127.0.0.1:5432")

    print("No PostgreSQL on 127.0.0.1:5432: starting an embedded one (fsync off).", flush=True)
    server = stack.enter_context(throwaway(BENCH_DATABASE))
    return Postgres(make_url(server.url(BENCH_DATABASE)), "embedded (todo_api/embedded_postgres.py)")


def libpq_url(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def execute(url: URL, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """One statement in autocommit (VACUUM and CREATE DATABASE need it); returns its rows, if any."""
    connection = psycopg2.connect(libpq_url(url))
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql, params or None)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def ensure_database(url: URL) -> None:
    maintenance = url.set(database="postgres")
    if not execute(maintenance, "SELECT 1 FROM pg_database WHERE datname = %s", url.database):
        execute(maintenance, f'CREATE DATABASE "{url.database}"')


def task_counts(url: URL, table: str, users: list[str]) -> dict[str, int]:
    if not execute(url, "SELECT to_regclass(%s)", table)[0][0]:
        return {}
    rows = execute(url, f"SELECT user_id, count(*) FROM {table} GROUP BY user_id")
    return {user: count for user, count in rows}


def delete_created(url: URL, table: str) -> None:
    """Drop the rows the create scenarios added, then vacuum as autovacuum would."""
    execute(url, f"DELETE FROM {table} WHERE title LIKE %s", CREATED_TITLES)
    execute(url, f"VACUUM ANALYZE {table}")


def app_env(url: URL | None, secret: str) -> dict[str, str]:
    """The environment for the app's CLI and servers: production, this database, nothing inherited that redirects it."""
    env = {key: value for key, value in os.environ.items() if key not in INHERITED_APP_VARIABLES}
    env.update(APP_ENV="production", BETTER_AUTH_SECRET=secret, LOG_LEVEL="WARNING", RATELIMIT_ENABLED="false")
    if url is not None:
        env["DATABASE_URL"] = url.render_as_string(hide_password=False)
    return env


# Variables of the developer's shell that would point the app elsewhere or change how gunicorn binds.
INHERITED_APP_VARIABLES = frozenset({
    "APP_ENV", "DATABASE_URL", "MIGRATIONS_DATABASE_URL", "BETTER_AUTH_SECRET", "BETTER_AUTH_URL",
    "BETTER_AUTH_JWKS_URL", "JWT_ISSUER", "JWT_AUDIENCE", "LOG_LEVEL", "GUNICORN_CMD_ARGS", "PORT",
    "GUNICORN_ACCESS_LOG",
})


def flask(env: dict[str, str], *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"flask {' '.join(args)} failed:\n{result.stderr[-2000:]}")


def prepare_todo_database(url: URL, secret: str, users: list[str], per_user: int) -> None:
    """Create, migrate and seed the bench database; users whose task count is already right are kept."""
    ensure_database(url)
    env = app_env(url, secret)
    flask(env, "db", "upgrade")
    execute(url, "DELETE FROM tasks WHERE title LIKE %s", CREATED_TITLES)  # left by an interrupted run
    counts = task_counts(url, "tasks", users)
    stale = [user for user in users if counts.get(user) != per_user]
    for index, user in enumerate(users, start=1):
        if user in stale:
            print(f"Seeding {user}: {per_user} tasks", flush=True)
            execute(url, "DELETE FROM tasks WHERE user_id = %s", user)
            flask(env, "seed", "--user", user, "--count", str(per_user), "--random-seed", str(index))
    execute(url, "VACUUM ANALYZE tasks")


def seed_stack_spec(url: URL) -> str:
    """The seed stack's SEED_STACK_DB form: user[:password]@host:port/db."""
    return libpq_url(url).split("://", 1)[1]


def prepare_seed_stack_database(url: URL, run_sh: Path, env: dict[str, str], users: list[str],
                                per_user: int) -> None:
    """Seed the peer's table with `run.sh seed` unless it already holds exactly users x per_user tasks."""
    ensure_database(url)
    if execute(url, "SELECT to_regclass('seed_tasks')")[0][0]:
        execute(url, "DELETE FROM seed_tasks WHERE title LIKE %s", CREATED_TITLES)
    if task_counts(url, "seed_tasks", users) != {user: per_user for user in users}:
        print(f"Seeding the seed stack: {len(users)} x {per_user} tasks", flush=True)
        subprocess.run([str(run_sh), "seed", str(len(users)), str(per_user)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    execute(url, "VACUUM ANALYZE seed_tasks")

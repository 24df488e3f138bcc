"""CPU per request in process, through the WSGI app against a real PostgreSQL: GET one task, the unfiltered page of 50,
the toggle, and a bare Flask "hello" for reference (bench/hello.py, the wrk ceiling's app).

    TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test_fast .venv/bin/python -m bench.inprocess
    ... -m bench.inprocess --compare main      # this tree against a git revision, in alternating processes
    ... -m bench.inprocess --profile get_one   # cProfile (CPU clock) of one scenario, by cumulative and own time

BENCH_DATABASE_URL (default: TEST_DATABASE_URL with "_inprocess" appended to its name) is created if missing,
migrated and seeded once with 2 users x 10,000 tasks (todo_api.cli's seed rows), kept between runs; the toggles
flip tasks of the second user, whose pages are not read.

Each request calls app.wsgi_app(environ, start_response) directly, as gunicorn does, with a prebuilt environ: the
Flask test client would add its own cost to the figures. The scenarios take turns in blocks of BLOCK requests, so
the machine's drift hits them alike; CPU is this process's time.process_time() per request (PostgreSQL's own CPU is
not in it). Printed: the median and the best of the blocks, in µs. On a shared machine the best is the least
disturbed. With --compare REV the tree of REV (git archive) and this tree measure in separate processes, taking
turns ROUNDS times, and the ratio of their medians is printed: compare within one run, never across runs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
USERS = ("bench-inprocess-1", "bench-inprocess-2")
PER_USER = 10_000
BLOCK = 100
BLOCKS = 15  # per scenario and process
ROUNDS = 4  # processes per tree with --compare
TOGGLED_TASKS = 50
SCENARIOS = ("get_one", "page", "toggle", "hello")


def database_url() -> str:
    if os.environ.get("BENCH_DATABASE_URL"):
        return os.environ["BENCH_DATABASE_URL"]
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        sys.exit("set TEST_DATABASE_URL (or BENCH_DATABASE_URL)")
    return f"{base}_inprocess"


def prepare_database(url: str) -> None:
    """Create, migrate and seed the database unless it already holds the users' tasks."""
    from alembic import command
    from sqlalchemy import create_engine, insert, select, text
    from sqlalchemy.engine import make_url

    from todo_api.cli import _seed_rows, alembic_config
    from todo_api.config import normalize_database_url
    from todo_api.models import Task, TaskCount

    url = normalize_database_url(url)
    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        if not connection.scalar(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": target.database}):
            connection.execute(text(f'CREATE DATABASE "{target.database}"'))
    admin.dispose()
    command.upgrade(alembic_config(url), "head")
    engine = create_engine(url)
    import random

    with engine.begin() as connection:
        counts = dict(connection.execute(select(TaskCount.user_id, TaskCount.total)).all())
        for index, user in enumerate(USERS, start=1):
            if counts.get(user) != PER_USER:
                print(f"seeding {user}: {PER_USER} tasks", file=sys.stderr)
                connection.execute(Task.__table__.delete().where(Task.user_id == user))
                connection.execute(insert(Task.__table__), _seed_rows(user, PER_USER, random.Random(index)))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE tasks"))
    engine.dispose()


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
    _start_response.status = status  # type: ignore[attr-defined]
    return lambda _data: None


def call(app: Callable[..., Iterable[bytes]], environ: dict[str, Any]) -> bytes:
    """One request through a WSGI app, as a server would: the body consumed and the iterable closed."""
    env = dict(environ)
    env["wsgi.input"] = io.BytesIO(b"")
    result = app(env, _start_response)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return body


def environ(method: str, path: str, query: str = "", headers: dict[str, str] | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000", "HTTP_HOST": "127.0.0.1:8000", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
        "HTTP_USER_AGENT": "wrk", "HTTP_ACCEPT": "*/*",
    }
    for name, value in (headers or {}).items():
        env[f"HTTP_{name.upper().replace('-', '_')}"] = value
    return env


def scenarios(url: str) -> dict[str, Callable[[], bytes]]:
    """Each scenario as a function making one request (checked once here)."""
    from sqlalchemy import create_engine, select

    from bench.hello import app as hello_app
    from tests.helpers import bearer, make_config, make_token
    from todo_api import create_app
    from todo_api.config import normalize_database_url
    from todo_api.models import Task

    url = normalize_database_url(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        def ids(user: str, count: int) -> list[str]:
            query = select(Task.id).where(Task.user_id == user).order_by(Task.created_at.desc()).limit(count)
            return [str(task_id) for task_id in connection.scalars(query)]

        read_id = ids(USERS[0], 1)[0]
        toggled = ids(USERS[1], TOGGLED_TASKS)
    engine.dispose()
    app = create_app(make_config(url, LOG_LEVEL="WARNING"))
    reader = bearer(make_token(USERS[0], ttl=86400))
    writer = bearer(make_token(USERS[1], ttl=86400))
    get_one = environ("GET", f"/api/{USERS[0]}/tasks/{read_id}", headers=reader)
    page = environ("GET", f"/api/{USERS[0]}/tasks", "page_size=50", headers=reader)
    toggles = [environ("PATCH", f"/api/{USERS[1]}/tasks/{task_id}/complete", headers=writer) for task_id in toggled]
    hello = environ("GET", "/")
    turn = iter(range(1 << 62))

    def toggle() -> bytes:
        return call(app.wsgi_app, toggles[next(turn) % len(toggles)])

    made: dict[str, Callable[[], bytes]] = {
        "get_one": lambda: call(app.wsgi_app, get_one),
        "page": lambda: call(app.wsgi_app, page),
        "toggle": toggle,
        "hello": lambda: call(hello_app.wsgi_app, hello),
    }
    for name, make in made.items():
        body = make()
        assert _start_response.status.startswith("200"), (name, _start_response.status, body[:300])  # type: ignore[attr-defined]
    assert len(json.loads(made["page"]())) == 50
    return made


def measure(made: dict[str, Callable[[], bytes]], blocks: int = BLOCKS) -> dict[str, list[float]]:
    """CPU µs per request of each block, scenarios taking turns."""
    for make in made.values():  # warm up: pool, token cache, SQLAlchemy's caches
        for _ in range(BLOCK):
            make()
    cpu: dict[str, list[float]] = {name: [] for name in made}
    for _ in range(blocks):
        for name, make in made.items():
            started = time.process_time()
            for _ in range(BLOCK):
                make()
            cpu[name].append((time.process_time() - started) / BLOCK * 1e6)
    return cpu


def print_table(results: dict[str, dict[str, list[float]]]) -> None:
    """One row per scenario: median and best block of each tree, and the ratio of medians to the first tree."""
    trees = list(results)
    header = "".join(f"{tree + ' median':>22}{'best':>8}" for tree in trees)
    print(f"{'CPU us/request':16}{header}{'  ratio' if len(trees) > 1 else ''}")
    for name in SCENARIOS:
        cells, medians = [], []
        for tree in trees:
            values = results[tree][name]
            medians.append(statistics.median(values))
            cells.append(f"{medians[-1]:22.0f}{min(values):8.0f}")
        ratio = f"  {medians[-1] / medians[0]:.2f}" if len(trees) > 1 else ""
        print(f"{name:16}{''.join(cells)}{ratio}")


def profile(made: dict[str, Callable[[], bytes]], name: str, requests: int = 2000) -> None:
    make = made[name]
    for _ in range(BLOCK):
        make()
    profiler = cProfile.Profile(time.process_time)  # CPU time, as measured: waits for PostgreSQL are not in it
    profiler.enable()
    for _ in range(requests):
        make()
    profiler.disable()
    for order in ("cumulative", "tottime"):
        stats = pstats.Stats(profiler).sort_stats(order)
        stats.print_stats(40)


def compare(revision: str, rounds: int, blocks: int) -> None:
    """This tree and `revision`'s, in separate processes taking turns; each process measures every scenario."""
    with tempfile.TemporaryDirectory(prefix="inprocess-") as other:
        archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", other], input=archive, check=True)
        trees = {revision: Path(other), "this tree": ROOT}
        results: dict[str, dict[str, list[float]]] = {tree: {name: [] for name in SCENARIOS} for tree in trees}
        for round_ in range(rounds):
            for tree, path in trees.items():
                worker = subprocess.run(
                    [sys.executable, "-m", "bench.inprocess", "--json", "--blocks", str(blocks)], cwd=path,
                    check=True, capture_output=True, text=True,
                    env={**os.environ, "PYTHONPATH": str(path), "BENCH_DATABASE_URL": database_url()},
                )
                for name, values in json.loads(worker.stdout).items():
                    results[tree][name].extend(values)
            print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)
    print(f"{rounds} processes per tree, {blocks} blocks of {BLOCK} requests per scenario and process")
    print_table(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="REV", help="also measure this git revision, alternating processes")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="processes per tree with --compare")
    parser.add_argument("--blocks", type=int, default=BLOCKS, help="blocks per scenario")
    parser.add_argument("--profile", choices=SCENARIOS, help="print a cProfile of this scenario instead")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # --compare's worker processes
    args = parser.parse_args(argv)
    url = database_url()
    if args.compare:
        prepare_database(url)
        compare(args.compare, args.rounds, args.blocks)
        return
    if not args.json:
        prepare_database(url)
    made = scenarios(url)
    if args.profile:
        profile(made, args.profile)
        return
    results = measure(made, args.blocks)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{args.blocks} blocks of {BLOCK} requests per scenario")
        print_table({"": results})


if __name__ == "__main__":
    main()

"""Benchmark todo-api over HTTP with wrk, optionally against the seed stack; see bench/README.md.

    .venv/bin/python -m bench.run [--quick] [--compare-seed-stack] [--duration S] [--rounds N] [--target URL]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import runpy
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from todo_api.cli import TITLE_OBJECTS, TITLE_VERBS

from . import pg, report
from .load import Load, Measurement, ensure_wrk, fetch_task_ids, make_token, measurement, run_wrk, write_lua_data
from .servers import SEED_STACK_RUN, Server, start_gunicorn, start_seed_stack

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SCENARIOS = ("get_one", "page", "search", "create", "update", "toggle", "mix")
SEED_IGNORES_FILTERS = {"search"}  # the seed stack ignores unknown query parameters: not comparable
PAUSE_BETWEEN_RUNS = 0.5  # seconds for closed connections to drain
FIXED_RATE_METHOD = ("wrk + Lua delay(): one connection per wrk thread, each on a fixed schedule, latency counted "
                     "from the scheduled send when the connection is behind (coordinated omission corrected)")


@dataclass
class Target:
    """A server under load, the data file its scenario scripts read, and how to undo its round's writes."""

    name: str
    url: str
    scenarios: list[str]
    data: Path
    cleanup: Callable[[], None] | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make bench BENCH_ARGS=...", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 5; --quick 1)")
    parser.add_argument("--rounds", type=int, help="rounds, each measuring every server once (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 s runs, 1 round")
    parser.add_argument("--compare-seed-stack", action="store_true", help="also measure ../shared/bench/seed_stack")
    parser.add_argument("--target", metavar="URL", help="drive this running server instead of starting the app "
                        "(tokens signed with --secret or BETTER_AUTH_SECRET; its users user1..userN)")
    parser.add_argument("--secret", help="HS256 secret (default: a random 48-character one)")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="the app's LOG_LEVEL (default WARNING; the app's own default is INFO)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--connections", type=int, default=64, help="connections at saturation (default 64)")
    parser.add_argument("--rate", type=float, default=200.0, help="fixed total rate in req/s (default 200)")
    parser.add_argument("--rate-connections", type=int, default=20, help="connections at the fixed rate (default 20)")
    parser.add_argument("--rate-limits", choices=("off", "memory", "redis"), default="off",
                        help="our rate limits: off (default), or on with counters in memory or in REDIS_URL's Redis "
                             "(default redis://127.0.0.1:6379/0), with limits too high to be reached: their cost")
    parser.add_argument("--users", type=int, default=20, help="users user1..userN (default 20)")
    parser.add_argument("--tasks-per-user", type=int, default=10_000, help="seeded tasks per user (default 10000)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.warm_up = 1 if args.quick else 2
    args.scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    if unknown := set(args.scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.compare_seed_stack and not (SEED_STACK_RUN.exists() and shutil.which("psql")):
        parser.error(f"--compare-seed-stack needs {SEED_STACK_RUN} and psql (Debian: postgresql-client)")
    if args.target and not (args.secret or os.environ.get("BETTER_AUTH_SECRET")):
        parser.error("--target needs --secret or BETTER_AUTH_SECRET: the server's HS256 secret")
    return args


def _secret(args: argparse.Namespace) -> str:
    if args.target:
        return args.secret or os.environ["BETTER_AUTH_SECRET"]
    return args.secret or secrets.token_urlsafe(36)  # 48 characters


def _users(args: argparse.Namespace) -> list[str]:
    return [f"user{index}" for index in range(1, args.users + 1)]


def _titles() -> list[str]:
    return [f"{verb} {thing}" for verb in TITLE_VERBS for thing in TITLE_OBJECTS]


def _write_data(path: Path, server: Server, tokens: dict[str, str], per_user: int) -> Path:
    rng = random.Random(42)
    users = {user: (token, fetch_task_ids(server.url, user, token, per_user, rng)) for user, token in tokens.items()}
    write_lua_data(path, users, _titles())
    return path


def start_ours(stack: ExitStack, args: argparse.Namespace, postgres: pg.Postgres | None, secret: str,
               logs: Path) -> tuple[Server, Callable[[], None] | None]:
    """The app under gunicorn on its seeded bench database, or the --target server as it is."""
    if args.target:
        return Server("ours", args.target.rstrip("/")), None
    assert postgres is not None
    pg.prepare_todo_database(postgres.url, secret, _users(args), args.tasks_per_user)
    env = {**pg.app_env(postgres.url, secret), "LOG_LEVEL": args.log_level, **rate_limit_env(args.rate_limits)}
    server = start_gunicorn(stack, "ours", "wsgi:app", env, logs / "ours.log", "/health")
    return server, partial(pg.delete_created, postgres.url, "tasks")


def rate_limit_env(mode: str) -> dict[str, str]:
    """Rate limiting as counted for real, with limits no bench reaches: the cost of the counting, not of 429s."""
    if mode == "off":
        return {"RATELIMIT_ENABLED": "false"}
    storage = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0") if mode == "redis" else "memory://"
    return {"RATELIMIT_ENABLED": "true", "RATELIMIT_STORAGE_URI": storage, "RATELIMIT_KEY_PREFIX": "todo-api-bench",
            "RATELIMIT_APPLICATION": "1000000000 per minute", "RATELIMIT_ANONYMOUS": "1000000000 per minute"}


def gunicorn_setting(name: str) -> object:
    """A value of gunicorn.conf.py as it resolves in this environment (WEB_CONCURRENCY, GUNICORN_THREADS...)."""
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))[name]


def start_seed(stack: ExitStack, args: argparse.Namespace, postgres: pg.Postgres,
               secret: str) -> tuple[Server, Callable[[], None]]:
    """The seed stack on its own database, seeded with the same users and counts, sharing our secret."""
    url = postgres.database("seed_stack")
    env = {**os.environ, "BETTER_AUTH_SECRET": secret, "SEED_STACK_DB": pg.seed_stack_spec(url),
           "SEED_STACK_WORKERS": str(gunicorn_setting("workers"))}  # as many processes as ours
    pg.prepare_seed_stack_database(url, SEED_STACK_RUN, env, _users(args), args.tasks_per_user)
    return start_seed_stack(stack, env), partial(pg.delete_created, url, "seed_tasks")


def set_up(stack: ExitStack, args: argparse.Namespace, work: Path, meta: dict[str, Any]) -> list[Target]:
    """Database, servers and data files; the hello ceiling first, then ours, then the seed stack."""
    secret = _secret(args)
    postgres = pg.start_postgres(stack) if not args.target or args.compare_seed_stack else None
    meta["database"] = postgres.source if postgres else None
    hello = start_gunicorn(stack, "hello", "bench.hello:app", pg.app_env(None, secret), work / "hello.log", "/")
    targets = [Target("hello", hello.url, ["hello"], _write_data(work / "hello.lua", hello, {}, 0))]
    tokens = {user: make_token(secret, user) for user in _users(args)}
    ours, cleanup = start_ours(stack, args, postgres, secret, work)
    data = _write_data(work / "ours.lua", ours, tokens, args.tasks_per_user)
    targets.append(Target("ours", ours.url, args.scenarios, data, cleanup))
    if args.compare_seed_stack:
        assert postgres is not None
        seed, cleanup = start_seed(stack, args, postgres, secret)
        scenarios = [name for name in args.scenarios if name not in SEED_IGNORES_FILTERS]
        targets.append(Target("seed", seed.url, scenarios, _write_data(work / "seed.lua", seed, tokens,
                                                                        args.tasks_per_user), cleanup))
    meta["targets"] = {target.name: target.url for target in targets}
    return targets


def _loads(args: argparse.Namespace) -> list[Load]:
    return [Load("saturation", args.duration, args.connections),
            Load("rate", args.duration, args.rate_connections, args.rate)]


def _print_run(run: Measurement, rounds: int) -> None:
    errors = sum(run.socket_errors.values())
    print(f"[{run.round}/{rounds}] {run.target:<5} {run.scenario:<8} {run.mode:<10} {run.rps:8.1f} req/s  "
          f"p50 {run.p50_ms} ms  p99 {run.p99_ms} ms  non-2xx {run.non_2xx}  socket errors {errors}"
          + (f"  late sends {run.late}" if run.late else ""), flush=True)


def run_rounds(targets: list[Target], args: argparse.Namespace, wrk_log: Path) -> list[Measurement]:
    """Rounds of hello, ours, seed (A B A B ...); each server warmed up, each round's writes undone after it."""
    measurements = []
    warm_up = Load("saturation", args.warm_up, args.connections)
    for round_ in range(1, args.rounds + 1):
        for target in targets:
            run_wrk(target.url, "hello" if target.name == "hello" else "mix", warm_up, target.data, wrk_log)
            for scenario in target.scenarios:
                for load in _loads(args) if target.name != "hello" else _loads(args)[:1]:
                    time.sleep(PAUSE_BETWEEN_RUNS)
                    raw = run_wrk(target.url, scenario, load, target.data, wrk_log)
                    measurements.append(measurement(raw, target.name, scenario, load, round_))
                    _print_run(measurements[-1], args.rounds)
            if target.cleanup:
                target.cleanup()
    return measurements


def _estimate_seconds(args: argparse.Namespace) -> float:
    runs_per_round = 1 + 2 * len(args.scenarios)
    if args.compare_seed_stack:
        runs_per_round += 2 * len(set(args.scenarios) - SEED_IGNORES_FILTERS)
    servers = 3 if args.compare_seed_stack else 2
    return args.rounds * (runs_per_round * (args.duration + 1) + servers * (args.warm_up + 2))


def _meta(args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {
        "started_at": stamp, "ours_label": "target" if args.target else "ours",
        "duration": args.duration, "rounds": args.rounds, "connections": args.connections,
        "rate": args.rate, "rate_connections": args.rate_connections, "fixed_rate_method": FIXED_RATE_METHOD,
        "users": args.users, "tasks_per_user": args.tasks_per_user, "log_level": args.log_level,
        "web_concurrency": gunicorn_setting("workers"),
        "gunicorn_threads": gunicorn_setting("threads"),
        "git_commit": commit.stdout.strip() or None, "wrk": (wrk.stdout or wrk.stderr).splitlines()[0],
        "cpus": os.cpu_count(), "python": platform.python_version(), "load_average_at_start": os.getloadavg(),
    }


def _server_log_counts(work: Path, meta: dict[str, Any]) -> None:
    """Worker boots (max_requests recycling shows here) and error lines in the gunicorn logs, for the report."""
    counts = {}
    for log in sorted(work.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        counts[log.stem] = {"worker_boots": sum("Booting worker" in line for line in lines),
                            "error_lines": sum("[ERROR]" in line or '"level": "ERROR"' in line for line in lines)}
    meta["server_logs"] = counts


def _print_notes(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    if args.target:
        print(f"Target {args.target}: its logging is its own; rows the create scenarios added ('bench-create ...') "
              "were not deleted.")
    else:
        print(f"App LOG_LEVEL={args.log_level} (INFO logs one JSON line per request); gunicorn's access log off, "
              "as gunicorn.conf.py has it.")
    boots = ", ".join(f"{name} {counts['worker_boots']}" for name, counts in meta["server_logs"].items())
    print(f"gunicorn worker boots (at start, then max_requests recycling): {boots}")
    print(f"Set-up {meta['setup_seconds']} s, total {meta['total_seconds']} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_wrk()
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    meta = _meta(args, stamp)
    print(f"bench: {args.rounds} round(s) of {args.duration} s runs, LOG_LEVEL={args.log_level}; "
          f"load estimate {_estimate_seconds(args) / 60:.1f} min after set-up", flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    wrk_log = RESULTS_DIR / f"bench-{stamp}-wrk.log"
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="todo-bench-")))
        stack.callback(_server_log_counts, work, meta)  # runs once the servers have stopped
        targets = set_up(stack, args, work, meta)
        meta["setup_seconds"] = round(time.monotonic() - started, 1)
        measurements = run_rounds(targets, args, wrk_log)
    meta["total_seconds"] = round(time.monotonic() - started, 1)
    meta["load_average_at_end"] = os.getloadavg()
    summary = report.summarize(measurements, args.scenarios, SEED_IGNORES_FILTERS if args.compare_seed_stack else set())
    json_path, png_path = RESULTS_DIR / f"bench-{stamp}.json", RESULTS_DIR / f"bench-{stamp}.png"
    report.write_json(json_path, meta, summary, measurements)
    report.write_chart(png_path, summary, args.scenarios, meta)
    print()
    print(report.format_tables(summary, args.scenarios, meta, args.compare_seed_stack))
    print()
    _print_notes(args, meta)
    print(f"Results: {json_path.relative_to(ROOT)}, {png_path.relative_to(ROOT)}, {wrk_log.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark todo-api over HTTP with wrk, optionally against the seed stack; see bench/README.md.

    .venv/bin/python -m bench.run [--quick] [--compare-seed-stack] [--duration S] [--rounds N] [--target URL]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import runpy
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from todo_api.cli import TITLE_OBJECTS, TITLE_VERBS

from . import pg, report
from .load import (
    WRK_TIMEOUT,
    Load,
    Measurement,
    ensure_wrk,
    fetch_task_ids,
    make_token,
    measurement,
    run_wrk,
    write_lua_data,
)
from .servers import OPENER, SEED_STACK_MODES, SEED_STACK_RUN, Server, launch_seed_stack, start_gunicorn

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SCENARIOS = ("get_one", "page", "search", "create", "update", "toggle", "mix")
SEED_IGNORES_FILTERS = {"search"}  # the seed stack ignores unknown query parameters: not comparable
# Scenarios also run with --many-connections (default 1,000) open at once: can a server hold them all?
MANY_CONNECTION_SCENARIOS = ("get_one", "mix")
# File descriptors beyond the connections themselves: wrk's and the servers' own files, sockets to PostgreSQL.
FD_MARGIN = 256
# How long a server may take to serve again after a run (the seed stack's pool waits up to 30 s for a connection).
RECOVERY_TIMEOUT = 120.0
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
    probe: tuple[str, dict[str, str]] | None = None  # a path and headers that answer 200 once the server serves
    # A server started for its own block of each round and stopped after it (the seed stack's variants): returns
    # the server and how to stop it. None: started once for the whole run.
    launch: Callable[[], tuple[Server, Callable[[], None]]] | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make bench BENCH_ARGS=...", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 5; --quick 1)")
    parser.add_argument("--rounds", type=int, help="rounds, each measuring every server once (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 s runs, 1 round")
    parser.add_argument("--compare-seed-stack", action="store_true", help="also measure ../shared/bench/seed_stack")
    parser.add_argument("--seed-modes", default=",".join(SEED_STACK_MODES),
                        help="the seed stack's variants with --compare-seed-stack, comma list (default sync,async)")
    parser.add_argument("--target", metavar="URL", help="drive this running server instead of starting the app "
                        "(tokens signed with --secret or BETTER_AUTH_SECRET; its users user1..userN)")
    parser.add_argument("--secret", help="HS256 secret (default: a random 48-character one)")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="the app's LOG_LEVEL (default WARNING; the app's own default is INFO)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--connections", type=int, default=64, help="connections at saturation (default 64)")
    parser.add_argument("--many-connections", type=int, default=1000,
                        help=f"connections of the extra {'/'.join(MANY_CONNECTION_SCENARIOS)} runs that check a "
                             "server holds them all (default 1000; 0 skips them)")
    parser.add_argument("--many-duration", type=int,
                        help=f"seconds of each --many-connections run (default 15, longer than wrk's --timeout "
                             f"{WRK_TIMEOUT}, so that a request left unanswered counts as a timeout; --quick 3)")
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
    args.many_duration = args.many_duration or (3 if args.quick else 15)
    args.scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    args.seed_modes = [name.strip() for name in args.seed_modes.split(",") if name.strip()]
    if unknown := set(args.seed_modes) - set(SEED_STACK_MODES):
        parser.error(f"unknown seed modes: {', '.join(sorted(unknown))}")
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


def seed_targets(args: argparse.Namespace, postgres: pg.Postgres, secret: str, work: Path,
                 tokens: dict[str, str], probe: tuple[str, dict[str, str]]) -> list[Target]:
    """The seed stack's variants on one database of their own, seeded once with the same users and counts as ours,
    sharing our secret; each variant's block ends by deleting the rows it created.

    Each variant runs only during its own block of a round: with the three servers' pools open at once (ours 4 x 5,
    each variant 4 x 10) PostgreSQL's default max_connections of 100 runs out, and a sync variant stuck after
    1,000 connections is replaced by a fresh one in the next round.
    """
    url = postgres.database(pg.SEED_STACK_DATABASE)
    env = {**os.environ, "BETTER_AUTH_SECRET": secret, "SEED_STACK_DB": pg.seed_stack_spec(url),
           "SEED_STACK_WORKERS": str(gunicorn_setting("workers"))}  # as many processes as ours
    pg.prepare_seed_stack_database(url, SEED_STACK_RUN, env, _users(args), args.tasks_per_user)
    cleanup = partial(pg.delete_created, url, "seed_tasks")
    scenarios = [name for name in args.scenarios if name not in SEED_IGNORES_FILTERS]
    targets = []
    for mode in args.seed_modes:
        launch = partial(launch_seed_stack, env, mode)
        seed, stop = launch()
        try:  # task ids once: the variants share the database, whose tasks the rounds leave in place
            data = _write_data(work / f"{seed.name}.lua", seed, tokens, args.tasks_per_user)
        finally:
            stop()
        targets.append(Target(seed.name, seed.url, scenarios, data, cleanup, probe, launch))
    return targets


def set_up(stack: ExitStack, args: argparse.Namespace, work: Path, meta: dict[str, Any]) -> list[Target]:
    """Database, servers and data files; the hello ceiling first, then ours, then the seed stack's variants."""
    secret = _secret(args)
    postgres = pg.start_postgres(stack) if not args.target or args.compare_seed_stack else None
    meta["database"] = postgres.source if postgres else None
    hello = start_gunicorn(stack, "hello", "bench.hello:app", pg.app_env(None, secret), work / "hello.log", "/")
    targets = [Target("hello", hello.url, ["hello"], _write_data(work / "hello.lua", hello, {}, 0), probe=("/", {}))]
    tokens = {user: make_token(secret, user) for user in _users(args)}
    user = _users(args)[0]
    probe = (f"/api/{user}/tasks?page_size=1", {"Authorization": f"Bearer {tokens[user]}"})
    ours, cleanup = start_ours(stack, args, postgres, secret, work)
    data = _write_data(work / "ours.lua", ours, tokens, args.tasks_per_user)
    targets.append(Target("ours", ours.url, args.scenarios, data, cleanup, probe))
    if args.compare_seed_stack:
        assert postgres is not None
        targets += seed_targets(args, postgres, secret, work, tokens, probe)
    meta["targets"] = {target.name: target.url for target in targets}
    return targets


def _runs(args: argparse.Namespace, target: Target) -> list[tuple[str, Load]]:
    """A server's block in a round: each scenario at saturation and at the fixed rate, then the runs with
    --many-connections, last, so that a server that collapses under them (the seed stack's sync variant does) has
    not spoilt its other figures; hello only at saturation."""
    saturation = Load("saturation", args.duration, args.connections)
    if target.name == "hello":
        return [(scenario, saturation) for scenario in target.scenarios]
    rate = Load("rate", args.duration, args.rate_connections, args.rate)
    runs = [(scenario, load) for scenario in target.scenarios for load in (saturation, rate)]
    if args.many_connections:
        many = Load("many", args.many_duration, args.many_connections)
        runs += [(scenario, many) for scenario in target.scenarios if scenario in MANY_CONNECTION_SCENARIOS]
    return runs


def wait_serving(target: Target, timeout: float = RECOVERY_TIMEOUT) -> float:
    """Seconds until the target answers its probe again: a server still busy with (or stuck on) the requests of the
    previous run would otherwise be measured in that state. Raises when it does not recover in time."""
    if target.probe is None:
        return 0.0
    url, headers = target.url + target.probe[0], target.probe[1]
    started = time.monotonic()
    while True:
        try:
            with OPENER.open(urllib.request.Request(url, headers=headers), timeout=5) as response:
                if response.status == 200:
                    return round(time.monotonic() - started, 1)
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{target.name} ({target.url}) has not answered {url} for {timeout:g} s")
        time.sleep(1)


def raise_fd_limit(connections: int) -> int:
    """Raise this process's soft limit on open files to the hard one, so that wrk and the servers started from here
    inherit it; fail when even that cannot hold `connections` sockets on each side plus a margin."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    needed = connections + FD_MARGIN
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise SystemExit(f"bench: --many-connections {connections} needs at least {needed} open files per process, "
                         f"but `ulimit -n` allows {soft} (hard limit {hard}): raise it (e.g. `ulimit -Hn` as root, or "
                         "LimitNOFILE) or pass a lower --many-connections")
    return soft


def _print_run(run: Measurement, rounds: int) -> None:
    errors = sum(run.socket_errors.values())
    print(f"[{run.round}/{rounds}] {run.target:<10} {run.scenario:<8} {run.mode:<10} {run.rps:8.1f} req/s  "
          f"p50 {run.p50_ms} ms  p99 {run.p99_ms} ms  non-2xx {run.non_2xx}  socket errors {errors}"
          + (f"  late sends {run.late}" if run.late else ""), flush=True)


def run_rounds(targets: list[Target], args: argparse.Namespace, wrk_log: Path) -> list[Measurement]:
    """Rounds of hello, ours, seed-sync, seed-async (A B C D A B C D ...); each server warmed up, each round's writes
    undone after it."""
    measurements = []
    warm_up = Load("saturation", args.warm_up, args.connections)
    for round_ in range(1, args.rounds + 1):
        for target in targets:
            with ExitStack() as block:
                if target.launch:
                    server, stop = target.launch()
                    block.callback(stop)
                    target.url = server.url
                measurements += _block(target, args, round_, warm_up, wrk_log)
            if target.cleanup:
                target.cleanup()
    return measurements


def _block(target: Target, args: argparse.Namespace, round_: int, warm_up: Load, wrk_log: Path) -> list[Measurement]:
    """One server's runs in one round, after a warm-up."""
    if (waited := wait_serving(target)) > 2:
        print(f"[{round_}/{args.rounds}] {target.name}: served again after {waited} s", flush=True)
    run_wrk(target.url, "hello" if target.name == "hello" else "mix", warm_up, target.data, wrk_log)
    measurements = []
    for scenario, load in _runs(args, target):
        time.sleep(PAUSE_BETWEEN_RUNS)
        raw = run_wrk(target.url, scenario, load, target.data, wrk_log)
        measurements.append(measurement(raw, target.name, scenario, load, round_))
        _print_run(measurements[-1], args.rounds)
    return measurements


def _estimate_seconds(args: argparse.Namespace) -> float:
    many = len(set(args.scenarios) & set(MANY_CONNECTION_SCENARIOS)) if args.many_connections else 0
    runs_per_round = 1 + 2 * len(args.scenarios)
    if args.compare_seed_stack:
        runs_per_round += len(args.seed_modes) * 2 * len(set(args.scenarios) - SEED_IGNORES_FILTERS)
    servers = 2 + (len(args.seed_modes) if args.compare_seed_stack else 0)
    many_seconds = (servers - 1) * many * (args.many_duration + 1)
    starts = 5 * (servers - 2)  # the seed variants start for each block
    return args.rounds * (runs_per_round * (args.duration + 1) + many_seconds + servers * (args.warm_up + 2) + starts)


def _meta(args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {
        "started_at": stamp, "ours_label": "target" if args.target else "ours",
        "duration": args.duration, "rounds": args.rounds, "connections": args.connections,
        "rate": args.rate, "rate_connections": args.rate_connections, "fixed_rate_method": FIXED_RATE_METHOD,
        "many_connections": args.many_connections, "many_duration": args.many_duration, "wrk_timeout": WRK_TIMEOUT,
        "seed_modes": args.seed_modes if args.compare_seed_stack else [],
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
    fd_limit = raise_fd_limit(max(args.many_connections, args.connections))
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    meta = _meta(args, stamp)
    meta["open_files_limit"] = fd_limit
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
    peers = [f"seed-{mode}" for mode in args.seed_modes] if args.compare_seed_stack else []
    summary = report.summarize(measurements, args.scenarios, peers, SEED_IGNORES_FILTERS)
    json_path, png_path = RESULTS_DIR / f"bench-{stamp}.json", RESULTS_DIR / f"bench-{stamp}.png"
    report.write_json(json_path, meta, summary, measurements)
    report.write_chart(png_path, summary, args.scenarios, peers, meta)
    print()
    print(report.format_tables(summary, args.scenarios, meta, peers))
    print()
    _print_notes(args, meta)
    print(f"Results: {json_path.relative_to(ROOT)}, {png_path.relative_to(ROOT)}, {wrk_log.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

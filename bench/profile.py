"""Where a request's CPU goes: the app's gunicorn under wrk load, sampled with py-spy, folded into layers.

    .venv/bin/python -m bench.profile                        # get_one, page and toggle, 20 s each
    .venv/bin/python -m bench.profile --scenario get_one --duration 30
    make profile PROFILE_ARGS="--scenario toggle"

The server is started as `make bench` starts it (gunicorn.conf.py, the seeded bench database, LOG_LEVEL=WARNING,
rate limits off), except that workers are not recycled (GUNICORN_MAX_REQUESTS=0), so the sampled pids live through
the run. Per scenario: a warm-up, then wrk at saturation for --duration seconds while py-spy samples every worker
(`py-spy record --subprocesses --nonblocking` on the master) for the middle of that run. py-spy leaves idle threads
out (no --idle): threads waiting for PostgreSQL, for the GIL or for a connection are not sampled, so the samples
share out CPU time. The workers' CPU seconds over the wrk run (utime + stime from /proc/PID/stat) divided by the
requests wrk counted give the CPU per request; each layer gets its share of that.

A sample belongs to a layer by its frames' modules and function names (LAYERS below, patterns only, so the tool
runs unchanged on a branch that moves code around):
  1. hooks that own everything they call (auth, request id + logging, CORS, headers, rate limiter, webargs, ETag):
     the outermost such frame on the stack wins, decorators' wrappers (which call the view) excepted;
  2. otherwise the innermost frame that matches a library layer (SQL compilation, execution, rows, JSON, ...);
  3. otherwise "other". The most frequent leaf frames of "other" and "app code" are listed to refine the patterns.
Output: a table per scenario on stdout and bench/results/profile-<UTC time>.md (with the raw py-spy files beside).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import pg
from .load import Load, ensure_wrk, make_token, run_wrk
from .run import RESULTS_DIR, ROOT, _write_data, gunicorn_setting
from .servers import start_gunicorn

SCENARIOS = ("get_one", "page", "toggle")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# A decorator's wrapper calls the view it wraps (webargs' use_args, flask-smorest's arguments): it owns nothing.
PASS_THROUGH = re.compile(r"(^|\.)(wrapper|decorator|decorated|wrapped|inner)$")


@dataclass(frozen=True)
class Layer:
    name: str
    files: str  # a regex searched in the frame's file path
    functions: str | None = None  # a regex searched in the function name; None: any function

    def matches(self, file: str, function: str) -> bool:
        return bool(re.search(self.files, file)) and (self.functions is None or bool(
            re.search(self.functions, function)))


# Hooks and steps that own what they call: a sample anywhere under one of them is theirs (the outermost wins).
OWNERS = (
    Layer("auth: bearer token, JWT", r"todo_api/auth\.py$|(^|/)jwt/"),
    Layer("request id + logging hook", r"todo_api/observability\.py$"),
    Layer("CORS (flask-cors, preflight)", r"(^|/)flask_cors/"),
    Layer("CORS (flask-cors, preflight)", r"todo_api/web\.py$", r"preflight|cors"),
    Layer("security + cache headers", r"todo_api/web\.py$", r"security|content_security_policy|cache_headers|header"),
    Layer("rate limiter", r"(^|/)flask_limiter/|(^|/)limits/|todo_api/limits\.py$"),
    Layer("webargs parsing", r"(^|/)webargs/|todo_api/parser\.py$"),
    Layer("ETag (compute, check)", r"todo_api/conditional\.py$|flask_smorest/etag\.py$"),
    Layer("ETag (compute, check)", r"todo_api/", r"(?i)etag"),
)
# Libraries, by the innermost frame that matches one of them.
LIBRARIES = (
    Layer("JSON encoding", r"(^|/)(json|orjson)/|flask/json/"),
    Layer("JSON encoding", r"todo_api/", r"(?i)json|^dumps$|^loads$"),
    Layer("schema dump/load (marshmallow, task_to_dict)", r"(^|/)marshmallow/|todo_api/schemas\.py$"),
    Layer("SQL construction + compilation", r"sqlalchemy/sql/"),
    Layer("row handling (results, rows)",
          r"sqlalchemy/engine/(result|row|_py_row|_py_processors|processors|cursor)\.py$|sqlalchemy/orm/loading\.py$"),
    Layer("pool checkout + return", r"sqlalchemy/pool/"),
    Layer("pool checkout + return", r"todo_api/db\.py$", r"isolation|closed_by_server|forget|checkout|checkin"),
    Layer("ORM session (begin, flush, commit)", r"sqlalchemy/orm/"),
    Layer("execution (SQLAlchemy Core, psycopg2)", r"sqlalchemy/(engine|dialects)/|(^|/)psycopg2/"),
    Layer("execution (SQLAlchemy Core, psycopg2)", r"todo_api/deadlines\.py$"),
    Layer("logging calls (stdlib)", r"(^|/)logging/"),
    Layer("flask-smorest decorators (response, arguments, pagination)", r"(^|/)flask_smorest/"),
    Layer("Flask + Werkzeug dispatch (routing, contexts, request/response)", r"(^|/)(flask|werkzeug)/"),
    Layer("gunicorn: HTTP parsing", r"gunicorn/http/(message|parser|unreader|body|errors)\.py$"),
    Layer("gunicorn: HTTP parsing", r"todo_api/gunicorn_worker\.py$", r"head"),
    Layer("gunicorn: WSGI environ + response writing", r"gunicorn/http/wsgi\.py$"),
    Layer("gunicorn: worker loop (accept, poll, threads)",
          # not gunicorn/util.py: its socket writes and Date header belong to the response that calls them
          r"(^|/)gunicorn/(?!util\.py)|todo_api/gunicorn_worker\.py$|(^|/)(selectors|socket|threading|queue)\.py$"
          r"|concurrent/futures/"),
    Layer("app code (views, repositories)", r"todo_api/"),
)
OTHER = "other"
LAYER_ORDER = [*dict.fromkeys(layer.name for layer in (*OWNERS, *LIBRARIES)), OTHER]


def parse_frame(frame: str) -> tuple[str, str]:
    """py-spy's "function (file:line)" as (file, function); other frames (process, thread) as ("", frame)."""
    match = FRAME.match(frame)
    return (match["file"], match["function"]) if match else ("", frame)


def classify(frames: list[tuple[str, str]]) -> str:
    """The layer of one sample, its frames from the root to the leaf."""
    for file, function in frames:
        if PASS_THROUGH.search(function):
            continue
        for layer in OWNERS:
            if layer.matches(file, function):
                return layer.name
    for file, function in reversed(frames):
        for layer in LIBRARIES:
            if layer.matches(file, function):
                return layer.name
    return OTHER


@dataclass
class Folded:
    """Samples per layer, and the leaf frames of the catch-all layers (to see what the patterns miss)."""

    layers: Counter[str] = field(default_factory=Counter)
    leaves: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.layers.values())


def fold(raw: str) -> Folded:
    """py-spy's raw (collapsed stack) output: one "frame;frame;... count" line per distinct stack."""
    folded = Folded()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [parse_frame(frame) for frame in stack.split(";")]
        layer = classify(frames)
        folded.layers[layer] += int(count)
        if layer in (OTHER, "app code (views, repositories)"):
            file, function = frames[-1]
            folded.leaves.setdefault(layer, Counter())[f"{function} ({Path(file).name})"] += int(count)
    return folded


def children(pid: int) -> list[int]:
    """The direct children of a process (gunicorn's workers), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of these processes (utime and stime, fields 14 and 15 of /proc/PID/stat)."""
    user = system = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after the command, which may hold spaces
        user += int(fields[11])
        system += int(fields[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def py_spy() -> str:
    path = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not path:
        raise SystemExit("bench.profile: py-spy is required: pip install -r bench/requirements.txt (make profile does)")
    return path


@dataclass
class Profile:
    scenario: str
    requests: int
    seconds: float
    user_seconds: float
    system_seconds: float
    folded: Folded
    raw_path: Path
    rate: int
    workers: list[int]

    def per_request_us(self, seconds: float) -> float:
        return seconds / self.requests * 1e6 if self.requests else 0.0


def profile_scenario(server_url: str, master: int, scenario: str, data: Path, args: argparse.Namespace,
                     stamp: str, wrk_log: Path) -> Profile:
    """Warm up, then wrk for args.duration s with py-spy on every worker for the middle of it."""
    workers = children(master)
    run_wrk(server_url, scenario, Load("saturation", args.warm_up, args.connections), data, wrk_log)
    result: dict[str, Any] = {}
    load = Load("saturation", args.duration, args.connections)
    before = cpu_seconds(workers)
    started = time.monotonic()
    wrk = threading.Thread(target=lambda: result.update(run_wrk(server_url, scenario, load, data, wrk_log)))
    wrk.start()
    sample_seconds = max(1, args.duration - 2 * args.margin)
    raw_path = RESULTS_DIR / f"profile-{stamp}-{scenario}.txt"
    time.sleep(args.margin)  # wrk's connections are up and the servers at full load before sampling starts
    # --native unwinds C frames too (what psycopg2's cursor.execute spends), which needs the process paused.
    how = ["--native"] if args.native else ["--nonblocking"]
    spy = subprocess.run([py_spy(), "record", "--pid", str(master), "--subprocesses", *how, "--gil",
                          "--rate", str(args.rate), "--duration", str(sample_seconds), "--format", "raw",
                          "--output", str(raw_path)], capture_output=True, text=True)
    wrk.join()
    seconds = time.monotonic() - started
    after = cpu_seconds(workers)
    if spy.returncode != 0 or not raw_path.exists():
        raise SystemExit(f"py-spy failed (ptrace refused? run as root or with CAP_SYS_PTRACE):\n{spy.stderr[-2000:]}")
    if set(children(master)) != set(workers):
        print(f"! {scenario}: a worker was replaced during the run; CPU per request is approximate", flush=True)
    return Profile(scenario, int(result.get("requests", 0)), seconds, after[0] - before[0], after[1] - before[1],
                   fold(raw_path.read_text()), raw_path, args.rate, workers)


def format_profile(profile: Profile, markdown: bool = False) -> str:
    """The layers of one scenario: their share of the samples and µs of user CPU per request, then the kernel's."""
    total = profile.folded.total or 1
    user = profile.per_request_us(profile.user_seconds)
    system = profile.per_request_us(profile.system_seconds)
    header = (f"{profile.scenario}: {profile.requests / profile.seconds:.0f} req/s, {profile.requests} requests; "
              f"workers' CPU {user + system:.0f} µs per request ({user:.0f} user, {system:.0f} system); "
              f"{profile.folded.total} GIL-holding samples at {profile.rate} Hz")
    rows = [(name, profile.folded.layers[name]) for name in LAYER_ORDER if profile.folded.layers.get(name)]
    rows.sort(key=lambda row: -row[1])
    kernel = "kernel: system calls (sockets, poll, futex), not sampled"
    if markdown:
        lines = [f"**{header}**", "", "| layer | share of user CPU | µs CPU / request | samples |",
                 "|---|---:|---:|---:|"]
        lines += [f"| {name} | {count / total:.1%} | {count / total * user:.0f} | {count} |" for name, count in rows]
        lines += [f"| {kernel} | | {system:.0f} | |",
                  f"| **total** | 100% | {user + system:.0f} | {profile.folded.total} |"]
    else:
        width = max(len(kernel), *(len(name) for name, _ in rows))
        lines = [header, f"  {'layer'.ljust(width)}   share  µs/req  samples"]
        lines += [f"  {name.ljust(width)}  {count / total:6.1%}  {count / total * user:6.0f}  {count:7d}"
                  for name, count in rows]
        lines += [f"  {kernel.ljust(width)}          {system:6.0f}",
                  f"  {'total'.ljust(width)}  100.0%  {user + system:6.0f}  {profile.folded.total:7d}"]
    for layer, leaves in sorted(profile.folded.leaves.items()):
        top = ", ".join(f"{leaf} {count}" for leaf, count in leaves.most_common(6))
        lines.append(("" if not markdown else "\n") + f"  leaves of {layer}: {top}")
    return "\n".join(lines)


def format_combined(profiles: list[Profile]) -> str:
    """One markdown table, a column per scenario: µs of CPU per request per layer (the README's form)."""
    def cells(profile: Profile, name: str) -> str:
        count = profile.folded.layers.get(name, 0)
        return f"{count / (profile.folded.total or 1) * profile.per_request_us(profile.user_seconds):.0f}"

    names = [name for name in LAYER_ORDER if any(profile.folded.layers.get(name) for profile in profiles)]
    names.sort(key=lambda name: -sum(profile.folded.layers.get(name, 0) / (profile.folded.total or 1)
                                     for profile in profiles))
    lines = ["| µs CPU per request | " + " | ".join(profile.scenario for profile in profiles) + " |",
             "|---|" + "---:|" * len(profiles)]
    lines += [f"| {name} | " + " | ".join(cells(profile, name) for profile in profiles) + " |" for name in names]
    lines.append("| kernel: system calls, not sampled | " + " | ".join(
        f"{profile.per_request_us(profile.system_seconds):.0f}" for profile in profiles) + " |")
    lines.append("| **total (workers' CPU / requests)** | " + " | ".join(
        f"**{profile.per_request_us(profile.user_seconds + profile.system_seconds):.0f}**" for profile in profiles)
        + " |")
    lines.append("| req/s under py-spy | " + " | ".join(
        f"{profile.requests / profile.seconds:.0f}" for profile in profiles) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="a scenario to profile, repeatable (default: get_one, page and toggle)")
    parser.add_argument("--duration", type=int, default=20, help="seconds of wrk per scenario (default 20)")
    parser.add_argument("--margin", type=int, default=2,
                        help="seconds of the wrk run not sampled at each end (default 2)")
    parser.add_argument("--warm-up", type=int, default=3, help="seconds of wrk before each measured run (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64, as make bench)")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second per thread (default 100)")
    parser.add_argument("--native", action="store_true",
                        help="also sample C frames (py-spy --native; pauses the workers at each sample, so slower): "
                             "the raw file then shows inside C extensions such as psycopg2")
    parser.add_argument("--users", type=int, default=20, help="users user1..userN (default 20)")
    parser.add_argument("--tasks-per-user", type=int, default=10_000, help="seeded tasks per user (default 10000)")
    args = parser.parse_args(argv)
    args.scenarios = args.scenario or list(SCENARIOS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_wrk()
    py_spy()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    wrk_log = RESULTS_DIR / f"profile-{stamp}-wrk.log"
    secret = secrets.token_urlsafe(36)
    users = [f"user{index}" for index in range(1, args.users + 1)]
    profiles = []
    with ExitStack() as stack:
        postgres = pg.start_postgres(stack)
        pg.prepare_todo_database(postgres.url, secret, users, args.tasks_per_user)
        env = {**pg.app_env(postgres.url, secret), "GUNICORN_MAX_REQUESTS": "0"}  # same worker pids throughout
        log = RESULTS_DIR / f"profile-{stamp}-gunicorn.log"
        server = start_gunicorn(stack, "ours", "wsgi:app", env, log, "/health")
        assert server.pid is not None
        tokens = {user: make_token(secret, user) for user in users}
        data = _write_data(RESULTS_DIR / f"profile-{stamp}-data.lua", server, tokens, args.tasks_per_user)
        for scenario in args.scenarios:
            profiles.append(profile_scenario(server.url, server.pid, scenario, data, args, stamp, wrk_log))
            print(format_profile(profiles[-1]), "\n", flush=True)
            pg.delete_created(postgres.url, "tasks")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    branch = subprocess.run(["git", "branch", "--show-current"], cwd=ROOT, capture_output=True, text=True)
    markdown = RESULTS_DIR / f"profile-{stamp}.md"
    markdown.write_text("\n\n".join([
        f"Profile {stamp}, {branch.stdout.strip()} at {commit.stdout.strip()}: gunicorn {gunicorn_setting('workers')} "
        f"workers x {gunicorn_setting('threads')} threads, wrk -t2 -c{args.connections} -d{args.duration}s, py-spy "
        f"{args.rate} Hz (GIL-holding samples only), {os.cpu_count()} CPUs, load average at the end "
        f"{os.getloadavg()[0]:.1f}", format_combined(profiles),
        *(format_profile(profile, markdown=True) for profile in profiles)]) + "\n")
    print(f"Results: {markdown.relative_to(ROOT)} and the raw py-spy samples beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost per call of an MCP tools/call next to the equivalent REST request, in process through the Flask test client
against PostgreSQL (todo_api/mcp_server.py).

Run: TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test_mcp .venv/bin/python -m bench.bench_mcp
     ... -m bench.bench_mcp --wrk   the same pairs over HTTP: gunicorn with gunicorn.conf.py (4 workers x 4 threads,
     rate limits off) and wrk (2 threads, 8 connections, 10 s per request kind, two rounds taking turns).

Pairs: one task (GET /api/{user}/tasks/{id} and get_task), a page of 20 tasks (GET /api/{user}/tasks?page_size=20
and list_tasks with page_size 20), and the floors without a database: GET /api/me (the token) and MCP's ping (the
token and the JSON-RPC envelope).
The requests take turns in blocks of 100, so the machine's drift hits them alike. Wall: the median of every
request's wall time. CPU: this process's CPU time per request, the median and the best of the blocks (on a shared
machine the best is the least disturbed). Rate limits off, as in `make bench`; the log at WARNING.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy import delete

from tests.helpers import MCP_HEADERS, bearer, make_config, make_token
from todo_api import create_app
from todo_api.cli import alembic_config
from todo_api.config import normalize_database_url
from todo_api.db import get_db
from todo_api.models import Task, TaskCount

BLOCK = 100
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "20"))
TASKS = 20
USER = f"bench-mcp-{uuid.uuid4().hex[:8]}"


def main() -> None:
    database_url = normalize_database_url(os.environ["TEST_DATABASE_URL"])
    command.upgrade(alembic_config(database_url), "head")
    app = create_app(make_config(database_url, LOG_LEVEL="WARNING"))
    client = app.test_client()
    auth = bearer(make_token(USER, ttl=3600))
    mcp_headers = {**MCP_HEADERS, **auth}
    ids = []
    for number in range(TASKS):
        created = client.post(f"/api/{USER}/tasks", json={"title": f"bench {number}", "tags": ["bench"]},
                              headers=auth)
        assert created.status_code == 201, created.json
        ids.append(created.json["id"])
    task_id = ids[0]

    def rest(path: str) -> Callable[[], Any]:
        return lambda: client.get(path, headers=auth)

    def tool(name: str, arguments: dict[str, Any]) -> Callable[[], Any]:
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments}}
        return lambda: client.post("/mcp", json=message, headers=mcp_headers)

    requests: dict[str, Callable[[], Any]] = {
        "REST GET one task": rest(f"/api/{USER}/tasks/{task_id}"),
        "MCP get_task": tool("get_task", {"task_id": task_id}),
        f"REST GET list, page_size={TASKS}": rest(f"/api/{USER}/tasks?page_size={TASKS}"),
        f"MCP list_tasks, page_size={TASKS}": tool("list_tasks", {"page_size": TASKS}),
        "REST GET /api/me": rest("/api/me"),
        "MCP ping": lambda: client.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                        headers=mcp_headers),
    }
    samples: dict[str, list[float]] = {name: [] for name in requests}
    cpu: dict[str, list[float]] = {name: [] for name in requests}
    try:
        for name, send in requests.items():  # warm up, and check that each answers what it should
            for _ in range(BLOCK):
                response = send()
                assert response.status_code == 200, (name, response.get_data()[:200])
                if name.startswith("MCP") and "ping" not in name:
                    assert response.json["result"]["isError"] is False, response.json
        failures = 0
        for _ in range(ROUNDS):
            for name, send in requests.items():
                cpu_started = time.process_time()
                for _ in range(BLOCK):
                    started = time.perf_counter()
                    status = send().status_code
                    samples[name].append(time.perf_counter() - started)
                    failures += status != 200
                cpu[name].append((time.process_time() - cpu_started) / BLOCK)
        assert failures == 0, f"{failures} requests did not get 200: the figures would be of errors"
        print(f"{BLOCK * ROUNDS} requests each through the Flask test client, in blocks of {BLOCK} taking turns; "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{'':34} {'wall median':>12} {'CPU median':>12} {'CPU best block':>15}")
        for name in requests:
            wall, cpu_median, cpu_best = (statistics.median(samples[name]) * 1e6, statistics.median(cpu[name]) * 1e6,
                                          min(cpu[name]) * 1e6)
            print(f"{name:34} {wall:9.0f} us {cpu_median:9.0f} us {cpu_best:12.0f} us")
    finally:
        with app.app_context():
            with get_db().engine.begin() as connection:
                connection.execute(delete(Task).where(Task.user_id == USER))
                connection.execute(delete(TaskCount).where(TaskCount.user_id == USER))
        app.extensions["db"].engine.dispose()


WRK_SECONDS, WRK_ROUNDS = 10, 2
WRK_LUA = """wrk.method = {method}
wrk.path = {path}
wrk.body = {body}
wrk.headers["Authorization"] = {authorization}
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["MCP-Protocol-Version"] = "2025-06-18"
"""


def lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_main() -> None:
    """The pairs over HTTP against gunicorn, with wrk; prints requests/s and latency percentiles."""
    import json

    from tests.live_server import call, live_server, server_env

    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found (apt-get install wrk)")
    database_url = normalize_database_url(os.environ["TEST_DATABASE_URL"])
    command.upgrade(alembic_config(database_url), "head")
    token = make_token(USER, ttl=3600)
    env = server_env(database_url, LOG_LEVEL="WARNING", WEB_CONCURRENCY="4", GUNICORN_THREADS="4")
    with live_server(env) as server, tempfile.TemporaryDirectory() as scratch:
        ids = [call("POST", f"{server.base_url}/api/{USER}/tasks", token, {"title": f"bench {n}"})[2]["id"]
               for n in range(TASKS)]

        def tool(name: str, arguments: dict[str, Any]) -> tuple[str, str, str]:
            message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": name, "arguments": arguments}}
            return "POST", "/mcp", json.dumps(message)

        kinds = {
            "REST GET one task": ("GET", f"/api/{USER}/tasks/{ids[0]}", ""),
            "MCP get_task": tool("get_task", {"task_id": ids[0]}),
            f"REST GET list, page_size={TASKS}": ("GET", f"/api/{USER}/tasks?page_size={TASKS}", ""),
            f"MCP list_tasks, page_size={TASKS}": tool("list_tasks", {"page_size": TASKS}),
        }
        scripts = {}
        for number, (name, (method, path, body)) in enumerate(kinds.items()):
            status, _, answer = call(method, f"{server.base_url}{path}", token,
                                     json.loads(body) if body else None)
            assert status == 200 and not (isinstance(answer, dict) and answer.get("result", {}).get("isError")), answer
            scripts[name] = Path(scratch) / f"{number}.lua"
            scripts[name].write_text(WRK_LUA.format(method=lua_string(method), path=lua_string(path),
                                                    body=lua_string(body) if body else "nil",
                                                    authorization=lua_string(f"Bearer {token}")))
        results: dict[str, list[tuple[float, str, str]]] = {name: [] for name in kinds}
        try:
            for _ in range(WRK_ROUNDS):
                for name, script in scripts.items():
                    output = subprocess.run(
                        ["wrk", "-t2", "-c8", f"-d{WRK_SECONDS}s", "--latency", "-s", str(script), server.base_url],
                        check=True, capture_output=True, text=True, timeout=WRK_SECONDS + 30).stdout
                    assert "Non-2xx" not in output, output  # socket timeouts (over 2 s) are counted, not fatal
                    errors = re.search(r"Socket errors: (.*)", output)
                    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
                    p50, p99 = (re.search(rf"\s{p}%\s+(\S+)", output).group(1)  # type: ignore[union-attr]
                                for p in (50, 99))
                    results[name].append((rate, p50, p99 + (f" ({errors.group(1)})" if errors else "")))
            print(f"wrk -t2 -c8 -d{WRK_SECONDS}s against gunicorn (4 workers x 4 threads), {WRK_ROUNDS} rounds taking "
                  f"turns; load average {os.getloadavg()[0]:.1f}")
            for name, runs in results.items():
                print(f"{name:34} " + "; ".join(f"{rate:7.0f} req/s, p50 {p50}, p99 {p99}" for rate, p50, p99 in runs))
        finally:
            engine_app = create_app(make_config(database_url, LOG_LEVEL="WARNING"))
            with engine_app.app_context(), get_db().engine.begin() as connection:
                connection.execute(delete(Task).where(Task.user_id == USER))
                connection.execute(delete(TaskCount).where(TaskCount.user_id == USER))
            engine_app.extensions["db"].engine.dispose()


if __name__ == "__main__":
    sys.exit(wrk_main() if "--wrk" in sys.argv[1:] else main())

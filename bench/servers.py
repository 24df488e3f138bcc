"""The servers under load: the app and the hello ceiling under gunicorn, and the seed stack peer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from todo_api.embedded_postgres import free_port

ROOT = Path(__file__).resolve().parent.parent
SEED_STACK_RUN = ROOT.parent / "shared" / "bench" / "seed_stack" / "run.sh"
SEED_STACK_MODES = ("sync", "async")
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# No proxy from the environment may see loopback traffic.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    pid: int | None = None  # gunicorn's master (bench/profile.py samples its workers)


def _answers(url: str) -> bool:
    try:
        with OPENER.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(url: str, alive: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not _answers(url):
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start ({url}); log tail:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # gunicorn's graceful shutdown
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the session it was started in: the master and its workers
        process.wait()


def start_gunicorn(stack: ExitStack, name: str, app: str, env: dict[str, str], log: Path,
                   ready_path: str) -> Server:
    """gunicorn with the project's gunicorn.conf.py, bound to a free port on loopback; stopped with the stack."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
               "--bind", f"127.0.0.1:{port}", app]
    with log.open("ab") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    stack.callback(_stop, process)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url + ready_path, lambda: process.poll() is None, log)
    return Server(name, url, process.pid)


def launch_seed_stack(env: dict[str, str], mode: str) -> tuple[Server, Callable[[], None]]:
    """The seed stack in one of its modes (`run.sh start PORT sync|async`), named seed-MODE, and how to stop it.

    sync: psycopg2 and `def` endpoints (run in Starlette's thread pool); async: asyncpg and `async def` endpoints.
    app.py picks them by SEED_STACK_MODE, which run.sh sets from its third argument.
    """
    if mode not in SEED_STACK_MODES:
        raise ValueError(f"seed stack mode {mode!r}: one of {', '.join(SEED_STACK_MODES)}")
    port = free_port()
    result = subprocess.run([str(SEED_STACK_RUN), "start", str(port), mode], env=env, capture_output=True,
                            text=True, timeout=900)  # the first start builds its venv
    if result.returncode != 0:
        raise RuntimeError(f"seed stack ({mode}) did not start:\n{result.stderr[-3000:]}")
    pid = int(result.stdout.split()[-1])
    return Server(f"seed-{mode}", f"http://127.0.0.1:{port}"), partial(_stop_seed_stack, pid, env)


def _stop_seed_stack(pid: int, env: dict[str, str]) -> None:
    """run.sh stop, then whatever is left of its process group.

    run.sh kills only uvicorn's master (after 10 s of SIGTERM); its workers are left running when they are stuck,
    as the sync variant's are after 1,000 connections (every thread waiting for a pool connection). run.sh starts
    uvicorn with setsid, so the master's pid is the group of all its workers.
    """
    subprocess.run([str(SEED_STACK_RUN), "stop", str(pid)], env=env, check=False)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)

"""The real server for tests: gunicorn with gunicorn.conf.py on a free 127.0.0.1 port.

    with live_server(server_env(database_url, WEB_CONCURRENCY="2")) as server:
        status, headers, body = call("GET", f"{server.base_url}/health")

Every wait is bounded; the server is stopped with SIGTERM (then SIGKILL) when the block ends, and its output is
printed if the block fails.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from todo_api.embedded_postgres import free_port

from .helpers import SECRET

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
REQUEST_TIMEOUT = 10.0

# What the app and gunicorn.conf.py read: the test runner's environment must not leak into the server.
SERVER_VARIABLES = (
    "APP_ENV", "DATABASE_URL", "MIGRATIONS_DATABASE_URL", "BETTER_AUTH_SECRET", "BETTER_AUTH_URL",
    "BETTER_AUTH_JWKS_URL", "JWT_ISSUER", "JWT_AUDIENCE", "JWT_LEEWAY", "FRONTEND_URL", "LOG_LEVEL", "PORT",
    "DB_POOL_SIZE", "DB_MAX_OVERFLOW", "DB_POOL_TIMEOUT", "DB_POOL_RECYCLE", "DB_CONNECT_TIMEOUT",
    "DB_STATEMENT_TIMEOUT_MS", "WEB_CONCURRENCY", "GUNICORN_CMD_ARGS", "GUNICORN_THREADS", "GUNICORN_TIMEOUT",
    "GUNICORN_GRACEFUL_TIMEOUT", "GUNICORN_KEEPALIVE", "GUNICORN_MAX_REQUESTS", "GUNICORN_LOG_LEVEL",
    "GUNICORN_ACCESS_LOG",
    "FORWARDED_ALLOW_IPS",
)

# No proxy from the environment may see loopback traffic.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def server_env(database_url: str, **overrides: str) -> dict[str, str]:
    """The environment for a production-mode server on database_url, with the test's SECRET."""
    env = {key: value for key, value in os.environ.items() if key not in SERVER_VARIABLES}
    env.update({
        "DATABASE_URL": database_url,
        "BETTER_AUTH_SECRET": SECRET,
        "APP_ENV": "production",
        "WEB_CONCURRENCY": "2",
        "GUNICORN_GRACEFUL_TIMEOUT": "5",
        "PYTHONUNBUFFERED": "1",
        "RATELIMIT_ENABLED": "false",  # load tests send far more than a user may; tests/test_limits.py turns it on
    })
    env.update(overrides)
    return env


def call(method: str, url: str, token: str | None = None, body: Any = None, *,
         timeout: float = REQUEST_TIMEOUT, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One request on a new connection; returns (status, headers, parsed JSON body or None)."""
    sent = {"Accept": "application/json", **(headers or {})}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers), _json(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), _json(error.read())


def _json(raw: bytes) -> Any:
    return json.loads(raw) if raw else None


@dataclass
class LiveServer:
    base_url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        """Everything gunicorn and the app printed so far."""
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        import psutil

        return sorted(child.pid for child in psutil.Process(self.process.pid).children())

    def wait_for_workers(self, count: int, timeout: float = STARTUP_TIMEOUT) -> list[int]:
        """The workers' pids once the master has exactly `count` of them."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            if len(pids) == count:
                return pids
            if time.monotonic() > deadline:
                raise AssertionError(f"gunicorn has {len(pids)} workers, expected {count}")
            time.sleep(0.1)


@contextmanager
def live_server(env: Mapping[str, str], *, log_dir: Path | None = None,
                startup_timeout: float = STARTUP_TIMEOUT, stop_timeout: float = STOP_TIMEOUT) -> Iterator[LiveServer]:
    """Serve wsgi:app with gunicorn.conf.py on a free loopback port until the block ends."""
    port = free_port()
    command_line = [
        sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
        "--bind", f"127.0.0.1:{port}",  # the config binds 0.0.0.0; keep tests on loopback
        "--no-control-socket",  # the default socket path is shared with any other gunicorn of this user
        "wsgi:app",
    ]
    log_path = Path(log_dir or tempfile.mkdtemp(prefix="gunicorn-")) / f"gunicorn-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command_line, cwd=ROOT, env={**env, "PORT": str(port)},
                                   stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", port, process, log_path)
    try:
        _wait_until_live(server, startup_timeout)
        yield server
    except BaseException:
        print(f"--- gunicorn output ({' '.join(command_line)}) ---\n{server.output()[-20000:]}")
        raise
    finally:
        stop(process, stop_timeout)


def _wait_until_live(server: LiveServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {server.process.returncode} during start-up")
        try:
            if call("GET", f"{server.base_url}/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gunicorn did not answer /health within {timeout} s")


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM (graceful shutdown), then SIGKILL for the master and its workers if it takes too long."""
    if process.poll() is not None:
        return
    import psutil

    try:
        workers = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass


class KeepAliveClient:
    """One persistent HTTP/1.1 connection to the server, as a browser or an HTTP client pool keeps.

    A transport error closes the connection (the next request opens a new one) and is raised: callers decide
    whether it counts.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = REQUEST_TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(base_url)
        assert parts.hostname in ("127.0.0.1", "localhost", "::1"), "tests talk to loopback only"
        self.host, self.port = parts.hostname, parts.port or 80
        self.token = token
        self.timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        headers = {"Accept": "application/json", **(headers or {})}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self._connection.request(method, path, body=data, headers=headers)
            response = self._connection.getresponse()
            raw = response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, dict(response.headers), _json(raw)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

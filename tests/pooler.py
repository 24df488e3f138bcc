"""PgBouncer in transaction mode on loopback, in front of the test PostgreSQL: what Neon's pooled endpoint is.

Configured as Neon's: pool_mode = transaction, no server reset query, a small pool, and the `options` startup
parameter refused. Started from Debian's `pgbouncer` (`.ci/run` installs it); tests skip, saying why, without it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from todo_api.embedded_postgres import free_port

from .helpers import running_server

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
POOL_SIZE = 5
CONFIG = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/users.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 200
server_reset_query =
ignore_startup_parameters = extra_float_digits
pidfile = {folder}/pgbouncer.pid
admin_users = {user}
"""


@contextlib.contextmanager
def transaction_pooler(server_url: str) -> Iterator[str]:
    """PgBouncer in front of server_url's server; yields server_url rewritten to go through it."""
    if not os.path.exists(PGBOUNCER):
        pytest.skip("no pgbouncer (apt-get install pgbouncer; .ci/run does)")
    upstream = make_url(server_url)
    user = upstream.username or "postgres"
    folder = Path(tempfile.mkdtemp(prefix="todo-api-pgbouncer-"))
    folder.chmod(0o755)  # as root pgbouncer drops to the postgres account, which reads its config, writes its pid
    listen_port = free_port()
    (folder / "users.txt").write_text(f'"{user}" ""\n')
    (folder / "pgbouncer.ini").write_text(CONFIG.format(
        host=upstream.host or "127.0.0.1", port=upstream.port or 5432, listen_port=listen_port, folder=folder,
        pool_size=POOL_SIZE, user=user,
    ))
    command = [PGBOUNCER, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
        command[1:1] = ["-u", "postgres"]
    try:
        with running_server(command, listen_port, folder / "pgbouncer.log", "pgbouncer"):
            yield upstream.set(host="127.0.0.1", port=listen_port).render_as_string(hide_password=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

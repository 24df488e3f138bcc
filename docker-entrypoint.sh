#!/bin/sh
# The container's entry point: with RUN_MIGRATIONS=1, migrate first; then run the command (gunicorn by default).
#
# Migrations run on MIGRATIONS_DATABASE_URL (Neon's direct endpoint; when unset, DATABASE_URL, or its direct twin
# when that is Neon's pooled endpoint: todo_api/config.py) in one transaction
# that first takes a PostgreSQL advisory lock, so replicas starting together migrate one at a time: the others
# wait for the lock, then find the schema at head. Each outcome is one JSON line on stderr with the fields of the
# app's own lines (todo_api/observability.py). A failure exits 1 and the server never starts; SIGTERM while
# migrating (or waiting for the lock) rolls the transaction back and exits 143.
#
# python replaces this shell, and then gunicorn replaces python: whichever runs is the container's PID 1 and gets
# its signals, and the command keeps the container's stdin and working directory.
set -eu

if [ "${RUN_MIGRATIONS:-0}" != "1" ]; then
  exec "$@"
fi

# No single quote below: the script is one single-quoted shell word.
migrate='
import logging
import os
import signal
import sys

app_dir, command = sys.argv[1], sys.argv[2:]
sys.path.insert(0, app_dir)

from alembic import command as alembic_command
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, func, pool, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from todo_api.cli import alembic_config, database_error_line
from todo_api.config import ConfigError, load_config
from todo_api.deadlines import install_wait_callback
from todo_api.observability import JSONFormatter, configure_logging

MIGRATION_LOCK = int.from_bytes(b"todo-api", "big")  # the advisory lock key every replica takes


class Stopped(BaseException):
    """SIGTERM: leave at once; the transaction rolls back with the connection."""


def stop(_signal, _frame):
    raise Stopped


configure_logging(os.environ.get("LOG_LEVEL", "INFO").upper())
handler = logging.StreamHandler(sys.stderr)  # anything Alembic or SQLAlchemy logs is JSON too
handler.setFormatter(JSONFormatter())
logging.basicConfig(level=logging.WARNING, handlers=[handler])
log = logging.getLogger("todo_api.migrations")
signal.signal(signal.SIGTERM, stop)
install_wait_callback()  # psycopg2 waits in Python, where SIGTERM can interrupt it; connect_timeout still holds

where = "the database"
try:
    config = load_config()
    if config["MIGRATIONS_DATABASE_URL_NOTE"]:  # derived from a Neon pooled DATABASE_URL
        log.info("%s", config["MIGRATIONS_DATABASE_URL_NOTE"])
    url = make_url(config["MIGRATIONS_DATABASE_URL"])
    host = url.host or "localhost"
    where = f"{host}:{url.port or 5432}/{url.database}"
    engine = create_engine(url, poolclass=pool.NullPool, connect_args={"connect_timeout": config["DB_CONNECT_TIMEOUT"]})
    with engine.begin() as connection:
        if not connection.scalar(select(func.pg_try_advisory_xact_lock(MIGRATION_LOCK))):
            log.info("migrations: another replica is migrating %s; waiting for it", where)
            connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
        before = MigrationContext.configure(connection).get_current_revision()
        alembic = alembic_config(url.render_as_string(hide_password=False))
        alembic.attributes["connection"] = connection  # Alembic joins this transaction: the lock covers it all
        alembic_command.upgrade(alembic, "head")
        after = MigrationContext.configure(connection).get_current_revision()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    engine.dispose()
except Stopped:
    log.warning("migrations: stopped by SIGTERM; %s is left as it was", where)
    sys.exit(143)
except (ConfigError, DBAPIError) as error:
    log.error("migrations failed on %s: %s", where, database_error_line(error))
    sys.exit(1)
except Exception:
    log.exception("migrations failed on %s", where)
    sys.exit(1)
if before == after:
    log.info("migrations: %s already at %s", where, after)
else:
    log.info("migrations: %s upgraded from %s to %s", where, before or "an empty schema", after)
if command:
    os.execvp(command[0], command)
'
exec python -c "$migrate" "$(dirname "$0")" "$@"

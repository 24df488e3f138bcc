"""One SQLAlchemy engine per process, and a session per request."""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from typing import Any

import orjson
import psycopg2
import psycopg2.extensions
from flask import Flask, current_app, g, has_request_context, request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from .web import to_json

log = logging.getLogger(__name__)

# TCP keepalive on pooled connections: a peer that vanished (partition, host gone) turns an idle connection's socket
# into an error within about a minute, which the checkout hook sees, instead of it failing the next request.
KEEPALIVE_ARGS = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def make_engine(url: str, config: dict[str, Any]) -> Engine:
    """A pooled engine that survives connections the server dropped (Neon suspends idle computes)."""
    # orjson for the tags column: the stdlib json parser was a tenth of a 50-task page's cost.
    json_options = {"json_serializer": lambda value: to_json(value).decode(), "json_deserializer": orjson.loads}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 5, "check_same_thread": False}, **json_options)
        _fix_sqlite_transactions(engine)
        return engine

    statement_timeout = int(config.get("DB_STATEMENT_TIMEOUT_MS", 5_000))
    connect_timeout = int(config.get("DB_CONNECT_TIMEOUT", 5))
    # The server cancels a statement after statement_timeout, but only a server that still answers can: a frozen
    # server, a stalled proxy or a lost network would hold the request forever. The client gives up one connect
    # timeout (the budget for a round trip) after the server should have answered.
    io_timeout = (statement_timeout / 1000 + connect_timeout) if statement_timeout > 0 else None
    install_wait_callback()
    engine = create_engine(
        url,
        pool_size=config.get("DB_POOL_SIZE", 5),
        max_overflow=config.get("DB_MAX_OVERFLOW", 5),
        pool_timeout=config.get("DB_POOL_TIMEOUT", 5),
        pool_recycle=config.get("DB_POOL_RECYCLE", 240),
        **json_options,
        connect_args={
            "connect_timeout": connect_timeout,
            # Bytes the server's host never acknowledges (a partition) fail the connection in connect_timeout
            # seconds instead of after some 15 minutes of retransmissions. Linux only; ignored elsewhere.
            "tcp_user_timeout": connect_timeout * 1000,
            **KEEPALIVE_ARGS,
            "connection_factory": deadline_connection_class(connect_timeout or None, io_timeout),
        },
    )
    event.listen(engine, "checkout", discard_if_closed_by_server)
    engine.dialect.reset_isolation_level = restore_default_isolation  # type: ignore[method-assign]

    # A SET rather than the `options` startup parameter, which Neon's pooler does not pass through.
    @event.listens_for(engine, "connect")
    def set_session_defaults(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = %s", (statement_timeout,))
            cursor.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()

    return engine


def restore_default_isolation(dbapi_connection: Any) -> None:
    """At check-in, undo a read's autocommit with no round trip to the server.

    SQLAlchemy restores the level it read from the server at first connect, "READ COMMITTED", by name; psycopg2
    then sends `SET default_transaction_isolation` on every later switch. That is a round trip per read, made in a
    pool finalizer that SQLAlchemy does not guard: when the server had gone away since the read's last statement
    (terminated, restarted, unreachable), the error escaped the finished request as gunicorn's HTML 500 and the
    connection's pool slot was never given back. psycopg2's DEFAULT is the same server default, as a client-side
    flag.
    """
    dbapi_connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_DEFAULT)


def discard_if_closed_by_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Pessimistic disconnect handling without pool_pre_ping's round trip.

    An idle connection has nothing to read. If its socket is readable, the server has closed it or sent a
    termination notice (restart, pg_terminate_backend, Neon suspending the compute): the pool then discards it
    and checks out another, so the request never sees the dead connection.
    """
    if dbapi_connection.closed:
        raise DisconnectionError("connection already closed")
    poller = select.poll()
    poller.register(dbapi_connection.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    if poller.poll(0):
        raise DisconnectionError("server closed the connection")


class DeadlineConnection(psycopg2.extensions.connection):
    """A psycopg2 connection with client-side deadlines, enforced by wait_with_deadline (seconds, None: none)."""

    connect_deadline: float | None = None
    io_deadline: float | None = None


def deadline_connection_class(connect_timeout: float | None, io_timeout: float | None) -> type[DeadlineConnection]:
    return type("DeadlineConnection", (DeadlineConnection,),
                {"connect_deadline": connect_timeout, "io_deadline": io_timeout})


def install_wait_callback() -> None:
    """Make psycopg2 wait for the server through wait_with_deadline, in this process.

    With a wait callback psycopg2 drives libpq's non-blocking API and calls back whenever it would block, so a
    connection attempt or a statement can be abandoned on a client-side deadline: libpq's own blocking calls have
    none (libpq's connect_timeout is ignored in this mode, so the callback applies it). A callback that another
    library installed (a coroutine library's) is left alone.
    """
    current = psycopg2.extensions.get_wait_callback()
    if current is None:
        psycopg2.extensions.set_wait_callback(wait_with_deadline)
    elif current is not wait_with_deadline:
        log.warning("psycopg2 has another wait callback (%r): database deadlines are not enforced", current)


def wait_with_deadline(connection: Any, _cursor: Any = None) -> None:
    """psycopg2 wait callback: poll the connection until its operation completes or its deadline passes.

    On the deadline the socket is shut down, so nothing can read a late answer from it, and the error says
    "could not receive data from server", which SQLAlchemy reads as a disconnect: the pool discards the connection
    and the request gets 503.
    """
    connecting = connection.status == psycopg2.extensions.STATUS_SETUP
    timeout = _deadline_of(connection, connecting)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            events = select.POLLIN
        elif state == psycopg2.extensions.POLL_WRITE:
            events = select.POLLOUT
        else:
            raise psycopg2.OperationalError(f"unexpected poll state {state}")
        poller = select.poll()
        poller.register(connection.fileno(), events)  # libpq may change sockets while connecting
        if deadline is None:
            poller.poll()
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            if time.monotonic() >= deadline:
                _shut_down(connection)
                phase = "connecting" if connecting else "waiting for a result"
                raise psycopg2.OperationalError(
                    f"could not receive data from server: no answer within {timeout:g} s while {phase}"
                )


def _deadline_of(connection: Any, connecting: bool) -> float | None:
    if isinstance(connection, DeadlineConnection):
        return connection.connect_deadline if connecting else connection.io_deadline
    if not connecting:
        return None
    # Someone else's connection (migrations, scripts): keep libpq's connect_timeout, which this mode would ignore.
    try:
        seconds = int(psycopg2.extensions.parse_dsn(connection.dsn).get("connect_timeout", ""))
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def _shut_down(connection: Any) -> None:
    """Shut the connection's socket down without closing the descriptor, which libpq still owns."""
    try:
        with socket.socket(fileno=os.dup(connection.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg2.Error):
        pass


def _fix_sqlite_transactions(engine: Engine) -> None:
    """Let SQLAlchemy own BEGIN, so savepoints work (pysqlite otherwise defers and drops them)."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA busy_timeout=5000")

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Database:
    """The process's engine and the factories for request sessions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessionmaker: sessionmaker[Session] | None = sessionmaker(bind=engine, expire_on_commit=False)
        # Reads run in autocommit on PostgreSQL: no BEGIN and ROLLBACK round trips around each GET. Nothing is
        # lost: under PostgreSQL's READ COMMITTED every statement takes its own snapshot inside a transaction too.
        self.read_sessionmaker: sessionmaker[Session] | None = None
        if engine.dialect.name == "postgresql":
            autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
            self.read_sessionmaker = sessionmaker(bind=autocommit, expire_on_commit=False)

    def new_session(self, read_only: bool) -> Session:
        maker = (self.read_sessionmaker if read_only else None) or self.sessionmaker
        assert maker is not None, "no session factory"
        return maker()


def init_app(app: Flask) -> None:
    app.extensions["db"] = Database(make_engine(app.config["DATABASE_URL"], app.config))
    app.teardown_appcontext(remove_session)


def get_db() -> Database:
    return current_app.extensions["db"]


def get_session() -> Session:
    """The request's session, created on first use."""
    if "db_session" not in g:
        read_only = has_request_context() and request.method in SAFE_METHODS
        g.db_session = get_db().new_session(read_only=read_only)
    return g.db_session


def remove_session(_exc: BaseException | None = None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        try:
            session.close()
        except Exception:
            # The response is complete: an error while giving the connection back must not replace it with
            # gunicorn's HTML 500. SQLAlchemy invalidates a connection whose rollback failed.
            log.exception("could not release the database session", extra={"request_id": g.get("request_id")})

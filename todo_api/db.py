"""One SQLAlchemy engine per process, made for Neon's pooler, and a session per request."""

from __future__ import annotations

import logging
import os
import select
import weakref
from collections.abc import Callable
from typing import Any

import orjson
import psycopg2
import psycopg2.extensions
from flask import Flask, current_app, g, has_request_context, request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection

from .deadlines import deadline_connection_class, install_wait_callback
from .outage import OutageBreaker
from .web import to_json

log = logging.getLogger(__name__)

# TCP keepalive on pooled connections: a peer that vanished (partition, host gone) turns an idle connection's socket
# into an error within about a minute, which the checkout hook sees, instead of it failing the next request.
KEEPALIVE_ARGS = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def make_engine(url: str, config: dict[str, Any]) -> Engine:
    """A pooled engine that survives connections the server dropped (Neon suspends idle computes)."""
    statement_timeout = config["DB_STATEMENT_TIMEOUT_MS"]
    connect_timeout = config["DB_CONNECT_TIMEOUT"]
    # The server cancels a statement after statement_timeout (set per transaction, todo_api/deadlines.py); the
    # client gives up one connect timeout (the budget for a round trip) after the server should have done so.
    io_timeout = (statement_timeout / 1000 + connect_timeout) if statement_timeout > 0 else None
    install_wait_callback()
    engine = create_engine(
        url,
        pool_size=config["DB_POOL_SIZE"],
        max_overflow=config["DB_MAX_OVERFLOW"],
        pool_timeout=config["DB_POOL_TIMEOUT"],
        pool_recycle=config["DB_POOL_RECYCLE"],
        # orjson for the tags column: the stdlib json parser was a tenth of a 50-task page's cost.
        json_serializer=lambda value: to_json(value).decode(),
        json_deserializer=orjson.loads,
        # No hstore columns: skip psycopg2's type lookup on each new connection, a query outside our cursor's
        # statement timeout (todo_api/deadlines.py) and a round trip.
        use_native_hstore=False,
        connect_args={
            "connect_timeout": connect_timeout,
            # Bytes the server's host never acknowledges (a partition) fail the connection in connect_timeout
            # seconds instead of after some 15 minutes of retransmissions. Linux only; ignored elsewhere.
            "tcp_user_timeout": connect_timeout * 1000,
            **KEEPALIVE_ARGS,
            "connection_factory": deadline_connection_class(connect_timeout or None, io_timeout, statement_timeout),
        },
    )
    event.listen(engine, "checkout", discard_if_closed_by_server)
    engine.dialect.reset_isolation_level = restore_default_isolation  # type: ignore[method-assign]
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


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Database:
    """The process's engine and the factories for request sessions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessionmaker: sessionmaker[Session] | None = sessionmaker(bind=engine, expire_on_commit=False)
        # Reads run in autocommit: no BEGIN and ROLLBACK round trips around each GET. Nothing is lost: under
        # PostgreSQL's READ COMMITTED every statement takes its own snapshot inside a transaction too.
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.read_sessionmaker: sessionmaker[Session] | None = sessionmaker(bind=autocommit, expire_on_commit=False)
        self.outage = OutageBreaker(engine)
        # How a request's hot statements get their connection (tests join theirs to a rolled-back transaction).
        self.hot_connection_factory: Callable[[Database, bool], HotConnection] | None = PooledHotConnection

    def new_session(self, read_only: bool) -> Session:
        maker = (self.read_sessionmaker if read_only else None) or self.sessionmaker
        assert maker is not None, "no session factory"
        return maker()


def init_app(app: Flask) -> None:
    engine = make_engine(app.config["DATABASE_URL"], app.config)
    app.extensions["db"] = Database(engine)
    app.teardown_appcontext(remove_session)
    forget_pool_after_fork(engine)


def forget_pool_after_fork(engine: Engine) -> None:
    """A forked child (gunicorn's workers, with preload_app) starts with an empty pool.

    A socket shared by two processes corrupts both sides. close=False forgets the inherited connections without
    sending a terminate message over sockets the parent still owns (SQLAlchemy's recipe for os.fork()).
    """
    engine_ref = weakref.ref(engine)  # an app dropped by its owner (tests) is not kept alive by the hook

    def forget() -> None:
        if (alive := engine_ref()) is not None:
            alive.dispose(close=False)

    os.register_at_fork(after_in_child=forget)


def get_db() -> Database:
    return current_app.extensions["db"]


def get_session(read_only: bool | None = None) -> Session:
    """The request's session, created on first use (DatabaseUnavailable at once while the database is known down).

    `read_only`: whether it only reads (autocommit); by default, whether the request's method is safe. An MCP call
    is always a POST, and says so for its read-only tools."""
    if "db_session" not in g:
        db = get_db()
        db.outage.admit()
        if read_only is None:
            read_only = has_request_context() and request.method in SAFE_METHODS
        g.db_session = db.new_session(read_only=read_only)
    return g.db_session


class HotConnection:
    """One request's DBAPI connection for the hot statements (GET one task, the unfiltered page, the toggle), which
    run one constant SQL string each and read positional rows: no Session, no Core execution.

    Measured in process (bench/inprocess.py): a read through the request Session and Core costs about 250 µs of CPU
    more than the same statement on the pooled DBAPI connection. What the Session path gives is kept: the outage
    breaker admits the request first; psycopg2's errors become SQLAlchemy's (DBAPIError.instance, as Core wraps
    them), so errors.py answers 503 and the breaker notices an unreachable server; a dropped connection is
    invalidated. The statement timeout is the connection class's own (deadlines.py), so it holds here too. Unlike
    Core, a disconnect does not invalidate the rest of the pool (that is not public API): the checkout hook
    (discard_if_closed_by_server) discards each connection the server closed as it comes out.

    Reads run in autocommit, as the read sessions do, and so does a write sent as one query string (a create, a
    toggle, an update without preconditions): PostgreSQL runs the string as one transaction and commits it as it
    ends, with no BEGIN and COMMIT round trips (measured with wrk: see README, Performance). Any other write runs
    in a transaction that only the view commits; close() rolls back what was not committed and gives the
    connection back.
    """

    def __init__(self, db: Database, autocommit: bool) -> None:
        self.db = db
        self.autocommit = autocommit

    def execute(self, statement: str, parameters: dict[str, Any]) -> Any:
        """Run one statement; the cursor, to fetch its rows."""
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PooledHotConnection(HotConnection):
    """A connection of the engine's pool, checked out for the request (checkout hooks included)."""

    def __init__(self, db: Database, autocommit: bool) -> None:
        super().__init__(db, autocommit)
        try:
            self.connection: PoolProxiedConnection = db.engine.raw_connection()
        except psycopg2.Error as error:  # could not connect: the breaker's business
            raise db_error(db, error, None, None, None) from error
        if autocommit:
            self.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]

    def execute(self, statement: str, parameters: dict[str, Any]) -> Any:
        try:
            cursor = self.connection.cursor()
            cursor.execute(statement, parameters)
        except psycopg2.Error as error:
            raise db_error(self.db, error, statement, parameters, self.connection) from error
        return cursor

    def commit(self) -> None:
        try:
            self.connection.commit()
        except psycopg2.Error as error:
            raise db_error(self.db, error, "COMMIT", None, self.connection) from error

    def close(self) -> None:
        """Back to the pool (which rolls back an open transaction), out of autocommit as the pool expects."""
        connection = self.connection
        try:
            if self.autocommit and connection.dbapi_connection is not None and not connection.dbapi_connection.closed:
                connection.dbapi_connection.autocommit = False
        finally:
            connection.close()


def db_error(db: Database, error: psycopg2.Error, statement: str | None, parameters: Any,
             connection: PoolProxiedConnection | None) -> SQLAlchemyError:
    """psycopg2's error as SQLAlchemy's Core would raise it: OperationalError for a lost or unreachable server...
    A disconnect invalidates the connection, so the pool never hands it out again; the outage breaker hears of it
    as of a Core error."""
    dialect = db.engine.dialect
    invalidated = connection is not None and connection.dbapi_connection is not None and dialect.is_disconnect(
        error, connection.dbapi_connection, None
    )
    if invalidated:
        connection.invalidate(error)  # type: ignore[union-attr]
    db.outage.record_failure(error, connected=connection is not None)
    return DBAPIError.instance(statement, parameters, error, psycopg2.Error, connection_invalidated=invalidated,
                               dialect=dialect)


def get_hot_connection(autocommit: bool) -> HotConnection:
    """The request's connection for hot statements, opened on first use (DatabaseUnavailable at once while the
    database is known down). A request uses it or the session, never both."""
    hot = g.get("db_hot")
    if hot is None:
        db = get_db()
        db.outage.admit()
        assert db.hot_connection_factory is not None, "no connection factory"
        hot = g.db_hot = db.hot_connection_factory(db, autocommit)
    return hot


class SessionExecutor:
    """The repositories' constant SQL (an Executor) on a request Session's connection, in its transaction and with
    SQLAlchemy's error handling: for callers that hold a session, such as an MCP tool call."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def execute(self, statement: str, parameters: dict[str, Any]) -> Any:
        return self.session.connection().exec_driver_sql(statement, parameters)


def remove_session(_exc: BaseException | None = None) -> None:
    hot = g.pop("db_hot", None)
    if hot is not None:
        try:
            hot.close()
        except Exception:
            log.exception("could not release the database connection", extra={"request_id": g.get("request_id")})
    session = g.pop("db_session", None)
    if session is not None:
        try:
            session.close()
        except Exception:
            # The response is complete: an error while giving the connection back must not replace it with
            # gunicorn's HTML 500. SQLAlchemy invalidates a connection whose rollback failed.
            log.exception("could not release the database session", extra={"request_id": g.get("request_id")})

"""One SQLAlchemy engine per process, and a session per request."""

from __future__ import annotations

import select
from typing import Any

from flask import Flask, current_app, g, has_request_context, request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, config: dict[str, Any]) -> Engine:
    """A pooled engine that survives connections the server dropped (Neon suspends idle computes)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 5, "check_same_thread": False})
        _fix_sqlite_transactions(engine)
        return engine

    statement_timeout = int(config.get("DB_STATEMENT_TIMEOUT_MS", 10_000))
    engine = create_engine(
        url,
        pool_size=config.get("DB_POOL_SIZE", 5),
        max_overflow=config.get("DB_MAX_OVERFLOW", 5),
        pool_timeout=config.get("DB_POOL_TIMEOUT", 5),
        pool_recycle=config.get("DB_POOL_RECYCLE", 240),
        connect_args={"connect_timeout": config.get("DB_CONNECT_TIMEOUT", 5)},
    )
    event.listen(engine, "checkout", discard_if_closed_by_server)

    # A SET rather than the `options` startup parameter, which Neon's pooler does not pass through.
    @event.listens_for(engine, "connect")
    def set_session_defaults(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = %s", (statement_timeout,))
            cursor.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()

    return engine


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
        session.close()

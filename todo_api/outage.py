"""Fail fast while the database is unreachable, and notice by itself when it is back.

Without this, every request waits out the timeouts on its own: with the database blackholed, 8 to 10 s each,
every worker thread tied up, a spinner in the frontend. Once this process has seen the database unreachable (a
connection that could not be opened, or a server that stopped answering within the client-side deadline), requests
get 503 at once, and one background probe per process tries a fresh connection every PROBE_INTERVAL. When it gets
through, the pool is started afresh (connections from before may be stalled) and requests are served again. A
statement cancelled by statement_timeout, or a connection the server closed, is no sign of an unreachable database
and changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from .deadlines import NO_ANSWER, deadline_connection_class

log = logging.getLogger(__name__)

PROBE_INTERVAL = 0.5  # seconds between probes
PROBE_TIMEOUT = 1  # seconds for a probe's connection (libpq takes whole seconds), and as much again for its SELECT


class DatabaseUnavailable(SQLAlchemyError):
    """Refused without trying: the database was unreachable a moment ago and is being probed."""


class OutageBreaker:
    """One per engine (per process), shared by the worker's threads."""

    def __init__(self, engine: Engine, probe_interval: float = PROBE_INTERVAL) -> None:
        self.engine = engine
        self.probe_interval = probe_interval
        self.unreachable_since: float | None = None
        self._lock = threading.Lock()
        event.listen(engine, "handle_error", self._on_error)

    def admit(self) -> None:
        """Before a request's first database work: DatabaseUnavailable at once while the database is down."""
        if self.unreachable_since is not None:
            raise DatabaseUnavailable("database unreachable; probing")

    def _on_error(self, context: Any) -> None:
        self.record_failure(context.original_exception, connected=context.connection is not None)

    def record_failure(self, error: BaseException, *, connected: bool) -> None:
        """A database error, from Core (the engine's handle_error event) or from a DBAPI connection used directly
        (db.HotConnection): an outage if no connection could be opened or the server stopped answering."""
        if connected and NO_ANSWER not in str(error):
            return
        with self._lock:
            if self.unreachable_since is not None:
                return
            self.unreachable_since = time.monotonic()
        log.warning("database unreachable: answering 503 at once until a probe gets through")
        threading.Thread(target=self._probe_until_back, name="database-probe", daemon=True).start()

    def _probe_until_back(self) -> None:
        probe = create_engine(self.engine.url, poolclass=NullPool, connect_args={
            "connect_timeout": PROBE_TIMEOUT,
            "connection_factory": deadline_connection_class(PROBE_TIMEOUT, 2 * PROBE_TIMEOUT),
        })
        try:
            while not self._reached(probe):
                time.sleep(self.probe_interval)
        finally:
            probe.dispose()
        self.engine.dispose(close=False)  # pooled connections from before the outage may be stalled for good
        down_for = time.monotonic() - (self.unreachable_since or time.monotonic())
        self.unreachable_since = None
        log.warning("database reachable again after %.1f s", down_for)

    @staticmethod
    def _reached(probe: Engine) -> bool:
        try:
            with probe.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        except SQLAlchemyError:
            return False
        return True

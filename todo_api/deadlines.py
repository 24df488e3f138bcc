"""Deadlines on the app's database work, in its psycopg2 connection class.

1. The server's statement_timeout, in force for every transaction and nothing else. Neon's pooled endpoint is
   PgBouncer in transaction mode: a client's consecutive transactions run on different server connections that
   other clients share, so a session SET (at connect) leaks to them, is lost when the pooler replaces its server
   connections, and another client's SET leaks to us. `SET LOCAL` lasts exactly one transaction. It rides in front
   of the transaction's first statement, in the same simple-query string, so it costs no round trip: psycopg2
   interpolates parameters client-side, and PostgreSQL runs a multi-statement string as one (implicit) transaction,
   which is also how an autocommit read gets it. It is done in the cursor, so every statement gets it, SQLAlchemy's
   own on connect included.
2. The client's own deadline. The server cancels a statement after statement_timeout, but only a server that still
   answers can: a frozen server, a stalled proxy or a lost network would hold the request forever, and libpq's
   blocking calls have no deadline of their own. With a wait callback psycopg2 drives libpq's non-blocking API and
   calls back whenever it would block, so the wait can be abandoned.

Time zones need no session setting either: models.UTCDateTime converts what the server sends, whatever its zone.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from typing import Any

import psycopg2
import psycopg2.extensions

log = logging.getLogger(__name__)

NO_ANSWER = "no answer within"  # in the error of a deadline that passed (read by outage.py)
POLL_EVENTS = {psycopg2.extensions.POLL_READ: select.POLLIN, psycopg2.extensions.POLL_WRITE: select.POLLOUT}


class StatementTimeoutCursor(psycopg2.extensions.cursor):
    """Puts `SET LOCAL statement_timeout` in front of the first statement of each transaction."""

    connection: DeadlineConnection

    def execute(self, query: Any, vars: Any = None) -> None:
        super().execute(self.connection.with_timeout(query), vars)

    def executemany(self, query: Any, vars_list: Any) -> None:
        super().executemany(self.connection.with_timeout(query), vars_list)


class DeadlineConnection(psycopg2.extensions.connection):
    """A psycopg2 connection with a statement timeout per transaction, and client-side deadlines enforced by
    wait_with_deadline (seconds, None: none)."""

    connect_deadline: float | None = None
    io_deadline: float | None = None
    timeout_prefix = ""  # "SET LOCAL statement_timeout = N; ", or "" for none

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = StatementTimeoutCursor

    def with_timeout(self, query: Any) -> Any:
        # READY: no transaction is open, so psycopg2 begins one (or, in autocommit, this statement is its own).
        if self.timeout_prefix and (self.autocommit or self.status == psycopg2.extensions.STATUS_READY):
            return self.timeout_prefix + query if isinstance(query, str) else self.timeout_prefix.encode() + query
        return query


def deadline_connection_class(connect_timeout: float | None, io_timeout: float | None,
                              statement_timeout_ms: int = 0) -> type[DeadlineConnection]:
    """A connection_factory for psycopg2.connect with these deadlines."""
    prefix = f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}; " if statement_timeout_ms > 0 else ""
    return type("DeadlineConnection", (DeadlineConnection,),
                {"connect_deadline": connect_timeout, "io_deadline": io_timeout, "timeout_prefix": prefix})


def install_wait_callback() -> None:
    """Make psycopg2 wait for the server through wait_with_deadline, in this process.

    libpq's connect_timeout is ignored in this mode, so the callback applies it. A callback that another library
    installed (a coroutine library's) is left alone.
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
    while (state := connection.poll()) != psycopg2.extensions.POLL_OK:
        if state not in POLL_EVENTS:
            raise psycopg2.OperationalError(f"unexpected poll state {state}")
        poller = select.poll()
        poller.register(connection.fileno(), POLL_EVENTS[state])  # libpq may change sockets while connecting
        if deadline is None:
            poller.poll()
        elif not poller.poll(max(deadline - time.monotonic(), 0) * 1000) and time.monotonic() >= deadline:
            _shut_down(connection)
            phase = "connecting" if connecting else "waiting for a result"
            raise psycopg2.OperationalError(
                f"could not receive data from server: {NO_ANSWER} {timeout:g} s while {phase}"
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

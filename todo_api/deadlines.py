"""Client-side deadlines for psycopg2: a server that stops answering fails the request instead of holding it.

The server cancels a statement after statement_timeout, but only a server that still answers can: a frozen
server, a stalled proxy or a lost network would hold the request forever, and libpq's blocking calls have no
deadline of their own. With a wait callback psycopg2 drives libpq's non-blocking API and calls back whenever it
would block, so the wait can be abandoned.
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

POLL_EVENTS = {psycopg2.extensions.POLL_READ: select.POLLIN, psycopg2.extensions.POLL_WRITE: select.POLLOUT}


class DeadlineConnection(psycopg2.extensions.connection):
    """A psycopg2 connection with client-side deadlines, enforced by wait_with_deadline (seconds, None: none)."""

    connect_deadline: float | None = None
    io_deadline: float | None = None


def deadline_connection_class(connect_timeout: float | None, io_timeout: float | None) -> type[DeadlineConnection]:
    """A connection_factory for psycopg2.connect with these deadlines."""
    return type("DeadlineConnection", (DeadlineConnection,),
                {"connect_deadline": connect_timeout, "io_deadline": io_timeout})


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

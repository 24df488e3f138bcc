"""gunicorn's gthread worker, hardened for clients on the open internet (gunicorn.conf.py's `worker_class`).

gthread hands a connection to a thread as soon as it is readable, and the thread then reads the request head with
no deadline: one byte is enough to hold a thread for good, and gunicorn 27.0.1 has no setting for a header-read
timeout. Measured with `python -m tests.slow_clients --seconds 20` (2 workers x 4 threads on this 2-core machine,
each trickling socket sending a byte a second and never ending its head, a normal GET /health every 50 ms):
gthread answered 0 of 4 to 9 of 13 normal requests with 32 such sockets (the others timed out after 5 s) and 0 of
4 with 256; this worker answered 398 of 398 with 256 (p50 3 ms, p99 7-8 ms). It changes three things, no more:

- **Request heads are read by the worker's event loop, never by a thread.** A connection goes to the thread pool
  only once its head is complete (or broken in a way gunicorn's parser refuses at once, such as a bare LF). A head
  not complete HEAD_TIMEOUT seconds after the connection was accepted (or after the first byte of a kept-alive
  connection's next request) is answered 408 and closed; an idle connection is closed silently. A head over
  MAX_HEAD_BYTES is 431.
- **Closing is never a wait.** gunicorn 27 closes a connection by draining it for up to 2 s *in the event loop*
  (util.close_graceful), so a client that never closes stalls every connection of the worker for 2 s: 8 such
  clients kept a 1-worker server from answering 5 of 8 requests within 3 s. Here the drain is lingering: the socket
  is shut for writing and read by the event loop until the client closes, for at most LINGER_SECONDS and
  LINGER_BYTES, so a client still sending a body it was refused (413, 401...) reads the answer instead of a reset.
  Of a body the app left unread, a thread reads only what has already arrived (gthread's own drain waits up to
  5 s in the thread: 256 sockets trickling such bodies left 0 of 4 normal requests answered); if more is to come,
  the connection closes and the lingering close reads it.
- **Requests the server refuses get the app's JSON envelope** ({"detail": ...}), its security headers and an
  X-Request-ID, instead of gunicorn's HTML page, with one WARNING line; an HTTP/1.1 request without Host is one
  of them (400, RFC 9112 section 3.2).

It overrides public methods of gunicorn's workers: `accept` (to make a Connection), `enqueue_req`,
`murder_pending`, `handle_request`, `handle_error`, and `TConn.close`. The internals it relies on, all here: the
worker's `poller` and `nr_conns`, and a connection's `parser.unreader` (`take_buffered()` and `unread()`), through
which the head read here is handed to gunicorn's own parser. It serves plain HTTP/1.1 only: TLS, HTTP/2 and the
PROXY protocol (gunicorn's other ways of reading a head) stop start-up. tests/test_hostile_clients.py runs it in
the real gunicorn.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
import uuid
from datetime import timedelta
from functools import partial
from http import HTTPStatus
from typing import Any

from gunicorn import util
from gunicorn.http.errors import (
    ConfigurationProblem,
    ExpectationFailed,
    ForbiddenProxyRequest,
    InvalidResponseHeader,
    InvalidResponseHeaderName,
    LimitRequestHeaders,
    LimitRequestLine,
    ParseException,
    UnsupportedTransferCoding,
)
from gunicorn.http.wsgi import Response, default_environ
from gunicorn.workers.gthread import TConn
from gunicorn.workers.gthread import ThreadWorker as GthreadWorker

from .observability import REQUEST_ID_HEADER, SAFE_REQUEST_ID
from .web import API_CSP, SECURITY_HEADERS, to_json

HEAD_TIMEOUT = 5.0  # seconds for a whole request head
MAX_HEAD_BYTES = 32 * 1024  # a whole request head; gunicorn.conf.py's limit_request_field_size bounds each field
HEAD_READ_BYTES = 16 * 1024  # one recv() of a head
LINGER_SECONDS = 5.0  # a closing connection is drained for at most this long...
LINGER_BYTES = 1024 * 1024  # ...and this much: a refused body up to 1 MiB is read, so the client reads the answer
BODY_DRAIN_BYTES = 64 * 1024  # what a thread reads, without waiting, of a body the app left unread


class MissingHost(ParseException):
    def __str__(self) -> str:
        return "HTTP/1.1 request without Host"


class Connection(TConn):
    """gthread's connection, plus the head read so far and a close that never blocks the event loop."""

    def __init__(self, worker: ThreadWorker, *args: Any) -> None:
        super().__init__(*args)
        self.worker = worker
        self.head = bytearray()
        self.deadline = 0.0  # of the head being read, or of the lingering close
        self.drained = 0  # bytes read by the lingering close
        self.polled = False  # registered with the worker's poller by this module

    def close(self, graceful: bool = False) -> None:
        if graceful:
            self.worker.linger(self)
        else:
            super().close()


def head_ready(data: bytes | bytearray, start: int = 0) -> bool:
    """Whether gunicorn's parser can decide on this head without waiting for more: its end is there, or a bare LF,
    which the parser refuses. Only the bytes from `start` on are new (a CRLFCRLF may straddle it)."""
    if data.find(b"\r\n\r\n", max(0, start - 3)) >= 0:
        return True
    index = data.find(b"\n", start)
    while index >= 0:
        if index == 0 or data[index - 1] != 0x0D:
            return True
        index = data.find(b"\n", index + 1)
    return False


class ThreadWorker(GthreadWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Connections reading a head, and closing ones, each in deadline order (one timeout for all of them).
        self.reading: dict[Connection, None] = {}
        self.lingering: dict[Connection, None] = {}

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        super().check_config(cfg, log)
        if cfg.is_ssl or cfg.http2_cleartext != "off" or cfg.proxy_protocol != "off" or cfg.http_protocols != ["h1"]:
            raise RuntimeError(f"{cls.__module__}.{cls.__name__} serves plain HTTP/1.1 only: no TLS, HTTP/2 or "
                               "PROXY protocol (terminate TLS in front of it, or use gunicorn's gthread)")

    # --- reading heads in the event loop -------------------------------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        self.nr_conns += 1
        self.enqueue_req(Connection(self, self.cfg, sock, address, listener.getsockname()))

    def enqueue_req(self, conn: Connection) -> None:
        """A new or kept-alive connection with a request to read: read its head here, then hand it to a thread."""
        if conn.parser is not None:  # what the parser read ahead after the last request comes first
            conn.head[:0] = conn.parser.unreader.take_buffered()
        conn.deadline = time.monotonic() + HEAD_TIMEOUT
        conn.sock.setblocking(False)
        self.reading[conn] = None
        self.read_head(conn, start=0)

    def on_head_readable(self, conn: Connection, _sock: socket.socket) -> None:
        self.read_head(conn, start=len(conn.head))

    def read_head(self, conn: Connection, start: int) -> None:
        if not head_ready(conn.head, start):
            try:
                data = conn.sock.recv(HEAD_READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return self.poll(conn, self.on_head_readable)
            except OSError:
                data = b""
            if not data:  # the client left
                return self.drop(conn)
            conn.head += data
        if len(conn.head) > MAX_HEAD_BYTES and conn.head.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES) < 0:
            return self.refuse(conn, 431, f"The request head is over {MAX_HEAD_BYTES} bytes")
        if not head_ready(conn.head, start):
            return self.poll(conn, self.on_head_readable)
        self.unpoll(conn)
        del self.reading[conn]
        conn.sock.setblocking(True)
        conn.init()  # plain HTTP/1.1 (check_config): makes the parser, reads nothing
        conn.parser.unreader.unread(bytes(conn.head))
        conn.head.clear()
        super().enqueue_req(conn)

    def murder_pending(self) -> None:
        """gthread's own expiry, then heads past their deadline (408 if begun), and lingering closes past theirs.
        A stopping worker does not wait for requests that have not begun."""
        super().murder_pending()
        now = time.monotonic()
        for conn in list(self.reading):
            expired = conn.deadline <= now
            if not expired and self.alive:
                break
            if expired and conn.head:
                self.refuse(conn, 408, f"The request head did not arrive within {HEAD_TIMEOUT:.0f} s")
            elif expired or not conn.head:
                self.drop(conn)
        for conn in list(self.lingering):
            if conn.deadline > now:
                break
            self.forget_lingering(conn)

    # --- closing without waiting ---------------------------------------------------------------------------------

    def linger(self, conn: Connection) -> None:
        """Close after the answer was sent: FIN now, then read what the client still sends until it closes, at most
        LINGER_SECONDS and LINGER_BYTES, so that no unread byte makes the kernel reset the connection first."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
        except OSError:
            return TConn.close(conn)
        conn.deadline = time.monotonic() + LINGER_SECONDS
        conn.drained = 0
        self.lingering[conn] = None
        self.poll(conn, self.on_lingering_readable)

    def on_lingering_readable(self, conn: Connection, _sock: socket.socket) -> None:
        try:
            data = conn.sock.recv(64 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if not data or conn.drained >= LINGER_BYTES:
            self.forget_lingering(conn)

    def forget_lingering(self, conn: Connection) -> None:
        self.unpoll(conn)
        self.lingering.pop(conn, None)
        TConn.close(conn)

    # --- refusing ------------------------------------------------------------------------------------------------

    def handle_request(self, req: Any, conn: Connection) -> bool:
        """RFC 9112 section 3.2: an HTTP/1.1 request without Host is 400. After the app's answer, keep the
        connection alive only if what is left of the request's body has already arrived: it is read without
        waiting (up to BODY_DRAIN_BYTES), else the connection closes and the event loop drains it (linger())."""
        if req.version >= (1, 1) and not any(name == "HOST" for name, _ in req.headers):
            raise MissingHost()
        if not super().handle_request(req, conn):
            return False
        conn.sock.setblocking(False)
        try:
            return conn.parser.finish_body(max_bytes=BODY_DRAIN_BYTES)
        except (ParseException, OSError):  # not arrived yet (BlockingIOError), malformed, or the client left
            return False
        finally:
            conn.sock.setblocking(True)

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        """gunicorn's refusals of a request (and its last-resort 500), as the app's JSON envelope."""
        status, detail = self.refusal(exc)
        address = addr[0] if addr else ""
        if status >= 500:
            self.log.exception("Error handling request %s %s", getattr(req, "method", ""), getattr(req, "uri", ""))
        else:
            self.log.warning("Invalid request from ip=%s: %s (%s)", address, exc, status)
        if req is not None:
            response = Response(req, client, self.cfg)
            response.status = f"{status} {HTTPStatus(status).phrase}"
            self.log.access(response, req, default_environ(req, client, self.cfg), timedelta(0))
        send_quietly(client, error_response(status, detail, _incoming_request_id(req)))

    def refusal(self, exc: BaseException) -> tuple[int, str]:
        """The status and detail for what gunicorn raised, as its Worker.handle_error maps them."""
        if isinstance(exc, InvalidResponseHeader | InvalidResponseHeaderName | ConfigurationProblem) or (
            not isinstance(exc, ParseException)
        ):
            return 500, "Internal server error"
        if isinstance(exc, MissingHost):
            return 400, "An HTTP/1.1 request needs a Host header"
        if isinstance(exc, LimitRequestLine):
            return 414, f"The request line is over {self.cfg.limit_request_line} bytes"
        if isinstance(exc, LimitRequestHeaders):
            return 431, (f"Request header fields too large: at most {self.cfg.limit_request_fields} fields of "
                         f"{self.cfg.limit_request_field_size} bytes, {MAX_HEAD_BYTES} bytes in all")
        if isinstance(exc, UnsupportedTransferCoding):
            return 501, "Unsupported transfer coding"
        if isinstance(exc, ExpectationFailed):
            return 417, "Expectation failed"
        if isinstance(exc, ForbiddenProxyRequest):
            return 403, "Forbidden"
        return 400, "Malformed request"

    def refuse(self, conn: Connection, status: int, detail: str) -> None:
        """Answer from the event loop (the head is not parsed: a new request id) and close."""
        self.log.warning("Invalid request from ip=%s: %s (%s)", conn.client[0] if conn.client else "", detail, status)
        send_quietly(conn.sock, error_response(status, detail, uuid.uuid4().hex))
        self.unpoll(conn)
        self.reading.pop(conn, None)
        self.nr_conns -= 1
        self.linger(conn)

    # --- poller bookkeeping --------------------------------------------------------------------------------------

    def poll(self, conn: Connection, callback: Any) -> None:
        """Call back when the socket is readable; a connection stays registered until unpoll()."""
        if not conn.polled:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(callback, conn))
            conn.polled = True

    def unpoll(self, conn: Connection) -> None:
        if conn.polled:
            self.poller.unregister(conn.sock)
            conn.polled = False

    def drop(self, conn: Connection) -> None:
        """A connection that never got to a request: close it, it no longer counts."""
        self.unpoll(conn)
        self.reading.pop(conn, None)
        self.nr_conns -= 1
        TConn.close(conn)


def error_response(status: int, detail: str, request_id: str) -> bytes:
    """A whole HTTP/1.1 response with the app's error envelope and security headers; the connection closes."""
    body = to_json({"detail": detail})
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Date: {util.http_date()}",
        "Connection: close",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in SECURITY_HEADERS.items()),
        f"Content-Security-Policy: {API_CSP}",
        f"{REQUEST_ID_HEADER}: {request_id}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _incoming_request_id(req: Any) -> str:
    """The client's X-Request-ID when the head was parsed and the id is safe to echo, as the app does."""
    for name, value in getattr(req, "headers", None) or ():
        if name == REQUEST_ID_HEADER.upper() and SAFE_REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """One non-blocking send of a small answer into an empty socket buffer; a client that is gone is no error."""
    try:
        sock.setblocking(False)
        sock.send(data)
    except OSError:
        pass

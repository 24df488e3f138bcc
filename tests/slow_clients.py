"""Slow clients against the real gunicorn: connections that trickle a request head and never finish it (or, with
--body, a body after a whole head), while normal requests are timed. Used by test_slow_clients.py; run alone, it
prints the figures for the README:

    .venv/bin/python -m tests.slow_clients --sockets 256 --seconds 20
    .venv/bin/python -m tests.slow_clients --sockets 32 --seconds 20 --worker-class gthread   # gunicorn's own

Loopback only, and bounded: the tricklers stop after `seconds`, each probe waits at most `probe_timeout`.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import os
import selectors
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

from .live_server import live_server, server_env

# A head that never ends: one more byte of a header value each tick.
ENDLESS_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
# A whole head, at once, announcing a body that then comes a byte a tick (the app answers without reading it).
SLOW_BODY_HEAD = b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"


@dataclass
class Figures:
    sockets: int
    seconds: float
    trickled: str = "heads"  # or "bodies"
    probes: int = 0
    answered: int = 0
    latencies: list[float] = field(default_factory=list)  # of the answered probes, in seconds
    failures: dict[str, int] = field(default_factory=dict)
    connections: int = 0  # trickling connections opened, reconnections included
    closed_by_server: int = 0
    lifetimes: list[float] = field(default_factory=list)  # of the connections the server closed, in seconds
    answers: dict[str, int] = field(default_factory=dict)  # first line of what the server sent them, if anything

    def p(self, fraction: float) -> float:
        """A latency percentile in seconds (nearest rank), an unanswered probe counting as infinitely slow."""
        ordered = sorted(self.latencies) + [float("inf")] * (self.probes - self.answered)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("inf")

    def summary(self) -> str:
        lifetimes = (f"median {statistics.median(self.lifetimes):.1f} s, max {max(self.lifetimes):.1f} s"
                     if self.lifetimes else "none closed")
        latency = ", ".join(f"{name} {_ms(self.p(fraction))}"
                            for name, fraction in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)))
        return (f"{self.sockets} sockets trickling {self.trickled} for {self.seconds:.0f} s: "
                f"{self.answered}/{self.probes} normal requests answered ({latency}; "
                f"failures {self.failures or 'none'}); {self.connections} trickling connections, "
                f"{self.closed_by_server} closed by the server ({lifetimes}; answers {self.answers or 'none'})")


def _ms(seconds: float) -> str:
    return "no answer" if seconds == float("inf") else f"{seconds * 1000:.0f} ms"


@dataclass
class Trickle:
    opened: float
    sent: int  # bytes of the head sent so far
    answer: bytes = b""


class Tricklers:
    """`count` connections, each sending one more byte every `interval` seconds: of an endless head, or (`body`)
    of a body after a whole head. A head's connection that the server closes is replaced at the next tick (a body's
    is not: once answered, it asks for nothing more). One thread, one selector."""

    def __init__(self, port: int, count: int, interval: float = 1.0, body: bool = False) -> None:
        self.port, self.count, self.interval = port, count, interval
        self.body = body
        self.start = SLOW_BODY_HEAD if body else ENDLESS_HEAD[:1]
        self.head = SLOW_BODY_HEAD if body else ENDLESS_HEAD
        self.selector = selectors.DefaultSelector()
        self.trickles: dict[socket.socket, Trickle] = {}
        self.figures_lock = threading.Lock()
        self.connections = 0
        self.to_open = 0  # replacements for closed connections, opened at the next tick
        self.closed: list[float] = []
        self.answers: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tricklers", daemon=True)

    def __enter__(self) -> Tricklers:
        for _ in range(self.count):
            self._open()
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for sock in list(self.trickles):
            self._forget(sock)
        self.selector.close()

    def _open(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(self.start)
        sock.setblocking(False)
        self.trickles[sock] = Trickle(time.monotonic(), len(self.start))
        self.selector.register(sock, selectors.EVENT_READ)
        self.connections += 1

    def _forget(self, sock: socket.socket) -> Trickle:
        self.selector.unregister(sock)
        sock.close()
        return self.trickles.pop(sock)

    def _closed_by_server(self, sock: socket.socket) -> None:
        trickle = self._forget(sock)
        first_line = trickle.answer.split(b"\r\n", 1)[0].decode("latin-1")[:40] or "(nothing)"
        with self.figures_lock:
            self.closed.append(time.monotonic() - trickle.opened)
            self.answers[first_line] = self.answers.get(first_line, 0) + 1
        self.to_open += not self.body

    def _run(self) -> None:
        next_tick = time.monotonic() + self.interval
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=max(0.0, next_tick - time.monotonic())):
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if data:
                    self.trickles[key.fileobj].answer += data
                else:
                    self._closed_by_server(key.fileobj)
            if time.monotonic() < next_tick:
                continue
            next_tick += self.interval
            for _ in range(self.to_open):
                self._open()
            self.to_open = 0
            for sock, trickle in list(self.trickles.items()):
                try:
                    sock.send(self.head[trickle.sent:trickle.sent + 1] or b"a")
                    trickle.sent += 1
                except BlockingIOError:
                    pass
                except OSError as error:
                    if error.errno not in (errno.EPIPE, errno.ECONNRESET):
                        raise
                    self._closed_by_server(sock)


def probe(port: int, timeout: float) -> float | str:
    """One GET /health on a new connection: its latency in seconds, or what went wrong."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        return time.perf_counter() - started if response.status == 200 else f"status {response.status}"
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__
    finally:
        connection.close()


def measure(port: int, sockets: int, seconds: float, *, body: bool = False, warm_up: float = 3.0,
            probe_interval: float = 0.05, probe_timeout: float = 5.0) -> Figures:
    """Trickle `sockets` heads (or bodies) for `warm_up` + `seconds`; during `seconds`, one normal request every
    `probe_interval` (sequential, so at most seconds / probe_interval of them)."""
    figures = Figures(sockets, seconds, "bodies" if body else "heads")
    with Tricklers(port, sockets, body=body) as tricklers:
        time.sleep(warm_up)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            outcome = probe(port, probe_timeout)
            figures.probes += 1
            if isinstance(outcome, float):
                figures.answered += 1
                figures.latencies.append(outcome)
            else:
                figures.failures[outcome] = figures.failures.get(outcome, 0) + 1
            time.sleep(max(0.0, probe_interval - (time.monotonic() - started)))
        with tricklers.figures_lock:
            figures.connections = tricklers.connections
            figures.closed_by_server = len(tricklers.closed)
            figures.lifetimes = list(tricklers.closed)
            figures.answers = dict(tricklers.answers)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--body", action="store_true", help="trickle bodies after whole heads instead of heads")
    parser.add_argument("--workers", default="2", help="WEB_CONCURRENCY of the server (default 2)")
    parser.add_argument("--worker-class", help="override gunicorn.conf.py's, e.g. gthread for gunicorn's own")
    parser.add_argument("--database-url", default=os.environ.get("TEST_DATABASE_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/test"),
                        help="only for the app's start-up: /health needs no database")
    args = parser.parse_args()
    overrides = {"WEB_CONCURRENCY": args.workers, "LOG_LEVEL": "WARNING"}
    if args.worker_class:
        overrides["GUNICORN_CMD_ARGS"] = f"--worker-class {args.worker_class}"
    with live_server(server_env(args.database_url, **overrides)) as server:
        print(measure(server.port, args.sockets, args.seconds, body=args.body).summary())


if __name__ == "__main__":
    main()

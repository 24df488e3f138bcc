"""Database faults for tests: a loopback TCP proxy that can refuse, drop or blackhole, a PostgreSQL that can be
stopped and started again, and scratch databases.

All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import uuid
from collections.abc import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from todo_api.embedded_postgres import throwaway

FORWARD, BLACKHOLE, DROP, REFUSE = "forward", "blackhole", "drop", "refuse"


class TcpProxy:
    """127.0.0.1:port -> upstream, in one of four modes, switched at run time:

    - forward: bytes flow both ways;
    - blackhole: nothing flows, nothing is closed: open connections stall and new ones are accepted and never
      answered (a network that silently loses packets, a frozen server);
    - drop: every open connection is reset, and new ones are accepted and reset at once;
    - refuse: every open connection is reset and the port is closed (connection refused, a stopped server).
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = FORWARD
        self._listener: socket.socket | None = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._held: list[socket.socket] = []  # accepted in blackhole mode, with no upstream
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._commands: list[tuple[str, threading.Event]] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def set_mode(self, mode: str, timeout: float = 5.0) -> None:
        """Switch modes; returns once the proxy acts on it."""
        assert mode in (FORWARD, BLACKHOLE, DROP, REFUSE), mode
        done = threading.Event()
        with self._lock:
            self._commands.append((mode, done))
        self._wake_writer.send(b"x")
        if not done.wait(timeout):
            raise RuntimeError(f"proxy did not switch to {mode} within {timeout} s")

    def connection_count(self) -> int:
        return len(self._peers) // 2 + len(self._held)

    def close(self) -> None:
        if not self._stopped:
            self.set_mode(REFUSE)
            self._stopped = True
            self._wake_writer.send(b"x")
            self._thread.join(timeout=5)
            self._wake_reader.close()
            self._wake_writer.close()

    # All sockets are handled by the proxy's thread only.

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.setblocking(False)
        return listener

    def _run(self) -> None:
        while not self._stopped:
            for key, _events in self._selector.select(timeout=0.5):
                sock = key.fileobj
                if sock is self._wake_reader:
                    self._wake_reader.recv(4096)
                    self._apply_commands()
                elif sock is self._listener:
                    self._accept()
                else:
                    self._pump(sock)  # type: ignore[arg-type]
        self._selector.close()

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for mode, done in commands:
            self._switch(mode)
            done.set()

    def _switch(self, mode: str) -> None:
        if mode in (DROP, REFUSE):
            for sock in list(self._peers):
                self._close(sock, reset=True)
            for sock in self._held:
                _reset(sock)
            self._held.clear()
        if mode == REFUSE and self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        if mode == BLACKHOLE:
            for sock in self._peers:
                with contextlib.suppress(KeyError):
                    self._selector.unregister(sock)
        if mode == FORWARD:
            if self._listener is None:
                self._listener = self._listen(self.port)
                self._selector.register(self._listener, selectors.EVENT_READ)
            for sock in self._held:  # their clients gave up long ago
                _reset(sock)
            self._held.clear()
            for sock in self._peers:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.register(sock, selectors.EVENT_READ)
        self.mode = mode

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self.mode == DROP:
            _reset(client)
            return
        if self.mode == BLACKHOLE:
            self._held.append(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(client)
            return
        for sock in (client, upstream):
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._selector.register(sock, selectors.EVENT_READ)
        self._peers[client], self._peers[upstream] = upstream, client

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
            if data:
                self._peers[sock].sendall(data)
                return
        except OSError:
            pass
        self._close(sock, reset=False)

    def _close(self, sock: socket.socket, *, reset: bool) -> None:
        peer = self._peers.pop(sock, None)
        if peer is not None:
            self._peers.pop(peer, None)
        for each in (sock, peer):
            if each is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(each)
            if reset:
                _reset(each)
            else:
                each.close()


def _reset(sock: socket.socket) -> None:
    """Close with a RST rather than a FIN, as a crashed host or a middlebox does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


class RestartablePostgres:
    """A throwaway PostgreSQL that can be stopped and started again on the same port and data, to play a database
    server that goes away and comes back."""

    def __init__(self) -> None:
        self._context = throwaway("test")
        self.server = self._context.__enter__()
        self.url = self.server.url("test")
        self.port = self.server.port

    def stop(self) -> None:
        """Fast shutdown: sessions are terminated, clients see the server close their connections."""
        self.server.stop()

    def start(self) -> None:
        self.server.start("test")

    def close(self) -> None:
        self._context.__exit__(None, None, None)


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str = "faults") -> Iterator[str]:
    """A new, empty database on server_url's server, dropped (its sessions terminated) at exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(make_url(server_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()

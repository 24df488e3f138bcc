"""Slow clients and broken HTTP framing against the real gunicorn (gunicorn.conf.py, todo_api/gunicorn_worker.py).

A request head must be complete within HEAD_TIMEOUT seconds and never holds a thread; whatever the server refuses
is the app's JSON envelope with its security headers and an X-Request-ID, never HTML, never a traceback in the
log. Raw sockets send what HTTP clients would not. Figures are printed (`pytest -s`); the only bound on time is
the issue's own: normal requests answered with a p99 under 1 s while 256 sockets trickle heads.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from todo_api.gunicorn_worker import HEAD_TIMEOUT, MAX_HEAD_BYTES, head_ready
from todo_api.observability import SAFE_REQUEST_ID
from todo_api.web import API_CSP, SECURITY_HEADERS

from .helpers import delete_tasks_of, make_token
from .live_server import LiveServer, live_server, server_env
from .slow_clients import measure

pytestmark = pytest.mark.slow

FIELD_LIMIT = 16 * 1024  # gunicorn.conf.py's limit_request_field_size
TOKEN_LIMIT = 8 * 1024  # todo_api/auth.py's MAX_TOKEN_LENGTH
AUTHORIZATION = b"Authorization: Bearer "
CLOSE_MARGIN = 2.0  # seconds after a deadline within which the connection must be gone
TOO_LARGE = {"detail": "Request body too large (limit 64 KiB)"}


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Two workers of 4 threads; only the well-formed chunked create reaches the database."""
    env = server_env(database_url, LOG_LEVEL="WARNING")
    with live_server(env, log_dir=tmp_path_factory.mktemp("gunicorn")) as server:
        yield server


@pytest.fixture
def log(server: LiveServer) -> Iterator[list[str]]:
    """What the server logs during the test (read at its end): never an error or a traceback."""
    lines: list[str] = []
    start = len(server.output())
    yield lines
    time.sleep(0.2)
    lines.extend(server.output()[start:].splitlines())
    assert not [line for line in lines if "Traceback" in line or "ERROR" in line], lines


def connect(server: LiveServer, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or the socket's timeout)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def exchange(server: LiveServer, raw: bytes) -> bytes:
    with connect(server) as sock:
        sock.sendall(raw)
        return read_to_end(sock)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """The first response in raw bytes: status, headers (lower-case names), body."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, rest[:int(headers.get("content-length", len(rest)))]


def assert_envelope(raw: bytes, status: int, detail: str | None = None) -> dict[str, str]:
    """The app's error envelope with `status`, its security headers and a request id; the headers."""
    assert raw, "no answer"
    code, headers, body = parse(raw)
    assert code == status, raw[:500]
    assert headers["content-type"] == "application/json"
    envelope = json.loads(body)
    assert list(envelope) == ["detail"] and (detail is None or envelope["detail"] == detail), envelope
    for name, value in SECURITY_HEADERS.items():
        assert headers[name.lower()] == value
    assert headers["content-security-policy"] == API_CSP
    assert SAFE_REQUEST_ID.match(headers["x-request-id"])
    assert b"<html" not in raw.lower()
    return headers


def get(path: str = "/health", *headers: bytes, version: bytes = b"HTTP/1.1", host: bool = True) -> bytes:
    lines = [b"GET " + path.encode() + b" " + version, *([b"Host: 127.0.0.1"] if host else []), *headers,
             b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# --- 1. slow clients ----------------------------------------------------------------------------------------------

def test_256_trickling_heads_leave_normal_requests_answered_within_1_s(server):
    figures = measure(server.port, sockets=256, seconds=10)
    print(figures.summary())
    assert figures.answered == figures.probes > 0, figures.failures
    assert figures.p(0.99) < 1.0
    # Every trickler was cut off at its deadline, told why, and reconnected.
    assert figures.closed_by_server >= 256
    assert max(figures.lifetimes) < HEAD_TIMEOUT + CLOSE_MARGIN
    assert list(figures.answers) == ["HTTP/1.1 408 Request Timeout"]


def test_a_head_unfinished_after_5_s_gets_408_json_and_a_close(server, log):
    with connect(server, timeout=HEAD_TIMEOUT + 5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: slow-1\r\n")
        answer = read_to_end(sock)
        elapsed = time.monotonic() - started
    print(f"a head left unfinished: answered and closed after {elapsed:.2f} s")
    assert HEAD_TIMEOUT - 0.5 < elapsed < HEAD_TIMEOUT + CLOSE_MARGIN
    assert_envelope(answer, 408, f"The request head did not arrive within {HEAD_TIMEOUT:.0f} s")


def test_an_idle_connection_is_closed_after_5_s_without_an_answer(server):
    with connect(server, timeout=HEAD_TIMEOUT + 10) as sock:
        started = time.monotonic()
        answer = read_to_end(sock)
        elapsed = time.monotonic() - started
    print(f"an idle connection: closed after {elapsed:.2f} s")
    assert answer == b""
    assert elapsed < HEAD_TIMEOUT + CLOSE_MARGIN


def test_a_kept_alive_connection_trickling_its_next_head_gets_408(server):
    with connect(server, timeout=HEAD_TIMEOUT + 5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200 and response.read() == b'{"status":"ok"}'
        started = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\n":  # a byte every half second, until the server answers
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.5)[0]:
                break
        sock.settimeout(CLOSE_MARGIN)
        answer = read_to_end(sock)
        elapsed = time.monotonic() - started
    print(f"a kept-alive connection trickling its next head: closed after {elapsed:.2f} s")
    assert elapsed < HEAD_TIMEOUT + 2 * CLOSE_MARGIN
    assert_envelope(answer, 408)


def test_trickled_bodies_the_app_leaves_unread_hold_no_thread(server):
    """Whole heads announcing a body that comes a byte a second: /health answers 405 without reading it. gthread
    drained such a body for up to 5 s in the thread, then up to 2 s more in the event loop."""
    figures = measure(server.port, sockets=64, seconds=5, body=True, warm_up=1)
    print(figures.summary())
    assert figures.answered == figures.probes > 0, figures.failures
    assert figures.p(0.99) < 1.0


def test_clients_that_never_close_do_not_stall_the_worker(postgres_url, tmp_path):
    """gunicorn 27 closes a connection by draining it for up to 2 s in the worker's event loop: 8 clients that
    never close kept one worker from answering anyone for 16 s."""
    with live_server(server_env(postgres_url, WEB_CONCURRENCY="1", LOG_LEVEL="WARNING"), log_dir=tmp_path) as one:
        idle = [connect(one) for _ in range(8)]
        try:
            for sock in idle:
                sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")  # HTTP/1.0: the server closes after answering
            time.sleep(0.2)
            latencies = []
            for _ in range(8):
                started = time.monotonic()
                connection = http.client.HTTPConnection("127.0.0.1", one.port, timeout=5)
                connection.request("GET", "/health")
                assert connection.getresponse().status == 200
                connection.close()
                latencies.append(time.monotonic() - started)
        finally:
            for sock in idle:
                sock.close()
    print(f"8 clients that never close: 8 requests answered in at most {max(latencies) * 1000:.0f} ms")
    assert max(latencies) < 1.0


@pytest.mark.parametrize(("data", "start", "ready"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0, True),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r", 0, False),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 26, True),  # the end straddles two reads
    (b"GET / HTTP/1.1\r\nHost: x\r\n", 0, False),
    (b"GET / HTTP/1.1\nHost: x", 0, True),  # a bare LF: gunicorn refuses it at once, no need to wait
    (b"\n", 0, True),
    (b"", 0, False),
])
def test_a_head_is_handed_to_gunicorn_once_it_is_whole_or_refusable(data, start, ready):
    assert head_ready(data, start) is ready


# --- 2. framing ---------------------------------------------------------------------------------------------------

def chunked_post(body: bytes, user: str = "alice") -> bytes:
    return (f"POST /api/{user}/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + AUTHORIZATION
            + make_token(user).encode() + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + body)


@pytest.mark.parametrize("body", [
    b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    b"-10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    b"zz\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    b'e\r\n{"title": "t"}XX0\r\n\r\n',  # no CRLF after the chunk's data
    b'e\r\n{"title": "t"}\r\n0\r\nHost: x\r\n\r\n',  # a trailer that may not be one
], ids=["0x10", "-10", "zz", "missing-crlf-after-data", "forbidden-trailer"])
def test_a_malformed_chunked_body_is_400_json_with_one_warning_line(server, log, body):
    assert_envelope(exchange(server, chunked_post(body)), 400, "Malformed request body")
    time.sleep(0.2)
    assert [line for line in server.output().splitlines() if "malformed request body" in line]


def test_a_well_formed_chunked_body_is_accepted(server, log, database_url):
    user = f"framing-test-{uuid.uuid4()}"
    try:
        status, _, body = parse(exchange(server, chunked_post(b'e\r\n{"title": "t"}\r\n0\r\n\r\n', user)))
        assert status == 201 and json.loads(body)["title"] == "t"
    finally:
        delete_tasks_of(database_url, [user])


def test_an_http_1_1_request_without_host_is_400_json(server, log):
    headers = assert_envelope(exchange(server, get(host=False, version=b"HTTP/1.1")), 400,
                              "An HTTP/1.1 request needs a Host header")
    headers = assert_envelope(exchange(server, get("/health", b"X-Request-ID: no-host-1", host=False)), 400)
    assert headers["x-request-id"] == "no-host-1"


def test_an_http_1_0_request_without_host_is_served(server, log):
    status, _, body = parse(exchange(server, get(host=False, version=b"HTTP/1.0")))
    assert (status, body) == (200, b'{"status":"ok"}')


@pytest.mark.parametrize("length", [TOKEN_LIMIT, TOKEN_LIMIT + 1, 8167, FIELD_LIMIT - len(AUTHORIZATION) - 2])
def test_a_token_up_to_the_field_limit_reaches_the_app_and_gets_401(server, log, length):
    raw = exchange(server, get("/api/me", AUTHORIZATION + b"a" * length))
    headers = assert_envelope(raw, 401, "Invalid authentication token")
    assert headers["www-authenticate"].startswith("Bearer")


def test_a_header_field_over_the_limit_is_431_json(server, log):
    raw = exchange(server, get("/api/me", AUTHORIZATION + b"a" * (FIELD_LIMIT - len(AUTHORIZATION) - 1)))
    assert_envelope(raw, 431)


def test_a_head_over_32_kib_in_all_is_431_json(server, log):
    fields = [b"X-Pad-%d: " % i + b"a" * (FIELD_LIMIT - 100) for i in range(MAX_HEAD_BYTES // FIELD_LIMIT + 1)]
    assert_envelope(exchange(server, get("/health", *fields)), 431)


def test_a_head_of_over_100_fields_is_431_json(server, log):
    assert_envelope(exchange(server, get("/health", *(b"X-F%d: 1" % i for i in range(101)))), 431)


def test_a_request_line_over_the_limit_is_414_json(server, log):
    assert_envelope(exchange(server, get("/health?" + "a" * 5000)), 414)


@pytest.mark.parametrize("raw", [
    b"GET /health HTTP/1.1\nHost: x\n\n",  # bare LF
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello, more or less
    b"GET /health HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /he alth HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
], ids=["bare-lf", "binary", "two-hosts", "two-content-lengths", "space-in-target", "http-9.9"])
def test_a_malformed_head_is_400_json(server, log, raw):
    assert_envelope(exchange(server, raw), 400)


def post_body(size: int) -> tuple[bytes, bytes]:
    body = b'{"title": "' + b"a" * (size - 13) + b'"}'
    head = (b"POST /api/alice/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n" + AUTHORIZATION + make_token("alice").encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    return head, body


def test_a_70_kib_body_gets_a_413_the_client_reads_every_time(server, log):
    _, body = post_body(70 * 1024)
    headers = {"Authorization": f"Bearer {make_token('alice')}", "Content-Type": "application/json"}
    outcomes: dict[Any, int] = {}
    for _ in range(50):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            connection.request("POST", "/api/alice/tasks", body=body, headers=headers)
            response = connection.getresponse()
            outcome: Any = (response.status, json.loads(response.read()) == TOO_LARGE)
        except OSError as error:
            outcome = type(error).__name__
        finally:
            connection.close()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"50 POSTs of 70 KiB: {outcomes}")
    assert outcomes == {(413, True): 50}


def test_a_large_body_sent_slowly_gets_a_413_the_client_reads(server, log):
    """A client on a slower link is still sending when the 413 is written: the server reads on (up to 1 MiB) before
    closing, so the client is not reset before it reads the answer."""
    head, body = post_body(512 * 1024)
    outcomes: dict[Any, int] = {}
    for _ in range(5):
        with connect(server) as sock:
            try:
                sock.sendall(head)
                for offset in range(0, len(body), 8192):
                    sock.sendall(body[offset:offset + 8192])
                    time.sleep(0.002)
                outcome: Any = parse(read_to_end(sock))[0]
            except OSError as error:
                outcome = type(error).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"5 POSTs of 512 KiB in 8 KiB pieces: {outcomes}")
    assert outcomes == {413: 5}

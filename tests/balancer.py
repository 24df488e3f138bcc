"""HAProxy on loopback in front of several app instances: what a multi-instance deployment puts before them.

Started from Debian's `haproxy` (`.ci/run` installs it); tests skip, saying why, without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from todo_api.embedded_postgres import free_port, port_open

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CONFIG = """\
global
    maxconn 512

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive

frontend api
    bind 127.0.0.1:{port}
    default_backend instances

backend instances
    balance roundrobin
{servers}
"""


@contextlib.contextmanager
def load_balancer(backends: list[str]) -> Iterator[str]:
    """Round robin, request by request, over backends (http://127.0.0.1:PORT); yields its own base URL."""
    if not os.path.exists(HAPROXY):
        pytest.skip("no haproxy (apt-get install haproxy; .ci/run does)")
    folder = Path(tempfile.mkdtemp(prefix="todo-api-haproxy-"))
    port = free_port()
    servers = "\n".join(f"    server app{index} {url.removeprefix('http://')}" for index, url in enumerate(backends))
    (folder / "haproxy.cfg").write_text(CONFIG.format(port=port, servers=servers))
    with (folder / "haproxy.log").open("wb") as log:
        process = subprocess.Popen([HAPROXY, "-db", "-f", str(folder / "haproxy.cfg")],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start: {(folder / 'haproxy.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)

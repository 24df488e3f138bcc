"""HAProxy on loopback in front of several app instances: what a multi-instance deployment puts before them.

Started from Debian's `haproxy` (`.ci/run` installs it); tests skip, saying why, without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from todo_api.embedded_postgres import free_port

from .helpers import running_server

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
    try:
        with running_server([HAPROXY, "-db", "-f", str(folder / "haproxy.cfg")], port, folder / "haproxy.log",
                            "haproxy"):
            yield f"http://127.0.0.1:{port}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)

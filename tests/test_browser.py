"""A real browser against the real server: Debian's Chromium, headless, driven by Playwright, all on loopback.

- a page from an allowed origin (FRONTEND_URL) reads the user's tasks with fetch and a bearer token;
- the same page from another origin is blocked by the browser's CORS checks;
- /docs (Swagger UI) renders its operations from local assets, under the server's Content-Security-Policy.

Skipped, with the reason, only where no Chromium can be found (.ci/run installs Debian's).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from alembic import command

from todo_api.cli import alembic_config

from .fault_injection import scratch_database
from .helpers import make_token
from .live_server import LiveServer, call, live_server, server_env

pytestmark = pytest.mark.slow

TIMEOUT_MS = 10_000
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Anything not on loopback goes to a closed local port, should a page ever try.
    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>;127.0.0.1;localhost",
]

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>tasks</title></head>
<body data-state="loading">
<p id="total"></p>
<ul id="tasks"></ul>
<p id="error"></p>
<script type="application/json" id="config">{config}</script>
<script>
const config = JSON.parse(document.getElementById("config").textContent);
fetch(`${{config.api}}/api/${{encodeURIComponent(config.user)}}/tasks`, {{
  headers: {{Authorization: `Bearer ${{config.token}}`, Accept: "application/json"}},
}})
  .then(async (response) => {{
    const tasks = await response.json();
    const total = response.headers.get("X-Total-Count");
    document.getElementById("total").textContent = `${{response.status}} total=${{total}}`;
    for (const task of tasks) {{
      const item = document.createElement("li");
      item.textContent = `${{task.title}} (${{task.status}})`;
      document.getElementById("tasks").append(item);
    }}
    document.body.dataset.state = "done";
  }})
  .catch((error) => {{
    document.getElementById("error").textContent = `${{error.name}}: ${{error.message}}`;
    document.body.dataset.state = "error";
  }});
</script>
</body>
</html>
"""


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        reason = "no Chromium (apt-get install chromium; .ci/run does) at $CHROMIUM_PATH, on PATH or /usr/bin"
        print(f"SKIPPED browser tests: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh --user-data-dir
            executable_path=executable, headless=True, args=CHROMIUM_FLAGS, timeout=30_000,
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def api(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str, str]]:
    """The server, with FRONTEND_URL naming one of two loopback origins; yields (server, allowed, other)."""
    with scratch_database(postgres_url, prefix="browser") as url:
        command.upgrade(alembic_config(url), "head")
        allowed_port, other_port = _free_ports(2)
        allowed, other = f"http://127.0.0.1:{allowed_port}", f"http://127.0.0.1:{other_port}"
        env = server_env(url, FRONTEND_URL=f"http://localhost:3000,{allowed}", WEB_CONCURRENCY="1")
        with live_server(env, log_dir=tmp_path_factory.mktemp("browser-server")) as server:
            yield server, allowed, other


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextmanager
def site_on(origin: str, html: str) -> Iterator[str]:
    """Serve html at / on origin's port (chosen free by the api fixture)."""
    port = urlsplit(origin).port
    body = html.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        server.shutdown()
        server.server_close()


def tasks_page(server: LiveServer, user: str) -> str:
    config = json.dumps({"api": server.base_url, "user": user, "token": make_token(user)})
    return PAGE.format(config=config.replace("</", "<\\/"))


def open_page(context: Any, url: str) -> tuple[Any, list[str]]:
    """A new tab on url; also returns the list that collects every URL the tab requests."""
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(url)
    return page, requested


def assert_loopback_only(requested: list[str]) -> None:
    outside = [url for url in requested if urlsplit(url).hostname not in LOOPBACK and not url.startswith("data:")]
    assert outside == [], f"requests beyond loopback: {outside}"


def test_a_page_from_an_allowed_origin_reads_the_tasks_with_a_bearer_token(api, browser_context):
    server, allowed, _ = api
    user = f"browser-{uuid.uuid4().hex[:8]}"
    for title in ("Buy milk", "Write <b>tests</b>"):
        assert call("POST", f"{server.base_url}/api/{user}/tasks", make_token(user), {"title": title})[0] == 201

    with site_on(allowed, tasks_page(server, user)):
        page, requested = open_page(browser_context, f"{allowed}/")
        page.wait_for_selector("body[data-state=done]")
        items = page.locator("#tasks li").all_inner_texts()
        total = page.inner_text("#total")
        page.close()
    # Newest first; the title is text, not markup.
    assert items == ["Write <b>tests</b> (pending)", "Buy milk (pending)"]
    # X-Total-Count is exposed to the page by CORS.
    assert total == "200 total=2"
    assert_loopback_only(requested)


def test_the_same_page_from_another_origin_is_blocked_by_the_browser(api, browser_context):
    server, _, other = api
    user = f"browser-{uuid.uuid4().hex[:8]}"
    assert call("POST", f"{server.base_url}/api/{user}/tasks", make_token(user), {"title": "secret"})[0] == 201

    with site_on(other, tasks_page(server, user)):
        page, requested = open_page(browser_context, f"{other}/")
        page.wait_for_selector("body[data-state=error]")
        error = page.inner_text("#error")
        items = page.locator("#tasks li").count()
        page.close()
    assert error == "TypeError: Failed to fetch"
    assert items == 0
    assert_loopback_only(requested)


def test_docs_render_their_operations_from_local_assets(api, browser_context, tmp_path):
    server, _, _ = api
    page = browser_context.new_page()
    requested: list[str] = []
    console: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    response = page.goto(f"{server.base_url}/docs")
    assert response is not None and response.status == 200
    csp = response.headers.get("content-security-policy")
    try:
        page.wait_for_selector(".opblock")
    finally:
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
    # Swagger UI's scripts run under the policy: an operation opens on a click.
    page.locator(".opblock-summary").first.click()
    page.wait_for_selector(".opblock.is-open .opblock-body")
    paths = set(page.locator(".opblock .opblock-summary-path").all_inner_texts())
    methods = page.locator(".opblock .opblock-summary-method").all_inner_texts()
    page.close()
    print(f"/docs: {len(methods)} operations; screenshot {tmp_path / 'docs.png'}; CSP {csp!r}")

    # Zero-width spaces are how Swagger UI lets long paths wrap.
    paths = {path.replace("\u200b", "") for path in paths}
    assert {"/api/{user_id}/tasks", "/api/{user_id}/tasks/{task_id}", "/api/{user_id}/tasks/{task_id}/complete",
            "/health/ready"} <= paths, paths
    assert len(methods) >= 10
    assert [line for line in console if "Content Security Policy" in line or "pageerror" in line] == [], console
    assert_loopback_only(requested)
    assert Path(tmp_path / "docs.png").stat().st_size > 10_000

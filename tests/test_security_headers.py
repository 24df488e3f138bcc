"""Security headers on every response, a Content-Security-Policy that keeps /docs working, and no leaks.

- Every response (API, errors, 204, 304, preflights, /health, /openapi.json, /docs and its files) carries
  `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer` and a CSP with
  `frame-ancestors 'none'`; everything but the Swagger UI page gets `default-src 'none'`.
- The Swagger UI page's policy allows its own files and its inline initializer by hash, nothing else.
- No response carries a `Server` header from the app (gunicorn adds its own: see gunicorn.conf.py).
- No response body or log line carries the token or the secret; no response carries a traceback or SQL.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.exc import IntegrityError, OperationalError

from todo_api import repositories
from todo_api.web import API_CSP, script_hashes

from .helpers import SECRET, bearer, make_token

ORIGIN = "http://localhost:3000"
COMMON = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def boom(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("internal detail: SELECT password FROM vault")


def sql_error(*_args: Any, **_kwargs: Any) -> Any:
    raise IntegrityError("INSERT INTO tasks (id, user_id) VALUES (%(id)s, %(user_id)s)", {"user_id": "alice"},
                         Exception("duplicate key value violates unique constraint"))


def db_down(*_args: Any, **_kwargs: Any) -> Any:
    raise OperationalError("SELECT 1", {}, Exception("connection refused"))


@pytest.fixture
def task(create_task: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return create_task("alice")


def _etag(client: FlaskClient, task: dict[str, Any]) -> str:
    return client.get(f"/api/alice/tasks/{task['id']}", headers=bearer(make_token("alice"))).headers["ETag"]


# name -> (method, path, request kwargs, expected status); {task} is a task of alice's; {etag} its ETag.
REQUESTS: dict[str, tuple[str, str, dict[str, Any], int]] = {
    "list-200": ("GET", "/api/alice/tasks", {}, 200),
    "create-201": ("POST", "/api/alice/tasks", {"json": {"title": "x"}}, 201),
    "get-200": ("GET", "/api/alice/tasks/{task}", {}, 200),
    "not-modified-304": ("GET", "/api/alice/tasks/{task}", {"headers": {"If-None-Match": "{etag}"}}, 304),
    "delete-204": ("DELETE", "/api/alice/tasks/{task}", {}, 204),
    "head-200": ("HEAD", "/api/alice/tasks", {}, 200),
    "me-200": ("GET", "/api/me", {}, 200),
    "missing-token-401": ("GET", "/api/alice/tasks", {"headers": {"Authorization": ""}}, 401),
    "invalid-token-401": ("GET", "/api/alice/tasks", {"headers": {"Authorization": "Bearer x.y.z"}}, 401),
    "other-user-403": ("GET", "/api/bob/tasks", {}, 403),
    "unknown-task-404": ("GET", "/api/alice/tasks/00000000-0000-0000-0000-000000000000", {}, 404),
    "unknown-route-404": ("GET", "/nowhere", {}, 404),
    "refused-redirect-404": ("GET", "/api/alice//tasks", {}, 404),
    "method-405": ("POST", "/api/alice/tasks/summary", {}, 405),
    "stale-if-match-412": ("PUT", "/api/alice/tasks/{task}", {"json": {}, "headers": {"If-Match": '"stale"'}}, 412),
    "too-large-413": ("POST", "/api/alice/tasks", {"data": b"x" * 70_000, "content_type": "application/json"}, 413),
    "not-json-415": ("POST", "/api/alice/tasks", {"data": b"x", "content_type": "text/plain"}, 415),
    "malformed-400": ("POST", "/api/alice/tasks", {"data": b"{", "content_type": "application/json"}, 400),
    "invalid-422": ("POST", "/api/alice/tasks", {"json": {"title": ""}}, 422),
    "forced-500": ("GET", "/api/alice/tasks/summary", {"patch": boom}, 500),
    "sql-error-500": ("GET", "/api/alice/tasks/summary", {"patch": sql_error}, 500),
    "database-down-503": ("GET", "/api/alice/tasks/summary", {"patch": db_down}, 503),
    "health-200": ("GET", "/health", {}, 200),
    "ready-200": ("GET", "/health/ready", {}, 200),
    "openapi-200": ("GET", "/openapi.json", {}, 200),
    "docs-asset-200": ("GET", "/docs/assets/swagger-ui-bundle.js", {}, 200),
    "docs-asset-404": ("GET", "/docs/assets/nope.js", {}, 404),
    "preflight-allowed-origin": ("OPTIONS", "/api/alice/tasks", {"headers": {
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization, Content-Type"}}, 204),
    "preflight-other-origin": ("OPTIONS", "/api/alice/tasks", {"headers": {
        "Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE"}}, 204),
    "options-health": ("OPTIONS", "/health", {}, 200),
}


@pytest.fixture
def call(client: FlaskClient, task: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Any]:
    """call(name) -> the response to REQUESTS[name], as alice unless the request says otherwise."""

    def run(name: str) -> Any:
        method, path, kwargs, _ = REQUESTS[name]
        kwargs = dict(kwargs)
        if "patch" in kwargs:
            monkeypatch.setattr(repositories, "summarize", kwargs.pop("patch"))
        names = {"task": task["id"], "etag": _etag(client, task) if "{etag}" in str(kwargs) else ""}
        headers = {**bearer(make_token("alice")),
                   **{key: value.format(**names) for key, value in kwargs.pop("headers", {}).items()}}
        response = client.open(path.format(**names), method=method, headers=headers, **kwargs)
        response.get_data()  # buffered, so the file of a /docs asset can be closed now
        response.close()
        return response

    return run


@pytest.mark.parametrize("name", list(REQUESTS))
def test_every_response_carries_the_security_headers(call, name):
    response = call(name)
    assert response.status_code == REQUESTS[name][3], response.data[:200]
    for header, value in COMMON.items():
        assert response.headers.get(header) == value, header
    assert response.headers["Content-Security-Policy"] == API_CSP
    assert "Server" not in response.headers


def test_the_api_policy_allows_nothing_and_no_framing():
    directives = dict(d.strip().split(" ", 1) for d in API_CSP.split(";"))
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"


# --- /docs: Swagger UI keeps working under its policy ------------------------------------------------------------

class PageScan(HTMLParser):
    """Inline scripts, external script/style URLs, and anything a CSP would have to allow by attribute."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.inline_scripts: list[str] = []
        self.urls: list[str] = []
        self.event_handlers: list[str] = []
        self._in_inline_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.event_handlers += [name for name in attributes if name.startswith("on")]
        if tag == "script":
            if attributes.get("src"):
                self.urls.append(attributes["src"] or "")
            else:
                self._in_inline_script = True
                self.inline_scripts.append("")
        elif tag in ("link", "img", "iframe") and (attributes.get("href") or attributes.get("src")):
            self.urls.append(attributes.get("href") or attributes.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_inline_script = False

    def handle_data(self, data: str) -> None:
        if self._in_inline_script:
            self.inline_scripts[-1] += data


def csp_directives(policy: str) -> dict[str, list[str]]:
    return {parts[0]: parts[1:] for parts in (d.split() for d in policy.split(";") if d.strip())}


@pytest.fixture
def docs(client: FlaskClient) -> tuple[Any, PageScan, dict[str, list[str]]]:
    page = client.get("/docs")
    scan = PageScan()
    scan.feed(page.get_data(as_text=True))
    return page, scan, csp_directives(page.headers["Content-Security-Policy"])


def test_docs_policy_allows_only_this_origin_and_the_pages_own_inline_script(docs):
    page, scan, policy = docs
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert scan.inline_scripts, "the Swagger UI page has its initializer inline"
    hashes = {f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
              for s in scan.inline_scripts}
    assert set(policy["script-src"]) == {"'self'", *hashes}
    assert policy["default-src"] == ["'self'"]
    assert policy["object-src"] == policy["base-uri"] == policy["frame-ancestors"] == ["'none'"]
    assert policy["connect-src"] == ["'self'"]  # Swagger UI fetches /openapi.json and "Try it out" here
    assert "'unsafe-eval'" not in str(policy) and "*" not in str(policy)
    for header, value in COMMON.items():
        assert page.headers[header] == value


def test_docs_page_loads_only_same_origin_files_that_exist(docs, client):
    _, scan, _ = docs
    assert not scan.event_handlers  # inline handlers would need 'unsafe-inline'
    assert scan.urls and all(url.startswith("/") and not url.startswith("//") for url in scan.urls)
    for url in scan.urls:
        response = client.get(url)
        assert response.status_code == 200, url
        response.close()
    spec_url = json.loads(scan.inline_scripts[0].split("url:", 1)[1].split(",", 1)[0])
    assert spec_url.startswith("/") and client.get(spec_url).status_code == 200


def test_swagger_ui_scripts_need_no_eval():
    """The bundle's only Function constructor is a globalThis fallback that browsers with CSP never reach."""
    from swagger_ui_bundle import swagger_ui_path

    for name in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"):
        source = (Path(swagger_ui_path) / name).read_text(encoding="utf-8")
        assert "eval(" not in source.replace("evaluate(", "")
        assert source.count("new Function(") == source.count('if("object"==typeof globalThis)return globalThis;'
                                                               'try{return this||new Function("return this")()}')


@pytest.mark.parametrize(
    ("html", "count"),
    [
        (b"<script>a()</script>", 1),
        (b'<script src="/x.js"></script><script>b()</script>', 1),
        (b"<SCRIPT type='module'>c()</SCRIPT ><script\nsrc=/y.js></script>", 1),
        (b"<p>no script</p>", 0),
    ],
)
def test_script_hashes_covers_inline_scripts_only(html, count):
    assert len(script_hashes(html)) == count


# --- nothing leaks -------------------------------------------------------------------------------------------------

@pytest.fixture
def leak_run(client: FlaskClient, call: Callable[[str], Any], capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[Any], str, str]]:
    """Every request above, plus bad tokens and the token where it does not belong; (responses, logs, token)."""
    token = make_token("alice")
    responses = [call(name) for name in REQUESTS]
    monkeypatch.undo()
    for bad in (token[:-3] + "xyz", token + "x", make_token("alice", ttl=-3600), f"{token}.{token}",
                make_token("alice", secret=SECRET + "x")):
        responses.append(client.get("/api/alice/tasks", headers=bearer(bad)))
    responses.append(client.get(f"/api/alice/tasks?access_token={token}&q={SECRET}", headers=bearer(token)))
    responses.append(client.post("/api/alice/tasks", json={"title": "t", "token": token}, headers=bearer(token)))
    responses.append(client.get(f"/api/alice/tasks?due_before={token}", headers=bearer(token)))
    captured = capsys.readouterr()
    yield responses, captured.err + captured.out, token


def test_no_token_or_secret_in_any_log_line(leak_run):
    _, logs, token = leak_run
    assert '"unhandled error"' in logs and '"status": 500' in logs  # the forced errors were logged...
    assert token not in logs and token.split(".")[2] not in logs  # ...without the token
    assert SECRET not in logs and SECRET[:16] not in logs


def test_no_traceback_sql_token_or_secret_in_any_response(leak_run):
    responses, _, token = leak_run
    for response in responses:
        body = response.get_data()
        if response.mimetype == "text/javascript":
            continue  # Swagger UI's own code, which happens to contain SELECT
        for leak in (b"Traceback", b"SELECT", b"INSERT", b"sqlalchemy", b"psycopg2", b"internal detail",
                     b"duplicate key", b"vault", SECRET.encode(), SECRET[:16].encode()):
            assert leak not in body, (response.status_code, body[:300])
        if response.status_code >= 400:
            assert token.encode() not in body
        assert all(token not in value for _, value in response.headers.items())


def test_errors_are_the_json_envelope_never_html(leak_run):
    responses, _, _ = leak_run
    for response in responses:
        if response.status_code >= 400:
            assert response.mimetype == "application/json" and "detail" in response.json
            assert b"<html" not in response.get_data().lower()

"""HTTP plumbing: orjson, CORS, cache and security headers, Swagger UI's files."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from datetime import date, datetime, time
from inspect import iscoroutinefunction
from typing import Any

import orjson
from flask import Flask, Response, request, send_from_directory
from flask.json.provider import JSONProvider
from flask_cors import CORS
from swagger_ui_bundle import swagger_ui_path

SWAGGER_ASSETS_URL = "/docs/assets/"
KNOWN_SYNC_FUNCTIONS = 4096  # bound on App.ensure_sync's memory: views, hooks and decorators' wrappers


class App(Flask):
    """Flask, remembering which functions are not coroutines.

    Flask calls ensure_sync on every view, hook and flask-smorest decorator wrapper of every request (20 times for
    GET one task), and each call inspects the function (inspect.iscoroutinefunction): about 1.5 µs each. The answer
    never changes for a function, so it is asked once. ensure_sync is Flask's documented hook for this.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.known_sync: set[Any] = set()

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        key = getattr(func, "__func__", func)  # a method is bound anew on each request: its function is the same
        if key in self.known_sync:
            return func
        if iscoroutinefunction(func):
            return self.async_to_sync(func)
        if len(self.known_sync) < KNOWN_SYNC_FUNCTIONS:
            self.known_sync.add(key)
        return func

SWAGGER_UI_ENDPOINT = "api-docs.openapi_swagger_ui"  # flask-smorest's view of OPENAPI_SWAGGER_UI_PATH


def to_json(obj: Any, option: int = 0) -> bytes:
    """orjson; json for what orjson refuses (a lone surrogate such as a token's "\\ud800"), escaped as JSON allows.

    Datetimes are ISO 8601 (isoformat()) and UUIDs canonical either way, as marshmallow's fields write them.
    """
    try:
        return orjson.dumps(obj, default=str, option=option)
    except orjson.JSONEncodeError:
        return json.dumps(obj, default=_json_default, sort_keys=bool(option & orjson.OPT_SORT_KEYS),
                          separators=(",", ":")).encode()


def _json_default(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime | date | time) else str(value)


class OrjsonProvider(JSONProvider):
    """orjson is much faster than json, and bounds nesting depth instead of overflowing the stack."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return to_json(obj, orjson.OPT_SORT_KEYS if kwargs.get("sort_keys") else 0).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(to_json(obj), mimetype="application/json")


def json_response(obj: Any, status: int = 200) -> Response:
    """A JSON response serialised once, by orjson, for views that return a Response (flask-smorest's @blp.response
    passes it through instead of dumping and jsonify-ing the result again)."""
    return Response(to_json(obj), status=status, content_type="application/json")


def add_api_cache_headers(response: Response) -> Response:
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "private, no-cache"
    return response


# Every response but Swagger UI's page (JSON, errors, empty ones, /docs files) may load nothing, framed by nobody.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI (/docs): its files from this origin, plus the page's inline initializer, allowed by its hash.
# Styles keep 'unsafe-inline': Swagger UI renders style attributes, and styles cannot run code.
DOCS_CSP = (
    "default-src 'self'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
INLINE_SCRIPT = re.compile(rb"<script\b(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script\s*>", re.IGNORECASE | re.DOTALL)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def script_hashes(html: bytes) -> list[str]:
    """CSP source expressions ('sha256-...') for the inline scripts of an HTML page."""
    return [
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in INLINE_SCRIPT.findall(html)
    ]


def content_security_policy(response: Response) -> str:
    """The strict API policy, except for Swagger UI's page, which gets its own with its inline scripts' hashes."""
    if request.endpoint != SWAGGER_UI_ENDPOINT or response.mimetype != "text/html" or response.is_streamed:
        return API_CSP
    hashes = "".join(f" {source}" for source in script_hashes(response.get_data()))
    return DOCS_CSP.format(hashes=hashes)


API_SECURITY_HEADER_NAMES = frozenset(name.lower() for name in (*SECURITY_HEADERS, "Content-Security-Policy"))
API_SECURITY_HEADERS = [*SECURITY_HEADERS.items(), ("Content-Security-Policy", API_CSP)]


def add_security_headers(response: Response) -> Response:
    """On every response, errors, 204, 304 and preflights included. Headers a view set itself are kept, but for
    the Content-Security-Policy, which is always ours."""
    headers = response.headers
    if request.endpoint != SWAGGER_UI_ENDPOINT and API_SECURITY_HEADER_NAMES.isdisjoint(
        name.lower() for name in headers.keys()
    ):  # the usual case: one pass over the headers (each `in` is one), then the precomputed list appended
        headers.extend(API_SECURITY_HEADERS)
        return response
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    headers["Content-Security-Policy"] = content_security_policy(response)
    return response


def no_content() -> Response:
    """204: no body, and no JSON content type."""
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


def answer_preflight() -> Response | None:
    """A CORS preflight on any /api/ path is 204, whatever the path's id looks like: the browser must get to send
    the real request and read its real status (an unknown task's 404), instead of failing on the preflight's 404.
    flask-cors then adds its headers for allowed origins only."""
    if request.method == "OPTIONS" and request.path.startswith("/api/") and (
        "Access-Control-Request-Method" in request.headers
    ):
        return no_content()
    return None


MCP_ALLOW_HEADERS = ["Authorization", "Content-Type", "Accept", "Mcp-Session-Id", "Mcp-Protocol-Version",
                     "Last-Event-ID"]
MCP_EXPOSE_HEADERS = ["Mcp-Session-Id", "WWW-Authenticate", "X-Request-ID", "Retry-After", "X-RateLimit-Limit",
                      "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-RateLimit-Reset-After"]


class WithOrigin:
    """What flask-cors registers its after-request hook on (its init_app takes an app or a blueprint): the app, with
    the hook run only for requests that carry an Origin, which browsers send on every cross-origin request.

    flask-cors matched the path and resolved its options on every request, and with one FRONTEND_URL sent
    Access-Control-Allow-Origin and -Expose-Headers even to clients that are no browser page: about 15 µs of GET
    one task's CPU. Since an /api/ response now depends on the request's Origin, each says so (Vary: Origin), so
    that no cache hands one made for a request without Origin to a page of the frontend.
    """

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.config = app.config  # flask-cors reads its CORS_* settings here

    def after_request(self, hook: Callable[[Response], Response]) -> Callable[[Response], Response]:
        def cors_if_origin(response: Response) -> Response:
            if "Origin" in request.headers:
                response = hook(response)
            if request.path.startswith(CORS_PATHS):
                vary = response.headers.get("Vary")
                if vary is None:
                    response.headers["Vary"] = "Origin"
                elif "origin" not in vary.lower():
                    response.headers["Vary"] = f"{vary}, Origin"
            return response

        return self.app.after_request(cors_if_origin)


CORS_PATHS = ("/api/", "/mcp")  # the responses that depend on Origin: Vary: Origin


def init_app(app: Flask) -> None:
    app.before_request(answer_preflight)
    CORS(
        WithOrigin(app),  # type: ignore[arg-type]
        resources={
            r"/api/*": {"origins": app.config["FRONTEND_URL"]},
            # MCP clients in the frontend's pages (mcp_server.py): the same origins, plus MCP's own headers.
            r"/mcp": {"origins": app.config["FRONTEND_URL"], "allow_headers": MCP_ALLOW_HEADERS,
                      "expose_headers": MCP_EXPOSE_HEADERS},
            # RFC 9728 metadata is public: any page may read where to get a token.
            r"/.well-known/oauth-protected-resource*": {"origins": "*"},
        },
        allow_headers=["Authorization", "Content-Type", "If-Match", "If-None-Match"],
        # Retry-After and X-RateLimit-*: a browser app can back off from a 429 or a 503 (todo_api/limits.py).
        expose_headers=["X-Total-Count", "X-Pagination", "ETag", "Location", "X-Request-ID", "Retry-After",
                        "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                        "X-RateLimit-Reset-After"],
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        max_age=600,
    )
    app.after_request(add_api_cache_headers)
    app.after_request(add_security_headers)
    app.add_url_rule(f"{SWAGGER_ASSETS_URL}<path:filename>", "swagger_assets", serve_swagger_asset)


def serve_swagger_asset(filename: str) -> Response:
    """Swagger UI's files from a pinned PyPI package, so /docs needs no internet access."""
    return send_from_directory(swagger_ui_path, filename, max_age=86400)

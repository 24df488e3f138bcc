"""HTTP plumbing: orjson, trailing slashes, CORS and cache headers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson
from flask import Flask, Response, request, send_from_directory
from flask.json.provider import JSONProvider
from flask_cors import CORS
from swagger_ui_bundle import swagger_ui_path

SWAGGER_ASSETS_URL = "/docs/assets/"
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class OrjsonProvider(JSONProvider):
    """orjson is much faster than json, and bounds nesting depth instead of overflowing the stack."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        option = orjson.OPT_SORT_KEYS if kwargs.get("sort_keys") else 0
        return orjson.dumps(obj, default=str, option=option).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(orjson.dumps(obj, default=str), mimetype="application/json")


class StripTrailingSlash:
    """Every path works with or without a trailing slash, with no redirect."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if len(path) > 1 and path.endswith("/"):
            environ["PATH_INFO"] = path.rstrip("/") or "/"
        return self.app(environ, start_response)


def add_api_cache_headers(response: Response) -> Response:
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "private, no-cache"
    return response


def init_app(app: Flask) -> None:
    app.wsgi_app = StripTrailingSlash(app.wsgi_app)  # type: ignore[method-assign]
    CORS(
        app,
        resources={r"/api/*": {"origins": app.config["FRONTEND_URL"]}},
        allow_headers=["Authorization", "Content-Type", "If-Match", "If-None-Match"],
        expose_headers=["X-Total-Count", "X-Pagination", "ETag", "Location", "X-Request-ID"],
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        max_age=600,
    )
    app.after_request(add_api_cache_headers)
    app.add_url_rule(f"{SWAGGER_ASSETS_URL}<path:filename>", "swagger_assets", serve_swagger_asset)


def serve_swagger_asset(filename: str) -> Response:
    """Swagger UI's files from a pinned PyPI package, so /docs needs no internet access."""
    return send_from_directory(swagger_ui_path, filename, max_age=86400)

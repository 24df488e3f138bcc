"""todo-api: the task backend for a Next.js + Better Auth frontend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask, Response
from flask_smorest import Api
from werkzeug.exceptions import HTTPException

from . import auth, cli, db, errors, health, limits, mcp_server, observability, tasks, web
from .config import MAX_BODY_BYTES, check_secret, load_config
from .schemas import ErrorSchema


class TodoApi(Api):
    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException) -> Response:
        """Every HTTP error, from any layer, gets the {"detail": ...} envelope (flask-smorest's documented hook)."""
        return errors.http_error_response(error)


API_SETTINGS: dict[str, Any] = {
    "API_TITLE": "todo-api",
    "API_VERSION": "1.0.0",
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "/docs",
    "OPENAPI_SWAGGER_UI_URL": web.SWAGGER_ASSETS_URL,
    "API_SPEC_OPTIONS": {
        "security": [{"bearerAuth": []}],
        "components": {"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
    },
    "MAX_CONTENT_LENGTH": MAX_BODY_BYTES,
    "JSON_SORT_KEYS": False,
}


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app from the environment; `config` overrides it (tests)."""
    app = web.App(__name__, instance_relative_config=True, static_folder=None)
    app.config.update(load_config())
    app.config.update(API_SETTINGS)
    app.config.update(config or {})
    check_secret(app.config, Path(app.instance_path))
    app.json = web.OrjsonProvider(app)
    # Before any route is added: every path works with or without one trailing slash, and is never redirected
    # (werkzeug would redirect /tasks/ to /tasks, or /api/u//tasks to /api/u/tasks, with an HTML page).
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False

    observability.init_app(app)
    db.init_app(app)
    auth.init_app(app)
    limits.init_app(app)  # after auth: counts each request by its user, or its address, before any other work
    api = TodoApi(app)
    for blueprint in (tasks.blp, auth.blp, health.blp):
        api.register_blueprint(blueprint)
    mcp_server.init_app(app)  # /mcp: a plain blueprint, outside the OpenAPI document
    errors.init_app(app)
    web.init_app(app)
    cli.init_app(app)
    return app

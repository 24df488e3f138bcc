"""Request-body parsing shared by the API blueprints: JSON objects only, with the contract's statuses."""

from __future__ import annotations

from typing import Any

from flask import Request
from flask_smorest import abort
from marshmallow import Schema
from webargs import missing
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge


class JSONParser(FlaskParser):
    """An empty body is "no arguments"; anything else must be a JSON object (415 / 400 otherwise)."""

    def load_json(self, req: Request, schema: Schema) -> Any:
        if not read_body(req):
            return missing
        if not req.is_json:
            abort(415, message="Content-Type must be application/json")
        try:
            data = req.get_json()
        except BadRequest:
            abort(400, message="Malformed JSON body")
        if not isinstance(data, dict):
            abort(400, message="Request body must be a JSON object")
        return data


def read_body(req: Request) -> bytes:
    """The raw body, cached; 413 above MAX_CONTENT_LENGTH however it is sent.

    With a Content-Length, werkzeug refuses a body over the limit. Without one (chunked), it stops reading at the
    limit and returns what it has, as if that were the whole body: one more byte from the server's stream tells.
    """
    data = req.get_data(cache=True)
    limit = req.max_content_length
    if limit is not None and req.content_length is None and len(data) >= limit and req.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return data

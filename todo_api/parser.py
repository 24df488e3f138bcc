"""Request-body parsing shared by the API blueprints: JSON objects only, with the contract's statuses."""

from __future__ import annotations

from typing import Any

from flask import Request
from flask_smorest import abort
from marshmallow import Schema
from webargs import missing
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import BadRequest


class JSONParser(FlaskParser):
    """An empty body is "no arguments"; anything else must be a JSON object (415 / 400 otherwise)."""

    def load_json(self, req: Request, schema: Schema) -> Any:
        if not req.get_data(cache=True):
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

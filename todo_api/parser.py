"""Request-body parsing shared by the API blueprints: JSON objects only, with the contract's statuses."""

from __future__ import annotations

import copy
from typing import Any

from flask import Request
from flask_smorest import abort
from marshmallow import Schema
from webargs import missing
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

QUERY_LOCATIONS = ("query", "querystring")
PARSED_QUERIES = 1024  # bound on the memo of parsed query strings, per parser


class JSONParser(FlaskParser):
    """An empty body is "no arguments"; anything else must be a JSON object (415 / 400 otherwise). Parsed query
    strings are remembered."""

    def __init__(self) -> None:
        super().__init__()
        self._schemas: dict[type[Schema], Schema] = {}
        self.parsed_queries: dict[tuple[Any, ...], Any] = {}

    def parse(self, argmap: Any, req: Request | None = None, *, location: str | None = None, **kwargs: Any) -> Any:
        """webargs' parse; a query string already parsed with the same schema gives (a copy of) the same result.

        Clients ask for the same few query strings over and over (the frontend's `?page_size=50`), and loading one
        through its schema, twice per list page (filters, then pagination), was ~15% of a page of 50's CPU. The
        result depends on nothing but the query string: the schemas keep no state and read no clock (`overdue` is
        resolved later, in the query). A query string that fails validation is never remembered: it raises again.
        """
        if location not in QUERY_LOCATIONS or kwargs.get("validate") is not None or not isinstance(
            argmap, Schema | type
        ):
            return super().parse(argmap, req, location=location, **kwargs)
        request_ = req if req is not None else self.get_default_request()
        key = (argmap, location, kwargs.get("unknown"), request_.query_string)
        parsed = self.parsed_queries.get(key)
        if parsed is None:
            parsed = super().parse(argmap, req, location=location, **kwargs)
            if len(self.parsed_queries) >= PARSED_QUERIES:
                self.parsed_queries.clear()
            self.parsed_queries[key] = parsed
        return copy.copy(parsed)  # the caller's own: the list view sets item_count on its PaginationParameters

    def _get_schema(self, argmap: Any, req: Request) -> Schema:
        # webargs builds a new instance of a schema class on every request (flask-smorest's pagination passes one):
        # ~0.2 ms each. Schemas keep no per-request state, so one instance per class is shared, as flask-smorest
        # already shares the instances given to @blp.arguments.
        if isinstance(argmap, type) and issubclass(argmap, Schema):
            schema = self._schemas.get(argmap)
            return schema if schema is not None else self._schemas.setdefault(argmap, argmap())
        return super()._get_schema(argmap, req)

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

"""Conditional requests (RFC 9110 §13) on a resource with a strong ETag, on werkzeug's public API.

The preconditions are evaluated in §13.2.2's order, on a resource that exists: an unknown resource is a 404 before
any of this runs. If-Modified-Since and If-Unmodified-Since are not supported (no Last-Modified is sent).

1. If-Match: `*` passes; otherwise one of the listed tags must equal the current ETag by strong comparison (a weak
   tag never does), else 412. It is optional: a write without it is carried out (never 428).
2. If-None-Match: `*` matches; otherwise by weak comparison (W/"x" matches "x"). A match is 304 (with the ETag, no
   body) on GET and HEAD, and 412 on any other method.

A precondition header that is neither `*` nor a list of entity-tags (`,,,`, `"`, `abc`, an empty value) is 412:
werkzeug's parser treats an empty header as absent, skips what it cannot read and keeps unquoted tokens as tags,
so the syntax is checked here first. `""` is a valid (empty) entity-tag: it matches no ETag of ours.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson
from flask import Response, request
from flask_smorest import abort
from werkzeug.datastructures import ETags
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_etags

from .web import to_json

PRECONDITION_FAILED = "Precondition failed: the task has changed"
READ_METHODS = ("GET", "HEAD")

# RFC 9110 §8.8.3 and §5.6.1: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, in a comma-separated list that may hold
# empty elements and optional whitespace, and here must hold at least one tag.
_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"'
_TAG_LIST = re.compile(rf"[ \t,]*{_TAG}(?:[ \t]*,[ \t,]*{_TAG})*[ \t,]*")

# OpenAPI: the request headers, and the ETag response header.
IF_MATCH = {
    "name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"},
    "description": 'ETags from earlier responses, or *: 412 unless one is the current ETag (strong comparison: '
                   'W/"..." never matches). Optional.',
}
IF_NONE_MATCH = {
    "name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"},
    "description": 'ETags from earlier responses, or *: when one matches (weak comparison), GET gives 304 and a '
                   'write 412.',
}
ETAG = {"description": "Strong ETag of the returned task", "schema": {"type": "string"}}


def etag(representation: Any) -> str:
    """The strong ETag (unquoted) of a JSON representation: the SHA-1 of its JSON with sorted keys (the value
    flask-smorest's @blp.etag gave). Tasks no longer use it: tasks.task_etag derives theirs from id and updated_at.
    """
    return hashlib.sha1(to_json(representation, orjson.OPT_SORT_KEYS)).hexdigest()


def requested() -> bool:
    """Whether the request has a precondition: a write then locks the resource before evaluate() and the write."""
    return "If-Match" in request.headers or "If-None-Match" in request.headers


def evaluate(current_etag: str) -> None:
    """Return if the request may proceed on the resource whose current ETag is `current_etag`; else raise 412, or
    304 on GET/HEAD."""
    if_match = _tags("If-Match")
    if if_match is not None and not if_match.contains(current_etag):
        abort(412, message=PRECONDITION_FAILED)
    if_none_match = _tags("If-None-Match")
    if if_none_match is not None and if_none_match.contains_weak(current_etag):
        if request.method not in READ_METHODS:
            abort(412, message="Precondition failed: the task matches If-None-Match")
        not_modified = Response(status=304)
        not_modified.set_etag(current_etag)
        # An HTTPException carrying a response is returned as is by Flask, error handlers skipped; the after-request
        # hooks still add the usual headers (Cache-Control, request id, security headers).
        raise HTTPException(response=not_modified)


def _tags(header: str) -> ETags | None:
    """The header's tags; None if it was not sent; 412 if it is not `*` or a list of entity-tags."""
    value = request.headers.get(header)
    if value is None:
        return None
    value = value.strip(" \t")
    if value != "*" and not _TAG_LIST.fullmatch(value):
        abort(412, message=f"Precondition failed: {header} holds no valid entity-tag")
    return parse_etags(value)

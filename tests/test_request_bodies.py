"""Request bodies: JSON parsing, content types, the 64 KiB limit, and hostile input, on every write.

Statuses (contract): 400 malformed JSON or not an object, 413 over 64 KiB, 415 not JSON, 422 validation. Every
answer is the JSON error envelope, quickly (the `send` fixture times it): never a 500 nor a hang. Field-by-field
validation of a task is in test_tasks.py.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from gunicorn.http.errors import ChunkMissingTerminator, InvalidChunkExtension, InvalidChunkSize

from .helpers import assert_error, bearer, make_token

USER = "alice"  # whom `send` sends as
LIMIT = 64 * 1024
MALFORMED = {"detail": "Malformed JSON body"}
NOT_AN_OBJECT = {"detail": "Request body must be a JSON object"}
NOT_JSON = {"detail": "Content-Type must be application/json"}
TOO_LARGE = {"detail": "Request body too large (limit 64 KiB)"}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def sized(size: int) -> bytes:
    """A valid create body of exactly `size` bytes (a long description)."""
    head, tail = b'{"title": "t", "description": "', b'"}'
    return head + b"d" * (size - len(head) - len(tail)) + tail


def with_field(name: str, raw_value: bytes) -> bytes:
    return b'{"title": "t", "' + name.encode() + b'": ' + raw_value + b"}"


# (body, expected status, expected body or the field the 422 must name)
BODIES: dict[str, tuple[bytes, int, dict[str, Any] | str]] = {
    "truncated-after-a-key": (b'{"title": ', 400, MALFORMED),
    "truncated-object": (b'{"title": "abc', 400, MALFORMED),
    "truncated-string-escape": (b'{"title": "\\u00', 400, MALFORMED),
    "only-an-open-brace": (b"{", 400, MALFORMED),
    "trailing-garbage": (b'{"title": "a"} x', 400, MALFORMED),
    "two-objects": (b'{"title": "a"}{"title": "b"}', 400, MALFORMED),
    "single-quotes": (b"{'title': 'a'}", 400, MALFORMED),
    "trailing-comma": (b'{"title": "a",}', 400, MALFORMED),
    "comment": (b'{"title": "a" /* hi */}', 400, MALFORMED),
    "utf8-bom": (b'\xef\xbb\xbf{"title": "a"}', 400, MALFORMED),
    "whitespace-only": (b" \n\t ", 400, MALFORMED),
    "nested-10000-arrays": (nested(10_000), 400, MALFORMED),
    "nested-10000-arrays-in-a-field": (with_field("tags", nested(10_000)), 400, MALFORMED),
    "nested-10000-objects": (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400, MALFORMED),
    "nested-100-arrays-in-a-field": (with_field("tags", nested(100)), 422, "tags"),
    "number-1e400": (b'{"title": 1e400}', 400, MALFORMED),
    "number-1e400-as-priority": (with_field("priority", b"1e400"), 400, MALFORMED),
    "number-minus-1e400": (with_field("completed", b"-1e400"), 400, MALFORMED),
    "integer-with-5000-digits": (with_field("description", b"9" * 5000), 400, MALFORMED),
    "nan": (b'{"title": NaN}', 400, MALFORMED),
    "infinity": (with_field("due_date", b"Infinity"), 400, MALFORMED),
    "lone-high-surrogate-escaped": (b'{"title": "\\ud800"}', 400, MALFORMED),
    "lone-low-surrogate-escaped-in-a-tag": (with_field("tags", b'["\\udfff"]'), 400, MALFORMED),
    "reversed-surrogate-pair": (b'{"title": "\\ude00\\ud83d"}', 400, MALFORMED),
    "raw-invalid-utf8": (b'{"title": "\xff\xfe"}', 400, MALFORMED),
    "raw-overlong-utf8": (b'{"title": "\xc0\xaf"}', 400, MALFORMED),
    "raw-utf8-encoded-surrogate": (b'{"title": "\xed\xa0\x80"}', 400, MALFORMED),
    "utf16-body": ('{"title": "a"}'.encode("utf-16"), 400, MALFORMED),
    "latin1-body": ('{"title": "é"}'.encode("latin-1"), 400, MALFORMED),
    "raw-nul-in-a-string": (b'{"title": "a\x00b"}', 400, MALFORMED),
    "raw-nul-after-the-object": (b'{"title": "a"}\x00', 400, MALFORMED),
    "raw-newline-in-a-string": (b'{"title": "a\nb"}', 400, MALFORMED),
    "escaped-nul-in-title": (b'{"title": "a\\u0000b"}', 422, "title"),
    "escaped-nul-in-description": (with_field("description", b'"\\u0000"'), 422, "description"),
    "escaped-nul-in-a-tag": (with_field("tags", b'["a\\u0000"]'), 422, "tags"),
    "escaped-nul-in-a-key": (b'{"title": "a", "ti\\u0000tle": "b"}', 422, "ti\x00tle"),
    "escaped-nul-as-priority": (with_field("priority", b'"\\u0000"'), 422, "priority"),
    "escaped-nul-in-due-date": (with_field("due_date", b'"2026-01-01\\u0000"'), 422, "due_date"),
    "title-of-60000-characters": (json.dumps({"title": "a" * 60_000}).encode(), 422, "title"),
    "description-of-1001-characters": (json.dumps({"title": "t", "description": "d" * 1001}).encode(), 422,
                                       "description"),
    "tag-of-51-characters": (json.dumps({"title": "t", "tags": ["t" * 51]}).encode(), 422, "tags"),
    "5000-distinct-tags": (json.dumps({"title": "t", "tags": [f"t{i}" for i in range(5000)]}).encode(), 422,
                           "tags"),
    "key-of-60000-characters": (json.dumps({"title": "t", "k" * 60_000: 1}).encode(), 422, "k" * 60_000),
    "title-as-object": (b'{"title": {"$ne": null}}', 422, "title"),
    "title-as-list": (b'{"title": ["a"]}', 422, "title"),
    "tags-as-object": (with_field("tags", b'{"a": 1}'), 422, "tags"),
    "completed-as-string": (with_field("completed", b'"true"'), 422, "completed"),
    "due-date-in-year-10000-in-utc": (with_field("due_date", b'"9999-12-31T23:59:59-23:59"'), 422, "due_date"),
    "due-date-in-year-0-in-utc": (with_field("due_date", b'"0001-01-01T00:00:00+01:00"'), 422, "due_date"),
    "due-date-of-5000-digits": (with_field("due_date", b'"2026-01-01T00:00:00' + b"9" * 5000 + b'"'), 422,
                                "due_date"),
    "due-date-feb-30": (with_field("due_date", b'"2026-02-30T00:00:00Z"'), 422, "due_date"),
    "prototype-pollution-keys": (b'{"title": "t", "__proto__": {"admin": true}, "constructor": 1}', 422,
                                 "__proto__"),
    "array": (b'[{"title": "a"}]', 400, NOT_AN_OBJECT),
    "empty-array": (b"[]", 400, NOT_AN_OBJECT),
    "string": (b'"title"', 400, NOT_AN_OBJECT),
    "number": (b"42", 400, NOT_AN_OBJECT),
    "true": (b"true", 400, NOT_AN_OBJECT),
    "null": (b"null", 400, NOT_AN_OBJECT),
    "over-64-kib-by-one-byte": (sized(LIMIT + 1), 413, TOO_LARGE),
    "1-mib": (b'{"title": "' + b"a" * 1024 * 1024 + b'"}', 413, TOO_LARGE),
}

# Same body on every write; PUT and PATCH have no required field, so the title-only cases differ there.
WRITES = {
    "create": ("post", "/api/{user}/tasks"),
    "put": ("put", "/api/{user}/tasks/{task}"),
    "patch": ("patch", "/api/{user}/tasks/{task}"),
    "complete": ("patch", "/api/{user}/tasks/{task}/complete"),
}


@pytest.fixture
def task(create_task: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return create_task(USER, title="target", tags=["keep"])


def test_the_64_kib_case_is_just_over_the_limit():
    assert len(BODIES["over-64-kib-by-one-byte"][0]) == LIMIT + 1


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("name", list(BODIES))
def test_hostile_bodies_get_their_documented_4xx(send, task, write, name):
    body, status, expected = BODIES[name]
    if write == "complete" and status == 422:
        expected = "title"  # the completion body knows only completed and is_completed: "title" is unknown
    method, path = WRITES[write]
    response = send(method, path.format(user=USER, task=task["id"]), data=body, content_type="application/json")
    assert_error(response, status, expected)


def test_a_task_survives_every_hostile_write(send, task, client):
    for body, _, _ in BODIES.values():
        for method, path in list(WRITES.values())[1:3]:
            send(method, path.format(user=USER, task=task["id"]), data=body, content_type="application/json")
    after = client.get(f"/api/{USER}/tasks/{task['id']}", headers=bearer(make_token(USER))).json
    assert {k: after[k] for k in ("title", "description", "tags", "status")} == {
        "title": "target", "description": None, "tags": ["keep"], "status": "pending"}


# --- content types and missing bodies -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/json", "application/jsonx", "application/x-www-form-urlencoded", "application/xml",
     "multipart/form-data; boundary=x", "application/octet-stream", "json", "application/", "*/*"],
)
@pytest.mark.parametrize("write", list(WRITES))
def test_bodies_that_are_not_declared_json_are_415(send, task, write, content_type):
    method, path = WRITES[write]
    response = send(method, path.format(user=USER, task=task["id"]), data=b'{"title": "t"}',
                    headers={"Content-Type": content_type})
    assert_error(response, 415, NOT_JSON)


@pytest.mark.parametrize("write", list(WRITES))
def test_a_body_without_content_type_is_415(send, task, write):
    method, path = WRITES[write]
    response = send(method, path.format(user=USER, task=task["id"]), data=b'{"title": "t"}')
    assert_error(response, 415, NOT_JSON)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                                          "application/merge-patch+json"])
def test_json_media_types_are_accepted(send, content_type):
    response = send("post", f"/api/{USER}/tasks", data=b'{"title": "t"}', headers={"Content-Type": content_type})
    assert response.status_code == 201


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain"])
def test_a_missing_body_on_create_is_422_naming_title(send, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    assert_error(send("post", f"/api/{USER}/tasks", headers=headers), 422, "title")


@pytest.mark.parametrize("write", ["put", "patch"])
def test_a_missing_body_on_update_changes_no_field(send, task, write):
    method, path = WRITES[write]
    response = send(method, path.format(user=USER, task=task["id"]))
    assert response.status_code == 200
    assert {k: response.json[k] for k in ("title", "tags")} == {"title": "target", "tags": ["keep"]}


# --- the 64 KiB limit, however the body comes ----------------------------------------------------------------------

def chunked(body: bytes) -> dict[str, Any]:
    """Test-client arguments for a body with no Content-Length, as a server sends a chunked one."""
    return {"input_stream": io.BytesIO(body), "headers": {"Content-Type": "application/json",
                                                          "Transfer-Encoding": "chunked"},
            "environ_overrides": {"wsgi.input_terminated": True}}


def padded(size: int) -> bytes:
    """A valid create body of exactly `size` bytes: an object, then spaces."""
    head = b'{"title": "padded"}'
    return head + b" " * (size - len(head))


def test_a_chunked_body_over_64_kib_is_413_even_if_its_start_is_valid_json(send):
    response = send("post", f"/api/{USER}/tasks", **chunked(padded(LIMIT + 1)))
    assert_error(response, 413, TOO_LARGE)
    response = send("post", f"/api/{USER}/tasks", **chunked(b'{"title": "' + b"a" * 2 * LIMIT + b'"}'))
    assert_error(response, 413, TOO_LARGE)


def test_a_chunked_body_of_exactly_64_kib_is_accepted(send):
    response = send("post", f"/api/{USER}/tasks", **chunked(padded(LIMIT)))
    assert response.status_code == 201 and response.json["title"] == "padded"


def test_a_small_chunked_body_works(send):
    assert send("post", f"/api/{USER}/tasks", **chunked(b'{"title": "chunked"}')).status_code == 201


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_a_content_length_over_64_kib_is_413_whatever_the_type(send, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = send("post", f"/api/{USER}/tasks", data=padded(LIMIT + 1), headers=headers)
    assert_error(response, 413, TOO_LARGE)


# --- chunks gunicorn cannot read -----------------------------------------------------------------------------------

class MalformedChunks:
    """gunicorn's wsgi.input on a malformed chunked body: reading raises its parser's error (which is no OSError,
    so werkzeug does not take it for a client that left)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def read(self, _size: int = -1) -> bytes:
        raise self.error

    def tell(self) -> int:  # the test client measures the stream
        return 0

    def seek(self, _offset: int, _whence: int = 0) -> int:
        return 0


@pytest.mark.parametrize("error", [InvalidChunkSize(b"zz"), ChunkMissingTerminator(b"XX"), InvalidChunkExtension(b";")],
                         ids=["bad-size", "no-crlf-after-data", "bad-extension"])
def test_malformed_chunks_are_400_with_a_warning_and_no_traceback(send, capsys, error):
    response = send("post", f"/api/{USER}/tasks", **{**chunked(b""), "input_stream": MalformedChunks(error)})
    assert_error(response, 400, {"detail": "Malformed request body"})
    logged = capsys.readouterr().err
    assert '"level": "WARNING"' in logged and "malformed request body" in logged
    assert "Traceback" not in logged and '"level": "ERROR"' not in logged

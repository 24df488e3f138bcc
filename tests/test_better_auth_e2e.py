"""End to end with a real Better Auth server (npm better-auth + its jwt() plugin, see better_auth_server.py).

For each algorithm the plugin can sign with: sign a user up, take the JWT from /api/auth/token, and use it on our
API configured only with BETTER_AUTH_URL. Better Auth keeps its users on the same PostgreSQL server.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import jwt
import pytest
from flask import Flask
from sqlalchemy.engine import make_url

from todo_api import create_app

from .better_auth_server import SUPPORTED_ALGS, ensure_installed, node_available, running_better_auth
from .helpers import bearer, make_config, rolled_back

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def better_auth_installed() -> None:
    reason = node_available()
    if reason:
        print(f"skipping the Better Auth end-to-end tests: {reason}")
        pytest.skip(reason)
    ensure_installed()


@contextlib.contextmanager
def isolated(app: Flask) -> Iterator[None]:
    """Requests join a transaction rolled back at the end (helpers' `rolled_back`), then the pool closes."""
    try:
        with rolled_back(app):
            yield
    finally:
        app.extensions["db"].engine.dispose()


@pytest.mark.parametrize("alg", SUPPORTED_ALGS)
def test_a_real_better_auth_token_works_on_the_api(better_auth_installed, postgres_url, database_url, alg):
    libpq_url = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with running_better_auth(libpq_url, alg) as better_auth:
        email = f"{alg.lower()}-{uuid.uuid4().hex[:8]}@example.com"
        token, user = better_auth.sign_up_and_get_token(email, "correct-horse-battery", "Ada Lovelace")
        assert jwt.get_unverified_header(token)["alg"] == alg
        assert jwt.decode(token, options={"verify_signature": False})["sub"] == user["id"]

        app = create_app(make_config(database_url, BETTER_AUTH_URL=better_auth.url))
        with isolated(app):
            client = app.test_client()
            user_id, headers = user["id"], bearer(token)
            assert client.get("/api/me", headers=headers).json == {
                "user_id": user_id, "email": email, "name": "Ada Lovelace"}

            created = client.post(f"/api/{user_id}/tasks", json={"title": f"Signed with {alg}"}, headers=headers)
            assert created.status_code == 201, created.json
            assert created.json["user_id"] == user_id
            listed = client.get(f"/api/{user_id}/tasks", headers=headers)
            assert listed.status_code == 200
            assert [task["id"] for task in listed.json] == [created.json["id"]]

            other_token, other = better_auth.sign_up_and_get_token(f"other-{email}", "correct-horse-battery", "B")
            assert client.get(f"/api/{user_id}/tasks", headers=bearer(other_token)).status_code == 403
            assert client.get(f"/api/{other['id']}/tasks", headers=bearer(other_token)).json == []

            head, payload, signature = token.split(".")
            forged = f"{head}.{payload}.{signature[::-1]}"
            assert client.get("/api/me", headers=bearer(forged)).status_code == 401

        # Without BETTER_AUTH_URL only HS256 is on, and a Better Auth token is just an invalid token.
        hs256_only = create_app(make_config(database_url))
        try:
            assert hs256_only.test_client().get("/api/me", headers=headers).status_code == 401
        finally:
            hs256_only.extensions["db"].engine.dispose()

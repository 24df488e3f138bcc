"""End to end with a real Better Auth server (npm better-auth + its jwt() plugin, see better_auth_server.py).

For each algorithm the plugin can sign with: sign a user up, take the JWT from /api/auth/token, and use it on our
API configured only with BETTER_AUTH_URL. Better Auth keeps its users on the same PostgreSQL server. Then a key
rotation, a key removal and an outage of the real server, as our workers see them.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

import jwt
import psycopg2
import pytest
from flask import Flask
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from todo_api import create_app
from todo_api.auth import EXTENSION

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


class Clock:
    """The app's JWKS and token-cache clock, moved by the test instead of sleeping (starts at real time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def worker(database_url: str, better_auth_url: str, clock: Clock) -> Flask:
    """A fresh app, as a new gunicorn worker would be: empty key and token caches, the shared database."""
    app = create_app(make_config(database_url, BETTER_AUTH_URL=better_auth_url))
    authenticator = app.extensions[EXTENSION]
    authenticator.jwks.clock = authenticator.tokens.clock = clock
    return app


def better_auth_keys(better_auth_database_url: str, statement: str, *params: str) -> None:
    """Run SQL on Better Auth's own jwks table, as its key rotation or an operator would change it."""
    connection = psycopg2.connect(better_auth_database_url)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
    finally:
        connection.close()


def test_real_better_auth_rotation_removal_and_outage(better_auth_installed, postgres_url, database_url):
    libpq_url = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    clock, apps = Clock(), []
    try:
        with running_better_auth(libpq_url, "EdDSA") as better_auth:
            email = f"rotation-{uuid.uuid4().hex[:8]}@example.com"
            old_token, user = better_auth.sign_up_and_get_token(email, "correct-horse-battery", "Ada")
            old_kid = jwt.get_unverified_header(old_token)["kid"]
            app = worker(database_url, better_auth.url, clock)
            apps.append(app)
            client = app.test_client()
            assert client.get("/api/me", headers=bearer(old_token)).status_code == 200

            # Rotation: the key expires, Better Auth signs with a new one and publishes both (grace period).
            better_auth_keys(better_auth.database_url, 'UPDATE jwks SET "expiresAt" = now() - interval \'1 second\'')
            new_token, _ = better_auth.sign_in_and_get_token(email, "correct-horse-battery")
            new_kid = jwt.get_unverified_header(new_token)["kid"]
            assert new_kid != old_kid
            assert {key["kid"] for key in better_auth.get_jwks()["keys"]} == {old_kid, new_kid}
            clock.now += 5
            response = client.get("/api/me", headers=bearer(new_token))
            assert (response.status_code, response.headers.get("Retry-After")) == (503, "25"), response.json
            clock.now += 25
            assert client.get("/api/me", headers=bearer(new_token)).json["user_id"] == user["id"]
            assert client.get("/api/me", headers=bearer(old_token)).status_code == 200

            # Removal: the old key leaves the JWKS; within 5 minutes its tokens stop working, cached or not.
            better_auth_keys(better_auth.database_url, "DELETE FROM jwks WHERE id = %s", old_kid)
            clock.now += 300
            assert client.get("/api/me", headers=bearer(old_token)).status_code == 401
            assert client.get("/api/me", headers=bearer(new_token)).status_code == 200
            app.extensions[EXTENSION].jwks.wait_idle(5)  # its last fetch is shared in the database

        # Outage: Better Auth is stopped. A worker started now verifies with the JWKS shared in the database.
        started_during_outage = worker(database_url, better_auth.url, clock)
        apps.append(started_during_outage)
        response = started_during_outage.test_client().get("/api/me", headers=bearer(new_token))
        assert response.status_code == 200, response.json
        # A kid the shared JWKS lacks cannot be checked now: 503, not 401.
        assert started_during_outage.test_client().get("/api/me", headers=bearer(old_token)).status_code == 503
    finally:
        for app in apps:
            app.extensions[EXTENSION].jwks.wait_idle(5)
            app.extensions["db"].engine.dispose()
        engine = create_engine(database_url)
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM jwks_documents WHERE url LIKE :origin || '/%'"),
                               {"origin": better_auth.url})
        engine.dispose()

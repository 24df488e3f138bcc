"""Bearer JWT rules (HS256 with the shared secret), the path-user guard, and /api/me."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from todo_api import create_app

from .helpers import SECRET, bearer, make_config, make_token, no_database


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def unsigned_token(claims: dict) -> str:
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


def test_missing_token_is_401_with_bearer_challenge(client):
    response = client.get("/api/alice/tasks")
    assert response.status_code == 401
    assert response.json == {"detail": "Missing authentication token"}
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_expired_token_is_401_expired(client):
    token = make_token("alice", exp=int(time.time()) - 120)
    response = client.get("/api/alice/tasks", headers=bearer(token))
    assert response.status_code == 401
    assert response.json == {"detail": "Authentication token expired"}
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


def test_token_expired_within_leeway_is_accepted(client):
    token = make_token("alice", exp=int(time.time()) - 10)
    assert client.get("/api/alice/tasks", headers=bearer(token)).status_code == 200


now = int(time.time())


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param(make_token("alice", secret=SECRET.upper()), id="wrong-secret"),
        pytest.param(unsigned_token({"sub": "alice", "exp": now + 3600}), id="alg-none"),
        pytest.param(jwt.encode({"exp": now + 3600}, SECRET, algorithm="HS256"), id="no-sub"),
        pytest.param(jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), id="no-exp"),
        pytest.param(jwt.encode({"sub": 42, "exp": now + 3600}, SECRET, algorithm="HS256"), id="non-string-sub"),
        pytest.param(jwt.encode({"sub": "alice", "exp": "tomorrow"}, SECRET, algorithm="HS256"), id="string-exp"),
        pytest.param(jwt.encode({"sub": "alice", "exp": now + 3600, "nbf": now + 600}, SECRET, algorithm="HS256"),
                     id="nbf-future"),
        pytest.param(jwt.encode({"sub": "alice", "exp": now + 3600, "iat": now + 600}, SECRET, algorithm="HS256"),
                     id="iat-future"),
        pytest.param(jwt.encode({"sub": "alice", "exp": now + 3600}, SECRET, algorithm="HS512"), id="hs512"),
        pytest.param(make_token("alice")[:-4] + "AAAA", id="tampered-signature"),
    ],
)
def test_invalid_tokens_are_401_invalid(client, token):
    response = client.get("/api/alice/tasks", headers=bearer(token))
    assert response.status_code == 401
    assert response.json == {"detail": "Invalid authentication token"}
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


@pytest.mark.parametrize("header", ["Basic YWxpY2U6cHc=", "Bearer", "Bearer  ", "Token abc"])
def test_malformed_authorization_header_is_401(client, header):
    response = client.get("/api/alice/tasks", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json == {"detail": "Invalid authentication token"}


def test_cookies_are_never_read_for_authentication(client):
    client.set_cookie("better-auth.session_token", make_token("alice"))
    client.set_cookie("token", make_token("alice"))
    assert client.get("/api/alice/tasks").status_code == 401


def test_iss_and_aud_are_accepted_when_not_configured(client):
    token = make_token("alice", iss="https://auth.example.com", aud="https://app.example.com")
    assert client.get("/api/alice/tasks", headers=bearer(token)).status_code == 200


@pytest.fixture
def strict_client(database_url):
    app = create_app(make_config(database_url, JWT_ISSUER=["https://auth.example.com"],
                                 JWT_AUDIENCE=["https://app.example.com", "other"]))
    yield app.test_client()
    app.extensions["db"].engine.dispose()


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"iss": "https://auth.example.com", "aud": "https://app.example.com"}, 200),
        ({"iss": "https://auth.example.com", "aud": ["x", "other"]}, 200),
        ({"iss": "https://evil.example.com", "aud": "https://app.example.com"}, 401),
        ({"iss": "https://auth.example.com", "aud": "https://evil.example.com"}, 401),
        ({"aud": "https://app.example.com"}, 401),
        ({"iss": "https://auth.example.com"}, 401),
    ],
)
def test_iss_and_aud_are_checked_when_configured(strict_client, claims, status):
    response = strict_client.get("/api/me", headers=bearer(make_token("alice", **claims)))
    assert response.status_code == status


def test_path_user_mismatch_is_403_before_any_database_access(client, auth, app):
    # A broken session factory proves no query is attempted.
    with no_database(app):
        response = client.get("/api/bob/tasks", headers=auth("alice"))
    assert response.status_code == 403


def test_me_returns_claims_with_null_for_absent_ones(client, auth):
    assert client.get("/api/me", headers=auth("alice", email="a@example.com", name="Alice")).json == {
        "user_id": "alice", "email": "a@example.com", "name": "Alice"}
    assert client.get("/api/me", headers=auth("bob")).json == {"user_id": "bob", "email": None, "name": None}


def test_me_requires_a_token(client):
    assert client.get("/api/me").status_code == 401

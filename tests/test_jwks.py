"""Better Auth's JWKS way (contract, Authentication, way 2), against a local JWKS endpoint and keys made here.

A forged or malformed token is a 401 whatever it claims, and makes no request to anything but the configured JWKS
URL. Time for the JWKS cache is a fake clock, so the 30 s refresh limit is proven without sleeping. The HS256 way's
token rules are in test_auth.py.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448, rsa
from flask import Flask
from jwt.algorithms import OKPAlgorithm, get_default_algorithms
from sqlalchemy import create_engine, text

from todo_api import create_app
from todo_api.auth import EXTENSION, Authenticator, TokenCache
from todo_api.config import ConfigError, load_config
from todo_api.jwks import USER_AGENT, JWKSCache, JWKSStore, JWKSUnavailable, key_algorithms, parse_jwks

from .helpers import SECRET, UNREACHABLE_DATABASE_URL, b64url, bearer, hs256, make_config, make_token, segment
from .jwks_server import JWKSServer, Key, Tokens, new_key

INVALID = {"detail": "Invalid authentication token"}
EXPIRED = {"detail": "Authentication token expired"}
UNAVAILABLE = {"detail": "Authentication service unavailable"}
ALGORITHMS = ["EdDSA", "ES256", "ES512", "RS256", "PS256"]


# --- keys, tokens, a JWKS endpoint, a clock ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    """One key per supported algorithm, plus an ES384 key (an algorithm we do not enable)."""
    return {alg: new_key(alg) for alg in [*ALGORITHMS, "ES384"]}


def hmac_token(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """HS256 by hand: PyJWT rightly refuses to HMAC with a PEM public key."""
    return hs256({"alg": "HS256", "typ": "JWT", "kid": kid}, claims, secret)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def unusable_keys() -> list[dict[str, Any]]:
    """Published next to the real keys and never used: a shared secret, an encryption key, a kid-less key."""
    return [
        {"kty": "oct", "kid": "shared", "k": b64url(b"published-secret-" * 4), "alg": "HS256"},
        {**new_key("EdDSA").jwk, "kid": "for-encryption", "use": "enc"},
        {k: v for k, v in new_key("EdDSA").jwk.items() if k != "kid"},
    ]


@pytest.fixture
def server(keys: dict[str, Key], unusable_keys: list[dict[str, Any]]) -> Iterator[JWKSServer]:
    endpoint = JWKSServer([key.jwk for key in keys.values()] + unusable_keys)
    yield endpoint
    endpoint.stop()


@pytest.fixture
def tokens(server: JWKSServer, keys: dict[str, Key]) -> Tokens:
    return Tokens(server.origin, keys)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def shared_jwks(database_url: str, server: JWKSServer) -> Iterator[Callable[[], list[str]]]:
    """The shared JWKS rows of this test's endpoint (a port may be reused within a run): cleared before and after.

    Calling it returns the stored URLs.
    """
    engine = create_engine(database_url)

    def clear() -> None:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM jwks_documents WHERE url LIKE :origin || '/%'"),
                               {"origin": server.origin})

    def stored() -> list[str]:
        with engine.connect() as connection:
            return list(connection.execute(text("SELECT url FROM jwks_documents WHERE url LIKE :origin || '/%'"),
                                           {"origin": server.origin}).scalars())

    clear()
    yield stored
    clear()
    engine.dispose()


@pytest.fixture
def make_app(database_url: str, server: JWKSServer, clock: Clock, shared_jwks: Any) -> Iterator[Callable[..., Flask]]:
    """make_app(**config) -> an app with BETTER_AUTH_URL = the local endpoint, the shared secret, the fake clock.

    Each app is a fresh worker: its own key and token caches, the database's shared JWKS.
    """
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        app = create_app(make_config(database_url, BETTER_AUTH_URL=server.origin, **overrides))
        authenticator = app.extensions[EXTENSION]
        authenticator.tokens.clock = clock
        if authenticator.jwks is not None:
            authenticator.jwks.clock = clock
        apps.append(app)
        return app

    yield build
    for app in apps:
        jwks = app.extensions[EXTENSION].jwks
        if jwks is not None:
            jwks.wait_idle(5)
        app.extensions["db"].engine.dispose()


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> Any:
    """Both ways on: the shared secret and the JWKS."""
    return make_app().test_client()


@pytest.fixture
def jwks_only_client(make_app: Callable[..., Flask]) -> Any:
    """Only the JWKS way (production allows no secret when BETTER_AUTH_URL is set)."""
    app = make_app(APP_ENV="production", BETTER_AUTH_SECRET=None)
    assert app.extensions[EXTENSION].secret is None
    return app.test_client()


def me(client: Any, token: str) -> Any:
    return client.get("/api/me", headers=bearer(token))


def settled(client: Any) -> Any:
    """The client, once its app's last JWKS fetch has ended and been shared."""
    client.application.extensions[EXTENSION].jwks.wait_idle(5)
    return client


def assert_invalid(response: Any, body: dict[str, str] = INVALID) -> None:
    assert response.status_code == 401, response.json
    assert response.json == body
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


# --- accepted tokens ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_every_better_auth_algorithm_is_accepted(client, tokens, server, alg):
    response = me(client, tokens.sign(alg, "user-1"))
    assert response.status_code == 200, response.json
    assert response.json == {"user_id": "user-1", "email": "user-1@example.com", "name": "User-1"}
    assert server.fetches == 1


def test_the_path_user_must_be_the_token_sub(client, tokens):
    token = tokens.sign("EdDSA", "user-1", emailVerified=False, id="user-1")
    assert client.get("/api/user-2/tasks", headers=bearer(token)).status_code == 403


def test_jwks_is_read_from_better_auth_url_by_default(client, tokens, server):
    assert me(client, tokens.sign()).status_code == 200
    assert server.requests == [("/api/auth/jwks", USER_AGENT)]
    assert USER_AGENT.startswith("todo-api/")


def test_better_auth_jwks_url_overrides_the_location(make_app, tokens, server):
    client = make_app(BETTER_AUTH_JWKS_URL=f"{server.origin}/.well-known/jwks.json").test_client()
    assert me(client, tokens.sign()).status_code == 200
    assert [path for path, _ in server.requests] == ["/.well-known/jwks.json"]


def test_hs256_and_jwks_work_at_once(client, tokens):
    assert me(client, make_token("bob")).json["user_id"] == "bob"
    assert me(client, tokens.sign("EdDSA", "alice")).json["user_id"] == "alice"
    # HS256 keeps its rule: iss/aud unchecked unless JWT_ISSUER/JWT_AUDIENCE are set.
    assert me(client, make_token("bob", iss="https://other.example", aud="x")).status_code == 200


def test_expired_is_401_expired_and_leeway_is_honoured(client, tokens):
    now = int(time.time())
    assert_invalid(me(client, tokens.sign(exp=now - 120)), EXPIRED)
    assert me(client, tokens.sign(exp=now - 10)).status_code == 200


def test_jwt_issuer_and_audience_override_the_origin(make_app, tokens):
    client = make_app(JWT_ISSUER=["https://auth.example.com"], JWT_AUDIENCE=["todo-api", "other"]).test_client()
    assert me(client, tokens.sign(iss="https://auth.example.com", aud="todo-api")).status_code == 200
    assert me(client, tokens.sign(iss="https://auth.example.com", aud=["x", "other"])).status_code == 200
    assert_invalid(me(client, tokens.sign()))  # iss/aud = the origin, no longer accepted
    assert_invalid(me(client, tokens.sign(aud="todo-api")))


@pytest.mark.parametrize(
    "aud",
    [pytest.param([], id="empty"), pytest.param([1], id="number"), pytest.param([["todo-api"]], id="nested"),
     pytest.param({"todo-api": 1}, id="object"), pytest.param("", id="empty-string"),
     pytest.param(["x", "y"], id="list-without-ours")],
)
def test_odd_aud_values_are_401_when_an_audience_is_configured(make_app, tokens, aud):
    client = make_app(JWT_AUDIENCE=["todo-api"]).test_client()
    assert me(client, tokens.sign(aud=["x", "todo-api"])).status_code == 200
    assert_invalid(me(client, tokens.sign(aud=aud)))


# --- rejected tokens ----------------------------------------------------------------------------------------------


def _pem(key: Key) -> bytes:
    public = key.private.public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _tampered(token: str) -> str:
    head, payload, signature = token.split(".")
    return f"{head}.{payload}.{signature[:-6]}{'A' * 6 if signature[-6:] != 'A' * 6 else 'B' * 6}"


def _swapped_payload(t: Tokens) -> str:
    head, _, signature = t.sign("EdDSA", "alice").split(".")
    return f"{head}.{segment(t.claims('bob'))}.{signature}"


def _unsigned(t: Tokens, alg: str) -> str:
    return f"{segment({'alg': alg, 'kid': t.keys['EdDSA'].kid})}.{segment(t.claims())}."


def _with_kid(t: Tokens, kid: Any) -> str:
    """An EdDSA-looking token whose kid is not a string (PyJWT refuses to build one)."""
    return f"{segment({'alg': 'EdDSA', 'kid': kid})}.{segment(t.claims())}.c2ln"


def _signed_payload(t: Tokens, payload: dict[str, Any]) -> str:
    """A genuine EdDSA signature over any JSON payload (PyJWT's jwt.encode refuses a non-string iss)."""
    key = t.keys["EdDSA"]
    return jwt.api_jws.encode(json.dumps(payload).encode(), key.private, algorithm="EdDSA", headers={"kid": key.kid})


def _attackers(t: Tokens, **header: Any) -> str:
    """An EdDSA token signed by an attacker's own key under the published kid, with extra header fields."""
    attacker = new_key("EdDSA", t.keys["EdDSA"].kid)
    return jwt.encode(t.claims(), attacker.private, algorithm="EdDSA", headers={"kid": attacker.kid, **header})


NOW = int(time.time())
REJECTED: dict[str, Callable[[Tokens], str]] = {
    # claims
    "wrong-iss": lambda t: t.sign(iss="https://evil.example"),
    "wrong-aud": lambda t: t.sign(aud="https://evil.example"),
    "aud-list-without-origin": lambda t: t.sign(aud=["a", "b"]),
    "aud-empty-list": lambda t: t.sign(aud=[]),
    "aud-nested-list": lambda t: t.sign(aud=[[t.origin]]),
    "aud-list-of-numbers": lambda t: t.sign(aud=[1, 2]),
    "aud-object": lambda t: t.sign(aud={t.origin: True}),
    "no-iss": lambda t: t.sign(iss=None),
    "iss-list": lambda t: _signed_payload(t, t.claims(iss=[t.origin])),
    "iss-number": lambda t: _signed_payload(t, t.claims(iss=1)),
    "iss-object": lambda t: _signed_payload(t, t.claims(iss={"$eq": t.origin})),
    "no-aud": lambda t: t.sign(aud=None),
    "nbf-future": lambda t: t.sign(nbf=NOW + 600),
    "nbf-numeric-string": lambda t: t.sign(nbf="0"),
    "iat-future": lambda t: t.sign(iat=NOW + 600),
    "no-sub": lambda t: t.sign(sub=None),
    "non-string-sub": lambda t: t.sign(sub=42),
    "sub-empty": lambda t: t.sign(sub=""),
    "sub-nul": lambda t: t.sign(sub="a\x00b"),
    "sub-256-characters": lambda t: t.sign(sub="a" * 256),
    "no-exp": lambda t: t.sign(exp=None),
    "exp-numeric-string": lambda t: t.sign(exp=str(NOW + 900)),
    # signatures and keys
    "tampered-signature": lambda t: _tampered(t.sign("EdDSA")),
    "tampered-rsa-signature": lambda t: _tampered(t.sign("RS256")),
    "swapped-payload": _swapped_payload,
    "unknown-kid": lambda t: t.sign(kid="no-such-kid"),
    "no-kid": lambda t: t.sign(kid=None),
    "unpublished-key-with-published-kid": lambda t: t.sign("RS256", key=new_key("RS256", t.keys["RS256"].kid)),
    **{f"alg-{alg or 'empty'}": (lambda t, alg=alg: _unsigned(t, alg)) for alg in ("none", "None", "NONE", "nOnE", "")},
    "es256-header-on-rsa-kid": lambda t: t.sign("ES256", kid=t.keys["RS256"].kid),
    "eddsa-header-on-p256-kid": lambda t: t.sign("EdDSA", kid=t.keys["ES256"].kid),
    "es512-header-on-p256-kid": lambda t: t.sign("ES512", kid=t.keys["ES256"].kid),
    "rs256-with-the-ps256-key": lambda t: t.sign("RS256", key=t.keys["PS256"]),
    "ps256-with-the-rs256-key": lambda t: t.sign("PS256", key=t.keys["RS256"]),
    "es384-not-enabled": lambda t: t.sign("ES384"),
    "hs512-with-the-secret": lambda t: jwt.encode(t.claims(), SECRET, algorithm="HS512",
                                                  headers={"kid": t.keys["EdDSA"].kid}),
    # key confusion: HS256 with a published key as the HMAC secret
    **{f"hs256-with-the-{alg.lower()}-public-pem": (lambda t, alg=alg: hmac_token(
        t.claims(), _pem(t.keys[alg]), t.keys[alg].kid)) for alg in ALGORITHMS},
    **{f"hs256-with-the-{alg.lower()}-jwk-json": (lambda t, alg=alg: hmac_token(
        t.claims(), json.dumps(t.keys[alg].jwk).encode(), t.keys[alg].kid)) for alg in ("EdDSA", "RS256", "ES256")},
    "hs256-with-raw-ed25519-bytes": lambda t: hmac_token(
        t.claims(), base64.urlsafe_b64decode(t.keys["EdDSA"].jwk["x"] + "="), t.keys["EdDSA"].kid),
    "hs256-with-published-oct-key": lambda t: hmac_token(t.claims(), b"published-secret-" * 4, "shared"),
    # kid injection: a dict lookup, never a path, a query or a URL
    **{f"kid-{name}": (lambda t, kid=kid: t.sign("EdDSA", kid=kid)) for name, kid in {
        "path-traversal": "../../../../etc/passwd",
        "url-path": "../../jwks?kid=x",
        "sql-injection": "' OR '1'='1' --",
        "absolute-url": "http://127.0.0.1:1/key",
        "nul": "a\x00b",
        "10000-characters": "k" * 10_000,
    }.items()},
    **{f"kid-{name}": (lambda t, kid=kid: _with_kid(t, kid)) for name, kid in {
        "list": ["x"], "number": 7, "object": {"$gt": ""},
    }.items()},
    # a key shipped in the token, a URL to fetch one from, or extensions nobody here understands (RFC 7515 4.1.11)
    "embedded-jwk-of-an-attacker": lambda t: _attackers(t, jwk=new_key("EdDSA").jwk),
    "jku-to-an-attacker": lambda t: _attackers(t, jku="http://127.0.0.1:1/jwks.json"),
    "x5u-to-an-attacker": lambda t: _attackers(t, x5u="http://127.0.0.1:1/cert.pem"),
    "crit-on-an-attackers-token": lambda t: _attackers(t, crit=["exp"]),
    "crit-on-a-genuine-token": lambda t: jwt.encode(t.claims(), t.keys["EdDSA"].private, algorithm="EdDSA",
                                                    headers={"kid": t.keys["EdDSA"].kid, "crit": ["exp"]}),
    "garbage": lambda t: "not.a.jwt",
}


@pytest.mark.parametrize("secret", ["jwks+hs256", "jwks-only"])
@pytest.mark.parametrize("name", list(REJECTED))
def test_rejected_tokens_are_401_invalid_and_fetch_only_the_jwks(request, tokens, server, secret, name):
    client = request.getfixturevalue("client" if secret == "jwks+hs256" else "jwks_only_client")
    assert_invalid(me(client, REJECTED[name](tokens)))
    assert me(client, tokens.sign()).status_code == 200  # the token is otherwise valid
    assert server.requests == [("/api/auth/jwks", USER_AGENT)]  # one fetch, the JWKS's, whatever the token said


def test_tokens_that_cannot_be_jwks_tokens_cost_no_fetch(client, tokens, server):
    for name in ("alg-none", "no-kid", "es384-not-enabled", "hs256-with-the-eddsa-public-pem", "garbage"):
        assert_invalid(me(client, REJECTED[name](tokens)))
    assert server.fetches == 0


# --- start-up, refresh limit, rotation --------------------------------------------------------------------------


def test_start_up_does_not_fetch_nor_need_the_auth_server(make_app, server, tokens):
    make_app()
    assert server.fetches == 0
    server.stop()
    client = make_app().test_client()  # auth server down: start-up still works
    assert me(client, make_token("bob")).status_code == 200  # and so does HS256


def assert_unavailable(response: Any, retry_after: str) -> None:
    assert (response.status_code, response.json, response.headers.get("Retry-After")) == (
        503, UNAVAILABLE, retry_after), response.json


def test_unknown_kids_refresh_at_most_once_per_30_seconds(client, tokens, server, clock):
    for _ in range(20):  # the first, lazy fetch was made for these tokens: their kids are not published
        assert_invalid(me(client, tokens.sign(kid=uuid.uuid4().hex)))
    assert server.fetches == 1
    clock.advance(1)
    for _ in range(20):  # held back: perhaps published since, so 503 and when to come back, never 401
        assert_unavailable(me(client, tokens.sign(kid=uuid.uuid4().hex)), "29")
    clock.advance(28.9)
    assert_unavailable(me(client, tokens.sign(kid=uuid.uuid4().hex)), "1")
    assert server.fetches == 1
    clock.advance(0.1)
    for _ in range(20):
        assert_invalid(me(client, tokens.sign(kid=uuid.uuid4().hex)))
    assert server.fetches == 2
    assert me(client, tokens.sign()).status_code == 200  # known kids never wait for the limit
    assert server.fetches == 2


def test_concurrent_unknown_kids_share_one_fetch(server, clock):
    cache = JWKSCache(f"{server.origin}/api/auth/jwks", clock=clock)
    start, results = threading.Barrier(16), []

    def lookup() -> None:
        start.wait()
        results.append(cache.get(uuid.uuid4().hex))

    threads = [threading.Thread(target=lookup) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [None] * 16
    assert server.fetches == 1


def test_a_key_published_after_the_last_fetch_is_never_401(client, tokens, server, clock):
    old = tokens.keys["EdDSA"]
    server.keys = [old.jwk]
    assert me(client, tokens.sign()).status_code == 200
    new = new_key("EdDSA")
    server.keys = [new.jwk, old.jwk]  # Better Auth keeps the old key during its grace period
    clock.advance(5)
    token = tokens.sign(key=new)
    assert_unavailable(me(client, token), "25")  # within 30 s of the last fetch: come back in 25 s
    clock.advance(10)
    assert_unavailable(me(client, tokens.sign(key=new)), "15")  # the frontend's retry with a fresh token
    clock.advance(15)
    assert me(client, token).status_code == 200
    assert me(client, tokens.sign(key=old)).status_code == 200
    assert server.fetches == 2


def test_a_removed_keys_older_token_is_401_at_once_while_a_fetch_is_held_back(client, tokens, server, clock):
    """A token issued before our last fetch (beyond the leeway) had its key published before that fetch, which
    did not find it: the key is gone, so 401 now rather than 503 until the refresh limit allows a fetch."""
    removed, kept = tokens.keys["EdDSA"], tokens.keys["ES256"]
    server.keys = [removed.jwk, kept.jwk]
    assert me(client, tokens.sign(key=removed)).status_code == 200  # fetch 1
    server.keys = [kept.jwk]
    clock.advance(31)
    assert_invalid(me(client, tokens.sign(key=new_key("EdDSA"))))  # an unknown kid: fetch 2, without `removed`
    clock.advance(1)
    assert_invalid(me(client, tokens.sign(key=removed, iat=int(time.time()) - 120)))
    assert_unavailable(me(client, tokens.sign(key=removed)), "29")  # issued just now: it may be a new key's
    assert server.fetches == 2


def test_a_routine_refresh_just_before_a_rotation_does_not_delay_the_new_key(client, tokens, server, clock):
    old = tokens.keys["EdDSA"]
    assert me(client, tokens.sign(key=old)).status_code == 200
    clock.advance(300)
    assert me(client, tokens.sign(key=old)).status_code == 200  # keys are old: re-fetched
    new = new_key("EdDSA")
    server.keys = [new.jwk, old.jwk]
    clock.advance(1)
    assert me(client, tokens.sign(key=new)).status_code == 200
    assert server.fetches == 3


def test_a_removed_kid_arriving_during_a_routine_recheck_is_401_not_503(client, tokens, server, clock):
    """The re-check in flight began before the request arrived, so it cannot tell whether the kid was published
    since: the unknown-kid fetch, which is due, tells (401) rather than a 503 the client would retry."""
    old, kept = tokens.keys["EdDSA"], tokens.keys["ES256"]
    assert me(client, tokens.sign(key=old)).status_code == 200  # fetch 1, for an unknown kid
    server.keys = [kept.jwk]
    clock.advance(270)
    assert me(client, tokens.sign("ES256", key=kept)).status_code == 200  # routine re-check 2 drops `old`
    settled(client)
    clock.advance(270)
    server.mode, server.trickle_delay = "trickle", 0.005  # re-check 3 takes about a second
    assert me(client, tokens.sign("ES256", key=kept)).status_code == 200  # starts re-check 3, does not wait
    clock.advance(1)
    assert_invalid(me(client, tokens.sign(key=old)))  # waited for re-check 3, then fetch 4
    assert server.fetches == 4
    assert_invalid(me(client, tokens.sign(key=old)))  # fetch 4 began after this arrived: no fetch
    assert server.fetches == 4


def test_keys_are_refetched_in_the_background_before_they_are_5_minutes_old(client, tokens, server, clock):
    assert me(client, tokens.sign()).status_code == 200
    clock.advance(269)
    assert me(client, tokens.sign()).status_code == 200
    assert server.fetches == 1
    clock.advance(1)
    assert me(client, tokens.sign()).status_code == 200  # answered with the cached key; a re-fetch started
    settled(client)
    assert server.fetches == 2
    clock.advance(260)
    assert me(client, tokens.sign()).status_code == 200  # 260 s after the re-fetch: no fetch
    assert server.fetches == 2


def test_a_key_removed_from_the_jwks_stops_working_within_max_age_cached_tokens_included(
        client, tokens, server, clock):
    old, new = tokens.keys["EdDSA"], tokens.keys["ES256"]
    cached_token = tokens.sign(key=old)
    assert me(client, cached_token).status_code == 200
    server.keys = [new.jwk]  # grace period over: the old key is gone
    clock.advance(100)
    assert me(client, cached_token).status_code == 200  # a cache hit
    clock.advance(199)
    assert me(client, tokens.sign(key=old)).status_code == 200  # the key check is 299 s old: still trusted
    settled(client)  # the re-fetch it started in the background
    clock.advance(1)
    assert_invalid(me(client, tokens.sign(key=old)))
    assert_invalid(me(client, cached_token))  # the cache entry lived no longer than the key check behind it
    assert me(client, tokens.sign("ES256", key=new)).status_code == 200


def test_a_recheck_that_lands_during_verification_does_not_extend_the_cache_entry(client, tokens, server, clock,
                                                                                monkeypatch):
    assert me(client, tokens.sign()).status_code == 200
    jwks = client.application.extensions[EXTENSION].jwks
    lookup = jwks.get

    def lookup_then_let_the_background_recheck_land(kid: str) -> Any:
        key = lookup(kid)
        jwks.wait_idle(5)
        return key

    monkeypatch.setattr(jwks, "get", lookup_then_let_the_background_recheck_land)
    clock.advance(280)
    server.keys = [tokens.keys["ES256"].jwk]  # the EdDSA key is removed; the re-check started now will see it
    token = tokens.sign()
    assert me(client, token).status_code == 200  # verified with the key of the check made at 0 s
    clock.advance(19)
    assert me(client, token).status_code == 200  # cached, within 300 s of that check
    clock.advance(1)
    assert_invalid(me(client, token))  # not cached until 300 s after the re-check that dropped the key


def test_an_idle_worker_rechecks_keys_older_than_5_minutes_before_using_them(client, tokens, server, clock):
    old, new = tokens.keys["EdDSA"], tokens.keys["ES256"]
    cached_token = tokens.sign(key=old)
    assert me(client, cached_token).status_code == 200
    server.keys = [new.jwk]
    clock.advance(300)  # no request in the background-refresh window
    assert_invalid(me(client, cached_token))
    assert_invalid(me(client, tokens.sign(key=old)))
    assert server.fetches == 2


# --- outages ------------------------------------------------------------------------------------------------------


def _take_down(server: JWKSServer, how: str) -> None:
    if how == "refused":
        server.stop()
    else:
        server.mode = how


@pytest.mark.parametrize("how", ["refused", "error", "garbage"])
def test_outage_keeps_cached_keys_and_answers_503_for_uncached_ones(client, tokens, server, clock, how):
    assert me(client, tokens.sign()).status_code == 200
    _take_down(server, how)
    clock.advance(400)  # keys are stale: a refresh is attempted, fails, and the cached keys stay
    assert me(client, tokens.sign()).status_code == 200
    assert me(client, tokens.sign()).status_code == 200
    clock.advance(30)
    response = me(client, tokens.sign(key=new_key("EdDSA")))
    assert response.status_code == 503
    assert response.json == UNAVAILABLE
    assert response.headers["Retry-After"] == "30"
    clock.advance(12)
    response = client.get("/api/alice/tasks", headers=bearer(tokens.sign(key=new_key("EdDSA"))))
    assert (response.status_code, response.json, response.headers["Retry-After"]) == (503, UNAVAILABLE, "18")
    assert me(client, tokens.sign()).status_code == 200


def test_auth_server_down_at_first_request_then_back(client, tokens, server, clock):
    server.stop()
    response = me(client, tokens.sign())
    assert (response.status_code, response.json, response.headers["Retry-After"]) == (503, UNAVAILABLE, "30")
    assert me(client, make_token("bob")).status_code == 200  # HS256 does not depend on the auth server
    server.start()
    clock.advance(10)
    assert me(client, tokens.sign()).status_code == 503  # no new attempt within 30 s
    clock.advance(20)
    assert me(client, tokens.sign()).status_code == 200
    assert server.fetches == 1


def test_a_hanging_auth_server_costs_at_most_the_timeout(server, clock):
    server.mode = "hang"
    cache = JWKSCache(f"{server.origin}/api/auth/jwks", clock=clock, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(JWKSUnavailable) as raised:
        cache.get("any")
    assert time.monotonic() - started < 2
    assert raised.value.retry_after == 30


# --- the last good JWKS, shared by every worker and instance through the database --------------------------------


def test_a_new_worker_during_an_outage_verifies_with_the_shared_jwks(make_app, tokens, server, shared_jwks):
    first = make_app().test_client()
    assert me(first, tokens.sign()).status_code == 200
    settled(first)
    assert shared_jwks() == [f"{server.origin}/api/auth/jwks"]
    server.stop()
    for _ in range(2):  # a worker started (or recycled by max_requests, or restarted) while Better Auth is down
        response = me(make_app().test_client(), tokens.sign("ES256"))
        assert response.status_code == 200, response.json
    assert_unavailable(me(make_app().test_client(), tokens.sign(key=new_key("EdDSA"))), "30")


def test_a_new_worker_reads_a_fresh_shared_jwks_without_asking_the_auth_server(make_app, tokens, server, clock):
    first = make_app().test_client()
    assert me(first, tokens.sign()).status_code == 200
    settled(first)
    assert server.fetches == 1
    later = make_app().test_client()
    for alg in ALGORITHMS:
        assert me(later, tokens.sign(alg)).status_code == 200
    assert server.fetches == 1
    new = new_key("EdDSA")
    server.keys = [*server.keys, new.jwk]
    assert me(later, tokens.sign(key=new)).status_code == 200  # unknown kid: asks the auth server itself
    assert server.fetches == 2


@pytest.mark.parametrize(("age", "first_answer"), [(271, 200), (301, 401)])
def test_a_new_worker_refetches_an_old_shared_jwks(make_app, tokens, server, database_url, age, first_answer):
    first = make_app().test_client()
    assert me(first, tokens.sign()).status_code == 200
    settled(first)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE jwks_documents SET fetched_at = now() - make_interval(secs => :age) "
                                "WHERE url LIKE :origin || '/%'"), {"age": age, "origin": server.origin})
    engine.dispose()
    server.keys = [tokens.keys["ES256"].jwk]  # the EdDSA key was removed meanwhile
    later = make_app().test_client()
    # Under 5 minutes the shared check still holds (re-fetched in the background); over, it is redone first.
    assert me(later, tokens.sign()).status_code == first_answer
    settled(later)
    assert_invalid(me(later, tokens.sign()))
    assert me(later, tokens.sign("ES256")).status_code == 200
    assert server.fetches == 2


def test_a_database_outage_does_not_stop_jwks_verification(server, tokens):
    store = JWKSStore(create_engine(UNREACHABLE_DATABASE_URL))
    cache = JWKSCache(f"{server.origin}/api/auth/jwks", store=store)
    assert cache.get(tokens.keys["EdDSA"].kid) is not None
    assert server.fetches == 1


# --- a slow auth server --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [pytest.param(0.05, id="a-byte-every-50-ms"), pytest.param(5, id="stalled-body")])
def test_a_trickling_auth_server_costs_at_most_the_total_deadline(server, clock, delay):
    server.mode, server.trickle_delay = "trickle", delay  # the whole JWKS would take minutes
    cache = JWKSCache(f"{server.origin}/api/auth/jwks", clock=clock, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(JWKSUnavailable):
        cache.get("any")
    assert time.monotonic() - started < 1.8
    cache.wait_idle(5)


def test_requests_waiting_for_a_slow_fetch_give_up_within_the_deadline(server, tokens, clock):
    server.mode, server.trickle_delay = "trickle", 0.05
    cache = JWKSCache(f"{server.origin}/api/auth/jwks", clock=clock, timeout=2.0)
    start, durations, outcomes = threading.Barrier(16), [], []

    def lookup() -> None:
        start.wait()
        began = time.monotonic()
        try:
            outcomes.append(cache.get(tokens.keys["EdDSA"].kid))
        except JWKSUnavailable:
            outcomes.append("503")
        durations.append(time.monotonic() - began)

    threads = [threading.Thread(target=lookup) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == ["503"] * 16
    durations.sort()
    assert durations[-1] < 3.0, durations  # the fetch's deadline (2 s), and no more
    assert durations[-3] < 1.2, durations  # all but two waiters give up after half a second, freeing threads
    assert server.fetches == 1


def test_cached_key_and_hs256_requests_never_wait_for_a_fetch(make_app, tokens, server, clock):
    client = make_app().test_client()
    assert me(client, tokens.sign()).status_code == 200
    server.mode, server.trickle_delay = "trickle", 0.05
    clock.advance(280)  # keys due for a background re-fetch
    new = new_key("EdDSA")
    waiting = threading.Thread(target=lambda: me(client, tokens.sign(key=new)))
    began = time.monotonic()
    assert me(client, tokens.sign()).status_code == 200  # starts the background re-fetch, which trickles
    waiting.start()  # an unknown kid waits for that fetch
    for token in (tokens.sign(), tokens.sign("ES256"), make_token("bob")):
        assert me(client, token).status_code == 200
    assert time.monotonic() - began < 1.5  # the trickled fetch lasts its whole deadline, 3 s
    waiting.join()
    assert server.fetches == 2


# --- key handling units -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jwk", "expected"),
    [
        ({"kty": "OKP", "crv": "Ed25519"}, ("EdDSA", "Ed25519")),
        ({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA"}, ("EdDSA", "Ed25519")),
        ({"kty": "OKP", "crv": "Ed25519", "alg": "Ed25519"}, ("EdDSA", "Ed25519")),
        ({"kty": "OKP", "crv": "Ed25519", "alg": "Ed448"}, ()),
        ({"kty": "OKP", "crv": "Ed448", "alg": "EdDSA"}, ("EdDSA", "Ed448")),
        ({"kty": "OKP", "crv": "Ed448", "alg": "Ed448"}, ("EdDSA", "Ed448")),
        ({"kty": "OKP", "crv": "Ed448", "alg": "Ed25519"}, ()),
        ({"kty": "OKP", "crv": "X25519"}, ()),
        ({"kty": "EC", "crv": "P-256", "alg": "ES256"}, ("ES256",)),
        ({"kty": "EC", "crv": "P-256", "alg": "ES512"}, ()),
        ({"kty": "EC", "crv": "P-384", "alg": "ES384"}, ()),
        ({"kty": "EC", "crv": "P-521"}, ("ES512",)),
        ({"kty": "RSA"}, ("RS256",)),
        ({"kty": "RSA", "alg": "PS256"}, ("PS256",)),
        ({"kty": "RSA", "alg": "RS512"}, ()),
        ({"kty": "RSA", "alg": "HS256"}, ()),
        ({"kty": "oct", "alg": "HS256"}, ()),
    ],
)
def test_the_algorithms_are_pinned_by_the_key_type(jwk, expected):
    assert key_algorithms(jwk) == expected


def test_parse_jwks_keeps_only_usable_signing_keys(keys, unusable_keys):
    parsed = parse_jwks({"keys": [key.jwk for key in keys.values()] + unusable_keys + ["junk", {"kty": "RSA"}]})
    assert {kid: key.algorithms for kid, key in parsed.items()} == {
        keys["EdDSA"].kid: ("EdDSA", "Ed25519"), **{keys[alg].kid: (alg,) for alg in ALGORITHMS if alg != "EdDSA"}}
    for document in ({"keys": "nope"}, ["keys"], None):
        with pytest.raises(ValueError):
            parse_jwks(document)


# --- key hygiene (RFC 7518 3.3, RFC 8725) and RFC 9864 names -------------------------------------------------------


def _okp_jwk(crv: str, raw: bytes, kid: str) -> dict[str, Any]:
    return {"kty": "OKP", "crv": crv, "x": b64url(raw), "kid": kid, "alg": "EdDSA"}


_P25519 = 2**255 - 19
SMALL_ORDER_POINTS = {
    "ed25519-all-zero": ("Ed25519", bytes(32)),
    "ed25519-identity": ("Ed25519", (1).to_bytes(32, "little")),
    "ed25519-identity-sign-bit": ("Ed25519", (1 | 1 << 255).to_bytes(32, "little")),
    "ed25519-order-2": ("Ed25519", (_P25519 - 1).to_bytes(32, "little")),
    "ed25519-order-8": ("Ed25519", bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")),
    "ed25519-order-8-other": (
        "Ed25519", bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")),
    "ed25519-non-canonical-identity": ("Ed25519", (_P25519 + 1).to_bytes(32, "little")),
    "ed448-all-zero": ("Ed448", bytes(57)),
    "ed448-identity": ("Ed448", (1).to_bytes(57, "little")),
}


def _rsa_jwk(bits: int, kid: str) -> tuple[dict[str, Any], Any]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    jwk = json.loads(get_default_algorithms()["RS256"].to_jwk(private.public_key()))
    return {**jwk, "kid": kid, "alg": "RS256"}, private


@pytest.fixture(scope="module")
def weak_rsa() -> dict[int, tuple[dict[str, Any], Any]]:
    return {bits: _rsa_jwk(bits, f"rsa-{bits}") for bits in (1024, 2047)}


@pytest.mark.parametrize("bits", [1024, 2047])
def test_rsa_keys_under_2048_bits_are_refused(client, tokens, server, weak_rsa, bits):
    jwk, private = weak_rsa[bits]
    server.keys = [jwk, tokens.keys["EdDSA"].jwk]
    with pytest.warns(jwt.InsecureKeyLengthWarning):  # PyJWT only warns when signing
        token = jwt.encode(tokens.claims(), private, algorithm="RS256", headers={"kid": jwk["kid"]})
    assert_invalid(me(client, token))
    assert me(client, tokens.sign()).status_code == 200


@pytest.mark.parametrize("name", list(SMALL_ORDER_POINTS))
def test_small_order_okp_keys_are_refused(name, caplog):
    crv, raw = SMALL_ORDER_POINTS[name]
    good = new_key("EdDSA")
    assert list(parse_jwks({"keys": [_okp_jwk(crv, raw, "weak"), good.jwk]})) == [good.kid]
    assert "'weak' refused" in caplog.text


def test_an_all_zero_ed25519_key_cannot_verify_a_token(client, tokens, server):
    server.keys = [_okp_jwk("Ed25519", bytes(32), "zero"), tokens.keys["EdDSA"].jwk]
    forged = f"{segment({'alg': 'EdDSA', 'kid': 'zero'})}.{segment(tokens.claims())}.{b64url(bytes(64))}"
    assert_invalid(me(client, forged))


@pytest.mark.parametrize(
    ("key_ops", "usable"),
    [(["verify"], True), (["sign", "verify"], True), (["sign"], False), ([], False), (["encrypt"], False),
     ("verify", False), (None, True)],
)
def test_keys_whose_key_ops_exclude_verify_are_refused(client, tokens, server, key_ops, usable):
    key = new_key("EdDSA")
    server.keys = [{**key.jwk, "key_ops": key_ops} if key_ops is not None else key.jwk]
    response = me(client, tokens.sign(key=key))
    if usable:
        assert response.status_code == 200
    else:
        assert_invalid(response)


def test_a_kid_published_twice_is_refused_as_ambiguous(client, tokens, server, caplog):
    first, second = new_key("EdDSA", "twice"), new_key("ES256", "twice")
    server.keys = [first.jwk, second.jwk, tokens.keys["RS256"].jwk]
    assert_invalid(me(client, tokens.sign(key=first)))
    assert_invalid(me(client, tokens.sign("ES256", key=second)))
    assert me(client, tokens.sign("RS256")).status_code == 200
    assert "'twice'" in caplog.text and "ambiguous" in caplog.text


def test_each_refused_key_is_logged_once(make_app, tokens, server, clock, weak_rsa, caplog):
    server.keys = [weak_rsa[1024][0], _okp_jwk("Ed25519", bytes(32), "zero"), tokens.keys["EdDSA"].jwk]
    client = make_app().test_client()
    for _ in range(3):
        assert me(client, tokens.sign()).status_code == 200
        clock.advance(300)  # every request re-fetches the JWKS
    assert server.fetches == 3
    refusals = [record.getMessage() for record in caplog.records if "refused" in record.getMessage()]
    assert len(refusals) == 2, refusals


@pytest.fixture(scope="module")
def ed448_key() -> Key:
    private = ed448.Ed448PrivateKey.generate()
    jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    return Key("Ed448", "ed448-key", private, {**jwk, "kid": "ed448-key", "alg": "Ed448"})


@pytest.mark.parametrize("jwk_alg", ["EdDSA", "Ed448", None])
@pytest.mark.parametrize("token_alg", ["EdDSA", "Ed448"])
def test_ed448_keys_verify_under_eddsa_and_ed448(client, tokens, server, ed448_key, jwk_alg, token_alg):
    jwk = {name: value for name, value in {**ed448_key.jwk, "alg": jwk_alg}.items() if value is not None}
    server.keys = [jwk]
    token = jwt.encode(tokens.claims("user-448"), ed448_key.private, algorithm=token_alg,
                       headers={"kid": ed448_key.kid})
    assert jwt.get_unverified_header(token)["alg"] == token_alg
    response = me(client, token)
    assert response.status_code == 200, response.json
    assert response.json["user_id"] == "user-448"


@pytest.mark.parametrize("jwk_alg", ["EdDSA", "Ed25519"])
@pytest.mark.parametrize("token_alg", ["EdDSA", "Ed25519"])
def test_ed25519_keys_verify_under_eddsa_and_ed25519(client, tokens, server, jwk_alg, token_alg):
    key = tokens.keys["EdDSA"]
    server.keys = [{**key.jwk, "alg": jwk_alg}]
    token = jwt.encode(tokens.claims(), key.private, algorithm=token_alg, headers={"kid": key.kid})
    assert me(client, token).status_code == 200


def test_a_curve_name_must_match_the_key(client, tokens, server, ed448_key):
    ed25519_key = tokens.keys["EdDSA"]
    server.keys = [ed25519_key.jwk, ed448_key.jwk]
    claims = tokens.claims()
    # Honest signatures, wrong names: the header's curve is not the key's.
    assert_invalid(me(client, jwt.encode(claims, ed25519_key.private, algorithm="Ed448",
                                         headers={"kid": ed25519_key.kid})))
    assert_invalid(me(client, jwt.encode(claims, ed448_key.private, algorithm="Ed25519",
                                         headers={"kid": ed448_key.kid})))
    assert_invalid(me(client, jwt.encode(claims, ed448_key.private, algorithm="Ed448",
                                         headers={"kid": ed25519_key.kid})))


def test_authenticator_defaults():
    config = make_config(UNREACHABLE_DATABASE_URL, BETTER_AUTH_URL="https://auth.example.com/")
    authenticator = Authenticator(config)
    assert authenticator.jwks is not None
    assert authenticator.jwks.url == "https://auth.example.com/api/auth/jwks"
    assert authenticator.jwks_issuers == authenticator.jwks_audiences == ["https://auth.example.com"]
    assert authenticator.hs256_issuers is authenticator.hs256_audiences is None
    assert Authenticator(make_config(UNREACHABLE_DATABASE_URL)).jwks is None


@pytest.mark.parametrize("name", ["BETTER_AUTH_URL", "BETTER_AUTH_JWKS_URL"])
@pytest.mark.parametrize("value", ["auth.example.com", "file:///etc/passwd", "ftp://auth.example.com"])
def test_auth_server_urls_must_be_http(tmp_path, name, value):
    with pytest.raises(ConfigError, match=name):
        load_config({name: value})


def test_jwks_url_defaults_to_better_auth_url_and_can_be_overridden(tmp_path):
    config = load_config({"BETTER_AUTH_URL": "https://app.example.com/"})
    assert config["BETTER_AUTH_URL"] == "https://app.example.com"
    assert Authenticator(config).jwks.url == "https://app.example.com/api/auth/jwks"
    config = load_config({"BETTER_AUTH_URL": "https://app.example.com",
                                    "BETTER_AUTH_JWKS_URL": "https://cdn.example.com/jwks.json"})
    assert Authenticator(config).jwks.url == "https://cdn.example.com/jwks.json"


def test_jwks_max_age_is_five_minutes_or_less_as_configured(tmp_path):
    origin = {"BETTER_AUTH_URL": "https://app.example.com"}
    assert Authenticator(load_config(origin)).jwks.max_age == 300
    assert Authenticator(load_config({**origin, "JWKS_MAX_AGE": "45"})).jwks.max_age == 45


@pytest.mark.parametrize(("value", "message"), [("29", "at least 30"), ("301", "at most 300"), ("5m", "an integer")])
def test_jwks_max_age_outside_30_to_300_seconds_stops_start_up(tmp_path, value, message):
    with pytest.raises(ConfigError, match=f"^JWKS_MAX_AGE must be {message}"):
        load_config({"JWKS_MAX_AGE": value})


# --- verified-token cache -----------------------------------------------------------------------------------------


def test_token_cache_hits_until_exp_never_beyond():
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put("t", {"sub": "a", "exp": 1100})
    hit = cache.get("t")
    assert hit == {"sub": "a", "exp": 1100}
    hit["sub"] = "changed"
    assert cache.get("t") == {"sub": "a", "exp": 1100}
    now[0] = 1099.9
    assert cache.get("t") is not None
    now[0] = 1100
    assert cache.get("t") is None and len(cache) == 0
    cache.put("late", {"sub": "a", "exp": 1050})  # accepted within the leeway: not cached
    assert cache.get("late") is None


def test_token_cache_entries_live_no_longer_than_their_ttl():
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put("key-checked-100-s-ago", {"sub": "a", "exp": 2000}, ttl=200)
    cache.put("key-check-expired", {"sub": "a", "exp": 2000}, ttl=0)
    now[0] = 1199.9
    assert cache.get("key-checked-100-s-ago") is not None
    assert cache.get("key-check-expired") is None
    now[0] = 1200
    assert cache.get("key-checked-100-s-ago") is None


def test_token_cache_is_bounded_least_recently_used_first():
    cache = TokenCache(max_size=3, clock=lambda: 0.0)
    for name in "abc":
        cache.put(name, {"sub": name, "exp": 10})
    cache.get("a")
    cache.put("d", {"sub": "d", "exp": 10})
    assert len(cache) == 3
    assert cache.get("b") is None
    assert [cache.get(name) is not None for name in "acd"] == [True, True, True]


def test_a_repeated_token_is_verified_once(client, tokens, monkeypatch):
    calls = []
    original = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    for token in (tokens.sign(), make_token("bob")):
        for _ in range(3):
            assert me(client, token).status_code == 200
    assert len(calls) == 2
    assert_invalid(me(client, _tampered(tokens.sign())))  # only verified tokens are cached

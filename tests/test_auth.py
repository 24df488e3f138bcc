"""Bearer tokens, the HS256 way (the shared secret, BETTER_AUTH_SECRET): what is accepted, every way a token or the
Authorization header can be wrong, iss/aud, and /api/me.

A bad token is a 401 with the contract's body and `WWW-Authenticate: Bearer error="invalid_token"`, never a 500.
Tokens are built by hand where PyJWT refuses to build them. The JWKS way (Better Auth) is in test_jwks.py, the
path-user guard in test_authz_matrix.py.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from todo_api import create_app

from .helpers import SECRET, b64url, bearer, hs256, make_config, make_token, segment

INVALID = {"detail": "Invalid authentication token"}
EXPIRED = {"detail": "Authentication token expired"}
MISSING = {"detail": "Missing authentication token"}
NOW = int(time.time())
HS256 = {"alg": "HS256", "typ": "JWT"}


def claims(**overrides: Any) -> dict[str, Any]:
    payload = {"sub": "alice", "iat": NOW, "exp": NOW + 3600, **overrides}
    return {name: value for name, value in payload.items() if value is not None}


def raw_claims(**raw: str) -> str:
    """JSON text for a payload with raw (possibly non-standard) JSON values: 1e400, NaN, 10**400."""
    members = {"sub": '"alice"', "exp": str(NOW + 3600), **raw}
    return "{" + ", ".join(f'"{name}": {value}' for name, value in members.items()) + "}"


def _public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)


RSA_PEM = _public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
EC_PEM = _public_pem(ec.generate_private_key(ec.SECP256R1()))
VALID = hs256(HS256, claims())


def assert_invalid(response: Any, body: dict[str, str] = INVALID) -> None:
    assert response.status_code == 401, response.get_data()[:200]
    assert response.json == body
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


# --- missing and expired tokens -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/alice/tasks", "/api/me"])
def test_missing_token_is_401_with_bearer_challenge(client, path):
    response = client.get(path)
    assert response.status_code == 401
    assert response.json == MISSING
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_expired_token_is_401_expired(client):
    assert_invalid(client.get("/api/alice/tasks", headers=bearer(make_token("alice", exp=NOW - 120))), EXPIRED)


def test_token_expired_within_leeway_is_accepted(client):
    token = make_token("alice", exp=int(time.time()) - 10)
    assert client.get("/api/alice/tasks", headers=bearer(token)).status_code == 200


# --- invalid tokens -----------------------------------------------------------------------------------------------

INVALID_TOKENS: dict[str, str] = {
    "garbage": "garbage",
    "signed-with-another-secret": make_token("alice", secret=SECRET.upper()),
    "hs512-with-the-secret": jwt.encode({"sub": "alice", "exp": NOW + 3600}, SECRET, algorithm="HS512"),
    "signature-tampered": make_token("alice")[:-4] + "AAAA",
    # alg none, in every casing, unsigned and with a signature
    **{f"alg-{alg}": f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(claims())}." for alg in
       ("none", "None", "NONE", "nOnE")},
    "alg-none-with-a-valid-hs256-signature": f"{segment({'alg': 'none'})}.{segment(claims())}."
                                             + hs256({"alg": "none"}, claims()).split(".")[2],
    "no-alg": hs256({"typ": "JWT"}, claims()),
    "alg-null": hs256({"alg": None}, claims()),
    "alg-list": hs256({"alg": ["HS256"]}, claims()),
    "alg-lowercase-hs256": hs256({"alg": "hs256"}, claims()),
    "alg-hs256-with-a-space": hs256({"alg": "HS256 "}, claims()),
    "alg-rs256-without-jwks": hs256({"alg": "RS256", "kid": "k"}, claims()),
    # HS256 with a public key as the HMAC secret (key confusion)
    "hs256-signed-with-an-rsa-public-pem": hs256(HS256, claims(), RSA_PEM),
    "hs256-signed-with-an-ec-public-pem": hs256(HS256, claims(), EC_PEM),
    "hs256-signed-with-an-empty-secret": hs256(HS256, claims(), b""),
    # kid injection, on a token that is not signed with the secret
    **{f"kid-{name}": hs256({**HS256, "kid": kid}, claims(), b"attacker-secret-" * 4) for name, kid in {
        "path-traversal": "../../../../etc/passwd",
        "absolute-path": "/dev/null",
        "sql-injection": "' OR '1'='1' --",
        "sql-union": "x' UNION SELECT 'secret' --",
        "url": "http://127.0.0.1:1/key",
        "nul": "a\x00b",
        "10000-characters": "k" * 10_000,
        "number": 1,  # type: ignore[dict-item]
        "object": {"$ne": None},  # type: ignore[dict-item]
    }.items()},
    # keys offered by the token itself
    "embedded-jwk": hs256({**HS256, "jwk": {"kty": "oct", "k": b64url(b"attacker-secret-" * 4)}}, claims(),
                          b"attacker-secret-" * 4),
    "jku-to-an-attacker": hs256({**HS256, "jku": "http://127.0.0.1:1/jwks"}, claims(), b"attacker-secret-" * 4),
    "x5u-to-an-attacker": hs256({**HS256, "x5u": "http://127.0.0.1:1/cert"}, claims(), b"attacker-secret-" * 4),
    # crit: extensions nobody here understands (RFC 7515 4.1.11: must reject)
    "crit-exp": hs256({**HS256, "crit": ["exp"]}, claims()),
    "crit-b64": hs256({**HS256, "crit": ["b64"], "b64": False}, claims()),
    "crit-not-a-list": hs256({**HS256, "crit": "exp"}, claims()),
    "crit-empty": hs256({**HS256, "crit": []}, claims()),
    # headers that are not JSON objects
    "header-not-json": f"{b64url(b'not json')}.{segment(claims())}.sig",
    "header-a-json-array": hs256([HS256], claims()),
    "header-a-json-string": hs256('"HS256"', claims()),
    "header-with-a-lone-surrogate": hs256('{"alg": "HS256", "kid": "\\ud800"}', claims(), b"attacker-secret-" * 4),
    # sub: missing, not a string, or not a user id this API can serve
    "sub-missing": jwt.encode({"exp": NOW + 3600}, SECRET, algorithm="HS256"),
    "sub-number": jwt.encode({"sub": 42, "exp": NOW + 3600}, SECRET, algorithm="HS256"),
    **{f"sub-{name}": hs256(HS256, claims(sub=value)) for name, value in {
        "list": ["alice"], "object": {"id": "alice"}, "true": True, "empty": "", "space": " ",
        "whitespace": "\t\n", "nul": "ali\x00ce", "newline": "alice\nbob", "escape": "alice\x1b[31m",
        "bidi-override": "\u202eecila", "256-characters": "a" * 256, "10000-characters": "a" * 10_000,
    }.items()},
    "sub-null": hs256(HS256, raw_claims(sub="null")),
    "sub-lone-surrogate": hs256(HS256, raw_claims(sub='"\\ud800"')),
    # exp, nbf, iat: missing, in the future, not NumericDates, or out of range
    "exp-missing": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
    "exp-a-word": jwt.encode({"sub": "alice", "exp": "tomorrow"}, SECRET, algorithm="HS256"),
    "nbf-in-10-minutes": jwt.encode({"sub": "alice", "exp": NOW + 3600, "nbf": NOW + 600}, SECRET, algorithm="HS256"),
    "iat-in-10-minutes": jwt.encode({"sub": "alice", "exp": NOW + 3600, "iat": NOW + 600}, SECRET, algorithm="HS256"),
    **{f"exp-{name}": hs256(HS256, raw_claims(exp=raw)) for name, raw in {
        "numeric-string": f'"{NOW + 3600}"', "null": "null", "list": f"[{NOW + 3600}]",
        "object": "{}", "1e400": "1e400", "nan": "NaN", "infinity": "Infinity", "400-digits": "9" * 400,
        "5000-digits": "9" * 5000,
    }.items()},
    **{f"nbf-{name}": hs256(HS256, raw_claims(nbf=raw)) for name, raw in {
        "far-future": str(NOW + 10**9), "numeric-string": '"0"', "1e400": "1e400", "400-digits": "9" * 400,
    }.items()},
    **{f"iat-{name}": hs256(HS256, raw_claims(iat=raw)) for name, raw in {
        "numeric-string": f'"{NOW}"', "list": "[]", "400-digits": "9" * 400,
    }.items()},
    "payload-a-json-array": hs256(HS256, '["alice"]'),
    "payload-not-json": hs256(HS256, "sub=alice"),
    "payload-empty": hs256(HS256, ""),
    # shapes that are not a JWS compact serialization
    "two-segments": ".".join(VALID.split(".")[:2]),
    "four-segments": VALID + ".AAAA",
    "five-segments-jwe-shape": "a.b.c.d.e",
    "trailing-dot": VALID + ".",
    "empty-segments": "..",
    "one-dot": ".",
    "base64-garbage": "!!!!.@@@@.####",
    "standard-base64-with-padding": VALID.replace("-", "+").replace("_", "/") + "==",
    "percent-encoded": VALID.replace(".", "%2E"),
    "signature-stripped": VALID.rsplit(".", 1)[0] + ".",
    "signature-of-another-token": VALID.rsplit(".", 1)[0] + "." + make_token("bob").rsplit(".", 1)[1],
    "signature-base64-with-illegal-characters": VALID.rsplit(".", 1)[0] + ".$$$$",
    "non-ascii": "é.é.é",
    "64-kib": hs256(HS256, claims(padding="x" * 64 * 1024)),
    "64-kib-signed-by-an-attacker": hs256(HS256, claims(padding="x" * 64 * 1024), b"attacker-secret-" * 4),
}


@pytest.mark.parametrize("name", list(INVALID_TOKENS))
def test_invalid_tokens_are_401_invalid(client, name):
    for path in ("/api/me", "/api/alice/tasks"):
        assert_invalid(client.get(path, headers=bearer(INVALID_TOKENS[name])))


def test_the_invalid_tokens_are_signed_right_so_only_their_flaw_is_refused(client):
    assert client.get("/api/me", headers=bearer(VALID)).status_code == 200
    assert client.get("/api/me", headers=bearer(hs256(HS256, raw_claims()))).status_code == 200


def test_exp_true_is_not_a_lifetime(client):
    # PyJWT reads true as 1 (1970): refused as expired before its type is looked at; a 401 either way.
    response = client.get("/api/me", headers=bearer(hs256(HS256, raw_claims(exp="true"))))
    assert response.status_code == 401 and response.json in (INVALID, EXPIRED)


@pytest.mark.parametrize(
    ("sub", "status"),
    [("a" * 255, 200), ("üñí©ødé-✓", 200), ("user with spaces", 200), ("a" * 256, 401), ("", 401)],
)
def test_sub_is_a_user_id_of_1_to_255_printable_characters(client, sub, status):
    assert client.get("/api/me", headers=bearer(hs256(HS256, claims(sub=sub)))).status_code == status


def test_a_duplicated_claim_counts_once_the_last_as_rfc_7519_allows(client):
    token = hs256(HS256, f'{{"sub": "bob", "sub": "alice", "exp": {NOW + 3600}}}')
    assert client.get("/api/me", headers=bearer(token)).json["user_id"] == "alice"


# --- the Authorization header itself ------------------------------------------------------------------------------

MALFORMED_HEADERS = {
    "basic-credentials": "Basic YWxpY2U6cHc=",
    "basic-with-a-jwt": f"Basic {VALID}",
    "token-scheme": "Token abc",
    "bearer-alone": "Bearer",
    "bearer-and-spaces": "Bearer  ",
    # Sent twice, a header reaches the app joined with a comma (gunicorn, werkzeug's server; the test client would
    # keep the last one only).
    "twice": f"Bearer {VALID},Bearer {VALID}",
    "twice-different": f"Bearer {VALID},Bearer x",
    "two-in-one": f"Bearer {VALID}, Bearer {VALID}",
    "bearer-a-b": "Bearer a b",
    "two-tokens-space": f"Bearer {VALID} {VALID}",
    "valid-then-junk": f"Bearer {VALID} x",
    "tab-separator": f"Bearer\t{VALID}",
    "colon-separator": f"Bearer:{VALID}",
    "no-space": f"Bearer{VALID}",
    "non-ascii-tail": f"Bearer {VALID}é",
    "non-ascii": "Bearer ééé",
    "70-kb-of-A": f"Bearer {'A' * 70_000}",
    "10000-dots": "Bearer " + "a." * 10_000,
    "null": "Bearer null",
    "undefined": "Bearer undefined",
}


@pytest.mark.parametrize("name", list(MALFORMED_HEADERS))
def test_malformed_authorization_headers_are_401_invalid(client, name):
    for path in ("/api/me", "/api/alice/tasks"):
        assert_invalid(client.get(path, headers={"Authorization": MALFORMED_HEADERS[name]}))


@pytest.mark.parametrize("header", ["", " ", "\t"])
def test_an_empty_authorization_header_is_a_missing_token(client, header):
    response = client.get("/api/me", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json["detail"] in ("Missing authentication token", "Invalid authentication token")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-Authorization": f"Bearer {VALID}"}, id="x-authorization"),
        pytest.param({"Proxy-Authorization": f"Bearer {VALID}"}, id="proxy-authorization"),
        pytest.param({"X-Access-Token": VALID}, id="x-access-token"),
        pytest.param({"Cookie": f"token={VALID}; better-auth.session_token={VALID}"}, id="cookie"),
    ],
)
def test_tokens_anywhere_but_authorization_are_ignored(client, headers):
    for path in ("/api/me", "/api/alice/tasks"):
        response = client.get(path, headers=headers)
        assert (response.status_code, response.json) == (401, MISSING)


@pytest.mark.parametrize("query", [f"access_token={VALID}", f"token={VALID}", f"jwt={VALID}"])
def test_tokens_in_the_query_string_are_ignored(client, query):
    assert client.get(f"/api/me?{query}").status_code == 401


# --- iss and aud --------------------------------------------------------------------------------------------------

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


# --- /api/me ------------------------------------------------------------------------------------------------------

def test_me_returns_claims_with_null_for_absent_ones(client, auth):
    assert client.get("/api/me", headers=auth("alice", email="a@example.com", name="Alice")).json == {
        "user_id": "alice", "email": "a@example.com", "name": "Alice"}
    assert client.get("/api/me", headers=auth("bob")).json == {"user_id": "bob", "email": None, "name": None}


@pytest.mark.parametrize(
    "claim",
    [{"email": 42}, {"email": {"a": 1}}, {"name": ["x"]}, {"email": None}],
)
def test_me_never_echoes_a_profile_claim_that_is_not_a_string(client, claim):
    response = client.get("/api/me", headers=bearer(hs256(HS256, claims(**claim))))
    assert response.status_code == 200
    assert response.json["email"] is None or isinstance(response.json["email"], str)
    assert response.json["name"] is None


def test_a_lone_surrogate_in_a_profile_claim_is_sent_back_escaped_not_a_500(client):
    response = client.get("/api/me", headers=bearer(hs256(HS256, raw_claims(name='"\\ud800"'))))
    assert response.status_code == 200
    assert b'"name":"\\ud800"' in response.data

"""Cost per request of token verification: EdDSA (JWKS) vs HS256, with and without the verified-token cache.

Run: .venv/bin/python -m bench.bench_auth
"""

from __future__ import annotations

import json
import time
import timeit
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm

from tests.helpers import SECRET, UNREACHABLE_DATABASE_URL, make_config
from todo_api import create_app
from todo_api.auth import EXTENSION, TokenCache

ORIGIN = "http://127.0.0.1:9"  # never contacted: the JWKS fetch is stubbed
# /api/me reads no table, so the app never opens a database connection.


def best_of(statement: Any, number: int) -> float:
    """Microseconds per call, best of 5 runs."""
    return min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e6


def main() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    jwk = {**json.loads(OKPAlgorithm.to_jwk(private.public_key())), "kid": "k1", "alg": "EdDSA"}
    now = int(time.time())
    claims = {"sub": "alice", "iat": now, "exp": now + 900, "iss": ORIGIN, "aud": ORIGIN, "email": "a@example.com"}
    eddsa_token = jwt.encode(claims, private, algorithm="EdDSA", headers={"kid": "k1"})
    hs256_token = jwt.encode(claims, SECRET, algorithm="HS256")
    public = jwt.PyJWK(jwk, "EdDSA")

    hs256_us = best_of(lambda: jwt.decode(hs256_token, SECRET, algorithms=["HS256"], audience=ORIGIN), 20000)
    eddsa_us = best_of(lambda: jwt.decode(eddsa_token, public, algorithms=["EdDSA"], audience=ORIGIN), 5000)
    print(f"in-process jwt.decode: HS256 {hs256_us:.1f} us, EdDSA {eddsa_us:.1f} us")

    app = create_app(make_config(UNREACHABLE_DATABASE_URL, BETTER_AUTH_URL=ORIGIN, LOG_LEVEL="WARNING"))
    authenticator = app.extensions[EXTENSION]
    authenticator.jwks._client.fetch_data = lambda: {"keys": [jwk]}  # type: ignore[union-attr]
    client = app.test_client()
    cached = authenticator.tokens

    for label, tokens in (("no token cache", TokenCache(max_size=0)), ("token cache", cached)):
        authenticator.tokens = tokens
        print(f"{label}:")
        for name, token in (("HS256", hs256_token), ("EdDSA", eddsa_token)):
            assert authenticator.decode(token)["sub"] == "alice"
            decode_us = best_of(lambda token=token: authenticator.decode(token), 5000)
            headers = {"Authorization": f"Bearer {token}"}
            assert client.get("/api/me", headers=headers).status_code == 200
            request_us = best_of(lambda headers=headers: client.get("/api/me", headers=headers), 500)
            print(f"  {name}: Authenticator.decode {decode_us:7.1f} us, GET /api/me (test client) {request_us:7.1f} us")
    app.extensions["db"].engine.dispose()


if __name__ == "__main__":
    main()

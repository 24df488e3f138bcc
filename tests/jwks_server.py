"""Keys made here, Better Auth-like tokens signed with them, and a JWKS endpoint on loopback that can change its keys
and fail on demand: for tests/test_jwks.py and the multi-instance test."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms


@dataclass
class Key:
    alg: str
    kid: str
    private: Any
    jwk: dict[str, Any]  # the public key as Better Auth publishes it: kid, alg, kty (+crv), no `use`


def new_private_key(alg: str) -> Any:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg in ("ES256", "ES384", "ES512"):
        curve = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}[alg]()
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def new_key(alg: str, kid: str | None = None) -> Key:
    private = new_private_key(alg)
    jwk = json.loads(get_default_algorithms()[alg].to_jwk(private.public_key()))
    kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
    return Key(alg, kid, private, {**jwk, "kid": kid, "alg": alg})



class Tokens:
    """Better Auth-like tokens: iss = aud = the origin, 15 minutes, a unique jti so no two are equal."""

    def __init__(self, origin: str, keys: dict[str, Key]) -> None:
        self.origin, self.keys = origin, keys

    def claims(self, sub: Any = "alice", **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"sub": sub, "iat": now, "exp": now + 900, "iss": self.origin, "aud": self.origin,
                  "jti": uuid.uuid4().hex, "email": f"{sub}@example.com", "name": str(sub).title()}
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def sign(self, alg: str = "EdDSA", sub: Any = "alice", *, key: Key | None = None, kid: str | None = "",
             **claims: Any) -> str:
        key = key or self.keys[alg]
        headers = {"kid": key.kid if kid == "" else kid}
        return jwt.encode(self.claims(sub, **claims), key.private, algorithm=alg,
                          headers={name: value for name, value in headers.items() if value is not None})


class JWKSServer:
    """A JWKS endpoint on 127.0.0.1 that counts its fetches and can fail on demand.

    mode: "ok"; "error" (HTTP 503); "garbage" (200, not JSON); "hang" (no answer until teardown);
    "trickle" (200, the body one byte every `trickle_delay` seconds).
    stop()/start() close and reopen the port, for connection refused.
    """

    def __init__(self, jwks: list[dict[str, Any]]) -> None:
        self.keys = list(jwks)
        self.mode = "ok"
        self.trickle_delay = 0.1
        self.requests: list[tuple[str, str | None]] = []  # (path, User-Agent)
        self.unblock = threading.Event()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fetches(self) -> int:
        return len(self.requests)

    def start(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.requests.append((self.path, self.headers.get("User-Agent")))
                if endpoint.mode == "hang":
                    endpoint.unblock.wait(10)
                status, body = {
                    "error": (503, b'{"error": "down"}'),
                    "garbage": (200, b"<html>maintenance</html>"),
                }.get(endpoint.mode, (200, json.dumps({"keys": endpoint.keys}).encode()))
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if endpoint.mode == "trickle":
                        for byte in body:
                            if endpoint.unblock.wait(endpoint.trickle_delay):
                                return
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                    else:
                        self.wfile.write(body)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self.unblock.set()
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5)
            self._server = None

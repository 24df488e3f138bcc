"""Bearer JWT authentication: a loader that decodes the token into `g`, and guards that enforce it.

Two ways to sign, each on when configured, both possibly at once (contract, Authentication):
1. HS256 with BETTER_AUTH_SECRET (custom issuers, dev tokens);
2. Better Auth's jwt() plugin: EdDSA (Ed25519, Ed448)/ES256/ES512/RS256/PS256 keys from its JWKS (BETTER_AUTH_URL).
The token's header only routes it (HS256 -> the secret, anything supported -> the JWKS); each way then pins its
own algorithms, so HS256 is only ever checked against the secret and a JWKS key only with its own algorithm.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jwt
from flask import Flask, current_app, g, request
from flask.views import MethodView
from flask_smorest import Blueprint, abort
from sqlalchemy import Engine

from .jwks import MAX_AGE, SUPPORTED_ALGORITHMS, JWKSCache, JWKSStore, JWKSUnavailable
from .models import Task
from .schemas import MeSchema

MISSING_TOKEN = "Missing authentication token"
INVALID_TOKEN = "Invalid authentication token"
EXPIRED_TOKEN = "Authentication token expired"
AUTH_UNAVAILABLE = "Authentication service unavailable"
TOKEN_CACHE_SIZE = 4096
# Better Auth's tokens are well under 1 KiB; gunicorn refuses a header line over 8190 bytes anyway. Longer tokens
# are refused unread, and can never fill the token cache (4096 entries) with megabytes.
MAX_TOKEN_LENGTH = 8 * 1024
MAX_USER_ID_LENGTH: int = Task.__table__.c.user_id.type.length  # type: ignore[attr-defined]
NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")
MAX_NUMERIC_DATE = 253_402_300_799  # 9999-12-31T23:59:59Z
EXTENSION = "todo_api.auth"

blp = Blueprint("me", __name__, url_prefix="/api/me", description="The signed-in user")


class TokenError(Exception):
    """A request that must be answered with 401, this message and this challenge."""

    challenge = 'Bearer error="invalid_token"'  # a token was sent (RFC 6750 §3.1)

    def __init__(self, message: str = INVALID_TOKEN) -> None:
        super().__init__(message)
        self.message = message


class MissingToken(TokenError):
    challenge = "Bearer"

    def __init__(self) -> None:
        super().__init__(MISSING_TOKEN)


def is_user_id(value: Any) -> bool:
    """A `sub` this API can serve: a string of 1 to 255 printable characters, not only spaces.

    PyJWT only checks that `sub` is a string. An empty one is nobody; NUL, control characters and lone surrogates
    cannot be stored, logged or sent back as JSON; a longer one does not fit the user_id column.
    """
    return (isinstance(value, str) and 0 < len(value) <= MAX_USER_ID_LENGTH and value.isprintable()
            and not value.isspace())


def is_numeric_date(value: Any) -> bool:
    """RFC 7519's NumericDate: a JSON number (PyJWT also takes "1700000000" and true), within datetime's range."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and -MAX_NUMERIC_DATE <= value <= MAX_NUMERIC_DATE)


def check_claims(claims: dict[str, Any]) -> dict[str, Any]:
    """What PyJWT leaves open, for both ways: a usable `sub`, and exp/nbf/iat that are real numbers."""
    if not is_user_id(claims.get("sub")):
        raise TokenError(INVALID_TOKEN)
    if not all(is_numeric_date(claims[name]) for name in NUMERIC_DATE_CLAIMS if name in claims):
        raise TokenError(INVALID_TOKEN)
    return claims


def verify(token: str, key: Any, algorithms: Sequence[str], issuers: Sequence[str] | None,
           audiences: Sequence[str] | None, leeway: float) -> dict[str, Any]:
    """jwt.decode with the rules shared by both ways; PyJWT errors become 401 messages."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            issuer=issuers,
            audience=audiences,
            leeway=leeway,
            options={"require": ["exp", "sub"], "verify_aud": audiences is not None},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError(EXPIRED_TOKEN) from None
    except jwt.PyJWTError:
        raise TokenError(INVALID_TOKEN) from None
    return check_claims(claims)


class TokenCache:
    """Claims of verified tokens, keyed by the whole token string, until the token's exp at the latest.

    A hit skips parsing and signature checks. An entry lives no longer than the check behind it: a JWKS token's
    entry expires with the key check it was verified under (`ttl`, at most the JWKS max age of 5 minutes), so a
    key removed from the JWKS stops working within that bound on every worker. Bounded, least recently used
    entries go first; thread-safe.
    """

    def __init__(self, max_size: int = TOKEN_CACHE_SIZE, clock: Callable[[], float] = time.time) -> None:
        self.max_size = max_size
        self.clock = clock  # wall clock: exp is a Unix time; injectable for tests
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                return None
            if entry[0] <= self.clock():
                del self._entries[token]
                return None
            self._entries.move_to_end(token)
        return dict(entry[1])  # a copy, so no request can change what the next one sees

    def put(self, token: str, claims: dict[str, Any], ttl: float | None = None) -> None:
        """Keep `claims` until the token's exp, and no more than `ttl` seconds when given."""
        now = self.clock()
        expires = float(claims["exp"]) if ttl is None else min(float(claims["exp"]), now + ttl)
        if expires <= now:  # accepted only thanks to the leeway, or under a key check that has expired
            return
        with self._lock:
            self._entries[token] = (expires, dict(claims))
            self._entries.move_to_end(token)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class Authenticator:
    """Token verification for one app, built once from its config and shared by the worker's threads."""

    def __init__(self, config: Mapping[str, Any], engine: Engine | None = None) -> None:
        """`engine`: the database where the last good JWKS is shared (none: kept per process only)."""
        self.secret: str | None = config.get("BETTER_AUTH_SECRET") or None
        self.leeway: float = config["JWT_LEEWAY"]
        issuers, audiences = list(config["JWT_ISSUER"]), list(config["JWT_AUDIENCE"])
        # HS256: iss/aud only when configured (plan documents). JWKS: Better Auth's own default, its origin.
        self.hs256_issuers, self.hs256_audiences = issuers or None, audiences or None
        origin = (config.get("BETTER_AUTH_URL") or "").rstrip("/")
        self.jwks_issuers, self.jwks_audiences = issuers or [origin], audiences or [origin]
        self.jwks: JWKSCache | None = None
        if origin:  # lazy: nothing is fetched before the first token needs a key
            self.jwks = JWKSCache(config.get("BETTER_AUTH_JWKS_URL") or f"{origin}/api/auth/jwks",
                                  store=JWKSStore(engine) if engine is not None else None,
                                  max_age=config.get("JWKS_MAX_AGE", MAX_AGE))
        self.tokens = TokenCache()

    def decode(self, token: str) -> dict[str, Any]:
        """Verified claims, or TokenError (401) / JWKSUnavailable (503)."""
        claims = self.tokens.get(token)
        if claims is None:
            claims, ttl = self._verify(token)
            self.tokens.put(token, claims, ttl)
        return claims

    def _verify(self, token: str) -> tuple[dict[str, Any], float | None]:
        """The claims, and for how long at most they may be cached besides their exp (None: until exp)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError() from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg == "HS256" and self.secret:
            return verify(token, self.secret, ["HS256"], self.hs256_issuers, self.hs256_audiences, self.leeway), None
        # alg none, HS512, ES384, ... and kid-less tokens are refused here, before any network work.
        if self.jwks is None or not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS or not isinstance(kid, str):
            raise TokenError(INVALID_TOKEN)
        # The cache entry lives no longer than the key check the key came from. Read before and after the lookup:
        # a re-check that lands in between (another thread's) may have dropped the key we hold, so the older check
        # bounds the entry, unless there was none still valid before (then the lookup made the check).
        trusted_before = self.jwks.trusted_for()
        try:
            key = self.jwks.get(kid)
        except JWKSUnavailable:
            if self._issued_before_last_check(token):  # its key existed then, and that check did not find it
                raise TokenError(INVALID_TOKEN) from None
            raise
        if key is None:
            raise TokenError(INVALID_TOKEN)
        ttl = self.jwks.trusted_for() if trusted_before == 0 else min(trusted_before, self.jwks.trusted_for())
        # Only the key's own algorithms: an ES256 header on an RSA key, RS256 on a PS256 key, Ed448 on an Ed25519
        # key fail. The raw key, not the PyJWK, so that an Ed25519 key verifies both "EdDSA" and "Ed25519".
        claims = verify(token, key.key, key.algorithms, self.jwks_issuers, self.jwks_audiences, self.leeway)
        return claims, ttl

    def _issued_before_last_check(self, token: str) -> bool:
        """Whether the (unverified) token was issued, allowing for clock skew, before the JWKS check we hold began.

        A kid missing from the JWKS is a 503 while the next fetch is held back, since its key may have been
        published after our last one (contract). Not for a token older than that fetch: its key was published
        before it, so the fetch would have seen it, and a removed key's tokens get 401 at once, not 503s
        until the refresh limit lets a fetch through. A forged iat changes only which error its sender gets.
        """
        assert self.jwks is not None
        try:
            issued_at = jwt.decode(token, options={"verify_signature": False}).get("iat")
        except jwt.PyJWTError:
            return False
        return is_numeric_date(issued_at) and self.jwks.checked_after(float(issued_at) + self.leeway)


def decode_token(token: str) -> dict[str, Any]:
    """Verify a bearer token with the app's Authenticator."""
    authenticator: Authenticator = current_app.extensions[EXTENSION]
    return authenticator.decode(token)


def bearer_token() -> str:
    """The request's bearer token, or TokenError."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise MissingToken()
    if scheme.lower() != "bearer" or not token.strip() or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError()
    return token.strip()


def is_authenticated_path(path: str) -> bool:
    """The REST API and the MCP endpoint take the same bearer token."""
    return path.startswith("/api/") or path in ("/mcp", "/mcp/")


def load_user() -> None:
    """Decode the bearer token, if any, into g.claims / g.user_id; keep why it failed in g.auth_error otherwise."""
    g.claims = g.user_id = g.auth_error = None
    if not is_authenticated_path(request.path):
        return
    try:
        g.claims = decode_token(bearer_token())
    except (TokenError, JWKSUnavailable) as error:
        g.auth_error = error
    else:
        g.user_id = g.claims["sub"]


def require_user() -> None:
    """Guard for API blueprints: 401 (or 503) unless the loader found a valid token. Preflights pass through."""
    if request.method == "OPTIONS" or g.get("user_id") is not None:
        return
    error = g.get("auth_error") or MissingToken()
    if isinstance(error, JWKSUnavailable):
        abort(503, message=AUTH_UNAVAILABLE, headers={"Retry-After": str(error.retry_after)})
    abort(401, message=error.message, headers={"WWW-Authenticate": error.challenge})


def require_path_user() -> None:
    """Guard: the path's user id must be the token's user, checked before any database access."""
    require_user()
    if request.method != "OPTIONS" and (request.view_args or {}).get("user_id") != g.user_id:
        abort(403, message="You may only access your own tasks")


@blp.route("")
class Me(MethodView):
    @blp.alt_response(401, response="UNAUTHORIZED")
    @blp.alt_response(503, response="SERVICE_UNAVAILABLE")
    @blp.response(200, MeSchema)
    def get(self) -> dict[str, Any]:
        """The signed-in user's id, email and name, from the token."""
        return {"user_id": g.user_id, "email": _string_claim("email"), "name": _string_claim("name")}


def _string_claim(name: str) -> str | None:
    """A profile claim as documented (a string, or null): a token's 42 or {"a": 1} is not an email."""
    value = g.claims.get(name)
    return value if isinstance(value, str) else None


blp.before_request(require_user)


def init_app(app: Flask) -> None:
    app.extensions[EXTENSION] = Authenticator(app.config, app.extensions["db"].engine)
    app.before_request(load_user)

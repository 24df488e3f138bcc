"""Bearer JWT authentication: a loader that decodes the token into `g`, and guards that enforce it."""

from __future__ import annotations

from typing import Any

import jwt
from flask import Flask, current_app, g, request
from flask.views import MethodView
from flask_smorest import Blueprint, abort

from .schemas import MeSchema

MISSING_TOKEN = "Missing authentication token"
INVALID_TOKEN = "Invalid authentication token"
EXPIRED_TOKEN = "Authentication token expired"

blp = Blueprint("me", __name__, url_prefix="/api/me", description="The signed-in user")


class TokenError(Exception):
    """A token that must be answered with 401 and this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def decode_hs256(token: str, config: dict[str, Any]) -> dict[str, Any]:
    """Verify a token signed with the shared secret; the algorithm is pinned, never read from the token."""
    issuers, audiences = config["JWT_ISSUER"], config["JWT_AUDIENCE"]
    try:
        return jwt.decode(
            token,
            config["BETTER_AUTH_SECRET"],
            algorithms=["HS256"],
            issuer=issuers or None,
            audience=audiences or None,
            leeway=config["JWT_LEEWAY"],
            options={"require": ["exp", "sub"], "verify_aud": bool(audiences)},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError(EXPIRED_TOKEN) from None
    except jwt.PyJWTError:
        raise TokenError(INVALID_TOKEN) from None


def decode_token(token: str) -> dict[str, Any]:
    """The seam where JWKS verification plugs in beside HS256."""
    config = current_app.config
    if not config.get("BETTER_AUTH_SECRET"):
        raise TokenError(INVALID_TOKEN)
    return decode_hs256(token, config)


def load_user() -> None:
    """Decode the bearer token, if any, into g.claims / g.user_id; remember why it failed otherwise."""
    g.claims = g.user_id = g.auth_error = None
    if not request.path.startswith("/api/"):
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        g.auth_error = MISSING_TOKEN
    elif scheme.lower() != "bearer" or not token.strip():
        g.auth_error = INVALID_TOKEN
    else:
        try:
            g.claims = decode_token(token.strip())
        except TokenError as error:
            g.auth_error = error.message
        else:
            g.user_id = g.claims["sub"]


def require_user() -> None:
    """Guard for API blueprints: 401 unless the loader found a valid token. Preflights pass through."""
    if request.method == "OPTIONS":
        return
    if g.get("user_id") is None:
        message = g.get("auth_error") or MISSING_TOKEN
        challenge = "Bearer" if message == MISSING_TOKEN else 'Bearer error="invalid_token"'
        abort(401, message=message, headers={"WWW-Authenticate": challenge})


def require_path_user() -> None:
    """Guard: the path's user id must be the token's user, checked before any database access."""
    require_user()
    if request.method != "OPTIONS" and (request.view_args or {}).get("user_id") != g.user_id:
        abort(403, message="You may only access your own tasks")


@blp.route("")
class Me(MethodView):
    @blp.response(200, MeSchema)
    def get(self) -> dict[str, Any]:
        """The signed-in user's id, email and name, from the token."""
        claims = g.claims
        return {"user_id": g.user_id, "email": claims.get("email"), "name": claims.get("name")}


blp.before_request(require_user)


def init_app(app: Flask) -> None:
    app.before_request(load_user)

"""All configuration, read from the environment in one place.

Variables (also tabled in the README):

APP_ENV                  development | production | test (default development).
DATABASE_URL             postgres://, postgresql:// or postgresql+psycopg2:// URL; query parameters such as
                         Neon's sslmode and channel_binding are kept. PostgreSQL only: any other scheme stops
                         start-up. Required in production. Default elsewhere: the embedded PostgreSQL that
                         `make run` keeps under instance/ (todo_api/embedded_postgres.py), on EMBEDDED_POSTGRES_PORT.
EMBEDDED_POSTGRES_PORT   Loopback port of that embedded server (default 54320).
MIGRATIONS_DATABASE_URL  URL used by `flask db ...` and RUN_MIGRATIONS=1 instead of DATABASE_URL: Neon's direct
                         endpoint. Migrations need a session, not a transaction pooler, so a Neon pooled host
                         (`ep-...-pooler.`) here stops start-up. Unset: DATABASE_URL, and when that is Neon's pooled
                         endpoint, its direct twin (the same host without `-pooler`), which the migration commands
                         announce.
BETTER_AUTH_SECRET       HS256 secret shared with Better Auth; at least 32 characters outside development/test.
                         In development a random one is generated once and kept in the instance folder.
BETTER_AUTH_URL          Origin of the Better Auth server; enables JWKS (EdDSA/ES/RS/PS) verification.
BETTER_AUTH_JWKS_URL     JWKS location; default BETTER_AUTH_URL + /api/auth/jwks.
JWT_ISSUER               Comma list of accepted `iss`; checked only when set (JWKS default: BETTER_AUTH_URL origin).
JWT_AUDIENCE             Comma list of accepted `aud`; checked only when set (JWKS default: BETTER_AUTH_URL origin).
JWT_LEEWAY               Seconds of clock skew allowed for exp/nbf/iat (default 30).
JWKS_MAX_AGE             Seconds a check of the JWKS is trusted, 30 to 300 (default 300, the contract's bound): a key
                         removed from the JWKS stops verifying tokens within it on every worker and instance, cached
                         tokens included. Not below 30: an unknown kid may trigger a fetch only once per 30 s, and
                         re-checks keep to the same pace.
FRONTEND_URL             Comma list of origins allowed by CORS (default http://localhost:3000).
DB_POOL_SIZE             Connections kept per worker process (default 5).
DB_MAX_OVERFLOW          Extra connections under burst (default 5).
DB_POOL_TIMEOUT          Seconds to wait for a pooled connection (default 5).
DB_POOL_RECYCLE          Seconds before a connection is replaced; below Neon's 5-minute idle suspend (default 240).
DB_CONNECT_TIMEOUT       Seconds to establish a connection (default 5).
DB_STATEMENT_TIMEOUT_MS  PostgreSQL statement timeout in milliseconds (default 5000), a SET LOCAL per transaction
                         (todo_api/deadlines.py). The client also gives up on an unanswering server after this plus
                         DB_CONNECT_TIMEOUT.
LOG_LEVEL                Python logging level (default INFO).
TASK_QUOTA               Most tasks one user may hold (default 50000, five times the 10,000 the plans expect); a
                         create beyond it is 409. Checked against task_counts, under a lock on the user's row.
TRUSTED_PROXY_HOPS       Proxies in front of the app that append the client's address to X-Forwarded-For (default
                         0). The client address is that many entries from the right (werkzeug's ProxyFix); with 0
                         it is the TCP peer and X-Forwarded-For is never read.

Rate limits (todo_api/limits.py), with flask-limiter's own setting names where it has one:
RATELIMIT_ENABLED        true | false (default true). false turns every limit off.
REDIS_URL                redis:// or rediss:// URL. When set, counters live there, shared by every worker and
                         instance; otherwise each worker process counts in its own memory.
RATELIMIT_STORAGE_URI    flask-limiter's storage URI; overrides REDIS_URL (default REDIS_URL, else memory://).
RATELIMIT_APPLICATION    Limit per user over the whole API, every route counted together (default 1200 per minute).
                         A list page costs one request per 100 tasks of its page_size (limits.request_cost).
RATELIMIT_ANONYMOUS      Limit per client address for requests without a valid token: 401s, /docs,
                         /openapi.json (default 120 per minute). IPv6 addresses count per /64.
RATELIMIT_DEFAULT        flask-limiter's per-route limits, each route counted apart (default unset: none).
RATELIMIT_STRATEGY       fixed-window | moving-window | sliding-window-counter (default fixed-window: one
                         counter per window, one round trip per request to Redis).
RATELIMIT_HEADERS_ENABLED  true | false (default true): X-RateLimit-Limit, X-RateLimit-Remaining,
                         X-RateLimit-Reset (a Unix time) on every limited response. Every 429 has Retry-After.
RATELIMIT_KEY_PREFIX     Prefix of the counters' keys, for a Redis shared with other apps (default todo-api).
RATELIMIT_IN_MEMORY_FALLBACK_ENABLED  true | false (default true): while Redis is unreachable, each worker
                         counts in memory instead, and Redis is tried again after 1, 2, 4... 32 s.
RATELIMIT_SWALLOW_ERRORS true | false (default true): a storage error is logged, never a 500.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from limits import parse_many
from limits.strategies import STRATEGIES

ENVIRONMENTS = ("development", "production", "test")
MIN_SECRET_LENGTH = 32
POSTGRES_SCHEMES = ("postgres", "postgresql", "postgresql+psycopg2")
EMBEDDED_POSTGRES_PORT = 54320
EMBEDDED_POSTGRES_DATABASE = "todo"
MAX_BODY_BYTES = 64 * 1024
TASK_QUOTA = 50_000
JWKS_MAX_AGE = 300  # seconds, and the most it may be set to (contract: a removed key stops within 5 minutes)
JWKS_REFRESH_INTERVAL = 30  # at most one JWKS fetch per this for unknown kids (contract); JWKS_MAX_AGE's floor
# The storages whose client is pinned in requirements.txt (redis); limits knows more (memcached, mongodb...).
REDIS_SCHEMES = ("redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")
# A Redis that stops answering must not hold requests: after this many seconds the limiter falls back to memory.
REDIS_TIMEOUT_SECONDS = 0.5
BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}

log = logging.getLogger(__name__)


class ConfigError(RuntimeError):
    """Configuration that must stop start-up."""


def normalize_database_url(url: str, name: str = "DATABASE_URL") -> str:
    """Point every PostgreSQL scheme at psycopg2, keeping the query string (sslmode, channel_binding).

    PostgreSQL is the only engine (production is Neon): a sqlite:// or any other URL stops start-up.
    """
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ConfigError(f"{name} must be a PostgreSQL URL (postgresql://...), got scheme {parts.scheme!r}")
    return urlunsplit(parts._replace(scheme="postgresql+psycopg2"))


POOLER_SUFFIX = "-pooler"  # Neon's pooled hosts: ep-x-123-pooler.region.aws.neon.tech; direct: ep-x-123.region...


def _neon_direct_host(host: str) -> str | None:
    """The direct twin of a Neon pooled host (or host:port), or None when `host` is not a pooled one."""
    label, dot, rest = host.partition(".")
    if not label.lower().endswith(POOLER_SUFFIX):
        return None
    return f"{label[: -len(POOLER_SUFFIX)]}{dot}{rest}"


def migrations_database_url(explicit: str | None, database_url: str) -> tuple[str, str | None]:
    """The URL migrations run on, and a note for the migration commands to say when it was derived, not given.

    Neon's pooled endpoint is PgBouncer in transaction mode: a migration's session state, its advisory lock and
    anything another client left on the shared server connection would cross. An explicit pooled URL stops
    start-up; DATABASE_URL's pooled host is swapped for its direct twin, which takes the same credentials.
    """
    url = normalize_database_url(explicit or database_url, "MIGRATIONS_DATABASE_URL" if explicit else "DATABASE_URL")
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    direct = _neon_direct_host(host)
    if direct is None:
        return url, None
    if explicit:
        raise ConfigError(f"MIGRATIONS_DATABASE_URL is Neon's pooled endpoint ({host}); migrations need a session: "
                          f"use its direct endpoint, {direct}")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{direct}")), (
        f"migrations run on Neon's direct endpoint {direct}, derived from DATABASE_URL's pooled {host} "
        "(MIGRATIONS_DATABASE_URL chooses another)")


def embedded_postgres_url(port: int, database: str = EMBEDDED_POSTGRES_DATABASE) -> str:
    """A database of an embedded server (todo_api/embedded_postgres.py: trust auth, loopback only); by default the
    one `make run` serves on."""
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"


def _split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw not in BOOLEANS:
        raise ConfigError(f"{name} must be true or false, got {env[name]!r}")
    return BOOLEANS[raw]


def _at_least(env: dict[str, str], name: str, default: int, minimum: int) -> int:
    value = _int(env, name, default)
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _between(env: dict[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    value = _at_least(env, name, default, minimum)
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def _rate_limit(env: dict[str, str], name: str, default: str) -> str:
    """A rate limit string ("1200 per minute", "10/second; 500/hour"), checked now rather than on a request."""
    value = (env.get(name) or default).strip()
    if value:
        try:
            parse_many(value)
        except ValueError:
            raise ConfigError(f"{name} must be a rate limit such as '1200 per minute', got {value!r}") from None
    return value


def rate_limit_storage(env: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """RATELIMIT_STORAGE_URI, else REDIS_URL, else memory://; and the Redis client's timeouts, for Redis."""
    name = "RATELIMIT_STORAGE_URI" if env.get("RATELIMIT_STORAGE_URI") else "REDIS_URL"
    uri = (env.get(name) or "memory://").strip()
    scheme = urlsplit(uri).scheme
    options: dict[str, Any] = {}
    if scheme in REDIS_SCHEMES:
        options = {"socket_connect_timeout": REDIS_TIMEOUT_SECONDS, "socket_timeout": REDIS_TIMEOUT_SECONDS}
    elif scheme != "memory":
        raise ConfigError(f"{name} must be a redis:// URL (or {', '.join(REDIS_SCHEMES[1:])}) or memory://, "
                          f"got scheme {scheme!r}")
    return uri, options


def _http_url(env: dict[str, str], name: str) -> str | None:
    """An http(s) URL or None; anything else stops start-up rather than failing on the first token."""
    value = (env.get(name) or "").strip()
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return value


def _dev_secret(instance_path: Path) -> str:
    """A random secret kept in the instance folder, so dev tokens survive restarts."""
    path = instance_path / "dev-secret"
    if path.exists():
        return path.read_text().strip()
    instance_path.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret)
    path.chmod(0o600)
    log.warning("BETTER_AUTH_SECRET is not set; generated a development secret in %s", path)
    return secret


def load_config(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Build the Flask config from the environment; raise ConfigError on what must stop start-up."""
    env = dict(os.environ if env is None else env)
    app_env = env.get("APP_ENV", "development")
    if app_env not in ENVIRONMENTS:
        raise ConfigError(f"APP_ENV must be one of {', '.join(ENVIRONMENTS)}, got {app_env!r}")

    embedded_port = _int(env, "EMBEDDED_POSTGRES_PORT", EMBEDDED_POSTGRES_PORT)
    database_url = env.get("DATABASE_URL") or ""
    if not database_url:
        if app_env == "production":
            raise ConfigError("DATABASE_URL is required in production")
        database_url = embedded_postgres_url(embedded_port)
    secret = env.get("BETTER_AUTH_SECRET") or None
    better_auth_url = (_http_url(env, "BETTER_AUTH_URL") or "").rstrip("/") or None
    storage_uri, storage_options = rate_limit_storage(env)
    strategy = env.get("RATELIMIT_STRATEGY") or "fixed-window"
    if strategy not in STRATEGIES:
        raise ConfigError(f"RATELIMIT_STRATEGY must be one of {', '.join(STRATEGIES)}, got {strategy!r}")

    migrations_url, migrations_note = migrations_database_url(env.get("MIGRATIONS_DATABASE_URL"), database_url)

    return {
        "APP_ENV": app_env,
        "DATABASE_URL": normalize_database_url(database_url),
        "MIGRATIONS_DATABASE_URL": migrations_url,
        "MIGRATIONS_DATABASE_URL_NOTE": migrations_note,  # said by the migration commands when set
        "EMBEDDED_POSTGRES_PORT": embedded_port,
        "BETTER_AUTH_SECRET": secret,
        "BETTER_AUTH_URL": better_auth_url,
        # The default (BETTER_AUTH_URL + /api/auth/jwks) is applied by auth.Authenticator, so an override of
        # BETTER_AUTH_URL alone (tests, create_app(config)) moves the JWKS with it.
        "BETTER_AUTH_JWKS_URL": _http_url(env, "BETTER_AUTH_JWKS_URL"),
        "JWT_ISSUER": _split_list(env.get("JWT_ISSUER")),
        "JWT_AUDIENCE": _split_list(env.get("JWT_AUDIENCE")),
        "JWT_LEEWAY": _int(env, "JWT_LEEWAY", 30),
        "JWKS_MAX_AGE": _between(env, "JWKS_MAX_AGE", JWKS_MAX_AGE, JWKS_REFRESH_INTERVAL, JWKS_MAX_AGE),
        "FRONTEND_URL": _split_list(env.get("FRONTEND_URL", "http://localhost:3000")),
        "DB_POOL_SIZE": _int(env, "DB_POOL_SIZE", 5),
        "DB_MAX_OVERFLOW": _int(env, "DB_MAX_OVERFLOW", 5),
        "DB_POOL_TIMEOUT": _int(env, "DB_POOL_TIMEOUT", 5),
        "DB_POOL_RECYCLE": _int(env, "DB_POOL_RECYCLE", 240),
        "DB_CONNECT_TIMEOUT": _int(env, "DB_CONNECT_TIMEOUT", 5),
        "DB_STATEMENT_TIMEOUT_MS": _int(env, "DB_STATEMENT_TIMEOUT_MS", 5_000),
        "LOG_LEVEL": env.get("LOG_LEVEL", "INFO").upper(),
        "TASK_QUOTA": _at_least(env, "TASK_QUOTA", TASK_QUOTA, 1),
        "TRUSTED_PROXY_HOPS": _at_least(env, "TRUSTED_PROXY_HOPS", 0, 0),
        "RATELIMIT_ENABLED": _bool(env, "RATELIMIT_ENABLED", True),
        "RATELIMIT_STORAGE_URI": storage_uri,
        "RATELIMIT_STORAGE_OPTIONS": storage_options,
        "RATELIMIT_APPLICATION": _rate_limit(env, "RATELIMIT_APPLICATION", "1200 per minute"),
        "RATELIMIT_ANONYMOUS": _rate_limit(env, "RATELIMIT_ANONYMOUS", "120 per minute"),
        "RATELIMIT_DEFAULT": _rate_limit(env, "RATELIMIT_DEFAULT", ""),
        "RATELIMIT_STRATEGY": strategy,
        "RATELIMIT_HEADERS_ENABLED": _bool(env, "RATELIMIT_HEADERS_ENABLED", True),
        "RATELIMIT_KEY_PREFIX": env.get("RATELIMIT_KEY_PREFIX") or "todo-api",
        "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": _bool(env, "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED", True),
        "RATELIMIT_SWALLOW_ERRORS": _bool(env, "RATELIMIT_SWALLOW_ERRORS", True),
    }


def check_secret(config: dict[str, Any], instance_path: Path) -> None:
    """Refuse to start in production without a strong secret; generate one in development."""
    secret = config.get("BETTER_AUTH_SECRET")
    if config["APP_ENV"] == "production":
        if not secret and not config.get("BETTER_AUTH_URL"):
            raise ConfigError("BETTER_AUTH_SECRET (or BETTER_AUTH_URL for JWKS) is required in production")
        if secret and len(secret) < MIN_SECRET_LENGTH:
            raise ConfigError(f"BETTER_AUTH_SECRET must be at least {MIN_SECRET_LENGTH} characters in production")
    elif not secret:
        config["BETTER_AUTH_SECRET"] = _dev_secret(instance_path)

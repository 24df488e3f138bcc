"""Rate limits with flask-limiter, the client address they count by, and the answers to a limit or quota reached.

Who is counted, over the whole API (flask-limiter's application-wide limit, one counter per key for every route):
- a request with a valid token: its user, `g.user_id` from auth.load_user (RATELIMIT_APPLICATION);
- any other request, the 401s included: its client address (RATELIMIT_ANONYMOUS), IPv6 per /64, since one client
  usually holds a whole /64.
Never counted: /health and /health/ready (load balancers must never see 429), and OPTIONS (CORS preflights, answered
with no work).

When: flask-limiter's before_request hook, registered right after auth.load_user, which it needs to know whom to
count (a token already verified is a cache hit, under 1 µs; an unknown one is an HMAC, about 100 µs). Everything
else comes after, so a 429 costs no path guard, no body parsing and no database work.

The client address is the TCP peer, unless TRUSTED_PROXY_HOPS proxies are configured: then werkzeug's ProxyFix
takes it from X-Forwarded-For, that many entries from the right, which only those proxies could have written.

Counters live in Redis when REDIS_URL (or RATELIMIT_STORAGE_URI) is set, shared by every worker and instance, and
otherwise in each worker's memory. A Redis outage never fails a request: each worker counts in memory meanwhile.
"""

from __future__ import annotations

import ipaddress
import time

from flask import Flask, Response, current_app, g, request
from flask_limiter import ApplicationLimit, HeaderNames, Limiter, RateLimitExceeded
from werkzeug.middleware.proxy_fix import ProxyFix

from . import health
from .errors import error_response
from .repositories import QuotaExceeded

EXTENSION = "todo_api.limits"
LIST_ENDPOINT = "tasks.Tasks"
TASKS_PER_UNIT = 100  # a list page costs one request per this many tasks of its page_size (the default page: 1)
MAX_PAGE_SIZE = 1000
# flask-limiter puts its seconds-to-reset in Retry-After on every response, and raises a 503's own Retry-After (the
# database's 5 s, the JWKS's wait) to its window's end. Under this name, Retry-After stays the app's: on a 429 (below)
# and on a 503, as the contract says. The same name and meaning as Discord's API.
RESET_AFTER_HEADER = "X-RateLimit-Reset-After"
UNROUTED = "unrouted"  # flask-limiter's name for requests that match no route, which it would otherwise not count


def client_address() -> str:
    """The address the limits count by: IPv4 as is, IPv6 by its /64 (one subscriber's usual allocation)."""
    address = request.remote_addr or "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return f"{ipaddress.IPv6Network((ip, 64), strict=False).network_address}/64"
    return address


def rate_limit_key() -> str:
    """The user for a request with a valid token; the client address for any other."""
    user_id = g.get("user_id")
    return f"user:{user_id}" if user_id is not None else f"address:{client_address()}"


def application_limit() -> str:
    config = current_app.config
    return config["RATELIMIT_APPLICATION"] if g.get("user_id") is not None else config["RATELIMIT_ANONYMOUS"]


def request_cost() -> int:
    """1 for a request; a user's list page costs one per 100 tasks it asks for (page_size=1000: 10), so the limit
    also bounds the data read: 32 pages of 1000 had moved 431 MB in 3.6 s."""
    if request.endpoint != LIST_ENDPOINT or request.method != "GET" or g.get("user_id") is None:
        return 1
    try:
        page_size = int(request.args.get("page_size", TASKS_PER_UNIT))
    except ValueError:
        return 1  # the view answers 422
    return (min(max(page_size, 1), MAX_PAGE_SIZE) + TASKS_PER_UNIT - 1) // TASKS_PER_UNIT


def is_preflight() -> bool:
    return request.method == "OPTIONS"


def breach_headers(limiter: Limiter, ratelimit_headers: bool) -> dict[str, str]:
    """Retry-After for a 429, and the X-RateLimit-* headers when flask-limiter does not write them.

    flask-limiter writes X-RateLimit-* on every counted response if RATELIMIT_HEADERS_ENABLED, at the cost of two
    more storage reads per request (two Redis round trips); with it off, a 429 still carries them (the contract).
    """
    limit = limiter.current_limit
    if limit is None:
        return {"Retry-After": "1"}
    try:
        reset_at, remaining = limit.reset_at, limit.remaining  # one read, kept for flask-limiter's own headers
    except Exception:  # the storage failed since the hit (logged there): the window's length is a bound
        return {"Retry-After": str(limit.limit.get_expiry())}
    headers = {"Retry-After": str(max(1, int(reset_at - time.time())))}  # as X-RateLimit-Reset-After
    if not ratelimit_headers:
        headers[HeaderNames.LIMIT.value] = str(limit.limit.amount)
        headers[HeaderNames.REMAINING.value] = str(remaining)
        headers[HeaderNames.RESET.value] = str(reset_at)
    return headers


def too_many_requests(error: RateLimitExceeded) -> Response:
    """429 in the envelope, with Retry-After and the rate limit headers whatever RATELIMIT_HEADERS_ENABLED says."""
    headers = breach_headers(current_app.extensions[EXTENSION], current_app.config["RATELIMIT_HEADERS_ENABLED"])
    return error_response(429, f"Rate limit exceeded: {error.description}", headers)


def quota_exceeded(error: QuotaExceeded) -> Response:
    return error_response(
        409, f"Task quota reached: a user may hold at most {error.quota} tasks; delete some to add more"
    )


def init_app(app: Flask) -> None:
    """After auth.init_app: the limiter's hook must run after the token is loaded, before anything else."""
    hops = app.config["TRUSTED_PROXY_HOPS"]
    if hops:
        # Only the address: X-Forwarded-Proto is gunicorn's (FORWARDED_ALLOW_IPS).
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=0)  # type: ignore[method-assign]
    limiter = Limiter(
        rate_limit_key,
        application_limits=[ApplicationLimit(limit_provider=application_limit, cost=request_cost)],
        request_identifier=lambda: request.endpoint or UNROUTED,
        header_name_mapping={HeaderNames.RETRY_AFTER: RESET_AFTER_HEADER},
    )
    limiter.request_filter(is_preflight)
    limiter.exempt(health.blp)
    limiter.init_app(app)  # reads the other RATELIMIT_* settings; with RATELIMIT_ENABLED false it adds no hook
    app.extensions[EXTENSION] = limiter
    app.register_error_handler(RateLimitExceeded, too_many_requests)
    app.register_error_handler(QuotaExceeded, quota_exceeded)

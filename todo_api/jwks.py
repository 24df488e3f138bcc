"""Better Auth's public keys: fetched lazily from its JWKS, shared through the database, refreshed at a bounded rate.

- **Shared.** The last good JWKS document is kept in the database (`jwks_documents`, migration 0004), which every
  worker and instance shares. A worker with no keys (new, recycled by max_requests, restarted) reads it first, so
  an auth-server outage does not turn valid tokens into 503 on some workers while others answer 200. Each
  successful fetch writes it back.
- **Fetched by hand, with a total deadline.** PyJWKClient.fetch_data bounds each socket read, not the fetch: a
  body trickled over 12 s held its callers 12 s. `fetch_jwks` (http.client) gives the whole fetch one deadline,
  `FETCH_TIMEOUT`, and does what PyJWKClient did: http/https only, no redirects, our User-Agent.
- **Never a lock across network I/O.** A fetch runs in its own short-lived thread; requests that need its result
  wait for it at most the deadline (two per worker; the others until it is half a second old), requests with a
  cached key (and HS256 ones) never wait for it.
- **Keys are checked** (RFC 7518 §3.3, RFC 8725): RSA under 2048 bits, small-order Ed25519/Ed448 points, `key_ops`
  without `verify`, and kids that appear twice are refused, each logged once. PyJWK builds the keys.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from jwt import PyJWK
from jwt.algorithms import OKPAlgorithm
from sqlalchemy import Engine, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError

from .config import JWKS_MAX_AGE, JWKS_REFRESH_INTERVAL
from .models import JWKSDocument

log = logging.getLogger(__name__)

USER_AGENT = f"todo-api/1.0 (JWKS client; PyJWT/{jwt.__version__})"
REFRESH_INTERVAL = float(JWKS_REFRESH_INTERVAL)  # one fetch per this for unknown kids, whatever tokens arrive
MAX_AGE = float(JWKS_MAX_AGE)  # a key check is trusted this long: a removed key stops working within it
FETCH_TIMEOUT = 3.0  # total deadline of one fetch (connect, headers, body); also the longest a request waits for one
# A worker has few threads (gunicorn: 4): if all of them waited the whole deadline for a slow fetch, HS256 and
# cached-key requests would queue behind them. So only this many requests per worker wait the whole deadline;
# the others wait until the fetch is SHORT_WAIT old (longer than a healthy fetch takes, even to a remote
# auth server), then get 503.
PATIENT_WAITERS = 2
SHORT_WAIT = 0.5
MAX_JWKS_BYTES = 1 << 20  # Better Auth's JWKS is well under 1 KiB per key

# RFC 9864: Ed25519 and Ed448 are the fully specified names of EdDSA. PyJWT 2.15 knows only "EdDSA", whose
# OKPAlgorithm verifies both curves; the new names are registered as the same algorithm (PyJWT's public
# register_algorithm). Which name a key accepts is pinned below by its curve.
for _name in ("Ed25519", "Ed448"):
    try:
        jwt.register_algorithm(_name, OKPAlgorithm())
    except ValueError:  # already registered (module reloaded)
        pass

# (kty, crv) -> the algorithms such a key may verify. The algorithm comes from the key, never from the token.
# No "oct" entry: a shared secret never comes from a JWKS, so HS256 cannot be verified with a published key.
ALGORITHMS_BY_KEY_TYPE: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("OKP", "Ed25519"): ("EdDSA", "Ed25519"),
    ("OKP", "Ed448"): ("EdDSA", "Ed448"),
    ("EC", "P-256"): ("ES256",),
    ("EC", "P-521"): ("ES512",),
    ("RSA", None): ("RS256", "PS256"),
}
SUPPORTED_ALGORITHMS = frozenset(alg for algs in ALGORITHMS_BY_KEY_TYPE.values() for alg in algs)

# Small-order points, by their y coordinate modulo p (the sign bit of x cleared; y >= p is a non-canonical
# encoding of y - p, which is also refused). A signature made with such a "key" verifies for many messages.
_P25519 = 2**255 - 19
_Y8_25519 = int.from_bytes(bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "little")
_P448 = 2**448 - 2**224 - 1
SMALL_ORDER_Y: dict[str, tuple[int, int, frozenset[int]]] = {
    # crv: (encoded length, prime, y of the points of order 1, 2, 4 and 8)
    "Ed25519": (32, _P25519, frozenset({1, _P25519 - 1, 0, _Y8_25519, _P25519 - _Y8_25519})),
    "Ed448": (57, _P448, frozenset({1, _P448 - 1, 0})),
}


class JWKSUnavailable(Exception):
    """The token's key is not cached and the JWKS cannot be fetched now: answer 503 with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"JWKS unavailable; retry after {retry_after} s")
        self.retry_after = retry_after


class JWKSFetchError(Exception):
    """The JWKS could not be fetched: network, deadline, HTTP status, size, not JSON, not a JWKS."""


@dataclass(frozen=True)
class PublishedKey:
    """A published key and the algorithm names it verifies."""

    jwk: PyJWK
    algorithms: tuple[str, ...]

    @property
    def key(self) -> Any:
        return self.jwk.key


def key_algorithms(jwk: dict[str, Any]) -> tuple[str, ...]:
    """The algorithms this key verifies; () for a key we never use.

    The key's type and curve decide; its own `alg` only narrows RSA to RS256 or PS256 (Better Auth always sets it;
    an RSA key without one means RS256, as in PyJWT), and must otherwise be one of the key's names.
    """
    allowed = ALGORITHMS_BY_KEY_TYPE.get((jwk.get("kty"), jwk.get("crv")))  # type: ignore[arg-type]
    if allowed is None:
        return ()
    alg = jwk.get("alg")
    if jwk.get("kty") == "RSA":
        return (alg or "RS256",) if alg in (None, *allowed) else ()
    return allowed if alg is None or alg in allowed else ()


def _is_small_order(jwk: dict[str, Any], key: Any) -> bool:
    length, prime, small = SMALL_ORDER_Y[jwk["crv"]]
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if len(raw) != length:
        return True
    y = int.from_bytes(raw, "little") & ~(1 << (8 * length - 1))  # clear the sign bit of x
    return y % prime in small


def refusal(jwk: dict[str, Any], key: PyJWK) -> str | None:
    """Why a well-formed key is too weak or not meant for verifying signatures; None when it is fine."""
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return "its key_ops do not include verify"
    if jwk["kty"] == "RSA" and key.Algorithm.check_key_length(key.key):
        return f"RSA key of {key.key.key_size} bits, under 2048"
    if jwk["kty"] == "OKP" and _is_small_order(jwk, key.key):
        return "small-order (degenerate) OKP public key"
    return None


def parse_jwks(data: Any, refused: Callable[[str, str], None] | None = None) -> dict[str, PublishedKey]:
    """kid -> key for the usable signing keys of a JWKS document; others are skipped, weak ones refused.

    `refused(kid, reason)` hears of each refused key (default: a warning in the log).
    """
    refused = refused or (lambda kid, reason: log.warning("JWKS key %r refused: %s", kid, reason))
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError("the JWKS has no 'keys' list")
    signing = [jwk for jwk in entries
               if isinstance(jwk, dict) and jwk.get("use", "sig") == "sig" and isinstance(jwk.get("kid"), str)]
    kids = [jwk["kid"] for jwk in signing]
    keys: dict[str, PublishedKey] = {}
    for jwk in signing:
        kid = jwk["kid"]
        if kids.count(kid) > 1:
            refused(kid, f"the kid appears {kids.count(kid)} times: ambiguous")
            continue
        algorithms = key_algorithms(jwk)
        if not algorithms:
            refused(kid, "unsupported key type or algorithm")
            continue
        try:
            key = PyJWK(jwk, algorithms[0])
            reason = refusal(jwk, key)
        except (jwt.PyJWTError, ValueError, TypeError) as error:
            reason = f"not a valid key ({error})"
        if reason:
            refused(kid, reason)
            continue
        keys[kid] = PublishedKey(key, algorithms)
    return keys


def fetch_jwks(url: str, timeout: float = FETCH_TIMEOUT) -> dict[str, Any]:
    """GET the JWKS document within `timeout` seconds in all: connect, headers and the whole body.

    Each socket operation gets the time left, and the body is read a chunk at a time, so a server that trickles
    its answer is cut off at the deadline (name resolution is the one step that cannot be bounded).
    """
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise JWKSFetchError(f"no complete answer within {timeout:g} s")
        return remaining

    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JWKSFetchError(f"not an http(s) URL: {url}")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=left())
    try:
        connection.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                           headers={"User-Agent": USER_AGENT, "Accept": "application/json"})
        sock = connection.sock  # kept: getresponse() may drop the connection's reference to it
        sock.settimeout(left())
        response = connection.getresponse()
        if response.status != 200:  # redirects included: they are not followed
            raise JWKSFetchError(f"HTTP {response.status}")
        body = bytearray()
        while True:
            sock.settimeout(left())
            chunk = response.read1(65536)
            if not chunk:
                break
            body += chunk
            if len(body) > MAX_JWKS_BYTES:
                raise JWKSFetchError(f"the JWKS is over {MAX_JWKS_BYTES} bytes")
        left()
        try:
            return json.loads(body)  # type: ignore[no-any-return]
        except ValueError:
            raise JWKSFetchError("the JWKS is not JSON") from None
    except (OSError, http.client.HTTPException) as error:  # refused, reset, timeouts (socket.timeout is an OSError)
        raise JWKSFetchError(f"{type(error).__name__}: {error}") from None
    finally:
        connection.close()


class JWKSStore:
    """The last good JWKS document per URL, in the database every worker and instance shares.

    Its age is measured by the database's clock, so workers and instances agree on it. A database error is
    logged and treated as "nothing stored": the JWKS path must not depend on it.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.table = JWKSDocument.__table__

    def load(self, url: str) -> tuple[dict[str, Any], float] | None:
        """(document, age in seconds), or None."""
        table = self.table
        age = func.extract("epoch", func.now() - table.c.fetched_at)
        try:
            with self.engine.connect() as connection:
                row = connection.execute(select(table.c.document, age).where(table.c.url == url)).first()
        except SQLAlchemyError as error:
            log.warning("could not read the shared JWKS for %s: %s", url, error)
            return None
        return None if row is None else (row[0], max(0.0, float(row[1])))

    def save(self, url: str, document: dict[str, Any]) -> None:
        table = self.table
        statement = insert(table).values(url=url, document=document, fetched_at=func.now())
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.url],
            set_={"document": statement.excluded.document, "fetched_at": statement.excluded.fetched_at},
            where=table.c.fetched_at <= statement.excluded.fetched_at,
        )
        try:
            with self.engine.begin() as connection:
                connection.execute(statement)
        except SQLAlchemyError as error:
            log.warning("could not share the JWKS for %s: %s", url, error)


class JWKSCache:
    """kid -> PublishedKey for one JWKS URL, shared by the threads of a worker, backed by a JWKSStore.

    - Nothing is read until the first token needs a key, so start-up never depends on the auth server. The
      first need reads the shared document (a database read, in that request); Better Auth is asked only when
      there is none, when it lacks the token's kid, or when it is older than `max_age - refresh_interval`.
    - An unknown kid triggers a fetch at most once per `refresh_interval` (30 s): a flood of random kids costs
      the auth server one request per 30 s. A kid missing from a fetch made for it is unknown (401); a kid
      that arrives while the next fetch is held back may have been published since: 503 with Retry-After.
    - A key check is trusted `max_age` (5 minutes). Keys are re-fetched in the background from `max_age -
      refresh_interval` on, so under traffic nobody waits; a request whose keys are past `max_age` waits for the
      re-fetch (see `_wait`), unless the last fetch failed. A failed fetch keeps the keys we have.
    """

    def __init__(
        self,
        url: str,
        *,
        store: JWKSStore | None = None,
        refresh_interval: float = REFRESH_INTERVAL,
        max_age: float = MAX_AGE,
        timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.store = store
        self.refresh_interval = refresh_interval
        self.max_age = max_age
        self.timeout = timeout
        self.clock = clock  # injectable, so tests move time instead of sleeping
        # Replaced as a whole, never mutated, so readers need no lock.
        self._keys: dict[str, PublishedKey] = {}
        self._checked_at: float | None = None  # when the keys we hold were fetched (by anyone) from the auth server
        self._checked_unix: float | None = None  # the same moment as a Unix time, to compare with a token's iat
        self._attempted_at: float | None = None  # this worker's last fetch, successful or not
        self._unknown_kid_fetch_at: float | None = None  # this worker's last fetch caused by an unknown kid
        self._available = True  # whether this worker's last fetch succeeded
        self._store_read = False
        self._store_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the fields below; never held across I/O
        self._running: threading.Event | None = None  # set when the fetch in flight ends
        self._running_since = self._running_until = 0.0  # time.monotonic() when the fetch in flight began/gives up
        self._waiting = 0  # requests waiting for it
        self._thread: threading.Thread | None = None  # the last fetch's
        self._refused: set[tuple[str, str]] = set()

    # --- what requests call ---------------------------------------------------------------------------------

    def get(self, kid: str) -> PublishedKey | None:
        """The key for `kid`; None when the JWKS does not have it; JWKSUnavailable when we cannot tell (503)."""
        arrived = self.clock()
        if not self._store_read:
            self._read_store()
        key = self._keys.get(kid)
        if key is not None:
            age = self.age()
            if age >= self.max_age and self._available:
                # The key check has expired: wait (at most the deadline) for a new one. During an outage
                # (last fetch failed) nobody waits, and the cached key is kept.
                self._wait(self._start(due=self._due(self._attempted_at)))
                return self._keys.get(kid)  # None if the new fetch dropped the key
            if age >= self.max_age - self.refresh_interval and self._due(self._attempted_at):
                self._start()  # in the background: this request goes on with the cached key
            return key
        if self._checked_since(arrived):
            return None
        # Twice at most: a fetch in flight (a routine re-check, say) may have begun before this request arrived,
        # so its answer cannot tell; then a fetch of our own, if that one worked and the unknown-kid limit allows.
        for _ in range(2):
            with self._lock:
                running = self._running
                due = running is None and self._due(self._unknown_kid_fetch_at)
                if due:
                    self._unknown_kid_fetch_at = self.clock()
            self._wait(self._start() if due else running)
            key = self._keys.get(kid)
            if key is not None:
                return key
            if self._checked_since(arrived):
                return None  # a fetch that began after this request arrived has no such kid
            if running is None or not self._available:
                break
        # Published after our last fetch, perhaps, and the next one is held back: so not a 401 (contract).
        raise JWKSUnavailable(self.retry_after())

    def retry_after(self) -> int:
        """Whole seconds until an unknown kid may trigger a fetch again (at least 1)."""
        if self._unknown_kid_fetch_at is None:
            return 1
        return max(1, math.ceil(self._unknown_kid_fetch_at + self.refresh_interval - self.clock()))

    def age(self) -> float:
        """Seconds since the keys we hold were checked against the auth server (inf: never)."""
        return math.inf if self._checked_at is None else self.clock() - self._checked_at

    def checked_after(self, unix_time: float) -> bool:
        """Whether the keys we hold come from a fetch that began after `unix_time`: a kid they lack, on a token
        issued before then, was not published too late for that fetch; it is not in the JWKS."""
        return self._checked_unix is not None and self._checked_unix > unix_time

    def trusted_for(self) -> float:
        """Seconds the current key check remains valid: how long a token verified now may be cached."""
        return max(0.0, self.max_age - self.age())

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for the last fetch, and its write to the store, to end (tests)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # --- fetching -------------------------------------------------------------------------------------------

    def _checked_since(self, moment: float) -> bool:
        return self._checked_at is not None and self._checked_at >= moment

    def _due(self, last: float | None) -> bool:
        return last is None or self.clock() - last >= self.refresh_interval

    def _wait(self, running: threading.Event | None) -> None:
        """Wait for a fetch until its deadline (a few requests) or SHORT_WAIT (the others)."""
        if running is None:
            return
        with self._lock:
            patient = self._waiting < PATIENT_WAITERS
            self._waiting += 1
        try:
            until = self._running_until if patient else min(self._running_until, self._running_since + SHORT_WAIT)
            running.wait(max(0.0, until - time.monotonic()))
        finally:
            with self._lock:
                self._waiting -= 1

    def _read_store(self) -> None:
        """Once per worker, before its first key lookup: adopt the shared JWKS, if any.

        In the request's thread, under a lock of its own: a database read, as any request makes, and only
        the requests that find no keys yet wait for it.
        """
        with self._store_lock:
            if self._store_read:
                return
            stored = self.store.load(self.url) if self.store is not None else None
            if stored is not None:
                self._adopt(stored[0], self.clock() - stored[1])
            self._store_read = True

    def _start(self, *, due: bool = True) -> threading.Event | None:
        """Start a fetch unless one is in flight; return the event of the fetch in flight (None: none)."""
        with self._lock:
            if self._running is not None:
                return self._running
            if not due:
                return None
            running = self._running = threading.Event()
            self._attempted_at = self.clock()
            self._running_since = time.monotonic()
            # The fetch's own deadline, plus a margin for scheduling.
            self._running_until = self._running_since + self.timeout + 0.5
        thread = self._thread = threading.Thread(target=self._run, args=(running,), name="jwks-fetch", daemon=True)
        thread.start()
        return running

    def _run(self, running: threading.Event) -> None:
        document = None
        try:
            document = self._fetch()
        except Exception:  # a bug here must not leave waiters hanging or kill the worker
            log.exception("JWKS refresh from %s failed", self.url)
        finally:
            with self._lock:
                self._running = None
            running.set()
        if document is not None and self.store is not None:  # after the waiters have their answer
            self.store.save(self.url, document)

    def _fetch(self) -> dict[str, Any] | None:
        """One fetch; the document when it gave keys. Any failure keeps the keys we have."""
        started = self.clock()
        try:
            document = fetch_jwks(self.url, self.timeout)
            keys = parse_jwks(document, self._refuse)
        except (JWKSFetchError, ValueError) as error:
            self._available = False
            log.warning("JWKS fetch from %s failed (%s); keeping %d cached key(s)", self.url, error, len(self._keys))
            return None
        self._hold(keys, started)
        self._available = True
        log.info("JWKS fetched from %s: %d key(s)", self.url, len(keys))
        return document

    def _adopt(self, document: Any, checked_at: float) -> None:
        try:
            keys = parse_jwks(document, self._refuse)
        except ValueError as error:
            log.warning("shared JWKS for %s ignored: %s", self.url, error)
            return
        self._hold(keys, checked_at)
        log.info("JWKS for %s read from the database: %d key(s), %.0f s old", self.url, len(keys),
                 self.clock() - checked_at)

    def _hold(self, keys: dict[str, PublishedKey], checked_at: float) -> None:
        self._keys, self._checked_at = keys, checked_at
        self._checked_unix = time.time() - (self.clock() - checked_at)

    def _refuse(self, kid: str, reason: str) -> None:
        """Log a refused key once per worker, not once per fetch."""
        if (kid, reason) not in self._refused:
            self._refused.add((kid, reason))
            log.warning("JWKS key %r from %s refused: %s", kid, self.url, reason)

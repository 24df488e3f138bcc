"""Better Auth's public keys: fetched lazily from its JWKS, cached per worker, refreshed at a bounded rate.

PyJWT does the HTTP (PyJWKClient.fetch_data: http/https only, no redirects, timeout, headers) and builds the keys
(PyJWK). Its own caches are off: their clock cannot be injected, and once they expire a failed fetch leaves no keys,
while the contract wants cached keys to keep working through an outage.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient

log = logging.getLogger(__name__)

USER_AGENT = f"todo-api/1.0 (JWKS client; PyJWT/{jwt.__version__})"
REFRESH_INTERVAL = 30.0  # at most one fetch per this many seconds, whatever tokens arrive (contract)
MAX_AGE = 300.0  # known keys are re-checked after this, so a key removed from the JWKS stops working
FETCH_TIMEOUT = 3.0  # a request waits at most this long for the auth server

# (kty, crv) -> the algorithms such a key may verify. The algorithm comes from the key, never from the token.
# No "oct" entry: a shared secret never comes from a JWKS, so HS256 cannot be verified with a published key.
ALGORITHMS_BY_KEY_TYPE: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("OKP", "Ed25519"): ("EdDSA",),
    ("EC", "P-256"): ("ES256",),
    ("EC", "P-521"): ("ES512",),
    ("RSA", None): ("RS256", "PS256"),
}
SUPPORTED_ALGORITHMS = frozenset(alg for algs in ALGORITHMS_BY_KEY_TYPE.values() for alg in algs)


class JWKSUnavailable(Exception):
    """The token's key is not cached and the JWKS cannot be fetched now: answer 503 with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"JWKS unavailable; retry after {retry_after} s")
        self.retry_after = retry_after


def pinned_algorithm(jwk: dict[str, Any]) -> str | None:
    """The single algorithm this key verifies, or None for a key we never use.

    The key's type and curve decide; its own `alg` only narrows RSA to RS256 or PS256 (Better Auth always sets it;
    an RSA key without one means RS256, as in PyJWT).
    """
    allowed = ALGORITHMS_BY_KEY_TYPE.get((jwk.get("kty"), jwk.get("crv")))  # type: ignore[arg-type]
    if allowed is None:
        return None
    alg = jwk.get("alg")
    if alg is None:
        return allowed[0]
    return alg if alg in allowed else None


def parse_jwks(data: dict[str, Any]) -> dict[str, PyJWK]:
    """kid -> key for the usable signing keys of a JWKS document; others are skipped."""
    entries = data.get("keys")
    if not isinstance(entries, list):
        raise ValueError("the JWKS has no 'keys' list")
    keys: dict[str, PyJWK] = {}
    for jwk in entries:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or not isinstance(jwk.get("kid"), str):
            continue
        algorithm = pinned_algorithm(jwk)
        if algorithm is None:
            log.warning("JWKS key %r skipped: unsupported type/algorithm", jwk["kid"])
            continue
        try:
            keys[jwk["kid"]] = PyJWK(jwk, algorithm)
        except (jwt.PyJWTError, ValueError) as error:
            log.warning("JWKS key %r skipped: %s", jwk["kid"], error)
    return keys


class JWKSCache:
    """kid -> PyJWK for one JWKS URL, shared by the threads of a worker.

    - Nothing is fetched until the first token needs a key, so start-up never depends on the auth server.
    - An unknown kid triggers a fetch at most once per `refresh_interval` (30 s, successful or not): a flood of
      random kids costs the auth server one request per 30 s. Keys older than `max_age` are re-fetched once, on
      the next request (retried at most every 30 s while that fails). The two are paced separately, so a routine
      re-fetch just before Better Auth rotates its key does not keep the new kid out for 30 s.
    - A failed fetch keeps the cached keys. A kid that is not cached then raises JWKSUnavailable, since the key
      may well exist; a kid missing from a successful fetch is simply unknown (None).
    """

    def __init__(
        self,
        url: str,
        *,
        refresh_interval: float = REFRESH_INTERVAL,
        max_age: float = MAX_AGE,
        timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.refresh_interval = refresh_interval
        self.max_age = max_age
        self.clock = clock  # injectable, so tests move time instead of sleeping
        self._client = PyJWKClient(url, cache_jwk_set=False, headers={"User-Agent": USER_AGENT}, timeout=timeout)
        # Replaced as a whole, never mutated, so readers need no lock.
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch, successful or not
        self._unknown_kid_fetch_at: float | None = None  # last fetch caused by an unknown kid
        self._available = True  # whether the last fetch succeeded
        self._fetch_lock = threading.Lock()

    def get(self, kid: str) -> PyJWK | None:
        """The key for `kid`; None when the JWKS does not have it; JWKSUnavailable when we cannot tell."""
        key = self._keys.get(kid)
        if key is not None:
            # Re-check old keys, but only one thread does it; the others go on with the cached key.
            if self._is_stale() and self._fetch_lock.acquire(blocking=False):
                try:
                    if self._is_stale() and self._due(self._attempted_at):
                        self._fetch()
                finally:
                    self._fetch_lock.release()
                return self._keys.get(kid)  # None if a successful fetch dropped the key
            return key
        # Unknown kid: threads queue behind one fetch and then all see its result.
        with self._fetch_lock:
            if kid not in self._keys and self._due(self._unknown_kid_fetch_at):
                self._unknown_kid_fetch_at = self.clock()
                self._fetch()
            key = self._keys.get(kid)
            if key is None and not self._available:
                raise JWKSUnavailable(self.retry_after())
            return key

    def retry_after(self) -> int:
        """Whole seconds until an unknown kid may trigger a fetch again (at least 1)."""
        if self._unknown_kid_fetch_at is None:
            return 1
        return max(1, math.ceil(self._unknown_kid_fetch_at + self.refresh_interval - self.clock()))

    def _is_stale(self) -> bool:
        return self._fetched_at is None or self.clock() - self._fetched_at >= self.max_age

    def _due(self, last: float | None) -> bool:
        return last is None or self.clock() - last >= self.refresh_interval

    def _fetch(self) -> None:
        """One fetch (caller holds the lock). Any failure keeps the keys we have."""
        self._attempted_at = self.clock()
        try:
            keys = parse_jwks(self._client.fetch_data())
        except (jwt.PyJWTError, OSError, ValueError) as error:  # network, HTTP status, not JSON, not a JWKS
            self._available = False
            log.warning("JWKS fetch from %s failed (%s); keeping %d cached key(s)", self.url, error, len(self._keys))
            return
        self._keys, self._fetched_at, self._available = keys, self._attempted_at, True
        log.info("JWKS fetched from %s: %d key(s)", self.url, len(keys))

"""Gunicorn settings: `gunicorn -c gunicorn.conf.py wsgi:app`.

Environment:
PORT                 Listen port on 0.0.0.0 (default 8000).
WEB_CONCURRENCY      Worker processes (default 4).
GUNICORN_THREADS     Threads per worker (default 4).
GUNICORN_TIMEOUT     Seconds a worker may be silent before it is killed (default 30).
GUNICORN_GRACEFUL_TIMEOUT  Seconds to finish in-flight requests on shutdown (default 25; keep it below the
                     platform's stop timeout: `docker run --stop-timeout 30`, Kubernetes' 30 s grace period).
GUNICORN_KEEPALIVE   Seconds to hold an idle keep-alive connection, gthread only (default 5).
GUNICORN_MAX_REQUESTS  Requests before a worker is recycled, 0 disables (default 10000).
GUNICORN_LOG_LEVEL   gunicorn's own log level (default info).
GUNICORN_ACCESS_LOG  gunicorn's access log: "-" for stdout or a path (default off: the app logs each request).
GUNICORN_CONTROL_SOCKET  Path of gunicorn's control socket for `gunicornc` (default: none, the socket is off).
FORWARDED_ALLOW_IPS  Proxies trusted for X-Forwarded-* (gunicorn's own variable; default 127.0.0.1,::1).

Defaults were measured on 2 vCPUs with wrk, 64 connections: with PostgreSQL on localhost, 4 gthread
workers x 4 threads matched the best sync setups (the app's CPU is the limit); with a 2 ms round trip
to the database, as with a hosted one, they served about twice as many requests as 4 sync workers.
Keep DB_POOL_SIZE (default 5) >= GUNICORN_THREADS, or threads wait for connections.
"""

from __future__ import annotations

import os


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


bind = f"0.0.0.0:{_env_int('PORT', 8000)}"

workers = _env_int("WEB_CONCURRENCY", 4)
threads = _env_int("GUNICORN_THREADS", 4)
# gthread, reading request heads in its event loop with a 5 s deadline and answering what gunicorn refuses with the
# JSON envelope: slow clients cannot hold threads (todo_api/gunicorn_worker.py). Also with 1 thread.
worker_class = "todo_api.gunicorn_worker.ThreadWorker"
# Fields up to 16 KiB reach the app, which answers a token over 8 KiB 401; a larger field or head is 431 JSON.
limit_request_field_size = 16 * 1024

# Workers fork from a master that already imported the app: fast recycling, shared memory,
# and a configuration error stops the master at once instead of boot-looping workers.
# Each forked worker starts with an empty database pool (todo_api.db.forget_pool_after_fork).
preload_app = True

# Recycling bounds slow memory growth; the jitter keeps workers from restarting together.
# Not lower: each recycle refills the pool, and at 2000 it cost ~15% throughput at saturation.
max_requests = _env_int("GUNICORN_MAX_REQUESTS", 10000)
max_requests_jitter = max(1, max_requests // 10) if max_requests else 0

# Longer than the worst request: pool wait 5 s + connect 5 s + statement 5 s, and the client-side deadline
# of one connect timeout more that todo_api/db.py puts on a database that stopped answering.
timeout = _env_int("GUNICORN_TIMEOUT", 30)
# Below the 30 s Kubernetes and ECS wait between SIGTERM and SIGKILL. Docker waits 10 s unless told otherwise,
# hence `--stop-timeout 30` in the README's `docker run`.
graceful_timeout = _env_int("GUNICORN_GRACEFUL_TIMEOUT", 25)
keepalive = _env_int("GUNICORN_KEEPALIVE", 5)

# The app logs each request as one JSON line (LOG_LEVEL=INFO: request id, status, duration, user id), so
# gunicorn's own access line would log every request twice; GUNICORN_ACCESS_LOG=- turns it back on.
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# Every line gunicorn writes is JSON with the app's fields (ts, level, logger, msg), from the app's own formatter:
# its start and stop lines, worker boots and errors on stderr, the access log (when "-") on stdout. Loggers that
# have no handler of their own (gunicorn.http.wsgi, Alembic, SQLAlchemy) reach the root's, from WARNING up.
# An access log written to a file keeps gunicorn's plain format.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,  # the app's loggers exist already when this is applied
    "formatters": {"json": {"()": "todo_api.observability.JSONFormatter"}},
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
        "stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
    },
    "root": {"level": "WARNING", "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"handlers": ["stderr"], "propagate": False},  # its level stays `loglevel`
        **({"gunicorn.access": {"handlers": ["stdout"], "propagate": False}} if accesslog == "-" else {}),
    },
}

# gunicorn's control socket (for `gunicornc`) defaults to one path per user, $XDG_RUNTIME_DIR/gunicorn.ctl or
# ~/.gunicorn/gunicorn.ctl: several servers of one user would share it, and a read-only container cannot
# create it. Off unless GUNICORN_CONTROL_SOCKET names a path of this server's own.
_control_socket = os.environ.get("GUNICORN_CONTROL_SOCKET", "").strip()
control_socket_disable = not _control_socket
if _control_socket:
    control_socket = _control_socket

# Containers often mount /tmp on disk; the heartbeat file belongs in memory.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None


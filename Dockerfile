# todo-api: gunicorn serving the Flask app. Build: docker build -t todo-api .  Run: see the README's Container section.
# `make test-container` builds this file and runs the image against PostgreSQL (tests/container/checks.py).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    APP_ENV=production \
    PORT=8000

# The runtime user: a plain account (not --system) whose uid and gid are both 10001, with no home and no shell.
# It owns nothing in the image.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app

WORKDIR /app

# Dependencies before the code, so a code change reuses this layer. A build machine whose TLS to the package index
# is intercepted passes its CA bundle as a build secret (`--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt`):
# it is mounted for this step only and never written to the image.
COPY requirements.txt .
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --no-warn-script-location -r requirements.txt

# The code (.dockerignore lets in only what runs) belongs to root: readable by the runtime user, never writable,
# whatever umask the checkout was made with.
COPY . .
RUN chmod -R u=rwX,go=rX /app

USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request as r; port = os.environ.get('PORT', '8000'); \
        r.build_opener(r.ProxyHandler({})).open(f'http://127.0.0.1:{port}/health', timeout=2)"

# RUN_MIGRATIONS=1 migrates MIGRATIONS_DATABASE_URL (else DATABASE_URL's direct endpoint) first, one replica at a time.
# On SIGTERM gunicorn finishes in-flight requests for up to GUNICORN_GRACEFUL_TIMEOUT (25 s): give the container
# a longer stop timeout (`docker run --stop-timeout 30`; Docker's default is 10 s, Kubernetes' grace period 30 s).
ENTRYPOINT ["/app/docker-entrypoint.sh"]
CMD ["gunicorn", "--config", "/app/gunicorn.conf.py", "--chdir", "/app", "wsgi:app"]

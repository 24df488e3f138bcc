#!/bin/sh
# Optional migration step, then the command (gunicorn by default).
set -e
if [ "${RUN_MIGRATIONS:-0}" = "1" ]; then
  flask --app wsgi db upgrade
fi
exec "$@"

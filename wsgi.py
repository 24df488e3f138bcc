"""WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`, `flask --app wsgi ...`."""

import sys

from todo_api import create_app
from todo_api.config import ConfigError

try:
    app = create_app()
except ConfigError as error:
    # One clear line instead of a traceback, then a non-zero exit.
    sys.exit(f"todo-api: {error}")

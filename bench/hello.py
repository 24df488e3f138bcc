"""The ceiling: a bare Flask endpoint served by the same gunicorn configuration as the app.

    gunicorn -c gunicorn.conf.py bench.hello:app
"""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def hello() -> dict[str, str]:
    return {"status": "ok"}

"""The flask CLI: seed, token, db."""

from __future__ import annotations

import os
import subprocess
import sys

import jwt
from sqlalchemy import func, select

from todo_api.db import get_session
from todo_api.models import Task

from .helpers import SECRET, bearer
from .live_server import ROOT, SERVER_VARIABLES


def count_tasks(app, user_id: str) -> int:
    with app.app_context():
        return get_session().scalar(select(func.count()).select_from(Task).where(Task.user_id == user_id))


def test_seed_writes_realistic_valid_tasks(app, runner, client):
    result = runner.invoke(args=["seed", "--user", "seeded", "--count", "250", "--random-seed", "1"])
    assert result.exit_code == 0, result.output
    assert "Wrote 250 tasks for seeded" in result.output
    assert count_tasks(app, "seeded") == 250
    token = jwt.encode({"sub": "seeded", "exp": 2**31 - 1}, SECRET, algorithm="HS256")
    page = client.get("/api/seeded/tasks?page_size=250", headers=bearer(token))
    assert page.status_code == 200 and len(page.json) == 250
    statuses = {task["status"] for task in page.json}
    assert statuses == {"pending", "in_progress", "completed"}
    assert all((task["completed_at"] is not None) == task["completed"] for task in page.json)
    created = [task["created_at"] for task in page.json]
    assert created == sorted(created, reverse=True) and len(set(created)) == 250


def test_seed_rejects_a_bad_count(runner):
    result = runner.invoke(args=["seed", "--user", "u", "--count", "0"])
    assert result.exit_code != 0
    assert "count" in result.output.lower()


def test_token_prints_a_token_the_api_accepts(runner, client):
    args = ["token", "--user", "dev", "--email", "dev@example.com", "--name", "Dev", "--ttl", "60"]
    result = runner.invoke(args=args)
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "dev" and claims["exp"] - claims["iat"] == 60
    me = client.get("/api/me", headers=bearer(token))
    assert me.json == {"user_id": "dev", "email": "dev@example.com", "name": "Dev"}


def test_token_requires_a_user(runner):
    assert runner.invoke(args=["token"]).exit_code != 0


def test_db_current_shows_head(runner):
    result = runner.invoke(args=["db", "current"])
    assert result.exit_code == 0, result.output
    assert "(head)" in result.output


def test_db_commands_say_they_migrate_the_direct_twin_of_a_neon_pooled_url_and_fail_in_one_line():
    """The derived host is the one connected to: `.invalid` never resolves, so the error names it."""
    env = {key: value for key, value in os.environ.items() if key not in SERVER_VARIABLES}
    env.update({"APP_ENV": "test", "BETTER_AUTH_SECRET": SECRET,  # no dev secret to generate and announce
                "DATABASE_URL": "postgresql://postgres@ep-gone-1-pooler.invalid/todo?sslmode=disable&connect_timeout=2"})
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "db", "current"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    note, error = result.stderr.strip().splitlines()
    assert note == ("todo-api: migrations run on Neon's direct endpoint ep-gone-1.invalid, derived from DATABASE_URL's "
                    "pooled ep-gone-1-pooler.invalid (MIGRATIONS_DATABASE_URL chooses another)")
    assert error.startswith('Error: could not translate host name "ep-gone-1.invalid"'), error

"""Flask CLI: `flask db ...` (Alembic), `flask seed`, `flask token`."""

from __future__ import annotations

import random
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import jwt
from alembic import command
from alembic.config import Config as AlembicConfig
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError

from .db import get_session
from .models import PRIORITIES, Task, utcnow

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SEED_BATCH = 2000


def alembic_config(url: str | None = None) -> AlembicConfig:
    """Alembic driven from the app's configuration; MIGRATIONS_DATABASE_URL wins for Neon's direct endpoint."""
    if url is None:
        url = current_app.config["MIGRATIONS_DATABASE_URL"]
        if current_app.config.get("MIGRATIONS_DATABASE_URL_NOTE"):  # derived from a Neon pooled DATABASE_URL
            click.echo(f"todo-api: {current_app.config['MIGRATIONS_DATABASE_URL_NOTE']}", err=True)
    config = AlembicConfig(stdout=sys.stdout)  # the stream of the moment, not the one at import
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Upgrade the database at `url` to the latest schema."""
    command.upgrade(alembic_config(url), "head")


db_group = AppGroup("db", help="Database migrations (Alembic).")


def database_error_line(error: Exception) -> str:
    """The driver's message on one line (libpq gives two for a refused connection)."""
    lines = str(getattr(error, "orig", None) or error).splitlines()
    return "; ".join(filter(None, map(str.strip, lines)))


@contextmanager
def one_line_database_errors() -> Iterator[None]:
    """A database that cannot be reached is one line naming the cause, not a traceback."""
    try:
        yield
    except DBAPIError as error:
        raise click.ClickException(database_error_line(error)) from None


@db_group.command("upgrade")
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Upgrade the schema to REVISION (default: head)."""
    with one_line_database_errors():
        command.upgrade(alembic_config(), revision)


@db_group.command("downgrade")
@click.argument("revision", default="-1")
def downgrade(revision: str) -> None:
    """Downgrade the schema to REVISION (default: one step back)."""
    with one_line_database_errors():
        command.downgrade(alembic_config(), revision)


@db_group.command("current")
def current() -> None:
    """Show the schema's current revision."""
    with one_line_database_errors():
        command.current(alembic_config())


@db_group.command("revision")
@click.option("-m", "--message", required=True)
@click.option("--autogenerate", is_flag=True, help="Compare the models with the database.")
def revision(message: str, autogenerate: bool) -> None:
    """Create a new migration."""
    with one_line_database_errors():
        command.revision(alembic_config(), message=message, autogenerate=autogenerate)


TITLE_VERBS = ("Buy", "Call", "Email", "Review", "Fix", "Plan", "Write", "Clean", "Book", "Pay", "Prepare", "Read")
TITLE_OBJECTS = ("milk", "the dentist", "quarterly report", "flight to Lisbon", "bug #4312", "team offsite",
                 "blog post", "garage", "hotel", "electricity bill", "slides", "contract draft")
TAGS = ("home", "work", "errands", "health", "finance", "travel", "urgent", "someday")


def _seed_rows(user_id: str, count: int, rng: random.Random) -> list[dict[str, Any]]:
    now = utcnow()
    rows = []
    for index in range(count):
        created = now - timedelta(minutes=count - index, seconds=rng.random())
        status = rng.choices(("pending", "in_progress", "completed"), weights=(6, 1, 3))[0]
        rows.append({
            "id": uuid.uuid4(),
            "user_id": user_id,
            "title": f"{rng.choice(TITLE_VERBS)} {rng.choice(TITLE_OBJECTS)}",
            "description": None if index % 3 == 0 else f"Note {index}: details for this task, realistically long.",
            "status": status,
            "priority": rng.choice(PRIORITIES),
            "due_date": created + timedelta(days=rng.randint(-10, 30)) if index % 2 else None,
            "tags": rng.sample(TAGS, rng.randint(0, 3)),
            "completed_at": created + timedelta(hours=1) if status == "completed" else None,
            "created_at": created,
            "updated_at": created,
        })
    return rows


@click.command("seed")
@with_appcontext
@click.option("--user", "user_id", required=True, help="The Better Auth user id (token `sub`).")
@click.option("--count", default=100, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--random-seed", type=int, default=None, help="Repeatable data.")
def seed(user_id: str, count: int, random_seed: int | None) -> None:
    """Write COUNT realistic tasks for a user, in bulk."""
    rng = random.Random(random_seed)
    rows = _seed_rows(user_id, count, rng)
    started = time.perf_counter()
    session = get_session()
    with click.progressbar(length=count, label="Seeding") as bar:
        for start in range(0, count, SEED_BATCH):
            batch = rows[start:start + SEED_BATCH]
            session.execute(insert(Task.__table__), batch)
            bar.update(len(batch))
    session.commit()
    click.echo(f"Wrote {count} tasks for {user_id} in {time.perf_counter() - started:.2f}s")


@click.command("token")
@with_appcontext
@click.option("--user", "user_id", required=True, help="The `sub` claim.")
@click.option("--email", default=None)
@click.option("--name", default=None)
@click.option("--ttl", default=3600, show_default=True, type=click.IntRange(1), help="Seconds until expiry.")
def token(user_id: str, email: str | None, name: str | None, ttl: int) -> None:
    """Print a development token signed with BETTER_AUTH_SECRET (HS256)."""
    click.echo(make_token(user_id, email=email, name=name, ttl=ttl))


def make_token(user_id: str, *, email: str | None = None, name: str | None = None, ttl: int = 3600) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl}
    claims.update({k: v for k, v in (("email", email), ("name", name)) if v is not None})
    return jwt.encode(claims, current_app.config["BETTER_AUTH_SECRET"], algorithm="HS256")


def init_app(app: Flask) -> None:
    app.cli.add_command(db_group)
    app.cli.add_command(seed)
    app.cli.add_command(token)

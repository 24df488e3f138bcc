"""Configuration from the environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from todo_api.config import ConfigError, check_secret, load_config, normalize_database_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@host/db", "postgresql+psycopg2://u:p@host/db"),
        ("postgresql://u:p@host/db", "postgresql+psycopg2://u:p@host/db"),
        ("postgresql+psycopg2://u:p@host/db", "postgresql+psycopg2://u:p@host/db"),
        ("postgresql://u:p@ep-x-pooler.neon.tech/db?sslmode=require&channel_binding=require",
         "postgresql+psycopg2://u:p@ep-x-pooler.neon.tech/db?sslmode=require&channel_binding=require"),
    ],
)
def test_database_urls_are_normalised_to_psycopg2_keeping_neon_parameters(url, expected):
    assert normalize_database_url(url) == expected


@pytest.mark.parametrize("name", ["DATABASE_URL", "MIGRATIONS_DATABASE_URL"])
@pytest.mark.parametrize("url", ["sqlite:////tmp/x.db", "sqlite://", "mysql://u@host/db", "host/db"])
def test_a_url_that_is_not_postgresql_stops_start_up_naming_the_variable(tmp_path, name, url):
    with pytest.raises(ConfigError, match=f"^{name} must be a PostgreSQL URL"):
        load_config({"DATABASE_URL": "postgresql://u@host/db", name: url})


def test_default_database_is_the_embedded_postgresql_of_make_run(tmp_path):
    config = load_config({})
    assert config["DATABASE_URL"] == "postgresql+psycopg2://postgres@127.0.0.1:54320/todo"
    assert config["APP_ENV"] == "development"
    moved = load_config({"EMBEDDED_POSTGRES_PORT": "6000"})
    assert moved["DATABASE_URL"] == "postgresql+psycopg2://postgres@127.0.0.1:6000/todo"


def test_production_without_database_url_stops_start_up(tmp_path):
    with pytest.raises(ConfigError, match="DATABASE_URL is required in production"):
        load_config({"APP_ENV": "production", "BETTER_AUTH_SECRET": "x" * 32})


def test_migrations_url_overrides_database_url(tmp_path):
    config = load_config({"DATABASE_URL": "postgres://pooled/db", "MIGRATIONS_DATABASE_URL": "postgres://direct/db"})
    assert config["DATABASE_URL"] == "postgresql+psycopg2://pooled/db"
    assert config["MIGRATIONS_DATABASE_URL"] == "postgresql+psycopg2://direct/db"


NEON_POOLED = "postgresql://u:p@ep-cool-sky-123456-pooler.us-east-2.aws.neon.tech/neondb?sslmode=require"
NEON_DIRECT = "postgresql+psycopg2://u:p@ep-cool-sky-123456.us-east-2.aws.neon.tech/neondb?sslmode=require"


def test_migrations_use_the_direct_twin_of_a_neon_pooled_database_url_and_say_so(tmp_path):
    config = load_config({"DATABASE_URL": NEON_POOLED})
    assert config["DATABASE_URL"] == NEON_POOLED.replace("postgresql:", "postgresql+psycopg2:")
    assert config["MIGRATIONS_DATABASE_URL"] == NEON_DIRECT
    assert "ep-cool-sky-123456.us-east-2.aws.neon.tech" in config["MIGRATIONS_DATABASE_URL_NOTE"]


def test_a_neon_pooled_migrations_url_stops_start_up_naming_the_direct_host(tmp_path):
    with pytest.raises(ConfigError, match=r"^MIGRATIONS_DATABASE_URL is Neon's pooled endpoint .*"
                                          r"use its direct endpoint, ep-cool-sky-123456\.us-east-2"):
        load_config({"DATABASE_URL": NEON_POOLED, "MIGRATIONS_DATABASE_URL": NEON_POOLED})


@pytest.mark.parametrize("url", ["postgresql://u@db.internal:6432/app", "postgresql://u@pooler.example.com/app",
                                 "postgresql://u@ep-x-pooler-db.example.com/app"])
def test_a_url_that_is_not_a_neon_pooled_host_is_migrated_as_given(tmp_path, url):
    config = load_config({"DATABASE_URL": url})
    assert config["MIGRATIONS_DATABASE_URL"] == normalize_database_url(url)
    assert config["MIGRATIONS_DATABASE_URL_NOTE"] is None


def test_lists_and_integers_are_parsed(tmp_path):
    config = load_config({"FRONTEND_URL": "https://a.com, https://b.com", "JWT_LEEWAY": "5",
                                    "JWT_AUDIENCE": "x,y", "DB_POOL_SIZE": "7"})
    assert config["FRONTEND_URL"] == ["https://a.com", "https://b.com"]
    assert config["JWT_AUDIENCE"] == ["x", "y"] and config["JWT_LEEWAY"] == 5 and config["DB_POOL_SIZE"] == 7


@pytest.mark.parametrize("env", [{"APP_ENV": "staging"}, {"JWT_LEEWAY": "soon"}])
def test_invalid_values_stop_start_up(tmp_path, env):
    with pytest.raises(ConfigError):
        load_config(env)


PRODUCTION = {"APP_ENV": "production", "DATABASE_URL": "postgresql://u@host/db"}


def test_production_without_secret_stops_start_up_naming_the_variable(tmp_path):
    config = load_config(PRODUCTION)
    with pytest.raises(ConfigError, match="BETTER_AUTH_SECRET"):
        check_secret(config, tmp_path)


def test_production_with_short_secret_stops_start_up(tmp_path):
    config = load_config({**PRODUCTION, "BETTER_AUTH_SECRET": "x" * 31})
    with pytest.raises(ConfigError, match="at least 32"):
        check_secret(config, tmp_path)


def test_production_with_strong_secret_starts(tmp_path):
    config = load_config({**PRODUCTION, "BETTER_AUTH_SECRET": "x" * 32})
    check_secret(config, tmp_path)
    assert not (tmp_path / "dev-secret").exists()


def test_development_generates_a_secret_once_and_keeps_it(tmp_path, caplog):
    first = load_config({})
    check_secret(first, tmp_path)
    second = load_config({})
    check_secret(second, tmp_path)
    assert len(first["BETTER_AUTH_SECRET"]) >= 32
    assert first["BETTER_AUTH_SECRET"] == second["BETTER_AUTH_SECRET"]
    assert (tmp_path / "dev-secret").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (PRODUCTION, "todo-api: BETTER_AUTH_SECRET"),
        ({"DATABASE_URL": "sqlite:////tmp/todo.db"}, "todo-api: DATABASE_URL must be a PostgreSQL URL"),
    ],
)
def test_wsgi_refuses_to_start_with_one_clear_line(env, message):
    env = {**env, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", "import wsgi"], env=env, capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert result.stderr.strip().startswith(message)

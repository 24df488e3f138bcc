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
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_database_urls_are_normalised_to_psycopg2_keeping_neon_parameters(url, expected):
    assert normalize_database_url(url) == expected


def test_default_database_is_sqlite_in_the_instance_folder(tmp_path):
    config = load_config(tmp_path, {})
    assert config["DATABASE_URL"] == f"sqlite:///{tmp_path / 'todo.db'}"
    assert config["APP_ENV"] == "development"


def test_migrations_url_overrides_database_url(tmp_path):
    config = load_config(tmp_path, {"DATABASE_URL": "postgres://pooled/db", "MIGRATIONS_DATABASE_URL": "postgres://direct/db"})
    assert config["DATABASE_URL"] == "postgresql+psycopg2://pooled/db"
    assert config["MIGRATIONS_DATABASE_URL"] == "postgresql+psycopg2://direct/db"


def test_lists_and_integers_are_parsed(tmp_path):
    config = load_config(tmp_path, {"FRONTEND_URL": "https://a.com, https://b.com", "JWT_LEEWAY": "5",
                                    "JWT_AUDIENCE": "x,y", "DB_POOL_SIZE": "7"})
    assert config["FRONTEND_URL"] == ["https://a.com", "https://b.com"]
    assert config["JWT_AUDIENCE"] == ["x", "y"] and config["JWT_LEEWAY"] == 5 and config["DB_POOL_SIZE"] == 7


@pytest.mark.parametrize("env", [{"APP_ENV": "staging"}, {"JWT_LEEWAY": "soon"}])
def test_invalid_values_stop_start_up(tmp_path, env):
    with pytest.raises(ConfigError):
        load_config(tmp_path, env)


def test_production_without_secret_stops_start_up_naming_the_variable(tmp_path):
    config = load_config(tmp_path, {"APP_ENV": "production"})
    with pytest.raises(ConfigError, match="BETTER_AUTH_SECRET"):
        check_secret(config, tmp_path)


def test_production_with_short_secret_stops_start_up(tmp_path):
    config = load_config(tmp_path, {"APP_ENV": "production", "BETTER_AUTH_SECRET": "x" * 31})
    with pytest.raises(ConfigError, match="at least 32"):
        check_secret(config, tmp_path)


def test_production_with_strong_secret_starts(tmp_path):
    config = load_config(tmp_path, {"APP_ENV": "production", "BETTER_AUTH_SECRET": "x" * 32})
    check_secret(config, tmp_path)
    assert not (tmp_path / "dev-secret").exists()


def test_development_generates_a_secret_once_and_keeps_it(tmp_path, caplog):
    first = load_config(tmp_path, {})
    check_secret(first, tmp_path)
    second = load_config(tmp_path, {})
    check_secret(second, tmp_path)
    assert len(first["BETTER_AUTH_SECRET"]) >= 32
    assert first["BETTER_AUTH_SECRET"] == second["BETTER_AUTH_SECRET"]
    assert (tmp_path / "dev-secret").stat().st_mode & 0o077 == 0


def test_wsgi_refuses_to_start_in_production_without_secret(tmp_path):
    env = {"APP_ENV": "production", "PATH": "/usr/bin:/bin", "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    result = subprocess.run([sys.executable, "-c", "import wsgi"], env=env, capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("todo-api: BETTER_AUTH_SECRET")
    assert "Traceback" not in result.stderr

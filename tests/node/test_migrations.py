"""Alembic migrations: they build the schema on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from node.db import alembic_config, make_engine, migrate
from node.schema import Base

TABLES = {"studies", "series", "instances", "jobs", "results", "result_objects", "deliveries", "events", "audit_log"}


def test_migrations_match_the_models(database_url: str) -> None:
    migrate(database_url)
    engine = make_engine(database_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == []


def test_migrations_go_down_and_up_again(database_url: str) -> None:
    migrate(database_url)
    migrate(database_url)  # idempotent: every start runs it
    engine = make_engine(database_url)
    assert TABLES <= set(inspect(engine).get_table_names())
    command.downgrade(alembic_config(database_url), "base")
    assert not TABLES & set(inspect(engine).get_table_names())
    migrate(database_url)
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()

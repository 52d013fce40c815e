"""Database engines, sessions and migrations, for SQLite (embedded) and PostgreSQL alike."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations

LOGGER = logging.getLogger(__name__)


def make_engine(database_url: str) -> Engine:
    """Create the one engine of a process.

    SQLite gets WAL, synchronous=FULL (a committed row survives power loss), a busy timeout
    and BEGIN IMMEDIATE, so several receiving processes queue for the write lock instead of
    failing with "database is locked".
    """
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 60})
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_begin_immediate)
    return engine


class WriterLock(AbstractContextManager[None]):
    """A blocking ``flock`` that queues a SQLite database's busiest writers across processes.

    A writer that finds SQLite's lock taken sleeps 1, 2, 5, 10... ms between tries (its busy
    handler); one blocked in ``flock`` wakes the moment the lock is released. The file is opened
    per use and closing it releases the lock, so no descriptor outlives a commit. For one thread
    at a time (the commit thread of a receiving process).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._fd)
            raise

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def writer_lock(engine: Engine) -> AbstractContextManager[None]:
    """The :class:`WriterLock` of a SQLite database file (``<file>.writers``); a no-op otherwise."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return nullcontext()
    return WriterLock(Path(f"{url.database}.writers"))


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # let SQLAlchemy's "begin" hook emit BEGIN itself
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    """Writers take the lock up front; a read-only connection may ask for DEFERRED instead."""
    connection.exec_driver_sql(f"BEGIN {connection.get_execution_options().get('sqlite_begin', 'IMMEDIATE')}")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (we read them back to print)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with sessions() as session, session.begin():
        yield session


@contextmanager
def reading(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session that only reads: on SQLite it does not take the write lock (BEGIN DEFERRED)."""
    with sessions() as session:
        session.connection(execution_options={"sqlite_begin": "DEFERRED"})
        yield session


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``migrations/``, usable from an installed package."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str) -> None:
    """Bring the database to the newest schema (idempotent; run at every start)."""
    LOGGER.debug("migrating database schema to head")
    command.upgrade(alembic_config(database_url), "head")


def dialect_insert(conn: Connection, table: Table) -> Any:
    """An INSERT for this connection's database, with its ON CONFLICT clause (PostgreSQL, SQLite)."""
    inserts: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
    if conn.dialect.name not in inserts:
        raise NotImplementedError(f"unsupported database: {conn.dialect.name}")
    return inserts[conn.dialect.name](table)


def insert_ignore(conn: Connection, table: Table, values: dict[str, Any], unique_column: str) -> int | None:
    """INSERT a row unless one with the same ``unique_column`` exists; return the new id or None.

    Uses ON CONFLICT DO NOTHING, so concurrent receivers never fail on a duplicate key.
    """
    stmt = dialect_insert(conn, table).values(**values).on_conflict_do_nothing(index_elements=[unique_column])
    return conn.scalar(stmt.returning(table.c.id))

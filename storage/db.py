"""Engines and sessions for both backends.

SQLite (the embedded default) runs in WAL mode and every transaction begins IMMEDIATE, so two
writers queue on SQLite's lock instead of failing half-way with "database is locked" on upgrade.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 30_000


def create_engine(database_url: str, *, pool_size: int = 10, read_only: bool = False) -> AsyncEngine:
    """`read_only` matters on SQLite only: its readers begin DEFERRED (WAL readers never block
    the writer, nor each other) and refuse to write by PRAGMA, so a read can never take the
    write lock that actors need."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(database_url, read_only=read_only)
    # No pre-ping: it costs a round trip on every checkout, a third of a short transaction.
    # A connection that died meanwhile fails its transaction, which the runtime retries.
    # Last in, first out: a quiet process keeps reusing its most recently used connection, whose
    # server backend is still warm and has this process's statements prepared, instead of
    # cycling through every connection a past burst opened.
    return create_async_engine(
        database_url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False, pool_use_lifo=True
    )


def _create_sqlite_engine(database_url: str, *, read_only: bool) -> AsyncEngine:
    url = make_url(database_url)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    # SQLite has one writer at a time, and its busy handler waits by sleeping in growing steps
    # (up to 100 ms a try). One pooled writer connection makes writers queue on the pool in
    # arrival order instead, with no sleeping; readers get a pool of their own.
    pool = {} if read_only else {"pool_size": 1, "max_overflow": 0, "pool_timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    engine = create_async_engine(
        database_url,
        connect_args={"isolation_level": None, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        **pool,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection):
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def insert_unless_exists(dialect_name: str, model, values: dict, unique_columns: list[str]):
    """INSERT … ON CONFLICT DO NOTHING on either backend: the row is created once, whoever of
    several concurrent writers commits first."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return dialect.insert(model).values(**values).on_conflict_do_nothing(index_elements=unique_columns)

"""Throwaway databases for tests and benchmarks: a fresh PostgreSQL database per use."""

from __future__ import annotations

import os
import uuid

POSTGRES_ADMIN_DSN = os.environ.get("TEST_POSTGRES_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def create_postgres_database(prefix: str = "pb_test") -> tuple[str, str]:
    """Create an empty database; returns (name, SQLAlchemy asyncpg URL)."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return name, f"{base}/{name}"


async def drop_postgres_database(name: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def isolated_redis_url(db: int) -> str:
    """A Redis database of its own, emptied, so leftovers of another run cannot leak in."""
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url

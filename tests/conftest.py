"""Shared fixtures: a fresh database per test on SQLite (always) or PostgreSQL (marked), and a
runtime that drains in-process so actor tests need no Dramatiq worker."""

from __future__ import annotations

import contextlib

import pytest

from powerbank.actors.bus import LocalBus
from powerbank.actors.dispatch import LoopDispatcher
from powerbank.actors.runtime import AdvisoryLocks, ProcessLocks, Runtime
from powerbank.storage.db import create_engine, session_factory
from powerbank.storage.models import Base

# Importing the actor modules registers their handlers.
import powerbank.actors.rental  # noqa: E402,F401
import powerbank.actors.wallet  # noqa: E402,F401
import powerbank.actors.wallet_payments  # noqa: E402,F401
import powerbank.actors.wallet_rewards  # noqa: E402,F401
from powerbank.storage.testing import create_postgres_database, drop_postgres_database  # noqa: E402
from powerbank.http.app import create_app  # noqa: E402
from powerbank.http.testing import TEST_AUTH_POLICY, client_for, running_services, settings_for_tests  # noqa: E402
from powerbank.storage.seed import ensure_defaults  # noqa: E402


@pytest.fixture
async def sqlite_url(tmp_path):
    return f"sqlite+aiosqlite:///{tmp_path / 'test.sqlite3'}"


@pytest.fixture
async def postgres_url():
    name, url = await create_postgres_database()
    try:
        yield url
    finally:
        await drop_postgres_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request, tmp_path):
    """Runs a test on both backends."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.sqlite3'}"
        return
    name, url = await create_postgres_database()
    try:
        yield url
    finally:
        await drop_postgres_database(name)


@contextlib.asynccontextmanager
async def engine_with_tables(url: str):
    engine = create_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    try:
        yield engine
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def runtime_on(engine):
    """The runtime as services.build_services wires it for this backend, draining in-process."""
    dispatcher = LoopDispatcher()
    is_sqlite = engine.dialect.name == "sqlite"
    locks = ProcessLocks() if is_sqlite else AdvisoryLocks()
    rt = Runtime(
        session_factory(engine), bus=LocalBus(), dispatcher=dispatcher, locks=locks, single_writer=is_sqlite,
        apply_in_caller=not is_sqlite,
    )
    dispatcher.runtime = rt
    rt.test_dispatcher = dispatcher  # type: ignore[attr-defined]
    try:
        yield rt
    finally:
        await dispatcher.settle()


@pytest.fixture
async def engine(database_url):
    async with engine_with_tables(database_url) as engine:
        yield engine


@pytest.fixture
async def runtime(engine):
    async with runtime_on(engine) as rt:
        yield rt


@pytest.fixture
async def pg_runtime(postgres_url):
    """The runtime on PostgreSQL only, for what needs its advisory locks (leases, SKIP LOCKED)."""
    async with engine_with_tables(postgres_url) as engine, runtime_on(engine) as rt:
        yield rt


# --- the HTTP app with reference data and sample content (tests/test_http_*.py) ----------------


@pytest.fixture
async def app_services(tmp_path):
    """Services on SQLite (the embedded default) with the seeded packages, config and content."""
    async with running_services(settings_for_tests(tmp_path)) as services:
        await ensure_defaults(services.sessions, "NPR")
        yield services


@pytest.fixture
async def app(app_services):
    return create_app(app_services, auth_policy=TEST_AUTH_POLICY)


@pytest.fixture
async def app_client(app):
    async with client_for(app) as client:
        yield client


@pytest.fixture
async def both_app_services(database_url, tmp_path):
    """As `app_services`, once on SQLite and once (marked) on PostgreSQL."""
    async with running_services(settings_for_tests(tmp_path, database_url)) as services:
        await ensure_defaults(services.sessions, "NPR")
        yield services


@pytest.fixture
async def both_app_client(both_app_services):
    async with client_for(create_app(both_app_services, auth_policy=TEST_AUTH_POLICY)) as client:
        yield client

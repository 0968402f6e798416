"""The process's shared parts, built once from settings: storage, the bus, the actor runtime."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from powerbank.actors.bus import LocalBus, RedisBus
from powerbank.actors.runtime import AdvisoryLocks, ProcessLocks, Runtime, install
from powerbank.config import Settings
from powerbank.storage.db import create_engine, session_factory


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    # For reads that never write: on SQLite they skip the write lock (see storage.db).
    readonly: async_sessionmaker[AsyncSession]
    bus: LocalBus | RedisBus
    runtime: Runtime

    async def close(self) -> None:
        await self.bus.close()
        await self.engine.dispose()
        if self.readonly.kw["bind"] is not self.engine:
            await self.readonly.kw["bind"].dispose()


def build_services(settings: Settings, *, dispatcher=None, outbox_sink=None) -> Services:
    """Wire storage, bus and runtime. The dispatcher (Dramatiq) and the outbox sink (MQTT) are
    attached by the process that has them; see powerbank.processes."""
    engine = create_engine(settings.database_url, pool_size=settings.db_pool_size)
    sessions = session_factory(engine)
    is_sqlite = engine.dialect.name == "sqlite"
    reader = create_engine(settings.database_url, read_only=True) if is_sqlite else engine
    bus = RedisBus(settings.redis_url) if settings.redis_url else LocalBus()
    locks = ProcessLocks() if is_sqlite else AdvisoryLocks()
    runtime = install(
        Runtime(
            sessions,
            bus=bus,
            dispatcher=dispatcher,
            outbox_sink=outbox_sink,
            locks=locks,
            single_writer=is_sqlite,
            apply_in_caller=not is_sqlite,
        )
    )
    # The Station actor takes its timings (eject deadline, heartbeat interval) and the bank
    # currency from these settings rather than re-reading the environment.
    from powerbank.actors import station as station_actor

    station_actor.configure(settings)
    return Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        readonly=session_factory(reader),
        bus=bus,
        runtime=runtime,
    )

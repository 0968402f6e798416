"""A whole station side in one process, for tests: database, runtime, MQTT broker and bridge.

`station_stack()` runs against the embedded broker on a free port, or against an external
broker (the machine's Mosquitto) under a topic root of its own, so parallel test runs sharing
that broker never see each other's stations.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from powerbank.actors import station as station_actor
from powerbank.actors.bus import LocalBus
from powerbank.actors.dispatch import LoopDispatcher
from powerbank.actors.runtime import AdvisoryLocks, ProcessLocks, Runtime
from powerbank.broker.bridge import StationBridge
from powerbank.broker.embedded import EmbeddedBroker, start_embedded_broker
from powerbank.broker.protocol import Topics
from powerbank.config import Settings
from powerbank.storage.db import create_engine, session_factory
from powerbank.storage.models import Base

MOSQUITTO_URL = "mqtt://127.0.0.1:1883"


def broker_reachable(url: str = MOSQUITTO_URL, timeout_s: float = 0.5) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 1883), timeout_s):
            return True
    except OSError:
        return False


@dataclass
class StationStack:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    runtime: Runtime
    dispatcher: LoopDispatcher
    bridge: StationBridge
    topics: Topics
    broker_url: str  # without credentials: simulators add their own
    embedded: EmbeddedBroker | None


def stack_settings(data_dir: Path, database_url: str | None = None, **overrides) -> Settings:
    base = Settings(
        database_url=database_url or f"sqlite+aiosqlite:///{data_dir / 'stations.sqlite3'}",
        redis_url=None,
        mqtt_url=None,
        jwt_secret=secrets.token_urlsafe(16),
        data_dir=data_dir,
        mqtt_host="127.0.0.1",
        mqtt_port=0,
        bridge_password=secrets.token_urlsafe(16),
    )
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def station_stack(
    data_dir: Path,
    *,
    broker: str = "embedded",
    database_url: str | None = None,
    external_url: str = MOSQUITTO_URL,
    drain_kinds: Iterable[str] = ("station",),
    **settings_overrides,
) -> AsyncIterator[StationStack]:
    """Database (created from the models), runtime, broker and a connected bridge. The Station
    actor's policy is set for the stack's settings and topic root, and restored afterwards."""
    settings = stack_settings(data_dir, database_url, **settings_overrides)
    topics = Topics("pb") if broker == "embedded" else Topics(f"pbtest-{uuid.uuid4().hex[:10]}")
    previous_policy = station_actor._policy
    station_actor.configure(settings, topics=topics)
    engine = create_engine(settings.database_url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    sessions = session_factory(engine)
    dispatcher = LoopDispatcher(drain_kinds)
    locks = ProcessLocks() if engine.dialect.name == "sqlite" else AdvisoryLocks()
    runtime = Runtime(sessions, bus=LocalBus(), dispatcher=dispatcher, locks=locks)
    dispatcher.runtime = runtime
    embedded = None
    bridge = None
    stack = None
    try:
        if broker == "embedded":
            embedded = await start_embedded_broker(settings, sessions, topics=topics)
            broker_url = embedded.url
            bridge_url = f"mqtt://{settings.bridge_username}:{settings.bridge_password}@127.0.0.1:{embedded.port}"
        else:
            broker_url = bridge_url = external_url
        bridge = StationBridge(settings, runtime, sessions, url=bridge_url, topics=topics)
        runtime.outbox_sink = bridge
        await bridge.start(wait_s=10)
        stack = StationStack(settings, engine, sessions, runtime, dispatcher, bridge, topics, broker_url, embedded)
        yield stack
    finally:
        # Stop what submits first, then let the drains finish, then take storage away.
        if bridge is not None:
            await bridge.stop()
        await dispatcher.close()
        if embedded is not None:
            await embedded.stop()
        if stack is not None and stack.embedded is not None:
            await stack.embedded.stop()  # a test may have swapped in a restarted broker
        await engine.dispose()
        station_actor._policy = previous_policy

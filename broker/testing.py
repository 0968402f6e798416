"""A whole station side in one process, for tests: database, runtime, MQTT broker and bridge.

`station_stack()` runs against the embedded broker on a free port, or against an external
broker (the machine's Mosquitto) under a topic root of its own, so parallel test runs sharing
that broker never see each other's stations.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import secrets
import shutil
import socket
import subprocess
import time
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
from powerbank.broker.mosquitto import RECOMMENDED_SETTINGS, acl_file_text
from powerbank.broker.protocol import Topics
from powerbank.config import Settings
from powerbank.storage.db import create_engine, session_factory
from powerbank.storage.models import Base

MOSQUITTO_URL = "mqtt://127.0.0.1:1883"
log = logging.getLogger(__name__)


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

    @property
    def bridge_login_url(self) -> str:
        """A URL that logs in as the backend does (on the embedded broker only the bridge login
        may publish commands; the shared Mosquitto takes anyone)."""
        if self.embedded is None:
            return self.broker_url
        host_port = self.broker_url.split("://", 1)[1]
        return f"mqtt://{self.settings.bridge_username}:{self.settings.bridge_password}@{host_port}"


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
    scheduler_tick_s: float | None = None,
    **settings_overrides,
) -> AsyncIterator[StationStack]:
    """Database (created from the models), runtime, broker and a connected bridge. The Station
    actor's policy is set for the stack's settings and topic root, and restored afterwards.
    With `scheduler_tick_s`, eject deadlines are enforced too, as the scheduler role does."""
    settings = stack_settings(data_dir, database_url, **settings_overrides)
    topics = Topics("pb") if broker == "embedded" else Topics(f"pbtest-{uuid.uuid4().hex[:10]}")
    previous_policy = station_actor._policy
    station_actor.configure(settings, topics=topics)
    engine = create_engine(settings.database_url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    sessions = session_factory(engine)
    reader = create_engine(settings.database_url, read_only=True) if engine.dialect.name == "sqlite" else engine
    readonly = session_factory(reader)
    dispatcher = LoopDispatcher(drain_kinds)
    locks = ProcessLocks() if engine.dialect.name == "sqlite" else AdvisoryLocks()
    runtime = Runtime(sessions, bus=LocalBus(), dispatcher=dispatcher, locks=locks)
    dispatcher.runtime = runtime
    embedded = None
    bridge = None
    stack = None
    scheduler = None
    try:
        if broker == "embedded":
            embedded = await start_embedded_broker(settings, sessions, topics=topics, readonly=readonly)
            broker_url = embedded.url
            bridge_url = f"mqtt://{settings.bridge_username}:{settings.bridge_password}@127.0.0.1:{embedded.port}"
        else:
            broker_url = bridge_url = external_url
        bridge = StationBridge(settings, runtime, sessions, url=bridge_url, topics=topics, readonly=readonly)
        runtime.outbox_sink = bridge
        await bridge.start(wait_s=10)
        stack = StationStack(settings, engine, sessions, runtime, dispatcher, bridge, topics, broker_url, embedded)
        if scheduler_tick_s:
            scheduler = asyncio.create_task(_expire_ejects_forever(runtime, scheduler_tick_s))
        yield stack
    finally:
        # Stop what submits first, then let the drains finish, then take storage away.
        if scheduler is not None:
            scheduler.cancel()
            await asyncio.gather(scheduler, return_exceptions=True)
        if bridge is not None:
            await bridge.stop()
        await dispatcher.close()
        if embedded is not None:
            await embedded.stop()
        if stack is not None and stack.embedded is not None:
            await stack.embedded.stop()  # a test may have swapped in a restarted broker
        await engine.dispose()
        if reader is not engine:
            await reader.dispose()
        station_actor._policy = previous_policy


async def _expire_ejects_forever(runtime: Runtime, tick_s: float) -> None:
    """The scheduler's eject-deadline job (scheduler.run_scheduler runs it every tick)."""
    while True:
        try:
            await station_actor.expire_overdue_ejects(runtime)
        except Exception:  # the next tick retries, as the scheduler does
            log.exception("expiring ejects failed")
        await asyncio.sleep(tick_s)


# --- a Mosquitto of one's own ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None and shutil.which("mosquitto_passwd") is not None


@contextlib.asynccontextmanager
async def private_mosquitto(
    work_dir: Path, logins: dict[str, str], *, bridge_username: str, topics: Topics
) -> AsyncIterator[str]:
    """A Mosquitto process on a free port configured the way docs/station-protocol.md asks of an
    external broker: no anonymous clients, these logins (username -> password, hashed by
    mosquitto_passwd) and the station ACL from `acl_file_text`. Yields its URL (no
    credentials); the process is stopped on exit. The machine's shared Mosquitto allows
    anonymous clients, so tests of authentication and ACLs need their own."""
    work_dir.mkdir(parents=True, exist_ok=True)
    passwords, acl, config = work_dir / "passwd", work_dir / "acl", work_dir / "mosquitto.conf"
    passwords.write_text("".join(f"{user}:{password}\n" for user, password in logins.items()))
    passwords.chmod(0o600)
    subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True, capture_output=True)
    acl.write_text(acl_file_text(topics, bridge_username))
    port = free_port()
    config.write_text(
        # `user`: started as root Mosquitto would switch to its own user, who cannot read a
        # test's private directory; for anyone else the line has no effect.
        f"user {getpass.getuser()}\n"
        f"listener {port} 127.0.0.1\n{RECOMMENDED_SETTINGS}password_file {passwords}\nacl_file {acl}\n"
        "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n"
    )
    log_path = work_dir / "mosquitto.log"
    with log_path.open("w") as output:
        process = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=output, stderr=subprocess.STDOUT)
    try:
        await _wait_for_port(port, process, log_path)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


async def _wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not broker_reachable(f"mqtt://127.0.0.1:{port}", 0.2):
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"mosquitto did not listen on {port}")
        await asyncio.sleep(0.05)

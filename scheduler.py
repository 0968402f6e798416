"""The scheduler: timers and recovery jobs, acted on by one process at a time.

Every job only finds what is due and submits commands with ids derived from what it found
(`expire:<eject>`, `overdue:<rental>`, ...), so running a job twice, or in two processes, is a
duplicate the runtime answers with the first result. The leader lease is there anyway: two
schedulers sweeping the same tables double the database work for nothing, and a job that talks
to the outside (a payment provider) should not run twice at once.

The lease is a PostgreSQL session advisory lock held on a connection of its own. A leader that
dies (even by SIGKILL) closes that connection and PostgreSQL drops the lock at once; the other
schedulers try every tick, so one takes over within a tick or two. A leader that loses its
connection (database restart) stops acting until it wins the lock again. On SQLite (the embedded
default) there is one process, which always leads.

Every job takes the time it judges by (`now`), so tests run the sweeps on a clock they control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from powerbank.actors.runtime import Runtime, lock_key
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

TICK_S = 0.5
# Jobs that scan large tables run every N ticks; eject deadlines (seconds) run every tick.
SLOW_EVERY_TICKS = 10
SYSTEM_LOG_RETENTION = timedelta(days=30)


class AdvisoryLease:
    """Leadership as a PostgreSQL session advisory lock on a dedicated connection."""

    def __init__(self, engine: AsyncEngine, name: str = "scheduler") -> None:
        self.engine = engine
        self.key = lock_key("lease", name)
        self._connection: AsyncConnection | None = None

    @property
    def held(self) -> bool:
        return self._connection is not None

    async def acquire(self) -> bool:
        """True while this process leads: still holding the lock (checked on its connection),
        or just won it."""
        if self._connection is not None:
            try:
                await self._connection.execute(text("SELECT 1"))
                return True
            except Exception:  # the connection died, and the lock with it
                log.warning("scheduler lease lost with its connection")
                await self._drop()
        connection = await self.engine.connect()
        try:
            won = (await connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key})).scalar_one()
            await connection.commit()  # the lock is the session's; no transaction stays open
        except Exception:
            await connection.close()
            raise
        if not won:
            await connection.close()
            return False
        self._connection = connection
        log.info("scheduler lease won")
        return True

    async def release(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            await self._drop()

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


class SoleLease:
    """One process owns the database (SQLite): it always leads."""

    held = True

    async def acquire(self) -> bool:
        return True

    async def release(self) -> None:
        return None


def lease_for(engine: AsyncEngine) -> AdvisoryLease | SoleLease:
    return AdvisoryLease(engine) if engine.dialect.name == "postgresql" else SoleLease()


Job = Callable[[Runtime, datetime], Awaitable[int]]


@dataclass(frozen=True)
class Jobs:
    """What runs every tick, and what runs every SLOW_EVERY_TICKS ticks."""

    every_tick: tuple[Job, ...]
    slow: tuple[Job, ...]


def default_jobs(ending_soon_minutes: int | None = None) -> Jobs:
    from powerbank.actors import rental
    from powerbank.actors.notifications import deliver_notifications
    from powerbank.actors.rental import mark_lost_rentals, mark_overdue_rentals
    from powerbank.actors.station import expire_overdue_ejects, expire_reservations, mark_silent_stations_offline
    from powerbank.actors.user_events import prune_user_events
    from powerbank.actors.wallet import expire_orphaned_holds

    async def ring_stalled(runtime: Runtime, now: datetime) -> int:
        return await runtime.ring_stalled()

    async def flush_outbox(runtime: Runtime, now: datetime) -> int:
        return await runtime.flush_outbox()

    async def remind_rentals_ending_soon(runtime: Runtime, now: datetime) -> int:
        return await rental.remind_rentals_ending_soon(runtime, now, ending_soon_minutes)

    async def recompute_leaderboards(runtime: Runtime, now: datetime) -> int:
        """The boards are snapshots a read would otherwise refresh when stale; refreshing them
        here keeps reads a plain indexed query."""
        from powerbank.http.routes_social import LEADERBOARD_PERIODS, leaderboard_is_stale, recompute_leaderboard

        refreshed = 0
        for period in LEADERBOARD_PERIODS:
            async with runtime.sessions.begin() as session:
                if await leaderboard_is_stale(session, period, now):
                    await recompute_leaderboard(session, period, now)
                    refreshed += 1
        return refreshed

    async def prune_system_logs(runtime: Runtime, now: datetime) -> int:
        """SystemLog keeps SYSTEM_LOG_RETENTION: enough to look back on an incident."""
        from sqlalchemy import delete

        from powerbank.storage.models import SystemLog

        async with runtime.sessions.begin() as session:
            result = await session.execute(delete(SystemLog).where(SystemLog.created_at < now - SYSTEM_LOG_RETENTION))
            return result.rowcount or 0

    # Deliveries every tick: a push saying the rental started is useless a minute late.
    return Jobs(
        every_tick=(expire_overdue_ejects, expire_reservations, deliver_notifications),
        slow=(mark_silent_stations_offline, mark_overdue_rentals, mark_lost_rentals, remind_rentals_ending_soon,
              ring_stalled, flush_outbox, prune_user_events, expire_orphaned_holds, recompute_leaderboards,
              prune_system_logs),
    )


async def run_jobs(runtime: Runtime, jobs: tuple[Job, ...], now: datetime) -> dict[str, int]:
    """Each job once; one failing job does not stop the others (it runs again next time)."""
    found: dict[str, int] = {}
    for job in jobs:
        try:
            found[job.__name__] = await job(runtime, now)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("scheduler job %s failed; it runs again next time", job.__name__)
    return found


async def run_scheduler(
    runtime: Runtime, lease, *, jobs: Jobs | None = None, clock: Callable[[], datetime] = utcnow, tick_s: float = TICK_S,
) -> None:
    """Until cancelled: while leading, run the jobs on `clock`'s time; otherwise keep trying to
    lead."""
    jobs = jobs or default_jobs()
    tick = 0
    try:
        while True:
            try:
                leading = await lease.acquire()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler could not reach the database for its lease")
                leading = False
            if leading:
                now = clock()
                await run_jobs(runtime, jobs.every_tick, now)
                if tick % SLOW_EVERY_TICKS == 0:
                    await run_jobs(runtime, jobs.slow, now)
                tick += 1
            await asyncio.sleep(tick_s)
    finally:
        await lease.release()

"""The scheduler: overdue and lost-bank sweeps on a controlled clock, each acting exactly once
even with two schedulers running, and the leader lease handing over when the leader dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

import powerbank.actors.rental  # noqa: F401  (registers MarkOverdue, MarkLost)
import powerbank.actors.wallet  # noqa: F401  (registers OpenWallet, CaptureHold)
from powerbank import scheduler
from powerbank.actors.rental import mark_lost_rentals, mark_overdue_rentals
from powerbank.storage.db import create_engine
from powerbank.storage.models import ActorCommand, PowerBank, Rental, RentalPackage, Station, User

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc)


async def open_rental(runtime, *, started_at: datetime, duration_minutes=60, max_minutes=24 * 60) -> str:
    async with runtime.sessions.begin() as session:
        user = User(phone=f"+9779{uuid.uuid4().int % 10**9:09d}", referral_code=uuid.uuid4().hex[:10])
        station = Station(serial=uuid.uuid4().hex[:12], name="s", latitude=0, longitude=0, slot_count=4)
        package = RentalPackage(code=uuid.uuid4().hex[:10], name="p", duration_minutes=duration_minutes, price_minor=100,
                                currency="NPR", max_duration_minutes=max_minutes)
        bank = PowerBank(serial=uuid.uuid4().hex[:12], status="rented", currency="NPR", price_minor=2000)
        session.add_all([user, station, package, bank])
        await session.flush()
        rental = Rental(user_id=user.id, station_id=station.id, package_id=package.id, power_bank_id=bank.id, currency="NPR",
                        status="active", started_at=started_at, due_at=started_at + timedelta(minutes=duration_minutes))
        session.add(rental)
    await runtime.call("wallet", str(user.id), "OpenWallet", {"currency": "NPR"}, f"open:{user.id}")
    return str(rental.id)


async def status_of(runtime, rental_id: str) -> str:
    async with runtime.sessions() as session:
        return (await session.get(Rental, uuid.UUID(rental_id))).status


async def commands(runtime, name: str, rental_id: str) -> int:
    async with runtime.sessions() as session:
        return await session.scalar(select(func.count()).select_from(ActorCommand).where(
            ActorCommand.kind == "rental", ActorCommand.entity_id == rental_id, ActorCommand.name == name))


async def test_a_rental_turns_overdue_then_lost_on_the_schedulers_clock(runtime):
    rental_id = await open_rental(runtime, started_at=T0, duration_minutes=60, max_minutes=180)
    sweep = (mark_overdue_rentals, mark_lost_rentals)

    assert await scheduler.run_jobs(runtime, sweep, T0 + timedelta(minutes=59)) == {"mark_overdue_rentals": 0, "mark_lost_rentals": 0}
    await runtime.test_dispatcher.settle()
    assert await status_of(runtime, rental_id) == "active"

    assert (await scheduler.run_jobs(runtime, sweep, T0 + timedelta(minutes=61)))["mark_overdue_rentals"] == 1
    await runtime.test_dispatcher.settle()
    assert await status_of(runtime, rental_id) == "overdue"

    assert (await scheduler.run_jobs(runtime, sweep, T0 + timedelta(minutes=179)))["mark_lost_rentals"] == 0
    assert (await scheduler.run_jobs(runtime, sweep, T0 + timedelta(minutes=181)))["mark_lost_rentals"] == 1
    await runtime.test_dispatcher.settle()
    assert await status_of(runtime, rental_id) == "lost"
    async with runtime.sessions() as session:
        rental = await session.get(Rental, uuid.UUID(rental_id))
    assert rental.fee_minor > 2000  # the rental up to the maximum, plus the bank
    # Sweeping again finds nothing more to do, and every command was sent once.
    assert await scheduler.run_jobs(runtime, sweep, T0 + timedelta(minutes=240)) == {"mark_overdue_rentals": 0, "mark_lost_rentals": 0}
    assert (await commands(runtime, "MarkOverdue", rental_id), await commands(runtime, "MarkLost", rental_id)) == (1, 1)


async def test_a_repeated_sweep_is_a_duplicate_not_a_second_effect(runtime):
    rental_id = await open_rental(runtime, started_at=T0)
    late = T0 + timedelta(hours=2)
    for _ in range(3):
        await scheduler.run_jobs(runtime, (mark_overdue_rentals,), late)
    await runtime.test_dispatcher.settle()
    assert await status_of(runtime, rental_id) == "overdue"
    assert await commands(runtime, "MarkOverdue", rental_id) == 1


class CountingJobs:
    """Jobs that record which scheduler ran them, on top of the real sweeps."""

    def __init__(self, name: str, log: list[str]) -> None:
        async def recorded(runtime, now):
            log.append(name)
            return 0

        self.jobs = scheduler.Jobs(every_tick=(recorded,), slow=(mark_overdue_rentals, mark_lost_rentals))


@pytest.mark.postgres
async def test_two_schedulers_one_acts_and_the_other_takes_over_when_it_stops(pg_runtime):
    runtime = pg_runtime
    rental_id = await open_rental(runtime, started_at=T0)
    engine = runtime.sessions.kw["bind"]
    ran: list[str] = []
    clock = lambda: T0 + timedelta(hours=2)  # noqa: E731
    first_lease, second_lease = scheduler.AdvisoryLease(engine, "test"), scheduler.AdvisoryLease(engine, "test")
    first = asyncio.create_task(scheduler.run_scheduler(runtime, first_lease, jobs=CountingJobs("first", ran).jobs, clock=clock, tick_s=0.05))
    await asyncio.sleep(0.3)
    second = asyncio.create_task(scheduler.run_scheduler(runtime, second_lease, jobs=CountingJobs("second", ran).jobs, clock=clock, tick_s=0.05))
    await asyncio.sleep(0.5)
    assert set(ran) == {"first"} and first_lease.held and not second_lease.held
    await runtime.test_dispatcher.settle()
    assert await status_of(runtime, rental_id) == "overdue"
    assert await commands(runtime, "MarkOverdue", rental_id) == 1

    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    ran.clear()
    await asyncio.sleep(0.5)
    assert set(ran) == {"second"} and second_lease.held
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert await commands(runtime, "MarkOverdue", rental_id) == 1


LEADER = textwrap.dedent("""
    import asyncio, sys
    from powerbank import scheduler
    from powerbank.storage.db import create_engine

    async def main():
        lease = scheduler.AdvisoryLease(create_engine(sys.argv[1]), "kill-test")
        while not await lease.acquire():
            await asyncio.sleep(0.05)
        print("leading", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


@pytest.mark.postgres
async def test_killing_the_leader_hands_the_lease_over_within_seconds(postgres_url):
    leader = subprocess.Popen([sys.executable, "-c", LEADER, postgres_url], stdout=subprocess.PIPE, text=True)
    engine = create_engine(postgres_url)
    follower = scheduler.AdvisoryLease(engine, "kill-test")
    try:
        assert (await asyncio.to_thread(leader.stdout.readline)).strip() == "leading"
        assert not await follower.acquire()
        os.kill(leader.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while not await follower.acquire():
            assert time.monotonic() - killed_at < 5, "the lease was not handed over within 5 s"
            await asyncio.sleep(0.05)
        print(f"handover after {time.monotonic() - killed_at:.3f} s")
    finally:
        leader.kill()
        leader.wait()
        leader.stdout.close()
        await follower.release()
        await engine.dispose()


async def test_the_default_jobs_remind_with_the_configured_lead_and_deliver_every_tick(runtime):
    from powerbank.storage.models import Notification

    assert "deliver_notifications" in [job.__name__ for job in scheduler.default_jobs().every_tick]
    rental_id = await open_rental(runtime, started_at=T0, duration_minutes=60)
    twenty_before = T0 + timedelta(minutes=40)
    assert (await scheduler.run_jobs(runtime, scheduler.default_jobs().slow, twenty_before))["remind_rentals_ending_soon"] == 0
    assert (await scheduler.run_jobs(runtime, scheduler.default_jobs(30).slow, twenty_before))["remind_rentals_ending_soon"] == 1
    await runtime.test_dispatcher.settle()
    assert await commands(runtime, "RemindEndingSoon", rental_id) == 1
    async with runtime.sessions() as session:
        kinds = (await session.execute(select(Notification.kind))).scalars().all()
    assert kinds == ["rental_ending_soon"]


async def pending_reservation_held(runtime, *, hold_s: int) -> str:
    """A station with one bank, and a reservation holding it for `hold_s` from now."""
    import powerbank.actors.station  # noqa: F401  (registers ReserveSlot)
    from powerbank.storage.models import Reservation, StationSlot

    async with runtime.sessions.begin() as session:
        user = User(phone=f"+9779{uuid.uuid4().int % 10**9:09d}", referral_code=uuid.uuid4().hex[:10])
        station = Station(serial=uuid.uuid4().hex[:12], name="s", latitude=0, longitude=0, slot_count=1, status="online",
                          last_seen_at=T0)
        session.add_all([user, station])
        await session.flush()
        bank = PowerBank(serial=uuid.uuid4().hex[:12], status="in_slot", currency="NPR", charge_percent=90, station_id=station.id)
        session.add(bank)
        await session.flush()
        session.add(StationSlot(station_id=station.id, slot_number=1, status="occupied", power_bank_id=bank.id))
        reservation = Reservation(user_id=user.id, station_id=station.id, status="pending")
        session.add(reservation)
    await runtime.call("station", str(station.id), "ReserveSlot", {"reservation_id": str(reservation.id), "hold_s": hold_s}, f"hold:{reservation.id}")
    return str(reservation.id)


@pytest.mark.postgres
async def test_every_timed_job_acts_once_with_two_schedulers_and_survives_losing_the_leader(pg_runtime):
    """Overdue, the ending-soon reminder, lost-bank conversion and reservation expiry, on a clock
    the test moves, with two schedulers running the real jobs; the leader stops half-way."""
    from powerbank.storage.models import Notification, Reservation

    runtime = pg_runtime
    now = datetime.now(timezone.utc)
    reminded = await open_rental(runtime, started_at=now - timedelta(minutes=55), duration_minutes=60)
    overdue = await open_rental(runtime, started_at=now - timedelta(minutes=70), duration_minutes=60)
    lost = await open_rental(runtime, started_at=now - timedelta(hours=30), duration_minutes=60, max_minutes=24 * 60)
    reservation_id = await pending_reservation_held(runtime, hold_s=600)
    clock = [now]
    engine = runtime.sessions.kw["bind"]
    leases = [scheduler.AdvisoryLease(engine, "all-jobs"), scheduler.AdvisoryLease(engine, "all-jobs")]
    tasks = [asyncio.create_task(scheduler.run_scheduler(runtime, lease, clock=lambda: clock[0], tick_s=0.02)) for lease in leases]
    try:
        await asyncio.sleep(1.0)  # slow jobs run every 10 ticks
        leader = 0 if leases[0].held else 1
        assert leases[leader].held and not leases[1 - leader].held
        tasks[leader].cancel()
        await asyncio.gather(tasks[leader], return_exceptions=True)
        clock[0] = now + timedelta(minutes=11)  # the reservation's hold has run out
        await asyncio.sleep(1.0)
        assert leases[1 - leader].held
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await runtime.test_dispatcher.settle()

    assert (await status_of(runtime, reminded), await status_of(runtime, overdue), await status_of(runtime, lost)) == ("overdue", "overdue", "lost")
    for name, rental_id in (("RemindEndingSoon", reminded), ("MarkOverdue", overdue), ("MarkOverdue", reminded), ("MarkLost", lost)):
        assert await commands(runtime, name, rental_id) == 1, (name, rental_id)
    async with runtime.sessions() as session:
        assert (await session.get(Reservation, uuid.UUID(reservation_id))).status == "expired"
        expiries = await session.scalar(select(func.count()).select_from(ActorCommand).where(ActorCommand.name == "ExpireReservation"))
        reminders = await session.scalar(select(func.count()).select_from(Notification).where(Notification.kind.like("%ending%")))
    assert expiries == 1
    assert reminders == 1


async def test_a_cancelled_rentals_forgotten_hold_is_released_after_the_expiry(runtime):
    """The safety net behind the rental's own VoidHold: a hold left pending on a cancelled
    rental is released once it is older than HOLD_EXPIRY; an open rental's hold is not."""
    from powerbank.actors.wallet import HOLD_EXPIRY, expire_orphaned_holds
    from powerbank.storage.models import LedgerTransfer

    async def held(rental_id: str, user_id: str) -> str:
        await runtime.call("wallet", user_id, "CreditWallet", {"amount_minor": 10_000, "currency": "NPR", "transfer_id": str(uuid.uuid4()), "reason": "t"}, f"c:{rental_id}")
        placed = await runtime.call("wallet", user_id, "PlaceHold", {"rental_id": rental_id, "amount_minor": 500, "currency": "NPR"}, f"h:{rental_id}")
        assert placed["ok"], placed
        return placed["transfer_id"]

    forgotten = await open_rental(runtime, started_at=T0)
    still_out = await open_rental(runtime, started_at=T0)
    async with runtime.sessions.begin() as session:
        for rental_id, status in ((forgotten, "cancelled"), (still_out, "active")):
            (await session.get(Rental, uuid.UUID(rental_id))).status = status
        owners = {r: str((await session.get(Rental, uuid.UUID(r))).user_id) for r in (forgotten, still_out)}
    holds = {r: await held(r, owners[r]) for r in (forgotten, still_out)}

    async def resolved(rental_id: str) -> bool:
        async with runtime.sessions() as session:
            return await session.scalar(select(func.count()).select_from(LedgerTransfer).where(LedgerTransfer.pending_id == uuid.UUID(holds[rental_id]))) == 1

    now = datetime.now(timezone.utc)
    assert await expire_orphaned_holds(runtime, now + HOLD_EXPIRY / 2) == 0
    assert await expire_orphaned_holds(runtime, now + HOLD_EXPIRY * 2) == 1
    await runtime.test_dispatcher.settle()
    assert await resolved(forgotten) and not await resolved(still_out)
    assert await expire_orphaned_holds(runtime, now + HOLD_EXPIRY * 2) == 0  # released once


async def test_the_scheduler_keeps_the_leaderboards_fresh(runtime):
    from powerbank.storage.models import UserLeaderboard

    rental_id = await open_rental(runtime, started_at=T0)
    async with runtime.sessions.begin() as session:
        rental = await session.get(Rental, uuid.UUID(rental_id))
        rental.status, rental.returned_at = "completed", T0 + timedelta(minutes=30)
    [refresh] = [job for job in scheduler.default_jobs().slow if job.__name__ == "recompute_leaderboards"]
    now = datetime.now(timezone.utc)
    assert await refresh(runtime, now) == 2  # all time and this month
    assert await refresh(runtime, now + timedelta(seconds=10)) == 0  # fresh: nothing to do
    async with runtime.sessions() as session:
        rows = (await session.execute(select(UserLeaderboard.period, UserLeaderboard.rentals_completed, UserLeaderboard.rank))).all()
    assert ("all_time", 1, 1) in [tuple(r) for r in rows]


async def test_system_logs_are_kept_thirty_days(runtime):
    from powerbank.storage.models import SystemLog

    now = datetime.now(timezone.utc)
    async with runtime.sessions.begin() as session:
        for age in (timedelta(days=31), timedelta(days=29)):
            session.add(SystemLog(level="WARNING", logger="powerbank.test", message=f"{age.days} days old", created_at=now - age))
    [prune] = [job for job in scheduler.default_jobs().slow if job.__name__ == "prune_system_logs"]
    assert await prune(runtime, now) == 1
    async with runtime.sessions() as session:
        assert (await session.execute(select(SystemLog.message))).scalars().all() == ["29 days old"]

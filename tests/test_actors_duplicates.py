"""Exactly-once effect on at-least-once delivery (SPEC, the runtime's third promise), through
the real Wallet, Rental and Station actors on both backends: every command is delivered twice
(two concurrent submits with the same id, then a third after the first returned), every
doorbell is rung twice more, and the client retries `runtime.call` with the same id after it
returned. There must be one effect, and every caller must get the first result.

"One effect" is checked where it would show: ledger transfers per transfer id, balances, the
non-idempotent `PropApply` log (the ledger dedupes by transfer id on its own, so it alone could
hide a second apply), notifications published once per applied command, one eject published,
one station event per seq.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
from sqlalchemy import func, select

from powerbank.actors import station as station_actor
from powerbank.actors import testing as proof
from powerbank.actors.rental import start_rental
from powerbank.broker.bridge import submission_for
from powerbank.broker.protocol import EJECT_OK, BankInserted, EjectAck, Topics, epoch_ms
from powerbank.storage.audit import audit
from powerbank.storage.models import (
    ActorCommand,
    LedgerAccount,
    LedgerTransfer,
    OutboxMessage,
    PowerBank,
    Rental,
    RentalPackage,
    Station,
    StationEvent,
    StationSlot,
    User,
)
from powerbank.storage.types import utcnow

PRICE_MINOR = 5000


@pytest.fixture(autouse=True)
def station_policy():
    previous = station_actor._policy
    station_actor.configure(None, eject_timeout_ms=60_000, heartbeat_interval_s=3600, currency="NPR", topics=Topics("pb"))
    yield
    station_actor._policy = previous


async def deliver_twice(runtime, kind, entity_id, name, payload, command_id, *, seen_before=False):
    """Two concurrent deliveries of one command, a third after they returned, and two more
    doorbells. Returns the three outcomes."""
    first, second = await asyncio.gather(
        runtime.submit(kind, entity_id, name, payload, command_id),
        runtime.submit(kind, entity_id, name, payload, command_id),
    )
    third = await runtime.submit(kind, entity_id, name, payload, command_id)
    runtime.ring(kind, entity_id)
    runtime.ring(kind, entity_id)
    expected = [True, True] if seen_before else [False, True]
    assert sorted([first.duplicate, second.duplicate]) == expected, "accepted twice or not at all"
    assert third.duplicate
    return first, second, third


async def call_twice(runtime, kind, entity_id, name, payload, command_id):
    """Two racing calls, then one retry after they returned; all three results must agree."""
    results = await asyncio.gather(
        runtime.call(kind, entity_id, name, payload, command_id),
        runtime.call(kind, entity_id, name, payload, command_id),
    )
    retried = await runtime.call(kind, entity_id, name, payload, command_id)
    assert results[0] == results[1] == retried
    return retried


async def settle(runtime):
    await runtime.test_dispatcher.settle(timeout_s=30)
    assert await runtime.wait_idle(timeout_s=30)
    await runtime.test_dispatcher.settle(timeout_s=30)


async def commands_named(runtime, command_id_prefix=None, **where):
    async with runtime.sessions() as session:
        query = select(ActorCommand).order_by(ActorCommand.id)
        for column, value in where.items():
            query = query.where(getattr(ActorCommand, column) == value)
        rows = list((await session.execute(query)).scalars())
    return [r for r in rows if command_id_prefix is None or r.command_id.startswith(command_id_prefix)]


async def stored_result(runtime, kind, command_id):
    outcome = await runtime.outcome(kind, command_id)
    assert outcome is not None and outcome.status == "applied", outcome
    return outcome.result


async def new_user(runtime) -> str:
    async with runtime.sessions.begin() as session:
        user = User(phone=f"+9779{uuid.uuid4().int % 10**9:09d}", referral_code=uuid.uuid4().hex[:12], max_active_rentals=3)
        session.add(user)
    user_id = str(user.id)
    opened = await call_twice(runtime, "wallet", user_id, "OpenWallet", {"currency": "NPR"}, f"open:{user_id}")
    assert opened["ok"]
    return user_id


async def wallet_account(runtime, user_id) -> LedgerAccount:
    async with runtime.sessions() as session:
        return (await session.execute(select(LedgerAccount).where(LedgerAccount.code == f"wallet:{user_id}"))).scalar_one()


def credit_payload(amount, transfer_id):
    return {"amount_minor": amount, "currency": "NPR", "transfer_id": transfer_id, "reason": "duplicate test"}


async def assert_clean_audit(runtime):
    assert await audit(runtime.sessions) == {}


# --- wallet -----------------------------------------------------------------------------------


async def test_credits_and_test_commands_delivered_twice_apply_once(runtime):
    user_id = await new_user(runtime)
    amounts = [1000, 250, 4000, 1, 777, 30_000]
    credits = [(str(uuid.uuid4()), amount) for amount in amounts]
    async with runtime.bus.subscribe(f"user:{user_id}") as announcements:
        for transfer_id, amount in credits:
            await deliver_twice(runtime, "wallet", user_id, "CreditWallet", credit_payload(amount, transfer_id), f"credit:{transfer_id}")
            tag = f"dup:{transfer_id}"
            await deliver_twice(runtime, "wallet", user_id, proof.PROP_APPLY, proof.prop_payload(tag, amount), tag)
        # Racing calls for a fresh command: one apply, both callers get its result.
        racing_id = str(uuid.uuid4())
        racing = await call_twice(runtime, "wallet", user_id, "CreditWallet", credit_payload(5, racing_id), f"credit:{racing_id}")
        credits.append((racing_id, 5))
        await settle(runtime)
        announced = Counter()
        while not announcements.queue.empty():
            _, message = announcements.queue.get_nowait()
            announced[message["type"]] += 1

    # Every caller retrying afterwards gets the first (stored) result, unchanged.
    for transfer_id, amount in credits:
        command_id = f"credit:{transfer_id}"
        first = await stored_result(runtime, "wallet", command_id)
        assert first["ok"]
        retried = await call_twice(runtime, "wallet", user_id, "CreditWallet", credit_payload(amount, transfer_id), command_id)
        assert retried == first
    assert racing == await stored_result(runtime, "wallet", f"credit:{racing_id}")

    # One effect: one mailbox row per command id, one transfer per transfer id, the balance is
    # the sum, the non-idempotent log has each tag once, one announcement per applied credit.
    rows = await commands_named(runtime, kind="wallet", entity_id=user_id)
    assert Counter(r.name for r in rows) == {"OpenWallet": 1, "CreditWallet": len(credits), proof.PROP_APPLY: len(amounts)}
    async with runtime.sessions() as session:
        transfer_ids = [uuid.UUID(t) for t, _ in credits]
        transfers = list((await session.execute(select(LedgerTransfer).where(LedgerTransfer.id.in_(transfer_ids)))).scalars())
        (history,) = (await proof.prop_histories(session, [user_id])).values()
    assert sorted(t.amount_minor for t in transfers) == sorted(a for _, a in credits)
    account = await wallet_account(runtime, user_id)
    assert (account.credits_posted - account.debits_posted, account.debits_pending) == (sum(a for _, a in credits), 0)
    assert proof.serial_problems(history) == [] and proof.id_order_problems(history) == []
    assert len(history.log) == len(amounts)
    assert announced == {"wallet.updated": len(credits)}
    await assert_clean_audit(runtime)


async def test_a_credit_retried_with_another_command_id_still_moves_money_once(runtime):
    """The ledger's own idempotency (by transfer id) behind the runtime's (by command id): a
    client that lost its command id but kept the transfer id cannot credit twice."""
    user_id = await new_user(runtime)
    transfer_id = str(uuid.uuid4())
    results = await asyncio.gather(
        *(runtime.call("wallet", user_id, "CreditWallet", credit_payload(900, transfer_id), f"attempt-{i}:{transfer_id}") for i in range(3))
    )
    assert all(r["ok"] for r in results)
    account = await wallet_account(runtime, user_id)
    assert account.credits_posted - account.debits_posted == 900
    await settle(runtime)
    await assert_clean_audit(runtime)


# --- a rental through the saga ----------------------------------------------------------------


async def make_station(runtime, serial, charges) -> tuple[str, list[str]]:
    async with runtime.sessions.begin() as session:
        station = Station(
            serial=serial, name=serial, latitude=27.7, longitude=85.3, slot_count=len(charges) + 1,
            status="online", last_seen_at=utcnow(), heartbeat_interval_s=3600,
        )
        session.add(station)
        await session.flush()
        serials = []
        for number in range(1, len(charges) + 2):
            bank_id = None
            if number <= len(charges):
                bank = PowerBank(serial=f"{serial}-B{number}", charge_percent=charges[number - 1], currency="NPR", station_id=station.id)
                session.add(bank)
                await session.flush()
                bank_id = bank.id
                serials.append(bank.serial)
            session.add(StationSlot(station_id=station.id, slot_number=number, status="occupied" if bank_id else "empty", power_bank_id=bank_id))
    return str(station.id), serials


async def make_package(runtime) -> str:
    async with runtime.sessions.begin() as session:
        package = RentalPackage(
            code=uuid.uuid4().hex[:10], name="1 hour", duration_minutes=60, price_minor=PRICE_MINOR, currency="NPR",
            grace_minutes=5, late_fee_per_hour_minor=3000, late_fee_daily_cap_minor=30000, max_duration_minutes=1440,
        )
        session.add(package)
    return str(package.id)


async def eject_rows(runtime) -> list[OutboxMessage]:
    async with runtime.sessions() as session:
        rows = (await session.execute(select(OutboxMessage).order_by(OutboxMessage.id))).scalars()
        return [row for row in rows if row.payload.get("type") == "eject"]


async def station_event_delivered_twice(runtime, station_id, serial, message):
    """What the bridge does with a station message (one command, id by (station, seq)), done
    twice concurrently and once more later, as a station re-sending an unacknowledged event."""
    submission = submission_for(serial, message, utcnow())
    await deliver_twice(runtime, "station", station_id, submission.name, submission.payload, submission.command_id)
    return submission


async def test_rental_start_and_return_delivered_twice_have_one_effect(runtime):
    user_id = await new_user(runtime)
    credit_id = str(uuid.uuid4())
    assert (await runtime.call("wallet", user_id, "CreditWallet", credit_payload(20_000, credit_id), f"credit:{credit_id}"))["ok"]
    serial = f"DUP-{uuid.uuid4().hex[:6].upper()}"
    station_id, banks = await make_station(runtime, serial, charges=[90, 70])
    package_id = await make_package(runtime)
    rental_id = uuid.uuid4()
    start_id = f"start:{rental_id}"
    start = {"user_id": user_id, "station_id": station_id, "package_id": package_id}

    async with runtime.bus.subscribe(f"rental:{rental_id}") as updates:
        # The app's start, delivered twice and retried: one rental, one hold, one eject.
        started = await call_twice(runtime, "rental", str(rental_id), "StartRental", start, start_id)
        assert started["ok"] and started["rental"]["status"] == "pending"
        await deliver_twice(runtime, "rental", str(rental_id), "StartRental", start, start_id, seen_before=True)
        await settle(runtime)
        (eject,) = await eject_rows(runtime)
        assert (eject.payload["slot"], eject.payload["bank"]) == (1, banks[0])

        # The station acknowledges; the ack arrives twice and is re-sent later.
        ack = EjectAck(v=1, seq=1, ts=epoch_ms(utcnow()), command_id=eject.payload["command_id"], slot=1, bank=banks[0], code=EJECT_OK)
        ack_submission = await station_event_delivered_twice(runtime, station_id, serial, ack)
        await settle(runtime)
        assert (await start_rental(
            runtime, rental_id=rental_id, user_id=uuid.UUID(user_id), station_id=uuid.UUID(station_id),
            package_id=uuid.UUID(package_id), timeout_s=2,  # its wait for news is pinned below
        ))["status"] == "active", "a repeated start must report the rental as it is"
        # A client retrying the start after all that still gets the first result.
        assert await runtime.call("rental", str(rental_id), "StartRental", start, start_id) == started

        # The bank comes back to the slot it left: the return arrives twice as well, and once
        # more under another command id (the (station, seq) key must catch that one).
        back = BankInserted(v=1, seq=2, ts=epoch_ms(utcnow()), slot=1, bank=banks[0], charge=88)
        returned = await station_event_delivered_twice(runtime, station_id, serial, back)
        again = await runtime.call("station", station_id, returned.name, returned.payload, f"resent:{returned.command_id}")
        await settle(runtime)
        events = []
        while not updates.queue.empty():
            events.append(updates.queue.get_nowait()[1]["event"])

    assert again == {"ok": True, "duplicate": True, "seq": 2}
    ack_result = await stored_result(runtime, "station", ack_submission.command_id)
    assert ack_result["ok"] and ack_result["rental_id"] == str(rental_id)
    assert await runtime.call("station", station_id, ack_submission.name, ack_submission.payload, ack_submission.command_id) == ack_result

    # Each step of the saga exactly once.
    names = Counter(r.name for r in await commands_named(runtime) if r.entity_id in (str(rental_id), station_id, user_id))
    assert names == {
        "OpenWallet": 1, "CreditWallet": 1, "StartRental": 1, "PlaceHold": 1, "HoldPlaced": 1,
        "ReserveAndEject": 1, "EjectAck": 1, "BankEjected": 1, "BankInserted": 2, "BankReturned": 1,
        "CaptureHold": 1, "ChargeSettled": 1,
    }
    assert Counter(events) == {"requested": 1, "funds_held": 1, "started": 1, "returned": 1, "charged": 1}
    async with runtime.sessions() as session:
        rentals = list((await session.execute(select(Rental).where(Rental.user_id == uuid.UUID(user_id)))).scalars())
        transfers = list((await session.execute(select(LedgerTransfer).where(LedgerTransfer.rental_id == rental_id))).scalars())
        seqs = list((await session.execute(
            select(StationEvent.seq, func.count()).where(StationEvent.station_id == uuid.UUID(station_id)).group_by(StationEvent.seq)
        )).all())
        bank = (await session.execute(select(PowerBank).where(PowerBank.serial == banks[0]))).scalar_one()
        slot = (await session.execute(select(StationSlot).where(StationSlot.station_id == uuid.UUID(station_id), StationSlot.slot_number == 1))).scalar_one()
    (rental,) = rentals
    assert (rental.status, rental.fee_minor, rental.charged_minor, rental.due_minor) == ("completed", PRICE_MINOR, PRICE_MINOR, 0)
    assert sorted((t.kind, t.state, t.amount_minor) for t in transfers) == [
        ("rental_hold", "pending", PRICE_MINOR), ("rental_hold:post", "posted", PRICE_MINOR),
    ]
    assert sorted(seqs) == [(1, 1), (2, 1)]
    assert len(await eject_rows(runtime)) == 1
    assert (bank.status, bank.station_id, bank.rental_id, slot.power_bank_id) == ("in_slot", uuid.UUID(station_id), None, bank.id)
    account = await wallet_account(runtime, user_id)
    assert (account.credits_posted - account.debits_posted, account.debits_pending) == (20_000 - PRICE_MINOR, 0)
    await assert_clean_audit(runtime)


async def test_a_rental_start_racing_itself_gets_one_bank(runtime):
    """Two starts of the same rental racing through the whole saga (both callers waiting for
    the outcome, as the HTTP layer does) while the station acks: one bank leaves, one hold."""
    user_id = await new_user(runtime)
    credit_id = str(uuid.uuid4())
    await runtime.call("wallet", user_id, "CreditWallet", credit_payload(20_000, credit_id), f"credit:{credit_id}")
    serial = f"DUP-{uuid.uuid4().hex[:6].upper()}"
    station_id, banks = await make_station(runtime, serial, charges=[90, 80, 70])
    package_id = await make_package(runtime)
    rental_id = uuid.uuid4()

    async def station_acks_what_it_is_told() -> None:
        answered: set[str] = set()
        seq = 0
        while True:
            for row in await eject_rows(runtime):
                if row.payload["command_id"] not in answered:
                    answered.add(row.payload["command_id"])
                    seq += 1
                    ack = EjectAck(v=1, seq=seq, ts=epoch_ms(utcnow()), command_id=row.payload["command_id"],
                                   slot=row.payload["slot"], bank=row.payload["bank"], code=EJECT_OK)
                    await station_event_delivered_twice(runtime, station_id, serial, ack)
            await asyncio.sleep(0.02)

    station = asyncio.create_task(station_acks_what_it_is_told())
    try:
        views = await asyncio.gather(*(
            start_rental(runtime, rental_id=rental_id, user_id=uuid.UUID(user_id), station_id=uuid.UUID(station_id),
                         package_id=uuid.UUID(package_id), timeout_s=20)
            for _ in range(3)
        ))
    finally:
        station.cancel()
        await asyncio.gather(station, return_exceptions=True)
    await settle(runtime)
    assert {v["status"] for v in views} == {"active"}
    assert len({v["power_bank_id"] for v in views}) == 1
    assert len(await eject_rows(runtime)) == 1
    async with runtime.sessions() as session:
        rented = list((await session.execute(select(PowerBank).where(PowerBank.status == "rented"))).scalars())
        holds = (await session.execute(select(func.count()).select_from(LedgerTransfer).where(LedgerTransfer.rental_id == rental_id))).scalar_one()
    assert [str(b.id) for b in rented] == [views[0]["power_bank_id"]]
    assert holds == 1
    account = await wallet_account(runtime, user_id)
    assert (account.credits_posted - account.debits_posted, account.debits_pending) == (20_000, PRICE_MINOR)
    await assert_clean_audit(runtime)


async def test_a_repeated_start_answers_at_once_when_the_rental_is_settled(runtime):
    """A client retrying a start (the HTTP layer's idempotency key maps to the same rental id)
    after the rental became active, or was cancelled, must get that answer at once. The first
    result of StartRental says "pending", so a caller must look at the rental as it is now
    rather than wait for an update that already happened."""
    user_id = await new_user(runtime)
    credit_id = str(uuid.uuid4())
    await runtime.call("wallet", user_id, "CreditWallet", credit_payload(20_000, credit_id), f"credit:{credit_id}")
    serial = f"DUP-{uuid.uuid4().hex[:6].upper()}"
    station_id, banks = await make_station(runtime, serial, charges=[90])
    package_id = await make_package(runtime)
    rental_id = uuid.uuid4()
    start = dict(rental_id=rental_id, user_id=uuid.UUID(user_id), station_id=uuid.UUID(station_id),
                 package_id=uuid.UUID(package_id), timeout_s=5)
    first = asyncio.create_task(start_rental(runtime, **start))
    await settle(runtime)
    (eject,) = await eject_rows(runtime)
    ack = EjectAck(v=1, seq=1, ts=epoch_ms(utcnow()), command_id=eject.payload["command_id"], slot=1, bank=banks[0], code=EJECT_OK)
    await station_event_delivered_twice(runtime, station_id, serial, ack)
    assert (await asyncio.wait_for(first, 10))["status"] == "active"
    loop = asyncio.get_running_loop()
    began = loop.time()
    again = await start_rental(runtime, **start)
    waited = loop.time() - began
    assert again["status"] == "active"
    assert waited < 2.0, f"a repeated start of an active rental waited {waited:.1f} s (its deadline) for news"

"""Wallet actor and ledger: holds, captures, voids, idempotent transfers, balanced books."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from powerbank.actors.wallet import HoldRequest, refuse_hold_reason
from powerbank.storage.ledger import ledger_discrepancies
from powerbank.storage.models import ActorCommand, LedgerAccount, Rental, RentalPackage, Station, User


async def _user(runtime) -> str:
    async with runtime.sessions.begin() as session:
        user = User(phone=f"+9779{uuid.uuid4().int % 10**9:09d}", referral_code=uuid.uuid4().hex[:10])
        session.add(user)
    user_id = str(user.id)
    assert (await runtime.call("wallet", user_id, "OpenWallet", {"currency": "NPR"}, f"open:{user_id}"))["ok"]
    return user_id


async def _rental(runtime, user_id) -> str:
    """A rental row for holds to point at. It is already active, so the Rental actor ignores
    the wallet's follow-ups and these tests see the wallet alone."""
    async with runtime.sessions.begin() as session:
        station = Station(serial=uuid.uuid4().hex[:12], name="s", latitude=0, longitude=0, slot_count=4)
        package = RentalPackage(code=uuid.uuid4().hex[:10], name="p", duration_minutes=60, price_minor=5000, currency="NPR", max_duration_minutes=600)
        session.add_all([station, package])
        await session.flush()
        rental = Rental(user_id=uuid.UUID(user_id), station_id=station.id, package_id=package.id, currency="NPR", status="active")
        session.add(rental)
    return str(rental.id)


async def _credit(runtime, user_id, amount, transfer_id=None):
    transfer_id = transfer_id or str(uuid.uuid4())
    payload = {"amount_minor": amount, "currency": "NPR", "transfer_id": transfer_id, "reason": "test"}
    return await runtime.call("wallet", user_id, "CreditWallet", payload, f"credit:{transfer_id}")


async def _balance(runtime, user_id):
    async with runtime.sessions() as session:
        account = (await session.execute(select(LedgerAccount).where(LedgerAccount.code == f"wallet:{user_id}"))).scalar_one()
        return account.credits_posted - account.debits_posted, account.debits_pending


async def _books_balanced(runtime):
    async with runtime.sessions() as session:
        assert await ledger_discrepancies(session) == []


async def test_credit_is_idempotent_by_transfer_id(runtime):
    user_id = await _user(runtime)
    transfer_id = str(uuid.uuid4())
    first = await _credit(runtime, user_id, 10_000, transfer_id)
    # A new command id carrying the same transfer id must not credit twice either.
    payload = {"amount_minor": 10_000, "currency": "NPR", "transfer_id": transfer_id, "reason": "again"}
    second = await runtime.call("wallet", user_id, "CreditWallet", payload, "another-command-id")
    assert first["ok"] and second["ok"]
    assert await _balance(runtime, user_id) == (10_000, 0)
    await _books_balanced(runtime)


@pytest.mark.parametrize("amount", [0, -5, 1.5, True, "100"])
async def test_bad_amounts_are_refused_and_write_nothing(runtime, amount):
    user_id = await _user(runtime)
    result = await _credit(runtime, user_id, amount)
    assert result == {"ok": False, "reason": "invalid_amount"}
    assert await _balance(runtime, user_id) == (0, 0)
    await _books_balanced(runtime)


async def test_hold_then_partial_capture_releases_the_rest(runtime):
    user_id = await _user(runtime)
    await _credit(runtime, user_id, 10_000)
    rental_id = await _rental(runtime, user_id)
    hold = await runtime.call("wallet", user_id, "PlaceHold", {"rental_id": rental_id, "amount_minor": 5000, "currency": "NPR", "max_active_rentals": 1}, "h1")
    assert hold["ok"]
    assert await _balance(runtime, user_id) == (10_000, 5000)
    capture = await runtime.call("wallet", user_id, "CaptureHold", {"rental_id": rental_id, "amount_minor": 3000}, "c1")
    assert capture == {"ok": True, "charged_minor": 3000, "due_minor": 0, "points_spent": 0, "points_awarded": 0}
    assert await _balance(runtime, user_id) == (7000, 0)
    await _books_balanced(runtime)


async def test_fee_above_hold_charges_the_wallet_then_records_a_due(runtime):
    user_id = await _user(runtime)
    await _credit(runtime, user_id, 6000)
    rental_id = await _rental(runtime, user_id)
    await runtime.call("wallet", user_id, "PlaceHold", {"rental_id": rental_id, "amount_minor": 5000, "currency": "NPR"}, "h2")
    capture = await runtime.call("wallet", user_id, "CaptureHold", {"rental_id": rental_id, "amount_minor": 9000}, "c2")
    assert capture == {"ok": True, "charged_minor": 6000, "due_minor": 3000, "points_spent": 0, "points_awarded": 0}
    assert await _balance(runtime, user_id) == (0, 0)
    await _books_balanced(runtime)


async def test_void_releases_the_hold_exactly_once(runtime):
    user_id = await _user(runtime)
    await _credit(runtime, user_id, 5000)
    rental_id = await _rental(runtime, user_id)
    await runtime.call("wallet", user_id, "PlaceHold", {"rental_id": rental_id, "amount_minor": 5000, "currency": "NPR"}, "h3")
    await runtime.call("wallet", user_id, "VoidHold", {"rental_id": rental_id}, "v1")
    await runtime.call("wallet", user_id, "VoidHold", {"rental_id": rental_id}, "v2")
    late_capture = await runtime.call("wallet", user_id, "CaptureHold", {"rental_id": rental_id, "amount_minor": 100}, "c3")
    assert await _balance(runtime, user_id) == (5000 - late_capture["charged_minor"], 0)
    await _books_balanced(runtime)


async def test_hold_refusal_reaches_the_rental_mailbox(runtime):
    user_id = await _user(runtime)
    rental_id = await _rental(runtime, user_id)
    result = await runtime.call("wallet", user_id, "PlaceHold", {"rental_id": rental_id, "amount_minor": 5000, "currency": "NPR"}, "h4")
    assert result == {"ok": False, "reason": "insufficient_funds"}
    async with runtime.sessions() as session:
        follow_up = (await session.execute(select(ActorCommand).where(ActorCommand.command_id == f"hold-refused:{rental_id}"))).scalar_one()
    assert follow_up.kind == "rental" and follow_up.payload == {"reason": "insufficient_funds"}


def test_hold_refusal_reasons_in_priority_order():
    ok = HoldRequest(amount_minor=100, open_rental_holds=0, max_active_rentals=1, unpaid_dues_minor=0, available_minor=100)
    assert refuse_hold_reason(ok) is None
    assert refuse_hold_reason(HoldRequest(100, 0, 1, 0, 99)) == "insufficient_funds"
    assert refuse_hold_reason(HoldRequest(100, 1, 1, 0, 1000)) == "too_many_active_rentals"
    assert refuse_hold_reason(HoldRequest(100, 1, 1, 5, 0)) == "unpaid_dues"

"""Wallet actor and ledger: holds, captures, voids, idempotent transfers, balanced books."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from powerbank.actors.wallet import HoldRequest, hold_id, refuse_hold_reason
from powerbank.storage.ledger import ledger_discrepancies
from powerbank.storage.models import ActorCommand, LedgerAccount, PowerBank, Rental, RentalPackage, Station, User
from powerbank.storage.types import utcnow


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


async def _returned(runtime, user_id, *, minutes: float, hold_minor: int = 5000, bank_price_minor: int | None = None):
    """A rental started `minutes` ago with its hold placed; then the bank comes back (or, with a
    bank price, is declared lost)."""
    async with runtime.sessions.begin() as session:
        station = Station(serial=uuid.uuid4().hex[:12], name="s", latitude=0, longitude=0, slot_count=4)
        package = RentalPackage(code=uuid.uuid4().hex[:10], name="p", duration_minutes=60, price_minor=5000, currency="NPR",
                                grace_minutes=5, late_fee_per_hour_minor=3000, late_fee_daily_cap_minor=30000, max_duration_minutes=600)
        bank = PowerBank(serial=uuid.uuid4().hex[:12], currency="NPR", status="rented", price_minor=bank_price_minor or 250000)
        session.add_all([station, package, bank])
        await session.flush()
        rental = Rental(user_id=uuid.UUID(user_id), station_id=station.id, package_id=package.id, currency="NPR",
                        status="active", power_bank_id=bank.id, hold_minor=hold_minor,
                        started_at=utcnow() - timedelta(minutes=minutes))
        session.add(rental)
    rental_id = str(rental.id)
    hold = {"rental_id": rental_id, "amount_minor": hold_minor, "currency": "NPR"}
    assert (await runtime.call("wallet", user_id, "PlaceHold", hold, f"hold:{rental_id}"))["ok"]
    if bank_price_minor is None:
        returned = {"returned_at": utcnow().isoformat(), "station_id": str(station.id)}
        assert (await runtime.call("rental", rental_id, "BankReturned", returned, f"returned:{rental_id}"))["ok"]
    else:
        result = await runtime.call("rental", rental_id, "MarkLost", {}, f"lost:{rental_id}")
        assert result["ok"], result
    await runtime.test_dispatcher.settle()
    async with runtime.sessions() as session:
        return await session.get(Rental, rental.id)


async def _points(runtime, user_id):
    async with runtime.sessions() as session:
        account = (await session.execute(select(LedgerAccount).where(LedgerAccount.code == f"points:{user_id}"))).scalar_one()
        return account.credits_posted - account.debits_posted


async def test_a_timely_return_charges_the_price_and_earns_points(runtime):
    user_id = await _user(runtime)
    await _credit(runtime, user_id, 8000)
    rental = await _returned(runtime, user_id, minutes=30)
    assert (rental.status, rental.fee_minor, rental.charged_minor, rental.due_minor, rental.quick_return) == ("completed", 5000, 5000, 0, False)
    assert await _balance(runtime, user_id) == (3000, 0)
    assert await _points(runtime, user_id) == 10  # the default timely_return_points
    await _books_balanced(runtime)


async def test_a_late_return_uses_wallet_then_points_then_records_a_due(runtime):
    user_id = await _user(runtime)
    await _credit(runtime, user_id, 9000)
    award = {"points": 120, "transfer_id": str(uuid.uuid4())}
    assert (await runtime.call("wallet", user_id, "GrantPoints", award, "award-120"))["ok"]
    rental = await _returned(runtime, user_id, minutes=190)  # 2 h 10 min late: fee 5000 + 3 * 3000
    assert (rental.fee_minor, rental.charged_minor, rental.due_minor) == (14000, 10200, 3800)
    assert await _balance(runtime, user_id) == (0, 0) and await _points(runtime, user_id) == 0
    # The due blocks the next rental until it is paid.
    await _credit(runtime, user_id, 5000)
    blocked = await runtime.call("wallet", user_id, "PlaceHold", {"rental_id": await _rental(runtime, user_id), "amount_minor": 100, "currency": "NPR"}, "h-blocked")
    assert blocked == {"ok": False, "reason": "unpaid_dues"}
    paid = await runtime.call("wallet", user_id, "PayDue", {"rental_id": str(rental.id)}, "pay-1")
    assert paid["ok"] and (paid["paid_minor"], paid["wallet_minor"], paid["points"]) == (3800, 3800, 0)
    again = await runtime.call("wallet", user_id, "PayDue", {"rental_id": str(rental.id)}, "pay-2")
    assert again["ok"] and again["already_paid"]
    await runtime.test_dispatcher.settle()
    async with runtime.sessions() as session:
        settled = await session.get(Rental, rental.id)
    assert (settled.due_minor, settled.charged_minor) == (0, 14000)
    assert await _balance(runtime, user_id) == (1200, 0)
    await _books_balanced(runtime)


async def test_a_quick_return_is_flagged_charged_and_earns_nothing(runtime):
    user_id = await _user(runtime)
    await _credit(runtime, user_id, 5000)
    rental = await _returned(runtime, user_id, minutes=2)
    assert rental.quick_return and rental.fee_minor == 5000 and rental.due_minor == 0
    assert await _points(runtime, user_id) == 0


async def test_a_lost_bank_charges_up_to_the_maximum_plus_its_price(runtime):
    user_id = await _user(runtime)
    await _credit(runtime, user_id, 50_000)
    rental = await _returned(runtime, user_id, minutes=601, bank_price_minor=20_000)
    # 600 min max: 9 h late by the hour (27000), under the one-day cap; plus the bank.
    assert (rental.status, rental.fee_minor) == ("lost", 5000 + 27000 + 20_000)
    assert (rental.charged_minor, rental.due_minor) == (50_000, 2000)
    await _books_balanced(runtime)


async def test_refunds_reverse_a_charge_and_never_exceed_it(runtime):
    user_id = await _user(runtime)
    await _credit(runtime, user_id, 8000)
    rental = await _returned(runtime, user_id, minutes=30)
    posted = str(uuid.uuid5(hold_id(str(rental.id)), "resolution"))
    first = await runtime.call("wallet", user_id, "RefundTransfer", {"transfer_id": posted, "refund_id": str(uuid.uuid4()), "amount_minor": 3000}, "r1")
    too_much = await runtime.call("wallet", user_id, "RefundTransfer", {"transfer_id": posted, "refund_id": str(uuid.uuid4()), "amount_minor": 2001}, "r2")
    assert first["ok"] and too_much == {"ok": False, "reason": "exceeds_refundable", "refundable_minor": 2000}
    other = await _user(runtime)
    stranger = await runtime.call("wallet", other, "RefundTransfer", {"transfer_id": posted, "refund_id": str(uuid.uuid4()), "amount_minor": 1}, "r3")
    assert stranger == {"ok": False, "reason": "transfer_not_found"}
    assert await _balance(runtime, user_id) == (6000, 0)
    await _books_balanced(runtime)


async def test_points_cover_a_start_the_wallet_alone_cannot(runtime):
    user_id = await _user(runtime)
    await _credit(runtime, user_id, 3000)
    award = {"points": 250, "transfer_id": str(uuid.uuid4())}
    assert (await runtime.call("wallet", user_id, "GrantPoints", award, "award-250"))["ok"]
    rental_id = await _rental(runtime, user_id)
    hold = await runtime.call("wallet", user_id, "PlaceHold", {"rental_id": rental_id, "amount_minor": 5000, "currency": "NPR"}, "hp1")
    assert hold["ok"] and (hold["held_minor"], hold["points_held"]) == (3000, 200)
    assert await _balance(runtime, user_id) == (3000, 3000)
    capture = await runtime.call("wallet", user_id, "CaptureHold", {"rental_id": rental_id, "amount_minor": 4000}, "cp1")
    assert capture == {"ok": True, "charged_minor": 4000, "due_minor": 0, "points_spent": 100, "points_awarded": 0}
    assert await _balance(runtime, user_id) == (0, 0) and await _points(runtime, user_id) == 150
    short = await runtime.call("wallet", user_id, "PlaceHold", {"rental_id": await _rental(runtime, user_id), "amount_minor": 1501, "currency": "NPR"}, "hp2")
    assert short == {"ok": False, "reason": "insufficient_funds"}
    await _books_balanced(runtime)


async def _commands_for(runtime, kind: str, entity_id: str, name: str) -> list[ActorCommand]:
    async with runtime.sessions() as session:
        return list((await session.execute(select(ActorCommand).where(
            ActorCommand.kind == kind, ActorCommand.entity_id == entity_id, ActorCommand.name == name))).scalars())


async def test_a_free_package_places_no_hold_and_the_rental_goes_on(runtime):
    """A zero-amount hold used to reach the ledger as a zero-amount transfer and fail the command,
    leaving the rental pending forever."""
    user_id = await _user(runtime)
    rental_id = await _rental(runtime, user_id)
    hold = await runtime.call("wallet", user_id, "PlaceHold", {"rental_id": rental_id, "amount_minor": 0, "currency": "NPR"}, "h-free")
    assert hold == {"ok": True, "transfer_id": None, "held_minor": 0, "points_held": 0}
    assert len(await _commands_for(runtime, "rental", rental_id, "HoldPlaced")) == 1
    assert await _balance(runtime, user_id) == (0, 0)
    capture = await runtime.call("wallet", user_id, "CaptureHold", {"rental_id": rental_id, "amount_minor": 0}, "c-free")
    assert capture["ok"] and (capture["charged_minor"], capture["due_minor"]) == (0, 0)
    await _books_balanced(runtime)


async def test_a_card_rental_holds_nothing_in_the_wallet_but_dues_still_block_it(runtime):
    user_id = await _user(runtime)
    rental_id = await _rental(runtime, user_id)
    card = {"rental_id": rental_id, "amount_minor": 5000, "currency": "NPR", "payment_mode": "card"}
    hold = await runtime.call("wallet", user_id, "PlaceHold", card, "h-card")  # an empty wallet: the card pays
    assert hold["ok"] and hold["held_minor"] == 0 and await _balance(runtime, user_id) == (0, 0)
    async with runtime.sessions.begin() as session:
        (await session.get(Rental, uuid.UUID(rental_id))).due_minor = 100
    blocked = await runtime.call("wallet", user_id, "PlaceHold", {**card, "rental_id": await _rental(runtime, user_id)}, "h-card-2")
    assert blocked == {"ok": False, "reason": "unpaid_dues"}


async def _pending_free_rental(runtime, user_id) -> str:
    """A free-package rental still pending: the wallet decides, the Rental actor has not moved."""
    async with runtime.sessions.begin() as session:
        station = Station(serial=uuid.uuid4().hex[:12], name="s", latitude=0, longitude=0, slot_count=4)
        package = RentalPackage(code=uuid.uuid4().hex[:10], name="free", duration_minutes=60, price_minor=0, currency="NPR", max_duration_minutes=600)
        session.add_all([station, package])
        await session.flush()
        rental = Rental(user_id=uuid.UUID(user_id), station_id=station.id, package_id=package.id, currency="NPR", status="pending")
        session.add(rental)
    return str(rental.id)


async def test_holdless_rentals_count_towards_the_limit_from_the_wallets_approval(runtime):
    """Two free starts decided before either rental moved past pending: the first approval is
    the wallet's own record, so the second is refused (the limit is one)."""
    user_id = await _user(runtime)
    first, second = await _pending_free_rental(runtime, user_id), await _pending_free_rental(runtime, user_id)
    free = {"amount_minor": 0, "currency": "NPR", "max_active_rentals": 1}
    assert (await runtime.call("wallet", user_id, "PlaceHold", {**free, "rental_id": first}, "h-1"))["ok"]
    assert await runtime.call("wallet", user_id, "PlaceHold", {**free, "rental_id": second}, "h-2") == {"ok": False, "reason": "too_many_active_rentals"}
    # The first start failed and was cancelled: the limit frees up.
    async with runtime.sessions.begin() as session:
        (await session.get(Rental, uuid.UUID(first))).status = "cancelled"
    assert (await runtime.call("wallet", user_id, "PlaceHold", {**free, "rental_id": second}, "h-2-again"))["ok"]

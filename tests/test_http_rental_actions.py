"""Rental cancel and extend (through the Rental actor), location and issue reports, over ASGI
with the real actors; the return bills an extended rental from its extended due time."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import func, select

from powerbank.actors.rental import billable_s, cancel_refusal, extension_refusal
from powerbank.http.testing import credit_wallet, insert_rental, sign_up
from powerbank.storage.ledger import ledger_discrepancies
from powerbank.storage.models import ActorCommand, LedgerTransfer, Rental, RentalExtension, RentalIssue, RentalLocation
from powerbank.storage.types import utcnow


async def settle(services) -> None:
    await services.runtime.dispatcher.settle()


async def wallet(client, headers) -> dict:
    return (await client.get("/api/user/wallet", headers=headers)).json()


# --- pure decisions ---------------------------------------------------------------------------


def test_cancel_only_before_a_bank_is_on_its_way():
    assert cancel_refusal("pending") is None
    assert cancel_refusal("ejecting") == "eject_in_progress"
    assert cancel_refusal("active") == cancel_refusal("overdue") == "bank_taken"
    assert cancel_refusal("completed") == cancel_refusal("cancelled") == "rental_closed"


def test_extension_rules():
    now = utcnow()
    assert extension_refusal("active", now, now + timedelta(minutes=30), 120, 60) is None
    assert extension_refusal("active", now, now + timedelta(minutes=30), 120, 120) == "beyond_maximum_duration"
    assert extension_refusal("pending", None, None, 120, 60) == "rental_not_active"
    assert extension_refusal("completed", now, now, 120, 60) == "rental_not_active"
    assert billable_s(70 * 60, 60) == 600 and billable_s(30 * 60, 60) == 0


# --- cancel -----------------------------------------------------------------------------------


async def test_cancel_a_pending_rental_voids_its_hold(app_client, app_services):
    """StartRental accepts PlaceHold in the transaction that creates the rental, so the wallet's
    mailbox always has it before the VoidHold a cancel sends: the hold is placed, then voided."""
    headers, user_id = await sign_up(app_client, "+9779819000001")
    await credit_wallet(app_services, user_id, 20_000)
    rental = await insert_rental(app_services, user_id, status="pending")
    response = await app_client.post(f"/api/rentals/{rental.id}/cancel", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled" and response.json()["cancel_reason"] == "cancelled_by_user"
    await settle(app_services)
    async with app_services.sessions() as session:
        void = (await session.execute(
            select(ActorCommand).where(ActorCommand.kind == "wallet", ActorCommand.command_id == f"void:{rental.id}")
        )).scalar_one()
        assert (void.name, void.status, void.entity_id) == ("VoidHold", "applied", str(user_id))
        assert (await session.get(Rental, rental.id)).status == "cancelled"
        assert await ledger_discrepancies(session) == []
    money = await wallet(app_client, headers)
    assert (money["balance_minor"], money["held_minor"]) == (20_000, 0)
    # A late HoldPlaced (the wallet answered after the cancel) changes nothing.
    late = await app_services.runtime.call("rental", str(rental.id), "HoldPlaced", {"transfer_id": str(uuid.uuid4())}, "late-hold")
    assert late == {"ok": True, "ignored": "cancelled"}
    repeat = await app_client.post(f"/api/rentals/{rental.id}/cancel", headers=headers)
    assert repeat.status_code == 200 and repeat.json()["status"] == "cancelled"


async def test_cancel_refused_once_a_bank_is_on_its_way(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779819000002")
    for status, reason in (("ejecting", "eject_in_progress"), ("active", "bank_taken"), ("completed", "rental_closed")):
        rental = await insert_rental(app_services, user_id, status=status)
        response = await app_client.post(f"/api/rentals/{rental.id}/cancel", headers=headers)
        assert response.status_code == 409 and response.json()["error"] == reason, response.text
        async with app_services.sessions() as session:
            assert (await session.get(Rental, rental.id)).status == status


async def test_another_persons_rental_is_404_for_every_action(app_client, app_services):
    alice, alice_id = await sign_up(app_client, "+9779819000003")
    bob, _ = await sign_up(app_client, "+9779819000004")
    await credit_wallet(app_services, alice_id, 20_000)
    rental = await insert_rental(app_services, alice_id, status="pending")
    for path, body in (
        ("cancel", None),
        ("extend", {"periods": 1}),
        ("location", {"latitude": 27.7, "longitude": 85.3}),
        ("report-issue", {"kind": "bank_faulty"}),
    ):
        response = await app_client.post(f"/api/rentals/{rental.id}/{path}", headers=bob, json=body)
        assert response.status_code == 404 and response.json()["error"] == "rental_not_found", (path, response.text)
    assert (await app_client.post(f"/api/rentals/{uuid.uuid4()}/cancel", headers=alice)).status_code == 404
    async with app_services.sessions() as session:
        assert (await session.get(Rental, rental.id)).status == "pending"
        for model in (RentalExtension, RentalLocation, RentalIssue):
            assert await session.scalar(select(func.count()).select_from(model)) == 0


# --- extend -----------------------------------------------------------------------------------


async def test_extend_pays_from_the_wallet_and_moves_the_due_time_once(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779819000005")
    await credit_wallet(app_services, user_id, 20_000)
    rental = await insert_rental(app_services, user_id, status="active")
    body = {"periods": 2, "idempotency_key": "tap-1"}
    response = await app_client.post(f"/api/rentals/{rental.id}/extend", headers=headers, json=body)
    assert response.status_code == 201, response.text
    extension = response.json()
    assert (extension["minutes"], extension["price_minor"], extension["currency"]) == (120, 10_000, "NPR")
    retried = await app_client.post(f"/api/rentals/{rental.id}/extend", headers=headers, json=body)
    assert retried.status_code == 201 and retried.json()["id"] == extension["id"]
    await settle(app_services)
    assert (await wallet(app_client, headers))["balance_minor"] == 10_000
    async with app_services.sessions() as session:
        row = await session.get(Rental, rental.id)
        assert row.due_at == rental.due_at + timedelta(minutes=120)
        assert await session.scalar(select(func.count()).select_from(RentalExtension)) == 1
        assert await ledger_discrepancies(session) == []


async def test_extend_refused_without_money_or_past_the_maximum(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779819000006")
    rental = await insert_rental(app_services, user_id, status="active")
    poor = await app_client.post(f"/api/rentals/{rental.id}/extend", headers=headers, json={"periods": 1})
    assert poor.status_code == 409, poor.text
    await credit_wallet(app_services, user_id, 20_000)
    started = utcnow() - timedelta(days=6, hours=23)
    near_max = await insert_rental(app_services, user_id, status="overdue", started_at=started, due_at=started + timedelta(days=7) - timedelta(minutes=30))
    too_long = await app_client.post(f"/api/rentals/{near_max.id}/extend", headers=headers, json={"periods": 1})
    assert too_long.status_code == 409 and too_long.json()["error"] == "beyond_maximum_duration"
    closed = await insert_rental(app_services, user_id, status="completed")
    assert (await app_client.post(f"/api/rentals/{closed.id}/extend", headers=headers, json={"periods": 1})).json()["error"] == "rental_not_active"
    await settle(app_services)
    assert (await wallet(app_client, headers))["balance_minor"] == 20_000
    async with app_services.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(RentalExtension)) == 0


async def test_actor_refund_when_the_rental_ended_between_payment_and_extension(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779819000007")
    await credit_wallet(app_services, user_id, 20_000)
    rental = await insert_rental(app_services, user_id, status="completed")
    transfer_id, extension_id = uuid.uuid4(), uuid.uuid4()
    runtime = app_services.runtime
    paid = await runtime.call("wallet", str(user_id), "SpendWallet",
                              {"transfer_id": str(transfer_id), "amount_minor": 5000, "currency": "NPR"}, "pay-1")
    assert paid["ok"]
    result = await runtime.call("rental", str(rental.id), "ExtendRental",
                                {"extension_id": str(extension_id), "minutes": 60, "price_minor": 5000, "transfer_id": str(transfer_id)}, "ext-1")
    assert result == {"ok": False, "reason": "rental_not_active", "status": "completed", "refunded": True}
    await settle(app_services)
    assert (await wallet(app_client, headers))["balance_minor"] == 20_000
    async with app_services.sessions() as session:
        kinds = list((await session.execute(select(LedgerTransfer.kind).order_by(LedgerTransfer.created_at))).scalars())
        assert kinds[-2:] == ["wallet_spend", "refund"]


async def test_return_of_an_extended_rental_bills_no_late_fee_for_the_bought_time(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779819000008")
    await credit_wallet(app_services, user_id, 20_000)
    started = utcnow() - timedelta(minutes=70)  # hour-1: 60 min + 5 grace, so 70 min is late
    rental = await insert_rental(app_services, user_id, status="active", started_at=started, due_at=started + timedelta(minutes=60))
    assert (await app_client.post(f"/api/rentals/{rental.id}/extend", headers=headers, json={"periods": 1})).status_code == 201
    result = await app_services.runtime.call(
        "rental", str(rental.id), "BankReturned", {"station_id": str(rental.station_id), "returned_at": utcnow().isoformat()}, "ret-1"
    )
    assert result["ok"]
    async with app_services.sessions() as session:
        row = await session.get(Rental, rental.id)
    assert row.status == "completed" and row.fee_minor == 5000  # the package price, no late hour


# --- location and issues ----------------------------------------------------------------------


async def test_location_while_the_bank_is_out(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779819000009")
    rental = await insert_rental(app_services, user_id, status="active")
    future = (utcnow() + timedelta(hours=1)).isoformat()
    response = await app_client.post(
        f"/api/rentals/{rental.id}/location", headers=headers,
        json={"latitude": 27.71, "longitude": 85.32, "accuracy_m": 12.5, "recorded_at": future},
    )
    assert response.status_code == 201, response.text
    naive = await app_client.post(
        f"/api/rentals/{rental.id}/location", headers=headers, json={"latitude": 1, "longitude": 1, "recorded_at": "2026-01-01T00:00:00"}
    )
    assert naive.status_code == 400
    off_map = await app_client.post(f"/api/rentals/{rental.id}/location", headers=headers, json={"latitude": 91, "longitude": 0})
    assert off_map.status_code == 400
    done = await insert_rental(app_services, user_id, status="completed")
    closed = await app_client.post(f"/api/rentals/{done.id}/location", headers=headers, json={"latitude": 1, "longitude": 1})
    assert closed.status_code == 409 and closed.json()["error"] == "rental_not_active"
    async with app_services.sessions() as session:
        fixes = list((await session.execute(select(RentalLocation))).scalars())
    assert len(fixes) == 1 and fixes[0].latitude == 27.71 and fixes[0].recorded_at <= utcnow()


async def test_report_issue_on_own_rental(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779819000010")
    rental = await insert_rental(app_services, user_id, status="completed")
    response = await app_client.post(
        f"/api/rentals/{rental.id}/report-issue", headers=headers, json={"kind": "wrong_charge", "description": "charged twice"}
    )
    assert response.status_code == 201 and response.json()["status"] == "open"
    bad = await app_client.post(f"/api/rentals/{rental.id}/report-issue", headers=headers, json={"kind": "wrong_charge", "extra": 1})
    assert bad.status_code == 400
    async with app_services.sessions() as session:
        assert (await session.execute(select(RentalIssue))).scalar_one().rental_id == rental.id

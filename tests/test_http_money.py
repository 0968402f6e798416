"""The points and hybrid-payment endpoints over ASGI: wallet with points, points history and
summary, calculate-options, pay-due; and bad input on each of them (clear 4xx, nothing written)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

import powerbank.actors.rental  # noqa: F401  (registers the Rental handlers)
import powerbank.actors.wallet  # noqa: F401
from powerbank.storage.ledger import ledger_discrepancies
from powerbank.storage.models import ActorCommand, LedgerTransfer, Rental, RentalPackage, Station


@pytest.fixture
async def services(both_app_services):
    """Seeded defaults include the points ratio: 10 points = 100 minor."""
    return both_app_services


@pytest.fixture
async def client(both_app_client):
    return both_app_client


async def sign_up(client, phone: str) -> tuple[dict[str, str], uuid.UUID]:
    code = (await client.post("/api/auth/get-otp", json={"phone": phone, "purpose": "register"})).json()["debug_code"]
    body = (await client.post("/api/auth/register", json={"phone": phone, "code": code})).json()
    return {"Authorization": f"Bearer {body['access_token']}"}, uuid.UUID(body["user"]["id"])


async def credit(services, user_id, amount_minor):
    transfer_id = str(uuid.uuid4())
    payload = {"amount_minor": amount_minor, "currency": "NPR", "transfer_id": transfer_id, "reason": "test"}
    assert (await services.runtime.call("wallet", str(user_id), "CreditWallet", payload, f"credit:{transfer_id}"))["ok"]


async def award(services, user_id, points):
    transfer_id = str(uuid.uuid4())
    payload = {"points": points, "transfer_id": transfer_id, "reason": "test"}
    assert (await services.runtime.call("wallet", str(user_id), "GrantPoints", payload, f"grant:{transfer_id}"))["ok"]


async def rental_with_due(services, user_id, due_minor) -> uuid.UUID:
    async with services.sessions.begin() as session:
        station = Station(serial=uuid.uuid4().hex[:12], name="s", latitude=0, longitude=0, slot_count=4)
        package = (await session.execute(select(RentalPackage).where(RentalPackage.code == "hour-1"))).scalar_one()
        session.add(station)
        await session.flush()
        rental = Rental(user_id=user_id, station_id=station.id, package_id=package.id, currency="NPR",
                        status="completed", fee_minor=due_minor, due_minor=due_minor)
        session.add(rental)
    return rental.id


async def written(services) -> tuple[int, int]:
    """(ledger transfers, wallet commands) so far: a refused request must change neither...
    except that a refused actor command leaves its own row, so those are counted by outcome."""
    async with services.sessions() as session:
        transfers = await session.scalar(select(func.count()).select_from(LedgerTransfer))
        applied = await session.scalar(
            select(func.count()).select_from(ActorCommand).where(ActorCommand.kind == "wallet", ActorCommand.name == "PayDue")
        )
        assert await ledger_discrepancies(session) == []
    return transfers, applied


async def test_wallet_shows_points_and_their_value(client, services):
    headers, user_id = await sign_up(client, "+9779814000001")
    await credit(services, user_id, 10_000)
    await award(services, user_id, 25)
    body = (await client.get("/api/user/wallet", headers=headers)).json()
    assert body["balance_minor"] == 10_000 and body["points"] == 25 and body["points_value_minor"] == 250


async def test_points_history_is_paged_newest_first_with_running_balance(client, services):
    headers, user_id = await sign_up(client, "+9779814000002")
    await credit(services, user_id, 10_000)
    for points in (5, 7, 11):
        await award(services, user_id, points)
    spend = {"points": 4, "transfer_id": str(uuid.uuid4())}
    assert (await services.runtime.call("wallet", str(user_id), "SpendPoints", spend, "spend-1"))["ok"]
    first = (await client.get("/api/points/history?page=1&page_size=2", headers=headers)).json()
    second = (await client.get("/api/points/history?page=2&page_size=2", headers=headers)).json()
    assert first["total"] == 4
    entries = first["items"] + second["items"]
    assert [e["points"] for e in entries] == [-4, 11, 7, 5]
    assert [e["balance_after"] for e in entries] == [19, 23, 12, 5]
    summary = (await client.get("/api/points/summary", headers=headers)).json()
    assert summary["points"] == 19 and summary["value_minor"] == 190
    assert summary["earned_total"] == 23 and summary["spent_total"] == 4
    assert summary["earned_by_kind"] == {"points_award": 23}
    assert summary["ratio"] == {"points": 10, "minor_units": 100}


async def test_calculate_options_for_a_package_splits_points_and_wallet(client, services):
    headers, user_id = await sign_up(client, "+9779814000003")
    await credit(services, user_id, 3000)
    await award(services, user_id, 250)  # worth 2500
    package_id = (await client.get("/api/payment/packages")).json()[0]["id"]  # hour-1, 5000
    body = (await client.post("/api/payment/calculate-options", json={"package_id": package_id}, headers=headers)).json()
    options = {o["mode"]: o for o in body["options"]}
    assert body["amount_minor"] == 5000 and body["purpose"] == "package"
    assert options["points_first"] == {"mode": "points_first", "points": 250, "points_minor": 2500,
                                       "wallet_minor": 2500, "shortfall_minor": 0, "sufficient": True}
    assert options["wallet_first"]["wallet_minor"] == 3000 and options["wallet_first"]["points"] == 200
    assert not options["wallet_only"]["sufficient"] and options["wallet_only"]["shortfall_minor"] == 2000
    assert not options["points_only"]["sufficient"]


async def test_pay_due_with_points_first_then_wallet_is_idempotent(client, services):
    headers, user_id = await sign_up(client, "+9779814000004")
    await credit(services, user_id, 10_000)
    await award(services, user_id, 30)  # worth 300
    rental_id = await rental_with_due(services, user_id, 1234)
    options = (await client.post("/api/payment/calculate-options", json={"rental_id": str(rental_id)}, headers=headers)).json()
    assert options["purpose"] == "due" and options["amount_minor"] == 1234
    body = {"payment_mode": "points_first", "idempotency_key": "pay-1"}
    first = await client.post(f"/api/rentals/{rental_id}/pay-due", json=body, headers=headers)
    assert first.status_code == 200, first.text
    paid = first.json()
    assert (paid["paid_minor"], paid["points"], paid["wallet_minor"], paid["due_minor"]) == (1234, 30, 934, 0)
    assert paid["wallet"]["balance_minor"] == 10_000 - 934 and paid["wallet"]["points"] == 0
    again = await client.post(f"/api/rentals/{rental_id}/pay-due", json=body, headers=headers)
    assert again.json() == paid
    without_key = await client.post(f"/api/rentals/{rental_id}/pay-due", json={}, headers=headers)
    assert without_key.status_code in (200, 409)  # already paid, or the due is already 0
    assert (await client.get("/api/user/wallet", headers=headers)).json()["balance_minor"] == 10_000 - 934
    async with services.sessions() as session:
        assert await ledger_discrepancies(session) == []


async def test_pay_due_short_of_funds_is_409_and_writes_nothing(client, services):
    headers, user_id = await sign_up(client, "+9779814000005")
    await credit(services, user_id, 100)
    rental_id = await rental_with_due(services, user_id, 5000)
    before, _ = await written(services)
    response = await client.post(f"/api/rentals/{rental_id}/pay-due", json={"payment_mode": "wallet_first"}, headers=headers)
    assert response.status_code == 409
    assert response.json()["error"] == "insufficient_funds" and response.json()["shortfall_minor"] == 4900
    assert (await written(services))[0] == before


BAD_OPTIONS = [
    ({"amount_minor": 0, "currency": "NPR"}, 400),
    ({"amount_minor": -5, "currency": "NPR"}, 400),
    ({"amount_minor": 10**15, "currency": "NPR"}, 400),
    ({"amount_minor": 1.5, "currency": "NPR"}, 400),
    ({"amount_minor": 100, "currency": "XYZ"}, 422),
    ({"amount_minor": 100, "currency": "npr"}, 400),
    ({"amount_minor": 100}, 422),
    ({}, 422),
    ({"package_id": str(uuid.uuid4())}, 404),
    ({"rental_id": str(uuid.uuid4())}, 404),
    ({"amount": 100, "currency": "NPR"}, 400),
]


@pytest.mark.parametrize("body,status", BAD_OPTIONS)
async def test_bad_calculate_options_input_is_a_clear_4xx(client, services, body, status):
    headers, _ = await sign_up(client, "+9779814000006")
    before = await written(services)
    response = await client.post("/api/payment/calculate-options", json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"] and response.json()["detail"]
    assert await written(services) == before


async def test_someone_elses_rental_is_404_for_options_and_pay_due(client, services):
    owner_headers, owner_id = await sign_up(client, "+9779814000007")
    other_headers, other_id = await sign_up(client, "+9779814000008")
    await credit(services, other_id, 100_000)
    rental_id = await rental_with_due(services, owner_id, 500)
    before = await written(services)
    options = await client.post("/api/payment/calculate-options", json={"rental_id": str(rental_id)}, headers=other_headers)
    pay = await client.post(f"/api/rentals/{rental_id}/pay-due", json={}, headers=other_headers)
    assert (options.status_code, options.json()["error"]) == (404, "rental_not_found")
    assert (pay.status_code, pay.json()["error"]) == (404, "rental_not_found")
    assert await written(services) == before


@pytest.mark.parametrize("body", [{"payment_mode": "cash"}, {"payment_mode": 1}, {"amount_minor": 5}, {"idempotency_key": ""}])
async def test_bad_pay_due_body_is_400_and_writes_nothing(client, services, body):
    headers, user_id = await sign_up(client, "+9779814000009")
    await credit(services, user_id, 10_000)
    rental_id = await rental_with_due(services, user_id, 500)
    before = await written(services)
    response = await client.post(f"/api/rentals/{rental_id}/pay-due", json=body, headers=headers)
    assert response.status_code == 400, response.text
    assert await written(services) == before


async def test_pay_due_without_a_due_is_409_and_unauthenticated_is_401(client, services):
    headers, user_id = await sign_up(client, "+9779814000010")
    rental_id = await rental_with_due(services, user_id, 0)
    response = await client.post(f"/api/rentals/{rental_id}/pay-due", json={}, headers=headers)
    assert (response.status_code, response.json()["error"]) == (409, "nothing_due")
    assert (await client.post(f"/api/rentals/{rental_id}/pay-due", json={})).status_code == 401
    assert (await client.get("/api/points/history")).status_code == 401

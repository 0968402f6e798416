"""POST /api/rentals/start and the rental reads, over ASGI.

Most tests inject a starter that plays the Rental actor (so each outcome can be forced); one
runs the real actors through a refusal that needs no station (insufficient funds)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
import pytest

import powerbank.actors.rental  # noqa: F401  (registers the Rental handlers)
import powerbank.actors.wallet  # noqa: F401
from powerbank.http.app import create_app
from powerbank.http.auth import AuthPolicy
from powerbank.http.routes_rentals import rental_id_for, start_outcome
from powerbank.http.testing import running_services, settings_for_tests
from powerbank.storage.models import PowerBank, Rental, RentalPackage, Station, User
from powerbank.storage.types import utcnow

POLICY = AuthPolicy(otp_echo=True, otp_rate_per_ip=1000)


class FakeStarter:
    """Plays the Rental actor: writes the rental row in the status it is told to end in."""

    def __init__(self, services) -> None:
        self.services = services
        self.calls: list[dict] = []
        self.outcome = ("active", None)
        self.bank_id: uuid.UUID | None = None

    async def __call__(self, runtime, *, rental_id, user_id, station_id, package_id, timeout_s):
        self.calls.append(dict(rental_id=rental_id, user_id=user_id, station_id=station_id, package_id=package_id, timeout_s=timeout_s))
        status, reason = self.outcome
        if status == "timeout":
            raise TimeoutError
        async with self.services.sessions.begin() as session:
            rental = await session.get(Rental, rental_id)
            if rental is None:
                rental = Rental(
                    id=rental_id, user_id=user_id, station_id=station_id, package_id=package_id,
                    currency="NPR", status=status, cancel_reason=reason, hold_minor=5000,
                    power_bank_id=self.bank_id if status == "active" else None,
                    slot_number=1 if status == "active" else None,
                    started_at=utcnow() if status == "active" else None,
                )
                session.add(rental)
            return {"id": str(rental.id), "status": rental.status, "cancel_reason": rental.cancel_reason}


@pytest.fixture
async def services(tmp_path):
    settings = settings_for_tests(tmp_path, rental_start_timeout_ms=1500)
    async with running_services(settings) as services:
        yield services


@pytest.fixture
async def world(services):
    """An online and an offline station, a bank, active and retired packages."""
    async with services.sessions.begin() as session:
        online = Station(serial="SN-ON", name="On", latitude=27.7, longitude=85.3, status="online", slot_count=4)
        offline = Station(serial="SN-OFF", name="Off", latitude=27.7, longitude=85.3, status="offline", slot_count=4)
        package = RentalPackage(code="1H", name="One hour", duration_minutes=60, price_minor=5000, currency="NPR", max_duration_minutes=1440)
        retired = RentalPackage(code="OLD", name="Old", duration_minutes=60, price_minor=5000, currency="NPR", max_duration_minutes=1440, is_active=False)
        session.add_all([online, offline, package, retired])
        await session.flush()
        bank = PowerBank(serial="BANK-1", currency="NPR", status="rented")
        session.add(bank)
        await session.flush()
        return {"online": online, "offline": offline, "package": package, "retired": retired, "bank": bank}


@pytest.fixture
async def starter(services, world):
    fake = FakeStarter(services)
    fake.bank_id = world["bank"].id
    return fake


@pytest.fixture
async def client(services, starter):
    app = create_app(services, auth_policy=POLICY, start_rental=starter)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


async def sign_up(client, phone: str) -> tuple[dict[str, str], uuid.UUID]:
    code = (await client.post("/api/auth/get-otp", json={"phone": phone, "purpose": "register"})).json()["debug_code"]
    body = (await client.post("/api/auth/register", json={"phone": phone, "code": code})).json()
    return {"Authorization": f"Bearer {body['access_token']}"}, uuid.UUID(body["user"]["id"])


def start_body(world, **extra) -> dict:
    return {"station_sn": "SN-ON", "package_id": str(world["package"].id), **extra}


async def test_active_rental_is_201_with_station_bank_and_package(client, world, starter, services):
    headers, user_id = await sign_up(client, "+9779813000001")
    response = await client.post("/api/rentals/start", json=start_body(world), headers=headers)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "active"
    assert (body["station_sn"], body["power_bank_serial"], body["package_code"]) == ("SN-ON", "BANK-1", "1H")
    call = starter.calls[0]
    assert call["user_id"] == user_id and call["station_id"] == world["online"].id
    assert call["package_id"] == world["package"].id and call["timeout_s"] == 1.5
    assert isinstance(call["rental_id"], uuid.UUID) and str(call["rental_id"]) == body["id"]


@pytest.mark.parametrize(
    "reason",
    ["insufficient_funds", "too_many_active_rentals", "unpaid_dues", "no_bank_available", "eject_failed", "station_offline"],
)
async def test_cancelled_rental_is_409_with_the_reason(client, world, starter, reason):
    headers, _ = await sign_up(client, "+9779813000002")
    starter.outcome = ("cancelled", reason)
    response = await client.post("/api/rentals/start", json=start_body(world), headers=headers)
    assert response.status_code == 409
    body = response.json()
    assert body["error"] == reason and body["detail"]
    assert body["rental"]["status"] == "cancelled" and body["rental"]["cancel_reason"] == reason


async def test_still_ejecting_at_the_deadline_is_202(client, world, starter):
    headers, _ = await sign_up(client, "+9779813000003")
    starter.outcome = ("ejecting", None)
    response = await client.post("/api/rentals/start", json=start_body(world), headers=headers)
    assert response.status_code == 202 and response.json()["status"] == "ejecting"
    starter.outcome = ("timeout", None)
    response = await client.post("/api/rentals/start", json=start_body(world), headers=headers)
    assert response.status_code == 202 and response.json()["status"] == "pending"


async def test_idempotency_key_names_one_rental_per_person(client, world, starter):
    headers, user_id = await sign_up(client, "+9779813000004")
    first = await client.post("/api/rentals/start", json=start_body(world, idempotency_key="tap-1"), headers=headers)
    again = await client.post("/api/rentals/start", json=start_body(world, idempotency_key="tap-1"), headers=headers)
    other = await client.post("/api/rentals/start", json=start_body(world, idempotency_key="tap-2"), headers=headers)
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert first.json()["id"] == str(rental_id_for(user_id, "tap-1"))
    someone_else = rental_id_for(uuid.uuid4(), "tap-1")
    assert str(someone_else) != first.json()["id"]


async def test_start_validates_station_and_package_before_the_actor(client, world, starter):
    headers, _ = await sign_up(client, "+9779813000005")
    cases = [
        ({"station_sn": "NOPE", "package_id": str(world["package"].id)}, 404, "station_not_found"),
        ({"station_sn": "SN-OFF", "package_id": str(world["package"].id)}, 409, "station_offline"),
        ({"station_sn": "SN-ON", "package_id": str(uuid.uuid4())}, 404, "package_not_found"),
        ({"station_sn": "SN-ON", "package_id": str(world["retired"].id)}, 422, "package_inactive"),
        ({"station_sn": "SN-ON", "package_id": "not-a-uuid"}, 400, "validation_failed"),
    ]
    for payload, status, error in cases:
        response = await client.post("/api/rentals/start", json=payload, headers=headers)
        assert (response.status_code, response.json()["error"]) == (status, error), payload
    assert starter.calls == []
    assert (await client.post("/api/rentals/start", json=start_body(world))).status_code == 401


async def test_active_and_history_show_only_the_callers_rentals_newest_first(client, world, services):
    headers, me = await sign_up(client, "+9779813000006")
    _, other = await sign_up(client, "+9779813000007")
    now = utcnow()
    async with services.sessions.begin() as session:
        def rental(user_id, status, minutes_ago):
            return Rental(
                user_id=user_id, station_id=world["online"].id, package_id=world["package"].id, currency="NPR",
                status=status, created_at=now - timedelta(minutes=minutes_ago),
                cancel_reason="no_bank_available" if status == "cancelled" else None,
            )
        mine = [rental(me, "completed", 30), rental(me, "cancelled", 20), rental(me, "active", 10)]
        session.add_all([*mine, rental(other, "active", 5), rental(other, "completed", 1)])

    active = (await client.get("/api/rentals/active", headers=headers)).json()
    assert [r["id"] for r in active] == [str(mine[2].id)]
    history = (await client.get("/api/rentals/history", headers=headers)).json()
    assert [r["id"] for r in history["items"]] == [str(r.id) for r in reversed(mine)]
    assert history["total"] == 3
    page = (await client.get("/api/rentals/history", params={"page": 2, "page_size": 2}, headers=headers)).json()
    assert [r["id"] for r in page["items"]] == [str(mine[0].id)]
    completed = (await client.get("/api/rentals/history", params={"status": "completed"}, headers=headers)).json()
    assert [r["status"] for r in completed["items"]] == ["completed"]
    assert (await client.get(f"/api/rentals/{mine[0].id}", headers=headers)).status_code == 200
    # Somebody else's rental does not exist, as far as this caller can tell.
    async with services.sessions() as session:
        foreign = (await session.execute(Rental.__table__.select().where(Rental.user_id == other))).first()
    hidden = await client.get(f"/api/rentals/{foreign.id}", headers=headers)
    assert hidden.status_code == 404 and hidden.json()["error"] == "rental_not_found"


def test_start_outcome_maps_status_to_http():
    assert start_outcome("active") == 201
    assert start_outcome("cancelled") == 409
    assert start_outcome("pending") == 202 and start_outcome("ejecting") == 202


async def test_real_actors_refuse_an_empty_wallet_with_409(services, world):
    """Default starter: the Rental and Wallet actors run for real; the hold is refused before
    any station is involved."""
    app = create_app(services, auth_policy=POLICY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        headers, user_id = await sign_up(client, "+9779813000008")
        response = await client.post("/api/rentals/start", json=start_body(world), headers=headers)
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "insufficient_funds"
    async with services.sessions() as session:
        rental = await session.get(Rental, uuid.UUID(response.json()["rental"]["id"]))
        assert (rental.status, rental.cancel_reason, rental.user_id) == ("cancelled", "insufficient_funds", user_id)
        assert (await session.get(User, user_id)) is not None

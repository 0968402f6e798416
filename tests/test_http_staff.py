"""Staff over HTTP: tenants, roles, operators scoped to their own stations (404 outside),
maintenance through the Station actor, and the AdminActionLog of every action. Embedded
default (SQLite, in-process runtime)."""

from __future__ import annotations

import secrets
import uuid

import pytest
from sqlalchemy import select

import powerbank.actors.station  # noqa: F401  (registers SetMaintenance)
import powerbank.actors.wallet  # noqa: F401  (registers CreditWallet)
from powerbank.http.auth import create_access_token, ensure_admin_token
from powerbank.http.testing import bearer
from powerbank.storage.models import AdminActionLog, PowerBank, Station, StationSlot, StationStatusChange, User
from powerbank.storage.types import utcnow

@pytest.fixture
async def services(app_services):
    return app_services


@pytest.fixture
async def client(app_client):
    return app_client


async def person(services, role: str = "user", tenant_id=None) -> tuple[uuid.UUID, dict[str, str]]:
    """A person with this role (and tenant) in the table, and a token claiming the same."""
    async with services.sessions.begin() as session:
        user = User(phone=f"+97798{secrets.randbelow(10**8):08d}", role=role, tenant_id=tenant_id, referral_code=secrets.token_hex(4).upper())
        session.add(user)
        await session.flush()
        user_id = user.id
    return user_id, bearer(create_access_token(services.settings, user_id, role))


async def station(services, serial: str, tenant_id=None, status="online") -> uuid.UUID:
    async with services.sessions.begin() as session:
        row = Station(serial=serial, name=serial, latitude=27.7, longitude=85.3, status=status, slot_count=1,
                      tenant_id=tenant_id, last_seen_at=utcnow())
        session.add(row)
        await session.flush()
        return row.id


async def tenant(client, admin: dict[str, str], slug: str) -> uuid.UUID:
    response = await client.post("/api/admin/tenants", json={"name": slug.title(), "slug": slug}, headers=admin)
    assert response.status_code == 201, response.text
    return uuid.UUID(response.json()["id"])


@pytest.fixture
async def admin(services) -> dict[str, str]:
    return bearer(await ensure_admin_token(services, "+9779800000001"))


async def test_an_operator_sees_and_manages_only_their_tenants_stations(client, services, admin):
    acme, volt = await tenant(client, admin, "acme"), await tenant(client, admin, "volt")
    own, foreign, platform = await station(services, "ST-ACME", acme), await station(services, "ST-VOLT", volt), await station(services, "ST-PLAT")
    _, operator = await person(services, "operator", acme)

    listed = (await client.get("/api/admin/stations", headers=operator)).json()
    assert [s["serial"] for s in listed["items"]] == ["ST-ACME"] and listed["total"] == 1
    every = (await client.get("/api/admin/stations", headers=admin)).json()
    assert {s["serial"] for s in every["items"]} == {"ST-ACME", "ST-VOLT", "ST-PLAT"}

    for other in (foreign, platform):  # not found, not forbidden: existence does not leak
        for method, path, body in (
            ("GET", f"/api/admin/stations/{other}/status-history", None),
            ("POST", f"/api/admin/stations/{other}/mqtt-credentials", None),
            ("PUT", f"/api/admin/stations/{other}/maintenance", {"maintenance": True}),
        ):
            response = await client.request(method, path, json=body, headers=operator)
            assert response.status_code == 404 and response.json()["error"] == "station_not_found", (path, response.text)
    async with services.readonly() as session:
        assert (await session.get(Station, foreign)).mqtt_password_hash is None
        assert (await session.get(Station, foreign)).status == "online"

    assert (await client.get(f"/api/admin/stations/{own}/status-history", headers=operator)).status_code == 200
    assert (await client.post(f"/api/admin/stations/{own}/mqtt-credentials", headers=operator)).status_code == 200


async def test_admin_and_staff_endpoints_refuse_whoever_lacks_the_role(client, services, admin):
    acme = await tenant(client, admin, "acme")
    rider_id, rider = await person(services)
    _, operator = await person(services, "operator", acme)
    for path in ("/api/admin/stations", "/api/admin/action-logs", "/api/admin/tenants"):
        response = await client.get(path, headers=rider)
        assert response.status_code == 403 and response.json()["error"] == "forbidden"
    # Operators manage stations, not tenants, roles or money.
    assert (await client.get("/api/admin/tenants", headers=operator)).status_code == 403
    assert (await client.put(f"/api/admin/users/{rider_id}/role", json={"role": "operator", "tenant_id": str(acme)}, headers=operator)).status_code == 403
    credit = {"amount_minor": 100, "currency": "NPR", "reason": "x"}
    assert (await client.post(f"/api/admin/wallets/{rider_id}/credit", json=credit, headers=operator)).status_code == 403
    # A token claiming operator for someone the table calls a rider: refused.
    claimed = bearer(create_access_token(services.settings, rider_id, "operator"))
    assert (await client.get("/api/admin/stations", headers=claimed)).status_code == 403
    assert (await client.get("/api/admin/stations")).status_code == 401


async def test_maintenance_parks_a_station_through_its_actor_and_brings_it_back(client, services, admin):
    acme = await tenant(client, admin, "acme")
    own = await station(services, "ST-PARK", acme)
    _, operator = await person(services, "operator", acme)
    url = f"/api/admin/stations/{own}/maintenance"

    parked = await client.put(url, json={"maintenance": True, "reason": "cleaning"}, headers=operator)
    assert parked.status_code == 200, parked.text
    assert parked.json()["status"] == "maintenance"
    again = await client.put(url, json={"maintenance": True}, headers=operator)
    assert again.json()["status"] == "maintenance"
    back = await client.put(url, json={"maintenance": False}, headers=operator)
    assert back.json()["status"] == "online"  # heard from just now
    async with services.readonly() as session:
        changes = (await session.execute(
            select(StationStatusChange.to_status, StationStatusChange.reason)
            .where(StationStatusChange.station_id == own).order_by(StationStatusChange.id)
        )).all()
        logged = (await session.execute(
            select(AdminActionLog.action).where(AdminActionLog.target_id == str(own)).order_by(AdminActionLog.id)
        )).scalars().all()
    assert [tuple(c) for c in changes] == [("maintenance", "cleaning"), ("online", "operator")]
    assert logged == ["station_parked", "station_unparked"]  # the repeat changed nothing and logs nothing

    bad = await client.put(url, json={"maintenance": "yes"}, headers=operator)
    assert bad.status_code == 400
    unknown = await client.put(url, json={"maintenance": True, "extra": 1}, headers=operator)
    assert unknown.status_code == 400


async def test_tenants_are_unique_and_validated(client, admin):
    await tenant(client, admin, "acme-power")
    duplicate = await client.post("/api/admin/tenants", json={"name": "Other", "slug": "acme-power"}, headers=admin)
    assert duplicate.status_code == 409 and duplicate.json()["error"] == "tenant_exists"
    for bad in ({"name": "X", "slug": "Has Spaces"}, {"name": "", "slug": "ok"}, {"name": "X", "slug": "ok", "url": "ftp://x"}):
        assert (await client.post("/api/admin/tenants", json=bad, headers=admin)).status_code == 400
    page = (await client.get("/api/admin/tenants", headers=admin)).json()
    assert [(t["slug"], t["stations"], t["staff"]) for t in page["items"]] == [("acme-power", 0, 0)]


async def test_roles_follow_who_may_grant_what(client, services, admin):
    acme = await tenant(client, admin, "acme")
    rider_id, _ = await person(services)
    url = f"/api/admin/users/{rider_id}/role"

    made = await client.put(url, json={"role": "operator", "tenant_id": str(acme)}, headers=admin)
    assert made.status_code == 200 and made.json() == {"user_id": str(rider_id), "role": "operator", "tenant_id": str(acme)}
    # The new operator signs in again (a token claiming operator) and sees the tenant's stations.
    await station(services, "ST-ROLE", acme)
    operator = bearer(create_access_token(services.settings, rider_id, "operator"))
    assert (await client.get("/api/admin/stations", headers=operator)).json()["total"] == 1

    refused = await client.put(url, json={"role": "admin"}, headers=admin)
    assert refused.status_code == 403 and refused.json()["error"] == "role_not_grantable"
    no_tenant = await client.put(url, json={"role": "operator"}, headers=admin)
    assert no_tenant.status_code == 409 and no_tenant.json()["error"] == "tenant_required"
    missing_tenant = await client.put(url, json={"role": "operator", "tenant_id": str(uuid.uuid4())}, headers=admin)
    assert missing_tenant.status_code == 404 and missing_tenant.json()["error"] == "tenant_not_found"
    assert (await client.put(f"/api/admin/users/{uuid.uuid4()}/role", json={"role": "user"}, headers=admin)).status_code == 404

    superadmin = bearer(await ensure_admin_token(services, "+9779800000009", role="superadmin"))
    promoted = await client.put(url, json={"role": "admin"}, headers=superadmin)
    assert promoted.status_code == 200 and promoted.json()["tenant_id"] is None
    page = (await client.get("/api/admin/tenants", headers=admin)).json()
    assert page["items"][0]["staff"] == 0


async def test_every_action_is_logged_and_operators_read_only_their_tenants(client, services, admin):
    acme, volt = await tenant(client, admin, "acme"), await tenant(client, admin, "volt")
    platform_station = await station(services, "ST-MOVE")
    moved = await client.put(f"/api/admin/stations/{platform_station}/tenant", json={"tenant_id": str(acme)}, headers=admin)
    assert moved.status_code == 200 and moved.json()["tenant_id"] == str(acme)
    volt_station = await station(services, "ST-VOLT", volt)
    _, acme_operator = await person(services, "operator", acme)
    _, volt_operator = await person(services, "operator", volt)
    await client.put(f"/api/admin/stations/{platform_station}/maintenance", json={"maintenance": True}, headers=acme_operator)
    await client.post(f"/api/admin/stations/{volt_station}/mqtt-credentials", headers=volt_operator)

    everything = (await client.get("/api/admin/action-logs", headers=admin)).json()
    assert [item["action"] for item in everything["items"]] == [
        "station_credentials_issued", "station_parked", "station_assigned", "tenant_created", "tenant_created",
    ]
    acme_view = (await client.get("/api/admin/action-logs", headers=acme_operator)).json()
    assert [item["action"] for item in acme_view["items"]] == ["station_parked", "station_assigned", "tenant_created"]
    assert all(item["tenant_id"] == str(acme) for item in acme_view["items"])
    by_target = (await client.get("/api/admin/action-logs", params={"target_type": "station", "target_id": str(volt_station)}, headers=admin)).json()
    assert [item["action"] for item in by_target["items"]] == ["station_credentials_issued"]
    assert by_target["items"][0]["actor_role"] == "operator"


async def test_admins_find_people_read_their_wallet_and_block_them(client, services, admin):
    rider_id, rider = await person(services)
    other_id, _ = await person(services)
    async with services.readonly() as session:
        phone = (await session.get(User, rider_id)).phone

    found = (await client.get("/api/admin/users", params={"phone": phone}, headers=admin)).json()
    assert [item["id"] for item in found["items"]] == [str(rider_id)]
    riders = (await client.get("/api/admin/users", params={"role": "user"}, headers=admin)).json()
    assert {str(rider_id), str(other_id)} <= {item["id"] for item in riders["items"]}
    assert all(item["role"] == "user" for item in riders["items"])
    assert (await client.get("/api/admin/users", params={"phone": "98%"}, headers=admin)).status_code == 400

    detail = (await client.get(f"/api/admin/users/{rider_id}", headers=admin)).json()
    assert detail["user"]["phone"] == phone and detail["wallet"]["balance_minor"] == 0 and detail["rentals_total"] == 0
    assert (await client.get(f"/api/admin/users/{uuid.uuid4()}", headers=admin)).status_code == 404

    assert (await client.get("/api/user/wallet", headers=rider)).status_code == 200
    blocked = await client.put(f"/api/admin/users/{rider_id}/status", json={"status": "blocked", "reason": "fraud"}, headers=admin)
    assert blocked.status_code == 200 and blocked.json()["status"] == "blocked"
    assert (await client.get("/api/user/wallet", headers=rider)).status_code == 401  # at once
    await client.put(f"/api/admin/users/{rider_id}/status", json={"status": "active", "reason": "appeal"}, headers=admin)
    assert (await client.get("/api/user/wallet", headers=rider)).status_code == 200
    logged = (await client.get("/api/admin/action-logs", params={"target_id": str(rider_id)}, headers=admin)).json()
    assert [item["action"] for item in logged["items"]] == ["user_unblocked", "user_blocked"]
    assert logged["items"][1]["details"]["reason"] == "fraud"

    peer_id, _ = await person(services, "admin")
    refused = await client.put(f"/api/admin/users/{peer_id}/status", json={"status": "blocked", "reason": "x"}, headers=admin)
    assert refused.status_code == 403 and refused.json()["error"] == "role_not_grantable"


async def station_with_banks(services, serial: str, tenant_id, banks: list[str | None]) -> uuid.UUID:
    """An online station whose slots 1..n hold these bank serials (None: empty)."""
    station_id = await station(services, serial, tenant_id)
    async with services.sessions.begin() as session:
        for number, bank_serial in enumerate(banks, start=1):
            bank_id = None
            if bank_serial is not None:
                bank = PowerBank(serial=bank_serial, charge_percent=90, currency="NPR", station_id=station_id)
                session.add(bank)
                await session.flush()
                bank_id = bank.id
            session.add(StationSlot(station_id=station_id, slot_number=number, power_bank_id=bank_id,
                                    status="occupied" if bank_id else "empty"))
    return station_id


async def test_field_staff_eject_a_bank_of_their_own_stations_only(client, services, admin):
    acme, volt = await tenant(client, admin, "acme"), await tenant(client, admin, "volt")
    own = await station_with_banks(services, "ST-EJ-ACME", acme, ["PB-E1", None])
    foreign = await station_with_banks(services, "ST-EJ-VOLT", volt, ["PB-E2"])
    _, operator = await person(services, "operator", acme)
    _, rider = await person(services, "user")

    body = {"slot": 1, "reason": "swollen battery"}
    refused = await client.post(f"/api/admin/stations/{own}/eject", json=body, headers=rider)
    assert refused.status_code == 403
    hidden = await client.post(f"/api/admin/stations/{foreign}/eject", json=body, headers=operator)
    assert hidden.status_code == 404 and hidden.json()["error"] == "station_not_found"
    assert (await client.post(f"/api/admin/stations/{own}/eject", json={"slot": 1}, headers=operator)).status_code == 400

    sent = await client.post(f"/api/admin/stations/{own}/eject", json=body, headers=operator)
    assert sent.status_code == 202, sent.text
    assert (sent.json()["slot"], sent.json()["bank_serial"]) == (1, "PB-E1") and sent.json()["eject_command_id"]
    busy = await client.post(f"/api/admin/stations/{own}/eject", json=body, headers=operator)
    assert busy.status_code == 409 and busy.json()["error"] == "slot_ejecting"
    empty = await client.post(f"/api/admin/stations/{own}/eject", json={"slot": 2, "reason": "x"}, headers=operator)
    assert empty.status_code == 409 and empty.json()["error"] == "slot_empty"

    async with services.readonly() as session:
        slot = (await session.execute(select(StationSlot).where(StationSlot.station_id == own, StationSlot.slot_number == 1))).scalar_one()
        assert (slot.status, slot.eject_command_id, slot.ejecting_rental_id) == ("ejecting", sent.json()["eject_command_id"], None)
        foreign_bank = (await session.execute(select(PowerBank).where(PowerBank.serial == "PB-E2"))).scalar_one()
        assert foreign_bank.status == "in_slot"
        [logged] = (await session.execute(select(AdminActionLog).where(AdminActionLog.action == "station_service_eject"))).scalars()
        assert (logged.tenant_id, logged.target_id, logged.details["reason"]) == (acme, str(own), "swollen battery")

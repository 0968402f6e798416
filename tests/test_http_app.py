"""Stations with live availability, packages, health, wallet reads, admin credit, OpenAPI and
metrics, over ASGI on a throwaway SQLite database."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import update

import powerbank.actors.wallet  # noqa: F401  (registers OpenWallet and CreditWallet)
from powerbank.http.app import create_app, openapi_document
from powerbank.http.auth import create_access_token, ensure_admin_token
from powerbank.http.routes_app import bounding_box, distance_m, is_rentable
from powerbank.http.testing import TEST_AUTH_POLICY, bearer, client_for, running_services, settings_for_tests, sign_up_body
from powerbank.storage.models import (
    LedgerAccount,
    PowerBank,
    RentalPackage,
    Station,
    StationSlot,
    StationStatusChange,
    User,
    Wallet,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture
async def services(tmp_path):
    async with running_services(settings_for_tests(tmp_path)) as services:
        yield services


@pytest.fixture
async def client(services):
    async with client_for(create_app(services, auth_policy=TEST_AUTH_POLICY)) as client:
        yield client


async def add_station(services, serial: str, *, status="online", lat=27.7, lng=85.3, slots=()):
    """`slots`: per slot, None for empty or (charge_percent, bank_status)."""
    async with services.sessions.begin() as session:
        station = Station(serial=serial, name=f"Station {serial}", latitude=lat, longitude=lng, status=status, slot_count=len(slots) or 1)
        session.add(station)
        await session.flush()
        for number, content in enumerate(slots, start=1):
            if content is None:
                session.add(StationSlot(station_id=station.id, slot_number=number, status="empty"))
                continue
            charge, bank_status = content
            bank = PowerBank(serial=f"{serial}-B{number}", charge_percent=charge, status=bank_status, currency="NPR", station_id=station.id)
            session.add(bank)
            await session.flush()
            session.add(StationSlot(station_id=station.id, slot_number=number, status="occupied", power_bank_id=bank.id))
        return station.id


# --- stations -------------------------------------------------------------------------------


async def test_station_list_counts_only_charged_banks_in_slots(client, services):
    await add_station(services, "SN-A", slots=[(90, "in_slot"), (19, "in_slot"), (20, "in_slot"), None, (100, "faulty")])
    await add_station(services, "SN-B", status="offline", slots=[None, None])

    response = await client.get("/api/app/stations")
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == 2 and body["page"] == 1
    by_serial = {s["serial"]: s for s in body["items"]}
    assert (by_serial["SN-A"]["available_banks"], by_serial["SN-A"]["empty_slots"]) == (2, 1)
    assert (by_serial["SN-B"]["available_banks"], by_serial["SN-B"]["empty_slots"]) == (0, 2)
    assert by_serial["SN-B"]["status"] == "offline"
    assert by_serial["SN-A"]["latitude"] == 27.7


async def test_station_list_filters_and_pages(client, services):
    for index in range(5):
        await add_station(services, f"SN-{index}", status="online" if index % 2 == 0 else "offline", slots=[None])
    online = (await client.get("/api/app/stations", params={"status": "online"})).json()
    assert [s["serial"] for s in online["items"]] == ["SN-0", "SN-2", "SN-4"]
    page2 = (await client.get("/api/app/stations", params={"page": 2, "page_size": 2})).json()
    assert [s["serial"] for s in page2["items"]] == ["SN-2", "SN-3"] and page2["total"] == 5
    bad = await client.get("/api/app/stations", params={"status": "exploded", "page": 0})
    assert bad.status_code == 400 and bad.json()["error"] == "validation_failed"
    assert {f["field"] for f in bad.json()["fields"]} >= {"page"}


async def test_nearby_sorts_by_distance_within_radius(client, services):
    await add_station(services, "FAR", lat=27.80, lng=85.30, slots=[None])  # about 11 km north
    await add_station(services, "NEAR", lat=27.701, lng=85.30, slots=[None])  # about 110 m
    await add_station(services, "MID", lat=27.71, lng=85.30, slots=[None])  # about 1.1 km
    body = (await client.get("/api/app/stations/nearby", params={"lat": 27.7, "lng": 85.3, "radius_m": 5000})).json()
    assert [s["serial"] for s in body["items"]] == ["NEAR", "MID"]
    assert 100 < body["items"][0]["distance_m"] < 120
    listed = (await client.get("/api/app/stations", params={"lat": 27.7, "lng": 85.3, "radius_m": 20000})).json()
    assert [s["serial"] for s in listed["items"]] == ["NEAR", "MID", "FAR"]
    half = await client.get("/api/app/stations", params={"lat": 27.7})
    assert half.status_code == 400 and half.json()["error"] == "validation_failed"


async def test_station_detail_lists_slots_with_charge(client, services):
    await add_station(services, "SN-D", slots=[(85, "in_slot"), None, (10, "in_slot")])
    response = await client.get("/api/app/stations/SN-D")
    assert response.status_code == 200
    body = response.json()
    assert body["available_banks"] == 1 and body["empty_slots"] == 1
    assert [(s["slot_number"], s["status"], s["power_bank_serial"], s["charge_percent"], s["rentable"]) for s in body["slots"]] == [
        (1, "occupied", "SN-D-B1", 85, True),
        (2, "empty", None, None, False),
        (3, "occupied", "SN-D-B3", 10, False),
    ]
    missing = await client.get("/api/app/stations/NOPE")
    assert missing.status_code == 404
    assert missing.json() == {"error": "station_not_found", "detail": missing.json()["detail"]}


def test_pure_station_helpers():
    assert is_rentable("occupied", "in_slot", 20) and not is_rentable("occupied", "in_slot", 19)
    assert not is_rentable("ejecting", "in_slot", 100) and not is_rentable("occupied", "faulty", 100)
    assert distance_m(0, 0, 0, 1) == pytest.approx(111_195, rel=1e-3)
    min_lat, max_lat, min_lng, max_lng = bounding_box(27.7, 85.3, 1000)
    assert min_lat < 27.7 < max_lat and min_lng < 85.3 < max_lng
    assert distance_m(27.7, 85.3, max_lat, 85.3) == pytest.approx(1000, rel=1e-3)


async def test_health_and_packages(client, services):
    health = await client.get("/api/app/health")
    assert health.status_code == 200 and health.json()["database"] == "ok"
    async with services.sessions.begin() as session:
        session.add_all(
            [
                RentalPackage(code="1H", name="One hour", duration_minutes=60, price_minor=5000, currency="NPR", max_duration_minutes=1440, sort_order=1),
                RentalPackage(code="30M", name="Half hour", duration_minutes=30, price_minor=3000, currency="NPR", max_duration_minutes=1440, sort_order=0),
                RentalPackage(code="OLD", name="Retired", duration_minutes=60, price_minor=1, currency="NPR", max_duration_minutes=60, is_active=False),
            ]
        )
    packages = (await client.get("/api/payment/packages")).json()
    assert [p["code"] for p in packages] == ["30M", "1H"]
    assert packages[1]["price_minor"] == 5000 and packages[1]["currency"] == "NPR"


# --- wallet -----------------------------------------------------------------------------------


async def test_wallet_reads_the_ledger_rows(client, services):
    user = await sign_up_body(client, "+9779812000001")
    token, user_id = user["access_token"], uuid.UUID(user["user"]["id"])
    assert (await client.get("/api/user/wallet", headers=bearer(token))).json() == {
        "currency": "NPR", "balance_minor": 0, "held_minor": 0, "available_minor": 0, "points": 0, "points_held": 0,
        "points_value_minor": 0,
    }
    async with services.sessions.begin() as session:
        wallet = (await session.execute(Wallet.__table__.select().where(Wallet.user_id == user_id))).one()
        await session.execute(
            update(LedgerAccount).where(LedgerAccount.id == wallet.account_id).values(credits_posted=10_000, debits_posted=2_500, debits_pending=3_000)
        )
        await session.execute(
            update(LedgerAccount).where(LedgerAccount.id == wallet.points_account_id).values(credits_posted=120, debits_posted=20, debits_pending=0)
        )
    body = (await client.get("/api/user/wallet", headers=bearer(token))).json()
    assert body == {"currency": "NPR", "balance_minor": 7_500, "held_minor": 3_000, "available_minor": 4_500, "points": 100, "points_held": 0,
                    "points_value_minor": 1_000}  # 100 points at the default 10 points = 100 minor
    assert (await client.get("/api/user/wallet")).status_code == 401


async def test_wallet_without_a_wallet_row_reads_zeros(client, services):
    admin_token = await ensure_admin_token(services, "+9779800000009")
    body = (await client.get("/api/user/wallet", headers=bearer(admin_token))).json()
    assert body["balance_minor"] == 0 and body["currency"] == services.settings.currency


# --- admin credit -----------------------------------------------------------------------------


async def test_admin_credit_is_refused_for_users_and_applied_for_admins(client, services):
    rider = await sign_up_body(client, "+9779812000002")
    rider_id = rider["user"]["id"]
    credit = {"amount_minor": 5_000, "currency": "NPR", "reason": "welcome"}

    refused = await client.post(f"/api/admin/wallets/{rider_id}/credit", json=credit, headers=bearer(rider["access_token"]))
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"

    admin_token = await ensure_admin_token(services, "+9779800000001")
    accepted = await client.post(f"/api/admin/wallets/{rider_id}/credit", json=credit, headers=bearer(admin_token))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["wallet"]["balance_minor"] == 5_000
    wallet = (await client.get("/api/user/wallet", headers=bearer(rider["access_token"]))).json()
    assert wallet["balance_minor"] == 5_000 and wallet["available_minor"] == 5_000


async def test_admin_credit_is_idempotent_by_key(client, services):
    rider = await sign_up_body(client, "+9779812000003")
    admin_token = await ensure_admin_token(services, "+9779800000001")
    credit = {"amount_minor": 700, "currency": "NPR", "reason": "refund", "idempotency_key": "ticket-42"}
    url = f"/api/admin/wallets/{rider['user']['id']}/credit"
    first = await client.post(url, json=credit, headers=bearer(admin_token))
    second = await client.post(url, json=credit, headers=bearer(admin_token))
    assert first.status_code == second.status_code == 200
    assert first.json()["transfer_id"] == second.json()["transfer_id"]
    wallet = (await client.get("/api/user/wallet", headers=bearer(rider["access_token"]))).json()
    assert wallet["balance_minor"] == 700


async def test_admin_credit_errors(client, services):
    rider = await sign_up_body(client, "+9779812000004")
    admin_token = await ensure_admin_token(services, "+9779800000001")
    url = f"/api/admin/wallets/{rider['user']['id']}/credit"

    unknown = await client.post(f"/api/admin/wallets/{uuid.uuid4()}/credit", json={"amount_minor": 1, "currency": "NPR", "reason": "x"}, headers=bearer(admin_token))
    assert unknown.status_code == 404 and unknown.json()["error"] == "user_not_found"
    mismatch = await client.post(url, json={"amount_minor": 1, "currency": "USD", "reason": "x"}, headers=bearer(admin_token))
    assert mismatch.status_code == 409 and mismatch.json()["error"] == "currency_mismatch"
    for bad in ({"amount_minor": 0, "currency": "NPR", "reason": "x"}, {"amount_minor": 1.5, "currency": "NPR", "reason": "x"}):
        invalid = await client.post(url, json=bad, headers=bearer(admin_token))
        assert invalid.status_code == 400
        assert [f["field"] for f in invalid.json()["fields"]] == ["amount_minor"]
    lower = await client.post(url, json={"amount_minor": 1, "currency": "npr", "reason": "x"}, headers=bearer(admin_token))
    assert lower.status_code == 400 and lower.json()["fields"][0]["field"] == "currency"


async def test_admin_role_needs_both_the_table_and_the_token(client, services):
    rider = await sign_up_body(client, "+9779812000005")
    url = f"/api/admin/wallets/{rider['user']['id']}/credit"
    credit = {"amount_minor": 1, "currency": "NPR", "reason": "x"}
    # A validly signed token claiming admin for a plain user: the users table says no.
    claimed = create_access_token(services.settings, rider["user"]["id"], "admin")
    assert (await client.post(url, json=credit, headers=bearer(claimed))).status_code == 403
    # An admin demoted after the token was issued: refused at once.
    admin_token = await ensure_admin_token(services, "+9779800000002")
    async with services.sessions.begin() as session:
        await session.execute(update(User).where(User.phone == "+9779800000002").values(role="user"))
    assert (await client.post(url, json=credit, headers=bearer(admin_token))).status_code == 403


# --- OpenAPI, metrics, packaging --------------------------------------------------------------


async def test_openapi_is_served_and_documents_the_api(client):
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.content)
    assert document["info"]["title"] == "powerbank"
    for path in (
        "/api/auth/get-otp", "/api/auth/register", "/api/auth/login", "/api/auth/refresh", "/api/auth/me",
        "/api/app/stations", "/api/app/stations/{sn}", "/api/app/health", "/api/payment/packages",
        "/api/user/wallet", "/api/admin/wallets/{user_id}/credit", "/api/rentals/start",
        "/api/rentals/active", "/api/rentals/history",
    ):
        assert path in document["paths"], path
    start = document["paths"]["/api/rentals/start"]["post"]
    assert {"201", "202", "400", "401", "404", "409"} <= set(start["responses"])
    assert start["security"] == [{"BearerToken": []}]
    error_schema = document["components"]["schemas"]["ErrorBody"]
    assert set(error_schema["required"]) == {"error", "detail"}
    assert "security" not in document["paths"]["/api/app/stations"]["get"]
    # Every documented error is in our shape, none in Litestar's default {status_code, detail}.
    for operations in document["paths"].values():
        for operation in operations.values():
            for code, documented in operation["responses"].items():
                if int(code) >= 400:
                    ref = documented["content"]["application/json"]["schema"]["$ref"]
                    assert ref.rsplit("/", 1)[-1] in ("ErrorBody", "ValidationErrorBody", "RentalRefused"), (code, ref)


def test_openapi_document_without_services_matches():
    document = openapi_document()
    json.dumps(document)  # plain JSON all the way down
    assert "/api/rentals/start" in document["paths"]


async def test_metrics_expose_http_counters(client):
    await client.get("/api/app/health")
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "powerbank_http_requests_total" in response.text
    assert 'path="/api/app/health"' in response.text


def test_stdlib_http_is_not_shadowed_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-c", "import http.client, http.server; print(http.client.__file__)"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    assert str(REPO_ROOT) not in result.stdout
    result = subprocess.run(
        [sys.executable, "-c", "import powerbank.http.app"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# --- station credentials ----------------------------------------------------------------------


async def test_an_admin_issues_station_credentials_that_only_ever_exist_as_a_hash(client, services):
    from powerbank.broker.embedded import verify_password

    station_id = await add_station(services, "ST-CRED-1", slots=[None])
    url = f"/api/admin/stations/{station_id}/mqtt-credentials"
    rider = await sign_up_body(client, "+9779812000077")
    assert (await client.post(url, headers=bearer(rider["access_token"]))).status_code == 403
    admin_token = await ensure_admin_token(services, "+9779800000001")
    first = await client.post(url, headers=bearer(admin_token))
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["serial"], body["username"], body["topic_prefix"]) == ("ST-CRED-1", "ST-CRED-1", "pb/v1/stations/ST-CRED-1/")
    second = (await client.post(url, headers=bearer(admin_token))).json()
    async with services.sessions() as session:
        stored = (await session.get(Station, uuid.UUID(str(station_id)))).mqtt_password_hash
    assert body["password"] not in stored and verify_password(stored, second["password"])
    assert not verify_password(stored, body["password"])  # replaced, not added
    missing = await client.post(f"/api/admin/stations/{uuid.uuid4()}/mqtt-credentials", headers=bearer(admin_token))
    assert missing.status_code == 404 and missing.json()["error"] == "station_not_found"


# --- station status history -------------------------------------------------------------------


async def test_station_status_history_pages_newest_first_with_how_long_each_status_lasted(client, services):
    station_id = await add_station(services, "ST-HIST-1", status="offline")
    t0 = datetime(2026, 11, 1, 8, 0, tzinfo=timezone.utc)
    moves = [("offline", "online", "boot", 0), ("online", "offline", "last_will", 600),
             ("offline", "online", "heartbeat", 660), ("online", "offline", "silent", 4260)]
    async with services.sessions.begin() as session:
        for from_status, to_status, reason, at_s in moves:
            session.add(StationStatusChange(
                station_id=station_id, from_status=from_status, to_status=to_status, reason=reason,
                changed_at=t0 + timedelta(seconds=at_s),
            ))
    url = f"/api/admin/stations/{station_id}/status-history"
    rider = await sign_up_body(client, "+9779812000078")
    assert (await client.get(url, headers=bearer(rider["access_token"]))).status_code == 403
    admin = bearer(await ensure_admin_token(services, "+9779800000001"))
    first = (await client.get(url, params={"page_size": 2}, headers=admin)).json()
    assert (first["serial"], first["status"], first["total"]) == ("ST-HIST-1", "offline", 4)
    assert [(i["to_status"], i["reason"]) for i in first["items"]] == [("offline", "silent"), ("online", "heartbeat")]
    assert first["items"][0]["lasted_s"] > 0  # still offline: lasts until now
    assert first["items"][1]["lasted_s"] == 3600
    second = (await client.get(url, params={"page_size": 2, "page": 2}, headers=admin)).json()
    assert [(i["reason"], i["lasted_s"]) for i in second["items"]] == [("last_will", 60), ("boot", 600)]
    missing = await client.get(f"/api/admin/stations/{uuid.uuid4()}/status-history", headers=admin)
    assert missing.status_code == 404 and missing.json()["error"] == "station_not_found"
    bad = await client.get(url, params={"page_size": 0}, headers=admin)
    assert bad.status_code == 400

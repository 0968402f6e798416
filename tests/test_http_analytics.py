"""Staff analytics over HTTP: counts, revenue, utilisation per station and per hour, scoped by
tenant, on SQLite and (marked) PostgreSQL, where the SQL differs."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from powerbank.http.auth import create_access_token, ensure_admin_token
from powerbank.http.routes_analytics import check_window, utilisation
from powerbank.http.errors import ApiError
from powerbank.http.testing import bearer
from powerbank.storage.models import Rental, RentalPackage, Station, Tenant, User

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc)


@pytest.fixture
async def services(both_app_services):
    return both_app_services


@pytest.fixture
async def client(both_app_client):
    return both_app_client


def test_the_window_defaults_to_a_day_and_is_bounded():
    now = T0
    assert check_window(None, None, now) == (now - timedelta(days=1), now)
    with pytest.raises(ApiError) as backwards:
        check_window(now, now - timedelta(hours=1), now)
    assert backwards.value.status_code == 400
    with pytest.raises(ApiError) as long:
        check_window(now - timedelta(days=32), now, now)
    assert long.value.error == "window_too_long"


def test_utilisation_is_the_share_of_slot_time_rented():
    assert utilisation(3600, 4, 3600) == 0.25
    assert utilisation(0, 4, 3600) == 0.0
    assert utilisation(10**9, 1, 3600) == 1.0
    assert utilisation(5, 0, 3600) == 0.0


async def seed(services):
    """Two tenants, a station each; rentals at known times in a 08:00-12:00 window."""
    async with services.sessions.begin() as session:
        acme, volt = Tenant(name="Acme", slug="acme"), Tenant(name="Volt", slug="volt")
        session.add_all([acme, volt])
        await session.flush()
        a = Station(serial="ST-A", name="A", latitude=0, longitude=0, slot_count=4, tenant_id=acme.id)
        b = Station(serial="ST-B", name="B", latitude=0, longitude=0, slot_count=2, tenant_id=volt.id)
        package = RentalPackage(code="hour", name="1 h", duration_minutes=60, price_minor=100, currency="NPR", max_duration_minutes=600)
        rider = User(phone="+9779811111111", referral_code="RIDER1")
        session.add_all([a, b, package, rider])
        await session.flush()

        def rental(station, start_h, end_h, status, charged=0, back_to=None):
            started = T0 + timedelta(hours=start_h)
            session.add(Rental(
                user_id=rider.id, station_id=station.id, package_id=package.id, currency="NPR", status=status,
                created_at=started, started_at=started if status != "cancelled" else None,
                returned_at=T0 + timedelta(hours=end_h) if end_h is not None else None,
                cancel_reason="eject_failed" if status == "cancelled" else None,
                return_station_id=(back_to or station).id if end_h is not None else None, charged_minor=charged,
            ))

        rental(a, 0.5, 1.5, "completed", 150)           # 1 h inside
        rental(a, 1.0, None, "active")                   # out since 09:00: 3 h inside the window
        rental(a, 2.0, None, "cancelled")                # never started
        rental(b, 3.0, 3.5, "completed", 100, back_to=a)  # returned at A
        rental(a, -2.0, 0.5, "completed", 300)           # started before the window: 0.5 h inside
        return acme.id, a.id, b.id


async def test_a_report_counts_charges_and_measures_each_station(client, services):
    acme, a, b = await seed(services)
    admin = bearer(await ensure_admin_token(services, "+9779800000001"))
    window = {"since": T0.isoformat(), "until": (T0 + timedelta(hours=4)).isoformat()}
    report = await client.get("/api/admin/analytics/rentals", params=window, headers=admin)
    assert report.status_code == 200, report.text
    body = report.json()
    assert body["rentals"] == {"requested": 4, "completed": 2, "cancelled": 1, "lost": 0, "open": 1}
    assert body["revenue"] == [{"currency": "NPR", "charged_minor": 550}]  # returned in the window
    by_serial = {s["serial"]: s for s in body["stations"]}
    assert (by_serial["ST-A"]["started"], by_serial["ST-A"]["returned_here"]) == (2, 3)
    assert by_serial["ST-A"]["rented_s"] == pytest.approx(4.5 * 3600, abs=2)
    assert by_serial["ST-A"]["utilisation"] == pytest.approx(4.5 / 16, abs=1e-3)
    assert (by_serial["ST-B"]["started"], by_serial["ST-B"]["rented_s"]) == (1, 1800)
    hours = {h["hour"][:13]: (h["requested"], h["returned"]) for h in body["hours"]}
    assert hours == {"2026-11-02T08": (1, 1), "2026-11-02T09": (1, 1), "2026-11-02T10": (1, 0), "2026-11-02T11": (1, 1)}


async def test_an_operator_reads_only_their_tenants_figures(client, services):
    acme, a, _ = await seed(services)
    async with services.sessions.begin() as session:
        operator = User(phone=f"+97798{secrets.randbelow(10**8):08d}", role="operator", tenant_id=acme, referral_code="OPER1")
        session.add(operator)
    token = bearer(create_access_token(services.settings, operator.id, "operator"))
    window = {"since": T0.isoformat(), "until": (T0 + timedelta(hours=4)).isoformat()}
    body = (await client.get("/api/admin/analytics/rentals", params=window, headers=token)).json()
    assert [s["serial"] for s in body["stations"]] == ["ST-A"]
    assert body["rentals"]["requested"] == 3
    assert body["revenue"] == [{"currency": "NPR", "charged_minor": 450}]


async def test_riders_get_no_analytics_and_bad_windows_are_refused(client, services):
    async with services.sessions.begin() as session:
        rider = User(phone="+9779812222222", referral_code="RIDER2")
        session.add(rider)
    rider_token = bearer(create_access_token(services.settings, rider.id, "user"))
    assert (await client.get("/api/admin/analytics/rentals", headers=rider_token)).status_code == 403
    admin = bearer(await ensure_admin_token(services, "+9779800000001"))
    assert (await client.get("/api/admin/analytics/rentals", params={"since": "yesterday"}, headers=admin)).status_code == 400
    long = {"since": (T0 - timedelta(days=40)).isoformat(), "until": T0.isoformat()}
    refused = await client.get("/api/admin/analytics/rentals", params=long, headers=admin)
    assert refused.status_code == 400 and refused.json()["error"] == "window_too_long"
    empty = (await client.get("/api/admin/analytics/rentals", headers=admin)).json()
    assert empty["rentals"]["requested"] == 0 and empty["stations"] == [] and empty["hours"] == []

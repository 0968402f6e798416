"""Reserving a bank over HTTP on the embedded default: hold, one at a time, cancel, someone
else's is 404, and a start that names a reservation must be at its station while it holds."""

from __future__ import annotations

import uuid

import powerbank.actors.station  # noqa: F401  (registers ReserveSlot, CancelReservation)
from powerbank.http.testing import sign_up
from powerbank.storage.models import PowerBank, RentalPackage, Station, StationSlot
from powerbank.storage.types import utcnow


async def station_with_banks(services, serial: str, charges: list[int]) -> uuid.UUID:
    async with services.sessions.begin() as session:
        station = Station(serial=serial, name=serial, latitude=27.7, longitude=85.3, status="online",
                          slot_count=len(charges), last_seen_at=utcnow())
        session.add(station)
        await session.flush()
        for number, charge in enumerate(charges, start=1):
            bank = PowerBank(serial=f"{serial}-{number}", charge_percent=charge, status="in_slot", currency="NPR", station_id=station.id)
            session.add(bank)
            await session.flush()
            session.add(StationSlot(station_id=station.id, slot_number=number, status="occupied", power_bank_id=bank.id))
        return station.id


async def test_reserve_hold_list_and_cancel(app_client, app_services):
    await station_with_banks(app_services, "ST-R1", [60, 95])
    me, _ = await sign_up(app_client, "+9779816000001")

    held = await app_client.post("/api/rentals/reserve", json={"station_sn": "ST-R1"}, headers=me)
    assert held.status_code == 201, held.text
    body = held.json()
    assert (body["status"], body["slot_number"], body["station_sn"]) == ("confirmed", 2, "ST-R1")
    again = await app_client.post("/api/rentals/reserve", json={"station_sn": "ST-R1"}, headers=me)
    assert again.status_code == 409 and again.json()["error"] == "reservation_exists"
    [active] = (await app_client.get("/api/rentals/reservations/active", headers=me)).json()
    assert active["id"] == body["id"]
    # The map no longer offers the held bank.
    detail = (await app_client.get("/api/app/stations/ST-R1")).json()
    assert detail["available_banks"] == 1

    stranger, _ = await sign_up(app_client, "+9779816000002")
    assert (await app_client.delete(f"/api/rentals/reservations/{body['id']}", headers=stranger)).status_code == 404
    cancelled = await app_client.delete(f"/api/rentals/reservations/{body['id']}", headers=me)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert (await app_client.get("/api/rentals/reservations/active", headers=me)).json() == []
    # Free to reserve again, and the freed bank is the best again.
    assert (await app_client.post("/api/rentals/reserve", json={"station_sn": "ST-R1"}, headers=me)).json()["slot_number"] == 2


async def test_nothing_to_hold_and_unknown_stations_are_refused(app_client, app_services):
    await station_with_banks(app_services, "ST-R2", [90])
    first, _ = await sign_up(app_client, "+9779816000003")
    second, _ = await sign_up(app_client, "+9779816000004")
    assert (await app_client.post("/api/rentals/reserve", json={"station_sn": "ST-R2"}, headers=first)).status_code == 201
    refused = await app_client.post("/api/rentals/reserve", json={"station_sn": "ST-R2"}, headers=second)
    assert refused.status_code == 409 and refused.json()["error"] == "no_bank_available"
    # The refused reservation is closed, so the second person may try elsewhere at once.
    assert (await app_client.get("/api/rentals/reservations/active", headers=second)).json() == []
    missing = await app_client.post("/api/rentals/reserve", json={"station_sn": "NOPE"}, headers=second)
    assert missing.status_code == 404 and missing.json()["error"] == "station_not_found"
    assert (await app_client.post("/api/rentals/reserve", json={"station_sn": ""}, headers=second)).status_code == 400


async def test_a_start_naming_a_reservation_must_be_at_its_station_while_it_holds(app_client, app_services):
    await station_with_banks(app_services, "ST-R3", [90])
    await station_with_banks(app_services, "ST-R4", [90])
    me, _ = await sign_up(app_client, "+9779816000005")
    held = (await app_client.post("/api/rentals/reserve", json={"station_sn": "ST-R3"}, headers=me)).json()
    async with app_services.readonly() as session:
        from sqlalchemy import select

        package = (await session.execute(select(RentalPackage).limit(1))).scalar_one()
    start = {"station_sn": "ST-R4", "package_id": str(package.id), "reservation_id": held["id"]}
    elsewhere = await app_client.post("/api/rentals/start", json=start, headers=me)
    assert elsewhere.status_code == 409 and elsewhere.json()["error"] == "reservation_elsewhere"
    unknown = await app_client.post("/api/rentals/start", json={**start, "station_sn": "ST-R3", "reservation_id": str(uuid.uuid4())}, headers=me)
    assert unknown.status_code == 404 and unknown.json()["error"] == "reservation_not_found"
    await app_client.delete(f"/api/rentals/reservations/{held['id']}", headers=me)
    gone = await app_client.post("/api/rentals/start", json={**start, "station_sn": "ST-R3"}, headers=me)
    assert gone.status_code == 409 and gone.json()["error"] == "reservation_not_held"

"""Favourite stations and station issue reports, scoped to the caller, over ASGI."""

from __future__ import annotations

from sqlalchemy import select

from powerbank.http.testing import sign_up
from powerbank.storage.models import PowerBank, Station, StationIssue, StationSlot

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


async def add_station(services, serial: str, charges=(90, 10)) -> None:
    async with services.sessions.begin() as session:
        station = Station(serial=serial, name=f"Station {serial}", latitude=27.7, longitude=85.3, status="online", slot_count=len(charges))
        session.add(station)
        await session.flush()
        for number, charge in enumerate(charges, start=1):
            bank = PowerBank(serial=f"{serial}-B{number}", charge_percent=charge, currency="NPR", station_id=station.id)
            session.add(bank)
            await session.flush()
            session.add(StationSlot(station_id=station.id, slot_number=number, status="occupied", power_bank_id=bank.id))


async def test_favourites_are_per_person(app_client, app_services):
    await add_station(app_services, "FAV-1")
    await add_station(app_services, "FAV-2")
    alice, _ = await sign_up(app_client, "+9779817000001")
    bob, _ = await sign_up(app_client, "+9779817000002")

    first = await app_client.post("/api/stations/FAV-1/favorite", headers=alice)
    assert first.status_code == 201 and first.json()["available_banks"] == 1
    assert (await app_client.post("/api/stations/FAV-1/favorite", headers=alice)).status_code == 200
    await app_client.post("/api/stations/FAV-2/favorite", headers=alice)
    await app_client.post("/api/stations/FAV-2/favorite", headers=bob)

    mine = (await app_client.get("/api/stations/favorites", headers=alice)).json()
    assert sorted(f["serial"] for f in mine) == ["FAV-1", "FAV-2"]
    assert [f["serial"] for f in (await app_client.get("/api/stations/favorites", headers=bob)).json()] == ["FAV-2"]

    # Bob cannot remove a favourite he does not have, even though Alice has it.
    not_his = await app_client.delete("/api/stations/FAV-1/favorite", headers=bob)
    assert not_his.status_code == 404 and not_his.json()["error"] == "favorite_not_found"
    assert (await app_client.delete("/api/stations/FAV-1/favorite", headers=alice)).status_code == 204
    assert (await app_client.delete("/api/stations/FAV-1/favorite", headers=alice)).status_code == 404
    assert [f["serial"] for f in (await app_client.get("/api/stations/favorites", headers=alice)).json()] == ["FAV-2"]
    missing = await app_client.post("/api/stations/NOPE/favorite", headers=alice)
    assert missing.status_code == 404 and missing.json()["error"] == "station_not_found"
    assert (await app_client.get("/api/stations/favorites")).status_code == 401


async def test_issue_reports_are_listed_for_the_reporter_and_the_station(app_client, app_services):
    await add_station(app_services, "ISS-1")
    await add_station(app_services, "ISS-2")
    alice, alice_id = await sign_up(app_client, "+9779817000003")
    bob, _ = await sign_up(app_client, "+9779817000004")
    photo = (await app_client.post(
        "/api/app/upload", headers=alice, files={"file": ("p.png", PNG, "image/png")}, data={"purpose": "station_issue"}
    )).json()["id"]

    report = await app_client.post(
        "/api/stations/ISS-1/report-issue", headers=alice, json={"kind": "damaged", "description": "cracked screen", "media_id": photo}
    )
    assert report.status_code == 201, report.text
    assert report.json()["has_media"] is True and report.json()["status"] == "open"
    await app_client.post("/api/stations/ISS-2/report-issue", headers=bob, json={"kind": "dirty"})
    others_photo = await app_client.post("/api/stations/ISS-2/report-issue", headers=bob, json={"kind": "other", "media_id": photo})
    assert others_photo.status_code == 404 and others_photo.json()["error"] == "media_not_found"
    bad_kind = await app_client.post("/api/stations/ISS-1/report-issue", headers=bob, json={"kind": "on_fire!"})
    assert bad_kind.status_code == 400

    mine = (await app_client.get("/api/stations/my-reports", headers=alice)).json()
    assert mine["total"] == 1 and mine["items"][0]["station_sn"] == "ISS-1"
    assert [i["kind"] for i in (await app_client.get("/api/stations/my-reports", headers=bob)).json()["items"]] == ["dirty"]

    async with app_services.sessions.begin() as session:
        session.add(StationIssue(station_id=(await _station_id(session, "ISS-1")), kind="slot_stuck", status="resolved"))
    public = (await app_client.get("/api/stations/ISS-1/issues", headers=bob)).json()
    assert [i["kind"] for i in public["items"]] == ["damaged"]
    assert "user_id" not in public["items"][0]
    everything = (await app_client.get("/api/stations/ISS-1/issues", headers=bob, params={"include_closed": True})).json()
    assert everything["total"] == 2
    assert (await app_client.get("/api/stations/NOPE/issues", headers=bob)).status_code == 404


async def _station_id(session, serial):
    return (await session.execute(select(Station.id).where(Station.serial == serial))).scalar_one()

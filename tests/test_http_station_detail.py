"""GET /api/app/stations/{sn}: the detail page adds the station's photos and amenities."""

from __future__ import annotations

from sqlalchemy import select

from powerbank.storage.models import Station, StationAmenity, StationAmenityMapping, StationMedia


async def test_detail_lists_media_in_order_and_amenities(app_client, app_services):
    async with app_services.sessions.begin() as session:
        station = Station(serial="DET-1", name="Mall", latitude=27.7, longitude=85.3, status="online", slot_count=2)
        bare = Station(serial="DET-2", name="Kiosk", latitude=27.7, longitude=85.3, status="online", slot_count=1)
        session.add_all([station, bare])
        await session.flush()
        wifi = (await session.execute(select(StationAmenity).where(StationAmenity.code == "wifi"))).scalar_one()
        session.add_all([
            StationMedia(station_id=station.id, url="https://x/2.jpg", sort_order=2),
            StationMedia(station_id=station.id, url="https://x/1.jpg", caption="entrance", sort_order=1),
            StationAmenityMapping(station_id=station.id, amenity_id=wifi.id, note="ask the café"),
        ])
    body = (await app_client.get("/api/app/stations/DET-1")).json()
    assert [m["url"] for m in body["media"]] == ["https://x/1.jpg", "https://x/2.jpg"]
    assert body["media"][0]["caption"] == "entrance"
    assert body["amenities"] == [{"code": "wifi", "name": "Free Wi-Fi", "icon": "wifi", "note": "ask the café"}]
    other = (await app_client.get("/api/app/stations/DET-2")).json()
    assert (other["media"], other["amenities"]) == ([], [])

"""`GET /api/ws/stations`: live availability for the map, by station or by area. Public, like the
station list it keeps current.

Subscribe with `?stations=<id>,<id>` (at most 100) or `?lat=&lng=&radius_m=` (at most 20 km).
The first frame is a snapshot, `{"type": "stations.snapshot", "stations": [...]}`, then one
`{"type": "station.updated", ...}` per change of a subscribed station (status, banks available,
empty slots). The Station actor publishes every change on the station's channel and on its map
cell's (actors/station.py `area_cell`); an area subscription listens to the few cells covering
the circle and drops stations outside it. Across web processes this rides on Redis pub/sub: one
Redis subscription per channel and process, however many sockets share it.

Close codes: 4400 for a bad or missing subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

from litestar import WebSocket, websocket
from litestar.datastructures import State
from litestar.exceptions import WebSocketDisconnect
from sqlalchemy import select

from powerbank.actors.station import cells_covering
from powerbank.http.deps import services_of
from powerbank.http.errors import ApiError
from powerbank.http.routes_app import availability, bounding_box, distance_m
from powerbank.storage.models import Station

CLOSE_BAD_REQUEST = 4400
MAX_STATIONS = 100
MAX_RADIUS_M = 20_000


@dataclass(frozen=True)
class Area:
    lat: float
    lng: float
    radius_m: float

    def contains(self, lat: float, lng: float) -> bool:
        return distance_m(self.lat, self.lng, lat, lng) <= self.radius_m

    def channels(self) -> list[str]:
        return cells_covering(*bounding_box(self.lat, self.lng, self.radius_m))


@dataclass(frozen=True)
class Interest:
    """What one map asked for: some stations, or an area."""

    station_ids: tuple[uuid.UUID, ...] = ()
    area: Area | None = None

    def channels(self) -> list[str]:
        return self.area.channels() if self.area else [f"station:{s}" for s in self.station_ids]

    def wants(self, update: dict[str, Any]) -> bool:
        if self.area is None:
            return True  # the station channels carry only what was asked for
        return self.area.contains(update.get("latitude", 0.0), update.get("longitude", 0.0))


def parse_interest(query: dict[str, str]) -> Interest:
    """From the query string; ApiError(400) says what is wrong."""
    if query.get("stations"):
        try:
            ids = tuple(dict.fromkeys(uuid.UUID(part) for part in query["stations"].split(",")))
        except ValueError as exc:
            raise ApiError(400, "bad_subscription", "stations must be station ids separated by commas") from exc
        if len(ids) > MAX_STATIONS:
            raise ApiError(400, "bad_subscription", f"at most {MAX_STATIONS} stations")
        return Interest(station_ids=ids)
    try:
        lat, lng, radius_m = float(query["lat"]), float(query["lng"]), float(query.get("radius_m", 5_000))
    except (KeyError, ValueError) as exc:
        raise ApiError(400, "bad_subscription", "give stations=<ids> or lat, lng and radius_m") from exc
    if not (-90 <= lat <= 90 and -180 <= lng <= 180 and 0 < radius_m <= MAX_RADIUS_M):
        raise ApiError(400, "bad_subscription", f"lat, lng out of range or radius_m not in (0, {MAX_RADIUS_M}]")
    return Interest(area=Area(lat, lng, radius_m))


async def snapshot(services, interest: Interest) -> list[dict[str, Any]]:
    """The subscribed stations as they are now, in the shape of the updates."""
    async with services.readonly() as session:
        query = select(Station)
        if interest.area is None:
            query = query.where(Station.id.in_(interest.station_ids))
        else:
            min_lat, max_lat, min_lng, max_lng = bounding_box(interest.area.lat, interest.area.lng, interest.area.radius_m)
            query = query.where(Station.latitude.between(min_lat, max_lat), Station.longitude.between(min_lng, max_lng))
        stations = [s for s in (await session.execute(query)).scalars() if interest.area is None or interest.area.contains(s.latitude, s.longitude)]
        counts = await availability(session, [s.id for s in stations])
    return [
        {"station_id": str(s.id), "serial": s.serial, "status": s.status, "available": counts.get(s.id, (0, 0))[0],
         "empty_slots": counts.get(s.id, (0, 0))[1], "latitude": s.latitude, "longitude": s.longitude}
        for s in sorted(stations, key=lambda s: s.serial)
    ]


@websocket("/api/ws/stations", opt={"exclude_from_auth": True})
async def station_stream(socket: WebSocket, state: State) -> None:
    """Subscribe, send the snapshot, then forward the changes until the client leaves."""
    await socket.accept()
    try:
        interest = parse_interest(dict(socket.query_params))
    except ApiError as exc:
        await socket.close(code=CLOSE_BAD_REQUEST, reason=exc.detail[:120])
        return
    services = services_of(state)
    # Subscribed before the snapshot is read: a change in between arrives after it, never lost.
    async with services.bus.subscribe(*interest.channels()) as subscription:
        await socket.send_json({"type": "stations.snapshot", "stations": await snapshot(services, interest)})
        forwarding = asyncio.create_task(_forward(socket, subscription, interest))
        listening = asyncio.create_task(_listen(socket))
        await asyncio.wait({forwarding, listening}, return_when=asyncio.FIRST_COMPLETED)
        for task in (forwarding, listening):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _forward(socket: WebSocket, subscription, interest: Interest) -> None:
    while True:
        _, update = await subscription.get()
        if interest.wants(update):
            await socket.send_json(update)


async def _listen(socket: WebSocket) -> None:
    try:
        while True:
            if (await socket.receive_text()).strip().lower() == "ping":
                await socket.send_json({"type": "pong"})
    except WebSocketDisconnect:
        return

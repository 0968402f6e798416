"""Reserving a bank: hold the best bank at a station for a few minutes, then rent it there
(`POST /api/rentals/start` with `reservation_id`), or let it go.

The request inserts the reservation `pending` (one open reservation per person is a unique
index: a second one is 409 `reservation_exists`), then the Station actor holds a slot's bank and
confirms it, or cancels it when there is nothing to hold. The hold ends by itself at `expires_at`
(the Station actor frees it when next asked, the scheduler's sweep otherwise).
"""

from __future__ import annotations

import asyncio
import uuid

from litestar import Controller, Request, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.schemas import ReservationView, ReserveRequest
from powerbank.storage.models import OPEN_RESERVATION_STATUSES, Reservation, Station

STATION_WAIT_S = 10.0


def reservation_view(reservation: Reservation, station_sn: str) -> ReservationView:
    return ReservationView(
        id=reservation.id, status=reservation.status, station_id=reservation.station_id, station_sn=station_sn,
        slot_number=reservation.slot_number, expires_at=reservation.expires_at, rental_id=reservation.rental_id,
        cancel_reason=reservation.cancel_reason, created_at=reservation.created_at,
    )


async def read_reservation(services, reservation_id: uuid.UUID, user_id: uuid.UUID) -> ReservationView:
    async with services.readonly() as session:
        row = (await session.execute(
            select(Reservation, Station.serial).join(Station, Station.id == Reservation.station_id)
            .where(Reservation.id == reservation_id, Reservation.user_id == user_id)
        )).one_or_none()
    if row is None:
        raise ApiError(404, "reservation_not_found", f"no reservation {reservation_id}")
    return reservation_view(*row)


async def call_station(services, station_id: uuid.UUID, name: str, payload: dict) -> dict:
    try:
        return await services.runtime.call("station", str(station_id), name, payload, timeout_s=STATION_WAIT_S)
    except (TimeoutError, asyncio.TimeoutError) as exc:
        raise ApiError(503, "station_timeout", "accepted but not decided yet; read the reservation again") from exc


class ReservationController(Controller):
    path = "/api/rentals"
    tags = ["rentals"]
    security = BEARER_SECURITY

    @post("/reserve", status_code=201, responses=error_responses(400, 401, 404, 409, 503))
    async def reserve(self, state: State, request: Request, data: JSONBody[ReserveRequest]) -> ReservationView:
        """Hold the best-charged bank at a station for you (201 `confirmed`, with `expires_at`).
        409 `reservation_exists` (one at a time), `station_offline` or `no_bank_available`."""
        services = services_of(state)
        async with services.readonly() as session:
            station = (await session.execute(select(Station).where(Station.serial == data.station_sn))).scalar_one_or_none()
        if station is None:
            raise ApiError(404, "station_not_found", f"no station with serial {data.station_sn!r}")
        reservation = Reservation(user_id=request.user.id, station_id=station.id, status="pending")
        try:
            async with services.sessions.begin() as session:
                session.add(reservation)
        except IntegrityError as exc:
            raise ApiError(409, "reservation_exists", "you already hold a reservation; use or cancel it first") from exc
        await call_station(services, station.id, "ReserveSlot", {"reservation_id": str(reservation.id)})
        view = await read_reservation(services, reservation.id, request.user.id)
        if view.status != "confirmed":
            raise ApiError(409, view.cancel_reason or "reservation_refused", f"nothing held: {view.cancel_reason}", reservation_id=str(view.id))
        return view

    @get("/reservations/active", responses=error_responses(401))
    async def active_reservation(self, state: State, request: Request) -> list[ReservationView]:
        """Your open reservation, if any (a list of at most one)."""
        async with services_of(state).readonly() as session:
            rows = (await session.execute(
                select(Reservation, Station.serial).join(Station, Station.id == Reservation.station_id)
                .where(Reservation.user_id == request.user.id, Reservation.status.in_(OPEN_RESERVATION_STATUSES))
            )).all()
        return [reservation_view(*row) for row in rows]

    @delete("/reservations/{reservation_id:uuid}", status_code=200, responses=error_responses(400, 401, 404, 503))
    async def cancel(self, state: State, request: Request, reservation_id: FromPath[uuid.UUID]) -> ReservationView:
        """Let the held bank go (someone else's id: 404)."""
        services = services_of(state)
        current = await read_reservation(services, reservation_id, request.user.id)
        payload = {"reservation_id": str(reservation_id), "user_id": str(request.user.id)}
        await call_station(services, current.station_id, "CancelReservation", payload)
        return await read_reservation(services, reservation_id, request.user.id)

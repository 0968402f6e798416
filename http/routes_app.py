"""Public app reads: stations with live availability, health, rental packages.

All of it reads storage (the Station actor keeps the slot and bank rows current); nothing
here changes state, so none of it goes through an actor.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Annotated

from litestar import Controller, get
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, QueryParameter
from sqlalchemy import and_, case, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.schemas import (
    AmenityView,
    HealthView,
    PackageView,
    SlotView,
    StationDetail,
    StationPage,
    StationMediaView,
    StationSummary,
)
from powerbank.storage.models import (
    STATION_STATUSES,
    PowerBank,
    RentalPackage,
    Station,
    StationAmenity,
    StationAmenityMapping,
    StationMedia,
    StationSlot,
)
from powerbank.storage.types import utcnow

# Below this charge a bank is not offered: it would hardly charge a phone. The rental actor
# applies its own minimum when it picks a slot; this one only decides what the map shows.
MIN_RENTABLE_CHARGE_PERCENT = 20
EARTH_RADIUS_M = 6_371_000.0
DEFAULT_NEARBY_RADIUS_M = 5_000
MAX_NEARBY_RADIUS_M = 50_000

PUBLIC = {"exclude_from_auth": True}

log = logging.getLogger(__name__)


# --- pure decisions ---------------------------------------------------------------------------


def is_rentable(slot_status: str, bank_status: str | None, charge_percent: int | None) -> bool:
    return (
        slot_status == "occupied"
        and bank_status == "in_slot"
        and charge_percent is not None
        and charge_percent >= MIN_RENTABLE_CHARGE_PERCENT
    )


def distance_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Great-circle (haversine) distance."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi, dlmb = phi2 - phi1, math.radians(lng2 - lng1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def bounding_box(lat: float, lng: float, radius_m: float) -> tuple[float, float, float, float]:
    """(min_lat, max_lat, min_lng, max_lng) enclosing the circle, so the index narrows the
    candidates before the exact distance is computed."""
    dlat = math.degrees(radius_m / EARTH_RADIUS_M)
    cos_lat = max(math.cos(math.radians(lat)), 1e-6)
    dlng = min(180.0, math.degrees(radius_m / (EARTH_RADIUS_M * cos_lat)))
    return lat - dlat, lat + dlat, lng - dlng, lng + dlng


# --- storage ----------------------------------------------------------------------------------


async def availability(session: AsyncSession, station_ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[int, int]]:
    """(available banks, empty slots) per station, in one grouped query."""
    if not station_ids:
        return {}
    rentable = and_(
        StationSlot.status == "occupied",
        PowerBank.status == "in_slot",
        PowerBank.charge_percent >= MIN_RENTABLE_CHARGE_PERCENT,
        # A bank held for someone's reservation is not on offer (until its hold runs out).
        or_(StationSlot.reserved_for_id.is_(None), StationSlot.reserved_until <= utcnow()),
    )
    rows = await session.execute(
        select(
            StationSlot.station_id,
            func.sum(case((rentable, 1), else_=0)),
            func.sum(case((StationSlot.status == "empty", 1), else_=0)),
        )
        .outerjoin(PowerBank, PowerBank.id == StationSlot.power_bank_id)
        .where(StationSlot.station_id.in_(station_ids))
        .group_by(StationSlot.station_id)
    )
    return {station_id: (int(available or 0), int(empty or 0)) for station_id, available, empty in rows}


def summary(station: Station, counts: tuple[int, int], distance: float | None = None) -> StationSummary:
    available, empty = counts
    return StationSummary(
        id=station.id,
        serial=station.serial,
        name=station.name,
        address=station.address,
        latitude=station.latitude,
        longitude=station.longitude,
        status=station.status,
        slot_count=station.slot_count,
        available_banks=available,
        empty_slots=empty,
        last_seen_at=station.last_seen_at,
        distance_m=None if distance is None else round(distance, 1),
    )


async def list_stations(
    session: AsyncSession, paging: Paging, status: str | None
) -> StationPage:
    query = select(Station)
    if status is not None:
        query = query.where(Station.status == status)
    total = await session.scalar(select(func.count()).select_from(query.subquery()))
    stations = list(
        (await session.execute(query.order_by(Station.serial).offset(paging.offset).limit(paging.page_size))).scalars()
    )
    counts = await availability(session, [s.id for s in stations])
    items = [summary(s, counts.get(s.id, (0, 0))) for s in stations]
    return StationPage(items=items, page=paging.page, page_size=paging.page_size, total=total or 0)


async def nearby_stations(
    session: AsyncSession, paging: Paging, status: str | None, lat: float, lng: float, radius_m: float
) -> StationPage:
    min_lat, max_lat, min_lng, max_lng = bounding_box(lat, lng, radius_m)
    query = select(Station).where(Station.latitude.between(min_lat, max_lat), Station.longitude.between(min_lng, max_lng))
    if status is not None:
        query = query.where(Station.status == status)
    candidates = list((await session.execute(query)).scalars())
    by_distance = sorted(
        ((distance_m(lat, lng, s.latitude, s.longitude), s.serial, s) for s in candidates),
        key=lambda item: (item[0], item[1]),
    )
    in_range = [item for item in by_distance if item[0] <= radius_m]
    page = in_range[paging.offset : paging.offset + paging.page_size]
    counts = await availability(session, [s.id for _, _, s in page])
    items = [summary(s, counts.get(s.id, (0, 0)), d) for d, _, s in page]
    return StationPage(items=items, page=paging.page, page_size=paging.page_size, total=len(in_range))


async def station_detail(session: AsyncSession, serial: str) -> StationDetail:
    station = (await session.execute(select(Station).where(Station.serial == serial))).scalar_one_or_none()
    if station is None:
        raise ApiError(404, "station_not_found", f"no station with serial {serial!r}")
    rows = await session.execute(
        select(StationSlot.slot_number, StationSlot.status, PowerBank.serial, PowerBank.status, PowerBank.charge_percent,
               StationSlot.reserved_for_id, StationSlot.reserved_until)
        .outerjoin(PowerBank, PowerBank.id == StationSlot.power_bank_id)
        .where(StationSlot.station_id == station.id)
        .order_by(StationSlot.slot_number)
    )
    now = utcnow()
    slots = [
        SlotView(
            slot_number=number,
            status=slot_status,
            power_bank_serial=bank_serial,
            charge_percent=charge,
            rentable=is_rentable(slot_status, bank_status, charge) and (held_for is None or (held_until is not None and held_until <= now)),
        )
        for number, slot_status, bank_serial, bank_status, charge, held_for, held_until in rows
    ]
    available = sum(1 for slot in slots if slot.rentable)
    empty = sum(1 for slot in slots if slot.status == "empty")
    base = summary(station, (available, empty))
    media, amenities = await station_extras(session, station.id)
    return StationDetail(**{f: getattr(base, f) for f in base.__struct_fields__}, slots=slots, media=media, amenities=amenities)


async def station_extras(session: AsyncSession, station_id: uuid.UUID) -> tuple[list[StationMediaView], list[AmenityView]]:
    """The station's photos and amenities, for its detail page."""
    media = (
        await session.execute(
            select(StationMedia).where(StationMedia.station_id == station_id).order_by(StationMedia.sort_order, StationMedia.created_at)
        )
    ).scalars()
    amenities = await session.execute(
        select(StationAmenity, StationAmenityMapping.note)
        .join(StationAmenityMapping, StationAmenityMapping.amenity_id == StationAmenity.id)
        .where(StationAmenityMapping.station_id == station_id)
        .order_by(StationAmenity.name)
    )
    return (
        [StationMediaView(kind=m.kind, url=m.url, caption=m.caption) for m in media],
        [AmenityView(code=a.code, name=a.name, icon=a.icon, note=note) for a, note in amenities],
    )


# --- routes -----------------------------------------------------------------------------------

StatusFilter = Annotated[
    str | None,
    QueryParameter(description=f"only stations in this status: {', '.join(STATION_STATUSES)}", pattern="^(online|offline|maintenance)$"),
]
Latitude = Annotated[float, QueryParameter(ge=-90, le=90, description="your latitude")]
Longitude = Annotated[float, QueryParameter(ge=-180, le=180, description="your longitude")]
RadiusM = Annotated[int, QueryParameter(ge=1, le=MAX_NEARBY_RADIUS_M, description="search radius in metres")]


class AppController(Controller):
    path = "/api/app"
    tags = ["app"]
    opt = PUBLIC
    dependencies = {"paging": Provide(provide_paging)}

    @get("/stations", responses=error_responses(400))
    async def stations(
        self,
        state: State,
        paging: NamedDependency[Paging],
        status: StatusFilter = None,
        lat: Annotated[float | None, QueryParameter(ge=-90, le=90, description="sort by distance from here")] = None,
        lng: Annotated[float | None, QueryParameter(ge=-180, le=180)] = None,
        radius_m: RadiusM = DEFAULT_NEARBY_RADIUS_M,
    ) -> StationPage:
        """Stations with live availability, by serial; with `lat` and `lng`, only those within
        `radius_m`, nearest first."""
        if (lat is None) != (lng is None):
            raise ApiError(400, "validation_failed", "lat and lng go together", fields=[
                {"field": "lat" if lat is None else "lng", "source": "query", "message": "required with the other coordinate"}
            ])
        async with services_of(state).readonly() as session:
            if lat is not None and lng is not None:
                return await nearby_stations(session, paging, status, lat, lng, radius_m)
            return await list_stations(session, paging, status)

    @get("/stations/nearby", responses=error_responses(400))
    async def nearby(
        self,
        state: State,
        paging: NamedDependency[Paging],
        lat: Latitude,
        lng: Longitude,
        radius_m: RadiusM = DEFAULT_NEARBY_RADIUS_M,
        status: StatusFilter = None,
    ) -> StationPage:
        """Stations within `radius_m` of a point, nearest first, with live availability."""
        async with services_of(state).readonly() as session:
            return await nearby_stations(session, paging, status, lat, lng, radius_m)

    @get("/stations/{sn:str}", responses=error_responses(400, 404))
    async def station(self, state: State, sn: FromPath[str]) -> StationDetail:
        """One station with every slot and each bank's charge, its photos and amenities
        (404 `station_not_found`)."""
        async with services_of(state).readonly() as session:
            return await station_detail(session, sn)

    @get("/health", responses=error_responses(503))
    async def health(self, state: State) -> HealthView:
        """Liveness with a database round trip (503 `database_unavailable` when it fails). Reads
        only: a load balancer polls it. A failure is logged as a warning, which the system log
        (http/system_log.py) keeps in `system_logs` once the database answers again."""
        try:
            async with services_of(state).readonly() as session:
                await session.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error means the same thing to a load balancer
            log.warning("health: the database did not answer: %s", type(exc).__name__)
            raise ApiError(503, "database_unavailable", "the database did not answer") from exc
        return HealthView(status="ok", database="ok", time=utcnow())


class PaymentController(Controller):
    path = "/api/payment"
    tags = ["payment"]

    @get("/packages", opt=PUBLIC, responses=error_responses(500))
    async def packages(self, state: State) -> list[PackageView]:
        """Active rental packages, in display order."""
        async with services_of(state).readonly() as session:
            rows = (
                await session.execute(
                    select(RentalPackage)
                    .where(RentalPackage.is_active.is_(True))
                    .order_by(RentalPackage.sort_order, RentalPackage.price_minor, RentalPackage.code)
                )
            ).scalars()
            return [package_view(p) for p in rows]


def package_view(p: RentalPackage) -> PackageView:
    return PackageView(
        id=p.id,
        code=p.code,
        name=p.name,
        duration_minutes=p.duration_minutes,
        price_minor=p.price_minor,
        currency=p.currency,
        grace_minutes=p.grace_minutes,
        late_fee_per_hour_minor=p.late_fee_per_hour_minor,
        late_fee_daily_cap_minor=p.late_fee_daily_cap_minor,
        max_duration_minutes=p.max_duration_minutes,
    )

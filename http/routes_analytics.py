"""Analytics for staff: rentals, revenue and utilisation, per station and per hour, over a time
window; operators see their tenant's stations, admins everything.

Everything is aggregated in the database (GROUP BY), never by loading rentals into Python: a
month of a busy network is millions of rows. The few expressions SQL dialects spell differently
(time differences, hour buckets, the later of two times) are chosen per dialect below.

Revenue is what rentals charged (`charged_minor`) for rentals returned in the window, per
currency: the price, late fees and lost-bank charges, after points; the ledger holds the detail.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Annotated

from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import QueryParameter
from sqlalchemy import and_, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.access import StaffScope, require_staff, scope_of
from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.schemas import Response
from powerbank.storage.models import Rental, Station
from powerbank.storage.types import utcnow

MAX_WINDOW = timedelta(days=31)
DEFAULT_WINDOW = timedelta(days=1)


class RentalCounts(Response):
    # Rentals asked for in the window, and how those ended so far.
    requested: int
    completed: int
    cancelled: int
    lost: int
    open: int


class Revenue(Response):
    currency: str
    charged_minor: int


class StationUsage(Response):
    station_id: uuid.UUID
    serial: str
    # Banks that left this station for a rental in the window, and that came back to it.
    started: int
    returned_here: int
    # Bank-seconds rented out of this station inside the window.
    rented_s: int
    # rented_s over (slots x window seconds): 1.0 means every slot's bank was out all the time.
    utilisation: float


class HourlyUsage(Response):
    hour: datetime
    # Rentals asked for, and banks returned, in this hour.
    requested: int
    returned: int


class AnalyticsReport(Response):
    since: datetime
    until: datetime
    rentals: RentalCounts
    revenue: list[Revenue]
    stations: list[StationUsage]
    hours: list[HourlyUsage]


def check_window(since: datetime | None, until: datetime | None, now: datetime) -> tuple[datetime, datetime]:
    """The window asked for, defaulting to the last day; at most 31 days, `since` before `until`."""
    until = until or now
    since = since or until - DEFAULT_WINDOW
    if since.tzinfo is None or until.tzinfo is None:
        raise ApiError(400, "validation_failed", "times need a zone, e.g. 2026-11-01T00:00:00Z")
    if since >= until:
        raise ApiError(400, "validation_failed", "since must be before until")
    if until - since > MAX_WINDOW:
        raise ApiError(400, "window_too_long", f"at most {MAX_WINDOW.days} days at once")
    return since, until


def utilisation(rented_s: float, slot_count: int, window_s: float) -> float:
    capacity_s = slot_count * window_s
    return round(min(1.0, rented_s / capacity_s), 4) if capacity_s > 0 else 0.0


# --- dialect differences -----------------------------------------------------------------------


def _seconds_between(dialect: str, start, end):
    if dialect == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def _later(dialect: str, a, b):
    return func.greatest(a, b) if dialect == "postgresql" else func.max(a, b)


def _earlier(dialect: str, a, b):
    return func.least(a, b) if dialect == "postgresql" else func.min(a, b)


def _hour(dialect: str, column):
    if dialect == "postgresql":
        return func.to_char(func.date_trunc("hour", column), "YYYY-MM-DD HH24:00:00")
    return func.strftime("%Y-%m-%d %H:00:00", column)


def _as_utc_hour(text: str) -> datetime:
    return datetime.fromisoformat(text + "+00:00")


# --- queries -------------------------------------------------------------------------------------


def _in_scope(query, scope: StaffScope, station_column):
    if scope.sees_every_tenant:
        return query
    if scope.tenant_id is None:
        return query.where(False)
    return query.where(station_column.in_(select(Station.id).where(Station.tenant_id == scope.tenant_id)))


async def rental_counts(session: AsyncSession, scope: StaffScope, since: datetime, until: datetime) -> RentalCounts:
    started = and_(Rental.created_at >= since, Rental.created_at < until)
    query = _in_scope(select(Rental.status, func.count()).where(started).group_by(Rental.status), scope, Rental.station_id)
    by_status = dict((await session.execute(query)).all())
    final = {"completed", "cancelled", "lost"}
    return RentalCounts(
        requested=sum(by_status.values()), completed=by_status.get("completed", 0), cancelled=by_status.get("cancelled", 0),
        lost=by_status.get("lost", 0), open=sum(n for status, n in by_status.items() if status not in final),
    )


async def revenue(session: AsyncSession, scope: StaffScope, since: datetime, until: datetime) -> list[Revenue]:
    query = _in_scope(
        select(Rental.currency, func.coalesce(func.sum(Rental.charged_minor), 0))
        .where(Rental.returned_at >= since, Rental.returned_at < until).group_by(Rental.currency).order_by(Rental.currency),
        scope, Rental.station_id,
    )
    return [Revenue(currency=c, charged_minor=int(total)) for c, total in (await session.execute(query)).all()]


async def station_usage(session: AsyncSession, scope: StaffScope, since: datetime, until: datetime) -> list[StationUsage]:
    dialect = session.bind.dialect.name
    window_s = (until - since).total_seconds()
    # A rental overlaps the window if it started before its end and is still out or came back
    # after its start; only the overlapping part counts.
    overlap_s = _seconds_between(
        dialect, _later(dialect, Rental.started_at, literal(since, Rental.started_at.type)),
        _earlier(dialect, func.coalesce(Rental.returned_at, literal(until, Rental.started_at.type)), literal(until, Rental.started_at.type)),
    )
    out = (
        select(Rental.station_id, func.count().filter(Rental.started_at >= since).label("started"), func.coalesce(func.sum(overlap_s), 0).label("rented_s"))
        .where(Rental.started_at.is_not(None), Rental.started_at < until, (Rental.returned_at.is_(None)) | (Rental.returned_at > since))
        .group_by(Rental.station_id)
    )
    back = (
        select(Rental.return_station_id, func.count())
        .where(Rental.returned_at >= since, Rental.returned_at < until, Rental.return_station_id.is_not(None))
        .group_by(Rental.return_station_id)
    )
    stations = (await session.execute(_in_scope(select(Station), scope, Station.id).order_by(Station.serial))).scalars().all()
    usage = {row.station_id: (int(row.started), round(row.rented_s)) for row in (await session.execute(out)).all()}
    returned = dict((await session.execute(back)).all())
    reports = []
    for station in stations:
        started, rented_s = usage.get(station.id, (0, 0))
        reports.append(StationUsage(
            station_id=station.id, serial=station.serial, started=started, returned_here=int(returned.get(station.id, 0)),
            rented_s=rented_s, utilisation=utilisation(rented_s, station.slot_count, window_s),
        ))
    return reports


async def hourly_usage(session: AsyncSession, scope: StaffScope, since: datetime, until: datetime) -> list[HourlyUsage]:
    dialect = session.bind.dialect.name
    started_hour, returned_hour = _hour(dialect, Rental.created_at), _hour(dialect, Rental.returned_at)
    started = _in_scope(
        select(started_hour, func.count()).where(Rental.created_at >= since, Rental.created_at < until).group_by(started_hour),
        scope, Rental.station_id,
    )
    returned = _in_scope(
        select(returned_hour, func.count()).where(Rental.returned_at >= since, Rental.returned_at < until).group_by(returned_hour),
        scope, Rental.station_id,
    )
    starts = {_as_utc_hour(h): n for h, n in (await session.execute(started)).all()}
    returns = {_as_utc_hour(h): n for h, n in (await session.execute(returned)).all()}
    return [HourlyUsage(hour=h, requested=starts.get(h, 0), returned=returns.get(h, 0)) for h in sorted(starts.keys() | returns.keys())]


Since = Annotated[datetime | None, QueryParameter(description="window start (ISO 8601 with zone); default: a day before `until`")]
Until = Annotated[datetime | None, QueryParameter(description="window end (ISO 8601 with zone); default: now")]


class AnalyticsController(Controller):
    path = "/api/admin/analytics"
    tags = ["admin"]
    security = BEARER_SECURITY
    guards = [require_staff]

    @get("/rentals", responses=error_responses(400, 401, 403))
    async def rentals(self, state: State, request: Request, since: Since = None, until: Until = None) -> AnalyticsReport:
        """Rentals started and how they ended, revenue per currency, utilisation per station and
        starts and returns per hour, over a window of at most 31 days."""
        since, until = check_window(since, until, utcnow())
        scope = scope_of(request.user)
        async with services_of(state).readonly() as session:
            return AnalyticsReport(
                since=since, until=until,
                rentals=await rental_counts(session, scope, since, until),
                revenue=await revenue(session, scope, since, until),
                stations=await station_usage(session, scope, since, until),
                hours=await hourly_usage(session, scope, since, until),
            )

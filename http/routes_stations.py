"""A person's favourite stations and the problems people report at stations.

Favourites and reports are the caller's own rows: listing shows only theirs, and removing a
favourite they do not have is a 404 like any other missing row. The public list of a station's
issues shows what is wrong, never who reported it.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.routes_app import availability
from powerbank.http.routes_profile import own_media
from powerbank.http.schemas_app import FavoriteView, StationIssuePage, StationIssueRequest, StationIssueView
from powerbank.storage.models import Station, StationIssue, UserStationFavorite
from powerbank.storage.types import utcnow

# Issues still worth telling a person about at the station.
VISIBLE_ISSUE_STATUSES = ("open", "acknowledged")
MAX_FAVORITES = 100


async def station_by_serial(session: AsyncSession, serial: str) -> Station:
    station = (await session.execute(select(Station).where(Station.serial == serial))).scalar_one_or_none()
    if station is None:
        raise ApiError(404, "station_not_found", f"no station with serial {serial!r}")
    return station


def issue_view(issue: StationIssue, serial: str) -> StationIssueView:
    return StationIssueView(
        id=issue.id, station_sn=serial, kind=issue.kind, description=issue.description, status=issue.status,
        has_media=issue.media_id is not None, created_at=issue.created_at,
    )


async def issue_page(session: AsyncSession, paging: Paging, *where) -> StationIssuePage:
    total = await session.scalar(select(func.count()).select_from(StationIssue).where(*where))
    rows = await session.execute(
        select(StationIssue, Station.serial)
        .join(Station, Station.id == StationIssue.station_id)
        .where(*where)
        .order_by(StationIssue.created_at.desc(), StationIssue.id)
        .offset(paging.offset)
        .limit(paging.page_size)
    )
    items = [issue_view(issue, serial) for issue, serial in rows]
    return StationIssuePage(items=items, page=paging.page, page_size=paging.page_size, total=total or 0)


async def add_favorite(state: State, user_id: uuid.UUID, serial: str) -> tuple[FavoriteView, bool]:
    """Idempotent: favouriting twice keeps the first (200 instead of 201)."""
    services = services_of(state)
    try:
        async with services.sessions.begin() as session:
            station = await station_by_serial(session, serial)
            existing = (
                await session.execute(
                    select(UserStationFavorite).where(
                        UserStationFavorite.user_id == user_id, UserStationFavorite.station_id == station.id
                    )
                )
            ).scalar_one_or_none()
            created = existing is None
            if created:
                count = await session.scalar(select(func.count()).where(UserStationFavorite.user_id == user_id))
                if count >= MAX_FAVORITES:
                    raise ApiError(409, "too_many_favorites", f"at most {MAX_FAVORITES} favourite stations")
                session.add(UserStationFavorite(user_id=user_id, station_id=station.id, created_at=utcnow()))
    except IntegrityError:
        created = False  # the same request raced itself; the other one added it
    async with services.readonly() as session:
        return (await favorite_views(session, user_id, serial))[0], created


async def favorite_views(session: AsyncSession, user_id: uuid.UUID, serial: str | None = None) -> list[FavoriteView]:
    query = (
        select(Station, UserStationFavorite.created_at)
        .join(UserStationFavorite, UserStationFavorite.station_id == Station.id)
        .where(UserStationFavorite.user_id == user_id)
        .order_by(UserStationFavorite.created_at.desc(), Station.serial)
    )
    if serial is not None:
        query = query.where(Station.serial == serial)
    rows = list(await session.execute(query))
    counts = await availability(session, [station.id for station, _ in rows])
    return [
        FavoriteView(
            station_id=station.id, serial=station.serial, name=station.name, address=station.address, status=station.status,
            latitude=station.latitude, longitude=station.longitude, available_banks=counts.get(station.id, (0, 0))[0],
            favorited_at=added_at,
        )
        for station, added_at in rows
    ]


class StationController(Controller):
    path = "/api/stations"
    tags = ["stations"]
    security = BEARER_SECURITY
    dependencies = {"paging": Provide(provide_paging)}

    @post("/{sn:str}/favorite", status_code=201, responses=error_responses(400, 401, 404, 409))
    async def favorite(self, state: State, request: Request, sn: FromPath[str]) -> Response[FavoriteView]:
        """Add a station to the caller's favourites (201; 200 when it already was one)."""
        view, created = await add_favorite(state, request.user.id, sn)
        return Response(view, status_code=201 if created else 200)

    @delete("/{sn:str}/favorite", status_code=204, responses=error_responses(400, 401, 404))
    async def unfavorite(self, state: State, request: Request, sn: FromPath[str]) -> None:
        """Remove a favourite (404 `favorite_not_found` when the caller has no such favourite)."""
        async with services_of(state).sessions.begin() as session:
            station = await station_by_serial(session, sn)
            favorite = (
                await session.execute(
                    select(UserStationFavorite).where(
                        UserStationFavorite.user_id == request.user.id, UserStationFavorite.station_id == station.id
                    )
                )
            ).scalar_one_or_none()
            if favorite is None:
                raise ApiError(404, "favorite_not_found", f"station {sn} is not one of your favourites")
            await session.delete(favorite)

    @get("/favorites", responses=error_responses(401))
    async def favorites(self, state: State, request: Request) -> list[FavoriteView]:
        """The caller's favourite stations with live availability, newest first."""
        async with services_of(state).readonly() as session:
            return await favorite_views(session, request.user.id)

    @post("/{sn:str}/report-issue", status_code=201, responses=error_responses(400, 401, 404))
    async def report_issue(
        self, state: State, request: Request, sn: FromPath[str], data: JSONBody[StationIssueRequest]
    ) -> StationIssueView:
        """Report a problem at a station, optionally with a photo (an upload with purpose
        `station_issue`)."""
        async with services_of(state).sessions.begin() as session:
            station = await station_by_serial(session, sn)
            await own_media(session, request.user.id, data.media_id, "station_issue")
            issue = StationIssue(
                station_id=station.id, user_id=request.user.id, kind=data.kind, description=data.description,
                media_id=data.media_id, status="open", created_at=utcnow(),
            )
            session.add(issue)
            await session.flush()
            return issue_view(issue, station.serial)

    @get("/my-reports", responses=error_responses(400, 401))
    async def my_reports(self, state: State, request: Request, paging: NamedDependency[Paging]) -> StationIssuePage:
        """Issues the caller reported, newest first."""
        async with services_of(state).readonly() as session:
            return await issue_page(session, paging, StationIssue.user_id == request.user.id)

    @get("/{sn:str}/issues", responses=error_responses(400, 401, 404))
    async def issues(
        self,
        state: State,
        sn: FromPath[str],
        paging: NamedDependency[Paging],
        include_closed: Annotated[bool, QueryParameter(description="also resolved and dismissed issues")] = False,
    ) -> StationIssuePage:
        """Known problems at a station (open and acknowledged unless `include_closed`), without
        the reporters."""
        async with services_of(state).readonly() as session:
            station = await station_by_serial(session, sn)
            where = [StationIssue.station_id == station.id]
            if not include_closed:
                where.append(StationIssue.status.in_(VISIBLE_ISSUE_STATUSES))
            return await issue_page(session, paging, *where)

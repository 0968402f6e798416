"""Station management for staff: operators over their own tenant's stations, admins over all.

Every lookup goes through the caller's scope (http/access.py), so a station outside it is
simply not found. Changes to a station's state go through the Station actor like every other
station change; this layer authorizes, validates, waits and logs the action.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime
from typing import Annotated

from litestar import Controller, Request, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.actors.notifications import set_station_issue_status
from powerbank.broker.embedded import HASH_CACHE_TTL_S, provision_station_password
from powerbank.broker.protocol import Topics
from powerbank.http.access import StaffScope, require_staff, scope_of
from powerbank.http.admin_log import admin_action, record_admin_action
from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.routes_app import StatusFilter
from powerbank.http.schemas import StationCredentials, StationStatusHistory, StatusChangeView
from powerbank.http.routes_stations import issue_view
from powerbank.http.schemas_app import StationIssueView
from powerbank.http.schemas_eject import ServiceEjectRequest, ServiceEjectView
from powerbank.http.schemas_staff import (
    AdminActionPage,
    AdminActionView,
    IssueStatusChange,
    MaintenanceChange,
    StaffStationPage,
    StaffStationView,
)
from powerbank.storage.models import AdminActionLog, Station, StationIssue, StationStatusChange
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

STATION_WAIT_S = 10.0
TargetType = Annotated[str | None, QueryParameter(max_length=24, pattern=r"^[a-z_]+$", description="e.g. station, user, tenant, wallet")]
TargetId = Annotated[str | None, QueryParameter(max_length=64, description="the target's id")]


def change_views(changes: list[StationStatusChange], ended_at: datetime) -> list[StatusChangeView]:
    """Newest-first changes, each with how long its status lasted: until the change after it
    (the one before it in the list), the newest until `ended_at`."""
    views = []
    for change in changes:
        views.append(
            StatusChangeView(
                from_status=change.from_status, to_status=change.to_status, reason=change.reason,
                changed_at=change.changed_at,
                lasted_s=round(max(0.0, (ended_at - change.changed_at).total_seconds()), 3),
            )
        )
        ended_at = change.changed_at
    return views


async def status_history(session: AsyncSession, station: Station, paging: Paging) -> StationStatusHistory:
    by_station = select(StationStatusChange).where(StationStatusChange.station_id == station.id)
    total = await session.scalar(select(func.count()).select_from(by_station.subquery()))
    newest_first = by_station.order_by(StationStatusChange.changed_at.desc(), StationStatusChange.id.desc())
    # One row more than the page: the change just after the page's first one ends its period.
    start = max(paging.offset - 1, 0)
    rows = list((await session.execute(newest_first.offset(start).limit(paging.page_size + 1))).scalars())
    ended_at = utcnow()
    if paging.offset > 0 and rows:
        ended_at, rows = rows[0].changed_at, rows[1:]
    items = change_views(rows[: paging.page_size], ended_at)
    return StationStatusHistory(
        station_id=station.id, serial=station.serial, status=station.status, items=items,
        page=paging.page, page_size=paging.page_size, total=total or 0,
    )


def stations_in(scope: StaffScope):
    """The stations query of this scope: all, or one tenant's (none for an operator who has no
    tenant yet)."""
    query = select(Station)
    if not scope.sees_every_tenant:
        query = query.where(Station.tenant_id == scope.tenant_id) if scope.tenant_id else query.where(False)
    return query


async def station_in_scope(session: AsyncSession, scope: StaffScope, station_id: uuid.UUID) -> Station:
    station = await session.get(Station, station_id)
    if station is None or not scope.covers(station.tenant_id):
        raise ApiError(404, "station_not_found", f"no station {station_id}")
    return station


def staff_station_view(station: Station) -> StaffStationView:
    return StaffStationView(
        id=station.id, serial=station.serial, name=station.name, status=station.status,
        tenant_id=station.tenant_id, slot_count=station.slot_count,
        firmware_version=station.firmware_version, last_seen_at=station.last_seen_at,
    )


def actions_in(scope: StaffScope):
    """Admins read every action; an operator reads the actions taken in their tenant."""
    query = select(AdminActionLog)
    if not scope.sees_every_tenant:
        query = query.where(AdminActionLog.tenant_id == scope.tenant_id) if scope.tenant_id else query.where(False)
    return query


def action_view(row: AdminActionLog) -> AdminActionView:
    return AdminActionView(
        id=row.id, actor_id=row.actor_id, actor_role=row.actor_role, tenant_id=row.tenant_id,
        action=row.action, target_type=row.target_type, target_id=row.target_id,
        details=row.details or {}, created_at=row.created_at,
    )


async def page_of(session: AsyncSession, query, paging: Paging, order_by) -> tuple[list, int]:
    total = int(await session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    rows = (await session.execute(query.order_by(*order_by).offset(paging.offset).limit(paging.page_size))).scalars()
    return list(rows), total


class StaffController(Controller):
    path = "/api/admin"
    tags = ["admin"]
    security = BEARER_SECURITY
    guards = [require_staff]
    dependencies = {"paging": Provide(provide_paging)}

    @get("/stations", responses=error_responses(400, 401, 403))
    async def stations(
        self, state: State, request: Request, paging: NamedDependency[Paging], status: StatusFilter = None
    ) -> StaffStationPage:
        """The stations the caller manages, by serial."""
        query = stations_in(scope_of(request.user))
        if status is not None:
            query = query.where(Station.status == status)
        async with services_of(state).readonly() as session:
            stations, total = await page_of(session, query, paging, [Station.serial])
        return StaffStationPage(
            items=[staff_station_view(s) for s in stations], page=paging.page, page_size=paging.page_size, total=total
        )

    @get("/stations/{station_id:uuid}/status-history", responses=error_responses(400, 401, 403, 404))
    async def station_status_history(
        self, state: State, request: Request, station_id: FromPath[uuid.UUID], paging: NamedDependency[Paging]
    ) -> StationStatusHistory:
        """When and why a station went offline and came back, newest first, with how long each
        status lasted: the Station actor writes a row in the same transaction as every change."""
        async with services_of(state).readonly() as session:
            station = await station_in_scope(session, scope_of(request.user), station_id)
            return await status_history(session, station, paging)

    @post("/stations/{station_id:uuid}/mqtt-credentials", status_code=200, responses=error_responses(400, 401, 403, 404))
    async def issue_station_credentials(self, state: State, request: Request, station_id: FromPath[uuid.UUID]) -> StationCredentials:
        """Issue a station a new MQTT password (provisioning a kiosk, or replacing a leaked or
        lost password). The answer is the only place the password ever appears; the database
        keeps a salted hash. Not a Station-actor command: credentials are an operator's
        business, not the station's state."""
        async with services_of(state).sessions.begin() as session:
            station = await station_in_scope(session, scope_of(request.user), station_id)
            password = await provision_station_password(session, station_id)
            serial = station.serial
            session.add(admin_action(request, "station_credentials_issued", "station", station_id, tenant_id=station.tenant_id))
        log.info("%s %s issued MQTT credentials to station %s", request.user.role, request.user.id, serial)
        return StationCredentials(
            station_id=station_id, serial=serial, username=serial, password=password,
            topic_prefix=f"{Topics.from_env().base}/{serial}/", previous_valid_up_to_s=int(HASH_CACHE_TTL_S),
        )

    @put("/stations/{station_id:uuid}/maintenance", responses=error_responses(400, 401, 403, 404, 503))
    async def set_maintenance(
        self, state: State, request: Request, station_id: FromPath[uuid.UUID], data: JSONBody[MaintenanceChange]
    ) -> StaffStationView:
        """Park a station (it rents nothing until it is back) or bring it back: online if it was
        heard from recently, otherwise offline until its next message."""
        services = services_of(state)
        async with services.readonly() as session:
            station = await station_in_scope(session, scope_of(request.user), station_id)
            tenant_id = station.tenant_id
        payload = {"maintenance": data.maintenance, "reason": data.reason or "operator"}
        try:
            result = await services.runtime.call("station", str(station_id), "SetMaintenance", payload, timeout_s=STATION_WAIT_S)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise ApiError(503, "station_timeout", "the change is accepted but not applied yet") from exc
        if not result.get("ok", False):
            raise ApiError(409, str(result.get("reason", "refused")), "the station refused the change")
        if not result.get("unchanged"):
            action = "station_parked" if data.maintenance else "station_unparked"
            details = {"reason": payload["reason"], "status": result["status"]}
            await record_admin_action(services.sessions, admin_action(request, action, "station", station_id, tenant_id=tenant_id, details=details))
        async with services.readonly() as session:
            return staff_station_view(await session.get(Station, station_id))

    @post("/stations/{station_id:uuid}/eject", status_code=202, responses=error_responses(400, 401, 403, 404, 409, 503))
    async def service_eject(
        self, state: State, request: Request, station_id: FromPath[uuid.UUID], data: JSONBody[ServiceEjectRequest]
    ) -> ServiceEjectView:
        """Take one slot's bank out for service (Station actor `ServiceEject`): the station is
        sent an Eject with an id and an expiry; on its ack the bank leaves as `faulty`, touching
        no rental; a failed or expired ack puts the slot back. 202: sent, not yet acknowledged.
        409 with the reason when the slot is empty (`slot_empty`), being ejected
        (`slot_ejecting`), held for a reservation (`slot_reserved`), absent (`slot_not_found`)
        or the station cannot hear it (`station_offline`)."""
        services = services_of(state)
        async with services.readonly() as session:
            station = await station_in_scope(session, scope_of(request.user), station_id)
            tenant_id = station.tenant_id
        payload = {"slot": data.slot, "reason": data.reason, "by": str(request.user.id)}
        try:
            result = await services.runtime.call("station", str(station_id), "ServiceEject", payload, timeout_s=STATION_WAIT_S)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise ApiError(503, "station_timeout", "the eject is accepted but not sent yet") from exc
        if not result.get("ok", False):
            raise ApiError(409, str(result.get("reason", "refused")), "the station refused the eject", slot=data.slot)
        details = {"slot": data.slot, "reason": data.reason, "bank": result["bank"], "eject_command_id": result["eject_command_id"]}
        await record_admin_action(services.sessions, admin_action(
            request, "station_service_eject", "station", station_id, tenant_id=tenant_id, details=details))
        return ServiceEjectView(
            station_id=station_id, slot=result["slot"], bank_serial=result["bank"],
            eject_command_id=result["eject_command_id"], expires_at=datetime.fromisoformat(result["expires_at"]),
        )

    @put("/station-issues/{issue_id:uuid}/status", responses=error_responses(400, 401, 403, 404))
    async def set_issue_status(
        self, state: State, request: Request, issue_id: FromPath[uuid.UUID], data: JSONBody[IssueStatusChange]
    ) -> StationIssueView:
        """Move a reported station issue along; resolving it notifies the person who reported it."""
        services = services_of(state)
        async with services.readonly() as session:
            issue = await session.get(StationIssue, issue_id)
            station = await session.get(Station, issue.station_id) if issue else None
            if station is None or not scope_of(request.user).covers(station.tenant_id):
                raise ApiError(404, "issue_not_found", f"no station issue {issue_id}")
        before = issue.status
        issue = await set_station_issue_status(services.runtime, issue_id, data.status)
        if issue is None:
            raise ApiError(404, "issue_not_found", f"no station issue {issue_id}")
        if before != issue.status:
            details = {"from": before, "to": issue.status}
            await record_admin_action(services.sessions, admin_action(
                request, "station_issue_status", "station_issue", issue_id, tenant_id=station.tenant_id, details=details))
        return issue_view(issue, station.serial)

    @get("/action-logs", responses=error_responses(400, 401, 403))
    async def action_logs(
        self, state: State, request: Request, paging: NamedDependency[Paging],
        target_type: TargetType = None, target_id: TargetId = None,
    ) -> AdminActionPage:
        """What staff did through this API, newest first; operators see their tenant's."""
        query = actions_in(scope_of(request.user))
        if target_type is not None:
            query = query.where(AdminActionLog.target_type == target_type)
        if target_id is not None:
            query = query.where(AdminActionLog.target_id == target_id)
        async with services_of(state).readonly() as session:
            rows, total = await page_of(session, query, paging, [AdminActionLog.created_at.desc(), AdminActionLog.id.desc()])
        return AdminActionPage(items=[action_view(r) for r in rows], page=paging.page, page_size=paging.page_size, total=total)

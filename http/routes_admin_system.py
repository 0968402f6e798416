"""Admin system and achievement endpoints (admin or superadmin only).

System: what went wrong (`system_logs`, written by http/system_log.py), and what happened to
the notifications sent outside the app (`notification_deliveries`, `sms_fcm_log`). Read only.

Achievements: the goals people unlock (`achievements`) and who unlocked them. Every write is
one transaction with its AdminActionLog row. Achievements are not in the read cache (a person's
progress is read with them), so nothing is invalidated.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.auth import BEARER_SECURITY, require_admin
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.routes_admin_content import as_utc, audited_write, insert
from powerbank.http.schemas_admin import (
    AchievementAdminPage,
    AchievementAdminView,
    AchievementWrite,
    DeliveryPage,
    DeliveryView,
    SmsFcmLogPage,
    SmsFcmLogView,
    SystemLogPage,
    SystemLogView,
    UnlockPage,
    UnlockView,
)
from powerbank.storage.models import Achievement, NotificationDelivery, SmsFcmLog, SystemLog, User, UserAchievement, UserProfile

LEVELS_AT_LEAST = {"WARNING": ("WARNING", "ERROR", "CRITICAL"), "ERROR": ("ERROR", "CRITICAL"), "CRITICAL": ("CRITICAL",)}
LevelFilter = Annotated[str | None, QueryParameter(pattern="^(WARNING|ERROR|CRITICAL)$", description="this level and worse")]
LoggerFilter = Annotated[str | None, QueryParameter(max_length=100, pattern=r"^[A-Za-z0-9_.]+$", description="this logger and its children, e.g. powerbank.actors")]
Since = Annotated[datetime | None, QueryParameter(description="from this time (with a zone), inclusive")]
Until = Annotated[datetime | None, QueryParameter(description="before this time (with a zone)")]
DeliveryStatus = Annotated[str | None, QueryParameter(pattern="^(queued|sent|failed)$")]
DeliveryChannel = Annotated[str | None, QueryParameter(pattern="^(push|sms)$")]
SmsChannel = Annotated[str | None, QueryParameter(pattern="^(sms|fcm)$")]


# --- pure decisions ---------------------------------------------------------------------------


def time_window(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    """Both ends in UTC; a time without a zone is ambiguous, so it is refused."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ApiError(400, "validation_failed", f"{name}: needs a zone, e.g. 2026-11-01T00:00:00Z")
    return as_utc(since, "since"), as_utc(until, "until")


def logs_query(level: str | None, logger: str | None, since: datetime | None, until: datetime | None) -> Select:
    query = select(SystemLog)
    if level is not None:
        query = query.where(SystemLog.level.in_(LEVELS_AT_LEAST[level]))
    if logger is not None:
        query = query.where((SystemLog.logger == logger) | SystemLog.logger.startswith(f"{logger}.", autoescape=True))
    if since is not None:
        query = query.where(SystemLog.created_at >= since)
    if until is not None:
        query = query.where(SystemLog.created_at < until)
    return query


# --- storage ----------------------------------------------------------------------------------


async def page_of(state: State, query: Select, order_by: tuple, paging: Paging) -> tuple[list[Any], int]:
    """One page of `query`'s rows and how many there are in all."""
    async with services_of(state).readonly() as session:
        total = int(await session.scalar(select(func.count()).select_from(query.subquery())) or 0)
        rows = list((await session.execute(query.order_by(*order_by).offset(paging.offset).limit(paging.page_size))).scalars())
    return rows, total


def _view(view_type: type, row: Any, **extra: Any) -> Any:
    fields = {name: getattr(row, name) for name in view_type.__struct_fields__ if name not in extra}
    return view_type(**fields, **extra)


# --- routes -----------------------------------------------------------------------------------

LIST_ERRORS = error_responses(400, 401, 403)


class AdminSystemController(Controller):
    path = "/api/admin/system"
    tags = ["admin"]
    security = BEARER_SECURITY
    guards = [require_admin]
    dependencies = {"paging": Provide(provide_paging)}

    @get("/logs", responses=LIST_ERRORS)
    async def logs(
        self, state: State, paging: NamedDependency[Paging], level: LevelFilter = None, logger: LoggerFilter = None,
        since: Since = None, until: Until = None,
    ) -> SystemLogPage:
        """Warnings and errors of the powerbank loggers, newest first. Capped per minute (a
        summary row counts what was dropped), so this is a symptom list, not the full log."""
        since, until = time_window(since, until)
        rows, total = await page_of(state, logs_query(level, logger, since, until), (SystemLog.created_at.desc(), SystemLog.id.desc()), paging)
        return SystemLogPage(items=[_view(SystemLogView, r) for r in rows], page=paging.page, page_size=paging.page_size, total=total)

    @get("/notification-deliveries", responses=LIST_ERRORS)
    async def deliveries(
        self, state: State, paging: NamedDependency[Paging], status: DeliveryStatus = None, channel: DeliveryChannel = None,
    ) -> DeliveryPage:
        """Push and SMS deliveries of notifications, newest first: `failed` ones have given up
        after their retries (`last_error` says why); `queued` ones are still being tried."""
        query = select(NotificationDelivery)
        if status is not None:
            query = query.where(NotificationDelivery.status == status)
        if channel is not None:
            query = query.where(NotificationDelivery.channel == channel)
        rows, total = await page_of(state, query, (NotificationDelivery.created_at.desc(), NotificationDelivery.id), paging)
        return DeliveryPage(items=[_view(DeliveryView, r) for r in rows], page=paging.page, page_size=paging.page_size, total=total)

    @get("/sms-fcm-log", responses=LIST_ERRORS)
    async def sms_fcm_log(
        self, state: State, paging: NamedDependency[Paging], status: DeliveryStatus = None, channel: SmsChannel = None,
    ) -> SmsFcmLogPage:
        """Every SMS or push message handed to a provider, newest first (bodies are left out:
        they hold sign-in codes)."""
        query = select(SmsFcmLog)
        if status is not None:
            query = query.where(SmsFcmLog.status == status)
        if channel is not None:
            query = query.where(SmsFcmLog.channel == channel)
        rows, total = await page_of(state, query, (SmsFcmLog.created_at.desc(), SmsFcmLog.id), paging)
        return SmsFcmLogPage(items=[_view(SmsFcmLogView, r) for r in rows], page=paging.page, page_size=paging.page_size, total=total)


class AdminAchievementController(Controller):
    path = "/api/admin/achievements"
    tags = ["admin"]
    security = BEARER_SECURITY
    guards = [require_admin]
    dependencies = {"paging": Provide(provide_paging)}

    @get("/", responses=LIST_ERRORS)
    async def list_achievements(self, state: State, paging: NamedDependency[Paging]) -> AchievementAdminPage:
        """Every achievement, inactive ones too, in display order, with how many people have
        unlocked each."""
        rows, total = await page_of(state, select(Achievement), (Achievement.sort_order, Achievement.code), paging)
        async with services_of(state).readonly() as session:
            counts = await unlock_counts(session, [r.id for r in rows])
        items = [_view(AchievementAdminView, r, unlocked_by=counts.get(r.id, 0)) for r in rows]
        return AchievementAdminPage(items=items, page=paging.page, page_size=paging.page_size, total=total)

    @post("/", status_code=201, responses=error_responses(400, 401, 403, 409))
    async def create_achievement(self, state: State, request: Request, data: JSONBody[AchievementWrite]) -> AchievementAdminView:
        """Add a goal; its `code` is unique (409 `achievement_exists`)."""
        row = await audited_write(state, request, insert(Achievement(**msgspec.structs.asdict(data))), action="achievement_created",
                                  target_type="achievement", cache_keys=(), conflict="achievement_exists", details={"code": data.code})
        return _view(AchievementAdminView, row, unlocked_by=0)

    @put("/{achievement_id:uuid}", responses=error_responses(400, 401, 403, 404, 409))
    async def update_achievement(self, state: State, request: Request, achievement_id: FromPath[uuid.UUID], data: JSONBody[AchievementWrite]) -> AchievementAdminView:
        """Replace a goal; `is_active: false` retires it (people keep what they unlocked). A
        changed threshold applies to progress counted from then on; unlocks stay."""
        columns = msgspec.structs.asdict(data)

        async def change(session: AsyncSession) -> tuple[Achievement, uuid.UUID]:
            row = await session.get(Achievement, achievement_id, with_for_update=True)
            if row is None:
                raise ApiError(404, "achievement_not_found", f"no achievement {achievement_id}")
            for name, value in columns.items():
                setattr(row, name, value)
            return row, achievement_id

        row = await audited_write(state, request, change, action="achievement_updated", target_type="achievement",
                                  cache_keys=(), conflict="achievement_exists", details={"code": data.code})
        async with services_of(state).readonly() as session:
            counts = await unlock_counts(session, [achievement_id])
        return _view(AchievementAdminView, row, unlocked_by=counts.get(achievement_id, 0))

    @delete("/{achievement_id:uuid}", status_code=204, responses=error_responses(400, 401, 403, 404, 409))
    async def delete_achievement(self, state: State, request: Request, achievement_id: FromPath[uuid.UUID]) -> None:
        """Delete a goal nobody has made progress on; otherwise 409 `achievement_in_use`
        (retire it with `is_active: false`: deleting would erase people's unlocks)."""

        async def change(session: AsyncSession) -> tuple[None, uuid.UUID]:
            row = await session.get(Achievement, achievement_id, with_for_update=True)
            if row is None:
                raise ApiError(404, "achievement_not_found", f"no achievement {achievement_id}")
            used = await session.scalar(select(func.count()).select_from(UserAchievement).where(UserAchievement.achievement_id == achievement_id))
            if used:
                raise ApiError(409, "achievement_in_use", f"{used} people have progress on it; deactivate it instead")
            await session.delete(row)
            return None, achievement_id

        await audited_write(state, request, change, action="achievement_deleted", target_type="achievement", cache_keys=())

    @get("/{achievement_id:uuid}/unlocks", responses=error_responses(400, 401, 403, 404))
    async def unlocks(self, state: State, achievement_id: FromPath[uuid.UUID], paging: NamedDependency[Paging]) -> UnlockPage:
        """Who has unlocked this achievement, most recent first."""
        query = (
            select(UserAchievement, User.phone, UserProfile.full_name)
            .join(User, User.id == UserAchievement.user_id)
            .outerjoin(UserProfile, UserProfile.user_id == UserAchievement.user_id)
            .where(UserAchievement.achievement_id == achievement_id, UserAchievement.unlocked_at.is_not(None))
        )
        async with services_of(state).readonly() as session:
            if await session.get(Achievement, achievement_id) is None:
                raise ApiError(404, "achievement_not_found", f"no achievement {achievement_id}")
            total = int(await session.scalar(select(func.count()).select_from(query.subquery())) or 0)
            rows = (await session.execute(
                query.order_by(UserAchievement.unlocked_at.desc(), UserAchievement.user_id).offset(paging.offset).limit(paging.page_size)
            )).all()
        items = [
            UnlockView(user_id=ua.user_id, phone=phone, full_name=name, progress=ua.progress, unlocked_at=ua.unlocked_at)
            for ua, phone, name in rows
        ]
        return UnlockPage(items=items, page=paging.page, page_size=paging.page_size, total=total)


async def unlock_counts(session: AsyncSession, achievement_ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    if not achievement_ids:
        return {}
    rows = await session.execute(
        select(UserAchievement.achievement_id, func.count())
        .where(UserAchievement.achievement_id.in_(achievement_ids), UserAchievement.unlocked_at.is_not(None))
        .group_by(UserAchievement.achievement_id)
    )
    return {achievement_id: count for achievement_id, count in rows.all()}

"""The caller's in-app notifications: list, mark one or all read, delete one.

Every statement is filtered by the caller's id, so another person's notification id behaves
exactly like an id that does not exist (404 `notification_not_found`), and its existence does
not leak.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, Request, delete, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy import delete as sql_delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.actors.notifications import DEFAULT_RULES
from powerbank.http.schemas_app import (
    MarkedRead,
    NotificationPage,
    NotificationPreferencesChange,
    NotificationPreferencesView,
    NotificationView,
)
from powerbank.storage.models import Notification, NotificationPreference
from powerbank.storage.types import utcnow


def notification_view(row: Notification) -> NotificationView:
    return NotificationView(
        id=row.id, kind=row.kind, title=row.title, body=row.body, data=dict(row.data or {}), read=row.read_at is not None,
        read_at=row.read_at, created_at=row.created_at,
    )


async def unread_count(session: AsyncSession, user_id: uuid.UUID) -> int:
    count = await session.scalar(
        select(func.count()).select_from(Notification).where(Notification.user_id == user_id, Notification.read_at.is_(None))
    )
    return count or 0


def not_found(notification_id: uuid.UUID) -> ApiError:
    return ApiError(404, "notification_not_found", f"no notification {notification_id}")


class NotificationController(Controller):
    path = "/api/user"
    tags = ["notifications"]
    security = BEARER_SECURITY
    dependencies = {"paging": Provide(provide_paging)}

    @get("/notifications", responses=error_responses(400, 401))
    async def notifications(
        self,
        state: State,
        request: Request,
        paging: NamedDependency[Paging],
        unread_only: Annotated[bool, QueryParameter(description="only unread ones")] = False,
    ) -> NotificationPage:
        """The caller's notifications, newest first, with the unread count."""
        where = [Notification.user_id == request.user.id]
        if unread_only:
            where.append(Notification.read_at.is_(None))
        async with services_of(state).readonly() as session:
            total = await session.scalar(select(func.count()).select_from(Notification).where(*where))
            rows = await session.execute(
                select(Notification).where(*where).order_by(Notification.created_at.desc(), Notification.id)
                .offset(paging.offset).limit(paging.page_size)
            )
            items = [notification_view(row) for row in rows.scalars()]
            unread = await unread_count(session, request.user.id)
        return NotificationPage(items=items, page=paging.page, page_size=paging.page_size, total=total or 0, unread=unread)

    @post("/notification/{notification_id:uuid}", status_code=200, responses=error_responses(400, 401, 404))
    async def mark_read(self, state: State, request: Request, notification_id: FromPath[uuid.UUID]) -> NotificationView:
        """Mark one notification read (already read stays as it was)."""
        async with services_of(state).sessions.begin() as session:
            row = (
                await session.execute(
                    select(Notification).where(Notification.id == notification_id, Notification.user_id == request.user.id)
                )
            ).scalar_one_or_none()
            if row is None:
                raise not_found(notification_id)
            if row.read_at is None:
                row.read_at = utcnow()
            return notification_view(row)

    @post("/notifications/mark-all-read", status_code=200, responses=error_responses(401))
    async def mark_all_read(self, state: State, request: Request) -> MarkedRead:
        """Mark every unread notification of the caller read."""
        async with services_of(state).sessions.begin() as session:
            result = await session.execute(
                update(Notification)
                .where(Notification.user_id == request.user.id, Notification.read_at.is_(None))
                .values(read_at=utcnow())
            )
        return MarkedRead(marked=result.rowcount or 0, unread=0)

    @delete("/notification/{notification_id:uuid}", status_code=204, responses=error_responses(400, 401, 404))
    async def remove(self, state: State, request: Request, notification_id: FromPath[uuid.UUID]) -> None:
        """Delete one notification."""
        async with services_of(state).sessions.begin() as session:
            result = await session.execute(
                sql_delete(Notification).where(Notification.id == notification_id, Notification.user_id == request.user.id)
            )
            if not result.rowcount:
                raise not_found(notification_id)

    @get("/notification-preferences", responses=error_responses(401))
    async def preferences(self, state: State, request: Request) -> NotificationPreferencesView:
        """Your choices for push and SMS (seed 001); everything on until you change it."""
        async with services_of(state).readonly() as session:
            return preferences_view(await session.get(NotificationPreference, request.user.id))

    @patch("/notification-preferences", responses=error_responses(400, 401))
    async def change_preferences(
        self, state: State, request: Request, data: JSONBody[NotificationPreferencesChange]
    ) -> NotificationPreferencesView:
        """Change only the fields sent. Muting a kind silences its push and SMS, not the inbox;
        critical kinds (overdue, lost) are sent anyway (400 `unknown_kind` for a kind that
        does not exist)."""
        unknown = sorted(set(data.muted_kinds or ()) - set(DEFAULT_RULES))
        if unknown:
            raise ApiError(400, "unknown_kind", f"no notification kind {unknown[0]!r}", kinds=sorted(DEFAULT_RULES))
        async with services_of(state).sessions.begin() as session:
            row = await session.get(NotificationPreference, request.user.id, with_for_update=True)
            if row is None:
                row = NotificationPreference(user_id=request.user.id, push_enabled=True, sms_enabled=True, muted_kinds=[], language="en")
                session.add(row)
            for field_name in ("push_enabled", "sms_enabled", "language"):
                if getattr(data, field_name) is not None:
                    setattr(row, field_name, getattr(data, field_name))
            if data.muted_kinds is not None:
                row.muted_kinds = sorted(set(data.muted_kinds))
            await session.flush()
            return preferences_view(row)


def preferences_view(row: NotificationPreference | None) -> NotificationPreferencesView:
    kinds = sorted(DEFAULT_RULES)
    if row is None:
        return NotificationPreferencesView(push_enabled=True, sms_enabled=True, muted_kinds=[], language="en", kinds=kinds)
    return NotificationPreferencesView(
        push_enabled=row.push_enabled, sms_enabled=row.sms_enabled, muted_kinds=list(row.muted_kinds or []),
        language=row.language, kinds=kinds,
    )

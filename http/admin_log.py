"""AdminActionLog rows: one per action taken through the admin API.

A change this process writes itself gets its row in the same transaction (`admin_action` then
`session.add`). A change an actor applies is logged right after the actor's answer
(`record_admin_action`): the actor's transaction cannot be widened from here, and a crash in
between loses a log row, never the change or its own history (station status changes, ledger
transfers keep their reasons).
"""

from __future__ import annotations

import uuid
from typing import Any

from litestar import Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.http.auth import AuthUser
from powerbank.storage.models import AdminActionLog


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def admin_action(
    request: Request, action: str, target_type: str, target_id: Any, *,
    tenant_id: uuid.UUID | None = None, details: dict[str, Any] | None = None,
) -> AdminActionLog:
    """The row for one action by the request's user; `tenant_id` defaults to the actor's own
    (an operator always acts inside their tenant)."""
    actor: AuthUser = request.user
    return AdminActionLog(
        actor_id=actor.id, actor_role=actor.role, tenant_id=tenant_id or actor.tenant_id,
        action=action, target_type=target_type, target_id=str(target_id), details=details or {},
        ip=client_ip(request),
    )


async def record_admin_action(sessions: async_sessionmaker[AsyncSession], row: AdminActionLog) -> None:
    async with sessions.begin() as session:
        session.add(row)

"""UserAuditLog rows for a person's sensitive actions (profile, devices, KYC, account deletion).

Rows name the fields that changed, never their values: the log outlives account deletion and
must not keep what deletion erases.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.storage.models import UserAuditLog
from powerbank.storage.types import utcnow


def record_user_action(
    session: AsyncSession,
    actor_id: uuid.UUID | None,
    action: str,
    *,
    target_type: str | None = None,
    target_id: object | None = None,
    ip: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Add the row to the caller's transaction, so the action and its audit commit together."""
    session.add(
        UserAuditLog(
            actor_id=actor_id, action=action, target_type=target_type,
            target_id=None if target_id is None else str(target_id), ip=ip, details=details or {}, created_at=utcnow(),
        )
    )


async def detach_actor(session: AsyncSession, actor_id: uuid.UUID) -> int:
    """Account deletion: the person's audit rows stay, no longer pointing at them."""
    result = await session.execute(update(UserAuditLog).where(UserAuditLog.actor_id == actor_id).values(actor_id=None))
    return result.rowcount or 0

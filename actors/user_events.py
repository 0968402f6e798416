"""A person's events, kept so their apps can catch up: what an actor publishes on `user:<id>`
is also written, numbered per person, in the transaction that made it true.

Why numbers from a counter row rather than an auto-increment id: two transactions for one person
(their wallet and a rental) may get ids in one order and commit in the other; an app that saw the
later one and then reconnected would skip the earlier. The counter's row lock is held to commit,
so per person the numbers follow commit order, and "everything after n" is exact.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.storage.models import UserEvent, UserEventCounter

USER_CHANNEL_PREFIX = "user:"
REPLAY_LIMIT = 1000
RETENTION = timedelta(days=7)


def user_of(channel: str) -> uuid.UUID | None:
    if not channel.startswith(USER_CHANNEL_PREFIX):
        return None
    try:
        return uuid.UUID(channel[len(USER_CHANNEL_PREFIX):])
    except ValueError:
        return None


def by_user(notifications: list[tuple[str, dict[str, Any]]]) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """The events meant for people, per person, in the order they were published."""
    grouped: dict[uuid.UUID, list[dict[str, Any]]] = defaultdict(list)
    for channel, event in notifications:
        user_id = user_of(channel)
        if user_id is not None:
            grouped[user_id].append(event)
    return grouped


async def record(session: AsyncSession, notifications: list[tuple[str, dict[str, Any]]], now: datetime) -> None:
    """Number and keep every person's event of this transaction; each event dict gets its `seq`
    (the live copy then carries the same number the app will resume from). People in id order,
    so two transactions touching the same two people cannot deadlock on their counters."""
    grouped = by_user(notifications)
    for user_id in sorted(grouped):
        events = grouped[user_id]
        last = await _reserve(session, user_id, len(events))
        rows = []
        for seq, event in enumerate(events, start=last - len(events) + 1):
            event["seq"] = seq
            rows.append({"user_id": user_id, "seq": seq, "type": str(event.get("type", "event"))[:48], "payload": event, "created_at": now})
        await session.execute(insert(UserEvent), rows)


async def _reserve(session: AsyncSession, user_id: uuid.UUID, count: int) -> int:
    """Move the person's counter on by `count`; the new last number."""
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    table = UserEventCounter.__table__
    statement = (
        dialect.insert(table).values(user_id=user_id, last_seq=count)
        .on_conflict_do_update(index_elements=[table.c.user_id], set_={"last_seq": table.c.last_seq + count})
        .returning(table.c.last_seq)
    )
    return int((await session.execute(statement)).scalar_one())


async def since(session: AsyncSession, user_id: uuid.UUID, after_seq: int, limit: int = REPLAY_LIMIT) -> list[dict[str, Any]]:
    """The person's kept events numbered after `after_seq`, oldest first."""
    rows = await session.execute(
        select(UserEvent.payload).where(UserEvent.user_id == user_id, UserEvent.seq > after_seq).order_by(UserEvent.seq).limit(limit)
    )
    return list(rows.scalars())


async def last_seq(session: AsyncSession, user_id: uuid.UUID) -> int:
    return int(await session.scalar(select(UserEventCounter.last_seq).where(UserEventCounter.user_id == user_id)) or 0)


async def oldest_kept_seq(session: AsyncSession, user_id: uuid.UUID) -> int | None:
    return await session.scalar(select(func.min(UserEvent.seq)).where(UserEvent.user_id == user_id))


async def prune(session: AsyncSession, now: datetime, retention: timedelta = RETENTION) -> int:
    """Forget events older than the retention (an app away longer re-reads the REST API)."""
    result = await session.execute(delete(UserEvent).where(UserEvent.created_at < now - retention))
    return result.rowcount or 0


async def prune_user_events(runtime, now: datetime) -> int:
    """The scheduler's job: `prune` in a transaction of its own."""
    async with runtime.sessions.begin() as session:
        return await prune(session, now)

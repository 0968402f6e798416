"""Leaderboard and achievements.

The leaderboard is a snapshot table (UserLeaderboard) recomputed from rentals when it is older
than `LEADERBOARD_TTL_S`, so a read is one indexed query on (period, rank) however many rentals
exist; the recomputation is one grouped query. Names are shortened ("Asha K.") so the board
shows no one's phone or full name.

Achievement progress is counted from the caller's rentals on each read and stored in
UserAchievement; the first read at or past the threshold records when it was unlocked.
Awarding an achievement's points belongs to the Wallet actor and is not done here yet.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import QueryParameter
from sqlalchemy import case, delete as sql_delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import services_of
from powerbank.http.errors import error_responses
from powerbank.http.routes_profile import minutes_between
from powerbank.http.schemas_app import AchievementView, Leaderboard, LeaderboardEntry
from powerbank.storage.models import Achievement, Rental, User, UserAchievement, UserLeaderboard, UserProfile
from powerbank.storage.types import utcnow

LEADERBOARD_TTL_S = 300
LEADERBOARD_SIZE = 50
Period = Literal["all_time", "month"]
LEADERBOARD_PERIODS = ("all_time", "month")


# --- pure decisions ---------------------------------------------------------------------------


def display_name(full_name: str | None, user_id: uuid.UUID) -> str:
    """First name and the initial of the last; "Rider 1a2b" for someone without a name."""
    parts = (full_name or "").split()
    if not parts:
        return f"Rider {user_id.hex[-4:]}"
    if len(parts) == 1:
        return parts[0]
    return f"{parts[0]} {parts[-1][0].upper()}."


def period_start(period: str, now: datetime) -> datetime | None:
    if period == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


def rank_rows(rows: list[tuple[uuid.UUID, int, int]]) -> list[tuple[uuid.UUID, int, int, int]]:
    """(user, completed, minutes) -> (user, rank, completed, minutes): more rentals first, then
    more minutes; ties share a rank (1, 2, 2, 4)."""
    ordered = sorted(rows, key=lambda r: (-r[1], -r[2], str(r[0])))
    ranked, previous, rank = [], None, 0
    for position, (user_id, completed, minutes) in enumerate(ordered, start=1):
        if (completed, minutes) != previous:
            rank, previous = position, (completed, minutes)
        ranked.append((user_id, rank, completed, minutes))
    return ranked


def is_stale(computed_at: datetime | None, now: datetime, ttl_s: int = LEADERBOARD_TTL_S) -> bool:
    return computed_at is None or (now - computed_at).total_seconds() >= ttl_s


def achievement_unlocked(progress: int, threshold: int) -> bool:
    return progress >= threshold


# --- storage ----------------------------------------------------------------------------------


async def recompute_leaderboard(session: AsyncSession, period: str, now: datetime) -> None:
    since = period_start(period, now)
    where = [Rental.status == "completed", User.status == "active"]
    if since is not None:
        where.append(Rental.returned_at >= since)
    rows = await session.execute(
        select(
            Rental.user_id, func.count(), func.coalesce(func.sum(minutes_between(session, Rental.started_at, Rental.returned_at)), 0)
        )
        .join(User, User.id == Rental.user_id)
        .where(*where)
        .group_by(Rental.user_id)
    )
    ranked = rank_rows([(user_id, int(completed), int(minutes)) for user_id, completed, minutes in rows])
    await session.execute(sql_delete(UserLeaderboard).where(UserLeaderboard.period == period))
    session.add_all(
        UserLeaderboard(period=period, user_id=user_id, rank=rank, rentals_completed=completed, minutes_total=minutes, computed_at=now)
        for user_id, rank, completed, minutes in ranked
    )


async def leaderboard_is_stale(session: AsyncSession, period: str, now: datetime) -> bool:
    computed_at = await session.scalar(select(func.max(UserLeaderboard.computed_at)).where(UserLeaderboard.period == period))
    if isinstance(computed_at, str):  # SQLite aggregates skip the column type
        computed_at = datetime.fromisoformat(computed_at)
    if computed_at is not None and computed_at.tzinfo is None:
        computed_at = computed_at.replace(tzinfo=now.tzinfo)
    # An empty board has no timestamp; recomputing it stays cheap while it is empty.
    return is_stale(computed_at, now)


async def fresh_leaderboard(state: State, period: str) -> None:
    """The scheduler keeps the boards fresh (scheduler.py); a read refreshes one only if the
    scheduler is not running (a single-process deployment without it, or tests)."""
    services = services_of(state)
    now = utcnow()
    async with services.readonly() as session:
        if not await leaderboard_is_stale(session, period, now):
            return
    try:
        async with services.sessions.begin() as session:
            await recompute_leaderboard(session, period, now)
    except IntegrityError:
        pass  # another request recomputed it at the same moment; its snapshot is as good


def entry(row: UserLeaderboard, full_name: str | None, caller: uuid.UUID) -> LeaderboardEntry:
    return LeaderboardEntry(
        rank=row.rank, display_name=display_name(full_name, row.user_id), rentals_completed=row.rentals_completed,
        minutes_total=row.minutes_total, is_you=row.user_id == caller,
    )


async def read_leaderboard(session: AsyncSession, period: str, caller: uuid.UUID, limit: int) -> Leaderboard:
    base = select(UserLeaderboard, UserProfile.full_name).outerjoin(UserProfile, UserProfile.user_id == UserLeaderboard.user_id)
    rows = list(
        await session.execute(
            base.where(UserLeaderboard.period == period).order_by(UserLeaderboard.rank, UserLeaderboard.user_id).limit(limit)
        )
    )
    mine = (await session.execute(base.where(UserLeaderboard.period == period, UserLeaderboard.user_id == caller))).first()
    computed_at = rows[0][0].computed_at if rows else utcnow()
    return Leaderboard(
        period=period, computed_at=computed_at, items=[entry(row, name, caller) for row, name in rows],
        you=entry(mine[0], mine[1], caller) if mine else None,
    )


async def metric_values(session: AsyncSession, user_id: uuid.UUID) -> dict[str, int]:
    completed, timely, stations = (
        await session.execute(
            select(
                func.sum(case((Rental.status == "completed", 1), else_=0)),
                func.sum(case(((Rental.status == "completed") & (Rental.returned_at <= Rental.due_at), 1), else_=0)),
                func.count(func.distinct(case((Rental.started_at.is_not(None), Rental.station_id)))),
            ).where(Rental.user_id == user_id)
        )
    ).one()
    return {"rentals_completed": int(completed or 0), "timely_returns": int(timely or 0), "stations_visited": int(stations or 0)}


async def sync_achievements(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> list[AchievementView]:
    metrics = await metric_values(session, user_id)
    achievements = list(
        (await session.execute(select(Achievement).where(Achievement.is_active.is_(True)).order_by(Achievement.sort_order, Achievement.code))).scalars()
    )
    progress_rows = {
        row.achievement_id: row
        for row in (await session.execute(select(UserAchievement).where(UserAchievement.user_id == user_id))).scalars()
    }
    views = []
    for achievement in achievements:
        progress = metrics.get(achievement.metric, 0)
        row = progress_rows.get(achievement.id)
        if row is None:
            row = UserAchievement(user_id=user_id, achievement_id=achievement.id, progress=0)
            session.add(row)
        row.progress = max(row.progress or 0, progress)
        if row.unlocked_at is None and achievement_unlocked(row.progress, achievement.threshold):
            row.unlocked_at = now
        row.updated_at = now
        views.append(
            AchievementView(
                code=achievement.code, name=achievement.name, description=achievement.description, metric=achievement.metric,
                threshold=achievement.threshold, points=achievement.points, progress=row.progress,
                unlocked=row.unlocked_at is not None, unlocked_at=row.unlocked_at,
            )
        )
    return views


# --- routes -----------------------------------------------------------------------------------


class SocialController(Controller):
    path = "/api/users"
    tags = ["social"]
    security = BEARER_SECURITY

    @get("/leaderboard", responses=error_responses(400, 401))
    async def leaderboard(
        self,
        state: State,
        request: Request,
        period: Annotated[Period, QueryParameter(description="all_time or the current month")] = "all_time",
        limit: Annotated[int, QueryParameter(ge=1, le=LEADERBOARD_SIZE, description="how many places")] = 20,
    ) -> Leaderboard:
        """Riders ranked by completed rentals (then minutes), refreshed every few minutes, with
        the caller's own place (`you`, null before their first completed rental)."""
        await fresh_leaderboard(state, period)
        async with services_of(state).readonly() as session:
            return await read_leaderboard(session, period, request.user.id, limit)

    @get("/achievements", responses=error_responses(401))
    async def achievements(self, state: State, request: Request) -> list[AchievementView]:
        """Every active achievement with the caller's progress and when it was unlocked."""
        try:
            async with services_of(state).sessions.begin() as session:
                return await sync_achievements(session, request.user.id, utcnow())
        except IntegrityError:
            # A concurrent read of the same person created the progress rows first; they exist now.
            async with services_of(state).sessions.begin() as session:
                return await sync_achievements(session, request.user.id, utcnow())

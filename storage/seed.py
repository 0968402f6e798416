"""Reference data every installation starts with; safe to run on every start."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.storage.models import AppConfig, RentalPackage

DEFAULT_CONFIG = {
    "points_per_currency_unit": ({"points": 10, "minor_units": 100}, "Points worth one currency unit"),
    "min_eject_charge_percent": ({"value": 20}, "Banks below this charge are never ejected"),
    "quick_return_s": ({"value": 300}, "Returns faster than this are flagged as possibly faulty"),
}


def default_packages(currency: str) -> list[RentalPackage]:
    return [
        RentalPackage(
            code="hour-1", name="1 hour", duration_minutes=60, price_minor=5000, currency=currency,
            grace_minutes=5, late_fee_per_hour_minor=3000, late_fee_daily_cap_minor=30000,
            max_duration_minutes=7 * 24 * 60, sort_order=1,
        ),
        RentalPackage(
            code="day-1", name="1 day", duration_minutes=24 * 60, price_minor=20000, currency=currency,
            grace_minutes=15, late_fee_per_hour_minor=2000, late_fee_daily_cap_minor=20000,
            max_duration_minutes=7 * 24 * 60, sort_order=2,
        ),
    ]


async def ensure_defaults(sessions: async_sessionmaker[AsyncSession], currency: str) -> None:
    async with sessions.begin() as session:
        await _ensure_packages(session, currency)
        await _ensure_config(session)


async def _ensure_packages(session: AsyncSession, currency: str) -> None:
    if (await session.execute(select(RentalPackage.id).limit(1))).first() is None:
        session.add_all(default_packages(currency))


async def _ensure_config(session: AsyncSession) -> None:
    existing = set((await session.execute(select(AppConfig.key))).scalars())
    for key, (value, description) in DEFAULT_CONFIG.items():
        if key not in existing:
            session.add(AppConfig(key=key, value=value, description=description))

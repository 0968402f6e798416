"""Reference data every installation starts with; safe to run on every start."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.storage.db import insert_unless_exists
from powerbank.storage.models import AppConfig, RentalPackage
from powerbank.storage.types import utcnow

DEFAULT_CONFIG = {
    "points_per_currency_unit": ({"points": 10, "minor_units": 100}, "Points worth one currency unit"),
    "min_eject_charge_percent": ({"value": 20}, "Banks below this charge are never ejected"),
    "quick_return_s": ({"value": 300}, "Returns faster than this are flagged as possibly faulty"),
    "timely_return_points": ({"value": 10}, "Points for a return within the package time"),
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
    """Insert what is missing. Several processes may start at once, so every insert yields to
    a row that another one committed first."""
    async with sessions.begin() as session:
        if (await session.execute(select(RentalPackage.id).limit(1))).first() is None:
            for package in default_packages(currency):
                await _insert_missing(session, RentalPackage, _columns(package), "code")
        for key, (value, description) in DEFAULT_CONFIG.items():
            await _insert_missing(session, AppConfig, {"key": key, "value": value, "description": description}, "key")


def _columns(row) -> dict:
    values = {column.key: getattr(row, column.key) for column in row.__table__.columns}
    values["id"] = values["id"] or uuid.uuid4()
    values["created_at"] = values.get("created_at") or utcnow()
    return {key: value for key, value in values.items() if value is not None}


async def _insert_missing(session: AsyncSession, model, values: dict, unique_column: str) -> None:
    await session.execute(insert_unless_exists(session.bind.dialect.name, model, values, [unique_column]))

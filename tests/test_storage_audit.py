"""The end-of-run audit finds each kind of violation it claims to check."""

from __future__ import annotations

import uuid

from sqlalchemy import update

from powerbank.storage.audit import audit
from powerbank.storage.db import session_factory
from powerbank.storage.models import LedgerAccount, PowerBank, Rental, RentalPackage, Station, StationSlot, User


async def _world(sessions):
    async with sessions.begin() as db:
        user = User(phone="+9779811111111", referral_code="AUDIT1")
        station = Station(serial="AUD-1", name="a", latitude=0, longitude=0, slot_count=2)
        package = RentalPackage(code="p", name="p", duration_minutes=60, price_minor=100, currency="NPR", max_duration_minutes=600)
        bank = PowerBank(serial="PB-AUD", currency="NPR")
        db.add_all([user, station, package, bank])
        await db.flush()
        return user.id, station.id, package.id, bank.id


async def test_a_clean_database_passes(engine):
    sessions = session_factory(engine)
    await _world(sessions)
    assert await audit(sessions) == {}


async def test_each_violation_is_reported(engine):
    sessions = session_factory(engine)
    user_id, station_id, package_id, bank_id = await _world(sessions)
    async with sessions.begin() as db:
        common = dict(user_id=user_id, station_id=station_id, package_id=package_id, currency="NPR")
        db.add_all([
            Rental(**common, status="active", power_bank_id=bank_id),
            Rental(**common, status="active", power_bank_id=bank_id),
            Rental(**common, status="ejecting"),
            StationSlot(station_id=station_id, slot_number=1, status="occupied", power_bank_id=bank_id),
            LedgerAccount(code=f"wallet:{uuid.uuid4()}", kind="user_wallet", currency="NPR", credits_posted=500),
        ])
        await db.flush()
        await db.execute(update(PowerBank).values(status="rented"))
    found = await audit(sessions)
    assert set(found) == {"bank_in_two_places", "rental_transient", "ledger"}
    assert len(found["bank_in_two_places"]) == 2  # two open rentals, and also in a slot
    assert len(found["rental_transient"]) == 1

"""End to end on real sockets: riders over HTTP and websocket, stations over MQTT, the backend
between them, on the embedded default and on PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid

import pytest
from sqlalchemy import func, select

from powerbank.config import load_settings
from powerbank.demo import free_port
from powerbank.processes import ALL_ROLES, start_backend
from powerbank.simulators.riders import Admin, Rider
from powerbank.simulators.stations import Fleet, provision_fleet
from powerbank.storage.audit import audit
from powerbank.storage.models import Rental, RentalPackage

from powerbank.storage.testing import create_postgres_database, drop_postgres_database, isolated_redis_url

pytestmark = pytest.mark.slow
E2E_REDIS_DB = 14


@pytest.fixture(params=["embedded", pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
async def backend(request, tmp_path, monkeypatch):
    monkeypatch.setenv("POWERBANK_OTP_ECHO", "1")
    monkeypatch.setenv("OTP_RATE_PER_IP", "1000")
    database_name = None
    if request.param == "embedded":
        database_url, redis_url = f"sqlite+aiosqlite:///{tmp_path / 'e2e.sqlite3'}", None
    else:
        database_name, database_url = await create_postgres_database()
        redis_url = isolated_redis_url(E2E_REDIS_DB)
    settings = dataclasses.replace(
        load_settings(),
        database_url=database_url,
        redis_url=redis_url,
        mqtt_url=None,
        data_dir=tmp_path,
        http_port=free_port(),
        mqtt_port=free_port(),
        eject_timeout_ms=5000,
    )
    backend = await start_backend(settings, ALL_ROLES, migrate_first=True)
    try:
        yield backend
    finally:
        await backend.stop()
        if database_name:
            await drop_postgres_database(database_name)


async def _fleet(backend, n_stations: int, slots: int, banks: int) -> Fleet:
    specs = await provision_fleet(backend.services.sessions, n_stations, slots, banks, serial_prefix=f"E2E{uuid.uuid4().hex[:4]}", settings=backend.settings)
    fleet = Fleet(specs, f"mqtt://127.0.0.1:{backend.settings.mqtt_port}", heartbeat_interval_s=5)
    await fleet.start()
    await fleet.wait_acked()
    return fleet


async def _package_id(backend) -> str:
    async with backend.services.sessions() as session:
        return str((await session.execute(select(RentalPackage.id).where(RentalPackage.code == "hour-1"))).scalar_one())


async def _funded_rider(backend, admin: Admin, phone: str, amount_minor: int = 100_000) -> Rider:
    rider = Rider(backend.base_url, phone)
    await rider.sign_in()
    await admin.credit(rider.user_id, amount_minor)
    return rider


def _statuses_seen(rider: Rider, rental_id: str) -> list[str]:
    return [
        event["rental"]["status"]
        for event in rider.events
        if isinstance(event.get("rental"), dict) and event["rental"].get("id") == rental_id
    ]


async def _wait_until(predicate, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.05)


async def test_rent_eject_return_elsewhere_and_charge(backend):
    if backend.broker_handle is not None and backend.services.runtime.single_writer:
        # Logins wait while the one writer is behind (embedded.Admission).
        assert backend.broker_handle.authority.admission.mailbox_backlog == backend.services.runtime.backlog
    fleet = await _fleet(backend, n_stations=2, slots=4, banks=2)
    admin = Admin(backend.base_url, await _admin_token(backend))
    rider = await _funded_rider(backend, admin, "+9779811100001")
    try:
        await rider.open_websocket()
        wallet_before = await rider.wallet()
        home, away = list(fleet)
        status, body, _ = await rider.rent(home.serial, await _package_id(backend))
        assert status == 201, body
        rental_id = body["id"]
        bank_serial = body["power_bank_serial"] if "power_bank_serial" in body else None
        await _wait_until(lambda: "active" in _statuses_seen(rider, rental_id))
        handed_out = home.handed_out[-1]
        assert bank_serial in (None, handed_out)
        assert handed_out not in home.bank_serials_in_slots

        await away.insert_bank(handed_out)
        await _wait_until(lambda: "completed" in _statuses_seen(rider, rental_id))
        charged = await rider.wait_for_rental(rental_id, {"completed"}, timeout_s=10)
        await _wait_until(lambda: any(e.get("event") == "charged" for e in rider.events))
        rental = await rider.rental(rental_id)
        wallet_after = await rider.wallet()

        assert charged is not None
        assert rental["status"] == "completed"
        assert rental["fee_minor"] > 0 and rental["charged_minor"] == rental["fee_minor"]
        assert wallet_before["balance_minor"] - wallet_after["balance_minor"] == rental["fee_minor"]
        assert wallet_after["held_minor"] == 0
        seen = _statuses_seen(rider, rental_id)
        assert seen.index("active") < seen.index("completed")
        assert handed_out in away.bank_serials_in_slots
        assert await audit(backend.services.sessions) == {}
    finally:
        await rider.close()
        await admin.close()
        await fleet.stop()


async def test_twenty_riders_three_banks_exactly_three_rentals(backend):
    fleet = await _fleet(backend, n_stations=1, slots=6, banks=3)
    admin = Admin(backend.base_url, await _admin_token(backend))
    riders = [await _funded_rider(backend, admin, f"+97798222{i:05d}") for i in range(20)]
    station = next(iter(fleet))
    package_id = await _package_id(backend)
    try:
        results = await asyncio.gather(*(rider.rent(station.serial, package_id) for rider in riders))
        statuses = sorted(status for status, _, _ in results)
        refusals = [body for status, body, _ in results if status == 409]
        assert statuses.count(201) == 3, results
        assert statuses.count(409) == 17, results
        assert {body["error"] for body in refusals} == {"no_bank_available"}
        assert all(body.get("detail") for body in refusals)
        async with backend.services.sessions() as session:
            active = (await session.execute(select(Rental.power_bank_id).where(Rental.status == "active"))).scalars().all()
            cancelled = await session.scalar(select(func.count()).select_from(Rental).where(Rental.status == "cancelled"))
        assert len(active) == len(set(active)) == 3
        assert cancelled == 17
        assert len(station.handed_out) == 3 and station.bank_serials_in_slots == []
        # Refused riders got their holds back: nothing is held for a cancelled rental.
        wallets = [await rider.wallet() for rider in riders]
        assert sorted(w["held_minor"] > 0 for w in wallets) == [False] * 17 + [True] * 3
        assert await audit(backend.services.sessions) == {}
    finally:
        await asyncio.gather(*(rider.close() for rider in riders))
        await admin.close()
        await fleet.stop()


async def _admin_token(backend) -> str:
    from powerbank.http.auth import ensure_admin_token

    return await ensure_admin_token(backend.services, phone=f"+97798000{os.getpid() % 100000:05d}")

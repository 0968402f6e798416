"""The rider simulator against a real server (uvicorn on a free port). A fake starter plays the
Rental actor and the station side, so the crowd's bookkeeping can be checked exactly: what it
counts must match what the server did."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import pytest
from sqlalchemy import select

import powerbank.actors.wallet  # noqa: F401  (OpenWallet, CreditWallet for the admin top-up)
from powerbank.http.app import create_app
from powerbank.http.auth import AuthPolicy, ensure_admin_token
from powerbank.http.testing import running_services, serve, settings_for_tests
from powerbank.http.websocket import user_channel
from powerbank.simulators.riders import (
    Admin,
    Rider,
    RiderCrowd,
    RiderError,
    RiderStats,
    merge_rental,
    ws_url_for,
)
from powerbank.storage.models import PowerBank, Rental, RentalPackage, Station, StationSlot
from powerbank.storage.types import utcnow

POLICY = AuthPolicy(otp_echo=True, otp_rate_per_ip=100_000)


class FakeRentals:
    """Every third start is refused (no_bank_available), every other one answers 202 and goes
    active a moment later on the websocket; returns complete the rental and say so."""

    def __init__(self, services) -> None:
        self.services = services
        self.counter = itertools.count(1)
        self.refused = 0
        self.returned: list[tuple[str, str]] = []
        self.jammed_once = False

    async def start_rental(self, runtime, *, rental_id, user_id, station_id, package_id, timeout_s):
        n = next(self.counter)
        async with self.services.sessions.begin() as session:
            if n % 3 == 0:
                self.refused += 1
                rental = self._rental(rental_id, user_id, station_id, package_id, "cancelled")
                rental.cancel_reason = "no_bank_available"
                session.add(rental)
                return {"id": str(rental_id), "status": "cancelled", "cancel_reason": "no_bank_available"}
            bank = PowerBank(serial=f"BANK-{n}", currency="NPR", status="rented")
            session.add(bank)
            await session.flush()
            status = "ejecting" if n % 2 == 0 else "active"
            rental = self._rental(rental_id, user_id, station_id, package_id, status)
            rental.power_bank_id, rental.slot_number = bank.id, 1
            session.add(rental)
        if status == "ejecting":
            asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(self._set(rental_id, "active")))
        return {"id": str(rental_id), "status": status, "cancel_reason": None}

    @staticmethod
    def _rental(rental_id, user_id, station_id, package_id, status) -> Rental:
        return Rental(id=rental_id, user_id=user_id, station_id=station_id, package_id=package_id, currency="NPR", status=status)

    async def _set(self, rental_id, status: str) -> None:
        async with self.services.sessions.begin() as session:
            rental = await session.get(Rental, rental_id)
            rental.status = status
            if status == "completed":
                rental.returned_at = utcnow()
            user_id = rental.user_id
        # The shape the Rental actor publishes (ids, not serials).
        event = {"type": "rental.updated", "rental": {"id": str(rental_id), "status": status, "user_id": str(user_id)}}
        await self.services.bus.publish(user_channel(user_id), event)

    async def return_bank(self, bank_serial: str, station_sn: str) -> None:
        if not self.jammed_once:  # the first slot a rider tries is jammed: they go elsewhere
            self.jammed_once = True
            raise RuntimeError(f"slot jammed at {station_sn}")
        self.returned.append((bank_serial, station_sn))
        async with self.services.sessions() as session:
            rental_id = (
                await session.execute(
                    select(Rental.id).join(PowerBank, PowerBank.id == Rental.power_bank_id).where(PowerBank.serial == bank_serial)
                )
            ).scalar_one()
        await self._set(rental_id, "completed")


@pytest.fixture
async def services(tmp_path):
    async with running_services(settings_for_tests(tmp_path)) as services:
        async with services.sessions.begin() as session:
            session.add(RentalPackage(code="1H", name="One hour", duration_minutes=60, price_minor=5000, currency="NPR", max_duration_minutes=600))
            for serial in ("SN-1", "SN-2"):
                station = Station(serial=serial, name=serial, latitude=27.7, longitude=85.3, status="online", slot_count=2)
                session.add(station)
                await session.flush()
                bank = PowerBank(serial=f"{serial}-B", currency="NPR", station_id=station.id)
                session.add(bank)
                await session.flush()
                session.add(StationSlot(station_id=station.id, slot_number=1, status="occupied", power_bank_id=bank.id))
                session.add(StationSlot(station_id=station.id, slot_number=2, status="empty"))
        yield services


@pytest.fixture
async def fake(services):
    return FakeRentals(services)


@pytest.fixture
async def base_url(services, fake):
    async with serve(create_app(services, auth_policy=POLICY, start_rental=fake.start_rental)) as url:
        yield url


async def test_crowd_rents_returns_and_counts_what_happened(base_url, services, fake):
    admin_token = await ensure_admin_token(services, "+9779800000000")
    crowd = RiderCrowd(
        base_url, 4, return_bank=fake.return_bank, admin_token=admin_token,
        hold_s=(0.05, 0.2), think_s=(0.05, 0.1), top_up_minor=20_000, seed=7,
    )
    await crowd.start()
    for _ in range(200):  # until enough rentals went through (or 10 s)
        if crowd.stats.started >= 4 and fake.refused >= 1:
            break
        await asyncio.sleep(0.05)
    await crowd.finish(timeout_s=20)
    try:
        stats = crowd.stats
        assert stats.signed_in == 4
        assert stats.errors == {}, stats.errors
        assert stats.started >= 4
        assert stats.completed == stats.started == len(fake.returned)
        assert stats.refusals == {"no_bank_available": fake.refused} and fake.refused >= 1
        assert stats.attempts == stats.started + fake.refused == len(stats.start_latencies_ms)
        assert all(sn in ("SN-1", "SN-2") for _, sn in fake.returned) and fake.jammed_once
        # Each rider's wallet got the admin top-up once.
        for rider in crowd.riders:
            assert (await rider.wallet())["balance_minor"] == 20_000
            history = await rider.history()
            assert {r["status"] for r in history["items"]} <= {"completed", "cancelled"}
    finally:
        await crowd.stop()


async def test_rider_signs_in_again_with_login_and_sees_events(base_url, services):
    first = Rider(base_url, "+9779815000001")
    user_id = await first.sign_in()
    await first.close()
    again = Rider(base_url, "+9779815000001")
    try:
        assert await again.sign_in() == user_id  # the phone exists: it logged in
        await again.open_websocket()
        rental_id = str(uuid.uuid4())
        await services.bus.publish(user_channel(user_id), {"type": "rental.updated", "rental": {"id": rental_id, "status": "active"}})
        seen = await again.wait_for_rental(rental_id, {"active"}, timeout_s=5)
        assert seen is not None and seen["status"] == "active"
        assert await again.wait_for_rental(rental_id, {"completed"}, timeout_s=0.3) is None
    finally:
        await again.close()


async def test_admin_credit_and_echo_requirement(base_url, services):
    rider = Rider(base_url, "+9779815000002")
    admin = Admin(base_url, await ensure_admin_token(services, "+9779800000000"))
    try:
        user_id = await rider.sign_in()
        result = await admin.credit(user_id, 1234)
        assert result["wallet"]["balance_minor"] == 1234
        assert (await rider.wallet())["balance_minor"] == 1234
        with pytest.raises(RiderError):
            await admin.credit(user_id, 0)
    finally:
        await rider.close()
        await admin.close()


async def test_rider_explains_a_server_without_otp_echo(services):
    async with serve(create_app(services, auth_policy=AuthPolicy())) as url:
        rider = Rider(url, "+9779815000003")
        try:
            with pytest.raises(RiderError, match="POWERBANK_OTP_ECHO"):
                await rider.sign_in()
        finally:
            await rider.close()


def test_final_status_is_never_replaced_by_a_late_open_one():
    done = merge_rental(None, {"id": "r", "status": "completed", "power_bank_serial": "B1"})
    assert merge_rental(done, {"id": "r", "status": "active"})["status"] == "completed"
    active = merge_rental({"id": "r", "status": "ejecting", "power_bank_serial": "B1"}, {"id": "r", "status": "active"})
    assert active == {"id": "r", "status": "active", "power_bank_serial": "B1"}


def test_helpers():
    assert ws_url_for("http://127.0.0.1:8000/") == "ws://127.0.0.1:8000/api/ws"
    assert ws_url_for("https://pb.example") == "wss://pb.example/api/ws"
    stats = RiderStats(start_latencies_ms=[float(v) for v in range(1, 101)])
    summary = stats.summary()
    assert summary["start_latency_p50_ms"] in (50.0, 51.0) and summary["start_latency_p99_ms"] == 99.0

"""Helpers to run the HTTP app in tests and tools: services on a throwaway database with
mailboxes drained on the running loop, and a real uvicorn server on a free port (for websocket
clients and the rider simulator, which speak real HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn

from powerbank.config import Settings
from powerbank.actors.dispatch import LoopDispatcher
from powerbank.http.auth import AuthPolicy
from powerbank.services import Services, build_services
from powerbank.storage.models import Base


def settings_for_tests(data_dir: Path, database_url: str | None = None, **overrides) -> Settings:
    settings = Settings(
        database_url=database_url or f"sqlite+aiosqlite:///{data_dir / 'test.sqlite3'}",
        redis_url=None,
        mqtt_url=None,
        jwt_secret=secrets.token_urlsafe(32),
        data_dir=data_dir,
    )
    return Settings(**{**settings.__dict__, **overrides})


# OTP codes come back in the response and one IP may ask often: every test signs people up.
TEST_AUTH_POLICY = AuthPolicy(otp_echo=True, otp_rate_per_ip=1000)


def client_for(app) -> httpx.AsyncClient:
    """An HTTP client talking to `app` in process (no server, no port)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sign_up_body(client: httpx.AsyncClient, phone: str, **extra) -> dict:
    """Register `phone` through the API (needs `otp_echo`); the whole register response body
    (tokens, user). `sign_up` below gives just the header and the id."""
    code = (await client.post("/api/auth/get-otp", json={"phone": phone, "purpose": "register"})).json()["debug_code"]
    response = await client.post("/api/auth/register", json={"phone": phone, "code": code, **extra})
    assert response.status_code == 201, response.text
    return response.json()


@contextlib.asynccontextmanager
async def running_services(settings: Settings) -> AsyncIterator[Services]:
    """Services on `settings.database_url` with every table created; mailboxes drain on this loop."""
    dispatcher = LoopDispatcher()
    services = build_services(settings, dispatcher=dispatcher)
    dispatcher.runtime = services.runtime
    async with services.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    try:
        yield services
    finally:
        await dispatcher.settle()
        await services.close()


class _QuietServer(uvicorn.Server):
    """Leaves signal handling to the test runner."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@contextlib.asynccontextmanager
async def serve(app, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve `app` with uvicorn on a free port of this loop; yields the base URL."""
    sock = socket.socket()
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="websockets-sansio")
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


# --- helpers for the app-endpoint tests (tests/test_http_*.py) ---------------------------------


async def sign_up(client, phone: str) -> tuple[dict[str, str], "uuid.UUID"]:
    """Register a person through the real OTP flow (the app must echo codes); returns their
    Authorization header and id."""
    code = (await client.post("/api/auth/get-otp", json={"phone": phone, "purpose": "register"})).json()["debug_code"]
    response = await client.post("/api/auth/register", json={"phone": phone, "code": code})
    assert response.status_code == 201, response.text
    body = response.json()
    return bearer(body["access_token"]), uuid.UUID(body["user"]["id"])


async def credit_wallet(services: Services, user_id: "uuid.UUID", amount_minor: int, currency: str = "NPR") -> None:
    transfer_id = str(uuid.uuid4())
    payload = {"amount_minor": amount_minor, "currency": currency, "transfer_id": transfer_id, "reason": "test"}
    result = await services.runtime.call("wallet", str(user_id), "CreditWallet", payload, f"credit:{transfer_id}")
    assert result["ok"], result


async def insert_rental(services: Services, user_id: "uuid.UUID", *, status: str = "active", serial: str | None = None, **columns):
    """A rental row in `status` at a new (or the named) station on the `hour-1` package, as if
    the Rental actor had got it there. Returns the rental."""
    from datetime import timedelta

    from sqlalchemy import select

    from powerbank.storage.models import Rental, RentalPackage, Station
    from powerbank.storage.types import utcnow

    async with services.sessions.begin() as session:
        station = None
        if serial is not None:
            station = (await session.execute(select(Station).where(Station.serial == serial))).scalar_one_or_none()
        if station is None:
            station = Station(serial=serial or f"SN-{uuid.uuid4().hex[:8]}", name="test", latitude=27.7, longitude=85.3, slot_count=4, status="online")
            session.add(station)
            await session.flush()
        package = (await session.execute(select(RentalPackage).where(RentalPackage.code == "hour-1"))).scalar_one()
        now = utcnow()
        defaults = dict(currency=package.currency, hold_minor=package.price_minor)
        if status in ("active", "overdue", "completed", "lost"):
            defaults.update(started_at=now - timedelta(minutes=10), due_at=now + timedelta(minutes=package.duration_minutes - 10))
        if status == "completed":
            defaults.update(returned_at=now, fee_minor=package.price_minor, charged_minor=package.price_minor)
        rental = Rental(user_id=user_id, station_id=station.id, package_id=package.id, status=status, **{**defaults, **columns})
        session.add(rental)
    return rental

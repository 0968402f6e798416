"""Helpers to run the HTTP app in tests and tools: services on a throwaway database with
mailboxes drained on the running loop, and a real uvicorn server on a free port (for websocket
clients and the rider simulator, which speak real HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
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


async def sign_up(client: httpx.AsyncClient, phone: str, **extra) -> dict:
    """Register `phone` through the API (needs `otp_echo`); the register response body."""
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

"""Deployments a load test drives: started for the run, or already running.

`embedded` is the default installation (`powerbank serve` on a fresh SQLite file, the
in-process queue, the embedded MQTT broker) in its own process, so the load generator does not
share the backend's event loop. `procfile` is the scale-out shape: a fresh PostgreSQL database,
a Redis database of its own, and the Procfile's process types as separate processes (`--workers`
worker processes). `external` is a deployment somebody else runs: its base URL, and its
DATABASE_URL and MQTT_URL in this process's environment, for provisioning stations and the audit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from powerbank.demo import free_port
from powerbank.simulators.bench import ProcessPool

KINDS = ("embedded", "procfile", "external")
READY_TIMEOUT_S = 120.0
LOADTEST_REDIS_DB = 12


@dataclass
class DeploymentOptions:
    kind: str = "embedded"
    workers: int = 2
    web: int = 1
    base_url: str | None = None  # external only
    redis_db: int = LOADTEST_REDIS_DB
    keep: bool = False  # leave the database and logs behind, to look into a failed audit
    # Extra environment for the started processes (tests use it to inject faults in children).
    extra_env: dict[str, str] = field(default_factory=dict)


class DeploymentFailed(RuntimeError):
    """A process of the deployment died or never became ready; the message holds its log."""


class Deployment:
    """A running backend: where its HTTP API and MQTT broker are, and the environment that
    points this process's own settings (provisioning, audit) at its database."""

    def __init__(self, options: DeploymentOptions) -> None:
        if options.kind not in KINDS:
            raise ValueError(f"deployment must be one of {KINDS}")
        self.options = options
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"pb-load-{options.kind}-"))
        self.pool = ProcessPool(self.work_dir)
        self.env: dict[str, str] = {}
        self.base_url = ""
        self.mqtt_url = ""
        self._database_name: str | None = None
        self._secrets: dict[str, str] = {}

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by each process of the deployment (the ones it started)."""
        from powerbank.simulators.bench import process_cpu_s

        used = {child.name: process_cpu_s(child.process.pid) for child in self.pool.children}
        return {name: round(seconds, 1) for name, seconds in used.items() if seconds is not None}

    async def start(self) -> None:
        starters = {"embedded": self._start_embedded, "procfile": self._start_procfile, "external": self._attach}
        try:
            await starters[self.options.kind]()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self.pool.astop()
        if self.options.keep:
            return
        if self._database_name is not None:
            from powerbank.storage.testing import drop_postgres_database

            await drop_postgres_database(self._database_name)
            self._database_name = None
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def check_alive(self) -> None:
        dead = self.pool.dead()
        if dead:
            child = dead[0]
            raise DeploymentFailed(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")

    # --- the kinds ----------------------------------------------------------------------------

    def _secret(self, name: str) -> str:
        import secrets

        return self._secrets.setdefault(name, secrets.token_urlsafe(32))

    def _base_env(self, database_url: str, port: int, mqtt_port: int) -> dict[str, str]:
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "PORT": str(port),
            "MQTT_PORT": str(mqtt_port),
            "POWERBANK_DATA_DIR": str(self.work_dir),
            "POWERBANK_OTP_ECHO": "1",  # simulated riders read their login code from the response
            "OTP_RATE_PER_IP": "1000000",
            # Given, not left to each process: processes starting together on a fresh data dir
            # would each write their own.
            "JWT_SECRET": self._secret("jwt"),
            "MQTT_BRIDGE_PASSWORD": self._secret("bridge"),
            **self.options.extra_env,
        }
        for name in ("REDIS_URL", "MQTT_URL"):
            env.pop(name, None)
        return env

    async def _start_embedded(self) -> None:
        port, mqtt_port = free_port(), free_port()
        self.env = self._base_env(f"sqlite+aiosqlite:///{self.work_dir / 'powerbank.sqlite3'}", port, mqtt_port)
        self.base_url, self.mqtt_url = f"http://127.0.0.1:{port}", f"mqtt://127.0.0.1:{mqtt_port}"
        self.pool.start("serve", _powerbank_argv("serve"), self.env)
        await self._wait_ready()

    async def _start_procfile(self) -> None:
        from powerbank.storage.testing import create_postgres_database, isolated_redis_url

        self._database_name, database_url = await create_postgres_database("pb_load")
        port, mqtt_port = free_port(), free_port()
        self.env = {**self._base_env(database_url, port, mqtt_port), "REDIS_URL": isolated_redis_url(self.options.redis_db)}
        self.base_url, self.mqtt_url = f"http://127.0.0.1:{port}", f"mqtt://127.0.0.1:{mqtt_port}"
        migrate = await asyncio.create_subprocess_exec(*_powerbank_argv("migrate"), env=self.env)
        if await migrate.wait() != 0:
            raise DeploymentFailed("powerbank migrate failed")
        for index in range(self.options.web):
            self.pool.start(f"web-{index + 1}", _powerbank_argv("web"), self.env)
        for index in range(self.options.workers):
            self.pool.start(f"worker-{index + 1}", _powerbank_argv("worker"), self.env)
        self.pool.start("mqtt", _powerbank_argv("mqtt"), self.env)
        self.pool.start("scheduler", _powerbank_argv("scheduler"), self.env)
        await self._wait_ready()

    async def _attach(self) -> None:
        if not self.options.base_url or not os.environ.get("DATABASE_URL"):
            raise DeploymentFailed("an external deployment needs --base-url and DATABASE_URL (and MQTT_URL unless local)")
        self.env = dict(os.environ)
        self.base_url = self.options.base_url.rstrip("/")
        self.mqtt_url = os.environ.get("MQTT_URL") or f"mqtt://127.0.0.1:{os.environ.get('MQTT_PORT', '1883')}"
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        """Until the API answers its health check and the MQTT port takes connections."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                self.check_alive()
                if await _healthy(client, self.base_url) and await _port_open(self.mqtt_url):
                    return
                if time.monotonic() > deadline:
                    raise DeploymentFailed(f"not ready after {READY_TIMEOUT_S:g} s: {self.base_url}, {self.mqtt_url}")
                await asyncio.sleep(0.3)


def _powerbank_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "powerbank.cli", *args]


async def _healthy(client: httpx.AsyncClient, base_url: str) -> bool:
    try:
        response = await client.get(f"{base_url}/api/app/health")
    except httpx.HTTPError:
        return False
    return response.status_code == 200


async def _port_open(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 1883), 2.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True

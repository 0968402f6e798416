"""The Procfile's shape: web, worker, mqtt and scheduler as separate processes on PostgreSQL and
Redis, driven by `powerbank simulate`; every rental the riders started completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from powerbank.demo import free_port
from powerbank.storage.testing import create_postgres_database, drop_postgres_database, isolated_redis_url

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]
ROOT = Path(__file__).resolve().parents[1]
PROCFILE_REDIS_DB = 13


def _procfile_roles() -> list[str]:
    roles = []
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line and not line.startswith("#") and not line.startswith("release:"):
            roles.append(line.split(":", 1)[0])
    return roles


def _powerbank(*args: str, env: dict[str, str], log: Path | None = None, **kwargs):
    command = [sys.executable, "-m", "powerbank.cli", *args]
    if log is None:
        return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, **kwargs)
    with log.open("w") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)


async def test_procfile_processes_serve_a_simulated_fleet(tmp_path):
    database_name, database_url = await create_postgres_database()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": isolated_redis_url(PROCFILE_REDIS_DB),
        "MQTT_PORT": str(free_port()),
        "PORT": str(free_port()),
        "POWERBANK_DATA_DIR": str(tmp_path),
        "POWERBANK_OTP_ECHO": "1",
        "OTP_RATE_PER_IP": "10000",
    }
    processes = []
    try:
        assert _powerbank("migrate", env=env, timeout=120).returncode == 0
        assert _procfile_roles() == ["web", "worker", "mqtt", "scheduler"]
        processes = [_powerbank(role, env=env, log=tmp_path / f"{role}.log") for role in _procfile_roles()]
        time.sleep(3)
        assert [p.poll() for p in processes] == [None] * 4, "a process exited early"
        simulated = _powerbank(
            "simulate", "--base-url", f"http://127.0.0.1:{env['PORT']}", "--stations", "4", "--slots", "6",
            "--riders", "8", "--duration", "15", env=env, timeout=180,
        )
        assert simulated.returncode == 0, simulated.stderr[-2000:]
        summary = json.loads(simulated.stdout.strip().splitlines()[-1])
        assert summary["started"] > 0
        assert summary["completed"] == summary["started"]
        assert summary["errors"] == {}
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        await drop_postgres_database(database_name)

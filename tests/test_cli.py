"""The `powerbank` command as an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from openapi_spec_validator import validate

ROOT = Path(__file__).resolve().parents[1]


def test_openapi_prints_a_valid_openapi_3_document():
    out = subprocess.run([sys.executable, "-m", "powerbank.cli", "openapi"], cwd=ROOT, capture_output=True, text=True, check=True)
    document = json.loads(out.stdout)
    validate(document)
    assert document["openapi"].startswith("3.")
    for path in ("/api/auth/me", "/api/app/stations", "/api/app/stations/{sn}", "/api/user/wallet", "/api/rentals/start", "/api/rentals/active", "/api/rentals/history"):
        assert path in document["paths"], path


def test_migrate_upgrades_and_seeds_an_empty_database(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.sqlite3'}", "POWERBANK_DATA_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "powerbank.cli", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True)
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(tmp_path / "fresh.sqlite3")) as db:
        packages = db.execute("select code from rental_packages order by sort_order").fetchall()
        version = db.execute("select version_num from alembic_version").fetchone()
    assert packages == [("hour-1",), ("day-1",)]
    assert version == (_head_revision(),)


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    from powerbank.storage.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_station_credentials_replaces_a_password_and_prints_it_once(tmp_path):
    import asyncio

    from powerbank.broker.embedded import verify_password
    from powerbank.simulators.stations import provision_fleet
    from powerbank.storage.db import create_engine, session_factory

    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}", "POWERBANK_DATA_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "powerbank.cli", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True)

    async def provision_and_read(password: str | None = None):
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'cli.sqlite3'}")
        try:
            sessions = session_factory(engine)
            if password is None:
                return (await provision_fleet(sessions, 1, 2, 1, serial_prefix="CLI"))[0].password
            from sqlalchemy import select

            from powerbank.storage.models import Station

            async with sessions() as session:
                return (await session.execute(select(Station.mqtt_password_hash))).scalar_one()
        finally:
            await engine.dispose()

    old_password = asyncio.run(provision_and_read())
    out = subprocess.run([sys.executable, "-m", "powerbank.cli", "station-credentials", "CLI-0001"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    login = json.loads(out.stdout)
    stored = asyncio.run(provision_and_read("read"))
    assert login["username"] == login["serial"] == "CLI-0001"
    assert verify_password(stored, login["password"]) and not verify_password(stored, old_password)
    unknown = subprocess.run([sys.executable, "-m", "powerbank.cli", "station-credentials", "NOPE"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert unknown.returncode == 1 and "NOPE" in unknown.stderr and unknown.stdout == ""


def test_processes_starting_together_on_a_fresh_data_dir_share_one_secret(tmp_path):
    """The Procfile's processes each load settings at once; they must agree on the JWT secret."""
    from concurrent.futures import ThreadPoolExecutor

    from powerbank.config import _dev_secret

    for round_ in range(20):  # the race needs the threads to overlap: give it many chances
        data_dir = tmp_path / str(round_)
        with ThreadPoolExecutor(16) as pool:
            secrets_seen = set(pool.map(lambda _: _dev_secret(data_dir, "jwt_secret"), range(32)))
        assert secrets_seen == {(data_dir / ".jwt_secret").read_text()}

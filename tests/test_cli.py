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
    assert version == ("0001",)

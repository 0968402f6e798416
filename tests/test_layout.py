"""The repository is one import package and never shadows the standard library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARD_LAYOUT = ["actors", "http", "broker", "storage", "simulators", "migrations", "tests", "pyproject.toml", "Procfile"]


def test_card_layout_at_the_repository_root():
    missing = [name for name in CARD_LAYOUT if not (ROOT / name).exists()]
    assert missing == []


def test_http_folder_is_never_a_regular_package():
    assert not (ROOT / "http" / "__init__.py").exists()


def test_stdlib_http_wins_from_the_repository_root():
    code = "import http, http.client, json; print(json.dumps([http.__file__, http.client.__name__]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    http_file, client_name = json.loads(out.stdout)
    assert Path(http_file).parent.parent == Path(json.__file__).parent.parent
    assert client_name == "http.client"


def test_subpackages_import_under_powerbank():
    code = (
        "import powerbank.actors.runtime, powerbank.storage.models, powerbank.broker.protocol, "
        "powerbank.http.app, powerbank.simulators.stations; import http.client; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_every_cli_command_explains_itself():
    commands = ["demo", "serve", "web", "worker", "mqtt", "scheduler", "migrate", "openapi", "simulate", "bench",
                "station-credentials", "stripe-emulator"]
    for command in commands:
        out = subprocess.run([sys.executable, "-m", "powerbank.cli", command, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, (command, out.stderr)
        assert "usage: powerbank " + command in out.stdout

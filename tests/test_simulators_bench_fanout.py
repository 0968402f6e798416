"""`powerbank bench fanout`: a small real run (two web processes, a worker, PostgreSQL, Redis)
delivers every change to every client. Figures are printed, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from powerbank.simulators.bench_fanout import parse_options

ROOT = Path(__file__).resolve().parents[1]
SMOKE_REDIS_DB = 12


def test_options_default_to_the_issues_shape():
    options = parse_options([])
    assert (options.clients, options.web_processes) == (1000, 2)
    assert parse_options(["--clients", "5", "--changes", "2", "--web", "3"]).web_processes == 3


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_a_small_run_delivers_every_change_to_every_client():
    command = [sys.executable, "-m", "powerbank.cli", "bench", "fanout", "--clients", "40", "--changes", "3",
               "--redis-db", str(SMOKE_REDIS_DB)]
    out = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["deliveries"], summary["deliveries_missing"]) == (40 * 3, 0)
    assert summary["web_processes"] == 2
    assert 0 < summary["single_client_p50_ms"] and 0 < summary["fanout_p50_ms"] <= summary["fanout_p99_ms"]
    assert summary["fanout_deliveries_per_s"] > 0 and summary["redis_publish_per_s"] > 0
    assert summary["fanout_deliveries_vs_redis_publish"] == pytest.approx(
        summary["fanout_deliveries_per_s"] / summary["redis_publish_per_s"], abs=2e-3)

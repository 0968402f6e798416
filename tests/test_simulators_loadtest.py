"""`powerbank loadtest`: the report's pieces, the observation audit on a real run (each check
shown to catch what it claims by changing the database afterwards), the CI smoke load in the
Procfile's multi-process shape with faults on, and the same load failing on an injected bug."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update

from powerbank.demo import FaultOptions
from powerbank.simulators.deployment import DeploymentOptions
from powerbank.simulators.load_report import markdown, per_second
from powerbank.simulators.loadtest import LoadtestOptions, Sample, fault_summary, ramp_summary, run_loadtest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {"rentals_per_s", "start_latency_p50_ms", "start_latency_p99_ms", "events_per_s", "stations_online",
                 "invariant_violations", "violations_by_kind"}
SMOKE_FAULTS = ["--drop", "0.05", "--duplicate", "0.05", "--reorder", "0.05", "--storm-every", "15",
                "--power-cut-every", "10", "--clock-skew-ms", "2000"]


def test_rates_come_from_consecutive_samples():
    rows = [{"t_s": 1.0, "completed": 0}, {"t_s": 2.0, "completed": 5}, {"t_s": 4.0, "completed": 9}]
    assert per_second(rows, "completed") == ([2.0, 4.0], [5.0, 2.0])


def test_a_storm_fraction_is_a_fault_only_with_storms():
    assert fault_summary(FaultOptions(drop_rate=0.05)) == {"drop_rate": 0.05}
    assert fault_summary(FaultOptions(storm_every_s=5.0)) == {"storm_every_s": 5.0, "storm_fraction": 0.2}


def test_the_report_lists_every_violation_kind_and_plot():
    text = markdown({"rentals_per_s": 1.5, "invariant_violations": 2}, {"ledger": ["a", "b"]})
    assert "**ledger**: 2" in text and "  - a" in text
    assert "rentals_per_s.png" in text and "event_lag.png" in text
    assert "0 violations" in markdown({"invariant_violations": 0}, {})


def test_the_ramp_headline_is_the_best_step_within_the_target_with_a_clean_audit():
    def step(riders, per_s, p99, violations=0):
        return {"riders": riders, "rentals_per_s": per_s, "start_latency_p50_ms": p99 / 2, "start_latency_p99_ms": p99,
                "events_per_s": 1.0, "mailbox_depth_max": 0, "invariant_violations": violations, "cpu_share_by_process": {}}

    summary = ramp_summary([step(5, 2.0, 120), step(10, 4.0, 180), step(20, 6.0, 150, violations=1), step(40, 7.0, 900)], 200)
    assert (summary["headline_rentals_per_s"], summary["headline_riders"]) == (4.0, 10)
    assert summary["invariant_violations"] == 1 and len(summary["steps"]) == 4
    assert ramp_summary([step(5, 2.0, 300)], 200)["headline_rentals_per_s"] == 0.0


def test_a_sample_is_plain_data_for_the_timeline():
    sample = Sample(1.0, 2, 1, 10.0, 20.0, {"rental": 3}, 0.5, 4, 4, 5.0, 9.0)
    assert json.loads(json.dumps(dataclasses.asdict(sample)))["mailboxes"] == {"rental": 3}


# --- a real run on the embedded default -------------------------------------------------------


@pytest.mark.slow
async def test_an_embedded_run_passes_its_audit_and_each_check_catches_its_violation(tmp_path):
    options = LoadtestOptions(stations=6, slots=6, riders=8, duration_s=12, progress=False, report_dir=tmp_path / "report",
                              deployment=DeploymentOptions(kind="embedded", keep=True), hold_s=(0.2, 0.5), think_s=(0.05, 0.2))
    summary, observed, sessions, close = await _run_and_keep(options)
    try:
        assert REQUIRED_KEYS <= set(summary)
        assert summary["invariant_violations"] == 0, summary["violation_examples"]
        assert summary["rentals_completed"] > 5 and summary["rentals_per_s"] > 0
        assert summary["stations_online"] == 6
        for name in ("report.md", "rentals_per_s.png", "start_latency.png", "mailboxes.png", "stations_online.png", "event_lag.png"):
            assert (tmp_path / "report" / name).stat().st_size > 0
        await _each_check_catches_a_change(sessions, observed)
    finally:
        await close()


async def _run_and_keep(options: LoadtestOptions):
    """Run, then reopen the kept database: (summary, what the riders saw, sessions, close)."""
    import shutil

    from powerbank.storage.db import create_engine, session_factory

    run = await run_loadtest(options)
    engine = create_engine(run.database_url)
    database = Path(run.database_url.split("///", 1)[1])

    async def close():
        await engine.dispose()
        shutil.rmtree(database.parent, ignore_errors=True)

    return run.summary, run.observed, session_factory(engine), close


async def _each_check_catches_a_change(sessions, observed) -> None:
    from powerbank.storage.audit import audit_observations
    from powerbank.storage.models import Rental

    rental_id, _, _ = observed.returns[0]
    async with sessions.begin() as db:
        rental = (await db.execute(select(Rental).where(Rental.id == uuid.UUID(rental_id)))).scalar_one()
        await db.execute(update(Rental).where(Rental.id == rental.id).values(status="active", fee_minor=rental.fee_minor + 1))
        other = (await db.execute(select(Rental).where(Rental.status == "completed", Rental.id != rental.id).limit(1))).scalar_one()
        await db.execute(update(Rental).where(Rental.id == other.id).values(fee_minor=other.fee_minor + 7))
    user_id = next(iter(observed.credited_minor))
    observed.credited_minor[user_id] += 1
    found = await audit_observations(sessions, observed)
    assert set(found) == {"acknowledged_rental_not_final", "return_not_closing_rental", "money_in_not_as_credited",
                          "rental_not_paid_as_billed"}, found
    assert any(str(other.id) in problem for problem in found["rental_not_paid_as_billed"])


# --- the Procfile's shape on PostgreSQL + Redis -----------------------------------------------


def _loadtest(*args: str, tmp_path: Path, env_extra: dict[str, str] | None = None) -> tuple[int, dict]:
    import os

    env = {**os.environ, **(env_extra or {})}
    done = subprocess.run(
        [sys.executable, "-m", "powerbank.cli", "loadtest", "--deployment", "procfile", "--workers", "2", "--no-progress",
         "--report", str(tmp_path / "report"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"no JSON line; stderr:\n{done.stderr[-4000:]}"
    return done.returncode, json.loads(lines[-1])


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_ci_smoke_load_in_the_procfile_shape_with_faults_keeps_every_invariant(tmp_path):
    code, summary = _loadtest("--stations", "200", "--riders", "100", "--duration", "60", *SMOKE_FAULTS, tmp_path=tmp_path)
    print("smoke load:", json.dumps(summary))
    assert REQUIRED_KEYS <= set(summary)
    assert summary["invariant_violations"] == 0, summary["violation_examples"]
    assert code == 0
    assert summary["rentals_completed"] >= 100  # the load happened: riders rented and returned
    assert summary["storms"] >= 1 and summary["power_cuts"] >= 1
    assert (tmp_path / "report" / "report.md").exists()


INJECTED_BUG = textwrap.dedent('''
    """Injected into the worker processes by the test: every third rental charge is not written."""
    import itertools

    from powerbank.storage import ledger

    _real = ledger.resolve_pending
    _charges = itertools.count(1)


    async def resolve_pending(session, pending, *, post_amount_minor):
        if post_amount_minor and pending.kind == "rental_hold" and next(_charges) % 3 == 0:
            return None  # the bug: the hold stays pending and revenue never gets the charge
        return await _real(session, pending, post_amount_minor=post_amount_minor)


    ledger.resolve_pending = resolve_pending
''')


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_the_smoke_load_fails_when_a_ledger_entry_is_skipped(tmp_path):
    (tmp_path / "bug").mkdir()
    (tmp_path / "bug" / "sitecustomize.py").write_text(INJECTED_BUG)
    code, summary = _loadtest("--stations", "40", "--riders", "30", "--duration", "25", tmp_path=tmp_path,
                              env_extra={"PYTHONPATH": str(tmp_path / "bug")})
    assert code == 1
    assert summary["violations_by_kind"].get("rental_not_paid_as_billed", 0) >= 1, summary

"""`powerbank bench stations`: the pure parts fast, and one `--quick` smoke run that checks the
JSON line's shape and that nothing was lost. Speed is never asserted: a benchmark reports
figures, it does not pass or fail on them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from powerbank.broker.testing import broker_reachable
from powerbank.simulators.bench_stations import NO_EVENTS, QUICK, BenchOptions, assemble_summary, parse_options

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_FIGURES = (
    "stations_connected",
    "events_per_s_embedded",
    "events_per_s_mosquitto",
    "embedded_vs_mosquitto",
    "event_lag_p99_ms",
    "rss_kb_per_station",
    "events_lost",
)


def test_quick_is_small_and_explicit_options_win():
    quick = parse_options(["--quick"])
    assert quick.quick and quick.stations == QUICK["stations"] and quick.hold_s < 10
    assert parse_options(["--quick", "--stations", "7"]).stations == 7
    assert parse_options([]) == BenchOptions()
    with pytest.raises(SystemExit):  # traffic stays on this machine
        parse_options(["--mosquitto-url", "mqtt://broker.example.com:1883"])


def events(per_s: float, lag_p99_ms: float, lost: int = 0, at_load: dict | None = None) -> dict:
    figures = {**NO_EVENTS, "events_per_s": per_s, "lost": lost, "published": 100,
               "lag_ms": {"p50": 1.0, "p90": 2.0, "p99": lag_p99_ms, "max": 3.0}}
    return {**figures, "at_load": at_load} if at_load else figures


def test_summary_ratio_lag_at_load_and_lost_events_from_every_burst():
    at_load = {**events(10, 40.0, lost=1), "offered_per_s": 10.0}
    summary = assemble_summary(
        BenchOptions(stations=100), {"stations_connected": 90, "rss_kb_per_station": 50.0},
        events(30, 900.0, at_load=at_load), events(60, 800.0, lost=2, at_load={**events(10, 20.0), "offered_per_s": 10.0}),
        elapsed_s=1.0,
    )
    assert summary["embedded_vs_mosquitto"] == 0.5
    assert (summary["event_lag_p99_ms"], summary["event_lag_p99_ms_mosquitto"]) == (40.0, 20.0)
    assert summary["events_lost"] == 3 and summary["events_published"] == 400
    assert summary["goals"] == {
        "stations_connected >= 10000": False, "embedded_vs_mosquitto >= 0.6": False, "events_lost == 0": False,
    }
    json.dumps(summary, allow_nan=False)


@pytest.mark.slow
def test_quick_run_prints_every_figure_on_one_json_line(tmp_path):
    if not broker_reachable():
        pytest.skip("Mosquitto is not listening on 127.0.0.1:1883")
    out = subprocess.run(
        [sys.executable, "-m", "powerbank.cli", "bench", "stations", "--quick"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for figure in REQUIRED_FIGURES:
        assert isinstance(summary[figure], (int, float)), figure
    assert summary["stations_connected"] == summary["stations_target"] == QUICK["stations"]
    assert summary["events_lost"] == 0 and summary["events_published"] > 0
    assert summary["events_per_s_embedded"] > 0 and summary["events_per_s_mosquitto"] > 0
    assert "powerbank bench stations" in out.stderr  # the human-readable table


def test_a_server_process_collects_young_objects_rarely_and_freezes_what_start_up_made():
    """bench stations at 3,000 stations: a third of the time went to full collections of a heap
    of MQTT sessions until `powerbank serve` (and the bench's backend and fleet) tuned the GC."""
    import gc

    from powerbank.processes import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        assert tune_gc() == before
        assert gc.get_threshold() == GC_THRESHOLDS and GC_THRESHOLDS[0] >= 10_000
        assert gc.get_freeze_count() > 0
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()

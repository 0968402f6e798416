"""`powerbank bench all`: suites substituted by tiny commands (one succeeds with ratios, one
fails, one hangs) to check the report and the merged line in seconds, and one real quick run of
two suites on PostgreSQL + Redis. Speed is never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from powerbank.simulators.bench_all import (
    SUITE_NAMES,
    SUITES,
    Suite,
    last_json_line,
    parse_options,
    ratio_parts,
    run_all,
)

ROOT = Path(__file__).resolve().parents[1]


def _fake(name: str, code: str, **kwargs) -> Suite:
    return Suite(name, ("full",), ("quick", "--report", "{report_dir}"), "a fake reference", timeout_s=30,
                 program=(sys.executable, "-c", code), **kwargs)


GOOD = """
import json, sys
print("progress")
assert sys.argv[1:3] == ["quick", "--report"] and sys.argv[3].endswith("/good"), sys.argv
print(json.dumps({"suite": "good", "fast_requests_per_s": 400.0, "bare_requests_per_s": 8000.0,
                  "fast_vs_bare": 0.05, "hot_per_s": 30.0, "pg_tps": 20.0, "hot_vs_pg": 1.5,
                  "goals": {"hot_vs_pg >= 1.0": True}, "phases": {"deep": [1, 2]}}))
"""
FAILING = "import sys; print('powerbank: error: invalid choice: loadtest', file=sys.stderr); sys.exit(2)"
HANGING = "import time; time.sleep(60)"


def test_options_keep_the_suites_in_their_running_order():
    assert parse_options([]).only == SUITE_NAMES == ("actors", "stations", "http", "fanout", "loadtest")
    options = parse_options(["--quick", "--only", "loadtest,http"])
    assert options.quick and options.only == ("http", "loadtest")
    with pytest.raises(SystemExit):
        parse_options(["--only", "http,nope"])


def test_every_suite_is_a_powerbank_command_with_a_reference_and_a_quick_form():
    commands = {suite.name: suite.args(quick=False, report_dir=Path("/r")) for suite in SUITES}
    assert commands["actors"] == ["bench", "actors"]
    assert commands["loadtest"][:1] == ["loadtest"] and commands["loadtest"][-2:] == ["--report", "/r/loadtest"]
    for flag in ("--stations", "--riders", "--duration"):
        assert flag in commands["loadtest"]
    assert all(suite.reference and suite.quick_args != suite.full_args for suite in SUITES)


def test_the_last_json_object_line_is_the_result():
    assert last_json_line('{"a": 1}\nprogress\n{"b": 2}\n') == {"b": 2}
    assert last_json_line("no json\n[1, 2]\n{broken\n") is None


def test_ratio_parts_from_the_suite_table_or_the_naming_rule():
    actors = next(suite for suite in SUITES if suite.name == "actors")
    assert ratio_parts(actors, "vs_naive_locking", {}) == ("hot_entity_commands_per_s", "naive_locking_commands_per_s")
    http = next(suite for suite in SUITES if suite.name == "http")
    summary = {"wallet_requests_per_s": 1.0, "bare_litestar_requests_per_s": 2.0}
    assert ratio_parts(http, "wallet_vs_bare_litestar", summary) == ("wallet_requests_per_s", "bare_litestar_requests_per_s")
    assert ratio_parts(http, "x_vs_y", summary) is None


def test_a_report_records_figures_ratios_and_failures_and_goes_on(tmp_path):
    suites = [
        _fake("good", GOOD, ratios={"hot_vs_pg": ("hot_per_s", "pg_tps")}),
        _fake("loadtest", FAILING),
        _fake("hung", HANGING, quick_timeout_s=1.0),
        _fake("after", GOOD.replace('endswith("/good")', 'endswith("/after")')),
    ]
    merged, report_path = run_all(suites, quick=True, out_dir=tmp_path, say=lambda message: None)
    assert report_path.parent.parent == tmp_path and report_path.name == "report.md"
    assert merged["suites"] == ["good", "loadtest", "hung", "after"]
    assert merged["suites_failed"] == ["loadtest", "hung"]
    assert merged["good_ok"] and merged["after_ok"] and not merged["loadtest_ok"]
    assert merged["good_fast_vs_bare"] == 0.05 and merged["good_hot_vs_pg"] == 1.5
    assert merged["loadtest_error"] == "exit code 2, no JSON line"
    assert merged["hung_error"].startswith("timed out")
    assert "good_phases" not in merged and "good_suite" not in merged
    assert merged["cpu_count"] == os.cpu_count() and merged["report"] == str(report_path)

    report = report_path.read_text()
    assert "## good: ok" in report and "## loadtest: FAILED (exit code 2, no JSON line)" in report
    assert "| fast_vs_bare | 0.05 | fast_requests_per_s = 400 | bare_requests_per_s = 8000 |" in report
    assert "| hot_vs_pg | 1.5 | hot_per_s = 30 | pg_tps = 20 |" in report
    assert "| goal: hot_vs_pg >= 1.0 | met |" in report
    assert "invalid choice: loadtest" in report  # the failing suite's log is quoted
    assert "git commit:" in report and "cores" in report
    assert json.loads((report_path.parent / "good.json").read_text())["phases"] == {"deep": [1, 2]}


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_a_quick_run_of_two_real_suites_writes_one_report(tmp_path):
    command = [sys.executable, "-m", "powerbank.cli", "bench", "all", "--quick", "--only", "fanout,http", "--out", str(tmp_path)]
    out = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    merged = json.loads(out.stdout.strip().splitlines()[-1])
    assert merged["suites"] == ["http", "fanout"] and merged["suites_failed"] == []
    assert f"report: {merged['report']}" in out.stdout
    for endpoint in ("stations_nearby", "wallet", "rental_history", "profile_update"):
        assert merged[f"http_{endpoint}_requests_per_s"] > 0
        assert merged[f"http_{endpoint}_vs_bare_litestar"] == pytest.approx(
            merged[f"http_{endpoint}_requests_per_s"] / merged["http_bare_litestar_requests_per_s"], abs=2e-3)
    assert merged["fanout_fanout_deliveries_vs_redis_publish"] == pytest.approx(
        merged["fanout_fanout_deliveries_per_s"] / merged["fanout_redis_publish_per_s"], abs=2e-3)
    report = Path(merged["report"]).read_text()
    assert "reproduce: `powerbank bench http --quick`" in report and "bare_litestar_requests_per_s = " in report

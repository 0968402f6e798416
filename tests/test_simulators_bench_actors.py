"""`powerbank bench actors`: the pure parts (pgbench parsing, the load window, the summary) fast,
and one smoke run of `--quick` on PostgreSQL + Redis that checks the JSON line's shape. Speed is
never asserted: benchmarks report figures, they do not pass or fail on them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from powerbank.simulators import bench
from powerbank.simulators.bench import (
    LoadResult,
    PgbenchResult,
    RedisBenchmarkResult,
    closed_loop,
    parse_pgbench_output,
    parse_redis_benchmark_csv,
)
from powerbank.simulators.bench_actors import BenchOptions, IdleSample, assemble_summary, db_activity, parse_options

ROOT = Path(__file__).resolve().parents[1]
SMOKE_REDIS_DB = 9
REQUIRED_FIGURES = (
    "idle_roundtrip_p50_ms",
    "idle_roundtrip_p99_ms",
    "independent_commands_per_s",
    "hot_entity_commands_per_s",
    "pgbench_hot_row_tps",
    "hot_entity_vs_pgbench",
    "naive_locking_commands_per_s",
    "vs_naive_locking",
    "redis_lpush_per_s",
    "independent_vs_redis_lpush",
)

PGBENCH_15_OUTPUT = """\
pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: /tmp/pgbench_script.sql
scaling factor: 1
query mode: simple
number of clients: 4
number of threads: 2
maximum number of tries: 1
duration: 4 s
number of transactions actually processed: 18234
number of failed transactions: 0 (0.000%)
latency average = 0.877 ms
initial connection time = 6.532 ms
tps = 4558.635515 (without initial connection time)
"""


def test_pgbench_summary_is_read():
    result = parse_pgbench_output(PGBENCH_15_OUTPUT)
    assert result == PgbenchResult(
        clients=4, duration_s=4.0, tps=4558.635515, transactions=18234, failed=0, latency_avg_ms=0.877
    )


def test_pgbench_output_without_tps_is_an_error_not_a_zero_reference():
    truncated = PGBENCH_15_OUTPUT.replace("tps = 4558.635515 (without initial connection time)\n", "")
    with pytest.raises(ValueError, match="tps"):
        parse_pgbench_output(truncated)


REDIS_BENCHMARK_7_CSV = """\
"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"LPUSH pb-bench-redis-reference xxxx","43956.04","0.711","0.208","0.695","1.063","1.287","4.103"
"""


def test_redis_benchmark_csv_is_read():
    assert parse_redis_benchmark_csv(REDIS_BENCHMARK_7_CSV) == RedisBenchmarkResult(
        command="lpush", requests_per_s=43956.04, p50_ms=0.695, p99_ms=1.287
    )
    with pytest.raises(ValueError, match="no figures"):
        parse_redis_benchmark_csv("Could not connect to Redis at 127.0.0.1:6379: Connection refused\n")


def test_redis_benchmark_command_names_server_database_and_bounds(tmp_path):
    command = bench.redis_benchmark_command("redis://127.0.0.1:6380/10", ["LPUSH", "k", "v"], 20000, 50)
    joined = " ".join(command)
    assert command[0] == "redis-benchmark" and command[-3:] == ["LPUSH", "k", "v"]
    for part in ("-p 6380", "--dbnum 10", "-n 20000", "-c 50", "--csv"):
        assert part in joined


def test_pgbench_command_names_server_database_and_script(tmp_path):
    command = bench.pgbench_command("postgresql://postgres@127.0.0.1:5433/postgres", "pb_bench_x", tmp_path / "s.sql", 16, 5)
    assert command[0] == "pgbench"
    assert command[-1] == "pb_bench_x"
    joined = " ".join(command)
    for part in ("--port 5433", "--username postgres", "--client 16", "--time 5", f"--file {tmp_path / 's.sql'}"):
        assert part in joined


async def test_closed_loop_counts_only_the_measured_window():
    async def operation(n: int) -> str:
        await asyncio.sleep(0.01)
        return "rejected" if n % 5 == 0 else "ok"

    result = await closed_loop(operation, concurrency=4, warmup_s=0.1, duration_s=0.3)
    assert result.errors == 0 and result.unfinished == 0
    in_window = result.ok_in_window + result.rejected_in_window
    # 4 clients x ~10 ms each over 0.3 s is ~120; warm-up and tail are excluded.
    assert 0 < in_window < result.started
    assert result.rejected_in_window > 0
    assert len(result.latencies_s) == result.ok_in_window
    assert result.ok_per_s == pytest.approx(result.ok_in_window / 0.3)


async def test_closed_loop_counts_failures_as_errors_not_throughput():
    async def operation(n: int) -> str:
        raise RuntimeError("down")

    result = await closed_loop(operation, concurrency=2, warmup_s=0.0, duration_s=0.05)
    assert result.ok_in_window == 0
    assert result.errors == result.started > 0


def test_results_of_processes_sharing_a_window_add_up():
    a = LoadResult(concurrency=8, warmup_s=1, duration_s=10, ok_in_window=100, errors=1, started=120, latencies_s=[0.1])
    b = LoadResult(concurrency=8, warmup_s=1, duration_s=10, ok_in_window=50, started=60, latencies_s=[0.2])
    merged = a.merge(b)
    assert (merged.concurrency, merged.ok_in_window, merged.errors, merged.started) == (16, 150, 1, 180)
    assert merged.ok_per_s == 15.0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_process_cpu_is_read_from_proc_and_none_for_a_gone_process():
    sum(i * i for i in range(200_000))  # spend a little CPU
    assert bench.process_cpu_s(os.getpid()) > 0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert bench.process_cpu_s(child.pid) is None


def test_quick_defaults_and_explicit_options():
    assert parse_options([]) == BenchOptions()
    quick = parse_options(["--quick"])
    assert quick.quick and quick.phase_s < BenchOptions().phase_s
    assert quick.total_timeout_s < BenchOptions().total_timeout_s
    tuned = parse_options(["--quick", "--duration", "7", "--pgbench-clients", "2,8", "--workers", "3", "--naive-concurrency", "4,32"])
    assert (tuned.phase_s, tuned.pgbench_clients, tuned.worker_processes, tuned.naive_concurrency) == (7.0, (2, 8), 3, (4, 32))


def _load(ok: int, duration_s: float = 10.0, concurrency: int = 64) -> LoadResult:
    return LoadResult(
        concurrency=concurrency, warmup_s=1.0, duration_s=duration_s, ok_in_window=ok, started=ok, latencies_s=[0.01] * ok
    )


def test_summary_holds_figures_ratios_goals_references_and_parameters():
    pgbench_runs = [
        PgbenchResult(clients=1, duration_s=5, tps=2000.0, transactions=10000, failed=0, latency_avg_ms=0.5),
        PgbenchResult(clients=4, duration_s=5, tps=4000.0, transactions=20000, failed=0, latency_avg_ms=1.0),
    ]
    summary = assemble_summary(
        BenchOptions(),
        idle=[IdleSample(0.004, 0.002, 0.001, 0.001)] * 50 + [IdleSample(0.02, 0.01, 0.005, 0.005)],
        idle_noop=[IdleSample(0.003, 0.002, 0.0, 0.001)] * 10,
        independent=_load(30000),
        hot_runs=[_load(50000, concurrency=128), _load(40000, concurrency=512)],
        naive_runs=[_load(20000, concurrency=16), _load(15000, concurrency=128)],
        pgbench_runs=pgbench_runs,
        audit_report={"ok": True},
        environment={"cpu_count": 2},
        elapsed_s=100.0,
        redis_lpush=RedisBenchmarkResult(command="lpush", requests_per_s=40000.0, p50_ms=0.7, p99_ms=1.3),
    )
    for key in REQUIRED_FIGURES:
        assert isinstance(summary[key], float), key
    assert summary["idle_roundtrip_p50_ms"] == 4.0
    assert summary["idle_roundtrip_p99_ms"] == 20.0
    assert summary["phases"]["idle"]["legs_p50_ms"] == {"to_handler": 2.0, "handler": 1.0, "to_caller": 1.0}
    assert summary["idle_noop_roundtrip_p50_ms"] == 3.0
    assert summary["hot_entity_commands_per_s"] == 5000.0  # the best in-flight level is the figure
    assert summary["reference"]["hot_concurrency"] == 128
    assert summary["pgbench_hot_row_tps"] == 4000.0  # the best client count is the reference
    assert summary["reference"]["pgbench_clients"] == 4
    assert summary["hot_entity_vs_pgbench"] == 1.25
    assert summary["naive_locking_commands_per_s"] == 2000.0  # the best in-flight level is the reference
    assert summary["reference"]["naive_concurrency"] == 16
    assert summary["vs_naive_locking"] == 2.5
    assert summary["redis_lpush_per_s"] == 40000.0
    assert summary["independent_vs_redis_lpush"] == 0.075  # 3000/s of 40000/s
    assert all(summary["goals"].values())
    params = summary["params"]
    for key in ("worker_processes", "phase_s", "warmup_s", "batch_size", "worker_threads", "hot_concurrency",
                "naive_processes", "naive_concurrency", "pgbench_clients"):
        assert key in params
    assert len(summary["phases"]["pgbench"]) == 2
    assert len(summary["phases"]["naive_locking"]) == 2
    json.loads(bench.json_line(summary))


def test_database_activity_is_per_command_of_the_phase():
    activity = db_activity((1000, 10), (1600, 30), commands=500)
    assert activity == {
        "commands": 500, "commits": 600, "rollbacks": 20, "commits_per_command": 1.2, "rollbacks_per_command": 0.04,
    }
    assert db_activity((5, 5), (5, 5), commands=0)["commits_per_command"] == 0.0


def test_summary_with_nothing_measured_stays_valid_json():
    summary = assemble_summary(
        BenchOptions(quick=True),
        idle=[],
        idle_noop=[],
        independent=_load(0),
        hot_runs=[_load(0)],
        naive_runs=[_load(0)],
        pgbench_runs=[PgbenchResult(clients=1, duration_s=2, tps=0.0, transactions=0, failed=0, latency_avg_ms=0.0)],
        audit_report={"ok": True},
        environment={},
        elapsed_s=1.0,
    )
    assert summary["hot_entity_vs_pgbench"] == 0.0 and summary["vs_naive_locking"] == 0.0
    assert summary["redis_lpush_per_s"] == 0.0 and summary["independent_vs_redis_lpush"] == 0.0
    assert not summary["goals"]["vs_naive_locking >= 2.0"]
    json.loads(bench.json_line(summary))


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_quick_run_ends_with_a_complete_json_line():
    command = [sys.executable, "-m", "powerbank.cli", "bench", "actors", "--quick", "--redis-db", str(SMOKE_REDIS_DB)]
    out = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in REQUIRED_FIGURES:
        assert isinstance(summary[key], (int, float)) and summary[key] >= 0, key
    assert summary["idle_roundtrip_p50_ms"] > 0
    assert summary["independent_commands_per_s"] > 0
    assert summary["hot_entity_commands_per_s"] > 0
    assert summary["pgbench_hot_row_tps"] > 0
    assert summary["naive_locking_commands_per_s"] > 0
    assert summary["redis_lpush_per_s"] > 0
    assert summary["independent_vs_redis_lpush"] == pytest.approx(
        summary["independent_commands_per_s"] / summary["redis_lpush_per_s"], abs=2e-3)
    assert summary["params"]["quick"] is True
    assert summary["params"]["worker_processes"] == 2
    assert summary["audit"]["ok"], summary["audit"]
    assert summary["errors"] == 0
    assert set(summary["goals"]) == {"idle_roundtrip_p50_ms <= 5.0", "hot_entity_vs_pgbench >= 1.0", "vs_naive_locking >= 2.0"}

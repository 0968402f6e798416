"""`powerbank bench http`: the load generator's HTTP client against a real uvicorn server, the
summary's ratios, and one small real run (Procfile web processes on PostgreSQL + Redis, the
bare Litestar reference) that checks the JSON line. Speed is never asserted."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from powerbank.http.testing import serve
from powerbank.simulators.bench import LoadResult
from powerbank.simulators.bench_http import (
    ENDPOINTS,
    REFERENCE,
    HttpBenchOptions,
    KeepAliveConnection,
    Seeded,
    assemble_summary,
    bare_app,
    endpoint_requests,
    http_operation,
    parse_options,
    raw_request,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE_REDIS_DB = 8


def test_quick_defaults_and_explicit_options():
    assert parse_options([]) == HttpBenchOptions()
    quick = parse_options(["--quick"])
    assert quick.quick and quick.duration_s < HttpBenchOptions().duration_s
    tuned = parse_options(["--quick", "--web", "3", "--endpoints", "wallet,profile_update", "--concurrency", "5"])
    assert (tuned.web_processes, tuned.endpoints, tuned.concurrency) == (3, ("wallet", "profile_update"), 5)
    with pytest.raises(SystemExit):
        parse_options(["--endpoints", "wallet,nonsense"])
    embedded = parse_options(["--backend", "embedded", "--web", "3"])
    assert (embedded.backend, embedded.web_processes) == ("embedded", 1)  # one process by definition


def test_requests_are_authenticated_per_rider_and_the_write_has_a_body():
    seeded = Seeded(station_points=[(27.7, 85.3)], tokens=["tok-a", "tok-b"])
    wallet = endpoint_requests("wallet", seeded)
    assert [r.split("\r\n")[0] for r in wallet] == ["GET /api/user/wallet HTTP/1.1"] * 2
    assert "Authorization: Bearer tok-b" in wallet[1]
    patch = endpoint_requests("profile_update", seeded)[0]
    head, body = patch.split("\r\n\r\n", 1)
    assert head.startswith("PATCH /api/user/profile HTTP/1.1")
    assert f"Content-Length: {len(body)}" in head and json.loads(body) == {"full_name": "Bench Rider 0"}
    nearby = endpoint_requests("stations_nearby", seeded)
    assert all(r.startswith("GET /api/app/stations/nearby?lat=27.") and "Authorization" not in r for r in nearby)
    assert {endpoint for endpoint in ENDPOINTS if endpoint_requests(endpoint, seeded)} == set(ENDPOINTS)


async def test_keep_alive_client_reads_responses_back_to_back_from_uvicorn():
    async with serve(bare_app()) as base_url:
        connection = KeepAliveConnection(int(base_url.rsplit(":", 1)[1]))
        try:
            request = raw_request("GET", "/").encode("latin-1")
            assert [await connection.request(request) for _ in range(3)] == [200, 200, 200]
            assert await connection.request(raw_request("GET", "/missing").encode("latin-1")) == 404
            operation = http_operation([connection], [request])
            assert await operation(0) == "ok"
        finally:
            connection.close()


async def test_keep_alive_client_reads_a_chunked_body():
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = KeepAliveConnection(port)
    try:
        request = raw_request("GET", "/").encode("latin-1")
        assert [await connection.request(request), await connection.request(request)] == [200, 200]
    finally:
        connection.close()
        server.close()
        await server.wait_closed()


def _load(ok: int, p_s: float, errors: int = 0) -> LoadResult:
    return LoadResult(concurrency=8, warmup_s=1.0, duration_s=10.0, ok_in_window=ok, started=ok, errors=errors,
                      latencies_s=[p_s] * ok)


def test_summary_has_figures_per_endpoint_and_ratios_to_the_bare_reference():
    phases = {REFERENCE: _load(80_000, 0.001), "wallet": _load(4_000, 0.02), "profile_update": _load(2_000, 0.04, errors=3)}
    summary = assemble_summary(HttpBenchOptions(endpoints=("wallet", "profile_update")), phases,
                               environment={"cpu_count": 2}, elapsed_s=12.0,
                               server_cpu_ms={REFERENCE: 0.1, "wallet": 4.0, "profile_update": 6.0})
    assert summary["bare_litestar_requests_per_s"] == 8000.0
    assert (summary["wallet_requests_per_s"], summary["wallet_p50_ms"], summary["wallet_p99_ms"]) == (400.0, 20.0, 20.0)
    assert summary["wallet_vs_bare_litestar"] == 0.05
    assert summary["profile_update_vs_bare_litestar"] == 0.025
    assert (summary["bare_litestar_server_cpu_ms_per_request"], summary["wallet_server_cpu_ms_per_request"]) == (0.1, 4.0)
    assert "bare_litestar_vs_bare_litestar" not in summary
    assert summary["errors"] == 3
    assert json.dumps(summary)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_a_small_run_reports_every_endpoint_against_bare_litestar():
    command = [sys.executable, "-m", "powerbank.cli", "bench", "http", "--quick", "--duration", "1.5",
               "--redis-db", str(SMOKE_REDIS_DB)]
    out = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["suite"] == "http" and summary["errors"] == 0
    reference = summary["bare_litestar_requests_per_s"]
    assert reference > 0
    for endpoint in ENDPOINTS:
        figure = summary[f"{endpoint}_requests_per_s"]
        assert figure > 0
        assert 0 < summary[f"{endpoint}_p50_ms"] <= summary[f"{endpoint}_p99_ms"]
        assert summary[f"{endpoint}_server_cpu_ms_per_request"] > 0
        assert summary[f"{endpoint}_vs_bare_litestar"] == pytest.approx(figure / reference, abs=2e-3)


@pytest.mark.slow
def test_the_embedded_default_is_measured_against_one_bare_process():
    command = [sys.executable, "-m", "powerbank.cli", "bench", "http", "--quick", "--backend", "embedded",
               "--endpoints", "wallet,profile_update", "--duration", "1"]
    out = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["backend"], summary["web_processes"], summary["errors"]) == ("embedded_sqlite", 1, 0)
    assert "rental_history_requests_per_s" not in summary
    for endpoint in ("wallet", "profile_update"):
        assert summary[f"{endpoint}_requests_per_s"] > 0
        assert summary[f"{endpoint}_vs_bare_litestar"] == pytest.approx(
            summary[f"{endpoint}_requests_per_s"] / summary["bare_litestar_requests_per_s"], abs=2e-3)

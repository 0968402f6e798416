"""`powerbank bench fanout`: how fast a station-availability change reaches many maps.

The Procfile's shape on PostgreSQL + Redis: `--web` web processes and one worker, real
processes. `--clients` websocket clients (this process) watch one station through
`/api/ws/stations`, spread evenly over the web processes. An operator parks and unparks the
station `--changes` times through the admin API; each change goes HTTP -> Station actor on the
worker -> commit -> Redis -> every web process -> every socket. A delivery's latency is from the
moment the operator's request is sent to the moment a client has the update.

The reference, measured in the same run on the same processes: the same changes watched by a
single client. `fanout_vs_single_p50` is how much slower the median delivery is when a thousand
maps watch instead of one (the clients' own decoding is included: they share this process).

A second reference for the leg through Redis: `redis-benchmark` PUBLISHing a message of the
bus's size on the same server. `fanout_deliveries_per_s` is the rate at which sockets get a
change while a thousand watch (deliveries over the time from each change's request to its last
delivery); `fanout_deliveries_vs_redis_publish` compares it with Redis's PUBLISH rate: one
change is one PUBLISH per web process, so above 1 the fan-out multiplies what Redis alone moves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from powerbank.simulators.bench import (
    WORKER_CODE,
    ProcessPool,
    RedisBenchmarkResult,
    json_line,
    latency_summary_ms,
    python_child_argv,
    ratio,
    rounded,
    run_redis_benchmark,
    start_web_processes,
)

DELIVERY_TIMEOUT_S = 10.0


@dataclass
class FanoutOptions:
    clients: int = 1000
    changes: int = 10
    web_processes: int = 2
    redis_db: int = 11


def parse_options(argv: list[str]) -> FanoutOptions:
    parser = argparse.ArgumentParser(prog="powerbank bench fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="websocket clients watching the station")
    parser.add_argument("--changes", type=int, default=10, help="availability changes to deliver")
    parser.add_argument("--web", dest="web_processes", type=int, default=2, help="web processes")
    parser.add_argument("--redis-db", type=int, default=11, help="Redis database number to use and flush")
    return FanoutOptions(**vars(parser.parse_args(argv)))


@dataclass
class Deliveries:
    latencies_s: list[float]
    missing: int
    elapsed_s: float = 0.0  # summed over changes: request sent until its last delivery (or the timeout)


async def open_clients(urls: list[str], count: int) -> list[Any]:
    """`count` sockets round-robin over `urls`, each past its snapshot frame."""
    import websockets

    async def one(index: int):
        socket = await websockets.connect(urls[index % len(urls)], max_queue=None, open_timeout=30)
        snapshot = json.loads(await asyncio.wait_for(socket.recv(), 30))
        assert snapshot["type"] == "stations.snapshot", snapshot
        return socket

    sockets = []
    for start in range(0, count, 100):  # in waves: a thousand handshakes at once time out
        sockets += await asyncio.gather(*(one(i) for i in range(start, min(count, start + 100))))
    return sockets


async def deliver(sockets: list[Any], change) -> Deliveries:
    """Send one change; how long each socket took to see it (missing: not within the timeout)."""

    async def receive(socket, sent_at: float) -> float | None:
        try:
            await asyncio.wait_for(socket.recv(), DELIVERY_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError):
            return None
        return time.perf_counter() - sent_at

    sent_at = time.perf_counter()
    waiting = [asyncio.create_task(receive(socket, sent_at)) for socket in sockets]
    await change()
    results = await asyncio.gather(*waiting)
    latencies_s = [r for r in results if r is not None]
    missing = len(results) - len(latencies_s)
    return Deliveries(latencies_s, missing, DELIVERY_TIMEOUT_S if missing else max(latencies_s, default=0.0))


class FanoutBench:
    def __init__(self, options: FanoutOptions, console) -> None:
        self.options = options
        self.console = console
        self.work_dir = Path(tempfile.mkdtemp(prefix="pb-fanout-"))
        self.pool = ProcessPool(self.work_dir)

    def say(self, message: str) -> None:
        self.console.print(f"[bold]fanout[/bold] {message}")

    async def run(self) -> dict[str, Any]:
        from powerbank.storage.testing import create_postgres_database, drop_postgres_database

        name, database_url = await create_postgres_database("pb_fanout")
        try:
            return await self._run(database_url)
        finally:
            await self.pool.astop()
            await drop_postgres_database(name)
            shutil.rmtree(self.work_dir, ignore_errors=True)

    async def _run(self, database_url: str) -> dict[str, Any]:
        import httpx

        from powerbank.storage import migrate
        from powerbank.storage.testing import isolated_redis_url

        options = self.options
        redis_url = isolated_redis_url(options.redis_db)
        await asyncio.to_thread(migrate.upgrade, database_url)
        secret = secrets.token_urlsafe(32)
        station_id, admin_token = await self._prepare(database_url, redis_url, secret)
        ports = await self._start(database_url, redis_url, secret)
        urls = [f"ws://127.0.0.1:{port}/api/ws/stations?stations={station_id}" for port in ports]
        change_url = f"http://127.0.0.1:{ports[0]}/api/admin/stations/{station_id}/maintenance"
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {admin_token}"}, timeout=30) as http:
            parked = [False]

            async def change() -> None:
                parked[0] = not parked[0]
                response = await http.put(change_url, json={"maintenance": parked[0]})
                response.raise_for_status()

            self.say("reference: one client")
            single = await self._measure(await open_clients(urls[:1], 1), change)
            self.say(f"{options.clients} clients over {len(ports)} web processes")
            many = await self._measure(await open_clients(urls, options.clients), change)
        self.say("reference: redis-benchmark PUBLISH on the same server")
        publish = await run_redis_benchmark(redis_url, "publish")
        return self._summary(single, many, len(ports), publish)

    async def _measure(self, sockets: list[Any], change) -> Deliveries:
        total = Deliveries([], 0)
        try:
            await deliver(sockets, change)  # warm-up: connections, caches, the worker's first drain
            for _ in range(self.options.changes):
                result = await deliver(sockets, change)
                total.latencies_s += result.latencies_s
                total.missing += result.missing
                total.elapsed_s += result.elapsed_s
        finally:
            await asyncio.gather(*(socket.close() for socket in sockets), return_exceptions=True)
        return total

    async def _prepare(self, database_url: str, redis_url: str, secret: str) -> tuple[uuid.UUID, str]:
        from powerbank.http.auth import ensure_admin_token
        from powerbank.http.testing import settings_for_tests
        from powerbank.services import build_services
        from powerbank.storage.models import Station
        from powerbank.storage.types import utcnow

        settings = settings_for_tests(self.work_dir, database_url, redis_url=redis_url, jwt_secret=secret)
        services = build_services(settings)
        try:
            async with services.sessions.begin() as session:
                station = Station(serial=f"FAN{secrets.token_hex(3).upper()}", name="fan-out", latitude=27.7, longitude=85.3,
                                  status="online", slot_count=4, last_seen_at=utcnow())
                session.add(station)
            token = await ensure_admin_token(services, "+9779800000099", ttl_s=3600)
            return station.id, token
        finally:
            await services.close()

    async def _start(self, database_url: str, redis_url: str, secret: str) -> list[int]:
        from powerbank.simulators.bench_actors import child_env

        env = {**child_env(database_url, redis_url, self.work_dir), "JWT_SECRET": secret}
        self.pool.start("worker", python_child_argv(WORKER_CODE), env)
        return await start_web_processes(self.pool, env, self.options.web_processes)

    def _summary(self, single: Deliveries, many: Deliveries, web_processes: int, publish: RedisBenchmarkResult) -> dict[str, Any]:
        single_ms, many_ms = latency_summary_ms(single.latencies_s), latency_summary_ms(many.latencies_s)
        deliveries_per_s = len(many.latencies_s) / many.elapsed_s if many.elapsed_s > 0 else 0.0
        return {
            "suite": "fanout",
            "clients": self.options.clients,
            "web_processes": web_processes,
            "changes": self.options.changes,
            "deliveries": len(many.latencies_s),
            "deliveries_missing": many.missing + single.missing,
            "fanout_p50_ms": many_ms["p50"],
            "fanout_p99_ms": many_ms["p99"],
            "fanout_max_ms": many_ms["max"],
            "single_client_p50_ms": single_ms["p50"],
            "single_client_p99_ms": single_ms["p99"],
            "fanout_vs_single_p50": ratio(many_ms["p50"], single_ms["p50"]),
            "fanout_deliveries_per_s": rounded(deliveries_per_s, 1),
            "redis_publish_per_s": rounded(publish.requests_per_s, 1),
            "redis_publish_p50_ms": publish.p50_ms,
            "fanout_deliveries_vs_redis_publish": ratio(deliveries_per_s, publish.requests_per_s),
        }


def main(argv: list[str]) -> int:
    from rich.console import Console

    options = parse_options(argv)
    console = Console(stderr=True)
    summary = asyncio.run(FanoutBench(options, console).run())
    for key, value in summary.items():
        console.print(f"  {key}: {value}")
    print(json_line(summary))
    return 0 if summary["deliveries_missing"] == 0 else 1

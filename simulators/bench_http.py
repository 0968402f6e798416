"""`powerbank bench http`: the HTTP API's throughput and latency, next to a bare Litestar app
measured in the same run on the same machine.

The backend runs the way deployments run it: a migrated PostgreSQL database (`powerbank
migrate`, the Procfile's release step), `--web` processes of the Procfile's `web` role and one
`worker` on Redis. Seeded like a city: `--stations` stations with slots and banks, `--riders`
people signed up through the real OTP flow, each with `--rentals` finished rentals. Then, one
endpoint at a time, closed-loop load from `--load-processes` separate processes keeps
`--concurrency` keep-alive connections busy (spread evenly over the web processes, as a load
balancer would) for `--warmup` + `--duration` seconds:

- stations_nearby: GET /api/app/stations/nearby at points around the seeded city (public);
- wallet: GET /api/user/wallet, each rider with their own token;
- rental_history: GET /api/rentals/history, the first page of a rider's rentals;
- profile_update: PATCH /api/user/profile, an authenticated write (the profile row and a
  user audit-log row in one transaction) that needs no hardware.

`--backend embedded` measures the embedded default instead: one `powerbank serve` process
(SQLite, the in-process queue, the embedded MQTT broker), against one bare Litestar process.

The reference: the same number of processes serving a bare Litestar app (one JSON handler, no
middleware, no database) under the same uvicorn settings (`processes.web_server_config`),
loaded the same way. `<endpoint>_vs_bare_litestar` is the share of the framework-and-server
ceiling an endpoint reaches on this machine, now; on a shared machine the ratio moves far less
than either figure. The load generator shares the machine's cores with the servers, for the
reference and the endpoints alike.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from powerbank.simulators.bench import (
    WORKER_CODE,
    LoadResult,
    ProcessPool,
    closed_loop,
    json_line,
    process_cpu_s,
    print_result_line,
    python_child_argv,
    ratio,
    rounded,
    run_in_step,
    start_web_processes,
    wait_for_start_signal,
)

ENDPOINTS = ("stations_nearby", "wallet", "rental_history", "profile_update")
REFERENCE = "bare_litestar"
DEFAULT_REDIS_DB = 15
BARE_CODE = "from powerbank.simulators.bench_http import serve_bare; serve_bare()"
SERVE_CODE = "from powerbank.cli import main; raise SystemExit(main(['serve']))"
BACKENDS = {"procfile": "procfile_postgres_redis", "embedded": "embedded_sqlite"}
LOAD_CHILD_CODE = "import sys; from powerbank.simulators.bench_http import load_child_main; sys.exit(load_child_main(sys.argv[1:]))"
NEARBY_RADIUS_M = 3_000
NEARBY_POINTS = 64
PHONE_PREFIX = "+97798"
SIGN_UP_CONCURRENCY = 8


@dataclass(frozen=True)
class HttpBenchOptions:
    quick: bool = False
    web_processes: int = 2
    load_processes: int = 2
    concurrency: int = 64
    warmup_s: float = 2.0
    duration_s: float = 10.0
    stations: int = 500
    riders: int = 200
    rentals: int = 10
    endpoints: tuple[str, ...] = ENDPOINTS
    backend: str = "procfile"
    redis_db: int = DEFAULT_REDIS_DB
    total_timeout_s: float = 600.0


QUICK = dict(
    quick=True, web_processes=1, load_processes=1, concurrency=8, warmup_s=0.5, duration_s=2.0,
    stations=20, riders=8, rentals=3, total_timeout_s=180.0,
)


def _endpoint_list(text_value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text_value.split(",") if name.strip())
    unknown = sorted(set(names) - set(ENDPOINTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown endpoint {unknown[0]!r}; choose from {', '.join(ENDPOINTS)}")
    return names


def parse_options(argv: list[str]) -> HttpBenchOptions:
    """Defaults for a full run (about two minutes); `--quick` for a smoke run; any option given
    explicitly wins over both."""
    parser = argparse.ArgumentParser(
        prog="powerbank bench http",
        description="HTTP API throughput and latency on the Procfile's web processes (PostgreSQL + Redis), "
        "against a bare Litestar app measured in the same run. Figures on stderr, one JSON line last on stdout.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (well under a minute)")
    parser.add_argument("--web", dest="web_processes", type=int, help="web processes, and bare Litestar processes (default 2)")
    parser.add_argument("--load-processes", type=int, help="processes generating the load (default 2)")
    parser.add_argument("--concurrency", type=int, help="requests in flight over all load processes (default 64)")
    parser.add_argument("--warmup", dest="warmup_s", type=float, help="seconds of load before each measured window")
    parser.add_argument("--duration", dest="duration_s", type=float, help="seconds measured per endpoint")
    parser.add_argument("--stations", type=int, help="seeded stations (default 500)")
    parser.add_argument("--riders", type=int, help="people signed up, whose tokens the load uses (default 200)")
    parser.add_argument("--rentals", type=int, help="finished rentals in each rider's history (default 10)")
    parser.add_argument("--endpoints", type=_endpoint_list, help=f"comma-separated subset of {','.join(ENDPOINTS)}")
    parser.add_argument("--backend", choices=sorted(BACKENDS),
                        help="procfile (default: web processes and a worker on PostgreSQL + Redis) or embedded "
                        "(one `powerbank serve` on SQLite; --web is then 1)")
    parser.add_argument("--redis-db", type=int, help=f"Redis database number to use and flush (default {DEFAULT_REDIS_DB})")
    parser.add_argument("--timeout", dest="total_timeout_s", type=float, help="give up after this many seconds")
    args = vars(parser.parse_args(argv))
    values = dict(QUICK) if args.pop("quick") else {}
    values.update({key: value for key, value in args.items() if value is not None})
    if values.get("backend") == "embedded":
        values["web_processes"] = 1  # the embedded default is one process by definition
    return HttpBenchOptions(**values)


# --- the reference ---------------------------------------------------------------------------


def bare_app():
    """The least a Litestar app can do: one handler returning a small JSON object."""
    from litestar import Litestar, get

    @get("/", sync_to_thread=False)
    def hello() -> dict[str, Any]:
        return {"ok": True, "service": "bare"}

    return Litestar(route_handlers=[hello], openapi_config=None)


def serve_bare() -> None:
    """A bare Litestar process, run like a `web` process: the same uvicorn settings
    (`web_server_config`), the same collector tuning, the port from HTTP_PORT."""
    import uvicorn

    from powerbank.processes import tune_gc, web_server_config

    config = web_server_config(bare_app(), "127.0.0.1", int(os.environ["HTTP_PORT"]))
    server = uvicorn.Server(config)
    tune_gc()
    server.run()


# --- the load ---------------------------------------------------------------------------------


def raw_request(method: str, path: str, *, token: str | None = None, body: dict[str, Any] | None = None) -> str:
    """One HTTP/1.1 keep-alive request as the load generator sends it, built once up front so
    the generator spends its CPU on sending, not on formatting."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "User-Agent: powerbank-bench", "Accept: application/json"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    payload = b""
    if body is not None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode().decode("latin-1") + payload.decode("latin-1")


class KeepAliveConnection:
    """A minimal HTTP/1.1 client on one keep-alive connection: write a request, read the status,
    the headers and the body (Content-Length or chunked). httpx costs the generator several
    times the CPU per request, which on a small machine would be taken from the servers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, chunked = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                await self._skip_chunks()
            else:
                await self.reader.readexactly(length)
            return status
        except BaseException:
            self.close()  # a half-read response leaves the connection unusable
            raise

    async def _skip_chunks(self) -> None:
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await self.reader.readexactly(size + 2)
            if size == 0:
                return

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def http_operation(connections: list[KeepAliveConnection], requests: list[bytes]):
    """A closed-loop operation: request n goes out on an idle connection; "ok" on a 2xx."""
    idle: asyncio.Queue[KeepAliveConnection] = asyncio.Queue()
    for connection in connections:
        idle.put_nowait(connection)

    async def operation(n: int) -> str:
        connection = await idle.get()
        try:
            status = await connection.request(requests[n % len(requests)])
        finally:
            idle.put_nowait(connection)
        return "ok" if 200 <= status < 300 else "error"

    return operation


def load_child_main(argv: list[str]) -> int:
    """One load process: `SPEC_PATH`, a JSON file with ports, requests, concurrency, warmup_s
    and duration_s. Prints `ready`, waits for the common start time, prints one JSON line."""
    spec = json.loads(Path(argv[0]).read_text())
    return asyncio.run(_load_child(spec))


async def _load_child(spec: dict[str, Any]) -> int:
    ports, concurrency = spec["ports"], spec["concurrency"]
    requests = [request.encode("latin-1") for request in spec["requests"]]
    rng = random.Random(spec.get("seed", 0))
    rng.shuffle(requests)  # two processes must not send the same request in step
    connections = [KeepAliveConnection(ports[(spec.get("offset", 0) + i) % len(ports)]) for i in range(concurrency)]
    try:
        await wait_for_start_signal()
        cpu_before_s = time.process_time()
        result = await closed_loop(
            http_operation(connections, requests), concurrency=concurrency,
            warmup_s=spec["warmup_s"], duration_s=spec["duration_s"],
        )
        print_result_line({"load": dataclasses.asdict(result), "cpu_s": time.process_time() - cpu_before_s})
    finally:
        for connection in connections:
            connection.close()
    return 0


async def measure(
    label: str, ports: list[int], requests: list[str], options: HttpBenchOptions, work_dir: Path
) -> LoadResult:
    """`options.concurrency` connections over `options.load_processes` processes, their windows
    aligned; the merged result."""
    per_process = max(1, options.concurrency // options.load_processes)
    argvs = []
    for index in range(options.load_processes):
        spec_path = work_dir / f"load-{label}-{index}.json"
        spec_path.write_text(json.dumps({
            "ports": ports, "requests": requests, "concurrency": per_process, "warmup_s": options.warmup_s,
            "duration_s": options.duration_s, "seed": index, "offset": index * per_process,
        }))
        argvs.append(python_child_argv(LOAD_CHILD_CODE, str(spec_path)))
    results = await run_in_step(
        argvs, dict(os.environ), work_dir, ready_timeout_s=60, run_timeout_s=options.warmup_s + options.duration_s + 60,
    )
    merged: LoadResult | None = None
    for data in results:
        part = LoadResult(**data["load"])
        merged = part if merged is None else merged.merge(part)
    return merged


# --- seeding ----------------------------------------------------------------------------------


@dataclass
class Seeded:
    station_points: list[tuple[float, float]]
    tokens: list[str]


def endpoint_requests(endpoint: str, seeded: Seeded) -> list[str]:
    """The requests of one endpoint, as real users would send them: each rider with their own
    token, the map at points near the stations."""
    if endpoint == "stations_nearby":
        rng = random.Random(7)
        points = [rng.choice(seeded.station_points) for _ in range(NEARBY_POINTS)]
        return [
            raw_request("GET", f"/api/app/stations/nearby?lat={lat + rng.uniform(-0.005, 0.005):.5f}"
                               f"&lng={lng + rng.uniform(-0.005, 0.005):.5f}&radius_m={NEARBY_RADIUS_M}")
            for lat, lng in points
        ]
    if endpoint == "wallet":
        return [raw_request("GET", "/api/user/wallet", token=token) for token in seeded.tokens]
    if endpoint == "rental_history":
        return [raw_request("GET", "/api/rentals/history?page_size=20", token=token) for token in seeded.tokens]
    if endpoint == "profile_update":
        return [
            raw_request("PATCH", "/api/user/profile", token=token, body={"full_name": f"Bench Rider {n}"})
            for n, token in enumerate(seeded.tokens)
        ]
    raise ValueError(f"unknown endpoint {endpoint!r}")


async def sign_up_riders(base_url: str, count: int) -> list[tuple[str, str]]:
    """(user id, access token) of `count` people registered through the real OTP flow."""
    import httpx

    from powerbank.simulators.riders import Rider

    limit = asyncio.Semaphore(SIGN_UP_CONCURRENCY)
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(n: int) -> tuple[str, str]:
            async with limit:
                rider = Rider(base_url, f"{PHONE_PREFIX}{n:08d}", client=client)
                user_id = await rider.sign_in()
                return user_id, rider.access_token

        return list(await asyncio.gather(*(one(n) for n in range(count))))


async def seed_history(database_url: str, user_ids: list[str], station_ids: list[str], per_user: int) -> None:
    """Finished rentals in every rider's history, written as rows (as the Rental actor would
    have left them), spread over the seeded stations and the past month."""
    from datetime import timedelta

    from sqlalchemy import select

    from powerbank.storage.db import create_engine, session_factory
    from powerbank.storage.models import Rental, RentalPackage
    from powerbank.storage.types import utcnow

    rng = random.Random(11)
    engine = create_engine(database_url)
    try:
        async with session_factory(engine).begin() as session:
            package = (await session.execute(select(RentalPackage).where(RentalPackage.code == "hour-1"))).scalar_one()
            now = utcnow()
            for user_id in user_ids:
                for _ in range(per_user):
                    started = now - timedelta(minutes=rng.randint(60, 30 * 24 * 60))
                    session.add(Rental(
                        user_id=uuid.UUID(user_id), station_id=uuid.UUID(rng.choice(station_ids)),
                        return_station_id=uuid.UUID(rng.choice(station_ids)), package_id=package.id,
                        status="completed", currency=package.currency, hold_minor=package.price_minor,
                        fee_minor=package.price_minor, charged_minor=package.price_minor, started_at=started,
                        due_at=started + timedelta(minutes=package.duration_minutes),
                        returned_at=started + timedelta(minutes=rng.randint(5, package.duration_minutes)),
                    ))
    finally:
        await engine.dispose()


# --- the run ----------------------------------------------------------------------------------


class Run:
    """One benchmark run's resources, each released in `close` whatever happened."""

    def __init__(self, options: HttpBenchOptions, console) -> None:
        self.options = options
        self.console = console
        self.started = time.monotonic()
        self.work_dir = Path(tempfile.mkdtemp(prefix="pb-bench-http-"))
        self.pool = ProcessPool(self.work_dir)
        self.database_name: str | None = None
        self.failed = True

    def say(self, message: str) -> None:
        self.console.print(f"[dim]bench http {time.monotonic() - self.started:5.1f}s:[/dim] {message}")

    async def execute(self) -> dict[str, Any]:
        options = self.options
        phases: dict[str, LoadResult] = {}
        cpu_ms: dict[str, float] = {}
        self.say(f"reference: {options.web_processes} bare Litestar processes")
        bare_ports = await start_web_processes(self.pool, dict(os.environ), options.web_processes, code=BARE_CODE,
                                               name="bare", health_path="/")
        phases[REFERENCE], cpu_ms[REFERENCE] = await self._measure(REFERENCE, bare_ports, [raw_request("GET", "/")])
        await self.pool.astop()
        self.pool = ProcessPool(self.work_dir)

        ports, seeded = await self._start_backend()
        for endpoint in options.endpoints:
            phases[endpoint], cpu_ms[endpoint] = await self._measure(endpoint, ports, endpoint_requests(endpoint, seeded))
        summary = assemble_summary(options, phases, environment=environment_facts(), elapsed_s=time.monotonic() - self.started,
                                   server_cpu_ms=cpu_ms)
        self.failed = summary["errors"] > 0
        return summary

    async def _measure(self, label: str, ports: list[int], requests: list[str]) -> tuple[LoadResult, float]:
        """The load result, and the servers' CPU milliseconds per request: on a shared machine
        the CPU a request costs moves much less than the requests/s others leave us."""
        options = self.options
        self.say(f"{label}: {options.concurrency} in flight from {options.load_processes} processes, "
                 f"{options.warmup_s:g} s warm-up + {options.duration_s:g} s")
        cpu_before_s = self._servers_cpu_s()
        result = await measure(label, ports, requests, options, self.work_dir)
        cpu_ms = ratio((self._servers_cpu_s() - cpu_before_s) * 1000, result.completed)
        latency = result.as_dict()["latency_ms"]
        self.say(f"{label}: {result.ok_per_s:.0f} requests/s, p50 {latency['p50']:g} ms, p99 {latency['p99']:g} ms, "
                 f"server CPU {cpu_ms:g} ms per request, {result.errors} errors")
        return result, cpu_ms

    def _servers_cpu_s(self) -> float:
        """CPU seconds of the processes serving HTTP (the worker is left out)."""
        used = (process_cpu_s(child.process.pid) for child in self.pool.children if child.name != "worker")
        return sum(cpu_s for cpu_s in used if cpu_s is not None)

    async def _start_backend(self) -> tuple[list[int], Seeded]:
        """The deployment: create and migrate the database, start the worker and the web
        processes (or one `powerbank serve`), then seed stations, riders and their histories
        through it."""
        from powerbank.simulators.bench_actors import child_env
        from powerbank.storage.testing import create_postgres_database, isolated_redis_url

        options = self.options
        if options.backend == "embedded":
            database_url, redis_url = f"sqlite+aiosqlite:///{self.work_dir / 'powerbank.sqlite3'}", ""
        else:
            self.database_name, database_url = await create_postgres_database("pb_bench_http")
            redis_url = isolated_redis_url(options.redis_db)
        env = {
            **child_env(database_url, redis_url, self.work_dir),
            "JWT_SECRET": secrets.token_urlsafe(32),
            "POWERBANK_OTP_ECHO": "1",
            "OTP_RATE_PER_IP": "1000000",
            "ACCESS_TOKEN_TTL_S": "7200",
        }
        if not redis_url:
            env.pop("REDIS_URL")
        self.say(f"database {self.database_name or database_url}: powerbank migrate")
        migrated = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "powerbank.cli", "migrate"], env=env, capture_output=True, text=True, timeout=300,
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"powerbank migrate failed:\n{migrated.stderr[-3000:]}")
        if options.backend == "embedded":
            self.say("starting powerbank serve (the embedded default, one process)")
            ports = await start_web_processes(self.pool, env, 1, code=SERVE_CODE, name="serve")
        else:
            self.say(f"starting 1 worker and {options.web_processes} web processes (Procfile)")
            self.pool.start("worker", python_child_argv(WORKER_CODE), env)
            ports = await start_web_processes(self.pool, env, options.web_processes)
        self.say(f"seeding {options.stations} stations, {options.riders} riders with {options.rentals} rentals each")
        seeded = await self._seed(database_url, f"http://127.0.0.1:{ports[0]}")
        return ports, seeded

    async def _seed(self, database_url: str, base_url: str) -> Seeded:
        from powerbank.simulators.stations import provision_fleet
        from powerbank.storage.db import create_engine, session_factory

        engine = create_engine(database_url)
        try:
            specs = await provision_fleet(session_factory(engine), self.options.stations, 8, 6, serial_prefix="HTTP")
        finally:
            await engine.dispose()
        riders = await sign_up_riders(base_url, self.options.riders)
        await seed_history(database_url, [user_id for user_id, _ in riders], [spec.station_id for spec in specs], self.options.rentals)
        return Seeded(station_points=[(spec.latitude, spec.longitude) for spec in specs], tokens=[token for _, token in riders])

    async def close(self) -> None:
        from powerbank.simulators.bench_actors import _drop_database, _quietly
        from powerbank.storage.testing import isolated_redis_url

        await _quietly(self.pool.astop())
        if self.database_name is not None:
            await _quietly(_drop_database(self.database_name))
            await _quietly(asyncio.to_thread(isolated_redis_url, self.options.redis_db))
        if self.failed:
            self.say(f"[yellow]logs kept in {self.work_dir}[/yellow]")
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def environment_facts() -> dict[str, Any]:
    from powerbank.simulators.bench_actors import source_revision

    return {"cpu_count": os.cpu_count(), **source_revision()}


def assemble_summary(
    options: HttpBenchOptions, phases: dict[str, LoadResult], *, environment: dict[str, Any], elapsed_s: float,
    server_cpu_ms: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The final line: per endpoint requests/s, p50 and p99, the servers' CPU per request and
    the ratio to the bare reference, flat at the top; each phase's details under `phases`."""
    server_cpu_ms = server_cpu_ms or {}
    reference = phases[REFERENCE]
    summary: dict[str, Any] = {"suite": "http", "backend": BACKENDS[options.backend]}
    for label, result in phases.items():
        latency = result.as_dict()["latency_ms"]
        summary[f"{label}_requests_per_s"] = rounded(result.ok_per_s, 1)
        summary[f"{label}_p50_ms"] = latency["p50"]
        summary[f"{label}_p99_ms"] = latency["p99"]
        if label in server_cpu_ms:
            summary[f"{label}_server_cpu_ms_per_request"] = server_cpu_ms[label]
        if label != REFERENCE:
            summary[f"{label}_vs_{REFERENCE}"] = ratio(result.ok_per_s, reference.ok_per_s)
    summary.update({
        "errors": sum(result.errors + result.unfinished for result in phases.values()),
        "web_processes": options.web_processes,
        "load_processes": options.load_processes,
        "concurrency": options.concurrency,
        "quick": options.quick,
        "phases": {label: result.as_dict() for label, result in phases.items()},
        "params": {key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(options).items()},
        "environment": environment,
        "elapsed_s": rounded(elapsed_s, 1),
    })
    return summary


async def run_benchmark(options: HttpBenchOptions, console) -> dict[str, Any]:
    run = Run(options, console)
    try:
        return await asyncio.wait_for(run.execute(), options.total_timeout_s)
    finally:
        await run.close()


def print_report(console, summary: dict[str, Any]) -> None:
    from rich.table import Table

    if "error" in summary:
        console.print(f"[red]benchmark failed:[/red] {summary['error']}")
        return
    table = Table(title="powerbank bench http")
    for column in ("endpoint", "requests/s", "p50 ms", "p99 ms", "server CPU ms/request", f"vs {REFERENCE}"):
        table.add_column(column, justify="left" if column == "endpoint" else "right")
    for label in (REFERENCE, *summary["params"]["endpoints"]):
        vs = summary.get(f"{label}_vs_{REFERENCE}")
        table.add_row(label, f"{summary[f'{label}_requests_per_s']:g}", f"{summary[f'{label}_p50_ms']:g}",
                      f"{summary[f'{label}_p99_ms']:g}", f"{summary.get(f'{label}_server_cpu_ms_per_request', 0.0):g}",
                      "reference" if vs is None else f"{vs:g}")
    console.print(table)
    console.print(f"{summary['web_processes']} web processes, {summary['concurrency']} in flight from "
                  f"{summary['load_processes']} load processes, {summary['errors']} errors")


def main(argv: list[str]) -> int:
    """`powerbank bench http [options]`: figures on stderr, the JSON line last on stdout."""
    from rich.console import Console

    options = parse_options(argv)
    console = Console(stderr=True, soft_wrap=True)
    code = 1
    try:
        summary = asyncio.run(run_benchmark(options, console))
        code = 0 if summary["errors"] == 0 else 1
    except KeyboardInterrupt:
        summary, code = {"error": "interrupted"}, 130
    except Exception as error:  # noqa: BLE001 - a benchmark reports its failure as its result
        console.print_exception()
        summary = {"error": repr(error)}
    print_report(console, summary)
    print(json_line(summary), flush=True)
    return code

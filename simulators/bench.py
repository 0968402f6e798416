"""Parts every `powerbank bench` suite needs: a closed-loop load driver that counts completions
in a measured window, a `pgbench` runner and parser (the in-run reference), a pool of child
processes that always stops, and the final JSON line.

Benchmarks here are not timed tests. Machines are shared and noisy, so a suite reports its
figures next to a reference measured in the same run, and the ratio is what means something.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from powerbank.demo import percentile

# --- the final line ---------------------------------------------------------------------------


def json_line(summary: dict[str, Any]) -> str:
    """The machine-readable result: one line, so `tail -n1 | jq` works on any suite."""
    return json.dumps(summary, sort_keys=True, separators=(",", ":"), allow_nan=False)


def rounded(value: float, digits: int = 3) -> float:
    """Figures are printed and compared by people; sub-microsecond digits are noise."""
    return round(float(value), digits)


def ratio(numerator: float, denominator: float) -> float:
    """A ratio that stays valid JSON when the reference measured nothing (0 means 'no data')."""
    if denominator <= 0 or not math.isfinite(numerator):
        return 0.0
    return rounded(numerator / denominator)


def latency_summary_ms(durations_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds; percentiles use the demo's nearest-rank rule."""
    values_ms = [d * 1000.0 for d in durations_s]
    return {
        "p50": rounded(percentile(values_ms, 0.50)),
        "p90": rounded(percentile(values_ms, 0.90)),
        "p99": rounded(percentile(values_ms, 0.99)),
        "max": rounded(max(values_ms, default=0.0)),
    }


# --- closed-loop load -------------------------------------------------------------------------

Operation = Callable[[int], Awaitable[str]]
"""Performs request number n and returns "ok", "rejected" or "error"."""


@dataclass
class LoadResult:
    """What a closed loop achieved inside its measured window (warm-up and the tail excluded)."""

    concurrency: int
    warmup_s: float
    duration_s: float
    ok_in_window: int = 0
    rejected_in_window: int = 0
    errors: int = 0
    started: int = 0
    completed: int = 0  # ok or rejected, window or not: what the database saw
    unfinished: int = 0
    latencies_s: list[float] = field(default_factory=list, repr=False)

    @property
    def ok_per_s(self) -> float:
        return self.ok_in_window / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "latencies_s"}
        data["ok_per_s"] = rounded(self.ok_per_s, 1)
        data["latency_ms"] = latency_summary_ms(self.latencies_s)
        return data

    def merge(self, other: LoadResult) -> LoadResult:
        """Sum of two processes' loops over the same window."""
        return LoadResult(
            concurrency=self.concurrency + other.concurrency,
            warmup_s=self.warmup_s,
            duration_s=self.duration_s,
            ok_in_window=self.ok_in_window + other.ok_in_window,
            rejected_in_window=self.rejected_in_window + other.rejected_in_window,
            errors=self.errors + other.errors,
            started=self.started + other.started,
            completed=self.completed + other.completed,
            unfinished=self.unfinished + other.unfinished,
            latencies_s=self.latencies_s + other.latencies_s,
        )


async def closed_loop(
    operation: Operation,
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    finish_timeout_s: float = 30.0,
) -> LoadResult:
    """Keep `concurrency` requests in flight for warm-up plus duration; count what finished
    inside the window. Closed loop (a new request only when one finishes) so an overloaded
    system slows the offered load instead of growing an unbounded queue."""
    result = LoadResult(concurrency=concurrency, warmup_s=warmup_s, duration_s=duration_s)
    loop = asyncio.get_running_loop()
    window_start = loop.time() + warmup_s
    window_end = window_start + duration_s
    counter = itertools.count()

    async def client() -> None:
        while loop.time() < window_end:
            n = next(counter)
            result.started += 1
            began = loop.time()
            try:
                outcome = await operation(n)
            except Exception:
                outcome = "error"
            finished = loop.time()
            if outcome == "error":
                result.errors += 1
                continue
            result.completed += 1
            if window_start <= finished <= window_end:
                if outcome == "ok":
                    result.ok_in_window += 1
                    result.latencies_s.append(finished - began)
                else:
                    result.rejected_in_window += 1

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    remaining_s = window_end - loop.time() + finish_timeout_s
    _, pending = await asyncio.wait(tasks, timeout=remaining_s)
    result.unfinished = len(pending)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return result


# --- pgbench, the reference -------------------------------------------------------------------


@dataclass(frozen=True)
class PgbenchResult:
    clients: int
    duration_s: float
    tps: float
    transactions: int
    failed: int
    latency_avg_ms: float


_PGBENCH_PATTERNS = {
    "tps": re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE),
    "transactions": re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE),
    "latency_avg_ms": re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE),
    "clients": re.compile(r"^number of clients: (\d+)", re.MULTILINE),
    "duration_s": re.compile(r"^duration: (\d+) s", re.MULTILINE),
}


def parse_pgbench_output(text: str) -> PgbenchResult:
    """Read pgbench's summary (PostgreSQL 13+ wording). Raises ValueError if a figure is
    missing, rather than reporting a reference of zero that would make any ratio look good."""
    found: dict[str, str] = {}
    for key, pattern in _PGBENCH_PATTERNS.items():
        match = pattern.search(text)
        if match is None and key != "failed":  # older pgbench prints no failure line
            raise ValueError(f"pgbench output has no {key!r}:\n{text[-2000:]}")
        found[key] = match.group(1) if match else "0"
    return PgbenchResult(
        clients=int(found["clients"]),
        duration_s=float(found["duration_s"]),
        tps=float(found["tps"]),
        transactions=int(found["transactions"]),
        failed=int(found["failed"]),
        latency_avg_ms=float(found["latency_avg_ms"]),
    )


def pgbench_command(admin_dsn: str, database: str, script: Path, clients: int, duration_s: int) -> list[str]:
    """pgbench against `database` on the server named by `admin_dsn` (postgresql://user@host:port/...)."""
    parts = urlsplit(admin_dsn)
    threads = max(1, min(clients, os.cpu_count() or 1))
    return [
        "pgbench", "--no-vacuum",
        "--host", parts.hostname or "127.0.0.1",
        "--port", str(parts.port or 5432),
        "--username", unquote(parts.username or "postgres"),
        "--client", str(clients), "--jobs", str(threads),
        "--time", str(duration_s),
        "--file", str(script),
        database,
    ]


PGBENCH_RETRY_DELAY_S = 3.0


async def run_pgbench(
    admin_dsn: str, database: str, sql: str, *, clients: int, duration_s: int, work_dir: Path, attempts: int = 3
) -> PgbenchResult:
    """One pgbench run of a one-statement script; killed if it overruns its duration. Retried
    when the server is out of connection slots, which other users of a shared server cause."""
    script = work_dir / "pgbench_script.sql"
    script.write_text(sql.strip() + "\n")
    for attempt in range(1, attempts + 1):
        returncode, text = await _pgbench_once(admin_dsn, database, script, clients, duration_s)
        if returncode == 0:
            return parse_pgbench_output(text)
        if "too many clients" not in text or attempt == attempts:
            raise RuntimeError(f"pgbench exited with {returncode}:\n{text[-2000:]}")
        await asyncio.sleep(PGBENCH_RETRY_DELAY_S)
    raise AssertionError("unreachable")


async def _pgbench_once(admin_dsn: str, database: str, script: Path, clients: int, duration_s: int) -> tuple[int, str]:
    env = dict(os.environ)
    password = urlsplit(admin_dsn).password
    if password:
        env["PGPASSWORD"] = unquote(password)
    process = await asyncio.create_subprocess_exec(
        *pgbench_command(admin_dsn, database, script, clients, duration_s),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=duration_s + 30)
    except (TimeoutError, asyncio.CancelledError):
        process.kill()
        await process.wait()
        raise
    return process.returncode, output.decode(errors="replace")


# --- redis-benchmark, the reference for paths bound by Redis --------------------------------

REDIS_BENCHMARK_REQUESTS = 20_000
REDIS_BENCHMARK_CLIENTS = 50
REDIS_BENCHMARK_PAYLOAD = "x" * 200  # about a doorbell's or a bus message's size


@dataclass(frozen=True)
class RedisBenchmarkResult:
    command: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float


def parse_redis_benchmark_csv(text: str) -> RedisBenchmarkResult:
    """redis-benchmark's `--csv` output (Redis 7: test, rps, avg, min, p50, p95, p99, max).
    Raises ValueError when there is no data row rather than reporting a reference of zero."""
    import csv

    rows = list(csv.DictReader(line for line in text.splitlines() if line.startswith('"')))
    if not rows or "rps" not in rows[-1]:
        raise ValueError(f"redis-benchmark printed no figures:\n{text[-2000:]}")
    row = rows[-1]
    return RedisBenchmarkResult(
        command=row["test"].split(" ", 1)[0].lower(),
        requests_per_s=float(row["rps"]),
        p50_ms=float(row.get("p50_latency_ms") or 0.0),
        p99_ms=float(row.get("p99_latency_ms") or 0.0),
    )


def redis_benchmark_command(redis_url: str, command: list[str], requests: int, clients: int) -> list[str]:
    """redis-benchmark against the server and database of `redis_url`, one command, bounded by
    `requests`."""
    parts = urlsplit(redis_url)
    argv = ["redis-benchmark", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379),
            "--dbnum", (parts.path.strip("/") or "0"), "-n", str(requests), "-c", str(clients), "--csv"]
    if parts.password:
        argv += ["-a", unquote(parts.password)]
    return argv + command


async def run_redis_benchmark(
    redis_url: str, command: str, *, requests: int = REDIS_BENCHMARK_REQUESTS, clients: int = REDIS_BENCHMARK_CLIENTS,
    timeout_s: float = 60.0,
) -> RedisBenchmarkResult:
    """Redis's own throughput for `command` ("publish": PUBLISH to a channel nobody hears;
    "lpush": LPUSH onto a list, removed afterwards), with a payload the size of ours. The
    ceiling a path that goes through Redis could reach on this machine, now."""
    key = "pb-bench-redis-reference"
    argv = redis_benchmark_command(redis_url, [command.upper(), key, REDIS_BENCHMARK_PAYLOAD], requests, clients)
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        process.kill()
        await process.wait()
        raise
    finally:
        if command.lower() == "lpush":
            await _delete_redis_key(redis_url, key)
    text_output = output.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"redis-benchmark exited with {process.returncode}:\n{text_output[-2000:]}")
    return parse_redis_benchmark_csv(text_output)


async def _delete_redis_key(redis_url: str, key: str) -> None:
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        await client.delete(key)
    finally:
        await client.aclose()


# --- child processes --------------------------------------------------------------------------


@dataclass
class ChildProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class ProcessPool:
    """Child processes with their output in log files, stopped (TERM, then KILL) on exit, so a
    benchmark that fails or is interrupted leaves nothing running."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[ChildProcess] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> ChildProcess:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("w") as output:  # the child keeps its own descriptor
            process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        child = ChildProcess(name, process, log_path)
        self.children.append(child)
        return child

    def dead(self) -> list[ChildProcess]:
        return [child for child in self.children if child.process.poll() is not None]

    def stop(self, timeout_s: float = 20.0) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    async def astop(self, timeout_s: float = 20.0) -> None:
        await asyncio.to_thread(self.stop, timeout_s)


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used, from /proc: Linux only; None elsewhere
    or once the process is gone. For the CPU cost per command, which noise from other
    processes on a shared machine disturbs far less than it disturbs throughput."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_child_argv(code: str, *args: str) -> list[str]:
    """`python -c CODE ARGS...` with this interpreter (the virtualenv's)."""
    return [sys.executable, "-c", code, *args]


# --- children that start in step -------------------------------------------------------------

READY = b"ready"
# A child's result line carries every latency it measured: megabytes at tens of thousands of
# requests, far past asyncio's 64 KiB default for one line.
RESULT_LINE_LIMIT_BYTES = 256 * 1024 * 1024
START_DELAY_S = 0.2


async def run_in_step(
    argvs: list[list[str]],
    env: dict[str, str],
    log_dir: Path,
    *,
    ready_timeout_s: float,
    run_timeout_s: float,
) -> list[dict[str, Any]]:
    """Start children that each print `ready` once set up, then give them all one wall-clock
    start time on stdin, and collect the JSON line each prints when done. Starting together
    matters: a load split over processes is only a sum if the windows coincide."""
    children: list[asyncio.subprocess.Process] = []
    try:
        for index, argv in enumerate(argvs):
            with (log_dir / f"step-{index}.log").open("w") as log:
                children.append(await asyncio.create_subprocess_exec(
                    *argv, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                    limit=RESULT_LINE_LIMIT_BYTES,
                ))
        for index, child in enumerate(children):
            line = await asyncio.wait_for(child.stdout.readline(), ready_timeout_s)
            if line.strip() != READY:
                raise RuntimeError(f"child {index} did not get ready (see {log_dir / f'step-{index}.log'})")
        start_at = time.time() + START_DELAY_S
        for child in children:
            child.stdin.write(f"{start_at}\n".encode())
            await child.stdin.drain()
        lines = await asyncio.wait_for(
            asyncio.gather(*(child.stdout.readline() for child in children)), run_timeout_s
        )
        return [json.loads(line) for line in lines]
    finally:
        await _reap(children)


async def _reap(children: list[asyncio.subprocess.Process], timeout_s: float = 10.0) -> None:
    for child in children:
        if child.returncode is None and child.stdin is not None:
            child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), timeout_s)
        except TimeoutError:
            child.kill()
            await child.wait()


async def wait_for_start_signal() -> float:
    """The child's half of `run_in_step`: say ready, then sleep until the common start time."""
    print(READY.decode(), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line.strip():
        raise SystemExit("no start time on stdin: the parent is gone")
    start_at = float(line)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    return start_at


def print_result_line(data: dict[str, Any]) -> None:
    """The child's last word to `run_in_step`: one JSON line on stdout."""
    print(json.dumps(data), flush=True)


# --- the Procfile's web processes ------------------------------------------------------------

WEB_CODE = "from powerbank.cli import main; raise SystemExit(main(['web']))"
WORKER_CODE = "from powerbank.cli import main; raise SystemExit(main(['worker']))"
HEALTH_PATH = "/api/app/health"


async def start_web_processes(
    pool: ProcessPool, env: dict[str, str], count: int, *, code: str = WEB_CODE, name: str = "web",
    health_path: str = HEALTH_PATH,
) -> list[int]:
    """`count` processes of the Procfile's `web` role (or `code`, a server that reads its port
    from HTTP_PORT the same way), each on a free port; returns the ports once each answers
    `health_path`."""
    from powerbank.demo import free_port

    ports = [free_port() for _ in range(count)]
    for index, port in enumerate(ports):
        pool.start(f"{name}-{index}", python_child_argv(code), {**env, "HTTP_PORT": str(port), "PORT": str(port)})
    await wait_healthy(pool, ports, health_path)
    return ports


async def wait_healthy(pool: ProcessPool, ports: list[int], path: str = HEALTH_PATH, timeout_s: float = 60) -> None:
    """Until every port answers 200 on `path`; fails early, with its log, if a child exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as http:
        for port in ports:
            while True:
                dead = pool.dead()
                if dead:
                    raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
                try:
                    if (await http.get(f"http://127.0.0.1:{port}{path}")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"process on port {port} not healthy within {timeout_s} s")
                await asyncio.sleep(0.2)

"""`powerbank bench stations`: how many simulated stations the embedded default holds, and how
fast slot events get from a station's PUBLISH to committed state on the embedded broker and on
Mosquitto, measured in the same run with the same workload.

Phases, each on a fresh backend (`powerbank serve`'s composition: SQLite, in-process queue,
the bridge; the embedded amqtt broker unless Mosquitto is measured):
1. connected: `--stations` simulated stations (real MQTT clients with their own login and
   last will, in `--fleet-processes` child processes) connect and boot; they then heartbeat
   every `--heartbeat` seconds for `--hold` seconds. Counted at the end: stations whose
   simulator is connected *and* that the backend has online. Also: how long connecting took,
   the backend's memory per connected station, and the heartbeat lag (station clock at send
   to the commit that applied it; one host, one clock).
2. events, embedded broker: `--event-stations` stations each keep `--window` slot events
   (a bank taken out, put back, ...) waiting for their ack, for `--events-duration` seconds.
   Throughput counts events whose Station-actor command committed inside the measured window
   (after `--warmup`); lag is the station's timestamp to that commit.
3. events, Mosquitto (`--mosquitto-url`, the machine's by default): the same.
Then every event a station published is looked up in the database: `events_lost` must be 0.

Figures go to stderr as they come (rich), and one JSON line ends stdout. Like every suite here
the run compares against a reference measured in the same run (Mosquitto), because the machine
is shared and noisy. The fleet's own CPU (child processes) is reported apart from the
backend's, since on a small machine they compete for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import random
import resource
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from powerbank.simulators.bench import json_line, latency_summary_ms, ratio, rounded

MOSQUITTO_URL = "mqtt://127.0.0.1:1883"
SLOTS_PER_STATION = 8
BANKS_PER_STATION = 4
GOALS = {
    "stations_connected": (">=", 10_000),
    "embedded_vs_mosquitto": (">=", 0.6),
    "events_lost": ("==", 0),
}
FLEET_CHILD_CODE = (
    "import sys; from powerbank.simulators.bench_stations import fleet_child_main; sys.exit(fleet_child_main(sys.argv[1:]))"
)
STATUS_EVERY_S = 1.0
TRACE_EVERY_S = 10.0
BACKEND_STOP_TIMEOUT_S = 90.0
LAG_LOAD_FRACTION = 0.5  # the lag is measured at this fraction of the embedded capacity
LAG_PHASE_WINDOW = 50  # outstanding events a station may have in the open-loop phase


@dataclass(frozen=True)
class BenchOptions:
    quick: bool = False
    stations: int = 10_000
    fleet_processes: int = 2
    connect_concurrency: int = 64  # per fleet process: logins in flight at once
    connect_timeout_s: float = 420.0
    heartbeat_interval_s: int = 30
    hold_s: float = 75.0
    event_stations: int = 100
    window: int = 4
    events_s: float = 20.0
    warmup_s: float = 3.0
    mosquitto_url: str = MOSQUITTO_URL
    skip_connected: bool = False
    skip_events: bool = False
    database: str = "sqlite"  # or "postgres": a throwaway database on the local server
    total_timeout_s: float = 1500.0


# A smoke run: every phase, small and short.
QUICK = dict(
    quick=True, stations=40, fleet_processes=1, connect_timeout_s=60.0, heartbeat_interval_s=2, hold_s=3.0,
    event_stations=10, window=2, events_s=2.0, warmup_s=0.5, total_timeout_s=150.0,
)


def parse_options(argv: list[str]) -> BenchOptions:
    parser = argparse.ArgumentParser(
        prog="powerbank bench stations",
        description="Simulated stations on the embedded default: how many stay connected, and slot events "
        "per second from PUBLISH to committed state on the embedded broker and on Mosquitto, same run. "
        "Figures on stderr, one JSON line last on stdout.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of every phase (well under a minute)")
    parser.add_argument("--stations", type=int, help="stations to connect (default 10000)")
    parser.add_argument("--fleet-processes", type=int, help="processes the simulated stations are spread over (default 2)")
    parser.add_argument("--connect-concurrency", type=int, help="logins in flight per fleet process (default 64)")
    parser.add_argument("--connect-timeout", dest="connect_timeout_s", type=float, help="give connecting this long (s)")
    parser.add_argument("--heartbeat", dest="heartbeat_interval_s", type=int, help="heartbeat interval told to stations (s, default 30)")
    parser.add_argument("--hold", dest="hold_s", type=float, help="seconds the connected fleet is held and watched")
    parser.add_argument("--event-stations", type=int, help="stations sending slot events in the event phases")
    parser.add_argument("--window", type=int, help="slot events per station waiting for their ack")
    parser.add_argument("--events-duration", dest="events_s", type=float, help="seconds of slot events per broker")
    parser.add_argument("--warmup", dest="warmup_s", type=float, help="seconds of events before the measured window")
    parser.add_argument("--mosquitto-url", help=f"the external broker (default {MOSQUITTO_URL})")
    parser.add_argument("--skip-connected", action="store_true", help="only the event phases")
    parser.add_argument("--skip-events", action="store_true", help="only the connected phase")
    parser.add_argument("--database", choices=("sqlite", "postgres"),
                        help="sqlite (the embedded default) or a throwaway database on the local PostgreSQL")
    parser.add_argument("--timeout", dest="total_timeout_s", type=float, help="give up after this many seconds")
    args = vars(parser.parse_args(argv))
    values = dict(QUICK) if args.pop("quick") else {}
    values.update({key: value for key, value in args.items() if value not in (None, False)})
    options = BenchOptions(**values)
    for host in (options.mosquitto_url.split("://", 1)[-1].split("@")[-1].split(":")[0],):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("bench stations sends traffic to 127.0.0.1 only")
    return options


# --- process facts -------------------------------------------------------------------------------


def rss_kb(pid: int | str = "self") -> int:
    """Resident memory of a process in KiB (Linux /proc), 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (Linux /proc), 0 if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_open_files_limit() -> int:
    """Every station is a socket at each end: allow as many descriptors as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the fleet child ---------------------------------------------------------------------------


def fleet_child_main(argv: list[str]) -> int:
    """A fleet process: `SPEC_FILE`. Status lines (JSON) on stdout; commands on stdin."""
    raise_open_files_limit()
    from powerbank.processes import tune_gc

    tune_gc()  # thousands of simulated stations are as many long-lived objects as the backend's
    return asyncio.run(_fleet_child(json.loads(Path(argv[0]).read_text())))


async def _fleet_child(spec: dict[str, Any]) -> int:
    from powerbank.broker.protocol import Topics
    from powerbank.simulators.stations import FaultKnobs, Fleet, StationSpec

    specs = [
        StationSpec(serial=s, password=p, station_id=i, latitude=0.0, longitude=0.0, slot_count=n,
                    banks={int(k): tuple(v) for k, v in banks.items()})
        for s, p, i, n, banks in spec["stations"]
    ]
    # Banks do not charge (no battery reports): the load is heartbeats, and in the event
    # phases only the events being measured.
    knobs = FaultKnobs(charge_percent_per_minute=0, charge_tick_s=3600, resend_after_s=spec["resend_after_s"],
                       reconnect_delay_s=1.0)
    fleet = Fleet(specs, spec["broker_url"], topics=Topics(spec["topic_root"]), knobs=knobs,
                  heartbeat_interval_s=spec["heartbeat_interval_s"], keep_alive_s=spec["keep_alive_s"])
    child = FleetChild(fleet, spec["connect_concurrency"])
    reporter = asyncio.create_task(child.report_forever())
    starter = asyncio.create_task(child.start_all())
    try:
        await child.obey_commands()
    finally:
        for task in (reporter, starter):
            task.cancel()
        await asyncio.gather(reporter, starter, return_exceptions=True)
        await fleet.stop()
    _say({"type": "stopped"})
    return 0


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class FleetChild:
    """Starts its stations a few at a time, reports, and runs the event bursts it is asked for."""

    def __init__(self, fleet, connect_concurrency: int) -> None:
        self.fleet = fleet
        self.connect_concurrency = connect_concurrency
        self.stations = list(fleet)
        self.started_at = time.monotonic()

    async def start_all(self) -> None:
        gate = asyncio.Semaphore(self.connect_concurrency)

        async def start_one(station) -> None:
            async with gate:
                await station.start(wait_s=None)
                try:  # hold the gate until this login is through (or clearly stuck)
                    await asyncio.wait_for(station._connected.wait(), 30)
                except TimeoutError:
                    pass

        await asyncio.gather(*(start_one(s) for s in self.stations))

    def status(self) -> dict[str, Any]:
        stats = self.fleet.stats()
        return {
            "type": "status", "stations": stats.stations, "connected": stats.connected,
            "booted": sum(1 for s in self.stations if s.config is not None), "events": stats.events,
            "published": stats.published, "unacked": stats.unacked, "reconnects": stats.reconnects,
            "rss_kb": rss_kb(), "cpu_s": cpu_s(),
        }

    async def report_forever(self) -> None:
        while True:
            _say(self.status())
            await asyncio.sleep(STATUS_EVERY_S)

    async def obey_commands(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "stop":
                return
            command = json.loads(line)
            if command["cmd"] == "burst":
                published = await self.burst(
                    command["stations"], command["window"], command["duration_s"], command.get("rate_per_station")
                )
                _say({"type": "burst", "published": published})
            elif command["cmd"] == "settle":
                await asyncio.gather(*(s.wait_acked(command["timeout_s"]) for s in self.stations[: command["stations"]]),
                                     return_exceptions=True)
                _say({**self.status(), "type": "settled"})

    async def burst(
        self, count: int, window: int, duration_s: float, rate_per_station: float | None = None
    ) -> dict[str, list[int]]:
        """Slot events from the first `count` stations for `duration_s`: each takes the bank
        in its first occupied slot out and puts it back, keeping up to `window` events
        waiting for an ack (closed loop: as fast as the backend takes them), or, with
        `rate_per_station`, at that pace (open loop: a set load; `window` still caps what
        is outstanding). Returns the seqs each station published."""
        until = time.monotonic() + duration_s
        published: dict[str, list[int]] = {}
        rng = random.Random(7)

        async def churn(station) -> None:
            slot = next(n for n, s in sorted(station.slots.items()) if s.bank)
            bank = station.slots[slot].bank
            seqs = published.setdefault(station.serial, [])
            next_at = time.monotonic() + (rng.uniform(0, 1 / rate_per_station) if rate_per_station else 0)
            while time.monotonic() < until:
                if rate_per_station:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at += rng.expovariate(rate_per_station)
                    if time.monotonic() >= until:
                        break
                await station.wait_for_room(window)
                seqs.append(station.seq + 1)  # the number the event below takes
                if station.slots[slot].bank:
                    await station.remove_bank(slot)
                else:
                    await station.insert_bank(bank, slot=slot, charge=80)

        await asyncio.gather(*(churn(s) for s in self.stations[:count]))
        return published


# --- the parent's side of a fleet process ---------------------------------------------------------


class FleetProcess:
    """One child process of simulated stations, as seen from the benchmark."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.status: dict[str, Any] = {}
        self.replies: asyncio.Queue = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, spec_path: Path, log_path: Path) -> "FleetProcess":
        with log_path.open("w") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FLEET_CHILD_CODE, str(spec_path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                limit=64 * 1024 * 1024,
            )
        return cls(process, log_path)

    async def _read(self) -> None:
        while True:
            line = await self.process.stdout.readline()
            if not line:
                return
            message = json.loads(line)
            if message["type"] == "status":
                self.status = message
            else:
                self.replies.put_nowait(message)

    async def ask(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()
        return await asyncio.wait_for(self.replies.get(), timeout_s)

    async def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.returncode is None:
            try:
                self.process.stdin.write(b"stop\n")
                await self.process.stdin.drain()
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except (TimeoutError, ConnectionError, BrokenPipeError):
                self.process.kill()
                await self.process.wait()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def fleet_totals(fleets: list[FleetProcess]) -> dict[str, float]:
    keys = ("stations", "connected", "booted", "events", "published", "unacked", "reconnects", "rss_kb", "cpu_s")
    return {key: sum(f.status.get(key, 0) for f in fleets) for key in keys}


# --- one backend -------------------------------------------------------------------------------


@dataclass
class Backend:
    """A `powerbank serve` backend in this process, on its own data directory."""

    handle: Any
    settings: Any
    broker_url: str  # what stations connect to (no credentials)
    topic_root: str


async def start_backend_for(work_dir: Path, broker: str, options: BenchOptions, database_url: str | None = None) -> Backend:
    from powerbank.config import Settings
    from powerbank.demo import free_port
    from powerbank.processes import ALL_ROLES, start_backend, tune_gc

    work_dir.mkdir(parents=True, exist_ok=True)
    topic_root = "pb" if broker == "embedded" else f"pbbench{uuid.uuid4().hex[:8]}"
    os.environ["MQTT_TOPIC_ROOT"] = topic_root  # the bridge and the Station actor read it
    mqtt_port = free_port()
    settings = Settings(
        database_url=database_url or f"sqlite+aiosqlite:///{work_dir / 'powerbank.sqlite3'}",
        redis_url=None,
        mqtt_url=None if broker == "embedded" else options.mosquitto_url,
        jwt_secret=secrets.token_urlsafe(32),
        data_dir=work_dir,
        http_port=free_port(),
        mqtt_port=mqtt_port,
        bridge_password=secrets.token_urlsafe(16),
        heartbeat_interval_s=options.heartbeat_interval_s,
    )
    handle = await start_backend(settings, ALL_ROLES, migrate_first=True)
    tune_gc()  # as `powerbank serve` does
    url = f"mqtt://127.0.0.1:{mqtt_port}" if broker == "embedded" else options.mosquitto_url
    return Backend(handle, settings, url, topic_root)


async def start_fleets(backend: Backend, specs, options: BenchOptions, work_dir: Path, processes: int) -> list[FleetProcess]:
    fleets = []
    for index in range(processes):
        share = specs[index::processes]
        spec = {
            "broker_url": backend.broker_url, "topic_root": backend.topic_root,
            "heartbeat_interval_s": options.heartbeat_interval_s, "keep_alive_s": max(60, 2 * options.heartbeat_interval_s),
            "connect_concurrency": options.connect_concurrency, "resend_after_s": 5.0,
            "stations": [[s.serial, s.password, s.station_id, s.slot_count, s.banks] for s in share],
        }
        spec_path = work_dir / f"fleet-{index}.json"
        spec_path.write_text(json.dumps(spec))
        fleets.append(await FleetProcess.start(spec_path, work_dir / f"fleet-{index}.log"))
    return fleets


async def online_stations(backend: Backend) -> int:
    from sqlalchemy import func, select

    from powerbank.storage.models import Station

    async def count() -> int:
        async with backend.handle.services.readonly() as db:
            return int(await db.scalar(select(func.count()).select_from(Station).where(Station.status == "online")) or 0)

    return await patiently(count)


async def patiently(read, attempts: int = 5, pause_s: float = 2.0):
    """The benchmark's own reads, retried: under the load it creates the backend's reader pool
    can run dry for a while, and a figure is worth waiting for."""
    for attempt in range(1, attempts + 1):
        try:
            return await read()
        except Exception:
            if attempt == attempts:
                raise
            await asyncio.sleep(pause_s)


# --- phases ------------------------------------------------------------------------------------


class Run:
    """One benchmark run: its phases and everything they started, released in `close`."""

    def __init__(self, options: BenchOptions, console) -> None:
        self.options = options
        self.console = console
        self.started = time.monotonic()
        self.work_dir = Path(tempfile.mkdtemp(prefix="powerbank-bench-stations-"))
        self.backend: Backend | None = None
        self.fleets: list[FleetProcess] = []
        self.failed = True
        self.databases: list[str] = []  # PostgreSQL databases to drop at the end
        # [phase, s since start, connected, booted, online in the backend, unacked, backend MiB]
        self.trace: list[list] = []

    def say(self, message: str) -> None:
        self.console.print(f"[dim]bench {time.monotonic() - self.started:6.1f}s:[/dim] {message}")

    async def execute(self) -> dict[str, Any]:
        options = self.options
        raise_open_files_limit()
        connected = {} if options.skip_connected else await self.connected_phase()
        embedded = mosquitto = NO_EVENTS
        if not options.skip_events:
            capacity = await self.events_phase("embedded")
            # The lag is read at a load both brokers can take: half the embedded capacity.
            lag_rate_per_s = max(1.0, LAG_LOAD_FRACTION * capacity["events_per_s"])
            mosquitto = await self.events_phase("mosquitto", lag_rate_per_s)
            embedded = {**capacity, **await self._lag_only("embedded", lag_rate_per_s)}
        summary = assemble_summary(options, connected, embedded, mosquitto, time.monotonic() - self.started)
        self.failed = summary["events_lost"] != 0
        return summary

    async def connected_phase(self) -> dict[str, Any]:
        options = self.options
        self.say(f"connected phase: {options.stations} stations, heartbeat {options.heartbeat_interval_s} s, "
                 f"{options.fleet_processes} fleet processes")
        backend = await self._start_backend("connected", "embedded")
        specs = await self._provision(backend, options.stations)
        rss_before_kb, cpu_before_s = rss_kb(), cpu_s()
        fleets = await self._start_fleets(backend, specs, options.fleet_processes)
        began = time.monotonic()
        all_connected_s = await self._watch(
            lambda t: t["connected"] >= options.stations, options.connect_timeout_s, "connecting", backend
        )
        all_booted_s = await self._watch(
            lambda t: t["booted"] >= options.stations, max(5.0, options.connect_timeout_s - (time.monotonic() - began)),
            "booting", backend,
        )
        connect_cpu_s = cpu_s() - cpu_before_s
        self.say(f"holding for {options.hold_s:g} s")
        hold_began_wall, hold_cpu_before = time.time(), cpu_s()
        hold_fleet_cpu_before = fleet_totals(fleets)["cpu_s"]
        await self._watch(lambda t: False, options.hold_s, "holding", backend)
        totals = fleet_totals(fleets)
        online = await online_stations(backend)
        backend_rss_kb = rss_kb()
        heartbeats = await heartbeat_figures(backend, hold_began_wall)
        result = {
            "stations_target": options.stations,
            "stations_connected": int(min(totals["connected"], online)),
            "simulators_connected": int(totals["connected"]),
            "backend_online": online,
            "connect_s": rounded(all_connected_s if all_connected_s is not None else -1, 1),
            "boot_s": rounded(all_booted_s if all_booted_s is not None else -1, 1),
            "connects_per_s": rounded(options.stations / all_connected_s, 1) if all_connected_s else 0.0,
            "connect_backend_cpu_s": rounded(connect_cpu_s, 1),
            "reconnects": int(totals["reconnects"]),
            "rss_kb_per_station": rounded((backend_rss_kb - rss_before_kb) / max(1, online), 1),
            "backend_rss_kb": backend_rss_kb,
            "sim_rss_kb_per_station": rounded(totals["rss_kb"] / max(1, totals["stations"]), 1),
            "hold_backend_cpu_percent": rounded(100 * (cpu_s() - hold_cpu_before) / options.hold_s, 1),
            "hold_fleet_cpu_percent": rounded(100 * (totals["cpu_s"] - hold_fleet_cpu_before) / options.hold_s, 1),
            **heartbeats,
            "trace_columns": ["phase", "s", "connected", "booted", "online", "unacked", "backend_mib"],
            "trace": [row for row in self.trace if row[0] in ("connecting", "booting", "holding")],
        }
        self.say(f"connected: {result['stations_connected']} of {options.stations} "
                 f"(simulators {result['simulators_connected']}, backend online {online}), "
                 f"{result['rss_kb_per_station']} KiB per station in the backend")
        await self._stop_all()
        return result

    async def events_phase(self, broker: str, lag_rate_per_s: float | None = None) -> dict[str, Any]:
        """Capacity (closed loop) and, when `lag_rate_per_s` is given, the lag at that offered
        load (open loop), on a fresh backend with `--event-stations` stations."""
        options = self.options
        self.say(f"events phase on {broker}: {options.event_stations} stations, window {options.window}, "
                 f"{options.warmup_s:g} s warm-up + {options.events_s:g} s")
        backend = await self._start_backend(f"events-{broker}", broker)
        specs = await self._provision(backend, options.event_stations)
        fleets = await self._start_fleets(backend, specs, 1)
        booted = await self._watch(lambda t: t["booted"] >= options.event_stations, 120, "booting", backend)
        if booted is None:
            raise RuntimeError(f"{broker}: the event stations did not all boot")
        figures = await self._burst(backend, fleets, None)
        self.say(f"{broker}: {figures['events_per_s']:g} events/s committed (closed loop, "
                 f"{options.window * options.event_stations} in flight), lost {figures['lost']}")
        if lag_rate_per_s:
            at_load = await self._burst(backend, fleets, lag_rate_per_s)
            figures["at_load"] = at_load
            self.say(f"{broker}: at {lag_rate_per_s:g} events/s offered, lag p50 {at_load['lag_ms']['p50']:g} ms, "
                     f"p99 {at_load['lag_ms']['p99']:g} ms")
        await self._stop_all()
        return figures

    async def _burst(self, backend: Backend, fleets: list[FleetProcess], rate_per_s: float | None) -> dict[str, Any]:
        options = self.options
        cpu_before, fleet_cpu_before = cpu_s(), fleet_totals(fleets)["cpu_s"]
        window_start = time.time() + options.warmup_s
        duration_s = options.warmup_s + options.events_s
        command = {"cmd": "burst", "stations": options.event_stations, "duration_s": duration_s,
                   "window": options.window if rate_per_s is None else LAG_PHASE_WINDOW,
                   "rate_per_station": rate_per_s / options.event_stations if rate_per_s else None}
        [reply] = await asyncio.gather(*(f.ask(command, timeout_s=duration_s + 120) for f in fleets))
        window_end = window_start + options.events_s
        backend_cpu_s = cpu_s() - cpu_before
        fleet_cpu_s = fleet_totals(fleets)["cpu_s"] - fleet_cpu_before
        await asyncio.gather(*(f.ask({"cmd": "settle", "stations": options.event_stations, "timeout_s": 120}, 150) for f in fleets))
        await backend.handle.services.runtime.wait_idle(timeout_s=120)
        figures = await event_figures(backend, reply["published"], window_start, window_end)
        figures["backend_cpu_percent"] = rounded(100 * backend_cpu_s / duration_s, 1)
        figures["fleet_cpu_percent"] = rounded(100 * fleet_cpu_s / duration_s, 1)
        if rate_per_s:
            figures["offered_per_s"] = rounded(rate_per_s, 1)
        return figures

    async def _lag_only(self, broker: str, rate_per_s: float) -> dict[str, Any]:
        """The embedded broker's lag at the offered load chosen after its capacity run."""
        options = self.options
        backend = await self._start_backend(f"lag-{broker}", broker)
        specs = await self._provision(backend, options.event_stations)
        fleets = await self._start_fleets(backend, specs, 1)
        if await self._watch(lambda t: t["booted"] >= options.event_stations, 120, "booting", backend) is None:
            raise RuntimeError(f"{broker}: the event stations did not all boot")
        at_load = await self._burst(backend, fleets, rate_per_s)
        self.say(f"{broker}: at {rate_per_s:g} events/s offered, lag p50 {at_load['lag_ms']['p50']:g} ms, "
                 f"p99 {at_load['lag_ms']['p99']:g} ms, lost {at_load['lost']}")
        await self._stop_all()
        return {"at_load": at_load}

    async def _start_backend(self, label: str, broker: str) -> Backend:
        database_url = None
        if self.options.database == "postgres":
            from powerbank.storage.testing import create_postgres_database

            name, database_url = await create_postgres_database("pb_bench_stations")
            self.databases.append(name)
        self.backend = await start_backend_for(self.work_dir / label, broker, self.options, database_url)
        return self.backend

    async def _provision(self, backend: Backend, count: int):
        from powerbank.simulators.stations import provision_fleet

        began = time.monotonic()
        # New serials per phase: on an external broker a station of the previous phase whose
        # close is not yet processed would share the client id, and lose or steal it.
        prefix = f"BENCH{secrets.token_hex(2).upper()}"
        specs = await provision_fleet(backend.handle.services.sessions, count, SLOTS_PER_STATION, BANKS_PER_STATION,
                                      serial_prefix=prefix, settings=backend.settings)
        self.say(f"provisioned {count} stations in {time.monotonic() - began:.1f} s")
        return specs

    async def _start_fleets(self, backend: Backend, specs, processes: int) -> list[FleetProcess]:
        self.fleets = await start_fleets(backend, specs, self.options, self.backend_dir(backend), processes)
        return self.fleets

    def backend_dir(self, backend: Backend) -> Path:
        return backend.settings.data_dir

    async def _watch(self, done, timeout_s: float, label: str, backend: Backend) -> float | None:
        """Show live figures until `done(totals)` or the timeout; seconds taken, or None. Every
        TRACE_EVERY_S a line also goes to the run's trace (kept in the summary), so a long run
        leaves a record of how it got where it did."""
        from rich.live import Live

        began = last_trace = time.monotonic()
        with Live(self._render(label, began, backend, 0), console=self.console, refresh_per_second=2, transient=True) as live:
            while True:
                dead = [f for f in self.fleets if f.process.returncode is not None]
                if dead:
                    raise RuntimeError(f"a fleet process exited:\n{dead[0].log_tail()}")
                totals = fleet_totals(self.fleets)
                if totals["stations"] and done(totals):
                    return time.monotonic() - began
                if time.monotonic() - began > timeout_s:
                    return None
                await asyncio.sleep(0.5)
                online = await online_stations(backend)
                live.update(self._render(label, began, backend, online))
                if time.monotonic() - last_trace >= TRACE_EVERY_S:
                    last_trace = time.monotonic()
                    self.trace.append([label, round(last_trace - self.started), int(totals["connected"]),
                                       int(totals["booted"]), online, int(totals["unacked"]), rss_kb() // 1024])

    def _render(self, label: str, began: float, backend: Backend, online: int):
        from rich.table import Table

        totals = fleet_totals(self.fleets)
        table = Table(title=f"bench stations: {label} ({time.monotonic() - began:.0f} s)")
        for column in ("stations", "connected", "booted", "online (db)", "events", "unacked", "reconnects",
                       "backend RSS MiB", "fleet RSS MiB"):
            table.add_column(column, justify="right")
        table.add_row(*(str(v) for v in (
            int(totals["stations"]), int(totals["connected"]), int(totals["booted"]), online, int(totals["events"]),
            int(totals["unacked"]), int(totals["reconnects"]), rss_kb() // 1024, int(totals["rss_kb"]) // 1024,
        )))
        return table

    async def _stop_all(self) -> None:
        await asyncio.gather(*(f.stop() for f in self.fleets), return_exceptions=True)
        self.fleets = []
        if self.backend is not None:
            backend, self.backend = self.backend, None
            try:
                await asyncio.wait_for(backend.handle.stop(), BACKEND_STOP_TIMEOUT_S)
            except TimeoutError:
                # A backlog of commands can keep it busy; the run's figures are taken already.
                self.say(f"[yellow]the backend did not stop within {BACKEND_STOP_TIMEOUT_S:g} s; going on[/yellow]")

    async def close(self) -> None:
        try:
            await self._stop_all()
        finally:
            if self.databases:
                from powerbank.storage.testing import drop_postgres_database

                for name in self.databases:
                    try:
                        await drop_postgres_database(name)
                    except Exception as error:  # noqa: BLE001 - reported, cleanup goes on
                        self.say(f"[yellow]could not drop database {name}: {error!r}[/yellow]")
            os.environ.pop("MQTT_TOPIC_ROOT", None)
            if self.failed:
                self.say(f"[yellow]logs kept in {self.work_dir}[/yellow]")
            else:
                shutil.rmtree(self.work_dir, ignore_errors=True)


# --- reading the database ------------------------------------------------------------------------


async def heartbeat_figures(backend: Backend, since_wall: float) -> dict[str, Any]:
    """Heartbeats applied since `since_wall`: how many per second, and their lag."""
    from sqlalchemy import select

    from powerbank.storage.models import ActorCommand

    since = _utc(since_wall)

    async def read():
        async with backend.handle.services.readonly() as db:
            return (await db.execute(
                select(ActorCommand.payload, ActorCommand.applied_at)
                .where(ActorCommand.name == "Heartbeat", ActorCommand.applied_at >= since)
            )).all()

    rows = await patiently(read)
    lags_s = [applied.timestamp() - payload["ts"] / 1000 for payload, applied in rows]
    span_s = max(1e-9, time.time() - since_wall)
    return {
        "heartbeats_per_s": rounded(len(rows) / span_s, 1),
        "heartbeat_lag_ms": latency_summary_ms(lags_s),
    }


async def event_figures(backend: Backend, published: dict[str, list[int]], window_start: float, window_end: float) -> dict[str, Any]:
    """Throughput and lag of the slot events, from their commands' commit times, and the
    events published that the database does not have."""
    from sqlalchemy import select

    from powerbank.storage.models import ActorCommand, Station, StationEvent

    async def read():
        async with backend.handle.services.readonly() as db:
            commands = (await db.execute(
                select(ActorCommand.payload, ActorCommand.applied_at, ActorCommand.status)
                .where(ActorCommand.name.in_(("BankInserted", "BankRemoved")))
            )).all()
            events = set((await db.execute(
                select(Station.serial, StationEvent.seq).join(Station, Station.id == StationEvent.station_id)
                .where(StationEvent.kind.in_(("bank_inserted", "bank_removed")))
            )).all())
        return commands, events

    rows, recorded = await patiently(read)
    in_window = [
        applied.timestamp() - payload["ts"] / 1000
        for payload, applied, status in rows
        if status == "applied" and applied is not None and window_start <= applied.timestamp() <= window_end
    ]
    sent = {(serial, seq) for serial, seqs in published.items() for seq in seqs}
    return {
        "events_per_s": rounded(len(in_window) / (window_end - window_start), 1),
        "events_in_window": len(in_window),
        "published": len(sent),
        "lost": len(sent - recorded),
        "not_applied": sum(1 for _, _, status in rows if status != "applied"),
        "lag_ms": latency_summary_ms(in_window),
    }


def _utc(epoch_s: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch_s, tz=timezone.utc)


NO_EVENTS = {"events_per_s": 0.0, "events_in_window": 0, "published": 0, "lost": 0, "not_applied": 0,
             "lag_ms": latency_summary_ms([]), "backend_cpu_percent": 0.0, "fleet_cpu_percent": 0.0}


# --- the summary ---------------------------------------------------------------------------------


def assemble_summary(
    options: BenchOptions, connected: dict[str, Any], embedded: dict[str, Any], mosquitto: dict[str, Any], elapsed_s: float
) -> dict[str, Any]:
    """The final line: headline figures first-class, the rest under `phases`."""
    summary: dict[str, Any] = {
        "stations_connected": connected.get("stations_connected", 0),
        "stations_target": options.stations if connected else 0,
        "rss_kb_per_station": connected.get("rss_kb_per_station", 0.0),
        "events_per_s_embedded": embedded["events_per_s"],
        "events_per_s_mosquitto": mosquitto["events_per_s"],
        "embedded_vs_mosquitto": ratio(embedded["events_per_s"], mosquitto["events_per_s"]),
        "event_lag_p99_ms": embedded.get("at_load", embedded)["lag_ms"]["p99"],
        "event_lag_p99_ms_mosquitto": mosquitto.get("at_load", mosquitto)["lag_ms"]["p99"],
        "event_lag_load_per_s": embedded.get("at_load", {}).get("offered_per_s", 0.0),
        "events_lost": sum(phase["lost"] for phase in _bursts(embedded, mosquitto)),
        "events_published": sum(phase["published"] for phase in _bursts(embedded, mosquitto)),
        "quick": options.quick,
        "options": dataclasses.asdict(options),
        "phases": {"connected": connected, "events_embedded": embedded, "events_mosquitto": mosquitto},
        "environment": {"cpu_count": os.cpu_count(), **_source_revision()},
        "elapsed_s": rounded(elapsed_s, 1),
    }
    summary["goals"] = {
        f"{key} {op} {goal:g}": _meets(summary[key], op, goal) for key, (op, goal) in GOALS.items() if key in summary
    }
    return summary


def _bursts(*phases: dict[str, Any]) -> list[dict[str, Any]]:
    """Every burst's figures: each phase's closed loop and its run at a set load, if any."""
    return [burst for phase in phases for burst in (phase, phase.get("at_load")) if burst]


def _meets(value: float, op: str, goal: float) -> bool:
    return {">=": value >= goal, "<=": value <= goal, "==": value == goal}[op]


def _source_revision() -> dict[str, Any]:
    from powerbank.simulators.bench_actors import source_revision

    return source_revision()


def print_report(console, summary: dict[str, Any]) -> None:
    from rich.table import Table

    if "error" in summary:
        console.print(f"[red]benchmark failed:[/red] {summary['error']}")
        return
    table = Table(title="powerbank bench stations")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("goal")
    goals = {key.split(" ")[0]: (key, met) for key, met in summary["goals"].items()}
    for key in ("stations_connected", "rss_kb_per_station", "events_per_s_embedded", "events_per_s_mosquitto",
                "embedded_vs_mosquitto", "event_lag_load_per_s", "event_lag_p99_ms", "event_lag_p99_ms_mosquitto",
                "events_lost"):
        goal = ""
        if key in goals:
            text_goal, met = goals[key]
            goal = f"[{'green' if met else 'red'}]{text_goal.split(' ', 1)[1]} {'met' if met else 'not met'}[/]"
        table.add_row(key, f"{summary[key]:g}", goal)
    console.print(table)
    connected = summary["phases"]["connected"]
    if connected:
        console.print(
            f"connect: {connected['connect_s']:g} s to connect, {connected['boot_s']:g} s to boot "
            f"({connected['connects_per_s']:g}/s, backend CPU {connected['connect_backend_cpu_s']:g} s); hold: "
            f"{connected['heartbeats_per_s']:g} heartbeats/s, lag p99 {connected['heartbeat_lag_ms']['p99']:g} ms, "
            f"backend CPU {connected['hold_backend_cpu_percent']:g} %, fleet CPU {connected['hold_fleet_cpu_percent']:g} %, "
            f"simulator {connected['sim_rss_kb_per_station']:g} KiB per station"
        )
    for phase in ("events_embedded", "events_mosquitto"):
        data = summary["phases"][phase]
        console.print(f"{phase}, closed loop: {data['events_in_window']} events in the window, lag (ms) {data['lag_ms']}, "
                      f"backend CPU {data['backend_cpu_percent']:g} %, fleet CPU {data['fleet_cpu_percent']:g} %")
        at_load = data.get("at_load")
        if at_load:
            console.print(f"{phase}, {at_load['offered_per_s']:g}/s offered: {at_load['events_per_s']:g}/s committed, "
                          f"lag (ms) {at_load['lag_ms']}, backend CPU {at_load['backend_cpu_percent']:g} %")


async def run_benchmark(options: BenchOptions, console) -> dict[str, Any]:
    run = Run(options, console)
    try:
        return await asyncio.wait_for(run.execute(), options.total_timeout_s)
    finally:
        await run.close()


def main(argv: list[str]) -> int:
    """`powerbank bench stations [options]`: figures on stderr, the JSON line last on stdout."""
    from rich.console import Console

    options = parse_options(argv)
    console = Console(stderr=True, soft_wrap=True)
    # Taking a bank out without an eject is logged as a discrepancy: expected here, thousands of times.
    logging.getLogger("powerbank.actors.station").setLevel(logging.ERROR)
    code = 1
    try:
        summary = asyncio.run(run_benchmark(options, console))
        code = 0 if summary["events_lost"] == 0 else 1
    except KeyboardInterrupt:
        summary, code = {"error": "interrupted"}, 130
    except Exception as error:  # noqa: BLE001 - a benchmark reports its failure as its result
        console.print_exception()
        summary = {"error": repr(error)}
    print_report(console, summary)
    print(json_line(summary), flush=True)
    return code

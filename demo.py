"""`powerbank demo` and `powerbank simulate`: the backend with a simulated fleet and riders.

The demo runs everything in this process on the embedded default (a fresh SQLite file, the
in-process queue, the embedded MQTT broker on a free port); stations are real MQTT clients and
riders real HTTP and websocket clients. At the end it stops new rentals, lets riders return what
they hold, waits for every rental to settle, audits the invariants and prints one JSON line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from powerbank.config import load_settings
from powerbank.processes import wait_for_stop
from powerbank.storage.audit import audit
from powerbank.storage.models import Rental, StationEvent, Transaction

SETTLE_TIMEOUT_S = 60.0


@dataclass
class FaultOptions:
    """Faults for the simulated fleet (all off by default); see simulators.stations.FaultKnobs
    and ChaosPlan."""

    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    eject_failure_rate: float = 0.0
    jam_rate: float = 0.0
    clock_skew_spread_ms: int = 0
    storm_every_s: float = 0.0
    storm_fraction: float = 0.2
    power_cut_every_s: float = 0.0

    def knobs(self):
        from powerbank.simulators.stations import FaultKnobs

        return FaultKnobs(
            drop_rate=self.drop_rate, duplicate_rate=self.duplicate_rate, reorder_rate=self.reorder_rate,
            eject_failure_rate=self.eject_failure_rate, jam_rate=self.jam_rate,
        )

    def chaos(self):
        from powerbank.simulators.stations import ChaosPlan

        if self.storm_every_s <= 0 and self.power_cut_every_s <= 0:
            return None
        return ChaosPlan(storm_every_s=self.storm_every_s, storm_fraction=self.storm_fraction,
                         power_cut_every_s=self.power_cut_every_s)


@dataclass
class DemoOptions:
    stations: int = 20
    slots: int = 8
    riders: int = 50
    duration_s: float | None = None
    http_port: int = 0
    progress: bool = True
    banks_per_station: int | None = None
    faults: FaultOptions = dataclasses.field(default_factory=FaultOptions)
    # A fresh installation each run, under the data dir (POWERBANK_DATA_DIR, default var/).
    data_dir: Path = dataclasses.field(default_factory=lambda: Path(os.environ.get("POWERBANK_DATA_DIR") or "var") / "demo")


@dataclass
class SimulateOptions:
    base_url: str
    stations: int
    slots: int
    riders: int
    duration_s: float
    admin_phone: str
    faults: FaultOptions = dataclasses.field(default_factory=FaultOptions)


def say(message: str) -> None:
    """A progress note on stderr (stdout is kept for the final JSON line)."""
    print(f"powerbank: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo_settings(options: DemoOptions):
    """A fresh embedded installation under the demo's data dir, on free ports."""
    shutil.rmtree(options.data_dir, ignore_errors=True)
    options.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["POWERBANK_OTP_ECHO"] = "1"  # riders read their login code from the response
    os.environ.setdefault("OTP_RATE_PER_IP", "100000")
    base = load_settings()
    return dataclasses.replace(
        base,
        database_url=f"sqlite+aiosqlite:///{options.data_dir / 'powerbank.sqlite3'}",
        redis_url=None,
        mqtt_url=None,
        data_dir=options.data_dir,
        http_port=options.http_port or free_port(),
        mqtt_port=free_port(),
    )


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def run_demo(options: DemoOptions) -> dict[str, Any]:
    from powerbank.processes import ALL_ROLES, start_backend

    emulator = await asyncio.to_thread(start_stripe_emulator)
    settings = dataclasses.replace(
        demo_settings(options), stripe_secret_key=emulator.api_key, stripe_webhook_secret=DEMO_WEBHOOK_SECRET,
        stripe_api_base=emulator.api_base,
    )
    say(f"starting the backend (SQLite in {options.data_dir}, embedded MQTT on :{settings.mqtt_port}, HTTP on :{settings.http_port}, "
        f"Stripe emulator on {emulator.api_base})")
    try:
        backend = await start_backend(settings, ALL_ROLES, migrate_first=True)
    except BaseException:
        await asyncio.to_thread(emulator.stop)
        raise
    emulator.add_webhook_endpoint(f"{backend.base_url}/api/payment/webhook/stripe", DEMO_WEBHOOK_SECRET)
    try:
        world = await _start_world(backend, options)
        try:
            async with LiveProgress(world, options.progress):
                await wait_for_stop(options.duration_s)
            say("no new rentals; riders return their banks; waiting for every rental to settle")
            await world.finish()
        finally:
            await world.stop()
        await backend.services.runtime.wait_idle(SETTLE_TIMEOUT_S)
        await emulator.wait_for_deliveries_async(SETTLE_TIMEOUT_S)
        summary = await _summarise(backend, world)
    finally:
        await backend.stop()
        await asyncio.to_thread(emulator.stop)
    print(json.dumps(summary), flush=True)
    return summary


DEMO_WEBHOOK_SECRET = "whsec_powerbank_demo"


def start_stripe_emulator():
    """The local Stripe: riders top up with test cards through the real SDK, and the backend
    gets signed webhooks, as it would from Stripe."""
    from powerbank.simulators.stripe_emulator import StripeEmulator

    return StripeEmulator(host="127.0.0.1").start()


class World:
    """The simulated fleet and riders around one backend, and the fleet's scheduled faults."""

    def __init__(self, fleet, crowd, started_at: float, chaos=None) -> None:
        self.fleet = fleet
        self.crowd = crowd
        self.started_at = started_at
        self.chaos_task = asyncio.get_running_loop().create_task(fleet.run_chaos(chaos)) if chaos else None

    async def finish(self) -> None:
        """No new rentals, no new faults; riders return what they hold; wait until nothing is
        in flight."""
        await self._stop_chaos()
        await self.crowd.finish(timeout_s=SETTLE_TIMEOUT_S)

    async def stop(self) -> None:
        await self._stop_chaos()
        await self.crowd.stop()
        await self.fleet.stop()

    async def _stop_chaos(self) -> None:
        if self.chaos_task is not None:
            self.chaos_task.cancel()
            await asyncio.gather(self.chaos_task, return_exceptions=True)
            self.chaos_task = None


async def _start_world(backend, options: DemoOptions) -> World:
    from powerbank.simulators.riders import RiderCrowd
    from powerbank.simulators.stations import Fleet, provision_fleet

    settings = backend.settings
    banks = options.banks_per_station or max(1, options.slots * 3 // 4)
    say(f"provisioning and booting {options.stations} stations × {options.slots} slots ({banks} banks each)")
    specs = await provision_fleet(backend.services.sessions, options.stations, options.slots, banks, settings=settings)
    fleet = Fleet(specs, f"mqtt://{settings.mqtt_host}:{settings.mqtt_port}", heartbeat_interval_s=settings.heartbeat_interval_s,
                  knobs=options.faults.knobs(), skew_spread_ms=options.faults.clock_skew_spread_ms)
    await fleet.start()
    admin_token = await _admin_token(backend)
    say(f"signing in {options.riders} riders and topping up their wallets by card")
    crowd = RiderCrowd(backend.base_url, options.riders, return_bank=bank_returner(fleet), admin_token=admin_token,
                       card_top_ups=bool(settings.stripe_secret_key))
    await crowd.start()
    return World(fleet, crowd, time.monotonic(), options.faults.chaos())


def bank_returner(fleet):
    """A rider hands a bank back by pushing it into a free slot of that simulated station."""

    async def return_bank(bank_serial: str, station_serial: str) -> bool:
        station = fleet.station(station_serial)
        if not station.connected or not station.free_slots:
            return False
        await station.insert_bank(bank_serial)
        return True

    return return_bank


def events_emitted(fleet) -> int:
    """Station events sent so far: each station numbers its events from 1."""
    return sum(station.seq for station in fleet)


async def _admin_token(backend) -> str:
    from powerbank.http.auth import ensure_admin_token

    return await ensure_admin_token(backend.services, phone="+9779800000000")


class LiveProgress:
    """A live line on the terminal: rentals, events per second, start latency."""

    def __init__(self, world: World, enabled: bool, title: str = "powerbank demo") -> None:
        self.world = world
        self.enabled = enabled
        self.title = title
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        if self.enabled:
            self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc):
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        from rich.console import Console
        from rich.live import Live

        # Progress goes to stderr: stdout carries only the final JSON line, for scripts.
        console = Console(stderr=True)
        try:
            with Live(self._render(), console=console, refresh_per_second=4, transient=False) as live:
                while True:
                    await asyncio.sleep(0.5)
                    live.update(self._render())
        finally:
            console.line()

    def _render(self):
        from rich.console import Group
        from rich.table import Table

        stats = self.world.crowd.stats
        elapsed = max(0.001, time.monotonic() - self.world.started_at)
        table = Table(title=f"{self.title} — {elapsed:.0f}s (Ctrl-C to stop)")
        for column in ("active", "started", "completed", "refused", "events/s", "start p50 ms", "start p99 ms"):
            table.add_column(column, justify="right")
        latencies = stats.start_latencies_ms
        table.add_row(
            str(stats.started - stats.completed),
            str(stats.started),
            str(stats.completed),
            str(sum(stats.refusals.values())),
            f"{events_emitted(self.world.fleet) / elapsed:.1f}",
            f"{percentile(latencies, 0.5):.0f}",
            f"{percentile(latencies, 0.99):.0f}",
        )
        fleet = self.world.fleet.stats()
        stations = Table(title="stations")
        for column in ("connected", "powered off", "events", "published", "waiting for ack", "reconnects",
                       "storms", "power cuts", "errors"):
            stations.add_column(column, justify="right")
        stations.add_row(
            f"{fleet.connected}/{fleet.stations}", str(fleet.powered_off), str(fleet.events), str(fleet.published),
            str(fleet.unacked), str(fleet.reconnects), str(self.world.fleet.storms), str(self.world.fleet.power_cuts),
            str(fleet.errors),
        )
        return Group(table, stations)


async def _summarise(backend, world: World) -> dict[str, Any]:
    stats = world.crowd.stats
    sessions = backend.services.sessions
    violations = await audit(sessions)
    async with sessions() as session:
        completed = await session.scalar(select(func.count()).select_from(Rental).where(Rental.status == "completed"))
        started = await session.scalar(select(func.count()).select_from(Rental).where(Rental.started_at.is_not(None)))
        events = await session.scalar(select(func.count()).select_from(StationEvent))
        top_ups = (await session.execute(
            select(func.count(), func.coalesce(func.sum(Transaction.amount_minor), 0)).where(Transaction.type == "topup")
        )).one()
    latencies = stats.start_latencies_ms
    return {
        "rentals_started": int(started or 0),
        "rentals_completed": int(completed or 0),
        "rentals_refused": dict(stats.refusals),
        "start_latency_p50_ms": round(percentile(latencies, 0.5), 1),
        "start_latency_p99_ms": round(percentile(latencies, 0.99), 1),
        "start_latency_mean_ms": round(statistics.fmean(latencies), 1) if latencies else 0.0,
        "station_events": int(events or 0),
        "card_top_ups": int(top_ups[0]),
        "card_top_ups_minor": int(top_ups[1]),
        "invariant_violations": sum(len(v) for v in violations.values()),
        "violations_by_kind": {kind: len(v) for kind, v in violations.items()},
        "violation_examples": [example for v in violations.values() for example in v[:3]],
        "duration_s": round(time.monotonic() - world.started_at, 1),
    }


async def run_simulation(options: SimulateOptions) -> dict[str, Any]:
    """Drive an already running deployment (README: scale out): provision the simulated
    stations in its database, connect them to its MQTT broker, and run riders on its HTTP API.
    Prints the riders' figures as one JSON line."""
    from powerbank.http.auth import ensure_admin_token
    from powerbank.services import build_services
    from powerbank.simulators.riders import RiderCrowd
    from powerbank.simulators.stations import Fleet, provision_fleet

    settings = load_settings()
    services = build_services(settings)
    try:
        banks = max(1, options.slots * 3 // 4)
        specs = await provision_fleet(services.sessions, options.stations, options.slots, banks, settings=settings)
        broker_url = settings.mqtt_url or f"mqtt://{settings.mqtt_host}:{settings.mqtt_port}"
        fleet = Fleet(specs, broker_url, heartbeat_interval_s=settings.heartbeat_interval_s,
                      knobs=options.faults.knobs(), skew_spread_ms=options.faults.clock_skew_spread_ms)
        await fleet.start()
        admin_token = await ensure_admin_token(services, phone=options.admin_phone)
        crowd = RiderCrowd(options.base_url, options.riders, return_bank=bank_returner(fleet), admin_token=admin_token)
        world = World(fleet, crowd, time.monotonic(), options.faults.chaos())
        try:
            await crowd.start()
            async with LiveProgress(world, True):
                await wait_for_stop(options.duration_s)
            await world.finish()
        finally:
            await world.stop()
    finally:
        await services.close()
    fleet_stats = fleet.stats()
    summary = {
        **crowd.stats.summary(), "station_events_sent": events_emitted(fleet), "station_publishes": fleet_stats.published,
        "station_reconnects": fleet_stats.reconnects, "storms": fleet.storms, "power_cuts": fleet.power_cuts,
    }
    print(json.dumps(summary), flush=True)
    return summary

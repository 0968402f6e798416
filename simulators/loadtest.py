"""`powerbank loadtest`: a deployment under a simulated fleet and riders, then an audit.

The run: start (or attach to) a deployment, provision and connect `--stations` simulated
stations, let `--riders` riders rent and return for `--duration` seconds while a sampler records
a timeline once a second (rentals completed, start latency, mailbox depths, stations online,
event lag), then stop new rentals, let riders hand back what they hold, wait until nothing is in
flight, and audit: the database's own invariants (storage/audit.py) and what the riders and
stations saw against what the database says (`audit_observations`). Writes a Markdown report with
PNG plots and ends with one JSON line; exits 1 on any invariant violation, never on speed.

Start latency is from the rider's request to the rental being active (bank out), as the rider
sees it. The simulated hardware's eject time is zero unless `--eject-delay-ms` says otherwise,
so it is excluded by construction from the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from powerbank.demo import FaultOptions, LiveProgress, World, bank_returner, percentile, say
from powerbank.simulators.bench import json_line, rounded
from powerbank.simulators.deployment import KINDS, Deployment, DeploymentFailed, DeploymentOptions

SAMPLE_INTERVAL_S = 1.0
LATENCY_WINDOW_S = 5.0  # the timeline's percentiles are over the last few seconds, not one
SETTLE_TIMEOUT_S = 120.0
ADMIN_PHONE = "+9779800000001"


@dataclass
class LoadtestOptions:
    stations: int = 200
    slots: int = 8
    riders: int = 100
    duration_s: float = 60.0
    warmup_s: float | None = None  # default: a fifth of the duration, at most 10 s
    deployment: DeploymentOptions = field(default_factory=DeploymentOptions)
    faults: FaultOptions = field(default_factory=FaultOptions)
    eject_delay_ms: tuple[int, int] = (0, 0)
    hold_s: tuple[float, float] = (0.5, 2.0)
    think_s: tuple[float, float] = (0.1, 1.0)
    report_dir: Path | None = None
    progress: bool = True
    seed: int = 0

    @property
    def measured_from_s(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(10.0, self.duration_s / 5)


@dataclass
class Sample:
    """One second of the run, as the timeline and the plots show it."""

    t_s: float
    started: int
    completed: int
    start_p50_ms: float
    start_p99_ms: float
    mailboxes: dict[str, int]
    oldest_pending_s: float
    stations_online: int
    fleet_connected: int
    event_lag_p50_ms: float
    event_lag_p99_ms: float


class Sampler:
    """Reads the riders', the fleet's and the database's figures once a second."""

    def __init__(self, world: World, sessions, started_at: float) -> None:
        self.world = world
        self.sessions = sessions
        self.started_at = started_at
        self.samples: list[Sample] = []
        self.errors = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            try:
                self.samples.append(await self.sample())
            except Exception:  # a slow or busy database must not end the run; the gap shows
                self.errors += 1

    async def sample(self) -> Sample:
        from powerbank.actors.metrics import sample_mailboxes

        now = time.monotonic()
        stats = self.world.crowd.stats
        recent = [ms for at, ms in stats.activations if at > now - LATENCY_WINDOW_S]
        lags = [lag * 1000 for at, lag in event_lags(self.world.fleet) if at > now - LATENCY_WINDOW_S]
        mailboxes = await sample_mailboxes(self.sessions)
        return Sample(
            t_s=round(now - self.started_at, 2), started=stats.started, completed=stats.completed,
            start_p50_ms=percentile(recent, 0.5), start_p99_ms=percentile(recent, 0.99),
            mailboxes={kind: depth for kind, (depth, _) in mailboxes.items()},
            oldest_pending_s=max((age for _, age in mailboxes.values()), default=0.0),
            stations_online=await stations_online(self.sessions), fleet_connected=self.world.fleet.stats().connected,
            event_lag_p50_ms=percentile(lags, 0.5), event_lag_p99_ms=percentile(lags, 0.99),
        )


def event_lags(fleet) -> list[tuple[float, float]]:
    """(when acknowledged, seconds from publish to acknowledgement) of every station's events."""
    return [entry for station in fleet for entry in station.ack_lags]


async def stations_online(sessions) -> int:
    from sqlalchemy import func, select

    from powerbank.storage.models import Station

    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Station).where(Station.status == "online")) or 0)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class LoadtestRun:
    """A finished run: its summary (the JSON line), what the riders saw, and where its data is
    (still there after the run only with `keep`)."""

    summary: dict[str, Any]
    observed: Any  # storage.audit.Observations
    database_url: str


async def run_loadtest(options: LoadtestOptions) -> LoadtestRun:
    deployment = Deployment(options.deployment)
    say(f"starting the {options.deployment.kind} deployment")
    await deployment.start()
    try:
        say(f"deployment up at {deployment.base_url} (MQTT {deployment.mqtt_url})")
        return await _drive(deployment, options)
    finally:
        await deployment.stop()
        if options.deployment.keep:
            say(f"kept: {deployment.work_dir} (database {deployment.env.get('DATABASE_URL')})")


async def _drive(deployment: Deployment, options: LoadtestOptions) -> LoadtestRun:
    from powerbank.services import build_services

    services = build_services(_settings_of(deployment))
    try:
        world = await _start_world(deployment, services, options)
        try:
            timeline, load = await _load_phase(deployment, world, services.sessions, options)
            say("no new rentals; riders return their banks; waiting for every rental to settle")
            await world.finish()
        finally:
            await world.stop()
        await settle(services.sessions, SETTLE_TIMEOUT_S)
        observed = observations(world.crowd.stats)
        violations = await _audit(services.sessions, observed)
    finally:
        await services.close()
    summary = summarise(options, deployment, world, timeline, load, violations)
    if options.report_dir is not None:
        from powerbank.simulators.load_report import write_report

        summary["report"] = str(write_report(options.report_dir, summary, timeline, violations))
    return LoadtestRun(summary, observed, deployment.env["DATABASE_URL"])


def _settings_of(deployment: Deployment):
    """This process's view of the deployment: its database, its secrets; no bus of its own."""
    from powerbank.config import load_settings

    with _environ(deployment.env):
        return dataclasses.replace(load_settings(), redis_url=None)


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def _start_world(deployment: Deployment, services, options: LoadtestOptions) -> World:
    from powerbank.http.auth import ensure_admin_token
    from powerbank.simulators.riders import RiderCrowd
    from powerbank.simulators.stations import Fleet, provision_fleet

    settings = services.settings
    banks = max(1, options.slots * 3 // 4)
    say(f"provisioning {options.stations} stations × {options.slots} slots ({banks} banks each)")
    specs = await provision_fleet(services.sessions, options.stations, options.slots, banks, settings=settings,
                                  serial_prefix="LOAD", seed=options.seed)
    knobs = dataclasses.replace(options.faults.knobs(), eject_delay_ms=options.eject_delay_ms)
    fleet = Fleet(specs, deployment.mqtt_url, heartbeat_interval_s=settings.heartbeat_interval_s, knobs=knobs,
                  skew_spread_ms=options.faults.clock_skew_spread_ms, seed=options.seed)
    say("connecting the fleet")
    await fleet.start(wait_s=120.0)
    admin_token = await ensure_admin_token(services, phone=ADMIN_PHONE)
    say(f"signing in {options.riders} riders")
    crowd = RiderCrowd(deployment.base_url, options.riders, return_bank=bank_returner(fleet), admin_token=admin_token,
                       hold_s=options.hold_s, think_s=options.think_s, seed=options.seed)
    await crowd.start()
    return World(fleet, crowd, time.monotonic(), options.faults.chaos())


@dataclass
class LoadWindow:
    """The measured part of the load phase, in the crowd's monotonic clock, and the CPU each
    process used during it (the load generator's own included: it shares the machine)."""

    started_at: float
    measured_from: float
    ended_at: float
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def measured_s(self) -> float:
        return max(0.001, self.ended_at - self.measured_from)


async def _load_phase(deployment: Deployment, world: World, sessions, options: LoadtestOptions) -> tuple[list[Sample], LoadWindow]:
    sampler = Sampler(world, sessions, world.started_at)
    cpu_before = {**deployment.cpu_s(), "load generator": time.process_time()}
    task = asyncio.get_running_loop().create_task(sampler.run())
    try:
        async with LiveProgress(world, options.progress, title="powerbank loadtest"):
            deadline = world.started_at + options.duration_s
            while time.monotonic() < deadline:
                deployment.check_alive()
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ended_at = time.monotonic()
    cpu_after = {**deployment.cpu_s(), "load generator": time.process_time()}
    cpu_s = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 1) for name in cpu_after}
    return sampler.samples, LoadWindow(world.started_at, world.started_at + options.measured_from_s, ended_at, cpu_s)


async def settle(sessions, timeout_s: float) -> None:
    """Until no actor command is pending and no rental is half-started (or the deadline: the
    audit then reports what is still in flight)."""
    from sqlalchemy import func, select

    from powerbank.storage.audit import TRANSIENT_RENTAL_STATUSES
    from powerbank.storage.models import ActorCommand, Rental

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with sessions() as session:
            pending = await session.scalar(select(func.count()).select_from(ActorCommand).where(ActorCommand.status == "pending"))
            transient = await session.scalar(
                select(func.count()).select_from(Rental).where(Rental.status.in_(TRANSIENT_RENTAL_STATUSES))
            )
        if not pending and not transient:
            return
        await asyncio.sleep(0.5)


def observations(stats):
    from powerbank.storage.audit import Observations

    return Observations(
        acknowledged_rentals=set(stats.acknowledged), returns=list(stats.returns), credited_minor=dict(stats.credited_minor),
    )


async def _audit(sessions, observed) -> dict[str, list[str]]:
    from powerbank.storage.audit import audit, audit_observations

    return {**await audit(sessions), **await audit_observations(sessions, observed)}


def summarise(options: LoadtestOptions, deployment: Deployment, world: World, timeline: list[Sample],
              load: LoadWindow, violations: dict[str, list[str]]) -> dict[str, Any]:
    stats = world.crowd.stats
    in_window = lambda at: load.measured_from <= at <= load.ended_at  # noqa: E731
    completions = sum(1 for at in stats.completions if in_window(at))
    latencies = [ms for at, ms in stats.activations if in_window(at)]
    lags = [lag * 1000 for at, lag in event_lags(world.fleet) if in_window(at)]
    measured = [s for s in timeline if s.t_s >= load.measured_from - load.started_at]
    return {
        "deployment": options.deployment.kind,
        "workers": options.deployment.workers if options.deployment.kind == "procfile" else None,
        "stations": options.stations,
        "riders": options.riders,
        "duration_s": options.duration_s,
        "measured_s": rounded(load.measured_s, 1),
        "rentals_started": stats.started,
        "rentals_completed": stats.completed,
        "rentals_per_s": rounded(completions / load.measured_s, 2),
        "start_latency_p50_ms": rounded(percentile(latencies, 0.5), 1),
        "start_latency_p99_ms": rounded(percentile(latencies, 0.99), 1),
        "eject_delay_ms": list(options.eject_delay_ms),
        "events_per_s": rounded(len(lags) / load.measured_s, 1),
        "event_lag_p50_ms": rounded(percentile(lags, 0.5), 1),
        "event_lag_p99_ms": rounded(percentile(lags, 0.99), 1),
        "stations_online": timeline[-1].stations_online if timeline else 0,
        "stations_online_min": min((s.stations_online for s in measured), default=0),
        "mailbox_depth_max": max((sum(s.mailboxes.values()) for s in timeline), default=0),
        "cpu_share_by_process": {name: rounded(used / (load.ended_at - load.started_at), 2) for name, used in load.cpu_s.items()},
        "refusals": dict(stats.refusals),
        "rider_errors": dict(stats.errors),
        "faults": fault_summary(options.faults),
        "storms": world.fleet.storms,
        "power_cuts": world.fleet.power_cuts,
        "invariant_violations": sum(len(v) for v in violations.values()),
        "violations_by_kind": {kind: len(v) for kind, v in violations.items()},
        "violation_examples": [example for v in violations.values() for example in v[:3]],
    }


def fault_summary(faults: FaultOptions) -> dict[str, float]:
    """The faults that were on (a storm's fraction means nothing without storms)."""
    on = {name: value for name, value in dataclasses.asdict(faults).items() if value}
    if not faults.storm_every_s:
        on.pop("storm_fraction", None)
    return on


# --- the command ------------------------------------------------------------------------------


def _range(text: str, kind=float) -> tuple:
    low, _, high = text.partition(":")
    return kind(low), kind(high or low)


def add_arguments(parser: argparse.ArgumentParser, add_fault_options) -> None:
    """The command's options, on the `powerbank` command's subparser."""
    parser.add_argument("--stations", type=int, default=200)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--riders", type=int, default=100)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds not measured at the start (default duration/5, ≤ 10)")
    parser.add_argument("--deployment", choices=KINDS, default="embedded",
                        help="embedded (SQLite, one process), procfile (PostgreSQL + Redis, the Procfile's processes) "
                        "or external (--base-url, DATABASE_URL and MQTT_URL of a running deployment)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (procfile)")
    parser.add_argument("--web", type=int, default=1, help="web processes (procfile)")
    parser.add_argument("--base-url", default=None, help="the HTTP base URL (external)")
    parser.add_argument("--eject-delay-ms", default="0", help="simulated eject time, MS or LOW:HIGH (default 0)")
    parser.add_argument("--hold-s", default="0.5:2", help="how long a rider keeps a bank, LOW:HIGH seconds")
    parser.add_argument("--think-s", default="0.1:1", help="a rider's pause between actions, LOW:HIGH seconds")
    parser.add_argument("--report", type=Path, default=None, help="write report.md and plots into this directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no live progress display")
    parser.add_argument("--ramp", default=None, metavar="N,N,...",
                        help="the headline: one run per rider count (fresh deployment each); reports the highest "
                        "rentals/s whose start-latency p99 stays within --p99-target-ms")
    parser.add_argument("--p99-target-ms", type=float, default=200.0, help="start-latency p99 target of --ramp (default 200)")
    parser.add_argument("--keep", action="store_true", help="keep the deployment's database and logs (path printed)")
    add_fault_options(parser)


def options_from(args: argparse.Namespace) -> LoadtestOptions:
    from powerbank.cli import _fault_options

    deployment = DeploymentOptions(kind=args.deployment, workers=args.workers, web=args.web, base_url=args.base_url,
                                   keep=args.keep)
    return LoadtestOptions(
        stations=args.stations, slots=args.slots, riders=args.riders, duration_s=args.duration, warmup_s=args.warmup,
        deployment=deployment, faults=_fault_options(args), eject_delay_ms=_range(args.eject_delay_ms, int),
        hold_s=_range(args.hold_s), think_s=_range(args.think_s), report_dir=args.report,
        progress=not args.no_progress and sys.stderr.isatty(), seed=args.seed,
    )


# --- the headline: a ramp ---------------------------------------------------------------------


async def run_ramp(options: LoadtestOptions, riders_per_step: list[int], p99_target_ms: float) -> dict[str, Any]:
    """One run per step, each on a fresh deployment, with more riders each time. The headline is
    the highest rentals per second of a step whose start-latency p99 stayed within the target
    and whose audit was clean: what the deployment sustains while people still get their bank
    promptly. Steps stop after the first one past the target (more riders only queue more)."""
    steps = []
    for riders in riders_per_step:
        step_options = dataclasses.replace(
            options, riders=riders, report_dir=options.report_dir / f"riders-{riders}" if options.report_dir else None,
        )
        summary = (await run_loadtest(step_options)).summary
        steps.append(summary)
        say(f"{riders} riders: {summary['rentals_per_s']} rentals/s, start p99 {summary['start_latency_p99_ms']} ms, "
            f"{summary['invariant_violations']} violations")
        if summary["start_latency_p99_ms"] > p99_target_ms:
            break
    return ramp_summary(steps, p99_target_ms)


def ramp_summary(steps: list[dict[str, Any]], p99_target_ms: float) -> dict[str, Any]:
    within = [s for s in steps if s["start_latency_p99_ms"] <= p99_target_ms and s["invariant_violations"] == 0]
    best = max(within, key=lambda s: s["rentals_per_s"], default=None)
    columns = ("riders", "rentals_per_s", "start_latency_p50_ms", "start_latency_p99_ms", "events_per_s",
               "mailbox_depth_max", "invariant_violations", "cpu_share_by_process")
    return {
        **(best or steps[-1]),
        "headline_rentals_per_s": best["rentals_per_s"] if best else 0.0,
        "headline_riders": best["riders"] if best else 0,
        "p99_target_ms": p99_target_ms,
        "invariant_violations": sum(s["invariant_violations"] for s in steps),
        "steps": [{key: step[key] for key in columns} for step in steps],
    }


def run_command(args: argparse.Namespace) -> int:
    options = options_from(args)
    ramp = [int(n) for n in args.ramp.split(",")] if args.ramp else None
    try:
        if ramp:
            summary = asyncio.run(run_ramp(options, ramp, args.p99_target_ms))
        else:
            summary = asyncio.run(run_loadtest(options)).summary
    except DeploymentFailed as failed:
        say(f"the deployment failed: {failed}")
        return 2
    print(json_line(summary), flush=True)
    return 0 if summary["invariant_violations"] == 0 else 1

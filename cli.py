"""The `powerbank` command: one entry point for every process and tool."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from powerbank.config import load_settings

ROLE_COMMANDS = {
    "web": ("web", "Serve the HTTP API and websockets (needs REDIS_URL to reach workers)."),
    "worker": ("worker", "Drain actor mailboxes: Dramatiq worker threads on one asyncio loop."),
    "mqtt": ("mqtt", "Run the embedded MQTT broker (unless MQTT_URL) and the station bridge."),
    "scheduler": ("scheduler", "Run timers (eject deadlines, silent stations) and recovery jobs."),
}


def _configure_logging(verbose: bool) -> None:
    import structlog

    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))


def _cmd_role(args: argparse.Namespace) -> int:
    from powerbank.processes import run_roles

    asyncio.run(run_roles(load_settings(), {ROLE_COMMANDS[args.command][0]}, migrate_first=False))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from powerbank.processes import ALL_ROLES, run_roles

    asyncio.run(run_roles(load_settings(), ALL_ROLES, migrate_first=not args.no_migrate))
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from powerbank.storage import migrate

    settings = load_settings()
    url = settings.database_url
    if args.action == "upgrade":
        migrate.upgrade(url, args.revision or "head")
        if not args.revision or args.revision == "head":
            asyncio.run(_seed(settings))
    else:
        migrate.downgrade(url, args.revision or "base")
    return 0


async def _seed(settings) -> None:
    """Reference data (rental packages, app config) that a new installation starts with."""
    from powerbank.storage import seed
    from powerbank.storage.db import create_engine, session_factory

    engine = create_engine(settings.database_url)
    try:
        await seed.ensure_defaults(session_factory(engine), settings.currency)
    finally:
        await engine.dispose()


def _cmd_openapi(args: argparse.Namespace) -> int:
    from powerbank.http.app import openapi_document

    json.dump(openapi_document(), sys.stdout, indent=2 if args.pretty else None)
    sys.stdout.write("\n")
    return 0


def _fault_options(args: argparse.Namespace):
    from powerbank.demo import FaultOptions

    return FaultOptions(
        drop_rate=args.drop, duplicate_rate=args.duplicate, reorder_rate=args.reorder,
        eject_failure_rate=args.eject_failure, jam_rate=args.jam, clock_skew_spread_ms=args.clock_skew_ms,
        storm_every_s=args.storm_every, storm_fraction=args.storm_fraction, power_cut_every_s=args.power_cut_every,
    )


def _add_fault_options(parser: argparse.ArgumentParser) -> None:
    faults = parser.add_argument_group("faults of the simulated stations (all off by default)")
    faults.add_argument("--drop", type=float, default=0.0, help="fraction of events lost on the way (re-sent later)")
    faults.add_argument("--duplicate", type=float, default=0.0, help="fraction of events published twice")
    faults.add_argument("--reorder", type=float, default=0.0, help="fraction of events held back so later ones overtake them")
    faults.add_argument("--eject-failure", type=float, default=0.0, help="fraction of ejects that fail once")
    faults.add_argument("--jam", type=float, default=0.0, help="fraction of ejects that jam their slot for good")
    faults.add_argument("--clock-skew-ms", type=int, default=0, help="station clocks off by up to this much, either way")
    faults.add_argument("--storm-every", type=float, default=0.0, help="a reconnect storm about every SECONDS")
    faults.add_argument("--storm-fraction", type=float, default=0.2, help="share of stations a storm cuts off")
    faults.add_argument("--power-cut-every", type=float, default=0.0,
                        help="a station loses power (buffering its events) about every SECONDS")


def _cmd_demo(args: argparse.Namespace) -> int:
    from powerbank.demo import DemoOptions, run_demo

    options = DemoOptions(
        stations=args.stations,
        slots=args.slots,
        riders=args.riders,
        duration_s=args.duration,
        http_port=args.port,
        progress=not args.no_progress,
        faults=_fault_options(args),
    )
    summary = asyncio.run(run_demo(options))
    return 0 if summary["invariant_violations"] == 0 else 1


def _cmd_simulate(args: argparse.Namespace) -> int:
    from powerbank.demo import SimulateOptions, run_simulation

    options = SimulateOptions(
        base_url=args.base_url,
        stations=args.stations,
        slots=args.slots,
        riders=args.riders,
        duration_s=args.duration,
        admin_phone=args.admin_phone,
        faults=_fault_options(args),
    )
    summary = asyncio.run(run_simulation(options))
    return 0 if not summary.get("errors") else 1


def _cmd_station_credentials(args: argparse.Namespace) -> int:
    """Issue a station a new MQTT password and print its login as JSON (shown once)."""
    password = asyncio.run(_issue_station_credentials(load_settings(), args.serial))
    if password is None:
        print(f"powerbank: no station with serial {args.serial!r}", file=sys.stderr)
        return 1
    json.dump({"serial": args.serial, "username": args.serial, "password": password}, sys.stdout)
    sys.stdout.write("\n")
    return 0


async def _issue_station_credentials(settings, serial: str) -> str | None:
    from powerbank.broker.embedded import provision_station_password_by_serial
    from powerbank.storage.db import create_engine, session_factory

    engine = create_engine(settings.database_url)
    try:
        async with session_factory(engine).begin() as session:
            try:
                _, password = await provision_station_password_by_serial(session, serial)
            except LookupError:
                return None
        return password
    finally:
        await engine.dispose()


def _cmd_stripe_emulator(args: argparse.Namespace) -> int:
    from powerbank.simulators.stripe_emulator import StripeEmulator, WebhookOptions, parse_delay_ms, serve_forever

    options = WebhookOptions(retries=args.retries, duplicates=args.duplicates, duplicate_rate=args.duplicate_rate,
                             delay_ms=parse_delay_ms(args.delay_ms), shuffle=args.shuffle)
    return serve_forever(StripeEmulator(
        api_key=args.api_key, host=args.host, port=args.port, webhook_url=args.webhook_url, webhook_secret=args.webhook_secret,
        webhook_options=options, seed=args.seed, processing_delay_ms=args.processing_delay_ms,
    ))


BENCH_SUITES = {
    "all": "powerbank.simulators.bench_all",
    "actors": "powerbank.simulators.bench_actors",
    "fanout": "powerbank.simulators.bench_fanout",
    "http": "powerbank.simulators.bench_http",
    "stations": "powerbank.simulators.bench_stations",
}


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(BENCH_SUITES[args.suite]).main(args.bench_args)


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from powerbank.simulators import loadtest

    return loadtest.run_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="powerbank",
        description="Real-time backend for shared power-bank rental networks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="Run the whole system with a simulated fleet and riders (embedded default).",
                          description="Start the backend on the embedded default (SQLite, in-process queue, embedded MQTT broker), "
                          "a simulated fleet of stations over real MQTT and riders over real HTTP and websockets; show live progress; "
                          "audit invariants at the end and print one JSON line.")
    demo.add_argument("--stations", type=int, default=20, help="simulated stations (default 20)")
    demo.add_argument("--slots", type=int, default=8, help="slots per station (default 8)")
    demo.add_argument("--riders", type=int, default=50, help="simulated riders (default 50)")
    demo.add_argument("--duration", type=float, default=None, help="stop after SECONDS (default: until Ctrl-C)")
    demo.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    demo.add_argument("--no-progress", action="store_true", help="no live progress display")
    _add_fault_options(demo)
    demo.set_defaults(handler=_cmd_demo)

    serve = sub.add_parser("serve", help="Run web, worker, MQTT broker and scheduler in one process.",
                           description="All roles in one process on the configured backends; migrates the database first.")
    serve.add_argument("--no-migrate", action="store_true", help="do not run migrations first")
    serve.set_defaults(handler=_cmd_serve)

    for name, (_, help_text) in ROLE_COMMANDS.items():
        role = sub.add_parser(name, help=help_text, description=help_text + " One of the Procfile's process types.")
        role.set_defaults(handler=_cmd_role)

    mig = sub.add_parser("migrate", help="Apply or roll back database migrations (Alembic).",
                         description="upgrade (default: to head) or downgrade (default: to base) the database at DATABASE_URL.")
    mig.add_argument("action", nargs="?", choices=["upgrade", "downgrade"], default="upgrade")
    mig.add_argument("revision", nargs="?", default=None, help="target revision")
    mig.set_defaults(handler=_cmd_migrate)

    openapi = sub.add_parser("openapi", help="Print the OpenAPI document as JSON.",
                             description="Print the HTTP API's OpenAPI 3 document as JSON on standard output.")
    openapi.add_argument("--pretty", action="store_true", help="indent the JSON")
    openapi.set_defaults(handler=_cmd_openapi)

    credentials = sub.add_parser(
        "station-credentials", help="Issue a station a new MQTT password (printed once as JSON).",
        description="Replace the MQTT password of the station with this serial in DATABASE_URL and print "
        "its login as JSON. Only a salted hash is stored; a broker in another process may accept the previous "
        "password for up to 30 s.",
    )
    credentials.add_argument("serial", help="the station's serial (its MQTT username and client id)")
    credentials.set_defaults(handler=_cmd_station_credentials)

    simulate = sub.add_parser("simulate", help="Drive a running deployment with a simulated fleet and riders.",
                              description="Provision stations in DATABASE_URL, connect them to the deployment's MQTT broker "
                              "and run riders against its HTTP API.")
    simulate.add_argument("--base-url", default="http://127.0.0.1:8000", help="the deployment's HTTP base URL")
    simulate.add_argument("--stations", type=int, default=20)
    simulate.add_argument("--slots", type=int, default=8)
    simulate.add_argument("--riders", type=int, default=50)
    simulate.add_argument("--duration", type=float, default=60.0)
    simulate.add_argument("--admin-phone", default="+9779800000000", help="the admin account used to credit riders")
    _add_fault_options(simulate)
    simulate.set_defaults(handler=_cmd_simulate)

    emulator = sub.add_parser("stripe-emulator", help="Serve a local emulator of the Stripe API subset used (docs/payments.md).",
                              description="Customers, payment methods (Stripe's test cards), payment intents, refunds and events, "
                              "in memory, for the real stripe SDK pointed at it; signed webhooks with optional faults. Prints one "
                              "JSON line (api_base, api_key, webhook endpoints), then serves until Ctrl-C or SIGTERM.")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=12111, help="0 picks a free port (default 12111)")
    emulator.add_argument("--api-key", default="sk_test_emulator", help="the secret key clients must send")
    emulator.add_argument("--webhook-url", default=None, help="deliver every event here (e.g. .../api/payment/webhook/stripe)")
    emulator.add_argument("--webhook-secret", default=None, help="whsec_... to sign with (default: a fresh one, printed)")
    emulator.add_argument("--retries", type=int, default=3, help="re-deliveries after a failed attempt, with backoff")
    emulator.add_argument("--duplicates", type=int, default=0, help="extra copies of every event")
    emulator.add_argument("--duplicate-rate", type=float, default=0.0, help="chance of one more extra copy")
    emulator.add_argument("--delay-ms", default="0", help="delay of each delivery: MS or LOW:HIGH (random)")
    emulator.add_argument("--shuffle", action="store_true", help="deliver ready events in random order")
    emulator.add_argument("--seed", type=int, default=None, help="make ids and faults reproducible")
    emulator.add_argument("--processing-delay-ms", type=int, default=None,
                          help="confirmed intents stay `processing` this long (default: settle at once)")
    emulator.set_defaults(handler=_cmd_stripe_emulator)

    bench = sub.add_parser("bench", help="Run a benchmark; prints its figures and ends with one JSON line.",
                           description="Benchmarks compare against a reference measured in the same run (a ratio), "
                           "because machines are shared and noisy. `powerbank bench SUITE --help` lists a suite's options.")
    bench.add_argument("suite", choices=sorted(BENCH_SUITES), help="which benchmark")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options for the suite")
    bench.set_defaults(handler=_cmd_bench)

    from powerbank.simulators.loadtest import add_arguments as add_loadtest_arguments

    loadtest = sub.add_parser(
        "loadtest", help="Drive a deployment with simulated stations and riders, audit it, write a report.",
        description="Start (or attach to) a deployment, run a simulated fleet and riders against it with a live "
        "timeline, audit every invariant at the end, write a report with plots and print one JSON line "
        "(exit 1 on any invariant violation).",
    )
    add_loadtest_arguments(loadtest, _add_fault_options)
    loadtest.set_defaults(handler=_cmd_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

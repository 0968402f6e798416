"""Crash safety (SPEC, the runtime's fourth promise): SIGKILL of any process at any instant loses
no accepted command and leaves no partial state.

Scale-out shape: a fresh PostgreSQL database and Redis database; `powerbank mqtt`, `powerbank
scheduler` and three `powerbank worker` processes. A driver process (tests/crash_driver.py)
submits at least 2,000 client commands (wallet credits across 50 wallets, the order-sensitive
PropApply test command, rental starts through the whole saga) and plays the stations from the
outbox, while this test SIGKILLs a random worker every 0.3-1.0 s and starts it again. After the
storm the workers stay up, the scheduler rings stalled mailboxes, and the driver waits until
nothing is pending. Then `verify_run` checks that every command the driver saw accepted was
applied exactly once (PropApply logs equal to acceptance order; one ledger transfer per credit;
balances equal credits minus captures; every rental settled; every bank in exactly one place;
one eject per eject command), and the audit is clean.

Embedded shape: the single `powerbank serve` process on SQLite is SIGKILLed again and again
(a random moment 0.3-3 s after each restart is ready) while the driver keeps submitting through
the same SQLite file; the same checks follow.

Worker and serve processes are started as `python -c "import powerbank.actors.testing; ...
powerbank.cli.main([...])"`: the real CLI roles, with the test-only PropApply handler registered.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update

from powerbank.actors import station as station_actor
from powerbank.actors import testing as proof
from powerbank.actors.testing import verify_run
from powerbank.broker.protocol import Topics
from powerbank.demo import free_port
from powerbank.storage.db import create_engine, session_factory
from powerbank.storage.models import (
    AppConfig,
    LedgerTransfer,
    PowerBank,
    RentalPackage,
    Station,
    StationSlot,
    User,
)
from powerbank.storage.testing import (
    create_postgres_database,
    drop_postgres_database,
    isolated_redis_url,
)
from powerbank.storage.types import utcnow

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("crash_driver.py")
WITH_TEST_HANDLERS = "import sys, powerbank.actors.testing; from powerbank.cli import main; sys.exit(main(sys.argv[1:]))"
CRASH_REDIS_DB = 12  # 9-11, 13, 14 belong to other suites
COMMANDS = int(os.environ.get("CRASH_TEST_COMMANDS", "2000"))
STORM_S = float(os.environ.get("CRASH_TEST_STORM_S", "60"))
DRAIN_S = 80.0


class Processes:
    """The deployment's processes, each logging to its own file (appended across restarts)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.running: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}
        self.unexpected_exits = 0

    def start(self, name: str, *cli_args: str) -> subprocess.Popen:
        self.starts[name] = self.starts.get(name, 0) + 1
        with (self.logs / f"{name}.log").open("a") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", WITH_TEST_HANDLERS, *cli_args],
                env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )
        process.cli_args = cli_args  # type: ignore[attr-defined]
        self.running[name] = process
        return process

    def kill(self, name: str) -> None:
        process = self.running[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def restart(self, name: str) -> None:
        self.start(name, *self.running[name].cli_args)  # type: ignore[attr-defined]

    def exited(self) -> dict[str, int]:
        return {name: p.returncode for name, p in self.running.items() if p.poll() is not None}

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text()[-chars:] if path.exists() else ""


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL", "MQTT_URL", "METRICS_PORT")}
    env.update(
        POWERBANK_DATA_DIR=str(tmp_path / "data"),
        PORT=str(free_port()),
        MQTT_PORT=str(free_port()),
        # No eject may time out, and no station fall silent, while processes are being killed:
        # the driver answers every eject, and the checks count every bank.
        EJECT_TIMEOUT_MS="600000",
        HEARTBEAT_INTERVAL_S="3600",
    )
    return env


def migrate(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "powerbank.cli", "migrate"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def start_driver(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    out, flag = tmp_path / "driver.json", tmp_path / "storm-over"
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, str(DRIVER), "--out", str(out), "--storm-flag", str(flag),
             "--commands", str(COMMANDS), "--storm-s", str(STORM_S), "--drain-s", str(DRAIN_S)],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    return driver, out, flag


async def wait_for_driver(driver: subprocess.Popen, timeout_s: float) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while driver.poll() is None:
        if loop.time() > deadline:
            driver.kill()
            driver.wait(timeout=10)
            raise AssertionError("the driver did not finish in time")
        await asyncio.sleep(0.2)
    return driver.returncode


def supervise(processes: Processes, names: list[str]) -> None:
    """What a process manager does: start again a process that exited by itself (a worker may
    fail to start while PostgreSQL is out of connection slots, its killed peers' sessions not
    yet reaped)."""
    for name in names:
        if processes.running[name].poll() is not None:
            processes.unexpected_exits += 1
            processes.restart(name)


async def keep_supervising(processes: Processes, names: list[str]) -> None:
    while True:
        supervise(processes, names)
        await asyncio.sleep(0.5)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


async def verify(database_url: str, summary: dict) -> tuple[dict, dict]:
    engine = create_engine(database_url)
    try:
        return await verify_run(session_factory(engine), summary["accepted"])
    finally:
        await engine.dispose()


def report(shape: str, summary: dict, figures: dict, kills: int, storm_wall_s: float) -> str:
    line = (
        f"crash[{shape}]: {summary['storm_commands']} client commands {summary['storm_counts']} "
        f"+ {summary['station_messages']} station messages ({summary['ejects_answered']} eject acks, "
        f"{summary['returns']} returns) + {summary['setup_commands']} setup commands; "
        f"{kills} SIGKILLs during a {storm_wall_s:.1f} s storm; drained {summary['drain_s']} s after it; "
        f"submit retries {summary['submit_errors']}; figures {json.dumps(figures, sort_keys=True)}"
    )
    print("\n" + line)
    return line


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(300)
async def test_workers_sigkilled_at_random_lose_nothing_and_apply_everything_once(tmp_path):
    database_name, database_url = await create_postgres_database(prefix="pb_crash")
    env = {**base_env(tmp_path), "DATABASE_URL": database_url, "REDIS_URL": isolated_redis_url(CRASH_REDIS_DB)}
    processes = Processes(env, tmp_path)
    driver = None
    rng = random.Random(7)
    workers = [f"worker-{i}" for i in range(3)]
    try:
        migrate(env)
        processes.start("mqtt", "mqtt")
        processes.start("scheduler", "scheduler")
        for name in workers:
            processes.start(name, "worker")
        driver, out, flag = start_driver(env, tmp_path)
        loop = asyncio.get_running_loop()
        began, kills = loop.time(), 0
        while not flag.exists() and driver.poll() is None and loop.time() - began < STORM_S + 90:
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            victim = rng.choice(workers)
            processes.kill(victim)
            processes.restart(victim)
            kills += 1
            supervise(processes, workers)
        storm_wall_s = loop.time() - began
        supervisor = asyncio.create_task(keep_supervising(processes, workers))
        try:
            assert await wait_for_driver(driver, DRAIN_S + 30) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        finally:
            supervisor.cancel()
        summary = json.loads(out.read_text())
        others = {name: code for name, code in processes.exited().items() if name not in workers}
        assert others == {}, f"a process that was not killed exited: {others}"
        problems, figures = await verify(database_url, summary)
        figures["workers_exited_by_themselves"] = processes.unexpected_exits
        report("postgres+redis, 3 workers", summary, figures, kills, storm_wall_s)
        assert summary["quiescent"]
        assert problems == {}
        assert summary["storm_commands"] >= COMMANDS
        assert kills >= storm_wall_s / 1.0 - 1
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(timeout=10)
        processes.stop_all()
        await drop_postgres_database(database_name)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_the_embedded_process_sigkilled_at_random_loses_nothing(tmp_path):
    env = base_env(tmp_path)  # no DATABASE_URL, no REDIS_URL: SQLite and the in-process queue
    processes = Processes(env, tmp_path)
    driver = None
    rng = random.Random(11)
    port = int(env["PORT"])
    try:
        migrate(env)
        processes.start("serve", "serve", "--no-migrate")
        driver, out, flag = start_driver(env, tmp_path)
        loop = asyncio.get_running_loop()
        began, kills = loop.time(), 0
        while not flag.exists() and driver.poll() is None and loop.time() - began < STORM_S + 90:
            ready_by = loop.time() + 30
            while not port_open(port):
                assert processes.running["serve"].poll() is None, processes.tail("serve")
                assert loop.time() < ready_by, "serve did not come up"
                await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0.3, 3.0))
            processes.kill("serve")
            processes.restart("serve")
            kills += 1
        storm_wall_s = loop.time() - began
        assert await wait_for_driver(driver, DRAIN_S + 30) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        summary = json.loads(out.read_text())
        assert processes.exited() == {}, processes.tail("serve")
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'powerbank.sqlite3'}"
        problems, figures = await verify(database_url, summary)
        report("embedded sqlite, 1 serve process", summary, figures, kills, storm_wall_s)
        assert summary["quiescent"]
        assert problems == {}
        assert summary["storm_commands"] >= COMMANDS
        assert kills >= 10
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(timeout=10)
        processes.stop_all()


# --- the checks themselves --------------------------------------------------------------------


async def test_the_checks_see_a_lost_a_doubled_and_a_misplaced_effect(runtime):
    """`verify_run` passes a clean run of the same mix (credits, PropApply, a rental answered by
    the StationPlayer), and reports each kind of damage a crash could leave."""
    previous_policy = station_actor._policy
    station_actor.configure(None, eject_timeout_ms=60_000, topics=Topics("pb"))
    accepted = []

    async def submit(kind, entity, name, payload, command_id):
        await runtime.submit(kind, entity, name, payload, command_id)
        accepted.append({"kind": kind, "entity_id": entity, "name": name, "command_id": command_id, "payload": payload})

    async with runtime.sessions.begin() as session:
        user = User(phone=f"+9776{uuid.uuid4().int % 10**9:09d}", referral_code=uuid.uuid4().hex[:12])
        station = Station(serial="CHK-0001", name="c", latitude=0, longitude=0, slot_count=2, status="online", last_seen_at=utcnow())
        package = RentalPackage(code="chk", name="c", duration_minutes=60, price_minor=500, currency="NPR", max_duration_minutes=600)
        session.add_all([user, station, package])
        await session.flush()
        bank = PowerBank(serial="CHK-0001-B1", charge_percent=90, currency="NPR", station_id=station.id)
        session.add(bank)
        await session.flush()
        session.add_all([StationSlot(station_id=station.id, slot_number=1, status="occupied", power_bank_id=bank.id),
                         StationSlot(station_id=station.id, slot_number=2, status="empty")])
    user_id, station_id = str(user.id), str(station.id)
    await submit("wallet", user_id, "OpenWallet", {"currency": "NPR"}, f"open:{user_id}")
    transfer_id = str(uuid.uuid4())
    await submit("wallet", user_id, "CreditWallet", {"amount_minor": 9000, "currency": "NPR", "transfer_id": transfer_id}, f"credit:{transfer_id}")
    for k in range(3):
        await submit("wallet", user_id, proof.PROP_APPLY, proof.prop_payload(f"chk:{k}", k + 2), f"chk:{k}")
    rental_id = str(uuid.uuid4())
    await submit("rental", rental_id, "StartRental", {"user_id": user_id, "station_id": station_id, "package_id": str(package.id)}, f"start:{rental_id}")
    player = proof.StationPlayer(runtime, runtime.sessions, rng=random.Random(1), fail_rate=0, duplicate_rate=1, return_rate=1, return_delay_s=(0, 0), accepted=accepted)
    for _ in range(3):
        await runtime.test_dispatcher.settle()
        await player.step()
    await runtime.test_dispatcher.settle()
    assert player.returned == 1
    problems, figures = await verify_run(runtime.sessions, accepted)
    assert problems == {}
    assert figures["rentals_completed"] == 1 and figures["credits_applied"] == 1

    lost = {"kind": "wallet", "entity_id": user_id, "name": "CreditWallet", "command_id": "credit:never-stored", "payload": {}}
    assert "lost" in (await verify_run(runtime.sessions, [*accepted, lost]))[0]
    async with runtime.sessions.begin() as session:
        row = await session.get(AppConfig, proof.prop_key(user_id))
        row.value = {"state": row.value["state"], "log": [*row.value["log"], "chk:2"]}
    assert "prop_apply" in (await verify_run(runtime.sessions, accepted))[0]
    async with runtime.sessions.begin() as session:
        await session.execute(update(LedgerTransfer).where(LedgerTransfer.id == uuid.UUID(transfer_id)).values(amount_minor=9001))
        await session.execute(update(StationSlot).where(StationSlot.power_bank_id == bank.id).values(power_bank_id=None, status="empty"))
    damaged = (await verify_run(runtime.sessions, accepted))[0]
    assert {"credits", "audit:ledger", "banks"} <= set(damaged)
    async with runtime.sessions() as session:
        assert (await session.execute(select(PowerBank.status).where(PowerBank.id == bank.id))).scalar_one() == "in_slot"
    station_actor._policy = previous_policy

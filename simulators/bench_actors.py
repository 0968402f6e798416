"""`powerbank bench actors`: how fast the actor runtime is on PostgreSQL + Redis, next to
references measured in the same run.

Phases, one run, one fresh database and Redis db:
1. idle round trip: one command at a time into a quiet system (workers idle between samples),
   timed from the web process's `Runtime.call` until it returns the result; the headline is a
   debit (real ledger work), interleaved with a no-op command that isolates the runtime's own
   share;
2. independent commands: many wallets, closed-loop load, `--workers` worker processes;
3. pgbench: a single-row UPDATE on the same server (one commit per transaction, the best of a
   few client counts), the reference for a hot entity;
4. hot entity: one wallet receiving debits as fast as the web process can send them, at a few
   in-flight levels (the best is the figure, as for both references);
5. naive locking: the same hot-wallet debits done the usual way, `SELECT ... FOR UPDATE` inside
   the request handler, from `--naive-processes` processes at a few in-flight levels (the best
   is the reference, as for pgbench: queueing too many requests on one row lock only hurts it);
then an audit of the ledger (totals equal the rows, nothing failed or left pending).

A third reference, for the queue: `redis-benchmark` LPUSHing a doorbell-sized message onto a
list on the same Redis server. `independent_vs_redis_lpush` is how much of Redis's own enqueue
rate the independent phase reaches (each command rings at least one doorbell through Redis,
and carries a mailbox row, a lock and a commit that Redis never sees).

After each phase the run records what it cost per command: database commits and rollbacks
(PostgreSQL's own counters for this database) and CPU seconds of the Python processes doing the
work. On a shared, noisy machine those explain a throughput figure better than it explains
itself: they show whether a path is bound by commits or by CPU.

A debit does the same ledger work on both paths: check the wallet cannot overdraw, insert a
ledger transfer, bump the wallet's totals, idempotent by transfer id. The naive path does it
one request at a time (`ledger.transfer`); the actor path adds its own costs (the mailbox row,
the doorbell, the result on the bus) and applies a busy mailbox's run of debits as one batch
(`ledger.transfer_many`: decided in memory, one INSERT and one UPDATE for the run), which is
what the single owner of an entity's state makes possible.

The command sender is a real `web` process (`processes.start_backend`), so the figures follow
whatever dispatcher and bus the runtime wires; workers are real `powerbank worker` processes
that import this module (for the benchmark-only `BenchDebit` and `BenchNoop` handlers).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
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

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.actors.runtime import (
    DEFAULT_BATCH_SIZE,
    ActorContext,
    AdvisoryLocks,
    CommandRejected,
    Runtime,
    handles,
    handles_batch,
)
from powerbank.actors.wallet import load_wallet_and_account
from powerbank.simulators.bench import (
    LoadResult,
    PgbenchResult,
    ProcessPool,
    RedisBenchmarkResult,
    closed_loop,
    json_line,
    latency_summary_ms,
    print_result_line,
    process_cpu_s,
    python_child_argv,
    ratio,
    rounded,
    run_in_step,
    run_pgbench,
    run_redis_benchmark,
    wait_for_start_signal,
)
from powerbank.storage import ledger
from powerbank.storage.ledger import ledger_discrepancies, LedgerError
from powerbank.storage.models import ActorCommand, LedgerAccount, LedgerTransfer, User, Wallet

KIND = "wallet"
BENCH_DEBIT = "BenchDebit"
BENCH_NOOP = "BenchNoop"
CURRENCY = "NPR"
DEBIT_MINOR = 1
ACTOR_TRANSFER_KIND = "bench_actor_debit"
NAIVE_TRANSFER_KIND = "bench_naive_debit"
# Enough that no debit in any run can be refused for funds: a refusal is not throughput.
HOT_BALANCE_MINOR = 10**15
WALLET_BALANCE_MINOR = 10**12
DEFAULT_REDIS_DB = 10
# PostgreSQL backends publish their transaction counts at most once a second.
STATS_SETTLE_S = 1.2
NAIVE_POOL_SIZE = 8
# Peak connections of a run: the web process's and each worker's pool (storage.db defaults).
CONNECTIONS_NEEDED = 60
HOT_ROW_TABLE = "bench_hot_row"
PGBENCH_SQL = f"UPDATE {HOT_ROW_TABLE} SET balance_minor = balance_minor - 1 WHERE id = 1;"
WORKER_CODE = "import powerbank.simulators.bench_actors; from powerbank.cli import main; raise SystemExit(main(['worker']))"
NAIVE_CHILD_CODE = (
    "import sys; from powerbank.simulators.bench_actors import naive_child_main; sys.exit(naive_child_main(sys.argv[1:]))"
)
GOALS = {
    "idle_roundtrip_p50_ms": ("<=", 5.0),
    "hot_entity_vs_pgbench": (">=", 1.0),
    "vs_naive_locking": (">=", 2.0),
}


# --- the work both paths do -------------------------------------------------------------------


async def debit_to_revenue(
    session: AsyncSession, account: LedgerAccount, transfer_id: uuid.UUID, amount_minor: int, kind: str
) -> None:
    """One posted transfer from a wallet account to platform revenue, refused on overdraft
    (inside `ledger.transfer`): the naive path's unit of work."""
    revenue = await ledger.system_account(session, "platform_revenue", account.currency)
    await ledger.transfer(
        session, transfer_id=transfer_id, debit=account, credit=revenue, amount_minor=amount_minor, kind=kind
    )


def debit_payload() -> dict[str, Any]:
    return {"transfer_id": str(uuid.uuid4()), "amount_minor": DEBIT_MINOR}


@handles_batch(KIND, BENCH_DEBIT)
async def bench_debits(ctx: ActorContext, user_id: str, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Benchmark-only wallet command, applied a run at a time. No row lock: the actor runtime
    already guarantees that nothing else applies to this wallet meanwhile; that is the point
    being measured. Each result says when the run ran (wall clock, one host) so a round trip can
    be split around the handler."""
    started_at = time.time()
    _, account = await load_wallet_and_account(ctx, user_id)
    revenue = await ledger.system_account(ctx.session, "platform_revenue", account.currency)
    requests = [
        ledger.TransferRequest(uuid.UUID(payload["transfer_id"]), payload["amount_minor"], ACTOR_TRANSFER_KIND)
        for payload in payloads
    ]
    refusals = await ledger.transfer_many(ctx.session, debit=account, credit=revenue, requests=requests)
    done = {"ok": True, "handler_started_at": started_at, "handler_finished_at": time.time()}
    return [done if reason is None else CommandRejected(reason).as_result() for reason in refusals]


@handles(KIND, BENCH_NOOP)
async def bench_noop(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Benchmark-only command with no domain work: its round trip is the runtime's own cost."""
    now = time.time()
    return {"ok": True, "handler_started_at": now, "handler_finished_at": now}


async def naive_debit(sessions: async_sessionmaker[AsyncSession], user_id: uuid.UUID) -> str:
    """The usual way, as a request handler would: one transaction that locks the wallet's
    account row (`SELECT ... FOR UPDATE`) so concurrent debits queue on PostgreSQL."""
    async with sessions.begin() as session:
        wallet = (await session.execute(select(Wallet).where(Wallet.user_id == user_id))).scalar_one()
        account = (
            await session.execute(
                select(LedgerAccount).where(LedgerAccount.id == wallet.account_id).with_for_update()
            )
        ).scalar_one()
        try:
            await debit_to_revenue(session, account, uuid.uuid4(), DEBIT_MINOR, NAIVE_TRANSFER_KIND)
        except LedgerError:
            return "rejected"
    return "ok"


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    quick: bool = False
    worker_processes: int = 2
    entities: int = 500
    idle_samples: int = 50
    idle_gap_s: float = 0.3
    warmup_s: float = 2.0
    phase_s: float = 15.0
    independent_concurrency: int = 64
    hot_concurrency: tuple[int, ...] = (128, 512)
    naive_processes: int = 2
    naive_concurrency: tuple[int, ...] = (16, 128)
    pgbench_clients: tuple[int, ...] = (1, 4, 16)
    pgbench_s: int = 5
    redis_db: int = DEFAULT_REDIS_DB
    command_timeout_s: float = 30.0
    total_timeout_s: float = 600.0


# One level per reference instead of a sweep, shorter windows: a smoke run, not a measurement.
QUICK = dict(
    quick=True, entities=100, idle_samples=8, idle_gap_s=0.2, warmup_s=1.0, phase_s=3.0,
    pgbench_clients=(4,), pgbench_s=2, naive_concurrency=(16,), hot_concurrency=(256,), total_timeout_s=240.0,
)


def _int_list(text_value: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text_value.split(","))


def parse_options(argv: list[str]) -> BenchOptions:
    """Defaults for a full run (a couple of minutes); `--quick` for a ~30 s smoke run; any
    option given explicitly wins over both."""
    parser = argparse.ArgumentParser(
        prog="powerbank bench actors",
        description="Actor runtime on PostgreSQL + Redis: idle round trip, independent and hot-entity "
        "throughput, against pgbench and naive row locking measured in the same run. "
        "Figures on stderr, one JSON line last on stdout.",
    )
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument("--workers", dest="worker_processes", type=int, help="worker processes (default 2)")
    parser.add_argument("--entities", type=int, help="wallets for the independent phase")
    parser.add_argument("--idle-samples", type=int, help="idle round trips to time, of each command")
    parser.add_argument("--idle-gap", dest="idle_gap_s", type=float, help="seconds of quiet before each idle sample (jittered up to +50%%)")
    parser.add_argument("--warmup", dest="warmup_s", type=float, help="seconds of load before each measured window")
    parser.add_argument("--duration", dest="phase_s", type=float, help="seconds measured per load phase")
    parser.add_argument("--independent-concurrency", type=int, help="commands in flight, independent phase")
    parser.add_argument("--hot-concurrency", type=_int_list, help="commands in flight, hot-wallet phase, e.g. 128,512; the best is the figure")
    parser.add_argument("--naive-processes", type=int, help="processes doing naive locked debits")
    parser.add_argument("--naive-concurrency", type=_int_list, help="requests in flight over all naive processes, e.g. 16,128; the best is the reference")
    parser.add_argument("--pgbench-clients", type=_int_list, help="e.g. 1,4,16; the best is the reference")
    parser.add_argument("--pgbench-duration", dest="pgbench_s", type=int, help="seconds per pgbench run")
    parser.add_argument("--redis-db", type=int, help=f"Redis database number to use and flush (default {DEFAULT_REDIS_DB})")
    parser.add_argument("--timeout", dest="total_timeout_s", type=float, help="give up after this many seconds")
    args = vars(parser.parse_args(argv))
    values = dict(QUICK) if args.pop("quick") else {}
    values.update({key: value for key, value in args.items() if value is not None})
    return BenchOptions(**values)


# --- setup -----------------------------------------------------------------------------------


async def create_users(sessions: async_sessionmaker[AsyncSession], count: int) -> list[uuid.UUID]:
    """People are created by the auth layer, not by an actor, so plain inserts here."""
    users = [User(phone=f"+97797{n:08d}", referral_code=f"BN{n:08d}{secrets.token_hex(2)}") for n in range(count)]
    async with sessions.begin() as session:
        session.add_all(users)
    return [user.id for user in users]


async def open_funded_wallets(sessions: async_sessionmaker[AsyncSession], balances: dict[uuid.UUID, int]) -> None:
    """Open and fund every wallet through the Wallet actor's own commands, applied in this
    process (no worker runs yet), a few mailboxes at a time."""
    runtime = Runtime(sessions, bus=_NullBus(), dispatcher=None, locks=AdvisoryLocks())
    limit = asyncio.Semaphore(8)

    async def prepare(user_id: uuid.UUID, balance_minor: int) -> None:
        async with limit:
            await runtime.submit(KIND, str(user_id), "OpenWallet", {"currency": CURRENCY}, f"bench-open-{user_id}")
            credit = {"amount_minor": balance_minor, "currency": CURRENCY, "transfer_id": str(uuid.uuid4()), "reason": "bench"}
            await runtime.submit(KIND, str(user_id), "CreditWallet", credit, f"bench-credit-{user_id}")
            await runtime.drain(KIND, str(user_id))

    await asyncio.gather(*(prepare(user_id, balance) for user_id, balance in balances.items()))
    async with sessions() as session:
        opened = await session.scalar(select(func.count()).select_from(Wallet))
        funded = await session.scalar(
            select(func.count()).select_from(LedgerTransfer).where(LedgerTransfer.kind == "admin_credit")
        )
    if opened != len(balances) or funded != len(balances):
        raise RuntimeError(f"wallet setup failed: {opened} opened, {funded} funded of {len(balances)}")


class _NullBus:
    """Setup needs no listener: nobody awaits these results."""

    async def publish(self, channel: str, message: Any) -> None:
        return None

    async def publish_many(self, messages: list[tuple[str, Any]]) -> None:
        return None

    def subscribe(self, *channels: str) -> Any:
        raise NotImplementedError


async def create_hot_row(sessions: async_sessionmaker[AsyncSession]) -> None:
    """pgbench's target: one row in a table of its own, in the benchmark's database."""
    async with sessions.begin() as session:
        await session.execute(text(f"CREATE TABLE {HOT_ROW_TABLE} (id integer PRIMARY KEY, balance_minor bigint NOT NULL)"))
        await session.execute(text(f"INSERT INTO {HOT_ROW_TABLE} VALUES (1, 0)"))


async def server_facts(sessions: async_sessionmaker[AsyncSession]) -> dict[str, Any]:
    """The settings that decide what one commit costs, recorded next to the figures."""
    facts: dict[str, Any] = {"cpu_count": os.cpu_count()}
    async with sessions() as session:
        for name in ("server_version", "synchronous_commit", "fsync", "commit_delay"):
            facts[f"postgres_{name}"] = await session.scalar(text(f"SHOW {name}"))
    return facts


async def free_connection_slots(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Connections the server would still accept from a non-superuser right now."""
    async with sessions() as session:
        return int(await session.scalar(text(
            "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        )))


async def transaction_counters(sessions: async_sessionmaker[AsyncSession]) -> tuple[int, int]:
    """(commits, rollbacks) PostgreSQL has counted in this database, every process included."""
    async with sessions() as session:
        row = (await session.execute(text(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        ))).one()
    return int(row[0]), int(row[1])


def db_activity(before: tuple[int, int], after: tuple[int, int], commands: int) -> dict[str, Any]:
    """Per command, so phases of different lengths compare; read-only transactions (a mailbox
    sampler, a stalled-mailbox sweep) count too, which is why this is a rate, not a proof."""
    commits, rollbacks = after[0] - before[0], after[1] - before[1]
    return {
        "commands": commands,
        "commits": commits,
        "rollbacks": rollbacks,
        "commits_per_command": ratio(commits, commands),
        "rollbacks_per_command": ratio(rollbacks, commands),
    }


def source_revision() -> dict[str, Any]:
    """Which code was measured; a dirty tree is worth knowing when figures move."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if head.returncode != 0:
        return {}
    return {"git_head": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}


# --- processes -------------------------------------------------------------------------------


def child_env(database_url: str, redis_url: str, data_dir: Path) -> dict[str, str]:
    from powerbank.demo import free_port

    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "POWERBANK_DATA_DIR": str(data_dir),
        "MQTT_PORT": str(free_port()),  # nothing listens: the worker's outbox bridge just retries
        "MQTT_URL": "",
    }


async def start_web(database_url: str, redis_url: str, data_dir: Path):
    """The command sender: a `web` process's backend, in this process."""
    from powerbank.config import Settings
    from powerbank.demo import free_port
    from powerbank.processes import start_backend

    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        mqtt_url=None,
        jwt_secret=secrets.token_urlsafe(32),
        data_dir=data_dir,
        http_port=free_port(),
        mqtt_port=free_port(),
        bridge_password=secrets.token_urlsafe(16),
    )
    return await start_backend(settings, {"web"})


async def wait_for_workers(redis_url: str, pool: ProcessPool, count: int, timeout_s: float) -> bool:
    """Until `count` worker processes poll the queue (Dramatiq's heartbeat set holds the id of
    every broker that talked to Redis; this process's own is left out). False if they were not
    seen in time; the caller then relies on warm-up."""
    import dramatiq
    import redis.asyncio as redis_asyncio

    own_id = getattr(dramatiq.get_broker(), "broker_id", "").encode()
    client = redis_asyncio.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            dead = pool.dead()
            if dead:
                raise RuntimeError(f"worker {dead[0].name} exited early:\n{dead[0].log_tail()}")
            polling = set(await client.zrange("dramatiq:__heartbeats__", 0, -1)) - {own_id}
            if len(polling) >= count:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await client.aclose()


def worker_threads() -> int:
    """The Dramatiq thread count a `powerbank worker` runs with (start_worker's default)."""
    from powerbank.actors import dispatch

    return int(inspect.signature(dispatch.start_worker).parameters["threads"].default)


# --- phases ----------------------------------------------------------------------------------


def actor_debit_operation(runtime: Runtime, entity_for, prefix: str, timeout_s: float):
    """A closed-loop operation: send one BenchDebit and wait for its result, as a caller would."""

    async def operation(n: int) -> str:
        result = await runtime.call(KIND, entity_for(n), BENCH_DEBIT, debit_payload(), f"{prefix}-{n}", timeout_s=timeout_s)
        return "ok" if result.get("ok") else "rejected"

    return operation


@dataclass(frozen=True)
class IdleSample:
    """One idle round trip, and its three legs (wall clock; every process is on this host):
    send until the handler starts (accept, doorbell, wake-up, lock, read the mailbox), the
    handler itself (the ledger work), and handler end until the caller has the result (mark the
    command, commit, publish, deliver)."""

    total_s: float
    to_handler_s: float = 0.0
    handler_s: float = 0.0
    to_caller_s: float = 0.0


async def measure_idle_roundtrips(
    runtime: Runtime, user_ids: list[str], options: BenchOptions
) -> dict[str, list[IdleSample]]:
    """Sequential round trips of a debit and a no-op, alternating so both see the same
    conditions, each after a quiet spell long enough for idle workers to settle into their idle
    polling; jittered so samples do not lock onto a poll period."""
    rng = random.Random(3)
    samples: dict[str, list[IdleSample]] = {BENCH_DEBIT: [], BENCH_NOOP: []}
    for n in range(options.idle_samples):
        for name, payload in ((BENCH_DEBIT, debit_payload()), (BENCH_NOOP, {})):
            await asyncio.sleep(options.idle_gap_s * rng.uniform(1.0, 1.5))
            user_id = user_ids[n % len(user_ids)]
            samples[name].append(await _timed_call(runtime, user_id, name, payload, f"bench-idle-{name}-{n}", options))
    return samples


async def _timed_call(
    runtime: Runtime, user_id: str, name: str, payload: dict[str, Any], command_id: str, options: BenchOptions
) -> IdleSample:
    sent_at, started = time.time(), time.perf_counter()
    result = await runtime.call(KIND, user_id, name, payload, command_id, timeout_s=options.command_timeout_s)
    total_s, seen_at = time.perf_counter() - started, time.time()
    if not result.get("ok"):
        raise RuntimeError(f"idle {name} refused: {result}")
    return IdleSample(
        total_s=total_s,
        to_handler_s=result["handler_started_at"] - sent_at,
        handler_s=result["handler_finished_at"] - result["handler_started_at"],
        to_caller_s=seen_at - result["handler_finished_at"],
    )


async def measure_naive(
    database_url: str, hot_user: uuid.UUID, options: BenchOptions, concurrency: int, work_dir: Path
) -> tuple[LoadResult, float]:
    """The naive path from `naive_processes` processes, `concurrency` requests in flight over
    all of them, their windows aligned; with the CPU seconds those processes used."""
    per_process = max(1, concurrency // options.naive_processes)
    argv = python_child_argv(
        NAIVE_CHILD_CODE, database_url, str(hot_user), str(per_process), str(options.warmup_s), str(options.phase_s)
    )
    results = await run_in_step(
        [argv] * options.naive_processes,
        dict(os.environ),
        work_dir,
        ready_timeout_s=60,
        run_timeout_s=options.warmup_s + options.phase_s + 60,
    )
    merged: LoadResult | None = None
    for data in results:
        part = LoadResult(**data["load"])
        merged = part if merged is None else merged.merge(part)
    return merged, sum(data["cpu_s"] for data in results)


def naive_child_main(argv: list[str]) -> int:
    """One naive-locking process: `DATABASE_URL USER_ID CONCURRENCY WARMUP_S DURATION_S`."""
    database_url, user_id, concurrency, warmup_s, duration_s = argv
    return asyncio.run(_naive_child(database_url, uuid.UUID(user_id), int(concurrency), float(warmup_s), float(duration_s)))


async def _naive_child(database_url: str, user_id: uuid.UUID, concurrency: int, warmup_s: float, duration_s: float) -> int:
    from powerbank.storage.db import create_engine, session_factory

    # Up to twice the pool size: enough connections to queue on the row lock, and a bound on
    # this benchmark's share of the server's connection slots.
    engine = create_engine(database_url, pool_size=min(NAIVE_POOL_SIZE, concurrency))
    try:
        sessions = session_factory(engine)
        async with sessions() as session:  # connect before the clock starts
            await session.execute(text("SELECT 1"))
        await wait_for_start_signal()
        cpu_before_s = time.process_time()
        result = await closed_loop(
            lambda n: naive_debit(sessions, user_id), concurrency=concurrency, warmup_s=warmup_s, duration_s=duration_s
        )
        print_result_line({"load": dataclasses.asdict(result), "cpu_s": time.process_time() - cpu_before_s})
    finally:
        await engine.dispose()
    return 0


async def audit(sessions: async_sessionmaker[AsyncSession]) -> dict[str, Any]:
    """The run only counts if the ledger is exact: every account's stored totals equal the sum of
    its transfers, debits equal credits, each applied BenchDebit left exactly one transfer, and
    no command failed or was left pending."""
    async with sessions() as session:
        # The ledger's own check: stored totals of single-owner accounts equal their transfers,
        # shared accounts (revenue) are sums of rows, and debits equal credits overall.
        ledger_problems = await ledger_discrepancies(session)
        statuses = dict((await session.execute(
            select(ActorCommand.status, func.count()).group_by(ActorCommand.status)
        )).all())
        applied_debits = await session.scalar(
            select(func.count()).select_from(ActorCommand)
            .where(ActorCommand.name == BENCH_DEBIT, ActorCommand.status == "applied")
        )
        transfers = dict((await session.execute(
            select(LedgerTransfer.kind, func.count()).group_by(LedgerTransfer.kind)
        )).all())
    report = {
        "mismatched_accounts": sum(1 for p in ledger_problems if p.startswith(("account", "shared"))),
        "debits_equal_credits": not any(p.startswith("debits != credits") for p in ledger_problems),
        "ledger_problems": ledger_problems[:5],
        "failed_commands": int(statuses.get("failed", 0)),
        "pending_commands": int(statuses.get("pending", 0)),
        "actor_debits_applied": int(applied_debits),
        "actor_debit_transfers": int(transfers.get(ACTOR_TRANSFER_KIND, 0)),
        "naive_debit_transfers": int(transfers.get(NAIVE_TRANSFER_KIND, 0)),
    }
    report["ok"] = (
        not ledger_problems
        and report["mismatched_accounts"] == 0
        and report["debits_equal_credits"]
        and report["failed_commands"] == 0
        and report["pending_commands"] == 0
        and report["actor_debits_applied"] == report["actor_debit_transfers"]
    )
    return report


# --- the summary -----------------------------------------------------------------------------


def best_pgbench(runs: list[PgbenchResult]) -> PgbenchResult:
    """The reference is pgbench at its best client count: the ratio must not be flattered by
    measuring the reference at a concurrency that happens to suit it badly."""
    return max(runs, key=lambda run: run.tps)


def idle_legs_p50_ms(samples: list[IdleSample]) -> dict[str, float]:
    """Where an idle round trip's time goes; medians of each leg (they need not add up to the
    median of the whole)."""
    return {
        leg: latency_summary_ms([getattr(sample, f"{leg}_s") for sample in samples])["p50"]
        for leg in ("to_handler", "handler", "to_caller")
    }


def best_load(runs: list[LoadResult]) -> LoadResult:
    """A load phase at its best in-flight level, for the same reason as `best_pgbench`; used
    for the hot entity and its naive reference alike."""
    return max(runs, key=lambda run: run.ok_per_s)


def goals_met(figures: dict[str, float]) -> dict[str, bool]:
    met = {}
    for key, (relation, target) in GOALS.items():
        value = figures[key]
        met[f"{key} {relation} {target}"] = value <= target if relation == "<=" else value >= target
    return met


def assemble_summary(
    options: BenchOptions,
    *,
    idle: list[IdleSample],
    idle_noop: list[IdleSample],
    independent: LoadResult,
    hot_runs: list[LoadResult],
    naive_runs: list[LoadResult],
    pgbench_runs: list[PgbenchResult],
    audit_report: dict[str, Any],
    environment: dict[str, Any],
    elapsed_s: float,
    workers_seen: bool = True,
    db_activity: dict[str, dict[str, Any]] | None = None,
    redis_lpush: RedisBenchmarkResult | None = None,
) -> dict[str, Any]:
    """Everything the final JSON line holds: the headline figures flat at the top, the phases'
    details, the parameters they were measured with, and the references."""
    idle_ms = latency_summary_ms([sample.total_s for sample in idle])
    noop_ms = latency_summary_ms([sample.total_s for sample in idle_noop])
    reference = best_pgbench(pgbench_runs)
    naive = best_load(naive_runs)
    hot = best_load(hot_runs)
    figures = {
        "idle_roundtrip_p50_ms": idle_ms["p50"],
        "idle_roundtrip_p99_ms": idle_ms["p99"],
        "idle_noop_roundtrip_p50_ms": noop_ms["p50"],
        "idle_noop_roundtrip_p99_ms": noop_ms["p99"],
        "independent_commands_per_s": rounded(independent.ok_per_s, 1),
        "hot_entity_commands_per_s": rounded(hot.ok_per_s, 1),
        "pgbench_hot_row_tps": rounded(reference.tps, 1),
        "naive_locking_commands_per_s": rounded(naive.ok_per_s, 1),
    }
    figures["hot_entity_vs_pgbench"] = ratio(hot.ok_per_s, reference.tps)
    figures["vs_naive_locking"] = ratio(hot.ok_per_s, naive.ok_per_s)
    lpush_per_s = redis_lpush.requests_per_s if redis_lpush is not None else 0.0  # 0: not measured
    figures["redis_lpush_per_s"] = rounded(lpush_per_s, 1)
    figures["independent_vs_redis_lpush"] = ratio(independent.ok_per_s, lpush_per_s)
    return {
        **figures,
        "goals": goals_met(figures),
        "audit": audit_report,
        "errors": independent.errors + sum(run.errors for run in hot_runs + naive_runs),
        "phases": {
            "idle": {"command": BENCH_DEBIT, "samples": len(idle), "latency_ms": idle_ms, "legs_p50_ms": idle_legs_p50_ms(idle)},
            "idle_noop": {
                "command": BENCH_NOOP, "samples": len(idle_noop), "latency_ms": noop_ms, "legs_p50_ms": idle_legs_p50_ms(idle_noop),
            },
            "independent": independent.as_dict(),
            "hot_entity": [run.as_dict() for run in hot_runs],
            "naive_locking": [run.as_dict() for run in naive_runs],
            "pgbench": [dataclasses.asdict(run) for run in pgbench_runs],
        },
        "reference": {
            "pgbench_clients": reference.clients,
            "pgbench_sql": PGBENCH_SQL,
            "naive_concurrency": naive.concurrency,
            "hot_concurrency": hot.concurrency,
            "redis_benchmark": "LPUSH of a 200-byte value, 50 clients" if redis_lpush is not None else None,
        },
        "params": {
            **{key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(options).items()},
            "batch_size": DEFAULT_BATCH_SIZE,
            "worker_threads": worker_threads(),
            "workers_seen_polling": workers_seen,
        },
        "db_activity": db_activity or {},
        "environment": environment,
        "elapsed_s": rounded(elapsed_s, 1),
    }


# --- the run ---------------------------------------------------------------------------------


class Run:
    """One benchmark run's resources, each released in `close` whatever happened."""

    def __init__(self, options: BenchOptions, console) -> None:
        self.options = options
        self.console = console
        self.started = time.monotonic()
        self.work_dir = Path(tempfile.mkdtemp(prefix="powerbank-bench-"))
        self.pool = ProcessPool(self.work_dir)
        self.database_name: str | None = None
        self.database_url = ""
        self.redis_url = ""
        self.backend = None
        self.failed = True
        self.db_activity: dict[str, dict[str, Any]] = {}
        self._counters: tuple[int, int] = (0, 0)
        self._cpu_mark = (0.0, 0.0)

    def say(self, message: str) -> None:
        self.console.print(f"[dim]bench {time.monotonic() - self.started:5.1f}s:[/dim] {message}")

    async def execute(self) -> dict[str, Any]:
        options, started = self.options, self.started
        user_ids, hot_user = await self._prepare()
        runtime, workers_seen = await self._start_processes()
        ids = [str(u) for u in user_ids]
        await self._warm_up(runtime, ids)
        await self._account(runtime, None, 0)

        self.say(f"idle round trip: {options.idle_samples} debits and {options.idle_samples} no-ops, alternating")
        idle = await measure_idle_roundtrips(runtime, ids, options)
        await self._account(runtime, "idle", 2 * options.idle_samples, python_cpu=False)
        independent = await self._load_phase(
            "independent", runtime, lambda n: ids[n % len(ids)], options.independent_concurrency
        )
        pgbench_runs = await self._pgbench()
        await self._account(runtime, "pgbench", sum(run.transactions for run in pgbench_runs), python_cpu=False)
        self.say("redis-benchmark LPUSH on the same Redis server")
        redis_lpush = await run_redis_benchmark(self.redis_url, "lpush")
        hot_runs = [
            await self._load_phase(f"hot_entity_{concurrency}", runtime, lambda n: str(hot_user), concurrency)
            for concurrency in options.hot_concurrency
        ]
        # A deployment done the usual way has no actor workers; stopping them also frees their
        # connection slots, which every user of this PostgreSQL server shares.
        self.say("stopping the workers before the naive phases")
        await self.pool.astop()
        naive_runs = [await self._naive_phase(runtime, hot_user, concurrency) for concurrency in options.naive_concurrency]
        audit_report = await audit(self.backend.services.sessions)
        environment = {**await server_facts(self.backend.services.sessions), **source_revision()}
        summary = assemble_summary(
            options, idle=idle[BENCH_DEBIT], idle_noop=idle[BENCH_NOOP], independent=independent, hot_runs=hot_runs, naive_runs=naive_runs, pgbench_runs=pgbench_runs,
            audit_report=audit_report, environment=environment, elapsed_s=time.monotonic() - started,
            workers_seen=workers_seen, db_activity=self.db_activity, redis_lpush=redis_lpush,
        )
        self.failed = not audit_report["ok"]
        self.say("done; stopping processes and dropping the database")
        return summary

    async def _start_processes(self) -> tuple[Runtime, bool]:
        """Worker processes, then the web backend in this process; True if every worker was
        seen polling before the clock starts."""
        self.say(f"starting {self.options.worker_processes} worker processes and the web process")
        env = child_env(self.database_url, self.redis_url, self.work_dir)
        for index in range(self.options.worker_processes):
            self.pool.start(f"worker-{index}", python_child_argv(WORKER_CODE), env)
        self.backend = await start_web(self.database_url, self.redis_url, self.work_dir)
        seen = await wait_for_workers(self.redis_url, self.pool, self.options.worker_processes, timeout_s=60)
        if not seen:
            self.say("[yellow]workers not seen in Dramatiq's heartbeats; relying on warm-up[/yellow]")
        return self.backend.services.runtime, seen

    async def _account(
        self, runtime: Runtime, label: str | None, commands: int, *, python_cpu: bool = True, python_cpu_s: float | None = None
    ) -> None:
        """What the phase just ended cost per command, whatever the runtime's design: commits
        and rollbacks PostgreSQL counted in this database, and CPU seconds of the Python
        processes doing the work (web and workers, or `python_cpu_s` when the caller measured
        its own processes). Waits for the mailboxes to empty and for backends to publish their
        statistics first, so each phase pays for its own tail."""
        if not await runtime.wait_idle(timeout_s=30):
            self.say(f"[yellow]{label}: mailboxes not empty 30 s after the phase[/yellow]")
        await asyncio.sleep(STATS_SETTLE_S)
        counters, cpu_mark = await transaction_counters(self.backend.services.sessions), self._python_cpu_s()
        if label is not None:
            activity = db_activity(self._counters, counters, commands)
            if python_cpu_s is not None:
                activity["python_cpu_ms_per_command"] = ratio(python_cpu_s * 1000, commands)
            elif python_cpu:
                web_s, workers_s = (now - before for now, before in zip(cpu_mark, self._cpu_mark))
                activity["python_cpu_ms_per_command"] = ratio((web_s + workers_s) * 1000, commands)
                activity["web_cpu_ms_per_command"] = ratio(web_s * 1000, commands)
                activity["workers_cpu_ms_per_command"] = ratio(workers_s * 1000, commands)
            self.db_activity[label] = activity
        self._counters, self._cpu_mark = counters, cpu_mark

    def _python_cpu_s(self) -> tuple[float, float]:
        """(this process: the web backend and its callers, all worker processes together)."""
        workers = (process_cpu_s(child.process.pid) for child in self.pool.children)
        return time.process_time(), sum(cpu_s for cpu_s in workers if cpu_s is not None)

    async def _prepare(self) -> tuple[list[uuid.UUID], uuid.UUID]:
        from powerbank.storage import migrate
        from powerbank.storage.db import create_engine, session_factory
        from powerbank.storage.testing import create_postgres_database, isolated_redis_url

        self.database_name, self.database_url = await create_postgres_database("pb_bench")
        self.redis_url = isolated_redis_url(self.options.redis_db)
        self.say(f"database {self.database_name}, redis db {self.options.redis_db}, logs in {self.work_dir}")
        await asyncio.to_thread(migrate.upgrade, self.database_url)
        engine = create_engine(self.database_url)
        try:
            sessions = session_factory(engine)
            await self._check_connection_slots(sessions)
            self.say(f"opening and funding {self.options.entities + 1} wallets")
            user_ids = await create_users(sessions, self.options.entities + 1)
            hot_user, independent_users = user_ids[0], user_ids[1:]
            balances = {hot_user: HOT_BALANCE_MINOR, **{u: WALLET_BALANCE_MINOR for u in independent_users}}
            await open_funded_wallets(sessions, balances)
            await create_hot_row(sessions)
        finally:
            await engine.dispose()
        return independent_users, hot_user

    async def _check_connection_slots(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Warn early when other users of the server leave too few connection slots: the run
        would otherwise fail half-way with "too many clients"."""
        free = await free_connection_slots(sessions)
        if free < CONNECTIONS_NEEDED:
            self.say(f"[yellow]only {free} PostgreSQL connection slots free; this run may need up to "
                     f"{CONNECTIONS_NEEDED} (web and worker pools)[/yellow]")

    async def _warm_up(self, runtime: Runtime, ids: list[str]) -> None:
        """A few round trips through every worker's pool and caches before any clock runs."""
        await closed_loop(
            actor_debit_operation(runtime, lambda n: ids[n % len(ids)], "bench-warm", self.options.command_timeout_s),
            concurrency=8, warmup_s=0.0, duration_s=1.0,
        )
        await runtime.wait_idle(timeout_s=30)

    async def _load_phase(self, label: str, runtime: Runtime, entity_for, concurrency: int) -> LoadResult:
        options = self.options
        self.say(f"{label}: {concurrency} in flight, {options.warmup_s:g} s warm-up + {options.phase_s:g} s")
        result = await closed_loop(
            actor_debit_operation(runtime, entity_for, f"bench-{label}", options.command_timeout_s),
            concurrency=concurrency, warmup_s=options.warmup_s, duration_s=options.phase_s,
            finish_timeout_s=options.command_timeout_s + 5,
        )
        await self._account(runtime, label, result.completed)
        return result

    async def _naive_phase(self, runtime: Runtime, hot_user: uuid.UUID, concurrency: int) -> LoadResult:
        options = self.options
        self.say(f"naive locking: {options.naive_processes} processes, {concurrency} in flight, "
                 f"{options.warmup_s:g} s warm-up + {options.phase_s:g} s")
        result, cpu_s = await measure_naive(self.database_url, hot_user, options, concurrency, self.work_dir)
        await self._account(runtime, f"naive_locking_{concurrency}", result.completed, python_cpu_s=cpu_s)
        return result

    async def _pgbench(self) -> list[PgbenchResult]:
        from powerbank.storage.testing import POSTGRES_ADMIN_DSN

        runs = []
        for clients in self.options.pgbench_clients:
            self.say(f"pgbench single-row UPDATE: {clients} clients, {self.options.pgbench_s} s")
            runs.append(await run_pgbench(
                POSTGRES_ADMIN_DSN, self.database_name, PGBENCH_SQL,
                clients=clients, duration_s=self.options.pgbench_s, work_dir=self.work_dir,
            ))
        return runs

    async def close(self) -> None:
        """Stop everything this run started and remove its database and Redis data, even after
        an error or a cancellation; logs are kept when the run failed."""
        from powerbank.storage.testing import isolated_redis_url

        if self.backend is not None:
            await _quietly(self.backend.stop())
        await _quietly(self.pool.astop())
        if self.database_name is not None:
            await _quietly(_drop_database(self.database_name))
        if self.redis_url:
            await _quietly(asyncio.to_thread(isolated_redis_url, self.options.redis_db))
        if self.failed:
            self.say(f"[yellow]logs kept in {self.work_dir}[/yellow]")
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)


async def _drop_database(name: str, attempts: int = 5, delay_s: float = 3.0) -> None:
    """Drop the run's database, retrying while the shared server is out of connection slots
    (the failure that most often ends a run early), so no run leaves a database behind."""
    from powerbank.storage.testing import drop_postgres_database

    for attempt in range(1, attempts + 1):
        try:
            await drop_postgres_database(name)
            return
        except Exception:
            if attempt == attempts:
                print(f"bench: could not drop database {name}; drop it by hand", file=sys.stderr)
                raise
            await asyncio.sleep(delay_s)


async def _quietly(awaitable) -> None:
    """Cleanup must go on past one failing step (and past a pending cancellation)."""
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(awaitable)), 60)
    except BaseException as error:  # noqa: BLE001 - reported, never fatal during cleanup
        print(f"bench: cleanup step failed: {error!r}", file=sys.stderr)


async def run_benchmark(options: BenchOptions, console) -> dict[str, Any]:
    run = Run(options, console)
    try:
        return await asyncio.wait_for(run.execute(), options.total_timeout_s)
    finally:
        await run.close()


# --- output ----------------------------------------------------------------------------------


def print_report(console, summary: dict[str, Any]) -> None:
    """The human-readable half: headline figures against their goals, then the references."""
    from rich.table import Table

    if "error" in summary:
        console.print(f"[red]benchmark failed:[/red] {summary['error']}")
        return
    table = Table(title="powerbank bench actors", show_lines=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("goal")
    goals = {key.split(" ")[0]: (key, met) for key, met in summary["goals"].items()}
    for key in (
        "idle_roundtrip_p50_ms", "idle_roundtrip_p99_ms", "idle_noop_roundtrip_p50_ms", "independent_commands_per_s",
        "hot_entity_commands_per_s", "pgbench_hot_row_tps", "hot_entity_vs_pgbench",
        "naive_locking_commands_per_s", "vs_naive_locking", "redis_lpush_per_s", "independent_vs_redis_lpush",
    ):
        goal = ""
        if key in goals:
            text_goal, met = goals[key]
            goal = f"[{'green' if met else 'red'}]{text_goal.split(' ', 1)[1]} {'met' if met else 'not met'}[/]"
        table.add_row(key, f"{summary[key]:g}", goal)
    console.print(table)
    pgbench = ", ".join(f"{run['clients']} clients {run['tps']:.0f} tps" for run in summary["phases"]["pgbench"])
    console.print(f"pgbench (reference = best): {pgbench}")
    naive = ", ".join(f"{run['concurrency']} in flight {run['ok_per_s']:.0f}/s" for run in summary["phases"]["naive_locking"])
    console.print(f"naive locking (reference = best): {naive}")
    hot = ", ".join(f"{run['concurrency']} in flight {run['ok_per_s']:.0f}/s" for run in summary["phases"]["hot_entity"])
    console.print(f"hot entity (figure = best): {hot}")
    for label, data in summary["db_activity"].items():
        cpu = data.get("python_cpu_ms_per_command")
        cpu_note = f", Python CPU {cpu:g} ms" if cpu is not None else ""
        console.print(f"per command, {label}: {data['commits_per_command']:g} commits{cpu_note}")
    for phase in ("idle", "idle_noop"):
        legs = summary["phases"][phase]["legs_p50_ms"]
        legs_text = ", ".join(f"{leg} {value:g}" for leg, value in legs.items())
        console.print(f"idle round trip legs of {summary['phases'][phase]['command']} (p50 ms): {legs_text}")
    audit_report = summary["audit"]
    console.print(f"ledger audit: {'[green]clean[/green]' if audit_report['ok'] else '[red]PROBLEMS[/red]'} {audit_report}")


def main(argv: list[str]) -> int:
    """`powerbank bench actors [options]`: figures on stderr, the JSON line last on stdout."""
    from rich.console import Console

    options = parse_options(argv)
    console = Console(stderr=True, soft_wrap=True)
    code = 1
    try:
        summary = asyncio.run(run_benchmark(options, console))
        code = 0 if summary["audit"]["ok"] and summary["errors"] == 0 else 1
    except KeyboardInterrupt:
        summary, code = {"error": "interrupted"}, 130
    except Exception as error:  # noqa: BLE001 - a benchmark reports its failure as its result
        console.print_exception()
        summary = {"error": repr(error)}
    print_report(console, summary)
    print(json_line(summary), flush=True)
    return code

"""The actor runtime: every mutation of a Station, Rental or Wallet is a command in that entity's
mailbox, applied one at a time, in order, exactly once.

Why it holds, in short (docs/actors.md has the long form):
- The mailbox is a table. A command is *accepted* when its row commits; its id orders it
  within the entity; (kind, command_id) is unique, so a re-sent command is not accepted twice
  and its caller gets the stored result.
- A Dramatiq message only rings the doorbell ("entity X has mail"). Duplicate, late or reordered
  doorbells are harmless because the order comes from the table, not from the queue.
- Whoever drains an entity first takes an entity lock (a PostgreSQL advisory transaction lock
  across processes; an in-process flag in the embedded mode), then applies the pending commands
  in id order inside one transaction, together with their follow-up commands to other entities
  and their outbox rows. A crash rolls all of it back; the doorbell is redelivered or the sweeper
  rings again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.actors import mailbox, metrics, user_events
from powerbank.actors.mailbox import Envelope, Pending
from powerbank.storage.db import insert_unless_exists
from powerbank.storage.models import ActorCommand, OutboxMessage
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

Handler = Callable[["ActorContext", str, dict[str, Any]], Awaitable[dict[str, Any] | None]]
BatchHandler = Callable[["ActorContext", str, list[dict[str, Any]]], Awaitable[list[dict[str, Any]]]]
IdleBatchHandler = Callable[["ActorContext", list[tuple[str, dict[str, Any]]]], Awaitable[list[dict[str, Any] | None]]]
HANDLERS: dict[tuple[str, str], Handler] = {}
BATCH_HANDLERS: dict[tuple[str, str], BatchHandler] = {}
IDLE_BATCH_HANDLERS: dict[tuple[str, str], IdleBatchHandler] = {}
DEFAULT_BATCH_SIZE = 256
# An unexpected error (a lost race on a unique key, a dropped connection) is retried this many
# times, in order, before the command is marked failed and its mailbox moves on.
MAX_ATTEMPTS = 5
RETRY_DELAY_S = 0.05
# The single-writer pump applies every kind at once, so it takes bigger batches.
PUMP_BATCH_FACTOR = 4
# ... but no longer than this per transaction: SQLite has one writer, and every submit, the
# scheduler and the web process queue behind the pump's transaction. A thousand station boots
# in one transaction held it for many seconds under a login storm.
MAX_PUMP_TRANSACTION_S = 0.25
# Outbox rows delivered per statement by the single writer's background delivery (flush_outbox
# reads at most 500 at a time).
OUTBOX_DELIVERY_BATCH = 500
# A single writer's doorbell not answered within this long is taken as lost and rung again.
PUMP_DOORBELL_OVERDUE_S = 1.0
# How soon a drainer that found the entity locked by another process asks again.
LOCK_RETRY_DELAY_S = 0.01
# Follow-up drains a worker runs at once, each holding a connection; past this it rings instead.
FOLLOW_UPS_MAX = 8


def handles(kind: str, name: str) -> Callable[[Handler], Handler]:
    """Register the function that applies command `name` to an entity of `kind`."""

    def register(fn: Handler) -> Handler:
        HANDLERS[(kind, name)] = fn
        return fn

    return register


def handles_batch(kind: str, name: str) -> Callable[[BatchHandler], BatchHandler]:
    """Register a function that applies a run of consecutive `name` commands to one entity at
    once: it gets their payloads in order and returns one result each, deciding in memory and
    writing with a few set-based statements instead of a few per command. A refusal is a result
    (`CommandRejected(...).as_result()`) and must leave no write behind; raising fails the whole
    run, which the runtime then redoes one command at a time (a run of one)."""

    def register(fn: BatchHandler) -> BatchHandler:
        BATCH_HANDLERS[(kind, name)] = fn
        return fn

    return register


def handles_idle_batch(kind: str, name: str) -> Callable[[IdleBatchHandler], IdleBatchHandler]:
    """Register a function that applies one `name` command to each of many *idle* entities of
    `kind` at once (`Runtime.apply_idle_batch`): it gets (entity id, payload) pairs, one per
    entity, each entity locked with an empty mailbox, and returns per pair either a result (it
    applied the command, with a few set-based statements for the whole batch) or None (it
    declined: that command goes to the mailbox as usual, so a declined command must leave no
    write behind)."""

    def register(fn: IdleBatchHandler) -> IdleBatchHandler:
        IDLE_BATCH_HANDLERS[(kind, name)] = fn
        return fn

    return register


class CommandRejected(Exception):
    """A handler's way to refuse a command: the refusal is the command's result, not a crash."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details

    def as_result(self) -> dict[str, Any]:
        return {"ok": False, "reason": self.reason, **self.details}


@dataclass
class CommandOutcome:
    status: str  # "pending", "applied" or "failed"
    result: dict[str, Any] | None
    duplicate: bool = False


@dataclass
class ActorContext:
    """What a handler may touch: the open transaction, and ways to say things that happen only
    if this transaction commits."""

    session: AsyncSession
    now: datetime
    sent: list[Envelope] = field(default_factory=list)
    notifications: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    outbox_ids: list[int] = field(default_factory=list)
    settled: list[Pending] = field(default_factory=list)
    retry: list[tuple[str, str]] = field(default_factory=list)

    def mark(self) -> tuple[int, int, int]:
        return len(self.sent), len(self.notifications), len(self.outbox_ids)

    def rewind(self, marks: tuple[int, int, int]) -> None:
        """Forget what a rolled-back command said: its savepoint undid the writes already."""
        del self.sent[marks[0]:], self.notifications[marks[1]:], self.outbox_ids[marks[2]:]

    async def send(
        self, kind: str, entity_id: str, name: str, payload: dict[str, Any], command_id: str
    ) -> None:
        """Accept a command for another entity in this same transaction."""
        envelope = Envelope(kind, str(entity_id), name, payload, command_id)
        inserted = await insert_command(self.session, envelope)
        if inserted:
            self.sent.append(envelope)

    async def publish_mqtt(self, topic: str, payload: dict[str, Any]) -> None:
        row = OutboxMessage(channel="mqtt", topic=topic, payload=payload, created_at=self.now)
        self.session.add(row)
        await self.session.flush()
        self.outbox_ids.append(row.id)

    def notify(self, channel: str, event: dict[str, Any]) -> None:
        self.notifications.append((channel, event))


class Dispatcher(Protocol):
    def ring(self, kind: str, entity_id: str) -> None: ...


class OutboxSink(Protocol):
    async def deliver(self, messages: list[OutboxMessage]) -> None: ...


class Bus(Protocol):
    async def publish(self, channel: str, message: Any) -> None: ...

    async def publish_many(self, messages: list[tuple[str, Any]]) -> None: ...

    def subscribe(self, *channels: str) -> Any: ...


def result_channel(kind: str, command_id: str) -> str:
    return f"cmd:{kind}:{command_id}"


async def insert_command(session: AsyncSession, envelope: Envelope) -> bool:
    """Insert unless (kind, command_id) exists; True when this call accepted it."""
    result = await session.execute(insert_command_statement(session.bind.dialect.name, envelope))
    return result.rowcount == 1


def insert_command_statement(dialect_name: str, envelope: Envelope):
    values = dict(
        kind=envelope.kind,
        entity_id=envelope.entity_id,
        command_id=envelope.command_id,
        name=envelope.name,
        payload=envelope.payload,
        status="pending",
        attempts=0,
        accepted_at=utcnow(),
    )
    return insert_unless_exists(dialect_name, ActorCommand, values, ["kind", "command_id"])


class EntityLocks(Protocol):
    async def try_lock(self, session: AsyncSession, kind: str, entity_id: str) -> bool: ...

    async def try_lock_idle(self, session: AsyncSession, kind: str, entity_id: str) -> bool:
        """Lock the entity if its mailbox is empty (the idle fast path); False leaves nothing
        to undo but the transaction."""
        ...

    async def try_lock_many(self, session: AsyncSession, kind: str, entity_ids: list[str]) -> set[str]:
        """Lock as many of the entities as are free; the ones locked. Each must be released."""
        ...

    def release(self, kind: str, entity_id: str) -> None: ...


_LOCK_IF_IDLE = text(
    "SELECT pg_try_advisory_xact_lock(:key) AS locked, EXISTS (SELECT 1 FROM actor_commands"
    " WHERE kind = :kind AND entity_id = :entity_id AND status = 'pending') AS pending"
)


class AdvisoryLocks:
    """PostgreSQL transaction-scoped advisory locks: released on commit, rollback or a dead
    connection, so a killed worker can never leave an entity locked."""

    async def try_lock(self, session: AsyncSession, kind: str, entity_id: str) -> bool:
        key = lock_key(kind, entity_id)
        result = await session.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": key})
        return bool(result.scalar_one())

    async def try_lock_idle(self, session: AsyncSession, kind: str, entity_id: str) -> bool:
        # One statement, so its snapshot may predate the lock: it can then see as pending a
        # command the previous holder has just applied (the caller falls back to the queue:
        # safe), or miss one accepted in between, which is then simply applied after this one
        # (it was accepted after this look, as in the two-statement form). It never applies a
        # command from the mailbox, which is why a drain, unlike this, reads after the lock.
        row = (await session.execute(_LOCK_IF_IDLE, {"key": lock_key(kind, entity_id), "kind": kind, "entity_id": entity_id})).one()
        return bool(row.locked) and not row.pending

    async def try_lock_many(self, session: AsyncSession, kind: str, entity_ids: list[str]) -> set[str]:
        by_key = {lock_key(kind, entity_id): entity_id for entity_id in entity_ids}
        rows = await session.execute(_LOCK_MANY, {"keys": list(by_key)})
        return {by_key[key] for (key,) in rows.all()}

    def release(self, kind: str, entity_id: str) -> None:
        return None


_LOCK_MANY = text(
    "SELECT key FROM unnest(CAST(:keys AS bigint[])) AS given(key) WHERE pg_try_advisory_xact_lock(given.key)"
)


class ProcessLocks:
    """For the embedded default, where one process owns the SQLite file."""

    def __init__(self) -> None:
        self._held: set[tuple[str, str]] = set()

    async def try_lock(self, session: AsyncSession, kind: str, entity_id: str) -> bool:
        key = (kind, entity_id)
        if key in self._held:
            return False
        self._held.add(key)
        return True

    async def try_lock_idle(self, session: AsyncSession, kind: str, entity_id: str) -> bool:
        return await self.try_lock(session, kind, entity_id) and not await mailbox.has_pending(session, kind, entity_id)

    async def try_lock_many(self, session: AsyncSession, kind: str, entity_ids: list[str]) -> set[str]:
        return {entity_id for entity_id in entity_ids if await self.try_lock(session, kind, entity_id)}

    def release(self, kind: str, entity_id: str) -> None:
        self._held.discard((kind, entity_id))


def lock_key(kind: str, entity_id: str) -> int:
    digest = hashlib.blake2b(f"{kind}:{entity_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Runtime:
    """Accepts commands, drains mailboxes, and hands committed effects to the outside."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        bus: Bus,
        dispatcher: Dispatcher | None = None,
        outbox_sink: OutboxSink | None = None,
        locks: EntityLocks | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        single_writer: bool = False,
        apply_in_caller: bool = False,
    ) -> None:
        self.sessions = sessions
        self.bus = bus
        self.dispatcher = dispatcher
        self.outbox_sink = outbox_sink
        self.locks = locks or ProcessLocks()
        self.batch_size = batch_size
        self.single_writer = single_writer
        self.apply_in_caller = apply_in_caller
        self._calls_in_flight: dict[tuple[str, str], int] = {}
        self._pumping = False
        self._pump_dirty = False
        self._outbox_queue: list[int] = []  # committed outbox rows for the background delivery
        self._outbox_deliverer: asyncio.Task | None = None
        self._pump_rung_at: float | None = None  # when the outstanding pump doorbell was sent
        self._pump_read_limit = self.batch_size * PUMP_BATCH_FACTOR
        self._draining: set[tuple[str, str]] = set()
        self._drain_again: set[tuple[str, str]] = set()
        self._acceptor = mailbox.Acceptor(self._insert_many)
        # A worker applies the mail its own commits sent (see `_follow_up`); off elsewhere.
        self.follow_up_locally = False
        self._follow_ups: set[asyncio.Task] = set()
        # Commands accepted (or sent by a handler) here and not yet applied here: see `backlog`.
        self._unapplied = 0

    # --- the sending side ------------------------------------------------------------------

    async def submit(
        self,
        kind: str,
        entity_id: str,
        name: str,
        payload: dict[str, Any],
        command_id: str | None = None,
    ) -> CommandOutcome:
        """Accept a command durably and ring the entity's doorbell; does not wait for it."""
        envelope = Envelope(kind, str(entity_id), name, payload, command_id or str(uuid.uuid4()))
        if not await self._accept(envelope):
            metrics.DUPLICATES.labels(kind).inc()
            async with self.sessions() as session:
                return await self._existing_outcome(session, envelope)
        self.ring(kind, envelope.entity_id)
        return CommandOutcome(status="pending", result=None)

    async def _accept(self, envelope: Envelope) -> bool:
        """Durable once this returns; concurrent submits share one INSERT and one commit."""
        return await self._acceptor.accept(envelope)

    async def _insert_many(self, envelopes: list[Envelope]) -> set[tuple[str, str]]:
        """One durable INSERT of many commands. On PostgreSQL in autocommit (one round trip
        instead of BEGIN, INSERT, COMMIT); SQLite keeps its write transaction, which queues the
        single writer."""
        engine = self.sessions.kw["bind"]
        if engine.dialect.name != "postgresql":
            async with self.sessions.begin() as session:
                accepted = await mailbox.accept(session, engine.dialect.name, envelopes)
        else:
            accepted = await mailbox.accept_autocommit(engine, envelopes)
        self._unapplied += len(accepted)
        return accepted

    def backlog(self) -> int | None:
        """On a single writer, the commands waiting in the mailboxes: accepted (or sent by a
        handler) in this process and not yet applied, counted in memory, so it costs no query
        (commands left pending by an earlier run of the process are not counted). The embedded
        broker's login gate watches it (broker/embedded.Admission). None where other processes
        apply commands too, since this process cannot know."""
        return max(0, self._unapplied) if self.single_writer else None

    async def call(
        self,
        kind: str,
        entity_id: str,
        name: str,
        payload: dict[str, Any],
        command_id: str | None = None,
        timeout_s: float = 10.0,
    ) -> dict[str, Any]:
        """Submit and wait until the command is applied; returns its result (the first result
        when the same command id was seen before)."""
        command_id = command_id or str(uuid.uuid4())
        key = (kind, str(entity_id))
        # A call with company (another call to the entity in flight here) goes to the mailbox:
        # a busy entity is served best in batches, not one caller's transaction at a time.
        alone = key not in self._calls_in_flight
        self._calls_in_flight[key] = self._calls_in_flight.get(key, 0) + 1
        try:
            if self.apply_in_caller and alone:
                result = await self._apply_in_caller(Envelope(kind, key[1], name, payload, command_id))
                if result is not None:
                    return result
            async with self.bus.subscribe(result_channel(kind, command_id)) as subscription:
                outcome = await self.submit(kind, entity_id, name, payload, command_id)
                if outcome.status != "pending":
                    return outcome.result or {}
                return await self._await_result(subscription, kind, command_id, timeout_s)
        finally:
            self._calls_in_flight[key] -= 1
            if not self._calls_in_flight[key]:
                del self._calls_in_flight[key]

    async def _apply_in_caller(self, envelope: Envelope) -> dict[str, Any] | None:
        """The idle fast path: when nobody drains the entity and its mailbox is empty, accept and
        apply the command right here, in one transaction, under the same entity lock a worker
        would take. It is the command the worker would apply next anyway, so the promises are the
        same; what it saves is the separate accept commit, the doorbell, the wake-up and the
        result's trip back over the bus.

        None means "queue it as usual": the entity is busy or has mail, the handler refused or
        raised (the worker applies it with savepoints and retries), the command id exists, or the
        command wrote an MQTT message and this process cannot deliver one. Everything it did is
        rolled back first."""
        row = Pending(0, envelope.kind, envelope.entity_id, envelope.command_id, envelope.name, envelope.payload, 0, utcnow())
        async with self.sessions() as session:
            await session.begin()
            try:
                ctx = await self._apply_alone(session, row)
                if ctx is None:
                    await session.rollback()
                    return None
                await session.commit()
            finally:
                self.locks.release(row.kind, row.entity_id)
        metrics.APPLIED_IN_CALLER.labels(row.kind).inc()
        _record_batch(row.kind, ctx)
        self._unapplied += len(ctx.sent)
        # Nobody else can be waiting for this result: a concurrent submit of the same id either
        # found the row and reads it, or made this insert fail. So only the effects go out.
        ctx.settled = []
        await self._after_commit(ctx)
        return row.result

    async def _apply_alone(self, session: AsyncSession, row: Pending) -> ActorContext | None:
        if not await self.locks.try_lock_idle(session, row.kind, row.entity_id):
            return None
        ctx = ActorContext(session=session, now=row.accepted_at)
        started = time.perf_counter()
        try:
            results = await _run_handler(ctx, [row])
        except Exception:  # refusals too: the queued path undoes a refusal's writes properly
            return None
        if results is None or (ctx.outbox_ids and self.outbox_sink is None):
            return None
        self._settle_run(ctx, [row], results, time.perf_counter() - started)
        if not await mailbox.insert_applied(session, row):
            return None
        await user_events.record(session, ctx.notifications, ctx.now)
        return ctx

    async def apply_idle_batch(self, kind: str, name: str, envelopes: list[Envelope]) -> list[dict[str, Any] | None]:
        """The idle fast path for many entities at once: in one transaction, the commands of
        the entities that are free (their lock taken) and have nothing pending are applied by
        the kind's `handles_idle_batch` handler and recorded as applied commands, with set-based
        statements for the whole batch. Returns each envelope's result, or None for the ones
        left alone (an entity busy, with mail, named twice, a command id seen before, or
        declined by the handler): the caller submits those as usual.

        Why the promises hold: this is `call`'s idle fast path (docs/actors.md) per entity. The
        command is applied under the entity's lock, after a read (its own statement, after the
        lock) found its mailbox empty, so it is the command the entity would apply next; it is
        recorded as applied in the same transaction as its effect (a crash keeps both or
        neither); its id is unique, so a repeat finds the row and is a duplicate. On a single
        writer the write transaction itself excludes the pump."""
        handler = IDLE_BATCH_HANDLERS.get((kind, name))
        results: list[dict[str, Any] | None] = [None] * len(envelopes)
        if handler is None or not envelopes:
            return results
        first: dict[str, int] = {}
        for index, envelope in enumerate(envelopes):
            first.setdefault(envelope.entity_id, index)
        locked: set[str] = set()
        async with self.sessions() as session:
            ctx = ActorContext(session=session, now=utcnow())
            await session.begin()
            try:
                locked = await self.locks.try_lock_many(session, kind, list(first))
                idle = locked - await mailbox.pending_entities(session, kind, list(locked))
                seen = await mailbox.existing_command_ids(session, kind, [envelopes[i].command_id for i in first.values()])
                chosen = [i for e, i in first.items() if e in idle and envelopes[i].command_id not in seen]
                if not chosen:
                    await session.rollback()
                    return results
                started = time.perf_counter()
                answers = await handler(ctx, [(envelopes[i].entity_id, envelopes[i].payload) for i in chosen])
                if len(answers) != len(chosen):
                    raise RuntimeError(f"{(kind, name)} answered {len(answers)} of {len(chosen)} commands")
                rows = [
                    Pending(0, kind, envelopes[i].entity_id, envelopes[i].command_id, name, envelopes[i].payload, 0,
                            ctx.now, status="applied", result=answer or {"ok": True}, applied_at=ctx.now, changed=True)
                    for i, answer in zip(chosen, answers) if answer is not None
                ]
                if not rows or ctx.outbox_ids:
                    await session.rollback()
                    return results
                if await mailbox.insert_applied_many(session, rows) != len(rows):
                    # A command id accepted meanwhile elsewhere: leave all of it to the mailbox.
                    await session.rollback()
                    return results
                await user_events.record(session, ctx.notifications, ctx.now)
                await session.commit()
            except BaseException:
                await session.rollback()
                raise
            finally:
                for entity_id in locked:
                    self.locks.release(kind, entity_id)
        elapsed_s = time.perf_counter() - started
        metrics.APPLIED_IN_CALLER.labels(kind).inc(len(rows))
        ctx.settled = rows
        _record_batch(kind, ctx)
        self._unapplied += len(ctx.sent)
        for row in rows:
            metrics.APPLY_SECONDS.labels(kind).observe(elapsed_s / len(rows))
        # Nobody waits for these results (a concurrent submit of the same id would have made
        # the insert fail), so only the effects go out, as in `call`'s fast path.
        ctx.settled = []
        await self._after_commit(ctx)
        by_command = {row.command_id: row.result for row in rows}
        return [by_command.get(envelope.command_id) if first[envelope.entity_id] == index else None
                for index, envelope in enumerate(envelopes)]

    async def _await_result(self, subscription, kind: str, command_id: str, timeout_s: float):
        try:
            _, message = await subscription.get(timeout_s)
            return message
        except TimeoutError:
            # The bus is not the source of truth: the result may have committed unseen.
            outcome = await self.outcome(kind, command_id)
            if outcome is not None and outcome.status != "pending":
                return outcome.result or {}
            raise

    async def has_pending(self, kind: str, entity_id: str) -> bool:
        """A cheap look (no lock, no write) before a fallback doorbell opens a transaction."""
        async with self.sessions() as session:
            found = await session.scalar(
                select(ActorCommand.id)
                .where(ActorCommand.kind == kind, ActorCommand.entity_id == entity_id, ActorCommand.status == "pending")
                .limit(1)
            )
            return found is not None

    async def outcome(self, kind: str, command_id: str) -> CommandOutcome | None:
        async with self.sessions() as session:
            row = await _find_command(session, kind, command_id)
            return None if row is None else CommandOutcome(row.status, row.result, duplicate=True)

    async def _existing_outcome(self, session: AsyncSession, envelope: Envelope) -> CommandOutcome:
        row = await _find_command(session, envelope.kind, envelope.command_id)
        if row.entity_id != envelope.entity_id or row.name != envelope.name:
            raise ValueError(f"command id {envelope.command_id!r} reused for a different command")
        return CommandOutcome(status=row.status, result=row.result, duplicate=True)

    def ring(self, kind: str, entity_id: str) -> None:
        if self.dispatcher is None or (self.single_writer and not self._pump_needs_doorbell()):
            return
        self.dispatcher.ring(kind, entity_id)

    def _pump_needs_doorbell(self) -> bool:
        """On a single writer every doorbell runs the same pump over every mailbox, so one is
        enough: while the pump runs it is told to look again, and while a doorbell is on its
        way no other is sent (unless it is overdue: it may have been lost).

        One doorbell per submit was a Dramatiq message each (JSON-encoded, a uuid, a queue
        hop) that found a running pump and returned; at 3,000 booting stations they and the
        scheduler's sweep of stalled mailboxes (a doorbell per entity) took a tenth of the
        event loop (`powerbank bench stations`, py-spy)."""
        if self._pumping:
            self._pump_dirty = True
            return False
        now_s = time.monotonic()
        if self._pump_rung_at is not None and now_s - self._pump_rung_at < PUMP_DOORBELL_OVERDUE_S:
            return False
        self._pump_rung_at = now_s
        return True

    # --- the applying side -----------------------------------------------------------------

    async def drain(self, kind: str, entity_id: str) -> int:
        """Apply the entity's pending commands, a batch per transaction, until none is left.

        Returns how many were applied here; 0 also when another drainer holds the entity (it
        keeps going until the mailbox is empty, and re-rings when it saw a late arrival).

        On a single-writer database (the embedded SQLite default) every doorbell drains all
        mailboxes instead: writes serialize there anyway, so one pump applying every pending
        command in acceptance order, many per commit, is both correct and far faster than one
        transaction per entity queueing on the write lock."""
        if self.single_writer:
            return await self._pump_all()
        key = (kind, entity_id)
        if key in self._draining:
            # This process is draining the entity already: have that drainer look once more,
            # rather than queue a second one behind the lock.
            self._drain_again.add(key)
            return 0
        self._draining.add(key)
        try:
            return await self._drain_entity(kind, entity_id)
        finally:
            self._draining.discard(key)

    async def _drain_entity(self, kind: str, entity_id: str) -> int:
        key, applied = (kind, entity_id), 0
        while True:
            self._drain_again.discard(key)
            batch = await self._drain_batch(kind, entity_id)
            if batch is None:
                # Another drainer held the entity. Our re-ring may already have come back while
                # this drain was still closing; it only said "drain again", so look once more.
                if key not in self._drain_again:
                    return applied
                continue
            applied += batch
            # A short batch emptied the mailbox as of its read; anything accepted since has
            # rung its own doorbell (here it set "drain again"; elsewhere it retries the lock).
            if batch < self.batch_size and key not in self._drain_again:
                return applied

    async def _pump_all(self) -> int:
        self._pump_rung_at = None  # the doorbell arrived; the next submit rings again
        if self._pumping:
            # The running pump may have read the mailboxes before this command committed.
            self._pump_dirty = True
            return 0
        self._pumping = True
        applied = 0
        try:
            while True:
                self._pump_dirty = False
                batch = await self._drain_batch(None, None)
                applied += batch or 0
                if batch < self.batch_size * PUMP_BATCH_FACTOR and not self._pump_dirty:
                    return applied
                # Let whoever waits for the writer (a submit, the scheduler) have it first.
                await asyncio.sleep(0)
        finally:
            self._pumping = False

    async def _drain_batch(self, kind: str | None, entity_id: str | None) -> int | None:
        """One transaction's worth. Optimistically without savepoints (two round trips saved
        per command); if any command raises, that transaction is rolled back whole and the
        batch is redone with a savepoint around each command, so only the culprit is undone."""
        applied = await self._drain_transaction(kind, entity_id, careful=False)
        if applied is _REDO:
            applied = await self._drain_transaction(kind, entity_id, careful=True)
        return applied

    async def _drain_transaction(self, kind: str | None, entity_id: str | None, *, careful: bool):
        async with self.sessions() as session:
            await session.begin()
            # The lock is its own statement, before the mailbox read: at READ COMMITTED the read
            # then gets a snapshot taken after the previous holder committed (docs/actors.md).
            if kind is not None and not await self.locks.try_lock(session, kind, entity_id):
                await session.rollback()
                metrics.LOCK_BUSY.labels(kind).inc()
                self._ring_later(kind, entity_id)
                return None
            try:
                try:
                    ctx, rows = await self._apply_pending(session, kind, entity_id, careful)
                except _NeedsSavepoints:
                    await session.rollback()
                    return _REDO
                await user_events.record(session, ctx.notifications, ctx.now)
                await session.commit()
            finally:
                if kind is not None:
                    self.locks.release(kind, entity_id)
        _record_batch(kind or metrics.ALL_KINDS, ctx)
        self._unapplied += len(ctx.sent) - len(ctx.settled)
        if rows:
            await self._after_commit(ctx)
        for retry_kind, retry_entity in ctx.retry:
            self._ring_later(retry_kind, retry_entity, delay_s=RETRY_DELAY_S)
        return len(ctx.settled)

    async def _apply_pending(self, session: AsyncSession, kind: str | None, entity_id: str | None, careful: bool):
        """Pending commands in acceptance order: one entity's, or (single writer) everyone's."""
        limit = self.batch_size if kind is not None else self._pump_read_limit
        rows = await mailbox.read_pending(session, kind, entity_id, limit)
        ctx = ActorContext(session=session, now=utcnow())
        held_back: set[tuple[str, str]] = set()
        started = time.perf_counter()
        for run in _runs(rows, careful):
            if kind is None and ctx.settled and time.perf_counter() - started > MAX_PUMP_TRANSACTION_S:
                self._pump_dirty = True  # the rest stays pending for the next transaction
                break
            if run[0].entity in held_back:
                continue  # an earlier command of this entity is waiting for another attempt
            applied = await (self._apply_one(ctx, run[0]) if careful else self._apply_run(ctx, run))
            if not applied:
                held_back.add(run[0].entity)
                ctx.retry.append(run[0].entity)
        if kind is None:
            self._size_next_pump_read(len(rows) >= limit, len(ctx.settled))
        await mailbox.save(session, rows)
        return ctx, rows

    def _size_next_pump_read(self, read_was_full: bool, applied: int) -> None:
        """Read about what one transaction gets through: rows read and not applied are decoded
        again by the next read. After a full read more may be waiting."""
        if read_was_full:
            self._pump_dirty = True
        self._pump_read_limit = max(self.batch_size // 4, min(2 * applied, self.batch_size * PUMP_BATCH_FACTOR))

    async def _apply_run(self, ctx: ActorContext, run: list[Pending]) -> bool:
        started = time.perf_counter()
        try:
            results = await _run_handler(ctx, run)
        except Exception as error:  # refusals included: they may come after a write
            raise _NeedsSavepoints from error
        self._settle_run(ctx, run, results, time.perf_counter() - started)
        return True

    async def _apply_one(self, ctx: ActorContext, row: Pending) -> bool:
        """Apply one command in a savepoint. False when it hit an unexpected error and stays
        pending for another attempt (the entity's later commands must wait behind it)."""
        marks = ctx.mark()
        started = time.perf_counter()
        try:
            async with ctx.session.begin_nested():
                results = await _run_handler(ctx, [row])
            self._settle_run(ctx, [row], results, time.perf_counter() - started)
        except CommandRejected as rejection:
            ctx.rewind(marks)
            self._settle(ctx, row, "applied", rejection.as_result())
        except Exception:
            ctx.rewind(marks)
            row.attempts += 1
            row.changed = True
            log.exception("command %s on %s/%s failed (attempt %d)", row.name, row.kind, row.entity_id, row.attempts)
            if row.attempts < MAX_ATTEMPTS:
                metrics.RETRIED.labels(row.kind).inc()
                return False
            self._settle(ctx, row, "failed", {"ok": False, "reason": "internal_error"})
        return True

    def _settle_run(self, ctx: ActorContext, run: list[Pending], results: list | None, elapsed_s: float) -> None:
        if results is None:
            for row in run:
                self._settle(ctx, row, "failed", {"ok": False, "reason": "unknown_command"})
            return
        apply_seconds = metrics.APPLY_SECONDS.labels(run[0].kind)
        for row, result in zip(run, results):
            apply_seconds.observe(elapsed_s / len(run))
            self._settle(ctx, row, "applied", result or {"ok": True})

    @staticmethod
    def _settle(ctx: ActorContext, row: Pending, status: str, result: dict[str, Any]) -> None:
        row.status, row.result, row.applied_at, row.changed = status, result, ctx.now, True
        ctx.settled.append(row)

    async def _after_commit(self, ctx: ActorContext) -> None:
        for envelope in ctx.sent:
            if self.follow_up_locally:
                self._follow_up(envelope.kind, envelope.entity_id)
            else:
                self.ring(envelope.kind, envelope.entity_id)
        results = [(result_channel(row.kind, row.command_id), row.result) for row in ctx.settled]
        await self.bus.publish_many(results + ctx.notifications)
        if ctx.outbox_ids and self.outbox_sink is not None:
            if self.single_writer:
                self._deliver_in_background(ctx.outbox_ids)
                return
            try:
                await self.flush_outbox(ctx.outbox_ids)
            except Exception as error:  # the rows stay unsent; the scheduler publishes them later
                log.warning("outbox delivery deferred: %r", error)

    def _follow_up(self, kind: str, entity_id: str) -> None:
        """Drain the recipient of mail this worker just committed, here and now, instead of
        ringing for some worker to pop it: a rental's next step starts without a Redis round
        trip and a wake-up in another process (each hop of a rental was ~12 ms at idle,
        `powerbank loadtest`). It is an ordinary drain (same lock, same mailbox order), so which
        worker applies the command changes nothing.

        No Dramatiq doorbell either: its consumer took ~40% of a loaded worker's busy time (a
        py-spy profile under `powerbank loadtest`), and what it guards, this process dying before
        the drain commits, the scheduler's stalled-mailbox sweep covers (pending for 2 s, swept
        every 5 s). Past `FOLLOW_UPS_MAX` drains in flight the mail is rung as usual."""
        if len(self._follow_ups) >= FOLLOW_UPS_MAX:
            self.ring(kind, entity_id)
            return
        task = asyncio.get_running_loop().create_task(self._drain_follow_up(kind, entity_id))
        self._follow_ups.add(task)
        task.add_done_callback(self._follow_ups.discard)

    async def _drain_follow_up(self, kind: str, entity_id: str) -> None:
        try:
            await self.drain(kind, entity_id)
        except Exception:
            # Pending still: the next look at the entity applies it, at the latest the scheduler's sweep.
            log.exception("follow-up drain of %s/%s failed", kind, entity_id)
            self._ring_later(kind, entity_id, delay_s=RETRY_DELAY_S)

    def _deliver_in_background(self, outbox_ids: list[int]) -> None:
        """The single writer's pump does not wait for MQTT: its commits' outbox rows queue here
        and one task delivers them, batch after batch in commit order (so a station's messages
        keep their order), while the pump goes on applying. Waiting for every PUBACK held the
        one pump, and with it every station's boot, for about a second per transaction at 5,000
        booting stations (`powerbank bench stations`). Rows not delivered stay unsent and the
        scheduler's flush publishes them, as before."""
        self._outbox_queue.extend(outbox_ids)
        if self._outbox_deliverer is None or self._outbox_deliverer.done():
            self._outbox_deliverer = asyncio.get_running_loop().create_task(self._deliver_queued())

    async def _deliver_queued(self) -> None:
        while self._outbox_queue:
            ids = self._outbox_queue[:OUTBOX_DELIVERY_BATCH]
            del self._outbox_queue[:OUTBOX_DELIVERY_BATCH]
            try:
                await self.flush_outbox(ids)
            except Exception as error:  # the rows stay unsent; the scheduler publishes them later
                log.warning("outbox delivery deferred: %r", error)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Give the background delivery `timeout_s` to finish, then stop it (what it had not
        published stays unsent in the outbox for the next flush)."""
        deliverer = self._outbox_deliverer
        if deliverer is None or deliverer.done():
            return
        await asyncio.wait([deliverer], timeout=timeout_s)
        deliverer.cancel()
        await asyncio.gather(deliverer, return_exceptions=True)

    async def wait_delivered(self) -> None:
        """Until the background delivery (single writer) has nothing queued."""
        while self._outbox_deliverer is not None and not self._outbox_deliverer.done():
            await asyncio.shield(self._outbox_deliverer)

    def _ring_later(self, kind: str, entity_id: str, delay_s: float = LOCK_RETRY_DELAY_S) -> None:
        """Ask again shortly: another drainer holds the entity and may have looked at the
        mailbox just before our command committed, or a command waits for another attempt."""
        if self.dispatcher is not None:
            # The command already has its durable doorbell; a re-check only needs the fast one.
            ring = getattr(self.dispatcher, "ring_soon", self.dispatcher.ring)
            asyncio.get_running_loop().call_later(delay_s, ring, kind, entity_id)

    # --- outbox and recovery ---------------------------------------------------------------

    async def flush_outbox(self, ids: list[int] | None = None) -> int:
        """Deliver unsent outbox rows (these, or all) and mark them sent. Delivery is at least
        once: a crash between publish and mark re-sends, and receivers dedupe by command id."""
        if self.outbox_sink is None:
            return 0
        async with self.sessions() as session:
            query = select(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
            if ids is not None:
                query = query.where(OutboxMessage.id.in_(ids))
            messages = list((await session.execute(query.order_by(OutboxMessage.id).limit(500))).scalars())
        if not messages:
            return 0
        await self.outbox_sink.deliver(messages)
        async with self.sessions.begin() as session:
            await session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id.in_([m.id for m in messages]))
                .values(sent_at=utcnow())
            )
        return len(messages)

    async def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Until no command is pending (True), or the deadline (False). For orderly shutdowns
        and end-of-run audits, not for the hot path."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while await pending_count(self.sessions):
            if loop.time() > deadline:
                return False
            await self.ring_stalled(older_than_s=0.5)
            await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(self.wait_delivered(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            return False
        return True

    async def ring_stalled(self, older_than_s: float = 2.0) -> int:
        """Ring every entity with a command pending longer than `older_than_s`: recovers from a
        doorbell lost with a crashed process. Ringing twice is harmless."""
        cutoff = utcnow().timestamp() - older_than_s
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(ActorCommand.kind, ActorCommand.entity_id, ActorCommand.accepted_at)
                    .where(ActorCommand.status == "pending")
                    .order_by(ActorCommand.id)
                    .limit(5000)
                )
            ).all()
        stalled = {(k, e) for k, e, accepted in rows if accepted.timestamp() < cutoff}
        for kind, entity_id in stalled:
            self.ring(kind, entity_id)
        return len(stalled)


async def _run_handler(ctx: ActorContext, run: list[Pending]) -> list[dict[str, Any] | None] | None:
    """The run's results in order, through its batch handler or its one-command handler; None
    when nobody handles the command."""
    key = (run[0].kind, run[0].name)
    batch_handler = BATCH_HANDLERS.get(key)
    if batch_handler is not None:
        results = await batch_handler(ctx, run[0].entity_id, [row.payload for row in run])
        if len(results) != len(run):
            raise RuntimeError(f"{key} returned {len(results)} results for {len(run)} commands")
        return results
    handler = HANDLERS.get(key)
    if handler is None:
        return None
    return [await handler(ctx, run[0].entity_id, run[0].payload)]


def _runs(rows: list[Pending], careful: bool):
    """Consecutive commands of one entity and name that a batch handler takes go together;
    every other command alone, and every command alone when applying carefully."""
    run: list[Pending] = []
    for row in rows:
        if run and not careful and row.entity == run[0].entity and row.name == run[0].name and (row.kind, row.name) in BATCH_HANDLERS:
            run.append(row)
            continue
        if run:
            yield run
        run = [row]
    if run:
        yield run


class _NeedsSavepoints(Exception):
    """A command raised during an optimistic batch: redo the batch with savepoints."""


_REDO = object()


def _record_batch(label: str, ctx: ActorContext) -> None:
    """After the commit: how many commands it applied, and how long each waited in its mailbox."""
    if not ctx.settled:
        metrics.EMPTY_DRAINS.labels(label).inc()
        return
    metrics.BATCH_SIZE.labels(label).observe(len(ctx.settled))
    committed_at = utcnow()
    outcomes: dict[tuple[str, str], int] = {}
    for row in ctx.settled:
        outcomes[(row.kind, row.status)] = outcomes.get((row.kind, row.status), 0) + 1
    for (kind, status), count in outcomes.items():
        (metrics.FAILED if status == "failed" else metrics.APPLIED).labels(kind).inc(count)
    latency = {kind: metrics.COMMAND_LATENCY_SECONDS.labels(kind) for kind, _ in outcomes}
    for row in ctx.settled:
        latency[row.kind].observe((committed_at - row.accepted_at).total_seconds())


async def pending_count(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return int(
            await session.scalar(
                select(func.count()).select_from(ActorCommand).where(ActorCommand.status == "pending")
            )
            or 0
        )


async def _find_command(session: AsyncSession, kind: str, command_id: str) -> ActorCommand | None:
    return (
        await session.execute(
            select(ActorCommand).where(ActorCommand.kind == kind, ActorCommand.command_id == command_id)
        )
    ).scalar_one_or_none()


_current: Runtime | None = None


def install(runtime: Runtime) -> Runtime:
    """Make `runtime` the one the Dramatiq actors of this process drain with."""
    global _current
    _current = runtime
    return runtime


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("no actor runtime installed in this process")
    return _current

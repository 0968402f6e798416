"""The mailbox table, row by row and many rows at a time.

Core statements on plain rows, no ORM objects: draining is the hottest loop of the system, and
per-object identity bookkeeping cost more than the SQL itself. On PostgreSQL the many-row
statements take arrays (`unnest`): one fixed prepared statement for any number of rows, where a
multi-row VALUES list would be a new statement, with thousands of parameters, for each batch
size. Three operations:
- accept: insert many commands in one statement, each unless its (kind, command_id) exists;
- read: an entity's (or, on a single writer, everyone's) pending commands in acceptance order;
- save: write back what applying them decided, in one batched statement.

`Acceptor` groups concurrent submits into one accept, so N callers at once cost one round trip
and one commit instead of N (group commit, as a database does for its log).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from powerbank.storage.models import ActorCommand
from powerbank.storage.types import utcnow

TABLE = ActorCommand.__table__
PENDING = "pending"
# One statement's worth of commands; a bigger backlog goes in several statements.
MAX_ACCEPT_BATCH = 512


@dataclass(slots=True)
class Envelope:
    kind: str
    entity_id: str
    name: str
    payload: dict[str, Any]
    command_id: str


@dataclass(slots=True)
class Pending:
    """A mailbox row being applied; `status`, `result` and `attempts` change in memory and are
    written back by `save`."""

    id: int
    kind: str
    entity_id: str
    command_id: str
    name: str
    payload: dict[str, Any]
    attempts: int
    accepted_at: datetime
    status: str = PENDING
    result: dict[str, Any] | None = None
    applied_at: datetime | None = None
    changed: bool = False

    @property
    def entity(self) -> tuple[str, str]:
        return self.kind, self.entity_id


_READ_COLUMNS = [getattr(TABLE.c, name) for name in (
    "id", "kind", "entity_id", "command_id", "name", "payload", "attempts", "accepted_at",
)]


def accept_statement(dialect_name: str):
    """INSERT … ON CONFLICT DO NOTHING RETURNING: the (kind, command_id) pairs it returns were
    accepted by this statement, the others existed already. Executed with many parameter sets,
    which SQLAlchemy sends as one multi-row statement from one cached compilation."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return (
        dialect.insert(TABLE)
        .on_conflict_do_nothing(index_elements=["kind", "command_id"])
        .returning(TABLE.c.kind, TABLE.c.command_id)
    )


def _row(envelope: Envelope, accepted_at: datetime) -> dict[str, Any]:
    return dict(
        kind=envelope.kind, entity_id=envelope.entity_id, command_id=envelope.command_id, name=envelope.name,
        payload=envelope.payload, status=PENDING, attempts=0, accepted_at=accepted_at,
    )


_ACCEPT_POSTGRES = text("""
    INSERT INTO actor_commands (kind, entity_id, command_id, name, payload, status, attempts, accepted_at)
    SELECT kind, entity_id, command_id, name, payload, 'pending', 0, :accepted_at
    FROM unnest(CAST(:kinds AS text[]), CAST(:entity_ids AS text[]), CAST(:command_ids AS text[]),
                CAST(:names AS text[]), CAST(:payloads AS jsonb[]))
         WITH ORDINALITY AS given(kind, entity_id, command_id, name, payload, position)
    ORDER BY position
    ON CONFLICT (kind, command_id) DO NOTHING
    RETURNING kind, command_id
""")
_json = msgspec.json.Encoder()
# The same statement for asyncpg itself, in numbered-parameter form.
_ACCEPT_ASYNCPG = (
    _ACCEPT_POSTGRES.text.replace(":accepted_at", "$1").replace(":kinds", "$2").replace(":entity_ids", "$3")
    .replace(":command_ids", "$4").replace(":names", "$5").replace(":payloads", "$6")
)


def _accept_arrays(envelopes: list[Envelope], accepted_at: datetime) -> dict[str, Any]:
    return dict(
        accepted_at=accepted_at,
        kinds=[e.kind for e in envelopes],
        entity_ids=[e.entity_id for e in envelopes],
        command_ids=[e.command_id for e in envelopes],
        names=[e.name for e in envelopes],
        payloads=[_json.encode(e.payload).decode() for e in envelopes],
    )


async def accept_autocommit(engine: AsyncEngine, envelopes: list[Envelope]) -> set[tuple[str, str]]:
    """`accept` on PostgreSQL as one autocommitted statement straight through asyncpg: the
    submit path is every caller's latency, and SQLAlchemy's execution layer cost more CPU than
    the statement. The pooled connection is in no transaction, so asyncpg autocommits."""
    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        rows = await driver.fetch(_ACCEPT_ASYNCPG, *_accept_arrays(envelopes, utcnow()).values())
    return {(row[0], row[1]) for row in rows}


async def accept(connection: AsyncConnection | AsyncSession, dialect_name: str, envelopes: list[Envelope]) -> set[tuple[str, str]]:
    """Insert the commands unless they exist, ids in the given order; the (kind, command_id)
    of those accepted now."""
    accepted_at = utcnow()
    if dialect_name == "postgresql":
        result = await connection.execute(_ACCEPT_POSTGRES, _accept_arrays(envelopes, accepted_at))
    else:
        rows = [_row(envelope, accepted_at) for envelope in envelopes]
        result = await connection.execute(accept_statement(dialect_name), rows)
    return {(kind, command_id) for kind, command_id in result.all()}


async def read_pending(session: AsyncSession, kind: str | None, entity_id: str | None, limit: int) -> list[Pending]:
    """Pending commands in acceptance (id) order: one entity's, or everyone's."""
    query = select(*_READ_COLUMNS).where(TABLE.c.status == PENDING)
    if kind is not None:
        query = query.where(TABLE.c.kind == kind, TABLE.c.entity_id == entity_id)
    rows = await session.execute(query.order_by(TABLE.c.id).limit(limit))
    return [Pending(*row) for row in rows]


_HAS_PENDING = (
    select(TABLE.c.id)
    .where(TABLE.c.status == PENDING, TABLE.c.kind == bindparam("kind"), TABLE.c.entity_id == bindparam("entity_id"))
    .limit(1)
)


async def has_pending(session: AsyncSession, kind: str, entity_id: str) -> bool:
    return (await session.execute(_HAS_PENDING, {"kind": kind, "entity_id": entity_id})).first() is not None


async def pending_entities(session: AsyncSession, kind: str, entity_ids: list[str]) -> set[str]:
    """Which of these entities have a command pending (one statement)."""
    if not entity_ids:
        return set()
    rows = await session.execute(
        select(TABLE.c.entity_id).distinct()
        .where(TABLE.c.status == PENDING, TABLE.c.kind == kind, TABLE.c.entity_id.in_(entity_ids))
    )
    return {entity_id for (entity_id,) in rows.all()}


async def existing_command_ids(session: AsyncSession, kind: str, command_ids: list[str]) -> set[str]:
    """Which of these command ids the mailbox has (in any status)."""
    if not command_ids:
        return set()
    rows = await session.execute(
        select(TABLE.c.command_id).where(TABLE.c.kind == kind, TABLE.c.command_id.in_(command_ids))
    )
    return {command_id for (command_id,) in rows.all()}


def _insert_applied_many_statement(dialect_name: str):
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return (
        dialect.insert(TABLE)
        .on_conflict_do_nothing(index_elements=["kind", "command_id"])
        .returning(TABLE.c.command_id)
    )


async def insert_applied_many(session: AsyncSession, rows: list[Pending]) -> int:
    """Record commands accepted and applied in this transaction; how many were inserted (fewer
    than given when a command id exists already: the caller must then roll back)."""
    values = [
        dict(kind=r.kind, entity_id=r.entity_id, command_id=r.command_id, name=r.name, payload=r.payload,
             status=r.status, result=r.result, attempts=r.attempts, accepted_at=r.accepted_at, applied_at=r.applied_at)
        for r in rows
    ]
    result = await session.execute(_insert_applied_many_statement(session.bind.dialect.name), values)
    return len(result.all())


_INSERT_APPLIED = {
    name: dialect.insert(TABLE)
    .values({column: bindparam(column) for column in (
        "kind", "entity_id", "command_id", "name", "payload", "status", "result", "attempts", "accepted_at", "applied_at",
    )})
    .on_conflict_do_nothing(index_elements=["kind", "command_id"])
    .returning(TABLE.c.id)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}


_INSERT_APPLIED_ASYNCPG = """
    INSERT INTO actor_commands
        (kind, entity_id, command_id, name, payload, status, result, attempts, accepted_at, applied_at)
    VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7::jsonb, 0, $8, $9)
    ON CONFLICT (kind, command_id) DO NOTHING
    RETURNING id
"""


async def insert_applied(session: AsyncSession, row: Pending) -> bool:
    """Record a command accepted and applied in one transaction; False when its (kind,
    command_id) exists already (the caller must then roll back what it applied).

    On PostgreSQL straight through asyncpg, inside the session's transaction: this is on every
    idle round trip, where SQLAlchemy's execution layer cost more than the statement."""
    if session.bind.dialect.name == "postgresql":
        connection = await session.connection()
        driver = (await connection.get_raw_connection()).driver_connection
        return await driver.fetchval(
            _INSERT_APPLIED_ASYNCPG, row.kind, row.entity_id, row.command_id, row.name,
            _json.encode(row.payload).decode(), row.status,
            None if row.result is None else _json.encode(row.result).decode(), row.accepted_at, row.applied_at,
        ) is not None
    values = dict(
        kind=row.kind, entity_id=row.entity_id, command_id=row.command_id, name=row.name, payload=row.payload,
        status=row.status, result=row.result, attempts=0, accepted_at=row.accepted_at, applied_at=row.applied_at,
    )
    statement = _INSERT_APPLIED[session.bind.dialect.name]
    return (await session.execute(statement, values)).first() is not None


_SAVE = (
    update(TABLE)
    .where(TABLE.c.id == bindparam("row_id"))
    .values(
        status=bindparam("new_status"),
        result=bindparam("new_result"),
        attempts=bindparam("new_attempts"),
        applied_at=bindparam("new_applied_at"),
    )
)


_SAVE_POSTGRES = text("""
    UPDATE actor_commands AS row SET status = given.status, result = given.result,
           attempts = given.attempts, applied_at = given.applied_at
    FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:results AS jsonb[]),
                CAST(:attempts AS integer[]), CAST(:applied_ats AS timestamptz[]))
         AS given(id, status, result, attempts, applied_at)
    WHERE row.id = given.id
""")


async def save(session: AsyncSession, rows: list[Pending]) -> None:
    """Write back every changed row in one statement."""
    changed = [row for row in rows if row.changed]
    if not changed:
        return
    if session.bind.dialect.name == "postgresql":
        await session.execute(_SAVE_POSTGRES, dict(
            ids=[r.id for r in changed],
            statuses=[r.status for r in changed],
            results=[None if r.result is None else _json.encode(r.result).decode() for r in changed],
            attempts=[r.attempts for r in changed],
            applied_ats=[r.applied_at for r in changed],
        ))
        return
    await session.execute(_SAVE, [
        dict(row_id=r.id, new_status=r.status, new_result=r.result, new_attempts=r.attempts, new_applied_at=r.applied_at)
        for r in changed
    ])


class Acceptor:
    """Group commit for submits. An idle system sends a command at once; while a statement is in
    flight, later submits queue and leave together in the next one. `insert_many` returns the
    (kind, command_id) pairs it accepted."""

    def __init__(
        self,
        insert_many: Callable[[list[Envelope]], Awaitable[set[tuple[str, str]]]],
        *,
        max_in_flight: int = 2,
        max_batch: int = MAX_ACCEPT_BATCH,
    ) -> None:
        self._insert_many = insert_many
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._queue: list[tuple[Envelope, asyncio.Future[bool]]] = []
        self._in_flight = 0

    async def accept(self, envelope: Envelope) -> bool:
        """True when this call accepted the command, False when it existed already."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((envelope, future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                await self._send(self._take_batch())
        finally:
            self._in_flight -= 1

    def _take_batch(self) -> list[tuple[Envelope, asyncio.Future[bool]]]:
        """The oldest queued commands, a command id at most once: a second submit of the same
        id waits for the next statement, where it finds the first and is told so."""
        batch, later, seen = [], [], set()
        for item in self._queue:
            key = (item[0].kind, item[0].command_id)
            if key in seen or len(batch) >= self._max_batch:
                later.append(item)
            else:
                seen.add(key)
                batch.append(item)
        self._queue = later
        return batch

    async def _send(self, batch: list[tuple[Envelope, asyncio.Future[bool]]]) -> None:
        try:
            accepted = await self._insert_many([envelope for envelope, _ in batch])
        except Exception as error:
            if len(batch) > 1:
                # One bad command (say, an entity id too long) must not fail its neighbours.
                for item in batch:
                    await self._send([item])
                return
            if not batch[0][1].done():
                batch[0][1].set_exception(error)
            return
        for envelope, future in batch:
            if not future.done():
                future.set_result((envelope.kind, envelope.command_id) in accepted)

"""Support for the actor runtime's proof suites (issue 3); production code never imports it.

- `PropApply`: a test-only command on the wallet kind whose effect is order-sensitive and not
  idempotent (state = state * 31 + x mod 2**61, plus a log of tags), so a command applied twice,
  lost, reordered or interleaved with another apply of the same entity shows up in the state.
  Importing this module registers it (worker processes of the crash tests import it first).
- `reference_model`: the sequential model the runtime must match: each entity's commands
  applied one at a time in acceptance order. `serial_problems` checks a history against it in
  the order actually applied (plus real-time precedences), `id_order_problems` checks that
  the order was `actor_commands.id` order, which is acceptance order whenever acceptances do
  not overlap (one writer, or one sequential sender per entity).
- The station's half of an eject, played from the outbox (`StationPlayer`), for tests where no
  simulated station is connected over MQTT: it reads eject rows and submits the acks (and later
  the returns) exactly as the bridge would turn a station's messages into commands.
- `verify_run`: end-of-run checks for the crash tests: every accepted command applied exactly
  once, balances explained by the commands, banks conserved, and the audit clean.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.actors.runtime import Runtime, handles
from powerbank.storage.audit import audit
from powerbank.storage.models import (
    ActorCommand,
    AppConfig,
    LedgerAccount,
    LedgerTransfer,
    OutboxMessage,
    PowerBank,
    Rental,
    StationSlot,
)
from powerbank.storage.types import utcnow

PROP_APPLY = "PropApply"
PROP_MODULUS = 2**61
FINAL_RENTAL_STATUSES = ("active", "completed", "cancelled")

# --- the order-sensitive test command -------------------------------------------------------

# Per process: how many applies of an entity are running right now, and every time a second
# one started while another was running (a breach of "serialized per entity").
_in_flight: dict[str, int] = defaultdict(int)
OVERLAPS: list[str] = []
# Tags whose first attempt already failed on purpose (`fail_once`).
_failed_once: set[str] = set()


def fold(state: int, x: int) -> int:
    """One PropApply step: non-commutative, so two orders of the same commands disagree."""
    return (state * 31 + x) % PROP_MODULUS


def prop_key(entity_id: str) -> str:
    return f"prop:{entity_id}"


def reset_process_state() -> None:
    _in_flight.clear()
    OVERLAPS.clear()
    _failed_once.clear()


@handles("wallet", PROP_APPLY)
async def prop_apply(ctx, entity_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Read-modify-write of the entity's fold state and log, with an optional pause in the
    middle (to widen any window where two applies could interleave) and an optional failure on
    the first attempt (after writing, so a leaked partial write would be visible)."""
    if _in_flight[entity_id]:
        OVERLAPS.append(entity_id)
    _in_flight[entity_id] += 1
    try:
        key = prop_key(entity_id)
        row = await ctx.session.get(AppConfig, key)
        state, log = (int(row.value["state"]), list(row.value["log"])) if row else (0, [])
        if payload.get("pause_s"):
            await asyncio.sleep(payload["pause_s"])
        state = fold(state, int(payload["x"]))
        log.append(payload["tag"])
        value = {"state": state, "log": log}
        if row is None:
            ctx.session.add(AppConfig(key=key, value=value, description="test: PropApply"))
        else:
            row.value = value
        await ctx.session.flush()
        if payload.get("fail_once") and payload["tag"] not in _failed_once:
            _failed_once.add(payload["tag"])
            raise ConnectionError("transient failure injected by the test")
        return {"ok": True, "state": state, "n": len(log)}
    finally:
        _in_flight[entity_id] -= 1


def prop_payload(tag: str, x: int, **extra: Any) -> dict[str, Any]:
    return {"tag": tag, "x": x, **extra}


def reference_model(tags_and_xs: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
    """The results of applying PropApply commands (tag, x) one at a time in the given order:
    the sequential model the runtime must match."""
    state, results = 0, []
    for n, (_, x) in enumerate(tags_and_xs, start=1):
        state = fold(state, int(x))
        results.append({"ok": True, "state": state, "n": n})
    return results


@dataclass
class PropHistory:
    """One entity's PropApply commands in acceptance (id) order, and what the runtime stored."""

    entity: str
    rows: list[ActorCommand]
    state: int
    log: list[str]


async def prop_rows(session: AsyncSession, entities: Iterable[str] | None = None) -> list[ActorCommand]:
    query = select(ActorCommand).where(ActorCommand.kind == "wallet", ActorCommand.name == PROP_APPLY)
    if entities is not None:
        query = query.where(ActorCommand.entity_id.in_(list(entities)))
    return list((await session.execute(query.order_by(ActorCommand.id))).scalars())


async def prop_states(session: AsyncSession, entities: Iterable[str]) -> dict[str, tuple[int, list[str]]]:
    keys = [prop_key(e) for e in entities]
    rows = (await session.execute(select(AppConfig).where(AppConfig.key.in_(keys)))).scalars()
    return {row.key[len("prop:"):]: (int(row.value["state"]), list(row.value["log"])) for row in rows}


async def prop_histories(session: AsyncSession, entities: Iterable[str] | None = None) -> dict[str, PropHistory]:
    rows = await prop_rows(session, entities)
    by_entity: dict[str, list[ActorCommand]] = defaultdict(list)
    for row in rows:
        by_entity[row.entity_id].append(row)
    stored = await prop_states(session, by_entity)
    return {
        entity: PropHistory(entity, entity_rows, *stored.get(entity, (0, [])))
        for entity, entity_rows in by_entity.items()
    }


def serial_problems(history: PropHistory, precedes: Iterable[tuple[str, str]] = ()) -> list[str]:
    """What must hold whatever "acceptance order" means: every accepted command applied exactly
    once, one at a time (each result and the final state are the sequential model's over the
    order the commands were actually applied in, which the log records), and in real-time
    order: for every (a, b) in `precedes` (b was submitted after a's submission returned), a was
    applied before b."""
    problems = [f"PropApply {r.command_id} on {r.entity_id} is {r.status}" for r in history.rows if r.status != "applied"]
    rows = {row.payload["tag"]: row for row in history.rows}
    if sorted(history.log) != sorted(rows):
        lost = sorted(set(rows) - set(history.log))
        doubled = sorted({t for t in history.log if history.log.count(t) > 1})
        alien = sorted(set(history.log) - set(rows))
        problems.append(f"entity {history.entity}: lost {lost}, applied twice {doubled}, unknown {alien}")
        return problems
    model = reference_model((tag, rows[tag].payload["x"]) for tag in history.log)
    for tag, want in zip(history.log, model):
        if rows[tag].result != want:
            problems.append(f"{tag}: result {rows[tag].result} != sequential model {want} (applies overlapped?)")
    if model and history.state != model[-1]["state"]:
        problems.append(f"entity {history.entity}: state {history.state} != model {model[-1]['state']}")
    position = {tag: i for i, tag in enumerate(history.log)}
    for a, b in precedes:
        if a in position and b in position and position[a] > position[b]:
            problems.append(f"entity {history.entity}: {b} applied before {a}, though submitted after it returned")
    return problems


def id_order_problems(history: PropHistory) -> list[str]:
    """The issue's definition of acceptance order: the entity's `actor_commands.id` order. The
    applied order (the log) must be exactly that."""
    accepted = [row.payload["tag"] for row in history.rows]
    if history.log != accepted:
        first = next((i for i, (a, b) in enumerate(zip(history.log, accepted)) if a != b), None)
        return [
            f"entity {history.entity}: applied order differs from id order at position {first}: "
            f"applied {history.log} vs ids {accepted}"
        ]
    return []


async def check_prop_commands(session: AsyncSession, entities: Iterable[str] | None = None) -> list[str]:
    """Both checks above (without real-time pairs) for every entity's PropApply commands. Only
    for histories whose acceptances did not overlap (see `id_order_problems`)."""
    problems = []
    for history in (await prop_histories(session, entities)).values():
        problems.extend(serial_problems(history) or id_order_problems(history))
    return problems


# --- the station's side of an eject -----------------------------------------------------------


def serial_of_topic(topic: str) -> str:
    """`<root>/v1/stations/<serial>/commands` -> serial."""
    return topic.rsplit("/", 2)[-2]


@dataclass
class PlayedEject:
    outbox_id: int
    station_id: str
    serial: str
    slot: int
    bank: str
    code: str


class StationPlayer:
    """Answers the eject commands found in the outbox as the stations would, through the same
    mapping the bridge uses (one command per event, id `evt:{serial}:{seq}`), and returns some
    ejected banks to the slot they left after a while.

    `reader` reads (on SQLite a read-only engine, so polling never takes the write lock);
    `runtime` submits. Every submit is recorded in `accepted` (what the test later checks)."""

    def __init__(
        self,
        runtime: Runtime,
        reader: async_sessionmaker[AsyncSession],
        *,
        rng: random.Random,
        fail_rate: float = 0.1,
        duplicate_rate: float = 0.2,
        return_rate: float = 0.6,
        return_delay_s: tuple[float, float] = (0.2, 4.0),
        accepted: list[dict[str, Any]] | None = None,
    ) -> None:
        self.runtime = runtime
        self.reader = reader
        self.rng = rng
        self.fail_rate = fail_rate
        self.duplicate_rate = duplicate_rate
        self.return_rate = return_rate
        self.return_delay_s = return_delay_s
        self.accepted = accepted if accepted is not None else []
        self.seq: dict[str, int] = defaultdict(int)
        self.station_ids: dict[str, str] = {}
        self.seen: set[int] = set()
        self.watermark = 0
        self.played: list[PlayedEject] = []
        self.returns_due: list[tuple[float, PlayedEject]] = []
        self._answers: dict[int, Any] = {}
        self._returns: dict[int, Any] = {}
        self.returned = 0
        self.submit_errors = 0
        self._lock = asyncio.Lock()

    async def _station_id(self, serial: str) -> str:
        if serial not in self.station_ids:
            from powerbank.storage.models import Station

            async with self.reader() as session:
                self.station_ids[serial] = str(
                    (await session.execute(select(Station.id).where(Station.serial == serial))).scalar_one()
                )
        return self.station_ids[serial]

    async def new_ejects(self) -> list[tuple[int, str, dict[str, Any]]]:
        """Eject rows not answered yet. Ids from a sequence may commit out of order, so this
        looks back behind the highest id answered rather than only past it."""
        low = max(0, self.watermark - 500)
        async with self.reader() as session:
            rows = (
                await session.execute(
                    select(OutboxMessage.id, OutboxMessage.topic, OutboxMessage.payload)
                    .where(OutboxMessage.id > low)
                    .order_by(OutboxMessage.id)
                )
            ).all()
        return [(i, topic, payload) for i, topic, payload in rows if i not in self.seen and payload.get("type") == "eject"]

    async def submit_event(self, serial: str, message) -> None:
        """Submit a station message the way the bridge does; sometimes twice (a duplicate).
        A failed submit is retried with the same message (same seq, same command id)."""
        from powerbank.broker.bridge import submission_for

        station_id = await self._station_id(serial)
        submission = submission_for(serial, message, utcnow())
        for _ in range(2 if self.rng.random() < self.duplicate_rate else 1):
            for attempt in range(60):
                try:
                    await self.runtime.submit(
                        "station", station_id, submission.name, submission.payload, submission.command_id
                    )
                    break
                except Exception:  # the database briefly away: the bridge retries too
                    self.submit_errors += 1
                    await asyncio.sleep(0.25)
            else:
                raise RuntimeError(f"could not submit {submission.command_id}")
        self.accepted.append(
            {"kind": "station", "entity_id": station_id, "name": submission.name,
             "command_id": submission.command_id, "payload": submission.payload}
        )

    def next_seq(self, serial: str) -> int:
        self.seq[serial] += 1
        return self.seq[serial]

    async def answer(self, row_id: int, topic: str, payload: dict[str, Any]) -> None:
        """The station's ack for one eject row; decided once (code, seq), so a retry after an
        error re-sends the same event."""
        from powerbank.broker.protocol import EJECT_ERROR, EJECT_OK, EjectAck, epoch_ms

        serial = serial_of_topic(topic)
        if row_id not in self._answers:
            code = EJECT_ERROR if self.rng.random() < self.fail_rate else EJECT_OK
            ack = EjectAck(
                v=1, seq=self.next_seq(serial), ts=epoch_ms(utcnow()),
                command_id=payload["command_id"], slot=payload["slot"], bank=payload["bank"], code=code,
            )
            self._answers[row_id] = ack
        ack = self._answers[row_id]
        await self.submit_event(serial, ack)
        self.seen.add(row_id)
        self.watermark = max(self.watermark, row_id)
        played = PlayedEject(row_id, await self._station_id(serial), serial, ack.slot, ack.bank, ack.code)
        self.played.append(played)
        if ack.code == EJECT_OK and self.rng.random() < self.return_rate:
            due = asyncio.get_running_loop().time() + self.rng.uniform(*self.return_delay_s)
            self.returns_due.append((due, played))

    async def give_back(self, played: PlayedEject) -> None:
        """The bank goes back into the slot it left (the one place no other bank can be)."""
        from powerbank.broker.protocol import BankInserted, epoch_ms

        if played.outbox_id not in self._returns:
            self._returns[played.outbox_id] = BankInserted(
                v=1, seq=self.next_seq(played.serial), ts=epoch_ms(utcnow()),
                slot=played.slot, bank=played.bank, charge=90,
            )
        await self.submit_event(played.serial, self._returns[played.outbox_id])
        self.returned += 1

    async def step(self) -> int:
        """Answer new ejects and make the returns that are due; how many messages were sent."""
        async with self._lock:
            sent = 0
            for row_id, topic, payload in await self.new_ejects():
                await self.answer(row_id, topic, payload)
                sent += 1
            now = asyncio.get_running_loop().time()
            while self.returns_due:
                due = min(self.returns_due, key=lambda item: item[0])
                if due[0] > now:
                    break
                await self.give_back(due[1])
                self.returns_due.remove(due)
                sent += 1
            return sent

    async def run(self, stop: asyncio.Event, every_s: float = 0.1) -> None:
        while not stop.is_set():
            try:
                await self.step()
            except Exception:  # a transient database error: the next step looks again
                self.submit_errors += 1
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass


# --- end-of-run checks ------------------------------------------------------------------------


async def quiescent(reader: async_sessionmaker[AsyncSession]) -> bool:
    """No command pending, no rental waiting for its hold or its eject."""
    async with reader() as session:
        pending = await session.scalar(
            select(func.count()).select_from(ActorCommand).where(ActorCommand.status == "pending")
        )
        waiting = await session.scalar(
            select(func.count()).select_from(Rental).where(Rental.status.in_(("pending", "ejecting")))
        )
    return not pending and not waiting


async def verify_run(
    sessions: async_sessionmaker[AsyncSession], accepted: list[dict[str, Any]]
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Every check of the crash tests. Returns (problems by check, figures); no problems = pass.

    `accepted` holds every command the driver saw accepted: {kind, entity_id, name, command_id,
    payload}. A command may appear more than once (it was deliberately sent twice)."""
    problems: dict[str, list[str]] = defaultdict(list)
    figures: dict[str, int] = {}
    async with sessions() as session:
        rows = list((await session.execute(select(ActorCommand).order_by(ActorCommand.id))).scalars())
        by_key = {(r.kind, r.command_id): r for r in rows}
        figures["commands_in_mailboxes"] = len(rows)
        figures["commands_accepted_by_driver"] = len({(a["kind"], a["command_id"]) for a in accepted})
        statuses = defaultdict(int)
        for row in rows:
            statuses[row.status] += 1
        figures.update({f"commands_{status}": n for status, n in statuses.items()})

        # 1. Every accepted command is in its mailbox once (unique by construction) and applied.
        for item in accepted:
            row = by_key.get((item["kind"], item["command_id"]))
            if row is None:
                problems["lost"].append(f"{item['name']} {item['command_id']} accepted but not in the mailbox")
            elif (row.entity_id, row.name) != (item["entity_id"], item["name"]):
                problems["mismatch"].append(f"{item['command_id']}: stored as {row.name} on {row.entity_id}")
            elif row.status != "applied":
                problems["not_applied"].append(f"{row.name} {row.command_id} is {row.status}: {row.result}")
        for row in rows:
            if row.status != "applied":
                problems["not_applied"].append(f"{row.kind}/{row.name} {row.command_id} is {row.status}")

        # 2. Order-sensitive test commands: applied once each, in acceptance order.
        problems["prop_apply"].extend(await check_prop_commands(session))
        figures["prop_apply_commands"] = sum(1 for r in rows if r.name == PROP_APPLY)

        # 3. Credits: one ledger transfer per transfer id, for its amount.
        credited: dict[str, int] = defaultdict(int)
        credit_rows = [r for r in rows if r.name == "CreditWallet"]
        transfer_ids = [uuid.UUID(r.payload["transfer_id"]) for r in credit_rows]
        transfers = {}
        for chunk in range(0, len(transfer_ids), 500):
            found = (
                await session.execute(
                    select(LedgerTransfer).where(LedgerTransfer.id.in_(transfer_ids[chunk:chunk + 500]))
                )
            ).scalars()
            transfers.update({t.id: t for t in found})
        for row in credit_rows:
            transfer = transfers.get(uuid.UUID(row.payload["transfer_id"]))
            if row.result and row.result.get("ok"):
                if transfer is None or transfer.amount_minor != row.payload["amount_minor"]:
                    problems["credits"].append(f"credit {row.command_id}: transfer {transfer and transfer.amount_minor}")
                else:
                    credited[row.entity_id] += row.payload["amount_minor"]
            elif transfer is not None and row.status == "applied":
                problems["credits"].append(f"refused credit {row.command_id} left a transfer")
        figures["credits_applied"] = sum(1 for r in credit_rows if r.result and r.result.get("ok"))

        # 4. Rentals: every started one reached a final state; balances follow from credits,
        #    captures and open holds.
        rentals = list((await session.execute(select(Rental))).scalars())
        rental_ids = {str(r.id) for r in rentals}
        for row in rows:
            if row.name == "StartRental" and row.entity_id not in rental_ids and (row.result or {}).get("ok"):
                problems["rentals"].append(f"StartRental {row.command_id} applied but no rental row")
        for rental in rentals:
            if rental.status not in FINAL_RENTAL_STATUSES:
                problems["rentals"].append(f"rental {rental.id} left {rental.status}")
        by_status = defaultdict(int)
        for rental in rentals:
            by_status[rental.status] += 1
        figures.update({f"rentals_{status}": n for status, n in by_status.items()})
        charged: dict[str, int] = defaultdict(int)
        held: dict[str, int] = defaultdict(int)
        for rental in rentals:
            charged[str(rental.user_id)] += rental.charged_minor
            if rental.status == "active":
                held[str(rental.user_id)] += rental.hold_minor
        accounts = (
            await session.execute(select(LedgerAccount).where(LedgerAccount.kind == "user_wallet"))
        ).scalars()
        for account in accounts:
            user = str(account.user_id)
            posted = account.credits_posted - account.debits_posted
            if posted != credited[user] - charged[user]:
                problems["balances"].append(
                    f"wallet {user}: balance {posted} != credits {credited[user]} - charged {charged[user]}"
                )
            if account.debits_pending != held[user]:
                problems["balances"].append(f"wallet {user}: held {account.debits_pending} != open holds {held[user]}")

        # 5. Banks conserved: each is in exactly one slot, or out on exactly one active rental.
        banks = list((await session.execute(select(PowerBank))).scalars())
        slotted = defaultdict(int)
        for bank_id in (await session.execute(select(StationSlot.power_bank_id))).scalars():
            if bank_id is not None:
                slotted[bank_id] += 1
        out = defaultdict(int)
        for rental in rentals:
            if rental.status == "active" and rental.power_bank_id is not None:
                out[rental.power_bank_id] += 1
        for bank in banks:
            places = slotted[bank.id] + out[bank.id]
            if places != 1 or bank.status not in ("in_slot", "rented"):
                problems["banks"].append(
                    f"bank {bank.serial}: status {bank.status}, {slotted[bank.id]} slots, {out[bank.id]} rentals"
                )
        figures["banks"] = len(banks)
        figures["banks_out"] = sum(out.values())

        # 6. Outbox: one eject row per eject command id (no eject published twice).
        ejects = [m.payload["command_id"] for m in (await session.execute(select(OutboxMessage))).scalars()
                  if m.payload.get("type") == "eject"]
        if len(ejects) != len(set(ejects)):
            problems["outbox"].append(f"{len(ejects) - len(set(ejects))} eject commands written twice")
        figures["ejects"] = len(ejects)

    # 7. Every invariant the audit knows (ledger balanced, no transient rental, no bank in two
    #    places, nothing pending or failed).
    for name, found in (await audit(sessions)).items():
        problems[f"audit:{name}"].extend(found)
    return {k: v for k, v in problems.items() if v}, figures

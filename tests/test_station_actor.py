"""The Station actor through the real runtime: boot, ejects and their failures, returns,
reconciliation, duplicates and reordering. Runs on SQLite and (marked) PostgreSQL.

The runtime here has no dispatcher: the test drains the station's mailbox itself and checks
the follow-up commands it left in the rental mailboxes (the Rental actor is not under test)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from powerbank.actors import station as station_actor
from powerbank.actors.bus import LocalBus
from powerbank.actors.runtime import AdvisoryLocks, ProcessLocks, Runtime
from powerbank.actors.station import (
    ReportedSlot,
    SlotView,
    availability,
    choose_eject_slot,
    expire_overdue_ejects,
    mark_silent_stations_offline,
    plan_inventory,
)
from powerbank.broker.protocol import Topics, epoch_ms
from powerbank.storage.db import session_factory
from powerbank.storage.models import (
    ActorCommand,
    OutboxMessage,
    PowerBank,
    Rental,
    RentalPackage,
    Reservation,
    Station,
    StationEvent,
    StationSlot,
    StationStatusChange,
    User,
)
from powerbank.storage.types import utcnow

EJECT_TIMEOUT_MS = 8000


@pytest.fixture(autouse=True)
def station_policy():
    previous = station_actor._policy
    station_actor.configure(
        None, eject_timeout_ms=EJECT_TIMEOUT_MS, heartbeat_interval_s=30, currency="NPR", topics=Topics("pb")
    )
    yield
    station_actor._policy = previous


@pytest.fixture
async def rt(engine):
    locks = ProcessLocks() if engine.dialect.name == "sqlite" else AdvisoryLocks()
    return Runtime(session_factory(engine), bus=LocalBus(), dispatcher=None, locks=locks)


# --- helpers ----------------------------------------------------------------------------------


async def make_station(rt, serial="ST-1", banks=(), *, slot_count=4, status="online") -> str:
    """A station whose slots 1..n hold `banks` = [(bank serial, charge)] (None = empty)."""
    async with rt.sessions.begin() as db:
        station = Station(
            serial=serial, name=serial, latitude=27.7, longitude=85.3, slot_count=slot_count,
            status=status, last_seen_at=utcnow(),
        )
        db.add(station)
        await db.flush()
        for number in range(1, slot_count + 1):
            entry = banks[number - 1] if number - 1 < len(banks) else None
            bank_id = None
            if entry is not None:
                bank = PowerBank(serial=entry[0], charge_percent=entry[1], currency="NPR", station_id=station.id)
                db.add(bank)
                await db.flush()
                bank_id = bank.id
            db.add(
                StationSlot(
                    station_id=station.id, slot_number=number,
                    status="occupied" if bank_id else "empty", power_bank_id=bank_id,
                )
            )
        return str(station.id)


async def apply(rt, station_id, name, payload, command_id=None):
    command_id = command_id or f"t:{uuid.uuid4()}"
    await rt.submit("station", station_id, name, payload, command_id)
    await rt.drain("station", station_id)
    outcome = await rt.outcome("station", command_id)
    assert outcome.status == "applied", outcome.result
    return outcome.result


def event(seq, ts_ms=None, **fields):
    return {"v": 1, "seq": seq, "ts": ts_ms if ts_ms is not None else epoch_ms(utcnow()), **fields}


async def rental_commands(rt, name=None):
    async with rt.sessions() as db:
        query = select(ActorCommand).where(ActorCommand.kind == "rental").order_by(ActorCommand.id)
        if name:
            query = query.where(ActorCommand.name == name)
        return list((await db.execute(query)).scalars())


async def slots_of(rt, station_id):
    async with rt.sessions() as db:
        rows = await db.execute(
            select(StationSlot).where(StationSlot.station_id == uuid.UUID(station_id)).order_by(StationSlot.slot_number)
        )
        return list(rows.scalars())


async def bank(rt, serial) -> PowerBank:
    async with rt.sessions() as db:
        return (await db.execute(select(PowerBank).where(PowerBank.serial == serial))).scalar_one()


async def outbox(rt, kind):
    async with rt.sessions() as db:
        rows = (await db.execute(select(OutboxMessage).order_by(OutboxMessage.id))).scalars()
        return [m for m in rows if m.payload.get("type") == kind]


async def make_open_rental(rt, station_id, bank_serial, *, status="active") -> str:
    async with rt.sessions.begin() as db:
        user = User(phone=f"+977{uuid.uuid4().int % 10**10:010d}", referral_code=uuid.uuid4().hex[:12])
        package = RentalPackage(
            code=uuid.uuid4().hex[:10], name="1h", duration_minutes=60, price_minor=10000,
            currency="NPR", max_duration_minutes=1440,
        )
        db.add_all([user, package])
        await db.flush()
        the_bank = (await db.execute(select(PowerBank).where(PowerBank.serial == bank_serial))).scalar_one()
        rental = Rental(
            user_id=user.id, station_id=uuid.UUID(station_id), package_id=package.id,
            power_bank_id=the_bank.id, status=status, currency="NPR", started_at=utcnow() - timedelta(hours=1),
        )
        db.add(rental)
        await db.flush()
        return str(rental.id)


# --- pure decisions ---------------------------------------------------------------------------


def test_choose_eject_slot_prefers_highest_charge_above_minimum():
    slots = [
        SlotView(1, "occupied", "A", "in_slot", 19),
        SlotView(2, "occupied", "B", "in_slot", 60),
        SlotView(3, "ejecting", "C", "ejecting", 100),
        SlotView(4, "occupied", "D", "faulty", 99),
        SlotView(5, "fault", "E", "in_slot", 98),
        SlotView(6, "occupied", "F", "in_slot", 60),
        SlotView(7, "empty"),
    ]
    assert choose_eject_slot(slots).number == 2  # tie 60/60 goes to the lower slot number
    assert choose_eject_slot(slots, exclude=[2]).number == 6
    assert choose_eject_slot(slots, exclude=[2, 6]) is None
    assert availability(slots) == (2, 1)


def test_plan_inventory_corrects_slots_and_reports_missing_banks():
    stored = [
        SlotView(1, "occupied", "A", "in_slot", 50),
        SlotView(2, "occupied", "B", "in_slot", 50),
        SlotView(3, "ejecting", "C", "ejecting", 90),
        SlotView(5, "empty"),
    ]
    reported = [ReportedSlot(1, "A", 55), ReportedSlot(4, "D", 70), ReportedSlot(3, None, None)]
    plan = plan_inventory(stored, reported, slot_count=4)
    assert [(t.number, t.status, t.bank_serial) for t in plan.targets] == [(2, "empty", None), (4, "occupied", "D")]
    assert plan.missing_banks == ["B"]
    assert plan.surplus_slots == [5]
    assert plan.charges == {"A": 55, "D": 70}
    kinds = sorted(d["kind"] for d in plan.discrepancies)
    assert kinds == ["bank_missing", "ejecting_slot_differs", "slot_corrected", "slot_removed"]


# --- boot, heartbeat, offline -----------------------------------------------------------------


async def test_boot_creates_slots_and_banks_and_answers_with_config(rt):
    station_id = await make_station(rt, "ST-BOOT", slot_count=1, status="offline")
    station_clock_behind_ms = 5000
    now_ms = epoch_ms(utcnow())
    payload = event(
        1, now_ms - station_clock_behind_ms, firmware="fw-1.2", hardware="hw-a", slot_count=3,
        slots=[{"slot": 1, "bank": "PB-1", "charge": 80}, {"slot": 3, "bank": "PB-3", "charge": 10}],
        received_at=datetime.fromtimestamp(now_ms / 1000, timezone.utc).isoformat(),
    )
    result = await apply(rt, station_id, "Boot", payload)
    assert result["ok"]
    slots = await slots_of(rt, station_id)
    assert [(s.slot_number, s.status) for s in slots] == [(1, "occupied"), (2, "empty"), (3, "occupied")]
    banks = [await bank(rt, "PB-1"), await bank(rt, "PB-3")]
    assert [(b.status, b.charge_percent, str(b.station_id)) for b in banks] == [
        ("in_slot", 80, station_id), ("in_slot", 10, station_id)
    ]
    async with rt.sessions() as db:
        station = await db.get(Station, uuid.UUID(station_id))
        recorded = (await db.execute(select(StationEvent))).scalar_one()
    assert (station.status, station.firmware_version, station.slot_count) == ("online", "fw-1.2", 3)
    assert abs(station.clock_offset_ms - station_clock_behind_ms) < 50
    assert abs((recorded.station_time - recorded.received_at).total_seconds()) < 0.05
    [config] = await outbox(rt, "config")
    assert config.topic == "pb/v1/stations/ST-BOOT/commands"
    assert config.payload["heartbeat_interval_s"] == 30 and config.payload["last_seq"] == 1


async def test_heartbeat_and_offline(rt):
    station_id = await make_station(rt, "ST-HB", [("PB-H", 90)], status="offline")
    await apply(rt, station_id, "Heartbeat", event(7))
    async with rt.sessions() as db:
        station = await db.get(Station, uuid.UUID(station_id))
    assert station.status == "online" and station.last_heartbeat_at is not None
    await apply(rt, station_id, "MarkOffline", {"reason": "last_will"})
    async with rt.sessions() as db:
        assert (await db.get(Station, uuid.UUID(station_id))).status == "offline"


async def test_silent_stations_go_offline_and_a_station_heard_since_stays_online(rt):
    silent = await make_station(rt, "ST-SILENT")
    chatty = await make_station(rt, "ST-CHATTY")
    later = utcnow() + timedelta(seconds=91)  # 3 x 30 s heartbeats missed
    assert await mark_silent_stations_offline(rt, now=later) == 2
    # The chatty station speaks before its MarkOffline is applied.
    await apply(rt, chatty, "Heartbeat", event(1, received_at=(later + timedelta(seconds=1)).isoformat()))
    await rt.drain("station", silent)
    await rt.drain("station", chatty)
    async with rt.sessions() as db:
        statuses = {s.serial: s.status for s in (await db.execute(select(Station))).scalars()}
    assert statuses == {"ST-SILENT": "offline", "ST-CHATTY": "online"}
    assert await mark_silent_stations_offline(rt, now=later) == 0


async def status_changes(rt, station_id):
    async with rt.sessions() as db:
        rows = await db.execute(
            select(StationStatusChange)
            .where(StationStatusChange.station_id == uuid.UUID(station_id))
            .order_by(StationStatusChange.id)
        )
        return [(c.from_status, c.to_status, c.reason) for c in rows.scalars()]


async def test_every_status_change_is_kept_with_its_reason_and_nothing_else_is(rt):
    station_id = await make_station(rt, "ST-HIST", status="offline")
    await apply(rt, station_id, "Heartbeat", event(1))
    await apply(rt, station_id, "Heartbeat", event(2))  # already online: no change, no row
    await apply(rt, station_id, "Heartbeat", event(1))  # a re-send: changes nothing
    await apply(rt, station_id, "MarkOffline", {"reason": "last_will"})
    await apply(rt, station_id, "MarkOffline", {"reason": "last_will"})  # already offline: ignored
    await apply(rt, station_id, "BankInserted", event(3, slot=1, bank="PB-HIST", charge=50))
    assert await status_changes(rt, station_id) == [
        ("offline", "online", "heartbeat"),
        ("online", "offline", "last_will"),
        ("offline", "online", "bank_inserted"),
    ]


async def test_a_silent_station_going_offline_is_recorded_at_the_decision_time(rt):
    station_id = await make_station(rt, "ST-SILHIST")
    later = utcnow() + timedelta(seconds=91)
    assert await mark_silent_stations_offline(rt, now=later) == 1
    await rt.drain("station", station_id)
    assert await status_changes(rt, station_id) == [("online", "offline", "silent")]


def test_back_from_maintenance_is_online_only_if_heard_from_recently():
    now = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    assert station_actor.status_after_maintenance(now - timedelta(seconds=90), 30, now) == "online"
    assert station_actor.status_after_maintenance(now - timedelta(seconds=91), 30, now) == "offline"
    assert station_actor.status_after_maintenance(None, 30, now) == "offline"


async def test_a_parked_station_stays_parked_rents_nothing_and_still_takes_returns(rt):
    station_id = await make_station(rt, "ST-PARK", [("PB-P", 95), None])
    assert (await apply(rt, station_id, "SetMaintenance", {"maintenance": True, "reason": "repair"}))["status"] == "maintenance"
    await apply(rt, station_id, "Heartbeat", event(1))
    await apply(rt, station_id, "MarkOffline", {"reason": "last_will"})
    rental_id = str(uuid.uuid4())
    await apply(rt, station_id, "ReserveAndEject", {"rental_id": rental_id, "user_id": "u"})
    [failed] = await rental_commands(rt, "EjectFailed")
    assert failed.payload == {"reason": "station_offline"}
    await apply(rt, station_id, "BankInserted", event(2, slot=2, bank="PB-Q", charge=40))
    assert [s.status for s in await slots_of(rt, station_id)][:2] == ["occupied", "occupied"]
    assert (await apply(rt, station_id, "SetMaintenance", {"maintenance": False}))["status"] == "online"
    assert await status_changes(rt, station_id) == [("online", "maintenance", "repair"), ("maintenance", "online", "operator")]


# --- ejecting ---------------------------------------------------------------------------------


async def test_reserve_and_eject_picks_the_best_bank_and_publishes_the_command(rt):
    station_id = await make_station(rt, "ST-EJ", [("PB-LOW", 15), ("PB-MID", 60), ("PB-TOP", 95), None])
    rental_id = str(uuid.uuid4())
    result = await apply(rt, station_id, "ReserveAndEject", {"rental_id": rental_id, "user_id": str(uuid.uuid4())})
    assert result["slot"] == 3
    slots = await slots_of(rt, station_id)
    assert slots[2].status == "ejecting" and str(slots[2].ejecting_rental_id) == rental_id
    deadline_ms = (slots[2].eject_deadline_at - utcnow()).total_seconds() * 1000
    assert EJECT_TIMEOUT_MS - 2000 < deadline_ms <= EJECT_TIMEOUT_MS
    assert (await bank(rt, "PB-TOP")).status == "ejecting"
    [eject] = await outbox(rt, "eject")
    assert eject.topic == "pb/v1/stations/ST-EJ/commands"
    assert (eject.payload["slot"], eject.payload["bank"]) == (3, "PB-TOP")
    assert eject.payload["command_id"] == slots[2].eject_command_id
    assert await rental_commands(rt) == []


async def test_two_rentals_for_one_bank_get_one_eject_and_one_failure(rt):
    station_id = await make_station(rt, "ST-ONE", [("PB-ONLY", 100)])
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    await rt.submit("station", station_id, "ReserveAndEject", {"rental_id": first, "user_id": "u"}, f"eject:{first}")
    await rt.submit("station", station_id, "ReserveAndEject", {"rental_id": second, "user_id": "u"}, f"eject:{second}")
    await rt.drain("station", station_id)
    assert len(await outbox(rt, "eject")) == 1
    [failed] = await rental_commands(rt)
    assert (failed.entity_id, failed.name, failed.payload) == (second, "EjectFailed", {"reason": "no_bank_available"})
    assert failed.command_id == f"eject-failed:{second}"


async def test_offline_station_fails_the_rental(rt):
    station_id = await make_station(rt, "ST-OFF", [("PB-X", 100)], status="offline")
    rental_id = str(uuid.uuid4())
    await apply(rt, station_id, "ReserveAndEject", {"rental_id": rental_id, "user_id": "u"})
    [failed] = await rental_commands(rt)
    assert failed.payload == {"reason": "station_offline"}
    assert await outbox(rt, "eject") == []


async def test_eject_ack_ok_hands_the_bank_to_the_rental(rt):
    station_id = await make_station(rt, "ST-ACK", [("PB-A", 90)])
    rental_id = str(uuid.uuid4())
    started = await apply(rt, station_id, "ReserveAndEject", {"rental_id": rental_id, "user_id": "u"})
    await apply(
        rt, station_id, "EjectAck",
        event(11, command_id=started["eject_command_id"], slot=1, bank="PB-A", code="ok"),
    )
    slot = (await slots_of(rt, station_id))[0]
    the_bank = await bank(rt, "PB-A")
    assert (slot.status, slot.power_bank_id, slot.eject_command_id) == ("empty", None, None)
    assert (the_bank.status, the_bank.station_id) == ("rented", None)
    [ejected] = await rental_commands(rt)
    assert (ejected.entity_id, ejected.name, ejected.command_id) == (rental_id, "BankEjected", f"ejected:{rental_id}")
    assert ejected.payload["power_bank_id"] == str(the_bank.id)
    assert (ejected.payload["power_bank_serial"], ejected.payload["slot_number"]) == ("PB-A", 1)
    datetime.fromisoformat(ejected.payload["station_time"])


async def test_failed_eject_retries_once_elsewhere_then_fails_the_rental(rt):
    station_id = await make_station(rt, "ST-RETRY", [("PB-1", 90), ("PB-2", 80), ("PB-3", 70)])
    rental_id = str(uuid.uuid4())
    first = await apply(rt, station_id, "ReserveAndEject", {"rental_id": rental_id, "user_id": "u"})
    assert first["slot"] == 1
    retry = await apply(rt, station_id, "EjectAck", event(1, command_id=first["eject_command_id"], slot=1, code="jammed"))
    assert (retry["slot"], retry["attempt"]) == (2, 2)
    slots = await slots_of(rt, station_id)
    assert slots[0].status == "fault" and (await bank(rt, "PB-1")).status == "in_slot"
    assert slots[1].status == "ejecting"
    final = await apply(rt, station_id, "EjectAck", event(2, command_id=retry["eject_command_id"], slot=2, code="error"))
    assert final == {"ok": False, "reason": "eject_failed", "failed_slot": 2, "code": "error", "seq": 2}
    slots = await slots_of(rt, station_id)
    assert [s.status for s in slots] == ["fault", "occupied", "occupied", "empty"]
    assert (await bank(rt, "PB-2")).status == "in_slot"
    [failed] = await rental_commands(rt)
    assert (failed.name, failed.payload) == ("EjectFailed", {"reason": "eject_failed"})
    assert len(await outbox(rt, "eject")) == 2  # never a third attempt


async def test_expired_eject_retries_and_a_late_ack_counts_the_bank_as_removed(rt):
    station_id = await make_station(rt, "ST-LATE", [("PB-1", 90), ("PB-2", 80)])
    rental_id = str(uuid.uuid4())
    first = await apply(rt, station_id, "ReserveAndEject", {"rental_id": rental_id, "user_id": "u"})
    assert await expire_overdue_ejects(rt, now=utcnow()) == 0  # not yet due
    future = utcnow() + timedelta(milliseconds=EJECT_TIMEOUT_MS + 1000)
    assert await expire_overdue_ejects(rt, now=future) == 1
    assert await expire_overdue_ejects(rt, now=future) == 1  # found again, but a duplicate command
    await rt.drain("station", station_id)
    slots = await slots_of(rt, station_id)
    assert (slots[0].status, slots[1].status) == ("occupied", "ejecting")
    # The first command's ack arrives after its expiry: the bank did leave slot 1.
    late = await apply(rt, station_id, "EjectAck", event(5, command_id=first["eject_command_id"], slot=1, bank="PB-1", code="ok"))
    assert late["stale_ack"] and late["discrepancies"][0]["kind"] == "ejected_after_expiry"
    assert ((await bank(rt, "PB-1")).status, (await slots_of(rt, station_id))[0].status) == ("lost", "empty")
    assert await rental_commands(rt) == []  # the retry on slot 2 is still in flight
    await expire_overdue_ejects(rt, now=future + timedelta(milliseconds=EJECT_TIMEOUT_MS + 1000))
    await rt.drain("station", station_id)
    [failed] = await rental_commands(rt)
    assert failed.payload == {"reason": "eject_failed"}


# --- events: duplicates, returns, reconciliation ----------------------------------------------


async def test_duplicate_seq_is_a_no_op(rt):
    station_id = await make_station(rt, "ST-DUP", slot_count=2)
    first = await apply(rt, station_id, "BankInserted", event(9, slot=1, bank="PB-D", charge=50))
    assert first["ok"] and not first.get("duplicate")
    # Same seq under another command id (and other content): recorded once, nothing moves.
    again = await apply(rt, station_id, "BankInserted", event(9, slot=2, bank="PB-E", charge=50))
    assert again == {"ok": True, "duplicate": True, "seq": 9}
    slots = await slots_of(rt, station_id)
    assert [s.status for s in slots] == ["occupied", "empty"]
    # The same command id twice is deduplicated by the runtime and returns the first result.
    await rt.submit("station", station_id, "Battery", event(10, slot=1, bank="PB-D", charge=60), "evt:ST-DUP:10")
    await rt.drain("station", station_id)
    repeat = await rt.submit("station", station_id, "Battery", event(10, slot=1, bank="PB-D", charge=99), "evt:ST-DUP:10")
    assert repeat.duplicate and repeat.status == "applied"
    await rt.drain("station", station_id)
    assert (await bank(rt, "PB-D")).charge_percent == 60
    async with rt.sessions() as db:
        assert len(list((await db.execute(select(StationEvent))).scalars())) == 2


async def test_inserting_a_rented_bank_returns_its_rental(rt):
    home = await make_station(rt, "ST-HOME", [("PB-R", 70)])
    away = await make_station(rt, "ST-AWAY", [None, None])
    rental_id = await make_open_rental(rt, home, "PB-R")
    async with rt.sessions.begin() as db:  # as after its eject: the bank is out
        slot = (await db.execute(select(StationSlot).where(StationSlot.station_id == uuid.UUID(home)))).scalars().first()
        slot.power_bank_id, slot.status = None, "empty"
        await db.flush()
        the_bank = (await db.execute(select(PowerBank).where(PowerBank.serial == "PB-R"))).scalar_one()
        the_bank.status, the_bank.station_id = "rented", None
    await apply(rt, away, "Heartbeat", event(1, epoch_ms(utcnow()) - 60_000))  # station clock 60 s behind
    received = utcnow()
    await apply(
        rt, away, "BankInserted",
        event(2, epoch_ms(received) - 60_000, slot=2, bank="PB-R", charge=30, received_at=received.isoformat()),
    )
    the_bank = await bank(rt, "PB-R")
    assert (the_bank.status, str(the_bank.station_id), the_bank.charge_percent) == ("in_slot", away, 30)
    [returned] = await rental_commands(rt)
    assert (returned.entity_id, returned.name, returned.command_id) == (rental_id, "BankReturned", f"returned:{rental_id}")
    assert returned.payload["station_id"] == away and returned.payload["power_bank_id"] == str(the_bank.id)
    returned_at = datetime.fromisoformat(returned.payload["returned_at"])
    assert abs((returned_at - received).total_seconds()) < 1.0  # skew-corrected, not 60 s early
    assert datetime.fromisoformat(returned.payload["received_at"]) == received


async def test_inventory_reconciles_slots_banks_and_open_rentals(rt):
    station_id = await make_station(rt, "ST-INV", [("PB-A", 50), ("PB-B", 50), None, None])
    other = await make_station(rt, "ST-OTHER", [("PB-T", 40)])
    await make_station(rt, "ST-SRC", [("PB-R", 90)])
    rental_id = await make_open_rental(rt, station_id, "PB-R")
    report = event(
        20, slot_count=4,
        slots=[
            {"slot": 1, "bank": "PB-A", "charge": 55},
            {"slot": 3, "bank": "PB-NEW", "charge": 65},
            {"slot": 4, "bank": "PB-T", "charge": 41},  # the database has it at another station
        ],
    )
    result = await apply(rt, station_id, "Inventory", report)
    kinds = sorted(d["kind"] for d in result["discrepancies"])
    assert kinds == ["bank_created", "bank_missing", "bank_seen_elsewhere", "slot_corrected", "slot_corrected", "slot_corrected"]
    slots = await slots_of(rt, station_id)
    assert [s.status for s in slots] == ["occupied", "empty", "occupied", "occupied"]
    assert (await bank(rt, "PB-A")).charge_percent == 55
    assert (await bank(rt, "PB-B")).status == "lost"
    assert str((await bank(rt, "PB-T")).station_id) == station_id
    assert (await slots_of(rt, other))[0].status == "empty"
    # A second report with the rented bank in slot 2 closes its rental.
    report = event(21, slot_count=4, slots=[*report["slots"], {"slot": 2, "bank": "PB-R", "charge": 20}])
    result = await apply(rt, station_id, "Inventory", report)
    assert result["returned_rentals"] == [rental_id]
    [returned] = await rental_commands(rt)
    assert returned.name == "BankReturned" and returned.entity_id == rental_id


async def test_a_late_older_event_does_not_undo_a_newer_inventory(rt):
    station_id = await make_station(rt, "ST-ORDER", [None])
    await apply(rt, station_id, "Inventory", event(30, slot_count=1, slots=[{"slot": 1, "bank": "PB-O", "charge": 80}]))
    stale = await apply(rt, station_id, "BankRemoved", event(29, slot=1, bank="PB-O"))
    assert stale["stale"]
    assert (await slots_of(rt, station_id))[0].status == "occupied"
    assert (await bank(rt, "PB-O")).status == "in_slot"


async def test_station_update_is_announced_on_the_bus(rt):
    station_id = await make_station(rt, "ST-BUS", [("PB-1", 90), ("PB-2", 10), None], slot_count=3)
    async with rt.bus.subscribe(f"station:{station_id}") as by_station, rt.bus.subscribe(station_actor.area_cell(27.7, 85.3)) as by_area:
        await apply(rt, station_id, "BankInserted", event(1, slot=3, bank="PB-3", charge=50))
        _, message = await by_station.get(2)
        _, in_area = await by_area.get(2)
    assert message == in_area == {
        "type": "station.updated", "station_id": station_id, "serial": "ST-BUS", "status": "online",
        "available": 2, "empty_slots": 0, "latitude": 27.7, "longitude": 85.3,
    }


def test_area_cells_cover_a_box_and_hold_the_stations_inside():
    cell = station_actor.area_cell(27.71, 85.32)
    assert cell in station_actor.cells_covering(27.70, 27.72, 85.31, 85.33)
    assert station_actor.cells_covering(27.71, 27.71, 85.32, 85.32) == [cell]
    assert len(station_actor.cells_covering(27.0, 27.2, 85.0, 85.2)) == 25  # 0.05 degree cells
    assert station_actor.area_cell(-0.01, -0.01) != station_actor.area_cell(0.01, 0.01)


async def test_a_return_before_the_rental_heard_of_its_eject_still_closes_it(rt):
    """Eject acked, bank pushed into another station at once, while BankEjected still waits in
    the rental's mailbox: the return must still reach that rental, after the eject."""
    home = await make_station(rt, "ST-FAST", [("PB-F", 90)])
    away = await make_station(rt, "ST-NEXT", [None, None])
    rental_id = str(uuid.uuid4())
    started = await apply(rt, home, "ReserveAndEject", {"rental_id": rental_id, "user_id": "u"})
    await apply(rt, home, "EjectAck", event(5, command_id=started["eject_command_id"], slot=1, bank="PB-F", code="ok"))
    await apply(rt, away, "BankInserted", event(1, slot=1, bank="PB-F", charge=88))
    commands = [c for c in await rental_commands(rt) if c.entity_id == rental_id]
    assert [c.name for c in commands] == ["BankEjected", "BankReturned"]
    assert commands[1].payload["station_id"] == away
    assert (await bank(rt, "PB-F")).rental_id is None


async def test_a_return_into_a_slot_whose_eject_ack_is_late_closes_both_rentals(rt):
    """Found by the load test with drops and reordering: slot 1 is ejecting PB-OUT for rental A,
    the ack (seq 10) is delayed, and B's bank PB-BACK goes into the emptied slot (seq 12) first.
    The insert proves the eject happened: A gets its bank, B's rental closes, the late ack is stale."""
    home = await make_station(rt, "ST-LATEACK", [("PB-OUT", 90), None])
    away = await make_station(rt, "ST-AWAY", [("PB-BACK", 80)])
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    rented = await apply(rt, away, "ReserveAndEject", {"rental_id": second, "user_id": "u"})
    await apply(rt, away, "EjectAck", event(3, command_id=rented["eject_command_id"], slot=1, bank="PB-BACK", code="ok"))
    started = await apply(rt, home, "ReserveAndEject", {"rental_id": first, "user_id": "u"})
    inserted = await apply(rt, home, "BankInserted", event(12, slot=1, bank="PB-BACK", charge=70))
    assert inserted["returned_rental_id"] == second and inserted["discrepancies"] == []
    late = await apply(rt, home, "EjectAck", event(10, command_id=started["eject_command_id"], slot=1, bank="PB-OUT", code="ok"))
    assert late["stale_ack"] is True
    names = {(c.entity_id, c.name) for c in await rental_commands(rt)}
    assert {(first, "BankEjected"), (second, "BankReturned")} <= names
    assert ((await bank(rt, "PB-OUT")).status, (await bank(rt, "PB-BACK")).status) == ("rented", "in_slot")
    assert [s.status for s in await slots_of(rt, home)][:2] == ["occupied", "empty"]


async def test_the_same_bank_back_into_its_ejecting_slot_waits_for_the_ack(rt):
    station_id = await make_station(rt, "ST-SAMEBANK", [("PB-SAME", 90)])
    await apply(rt, station_id, "ReserveAndEject", {"rental_id": str(uuid.uuid4()), "user_id": "u"})
    result = await apply(rt, station_id, "BankInserted", event(4, slot=1, bank="PB-SAME", charge=90))
    assert [d["kind"] for d in result["discrepancies"]] == ["insert_into_ejecting_slot"]
    assert (await slots_of(rt, station_id))[0].status == "ejecting"


async def test_an_inventory_overtaken_by_newer_slot_events_leaves_those_slots_alone(rt):
    """Inventory 40 was taken before a return (41) into slot 2 and a removal (42) from slot 1
    but arrives after them: it must not move those slots back in time, nor call a bank that
    an event since put elsewhere missing. Slots no newer event touched are still reconciled."""
    station_id = await make_station(rt, "ST-OVERTAKEN", [("PB-K", 60), None, ("PB-G", 70)], slot_count=3)
    await apply(rt, station_id, "BankInserted", event(41, slot=2, bank="PB-NEWER", charge=33))
    await apply(rt, station_id, "BankRemoved", event(42, slot=1, bank="PB-K"))
    overtaken = event(
        40, slot_count=3,
        slots=[{"slot": 1, "bank": "PB-K", "charge": 60}, {"slot": 3, "bank": "PB-G", "charge": 75, "fault": "latch"}],
    )
    result = await apply(rt, station_id, "Inventory", overtaken)
    slots = await slots_of(rt, station_id)
    assert [s.status for s in slots] == ["empty", "occupied", "fault"]
    assert (await bank(rt, "PB-NEWER")).status == "in_slot"
    assert (await bank(rt, "PB-K")).status == "lost"  # removed at 42, as the newer event said
    assert [d["kind"] for d in result["discrepancies"]] == ["slot_corrected"]  # slot 3 only
    # The same report arriving in order (newer than every slot event) is the truth again.
    fresh = {**overtaken, "seq": 43}
    await apply(rt, station_id, "Inventory", fresh)
    assert [s.status for s in await slots_of(rt, station_id)] == ["occupied", "empty", "fault"]


async def test_an_eject_in_flight_is_published_again_after_the_stations_next_inventory(rt):
    """Stations connect with a clean session, so an eject published while one was away is
    gone; its reconnect inventory brings it back, same command id and expiry, while the
    deadline has not passed."""
    station_id = await make_station(rt, "ST-AWAY-EJ", [("PB-E1", 90), ("PB-E2", 50)])
    started = await apply(rt, station_id, "ReserveAndEject", {"rental_id": str(uuid.uuid4()), "user_id": "u"})
    [first] = await outbox(rt, "eject")
    report = event(7, slot_count=4, slots=[{"slot": 1, "bank": "PB-E1", "charge": 90}, {"slot": 2, "bank": "PB-E2", "charge": 50}])
    result = await apply(rt, station_id, "Inventory", report)
    assert result["ejects_resent"] == [started["eject_command_id"]]
    first_again, second = await outbox(rt, "eject")
    assert first_again.id == first.id and second.payload == first.payload
    assert (await slots_of(rt, station_id))[0].status == "ejecting"  # the snapshot does not settle it
    # Past the deadline nothing is re-sent: the scheduler fails it instead.
    async with rt.sessions.begin() as db:
        slot = (await db.execute(select(StationSlot).where(StationSlot.eject_command_id == started["eject_command_id"]))).scalar_one()
        slot.eject_deadline_at = utcnow() - timedelta(seconds=1)
    result = await apply(rt, station_id, "Inventory", {**report, "seq": 8})
    assert "ejects_resent" not in result and len(await outbox(rt, "eject")) == 2


# --- reservations ------------------------------------------------------------------------------


async def reservation_for(rt, station_id: str) -> str:
    async with rt.sessions.begin() as db:
        user = User(phone=f"+9779{uuid.uuid4().int % 10**9:09d}", referral_code=uuid.uuid4().hex[:10])
        db.add(user)
        await db.flush()
        reservation = Reservation(user_id=user.id, station_id=uuid.UUID(station_id), status="pending")
        db.add(reservation)
    return str(reservation.id)


async def reservation(rt, reservation_id: str) -> Reservation:
    async with rt.sessions() as db:
        return await db.get(Reservation, uuid.UUID(reservation_id))


async def test_a_reservation_holds_the_best_bank_for_its_holder_only(rt):
    station_id = await make_station(rt, "ST-RES", [("PB-LOW", 40), ("PB-TOP", 95), ("PB-MID", 70), None])
    first = await reservation_for(rt, station_id)
    held = await apply(rt, station_id, "ReserveSlot", {"reservation_id": first})
    assert (held["status"], held["slot"]) == ("confirmed", 2)
    confirmed = await reservation(rt, first)
    assert confirmed.status == "confirmed" and confirmed.slot_number == 2 and confirmed.expires_at > utcnow()
    # Someone else renting here gets the next best bank; the held one stays put.
    other_rental = str(uuid.uuid4())
    assert (await apply(rt, station_id, "ReserveAndEject", {"rental_id": other_rental, "user_id": "u"}))["slot"] == 3
    # The holder's rental takes the held bank and completes the reservation.
    holder = str(confirmed.user_id)
    mine = str(uuid.uuid4())
    taken = await apply(rt, station_id, "ReserveAndEject", {"rental_id": mine, "user_id": holder, "reservation_id": first})
    assert taken["slot"] == 2
    done = await reservation(rt, first)
    assert (done.status, str(done.rental_id)) == ("completed", mine)
    assert all(s.reserved_for_id is None for s in await slots_of(rt, station_id))


async def test_with_every_bank_held_there_is_nothing_to_reserve_or_rent(rt):
    station_id = await make_station(rt, "ST-FULL", [("PB-ONE", 90)], slot_count=1)
    first, second = await reservation_for(rt, station_id), await reservation_for(rt, station_id)
    assert (await apply(rt, station_id, "ReserveSlot", {"reservation_id": first}))["status"] == "confirmed"
    refused = await apply(rt, station_id, "ReserveSlot", {"reservation_id": second})
    assert (refused["status"], refused["reason"]) == ("cancelled", "no_bank_available")
    assert (await reservation(rt, second)).cancel_reason == "no_bank_available"
    await apply(rt, station_id, "ReserveAndEject", {"rental_id": str(uuid.uuid4()), "user_id": "u"})
    [failed] = await rental_commands(rt, "EjectFailed")
    assert failed.payload == {"reason": "no_bank_available"}


async def test_a_reservation_expires_on_the_schedulers_clock_and_frees_its_bank(rt):
    station_id = await make_station(rt, "ST-EXP", [("PB-E", 90)], slot_count=1)
    held = await reservation_for(rt, station_id)
    await apply(rt, station_id, "ReserveSlot", {"reservation_id": held, "hold_s": 300})
    assert await station_actor.expire_reservations(rt, now=utcnow() + timedelta(seconds=290)) == 0
    later = utcnow() + timedelta(seconds=301)
    for _ in range(2):  # a repeated sweep is a duplicate
        assert await station_actor.expire_reservations(rt, now=later) == 1
    await rt.drain("station", station_id)
    assert (await reservation(rt, held)).status == "expired"
    assert [s.reserved_for_id for s in await slots_of(rt, station_id)] == [None]
    assert await station_actor.expire_reservations(rt, now=later) == 0
    async with rt.sessions() as db:
        expiries = await db.scalar(select(func.count()).select_from(ActorCommand).where(ActorCommand.name == "ExpireReservation"))
    assert expiries == 1


async def test_a_hold_past_its_time_is_freed_by_the_next_request_without_the_scheduler(rt):
    station_id = await make_station(rt, "ST-LAZY", [("PB-L", 90)], slot_count=1)
    held = await reservation_for(rt, station_id)
    await apply(rt, station_id, "ReserveSlot", {"reservation_id": held, "hold_s": 300})
    async with rt.sessions.begin() as db:  # as if five minutes went by
        slot = (await db.execute(select(StationSlot).where(StationSlot.station_id == uuid.UUID(station_id)))).scalar_one()
        slot.reserved_until = utcnow() - timedelta(seconds=1)
    assert (await apply(rt, station_id, "ReserveAndEject", {"rental_id": str(uuid.uuid4()), "user_id": "u"}))["slot"] == 1
    assert (await reservation(rt, held)).status == "expired"


async def test_only_the_holder_cancels_and_a_cancelled_hold_frees_the_bank(rt):
    station_id = await make_station(rt, "ST-CXL", [("PB-C", 90)], slot_count=1)
    held = await reservation_for(rt, station_id)
    await apply(rt, station_id, "ReserveSlot", {"reservation_id": held})
    stranger = await apply(rt, station_id, "CancelReservation", {"reservation_id": held, "user_id": str(uuid.uuid4())})
    assert stranger == {"ok": False, "reason": "reservation_not_found"}
    owner = str((await reservation(rt, held)).user_id)
    assert (await apply(rt, station_id, "CancelReservation", {"reservation_id": held, "user_id": owner}))["status"] == "cancelled"
    assert [s.reserved_for_id for s in await slots_of(rt, station_id)] == [None]


async def test_a_heartbeat_reads_the_slots_only_when_it_brings_the_station_back_online(rt, engine):
    """Heartbeats are most of a fleet's commands: an online station's costs no slot or bank
    read; one that comes back online still announces its availability."""
    from sqlalchemy import event as sa_event

    station_id = await make_station(rt, "ST-BEAT", [("PB-B1", 90), None], slot_count=2, status="offline")
    statements = []

    def remember(conn, cursor, statement, *args):
        statements.append(statement)

    sa_event.listen(engine.sync_engine, "before_cursor_execute", remember)
    try:
        async with rt.bus.subscribe(f"station:{station_id}") as subscription:
            await apply(rt, station_id, "Heartbeat", event(1))
            _, message = await subscription.get(2)
        assert (message["status"], message["available"], message["empty_slots"]) == ("online", 1, 1)
        assert any("FROM station_slots" in s for s in statements)
        statements.clear()
        await apply(rt, station_id, "Heartbeat", event(2))
        assert not any("station_slots" in s or "power_banks" in s for s in statements)
    finally:
        sa_event.remove(engine.sync_engine, "before_cursor_execute", remember)
    async with rt.sessions() as db:
        station = await db.get(Station, uuid.UUID(station_id))
    assert station.status == "online" and station.last_event_seq == 2


# --- service ejects (field staff) ---------------------------------------------------------------


def test_a_service_eject_takes_only_a_bank_nothing_else_claims():
    from powerbank.actors.station import service_eject_refusal

    bank_in = SlotView(1, "occupied", "PB-1", "in_slot", 90)
    assert service_eject_refusal(bank_in, "online") is None and service_eject_refusal(bank_in, "maintenance") is None
    assert service_eject_refusal(SlotView(1, "fault", "PB-1", "in_slot", 90), "online") is None  # a jammed slot
    assert service_eject_refusal(bank_in, "offline") == "station_offline"
    assert service_eject_refusal(None, "online") == "slot_not_found"
    assert service_eject_refusal(SlotView(1, "empty"), "online") == "slot_empty"
    assert service_eject_refusal(SlotView(1, "ejecting", "PB-1", "ejecting", 90), "online") == "slot_ejecting"
    assert service_eject_refusal(SlotView(1, "occupied", "PB-1", "in_slot", 90, reserved_for="r"), "online") == "slot_reserved"


async def apply_outcome(rt, station_id, name, payload):
    command_id = f"t:{uuid.uuid4()}"
    await rt.submit("station", station_id, name, payload, command_id)
    await rt.drain("station", station_id)
    return await rt.outcome("station", command_id)


async def test_a_service_eject_publishes_the_eject_and_the_ack_takes_the_bank_out_as_faulty(rt):
    station_id = await make_station(rt, "ST-SVC", [("PB-1", 90), ("PB-2", 10)], status="maintenance")
    started = await apply(rt, station_id, "ServiceEject", {"slot": 2, "reason": "swollen battery"})
    assert (started["slot"], started["bank"]) == (2, "PB-2")
    [command] = await outbox(rt, "eject")
    assert command.payload["command_id"] == started["eject_command_id"] and command.payload["slot"] == 2
    assert command.payload["bank"] == "PB-2" and command.payload["expires_at"] > epoch_ms(utcnow())
    slot = (await slots_of(rt, station_id))[1]
    assert (slot.status, slot.ejecting_rental_id, (await bank(rt, "PB-2")).status) == ("ejecting", None, "ejecting")

    done = await apply(rt, station_id, "EjectAck", event(3, command_id=started["eject_command_id"], slot=2, bank="PB-2", code="ok"))
    assert done["service_ejected"] == "PB-2"
    slot, the_bank = (await slots_of(rt, station_id))[1], await bank(rt, "PB-2")
    assert (slot.status, slot.power_bank_id, slot.eject_command_id) == ("empty", None, None)
    assert (the_bank.status, the_bank.station_id, the_bank.rental_id) == ("faulty", None, None)
    assert await rental_commands(rt) == []  # no rental touched
    async with rt.sessions() as db:
        assert await db.scalar(select(func.count()).select_from(Rental)) == 0


async def test_a_failed_or_expired_service_eject_puts_the_slot_back_and_tries_nothing_else(rt):
    station_id = await make_station(rt, "ST-SVC2", [("PB-1", 90), ("PB-2", 80)])
    jammed = await apply(rt, station_id, "ServiceEject", {"slot": 1, "reason": "inspection"})
    failed = await apply(rt, station_id, "EjectAck", event(1, command_id=jammed["eject_command_id"], slot=1, code="jammed"))
    assert failed == {"ok": False, "reason": "service_eject_failed", "failed_slot": 1, "code": "jammed", "seq": 1}
    assert [s.status for s in await slots_of(rt, station_id)][:2] == ["fault", "occupied"]
    assert (await bank(rt, "PB-1")).status == "in_slot"

    timed = await apply(rt, station_id, "ServiceEject", {"slot": 2, "reason": "inspection"})
    await expire_overdue_ejects(rt, now=utcnow() + timedelta(milliseconds=EJECT_TIMEOUT_MS + 1000))
    await rt.drain("station", station_id)
    slot = (await slots_of(rt, station_id))[1]
    assert (slot.status, slot.eject_command_id, (await bank(rt, "PB-2")).status) == ("occupied", None, "in_slot")
    assert len(await outbox(rt, "eject")) == 2 and await rental_commands(rt) == []
    assert timed["slot"] == 2


async def test_a_service_eject_is_refused_for_an_empty_ejecting_or_reserved_slot(rt):
    station_id = await make_station(rt, "ST-SVC3", [("PB-1", 90), ("PB-2", 80)])
    rental = await apply(rt, station_id, "ReserveAndEject", {"rental_id": str(uuid.uuid4()), "user_id": "u"})
    held = await apply(rt, station_id, "ReserveSlot", {"reservation_id": await reservation_for(rt, station_id)})
    assert (rental["slot"], held["slot"]) == (1, 2)
    for slot, reason in ((1, "slot_ejecting"), (2, "slot_reserved"), (3, "slot_empty"), (9, "slot_not_found")):
        outcome = await apply_outcome(rt, station_id, "ServiceEject", {"slot": slot, "reason": "x"})
        assert (outcome.result["ok"], outcome.result["reason"]) == (False, reason), (slot, outcome)
    assert len(await outbox(rt, "eject")) == 1  # only the rental's
    offline = await make_station(rt, "ST-SVC4", [("PB-9", 90)], status="offline")
    outcome = await apply_outcome(rt, offline, "ServiceEject", {"slot": 1, "reason": "x"})
    assert outcome.result == {"ok": False, "reason": "station_offline", "slot": 1}
    assert (await bank(rt, "PB-9")).status == "in_slot"


# --- heartbeats of idle online stations, many per transaction ------------------------------------


def heartbeat_envelope(station_id, seq, received_at=None, ts_ms=None):
    from powerbank.actors.mailbox import Envelope

    received_at = received_at or utcnow()
    payload = {"type": "heartbeat", **event(seq, ts_ms=ts_ms, uptime_s=60), "received_at": received_at.isoformat()}
    return Envelope("station", station_id, "Heartbeat", payload, f"evt:{station_id}:{seq}")


async def station_row(rt, station_id) -> Station:
    async with rt.sessions() as db:
        return await db.get(Station, uuid.UUID(station_id))


async def events_of(rt, station_id) -> list[tuple[int, str]]:
    async with rt.sessions() as db:
        rows = await db.execute(
            select(StationEvent.seq, StationEvent.kind).where(StationEvent.station_id == uuid.UUID(station_id))
            .order_by(StationEvent.seq)
        )
        return [tuple(row) for row in rows.all()]


async def test_heartbeats_of_idle_online_stations_are_applied_together_exactly_as_the_actor_would(rt):
    """The batch writes what `heartbeat` writes through the mailbox (a twin station gets the same
    heartbeat that way), records each as an applied command, and a repeat is a duplicate."""
    batched = await make_station(rt, "ST-HB-BATCH", [("PB-HBB", 90)])
    twin = await make_station(rt, "ST-HB-TWIN", [("PB-HBT", 90)])
    received_at = utcnow()
    station_ts = epoch_ms(received_at) - 4000  # the station's clock is 4 s behind
    [result] = await rt.apply_idle_batch("station", "Heartbeat", [heartbeat_envelope(batched, 9, received_at, station_ts)])
    twin_envelope = heartbeat_envelope(twin, 9, received_at, station_ts)
    twin_result = await apply(rt, twin, "Heartbeat", twin_envelope.payload, twin_envelope.command_id)
    assert result == twin_result == {"ok": True, "seq": 9, "clock_offset_ms": 4000}
    one, other = await station_row(rt, batched), await station_row(rt, twin)
    fields = ("status", "last_seen_at", "last_heartbeat_at", "clock_offset_ms", "last_event_seq")
    assert [getattr(one, f) for f in fields] == [getattr(other, f) for f in fields]
    assert one.last_heartbeat_at == received_at and one.last_event_seq == 9
    assert await events_of(rt, batched) == await events_of(rt, twin) == [(9, "heartbeat")]
    outcome = await rt.outcome("station", f"evt:{batched}:9")
    assert (outcome.status, outcome.result) == ("applied", result)
    # The same command again: not applied twice, and the mailbox answers it as a duplicate.
    assert await rt.apply_idle_batch("station", "Heartbeat", [heartbeat_envelope(batched, 9)]) == [None]
    again = await rt.submit("station", batched, "Heartbeat", heartbeat_envelope(batched, 9).payload, f"evt:{batched}:9")
    assert again.duplicate and again.result == result


async def test_a_heartbeat_the_batch_cannot_take_is_left_untouched_for_the_mailbox(rt):
    """Offline, parked or unknown stations change status (history, map update), a station with
    mail must hear its commands in order, a seq seen before is a duplicate: all declined, with
    nothing written, and the mailbox applies them as before."""
    idle = await make_station(rt, "ST-HB-IDLE")
    offline = await make_station(rt, "ST-HB-OFF", status="offline")
    parked = await make_station(rt, "ST-HB-PARK", status="maintenance")
    busy = await make_station(rt, "ST-HB-BUSY")
    resent = await make_station(rt, "ST-HB-SEEN")
    await apply(rt, resent, "BankInserted", event(5, slot=1, bank="PB-HBS", charge=50))
    await rt.submit("station", busy, "MarkOffline", {"reason": "last_will"}, "t:busy-offline")  # pending
    unknown = str(uuid.uuid4())
    envelopes = [heartbeat_envelope(idle, 1), heartbeat_envelope(offline, 1), heartbeat_envelope(parked, 1),
                 heartbeat_envelope(busy, 1), heartbeat_envelope(resent, 5), heartbeat_envelope(unknown, 1),
                 heartbeat_envelope(idle, 2)]  # the same station twice: only its first
    results = await rt.apply_idle_batch("station", "Heartbeat", envelopes)
    assert [r is not None for r in results] == [True, False, False, False, False, False, False]
    for station_id in (offline, parked, busy):
        assert await events_of(rt, station_id) == []
        assert await rt.outcome("station", f"evt:{station_id}:1") is None
    # Through the mailbox, as ever: the offline station comes back, the busy one goes offline
    # first and then comes back, in the order it said so.
    for envelope in (envelopes[1], envelopes[3]):
        await apply(rt, envelope.entity_id, "Heartbeat", envelope.payload, envelope.command_id)
    assert (await station_row(rt, offline)).status == "online"
    assert await status_changes(rt, busy) == [("online", "offline", "last_will"), ("offline", "online", "heartbeat")]


async def test_a_silent_station_heard_by_a_batched_heartbeat_stays_online(rt):
    """The offline detector judged by a last-seen time; a batched heartbeat that moved it since
    makes its MarkOffline a no-op, exactly as a heartbeat through the mailbox does."""
    station_id = await make_station(rt, "ST-HB-RACE")
    later = utcnow() + timedelta(seconds=91)
    assert await mark_silent_stations_offline(rt, now=later) == 1  # MarkOffline now pending
    # While it is pending the heartbeat is not taken by the batch (it must follow the command).
    assert await rt.apply_idle_batch("station", "Heartbeat", [heartbeat_envelope(station_id, 1, later)]) == [None]
    await rt.drain("station", station_id)
    assert (await station_row(rt, station_id)).status == "offline"
    # The other order: the detector reads, a batched heartbeat lands, then its MarkOffline.
    back = await make_station(rt, "ST-HB-RACE2")
    async with rt.sessions() as db:
        seen_before = (await db.get(Station, uuid.UUID(back))).last_seen_at
    [applied] = await rt.apply_idle_batch("station", "Heartbeat", [heartbeat_envelope(back, 1, later)])
    assert applied is not None
    result = await apply(rt, back, "MarkOffline", {"reason": "silent", "seen_before": seen_before.isoformat()})
    assert result == {"ok": True, "ignored": "seen_since"}
    assert (await station_row(rt, back)).status == "online"


async def test_a_heartbeat_of_a_station_another_drainer_holds_goes_to_the_mailbox(rt):
    """The batch only takes entities whose lock it gets (another process may be applying the
    station's commands right now)."""
    held = await make_station(rt, "ST-HB-HELD")
    free = await make_station(rt, "ST-HB-FREE")
    async with rt.sessions() as other:
        await other.begin()
        assert await rt.locks.try_lock(other, "station", held)
        try:
            results = await rt.apply_idle_batch("station", "Heartbeat", [heartbeat_envelope(held, 1), heartbeat_envelope(free, 1)])
        finally:
            await other.rollback()
            rt.locks.release("station", held)
    assert [r is not None for r in results] == [False, True]
    assert await events_of(rt, held) == [] and await events_of(rt, free) == [(1, "heartbeat")]

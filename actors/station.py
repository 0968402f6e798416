"""The Station actor: one per station (entity id = station id), the only writer of `stations`,
`station_slots`, `station_events` and of where a power bank is (`power_banks.station_id`,
`status`, `charge_percent`).

Commands come from two sides:
- the bridge turns every MQTT message of the station into one command (Boot, Inventory,
  Heartbeat, BankInserted, BankRemoved, Battery, SlotFault, EjectAck, MarkOffline); the payload
  is the decoded protocol message plus `received_at` (ISO, the bridge's clock);
- the Rental actor sends ReserveAndEject; the scheduler sends ExpireEject and MarkOffline.

Every station event first becomes a `station_events` row keyed by (station, seq), so a
re-sent event is a no-op. Station timestamps are put on the server clock with an offset
estimated as (receive time - station ts) on the latest boot or heartbeat: the estimate includes
the network delay (tens of ms), which is fine for billing minutes. Boot and heartbeat are never
re-sent by a station, so their receive time is fresh; a re-sent slot event is placed with the
current estimate, which is exactly right for a station whose clock drifts slowly.

The decisions (which slot to eject, what an inventory report means, what a failed eject leaves
behind) are pure functions over plain data at the top of this module; the handlers below them
load rows, call them and write the result.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Iterable

from sqlalchemy import bindparam, insert, select, tuple_, update

from powerbank.actors.rental import OPEN_STATUSES, open_rental_for_bank
from powerbank.actors.runtime import ActorContext, CommandRejected, Runtime, handles, handles_idle_batch
from powerbank.broker.protocol import (
    EJECT_JAMMED,
    EJECT_OK,
    EJECT_SLOT_EMPTY,
    Config,
    Eject,
    Topics,
    epoch_ms,
    from_epoch_ms,
    to_payload,
)
from powerbank.storage.models import PowerBank, Rental, Reservation, Station, StationEvent, StationSlot, StationStatusChange
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

KIND = "station"
MIN_EJECT_CHARGE_PERCENT = 20
MAX_EJECT_ATTEMPTS = 2
MISSED_HEARTBEATS_BEFORE_OFFLINE = 3
EJECT_TIMEOUT_REASON = "timeout"


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StationPolicy:
    """The settings the Station actor needs, read once per process."""

    eject_timeout_ms: int = 8000
    heartbeat_interval_s: int = 30
    min_eject_charge_percent: int = MIN_EJECT_CHARGE_PERCENT
    reservation_hold_s: int = 600
    currency: str = "NPR"
    topics: Topics = field(default_factory=lambda: Topics.from_env())


_policy: StationPolicy | None = None


def configure(settings=None, **overrides: Any) -> StationPolicy:
    """Set the policy from settings (and/or explicit overrides); returns it. Processes call this
    at start; without it the first command loads settings from the environment."""
    global _policy
    base = StationPolicy()
    if settings is not None:
        base = replace(
            base,
            eject_timeout_ms=settings.eject_timeout_ms,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            reservation_hold_s=getattr(settings, "reservation_hold_s", base.reservation_hold_s),
            currency=settings.currency,
        )
    _policy = replace(base, **overrides)
    return _policy


def policy() -> StationPolicy:
    if _policy is None:
        from powerbank.config import load_settings

        return configure(load_settings())
    return _policy


# --- pure decisions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotView:
    """What a decision needs to know about one slot and the bank in it."""

    number: int
    status: str
    bank_serial: str | None = None
    bank_status: str | None = None
    charge: int | None = None
    last_event_seq: int = 0  # the seq of the newest event (or inventory) that set this slot
    reserved_for: str | None = None  # the reservation its bank is held for


def is_ejectable(slot: SlotView, min_charge_percent: int = MIN_EJECT_CHARGE_PERCENT) -> bool:
    """A bank can be handed out: it sits in a working slot, nobody is ejecting it, and it is
    charged enough to be useful."""
    return (
        slot.status == "occupied"
        and slot.bank_status == "in_slot"
        and slot.charge is not None
        and slot.charge >= min_charge_percent
    )


def choose_eject_slot(
    slots: Iterable[SlotView],
    *,
    min_charge_percent: int = MIN_EJECT_CHARGE_PERCENT,
    exclude: Iterable[int] = (),
) -> SlotView | None:
    """The slot whose bank has the highest charge; ties go to the lowest slot number so the
    choice is deterministic. A bank held for a reservation is not for anyone else."""
    excluded = set(exclude)
    candidates = [
        s for s in slots if s.number not in excluded and s.reserved_for is None and is_ejectable(s, min_charge_percent)
    ]
    return max(candidates, key=lambda s: (s.charge, -s.number), default=None)


def availability(slots: Iterable[SlotView], min_charge_percent: int = MIN_EJECT_CHARGE_PERCENT) -> tuple[int, int]:
    """(banks ready to rent, empty slots ready for a return); a reserved bank is not on offer."""
    slots = list(slots)
    return (
        sum(1 for s in slots if s.reserved_for is None and is_ejectable(s, min_charge_percent)),
        sum(1 for s in slots if s.status == "empty"),
    )


SERVICE_EJECT_STATION_STATUSES = ("online", "maintenance")


def service_eject_refusal(slot: SlotView | None, station_status: str) -> str | None:
    """Why field staff may not eject this slot's bank now, or None. Only a bank sitting in the
    slot with nothing else claiming it: not one being ejected (for a rental or another service
    eject), not one held for a reservation. A jammed (`fault`) slot with a bank is allowed:
    freeing a stuck bank is what the service eject is for. The station must be able to hear
    the command (online, or parked for maintenance, where staff usually work)."""
    if station_status not in SERVICE_EJECT_STATION_STATUSES:
        return "station_offline"
    if slot is None:
        return "slot_not_found"
    if slot.status == "ejecting" or slot.bank_status == "ejecting":
        return "slot_ejecting"
    if slot.bank_serial is None:
        return "slot_empty"
    if slot.reserved_for is not None:
        return "slot_reserved"
    return None


def reservation_expired(expires_at: datetime | None, now: datetime) -> bool:
    return expires_at is not None and expires_at <= now


def slot_status_after_failed_eject(code: str) -> str:
    """Where a slot stands after an eject that did not release its bank."""
    if code == EJECT_JAMMED:
        return "fault"
    if code == EJECT_SLOT_EMPTY:
        return "empty"
    return "occupied"


def status_after_maintenance(last_seen_at: datetime | None, heartbeat_interval_s: int, now: datetime) -> str:
    """Back from maintenance, a station is online only if it was heard from within the time
    after which silence would count as offline anyway; otherwise it waits, offline, for its
    next message (which brings it online)."""
    allowed = timedelta(seconds=MISSED_HEARTBEATS_BEFORE_OFFLINE * heartbeat_interval_s)
    return "online" if last_seen_at is not None and now - last_seen_at <= allowed else "offline"


# The map's areas: a station announces its availability on its own channel and on its grid
# cell's, so a map subscribes to the few cells its viewport covers instead of to every station.
AREA_CELL_DEG = 0.05  # about 5.5 km north-south


def area_cell(latitude: float, longitude: float) -> str:
    return f"area:{math.floor(latitude / AREA_CELL_DEG)}:{math.floor(longitude / AREA_CELL_DEG)}"


def cells_covering(min_lat: float, max_lat: float, min_lng: float, max_lng: float) -> list[str]:
    """Every cell a bounding box touches."""
    rows = range(math.floor(min_lat / AREA_CELL_DEG), math.floor(max_lat / AREA_CELL_DEG) + 1)
    columns = range(math.floor(min_lng / AREA_CELL_DEG), math.floor(max_lng / AREA_CELL_DEG) + 1)
    return [f"area:{row}:{column}" for row in rows for column in columns]


def estimate_clock_offset_ms(received_at: datetime, station_ts_ms: int) -> int:
    return epoch_ms(received_at) - station_ts_ms


def corrected_station_time(station_ts_ms: int, clock_offset_ms: int | None) -> datetime:
    return from_epoch_ms(station_ts_ms + (clock_offset_ms or 0))


@dataclass(frozen=True)
class ReportedSlot:
    number: int
    bank_serial: str | None = None
    charge: int | None = None
    fault: str | None = None


@dataclass(frozen=True)
class SlotTarget:
    number: int
    status: str  # empty, occupied or fault
    bank_serial: str | None
    charge: int | None


@dataclass
class InventoryPlan:
    targets: list[SlotTarget]  # slots whose stored state must change (or that are new)
    charges: dict[str, int]  # every reported bank's charge
    missing_banks: list[str]  # banks stored here that the station no longer has
    surplus_slots: list[int]  # stored slots beyond the reported slot count
    discrepancies: list[dict[str, Any]]


def plan_inventory(
    stored: Iterable[SlotView], reported: Iterable[ReportedSlot], slot_count: int, *, as_of_seq: int | None = None
) -> InventoryPlan:
    """What a full inventory report means for the stored slots.

    The report is the truth about what is physically in the station, except for two kinds of
    slot it leaves alone: slots with an eject in flight (settled by the eject's ack or expiry,
    never by a snapshot that may have been taken a moment before the latch opened), and, when
    `as_of_seq` is given, slots a newer event already set (the report was overtaken on the way:
    applying it would move the slot back in time)."""
    stored_by_number = {s.number: s for s in stored}
    reported_by_number = {r.number: r for r in reported}
    ejecting = {n for n, s in stored_by_number.items() if s.status == "ejecting"}
    newer = {
        n for n, s in stored_by_number.items()
        if as_of_seq is not None and s.last_event_seq > as_of_seq and n not in ejecting
    }
    banks_set_since = {stored_by_number[n].bank_serial for n in newer if stored_by_number[n].bank_serial}
    targets: list[SlotTarget] = []
    discrepancies: list[dict[str, Any]] = []
    for number in range(1, slot_count + 1):
        seen = reported_by_number.get(number)
        known = stored_by_number.get(number)
        if number in ejecting:
            if seen is None or seen.bank_serial != known.bank_serial:
                discrepancies.append(
                    {"kind": "ejecting_slot_differs", "slot": number, "expected": known.bank_serial,
                     "reported": seen.bank_serial if seen else None}
                )
            continue
        if number in newer or (seen is not None and seen.bank_serial in banks_set_since):
            continue
        target = _target_for(number, seen)
        if known is None or (known.status, known.bank_serial) != (target.status, target.bank_serial):
            targets.append(target)
            if known is not None:
                discrepancies.append(
                    {"kind": "slot_corrected", "slot": number,
                     "was": {"status": known.status, "bank": known.bank_serial},
                     "now": {"status": target.status, "bank": target.bank_serial}}
                )
    reported_serials = {r.bank_serial for r in reported_by_number.values() if r.bank_serial}
    missing = sorted(
        s.bank_serial for s in stored_by_number.values()
        if s.bank_serial and s.number not in ejecting | newer and s.bank_serial not in reported_serials
    )
    discrepancies.extend({"kind": "bank_missing", "bank": serial} for serial in missing)
    surplus = sorted(n for n in stored_by_number if n > slot_count and n not in ejecting | newer)
    discrepancies.extend({"kind": "slot_removed", "slot": n} for n in surplus)
    charges = {
        r.bank_serial: r.charge
        for r in reported_by_number.values()
        if r.bank_serial and r.charge is not None and r.number not in newer
    }
    return InventoryPlan(targets, charges, missing, surplus, discrepancies)


def _target_for(number: int, seen: ReportedSlot | None) -> SlotTarget:
    if seen is None:
        return SlotTarget(number, "empty", None, None)
    if seen.fault:
        return SlotTarget(number, "fault", seen.bank_serial, seen.charge)
    if seen.bank_serial:
        return SlotTarget(number, "occupied", seen.bank_serial, seen.charge)
    return SlotTarget(number, "empty", None, None)


# --- loading a station ------------------------------------------------------------------------


@dataclass
class Loaded:
    """A station with its slots and the banks in them, as ORM rows in the open transaction."""

    station: Station
    slots: dict[int, StationSlot]
    banks: dict[uuid.UUID, PowerBank]

    def bank_in(self, slot: StationSlot) -> PowerBank | None:
        return self.banks.get(slot.power_bank_id) if slot.power_bank_id else None

    def view(self, slot: StationSlot) -> SlotView:
        bank = self.bank_in(slot)
        return SlotView(
            number=slot.slot_number,
            status=slot.status,
            bank_serial=bank.serial if bank else None,
            bank_status=bank.status if bank else None,
            charge=bank.charge_percent if bank else None,
            last_event_seq=slot.last_event_seq or 0,
            reserved_for=str(slot.reserved_for_id) if slot.reserved_for_id else None,
        )

    def views(self) -> list[SlotView]:
        return [self.view(slot) for slot in sorted(self.slots.values(), key=lambda s: s.slot_number)]

    def slot_ejecting(self, eject_command_id: str) -> StationSlot | None:
        for slot in self.slots.values():
            if slot.status == "ejecting" and slot.eject_command_id == eject_command_id:
                return slot
        return None


async def _load(ctx: ActorContext, station_id: str) -> Loaded | None:
    station = await ctx.session.get(Station, uuid.UUID(station_id))
    if station is None:
        return None
    slots = list(
        (await ctx.session.execute(select(StationSlot).where(StationSlot.station_id == station.id))).scalars()
    )
    bank_ids = [s.power_bank_id for s in slots if s.power_bank_id]
    banks = {}
    if bank_ids:
        rows = await ctx.session.execute(select(PowerBank).where(PowerBank.id.in_(bank_ids)))
        banks = {bank.id: bank for bank in rows.scalars()}
    return Loaded(station, {s.slot_number: s for s in slots}, banks)


async def _load_or_reject(ctx: ActorContext, station_id: str) -> Loaded:
    loaded = await _load(ctx, station_id)
    if loaded is None:
        raise CommandRejected("unknown_station", station_id=station_id)
    return loaded


def _notify(ctx: ActorContext, loaded: Loaded) -> None:
    """Tell the maps: on the station's channel and on its area's (http/station_stream.py)."""
    available, empty = availability(loaded.views(), policy().min_eject_charge_percent)
    station = loaded.station
    update = {
        "type": "station.updated",
        "station_id": str(station.id),
        "serial": station.serial,
        "status": station.status,
        "available": available,
        "empty_slots": empty,
        "latitude": station.latitude,
        "longitude": station.longitude,
    }
    ctx.notify(f"station:{station.id}", update)
    ctx.notify(area_cell(station.latitude, station.longitude), update)


# --- recording events -------------------------------------------------------------------------


@dataclass
class Event:
    """A station event being applied: its seq and its times on the server clock."""

    seq: int
    station_time: datetime
    received_at: datetime
    fresh: bool  # False when (station, seq) was recorded before


def _received_at(ctx: ActorContext, payload: dict[str, Any]) -> datetime:
    raw = payload.get("received_at")
    return datetime.fromisoformat(raw) if raw else ctx.now


async def _record_event(
    ctx: ActorContext,
    loaded: Loaded,
    kind: str,
    payload: dict[str, Any],
    *,
    sets_clock: bool = False,
    apply_when_seen: bool = False,
) -> Event:
    """Store the event once per (station, seq) and note that the station is alive. A seq seen
    before changes nothing (`fresh` is False), unless `apply_when_seen` (boot: see there)."""
    station = loaded.station
    seq, ts = int(payload["seq"]), int(payload["ts"])
    received_at = _received_at(ctx, payload)
    seen = (
        await ctx.session.execute(
            select(StationEvent.id).where(StationEvent.station_id == station.id, StationEvent.seq == seq)
        )
    ).first() is not None
    if seen and not apply_when_seen:
        return Event(seq, corrected_station_time(ts, station.clock_offset_ms), received_at, fresh=False)
    if sets_clock:
        station.clock_offset_ms = estimate_clock_offset_ms(received_at, ts)
    station_time = corrected_station_time(ts, station.clock_offset_ms)
    if not seen:
        ctx.session.add(
            StationEvent(
                station_id=station.id, seq=seq, kind=kind, payload=payload,
                station_time=station_time, received_at=received_at,
            )
        )
        station.last_event_seq = max(station.last_event_seq or 0, seq)
    _mark_seen(ctx, station, kind, received_at)
    return Event(seq, station_time, received_at, fresh=not seen)


def _mark_seen(ctx: ActorContext, station: Station, kind: str, received_at: datetime) -> None:
    """Any message proves the station is alive: online again unless an operator parked it."""
    if station.last_seen_at is None or received_at > station.last_seen_at:
        station.last_seen_at = received_at
    if station.status == "offline":
        _set_status(ctx, station, "online", kind, received_at)


def _set_status(ctx: ActorContext, station: Station, status: str, reason: str, at: datetime) -> None:
    """Change the status and keep the change in the station's history, in the same transaction."""
    ctx.session.add(
        StationStatusChange(
            station_id=station.id, from_status=station.status, to_status=status, reason=reason, changed_at=at,
        )
    )
    station.status = status


def _duplicate(event: Event) -> dict[str, Any]:
    return {"ok": True, "duplicate": True, "seq": event.seq}


def _is_stale(slot: StationSlot, event: Event) -> bool:
    """An event older than the newest one that set this slot arrived late; it is recorded, but
    the slot already reflects a later truth."""
    return event.seq < (slot.last_event_seq or 0)


def _log_discrepancies(station: Station, discrepancies: list[dict[str, Any]]) -> None:
    for item in discrepancies:
        log.warning("station %s discrepancy: %s", station.serial, item)


# --- placing and removing banks ---------------------------------------------------------------


async def _bank_by_serial(ctx: ActorContext, serial: str) -> PowerBank | None:
    return (await ctx.session.execute(select(PowerBank).where(PowerBank.serial == serial))).scalar_one_or_none()


async def _release_from_other_slot(
    ctx: ActorContext, loaded: Loaded, bank: PowerBank, slot: StationSlot
) -> dict[str, Any] | None:
    """Free the bank from whatever slot the database still has it in, because it is physically
    here now. Returns a discrepancy, or one with kind `bank_claimed_by_eject` when it cannot be
    freed (another station is ejecting it right now).

    A slot of *another* station is the one place this actor writes outside its own rows: a
    guarded single UPDATE that only empties a slot still holding this bank and not ejecting it.
    Physics justifies it (a bank cannot be in two slots), and the guard makes it safe against
    that station's actor running at the same moment."""
    for other in loaded.slots.values():
        if other is not slot and other.power_bank_id == bank.id:
            if other.status == "ejecting":
                return {"kind": "bank_claimed_by_eject", "bank": bank.serial, "slot": other.slot_number}
            other.power_bank_id, other.status = None, "empty"
            await ctx.session.flush()
            return {"kind": "bank_moved_within_station", "bank": bank.serial, "from_slot": other.slot_number}
    row = (
        await ctx.session.execute(
            select(StationSlot.id, StationSlot.station_id, StationSlot.status).where(
                StationSlot.power_bank_id == bank.id, StationSlot.station_id != loaded.station.id
            )
        )
    ).first()
    if row is None:
        return None
    if row.status == "ejecting":
        return {"kind": "bank_claimed_by_eject", "bank": bank.serial, "station_id": str(row.station_id)}
    await ctx.session.execute(
        update(StationSlot)
        .where(StationSlot.id == row.id, StationSlot.power_bank_id == bank.id, StationSlot.status != "ejecting")
        .values(power_bank_id=None, status="empty", updated_at=ctx.now)
        .execution_options(synchronize_session=False)
    )
    return {"kind": "bank_seen_elsewhere", "bank": bank.serial, "was_at_station": str(row.station_id)}


async def _place_bank(
    ctx: ActorContext,
    loaded: Loaded,
    slot: StationSlot,
    serial: str,
    charge: int | None,
    *,
    slot_status: str = "occupied",
    bank: PowerBank | None = None,
) -> tuple[PowerBank | None, list[dict[str, Any]]]:
    """Put the bank with `serial` into `slot` (creating the bank if it was never seen)."""
    discrepancies: list[dict[str, Any]] = []
    bank = bank or await _bank_by_serial(ctx, serial)
    if bank is None:
        bank = PowerBank(
            serial=serial, status="in_slot", charge_percent=charge if charge is not None else 0,
            currency=policy().currency, station_id=loaded.station.id,
        )
        ctx.session.add(bank)
        await ctx.session.flush()
        discrepancies.append({"kind": "bank_created", "bank": serial})
    else:
        moved = await _release_from_other_slot(ctx, loaded, bank, slot)
        if moved is not None:
            discrepancies.append(moved)
            if moved["kind"] == "bank_claimed_by_eject":
                slot.power_bank_id, slot.status = None, "fault"
                return None, discrepancies
    if slot.power_bank_id not in (None, bank.id):
        discrepancies.extend(await _detach_bank(ctx, loaded, slot, "replaced_in_slot"))
    loaded.banks[bank.id] = bank
    bank.station_id = loaded.station.id
    if bank.status != "faulty":
        bank.status = "in_slot"
    if charge is not None:
        bank.charge_percent = charge
    slot.power_bank_id, slot.status = bank.id, slot_status
    slot.ejecting_rental_id = slot.eject_command_id = slot.eject_deadline_at = slot.eject_attempt = None
    return bank, discrepancies


async def _detach_bank(ctx: ActorContext, loaded: Loaded, slot: StationSlot, why: str) -> list[dict[str, Any]]:
    """The bank in `slot` left without a rental: nobody knows where it is, so it counts as lost
    until some station sees it again."""
    bank = loaded.bank_in(slot)
    slot.power_bank_id, slot.status = None, "empty"
    await ctx.session.flush()
    if bank is None:
        return []
    bank.station_id, bank.status = None, "lost"
    return [{"kind": why, "bank": bank.serial, "slot": slot.slot_number}]


async def _slot(ctx: ActorContext, loaded: Loaded, number: int) -> StationSlot:
    slot = loaded.slots.get(number)
    if slot is None:
        slot = StationSlot(station_id=loaded.station.id, slot_number=number, status="empty", last_event_seq=0)
        ctx.session.add(slot)
        loaded.slots[number] = slot
        await ctx.session.flush()
    return slot


async def _send_returned_if_rented(ctx: ActorContext, loaded: Loaded, bank: PowerBank, event: Event) -> str | None:
    """A bank out on a rental is back in a slot: tell its rental (once, by command id).

    The bank's own record of its rental comes first: the Rental actor may not have applied
    BankEjected yet, and its mailbox order guarantees it will before this BankReturned."""
    rental_id = bank.rental_id
    if rental_id is None:
        rental = await open_rental_for_bank(ctx.session, bank.id)
        if rental is None:
            return None
        rental_id = rental.id
    bank.rental_id = None
    await _send_returned(ctx, loaded, bank, str(rental_id), event)
    return str(rental_id)


async def _send_returned(ctx: ActorContext, loaded: Loaded, bank: PowerBank, rental_id: str, event: Event) -> None:
    await ctx.send(
        "rental",
        rental_id,
        "BankReturned",
        {
            "station_id": str(loaded.station.id),
            "power_bank_id": str(bank.id),
            "returned_at": event.station_time.isoformat(),
            "received_at": event.received_at.isoformat(),
        },
        command_id=f"returned:{rental_id}",
    )


# --- inventory --------------------------------------------------------------------------------


def _reported(payload: dict[str, Any]) -> list[ReportedSlot]:
    return [
        ReportedSlot(s["slot"], s.get("bank"), s.get("charge"), s.get("fault")) for s in payload.get("slots", [])
    ]


async def _apply_inventory(
    ctx: ActorContext, loaded: Loaded, payload: dict[str, Any], event: Event, *, as_of_seq: int | None
) -> dict[str, Any]:
    """Reconcile the stored slots with a full report; `as_of_seq` (see plan_inventory) leaves
    alone the slots that newer events have set since."""
    station = loaded.station
    slot_count = int(payload["slot_count"])
    station.slot_count = slot_count
    plan = plan_inventory(loaded.views(), _reported(payload), slot_count, as_of_seq=as_of_seq)
    discrepancies = list(plan.discrepancies)
    for serial in plan.missing_banks:
        slot = next(s for s in loaded.slots.values() if (b := loaded.bank_in(s)) and b.serial == serial)
        await _detach_bank(ctx, loaded, slot, "bank_missing_detached")
    # Free every slot that changes first: the unique bank-per-slot index must never see a bank
    # in two slots, even between two statements of this transaction.
    for target in plan.targets:
        if target.number in loaded.slots:
            loaded.slots[target.number].power_bank_id = None
            loaded.slots[target.number].status = "empty"
    for number in plan.surplus_slots:
        await ctx.session.delete(loaded.slots.pop(number))
    await ctx.session.flush()
    known = await _banks_by_serial(ctx, [t.bank_serial for t in plan.targets if t.bank_serial])
    for target in plan.targets:
        slot = await _slot(ctx, loaded, target.number)
        slot.last_event_seq = max(slot.last_event_seq or 0, event.seq)
        if target.bank_serial:
            _, found = await _place_bank(
                ctx, loaded, slot, target.bank_serial, target.charge,
                slot_status=target.status, bank=known.get(target.bank_serial),
            )
            discrepancies.extend(found)
            await ctx.session.flush()
        else:
            slot.status = target.status
    for slot in loaded.slots.values():
        slot.last_event_seq = max(slot.last_event_seq or 0, event.seq)
        bank = loaded.bank_in(slot)
        if bank is not None and bank.serial in plan.charges:
            bank.charge_percent = plan.charges[bank.serial]
    returned = await _return_rentals_of_banks_in_slots(ctx, loaded, event)
    discrepancies.extend(
        {"kind": "rental_closed_by_inventory", "bank": serial, "rental_id": rental_id}
        for serial, rental_id in returned
    )
    _log_discrepancies(station, discrepancies)
    return {"ok": True, "seq": event.seq, "discrepancies": discrepancies, "returned_rentals": [r for _, r in returned]}


async def _return_rentals_of_banks_in_slots(
    ctx: ActorContext, loaded: Loaded, event: Event
) -> list[tuple[str, str]]:
    """Reconcile: every bank seen in a slot whose rental is still open closes that rental."""
    in_slots = {
        bank.id: bank
        for slot in loaded.slots.values()
        if slot.status != "ejecting" and (bank := loaded.bank_in(slot)) is not None
    }
    if not in_slots:
        return []
    rows = await ctx.session.execute(
        select(Rental.id, Rental.power_bank_id).where(
            Rental.power_bank_id.in_(list(in_slots)), Rental.status.in_(OPEN_STATUSES)
        )
    )
    rentals_by_bank = {bank_id: rental_id for rental_id, bank_id in rows.all()}
    for bank_id, bank in in_slots.items():
        if bank.rental_id is not None:
            rentals_by_bank[bank_id] = bank.rental_id
    returned = []
    for bank_id, rental_id in rentals_by_bank.items():
        in_slots[bank_id].rental_id = None
        await _send_returned(ctx, loaded, in_slots[bank_id], str(rental_id), event)
        returned.append((in_slots[bank_id].serial, str(rental_id)))
    return returned


async def _banks_by_serial(ctx: ActorContext, serials: list[str]) -> dict[str, PowerBank]:
    if not serials:
        return {}
    rows = await ctx.session.execute(select(PowerBank).where(PowerBank.serial.in_(serials)))
    return {bank.serial: bank for bank in rows.scalars()}


# --- handlers: station -> backend -------------------------------------------------------------


@handles(KIND, "Boot")
async def boot(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A station powered up: record who it is, take its inventory as the truth, answer with
    config. Applied even when its seq was seen before (a station that lost its counter), so
    the config reply can tell it where to continue."""
    loaded = await _load_or_reject(ctx, station_id)
    station = loaded.station
    event = await _record_event(ctx, loaded, "boot", payload, sets_clock=True, apply_when_seen=True)
    station.firmware_version = payload.get("firmware")
    station.hardware_version = payload.get("hardware")
    station.heartbeat_interval_s = policy().heartbeat_interval_s
    station.last_heartbeat_at = event.received_at
    # A boot whose seq was used before comes from a controller that lost its counter: its seqs
    # say nothing about order, and its report is the truth. Otherwise it is ordered like any
    # inventory (a boot that was overtaken on the way must not undo newer slot events).
    result = await _apply_inventory(ctx, loaded, payload, event, as_of_seq=event.seq if event.fresh else None)
    await ctx.publish_mqtt(
        policy().topics.commands(station.serial),
        to_payload(
            Config(
                heartbeat_interval_s=station.heartbeat_interval_s,
                server_time=epoch_ms(ctx.now),
                eject_timeout_ms=policy().eject_timeout_ms,
                last_seq=station.last_event_seq or 0,
            )
        ),
    )
    _notify(ctx, loaded)
    return result


@handles(KIND, "Inventory")
async def inventory(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    loaded = await _load_or_reject(ctx, station_id)
    event = await _record_event(ctx, loaded, "inventory", payload)
    if not event.fresh:
        return _duplicate(event)
    result = await _apply_inventory(ctx, loaded, payload, event, as_of_seq=event.seq)
    resent = await _resend_ejects_in_flight(ctx, loaded)
    _notify(ctx, loaded)
    return {**result, "ejects_resent": resent} if resent else result


async def _resend_ejects_in_flight(ctx: ActorContext, loaded: Loaded) -> list[str]:
    """A station reports an inventory after every reconnect. An eject published while it was
    away went nowhere (stations connect with a clean session), so every eject still in flight
    and not past its deadline is published again, same command id and expiry: a station that
    did get it answers the repeat with the same code and moves nothing.

    Not after a boot: a controller that restarted re-sends its buffered acks before booting,
    and its inventory says what it holds now; the deadline settles anything left."""
    resent = []
    for slot in sorted(loaded.slots.values(), key=lambda s: s.slot_number):
        bank = loaded.bank_in(slot)
        if slot.status != "ejecting" or bank is None or slot.eject_deadline_at is None:
            continue
        if slot.eject_deadline_at <= ctx.now:
            continue
        await _publish_eject(ctx, loaded, slot, bank, slot.eject_command_id, slot.eject_deadline_at)
        resent.append(slot.eject_command_id)
    return resent


@handles(KIND, "Heartbeat")
async def heartbeat(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Only the station row: its slots and banks are read only when the heartbeat brings it
    back online (the update announced then carries the availability). At 10,000 stations with
    30 s heartbeats they are most of the commands; reading eight slots and their banks for each
    was most of their cost (`powerbank bench stations`, py-spy)."""
    station = await ctx.session.get(Station, uuid.UUID(station_id))
    if station is None:
        raise CommandRejected("unknown_station", station_id=station_id)
    was = station.status
    event = await _record_event(ctx, Loaded(station, {}, {}), "heartbeat", payload, sets_clock=True)
    if not event.fresh:
        return _duplicate(event)
    station.last_heartbeat_at = event.received_at
    if station.status != was:
        _notify(ctx, await _load_or_reject(ctx, station_id))
    return {"ok": True, "seq": event.seq, "clock_offset_ms": station.clock_offset_ms}


_HEARTBEAT_UPDATE = (
    update(Station.__table__)
    .where(Station.__table__.c.id == bindparam("station_id"))
    .values(
        last_seen_at=bindparam("seen_at"),
        last_heartbeat_at=bindparam("heartbeat_at"),
        clock_offset_ms=bindparam("offset_ms"),
        last_event_seq=bindparam("event_seq"),
    )
)


@handles_idle_batch(KIND, "Heartbeat")
async def heartbeats_of_online_stations(
    ctx: ActorContext, commands: list[tuple[str, dict[str, Any]]]
) -> list[dict[str, Any] | None]:
    """The heartbeats of many idle stations at once (the bridge collects them): exactly what
    `heartbeat` does for a station that is online and hears a fresh seq (record the event, set
    the clock offset, last seen, last heartbeat, last seq), in three statements for the batch.
    Every other heartbeat is declined and goes through the mailbox to `heartbeat`: a station
    offline, parked or unknown (its status changes, with history and a map update), or a seq
    seen before. At 10,000 stations heartbeats are 333 commands a second, and one at a time
    they were more than SQLite's single writer applies (`powerbank bench stations`)."""
    ids = [uuid.UUID(station_id) for station_id, _ in commands]
    stations = {
        row.id: row
        for row in (await ctx.session.execute(
            select(Station.id, Station.status, Station.last_seen_at, Station.last_event_seq).where(Station.id.in_(ids))
        )).all()
    }
    wanted = [(station_id, int(payload["seq"])) for station_id, (_, payload) in zip(ids, commands)]
    seen = set((await ctx.session.execute(
        select(StationEvent.station_id, StationEvent.seq).where(tuple_(StationEvent.station_id, StationEvent.seq).in_(wanted))
    )).all())
    results: list[dict[str, Any] | None] = []
    events, updates = [], []
    for station_id, (_, payload) in zip(ids, commands):
        row = stations.get(station_id)
        seq, ts = int(payload["seq"]), int(payload["ts"])
        if row is None or row.status != "online" or (station_id, seq) in seen:
            results.append(None)
            continue
        received_at = _received_at(ctx, payload)
        offset_ms = estimate_clock_offset_ms(received_at, ts)
        events.append(dict(
            station_id=station_id, seq=seq, kind="heartbeat", payload=payload,
            station_time=corrected_station_time(ts, offset_ms), received_at=received_at,
        ))
        last_seen = row.last_seen_at if row.last_seen_at is not None and row.last_seen_at >= received_at else received_at
        updates.append(dict(
            station_id=station_id, seen_at=last_seen, heartbeat_at=received_at, offset_ms=offset_ms,
            event_seq=max(row.last_event_seq or 0, seq),
        ))
        results.append({"ok": True, "seq": seq, "clock_offset_ms": offset_ms})
    if events:
        await ctx.session.execute(insert(StationEvent.__table__), events)
        await ctx.session.execute(_HEARTBEAT_UPDATE, updates)
    return results


@handles(KIND, "BankInserted")
async def bank_inserted(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A bank went into a slot: a return when it is out on a rental, a restock otherwise."""
    loaded = await _load_or_reject(ctx, station_id)
    event = await _record_event(ctx, loaded, "bank_inserted", payload)
    if not event.fresh:
        return _duplicate(event)
    slot = await _slot(ctx, loaded, int(payload["slot"]))
    if _is_stale(slot, event):
        return {"ok": True, "seq": event.seq, "stale": True}
    slot.last_event_seq = event.seq
    if slot.status == "ejecting":
        ejecting = loaded.bank_in(slot)
        if ejecting is None or ejecting.serial == payload["bank"]:
            discrepancy = {"kind": "insert_into_ejecting_slot", "slot": slot.slot_number, "bank": payload["bank"]}
            _log_discrepancies(loaded.station, [discrepancy])
            return {"ok": True, "seq": event.seq, "discrepancies": [discrepancy]}
        # Another bank went in, so the slot was emptied: the eject happened and its ack is late
        # (dropped and re-sent, or overtaken). Apply it now as the ack would; the ack itself is
        # then stale. Waiting for it instead would leave the bank going in nowhere.
        await _bank_ejected(ctx, loaded, slot, event)
    bank, discrepancies = await _place_bank(ctx, loaded, slot, payload["bank"], int(payload["charge"]))
    rental_id = await _send_returned_if_rented(ctx, loaded, bank, event) if bank else None
    _log_discrepancies(loaded.station, discrepancies)
    _notify(ctx, loaded)
    return {"ok": True, "seq": event.seq, "returned_rental_id": rental_id, "discrepancies": discrepancies}


@handles(KIND, "BankRemoved")
async def bank_removed(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A bank left a slot without an eject (forced, or taken by an operator). During an eject
    the ack decides, not this: the station sends both, and only the ack names the command."""
    loaded = await _load_or_reject(ctx, station_id)
    event = await _record_event(ctx, loaded, "bank_removed", payload)
    if not event.fresh:
        return _duplicate(event)
    slot = await _slot(ctx, loaded, int(payload["slot"]))
    if _is_stale(slot, event) or slot.status == "ejecting":
        return {"ok": True, "seq": event.seq, "stale": _is_stale(slot, event)}
    slot.last_event_seq = event.seq
    discrepancies = await _detach_bank(ctx, loaded, slot, "unsolicited_removal")
    slot.status = "empty"
    _log_discrepancies(loaded.station, discrepancies)
    _notify(ctx, loaded)
    return {"ok": True, "seq": event.seq, "discrepancies": discrepancies}


@handles(KIND, "Battery")
async def battery(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    loaded = await _load_or_reject(ctx, station_id)
    event = await _record_event(ctx, loaded, "battery", payload)
    if not event.fresh:
        return _duplicate(event)
    slot = loaded.slots.get(int(payload["slot"]))
    bank = loaded.bank_in(slot) if slot else None
    if slot is None or bank is None or bank.serial != payload["bank"] or _is_stale(slot, event):
        return {"ok": True, "seq": event.seq, "ignored": True}
    before = loaded.view(slot)
    bank.charge_percent = int(payload["charge"])
    if is_ejectable(before) != is_ejectable(loaded.view(slot)):
        _notify(ctx, loaded)
    return {"ok": True, "seq": event.seq}


@handles(KIND, "SlotFault")
async def slot_fault(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A broken slot keeps its bank (if any) but is never chosen for an eject; the next
    inventory without the fault puts it back in service."""
    loaded = await _load_or_reject(ctx, station_id)
    event = await _record_event(ctx, loaded, "slot_fault", payload)
    if not event.fresh:
        return _duplicate(event)
    slot = await _slot(ctx, loaded, int(payload["slot"]))
    if _is_stale(slot, event) or slot.status == "ejecting":
        return {"ok": True, "seq": event.seq, "ignored": True}
    slot.last_event_seq = event.seq
    slot.status = "fault"
    _notify(ctx, loaded)
    return {"ok": True, "seq": event.seq, "code": payload["code"]}


@handles(KIND, "EjectAck")
async def eject_ack(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    loaded = await _load_or_reject(ctx, station_id)
    event = await _record_event(ctx, loaded, "eject_ack", payload)
    if not event.fresh:
        return _duplicate(event)
    slot = loaded.slot_ejecting(payload["command_id"])
    if slot is None:
        return await _late_eject_ack(ctx, loaded, payload, event)
    slot.last_event_seq = max(slot.last_event_seq or 0, event.seq)
    if payload["code"] == EJECT_OK:
        result = await _bank_ejected(ctx, loaded, slot, event)
    else:
        result = await _eject_failed(ctx, loaded, slot, payload["code"])
    _notify(ctx, loaded)
    return {"seq": event.seq, **result}


async def _late_eject_ack(
    ctx: ActorContext, loaded: Loaded, payload: dict[str, Any], event: Event
) -> dict[str, Any]:
    """An ack for a command no longer in flight (it expired, and its rental was failed).

    If the station says the bank did leave, believe the hardware: the bank is out of the slot,
    with no rental, so it counts as lost and the discrepancy is logged. The rental is not
    revived: it was cancelled and its hold voided, and nobody should pay for a bank the app
    told them they did not get. (Stations refuse expired commands, so this takes an ack that
    was sent in time and delivered late.)"""
    if payload["code"] != EJECT_OK:
        return {"ok": True, "seq": event.seq, "stale_ack": True}
    slot = loaded.slots.get(int(payload["slot"]))
    bank = loaded.bank_in(slot) if slot else None
    if slot is None or bank is None or slot.status == "ejecting" or (payload.get("bank") not in (None, bank.serial)):
        return {"ok": True, "seq": event.seq, "stale_ack": True}
    discrepancies = await _detach_bank(ctx, loaded, slot, "ejected_after_expiry")
    slot.last_event_seq = max(slot.last_event_seq or 0, event.seq)
    _log_discrepancies(loaded.station, discrepancies)
    _notify(ctx, loaded)
    return {"ok": True, "seq": event.seq, "stale_ack": True, "discrepancies": discrepancies}


@handles(KIND, "MarkOffline")
async def mark_offline(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """From the last will (`reason` = last_will) or the scheduler (`reason` = silent, with the
    `seen_before` time it judged by: a station heard from since then stays online)."""
    loaded = await _load_or_reject(ctx, station_id)
    station = loaded.station
    seen_before = payload.get("seen_before")
    if seen_before and station.last_seen_at and station.last_seen_at > datetime.fromisoformat(seen_before):
        return {"ok": True, "ignored": "seen_since"}
    if station.status != "online":
        return {"ok": True, "ignored": station.status}
    _set_status(ctx, station, "offline", str(payload.get("reason") or "unknown")[:32], _received_at(ctx, payload))
    _notify(ctx, loaded)
    return {"ok": True, "status": "offline", "reason": payload.get("reason")}


@handles(KIND, "SetMaintenance")
async def set_maintenance(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """An operator parks a kiosk (repair, cleaning, relocation) or brings it back. Parked, it
    rents nothing (ReserveAndEject wants it online) and its messages keep it parked; slot
    events are still recorded, so returns into it still close rentals."""
    loaded = await _load_or_reject(ctx, station_id)
    station = loaded.station
    reason = str(payload.get("reason") or "operator")[:32]
    if payload["maintenance"] and station.status != "maintenance":
        _set_status(ctx, station, "maintenance", reason, ctx.now)
    elif not payload["maintenance"] and station.status == "maintenance":
        back = status_after_maintenance(station.last_seen_at, station.heartbeat_interval_s or policy().heartbeat_interval_s, ctx.now)
        _set_status(ctx, station, back, reason, ctx.now)
    else:
        return {"ok": True, "status": station.status, "unchanged": True}
    _notify(ctx, loaded)
    return {"ok": True, "status": station.status}


# --- handlers: ejecting -----------------------------------------------------------------------


@handles(KIND, "ReserveAndEject")
async def reserve_and_eject(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Hand the best-charged bank to a rental. Never refuses by exception: the rental always
    hears back (BankEjected or EjectFailed), so a refusal is a follow-up command, not a rollback."""
    rental_id = payload["rental_id"]
    loaded = await _load(ctx, station_id)
    if loaded is None or loaded.station.status != "online":
        return await _fail_rental(ctx, rental_id, "station_offline")
    for slot in loaded.slots.values():
        if slot.status == "ejecting" and str(slot.ejecting_rental_id) == rental_id:
            return {"ok": True, "already_ejecting": slot.slot_number}
    await _release_expired_reservations(ctx, loaded)
    slot = await _claim_reservation(ctx, loaded, payload, rental_id)
    if slot is None:
        choice = choose_eject_slot(loaded.views(), min_charge_percent=policy().min_eject_charge_percent)
        if choice is None:
            return await _fail_rental(ctx, rental_id, "no_bank_available")
        slot = loaded.slots[choice.number]
    result = await _start_eject(ctx, loaded, slot, uuid.UUID(rental_id), attempt=1)
    _notify(ctx, loaded)
    return result


# --- handlers: reservations -------------------------------------------------------------------


@handles(KIND, "ReserveSlot")
async def reserve_slot(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Hold the best bank here for a pending reservation until `hold_s` from now (confirmed), or
    cancel the reservation when there is nothing to hold. Never refuses by exception: the
    reservation row always ends in a definite state."""
    reservation = await ctx.session.get(Reservation, uuid.UUID(payload["reservation_id"]))
    if reservation is None or reservation.status != "pending":
        return {"ok": reservation is not None and reservation.status == "confirmed", "status": reservation.status if reservation else None}
    loaded = await _load(ctx, station_id)
    if loaded is None or loaded.station.status != "online":
        return _close_reservation(reservation, "cancelled", "station_offline")
    await _release_expired_reservations(ctx, loaded)
    choice = choose_eject_slot(loaded.views(), min_charge_percent=policy().min_eject_charge_percent)
    if choice is None:
        return _close_reservation(reservation, "cancelled", "no_bank_available")
    slot = loaded.slots[choice.number]
    until = ctx.now + timedelta(seconds=payload.get("hold_s") or policy().reservation_hold_s)
    slot.reserved_for_id, slot.reserved_until = reservation.id, until
    reservation.status, reservation.slot_number, reservation.expires_at = "confirmed", slot.slot_number, until
    reservation.power_bank_id = slot.power_bank_id
    _notify(ctx, loaded)
    return {"ok": True, "status": "confirmed", "slot": slot.slot_number, "expires_at": until.isoformat()}


@handles(KIND, "CancelReservation")
async def cancel_reservation(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    reservation = await ctx.session.get(Reservation, uuid.UUID(payload["reservation_id"]))
    if reservation is None or str(reservation.user_id) != payload.get("user_id"):
        raise CommandRejected("reservation_not_found")
    if reservation.status not in ("pending", "confirmed"):
        return {"ok": True, "status": reservation.status, "unchanged": True}
    loaded = await _load_or_reject(ctx, station_id)
    _release_slot_of(loaded, reservation.id)
    _notify(ctx, loaded)
    return _close_reservation(reservation, "cancelled", "cancelled_by_user")


@handles(KIND, "ExpireReservation")
async def expire_reservation(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The scheduler saw a hold past its time; acts only if it is still held and past it by the
    scheduler's clock (`as_of`)."""
    reservation = await ctx.session.get(Reservation, uuid.UUID(payload["reservation_id"]))
    as_of = datetime.fromisoformat(payload["as_of"]) if payload.get("as_of") else ctx.now
    if reservation is None or reservation.status != "confirmed" or not reservation_expired(reservation.expires_at, as_of):
        return {"ok": True, "ignored": True}
    loaded = await _load_or_reject(ctx, station_id)
    _release_slot_of(loaded, reservation.id)
    _notify(ctx, loaded)
    return _close_reservation(reservation, "expired", "expired")


def _close_reservation(reservation: Reservation, status: str, reason: str) -> dict[str, Any]:
    reservation.status, reservation.cancel_reason = status, reason if status != "completed" else None
    return {"ok": status == "completed", "status": status, "reason": reason}


def _release_slot_of(loaded: Loaded, reservation_id: uuid.UUID) -> None:
    for slot in loaded.slots.values():
        if slot.reserved_for_id == reservation_id:
            slot.reserved_for_id = slot.reserved_until = None


async def _release_expired_reservations(ctx: ActorContext, loaded: Loaded) -> None:
    """Holds past their time free their banks here and now; the scheduler's sweep only does the
    same for stations nobody asks anything of."""
    for slot in loaded.slots.values():
        if slot.reserved_for_id is not None and reservation_expired(slot.reserved_until, ctx.now):
            reservation = await ctx.session.get(Reservation, slot.reserved_for_id)
            slot.reserved_for_id = slot.reserved_until = None
            if reservation is not None and reservation.status == "confirmed":
                _close_reservation(reservation, "expired", "expired")


async def _claim_reservation(ctx: ActorContext, loaded: Loaded, payload: dict[str, Any], rental_id: str) -> StationSlot | None:
    """The slot held for this rental's reservation (the same person's, at this station), if it is
    still held and its bank can go: the reservation is then completed by this rental. None:
    choose as for any rental."""
    if not payload.get("reservation_id"):
        return None
    reservation = await ctx.session.get(Reservation, uuid.UUID(payload["reservation_id"]))
    if reservation is None or reservation.status != "confirmed" or str(reservation.user_id) != payload.get("user_id"):
        return None
    slot = next((s for s in loaded.slots.values() if s.reserved_for_id == reservation.id), None)
    if slot is not None:
        slot.reserved_for_id = slot.reserved_until = None
    reservation.status, reservation.rental_id = "completed", uuid.UUID(rental_id)
    if slot is None or not is_ejectable(loaded.view(slot), policy().min_eject_charge_percent):
        return None
    return slot


@handles(KIND, "ExpireEject")
async def expire_eject(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The scheduler saw an eject past its deadline. Only acts if that very command is still
    in flight and past its deadline as of the scheduler's clock (`as_of`)."""
    loaded = await _load_or_reject(ctx, station_id)
    slot = loaded.slot_ejecting(payload["eject_command_id"])
    as_of = datetime.fromisoformat(payload["as_of"]) if payload.get("as_of") else ctx.now
    if slot is None or slot.eject_deadline_at is None or slot.eject_deadline_at > as_of:
        return {"ok": True, "ignored": True}
    result = await _eject_failed(ctx, loaded, slot, EJECT_TIMEOUT_REASON)
    _notify(ctx, loaded)
    return result


@handles(KIND, "ServiceEject")
async def service_eject(ctx: ActorContext, station_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Field staff take one slot's bank out (a faulty bank, a jammed slot, an inspection): the
    same MQTT Eject (command id, expiry) as for a rental, but with no rental. On the ack the bank
    leaves as `faulty` and no rental is touched; a failed or expired ack puts the slot back as
    for a rental eject, with no retry elsewhere. Refusals write nothing."""
    loaded = await _load_or_reject(ctx, station_id)
    await _release_expired_reservations(ctx, loaded)
    slot = loaded.slots.get(int(payload["slot"]))
    refusal = service_eject_refusal(loaded.view(slot) if slot else None, loaded.station.status)
    if refusal is not None:
        raise CommandRejected(refusal, slot=int(payload["slot"]))
    result = await _start_eject(ctx, loaded, slot, None, attempt=1)
    log.info("station %s: service eject of slot %s (%s): %s", loaded.station.serial, slot.slot_number,
             loaded.bank_in(slot).serial, str(payload.get("reason") or "")[:200])
    _notify(ctx, loaded)
    return {**result, "bank": loaded.bank_in(slot).serial, "expires_at": slot.eject_deadline_at.isoformat()}


def _is_service_eject(slot: StationSlot) -> bool:
    """A rental's eject always names its rental; a service eject names none."""
    return slot.ejecting_rental_id is None


async def _start_eject(
    ctx: ActorContext, loaded: Loaded, slot: StationSlot, rental_id: uuid.UUID | None, *, attempt: int
) -> dict[str, Any]:
    bank = loaded.bank_in(slot)
    command_id = str(uuid.uuid4())
    deadline = ctx.now + timedelta(milliseconds=policy().eject_timeout_ms)
    slot.status, bank.status = "ejecting", "ejecting"
    slot.ejecting_rental_id, slot.eject_command_id = rental_id, command_id
    slot.eject_deadline_at, slot.eject_attempt = deadline, attempt
    await _publish_eject(ctx, loaded, slot, bank, command_id, deadline)
    return {"ok": True, "slot": slot.slot_number, "eject_command_id": command_id, "attempt": attempt}


async def _publish_eject(
    ctx: ActorContext, loaded: Loaded, slot: StationSlot, bank: PowerBank, command_id: str, deadline: datetime
) -> None:
    """The station judges expiry by its own clock, so the deadline is sent in its time."""
    expires_at_station = epoch_ms(deadline) - (loaded.station.clock_offset_ms or 0)
    await ctx.publish_mqtt(
        policy().topics.commands(loaded.station.serial),
        to_payload(Eject(command_id=command_id, slot=slot.slot_number, bank=bank.serial, expires_at=max(0, expires_at_station))),
    )


async def _bank_ejected(ctx: ActorContext, loaded: Loaded, slot: StationSlot, event: Event) -> dict[str, Any]:
    bank = loaded.bank_in(slot)
    if _is_service_eject(slot):
        return _bank_taken_out_by_staff(loaded, slot, bank)
    rental_id = str(slot.ejecting_rental_id)
    bank.status, bank.station_id, bank.rental_id = "rented", None, slot.ejecting_rental_id
    _clear_eject(slot)
    slot.power_bank_id, slot.status = None, "empty"
    await ctx.send(
        "rental",
        rental_id,
        "BankEjected",
        {
            "power_bank_id": str(bank.id),
            "power_bank_serial": bank.serial,
            "slot_number": slot.slot_number,
            "station_time": event.station_time.isoformat(),
        },
        command_id=f"ejected:{rental_id}",
    )
    return {"ok": True, "ejected": bank.serial, "rental_id": rental_id}


def _bank_taken_out_by_staff(loaded: Loaded, slot: StationSlot, bank: PowerBank) -> dict[str, Any]:
    """A service eject's bank is in staff hands: out of every station, in no rental, `faulty`
    so it is not rented again until it is checked (a faulty bank put back stays faulty)."""
    bank.status, bank.station_id, bank.rental_id = "faulty", None, None
    _clear_eject(slot)
    slot.power_bank_id, slot.status = None, "empty"
    log.info("station %s: bank %s taken out of slot %s by staff", loaded.station.serial, bank.serial, slot.slot_number)
    return {"ok": True, "service_ejected": bank.serial, "slot": slot.slot_number}


async def _eject_failed(ctx: ActorContext, loaded: Loaded, slot: StationSlot, code: str) -> dict[str, Any]:
    """Put the slot back as the failure left it, then retry once elsewhere or fail the rental."""
    rental_id = slot.ejecting_rental_id
    attempt = slot.eject_attempt or 1
    service = _is_service_eject(slot)
    _clear_eject(slot)
    new_status = slot_status_after_failed_eject(code)
    if new_status == "empty":
        await _detach_bank(ctx, loaded, slot, "bank_absent_at_eject")
    else:
        bank = loaded.bank_in(slot)
        bank.status = "in_slot"
        slot.status = new_status
    if service:  # no rental waits on it and staff chose this slot: nothing is retried elsewhere
        return {"ok": False, "reason": "service_eject_failed", "failed_slot": slot.slot_number, "code": code}
    if attempt < MAX_EJECT_ATTEMPTS:
        choice = choose_eject_slot(
            loaded.views(), min_charge_percent=policy().min_eject_charge_percent, exclude=[slot.slot_number]
        )
        if choice is not None:
            retry = await _start_eject(ctx, loaded, loaded.slots[choice.number], rental_id, attempt=attempt + 1)
            return {**retry, "failed_slot": slot.slot_number, "code": code}
    failed = await _fail_rental(ctx, str(rental_id), "eject_failed")
    return {**failed, "failed_slot": slot.slot_number, "code": code}


def _clear_eject(slot: StationSlot) -> None:
    slot.ejecting_rental_id = slot.eject_command_id = slot.eject_deadline_at = slot.eject_attempt = None


async def _fail_rental(ctx: ActorContext, rental_id: str, reason: str) -> dict[str, Any]:
    await ctx.send("rental", rental_id, "EjectFailed", {"reason": reason}, command_id=f"eject-failed:{rental_id}")
    return {"ok": False, "reason": reason}


# --- the scheduler's side ---------------------------------------------------------------------


async def expire_overdue_ejects(runtime: Runtime, now: datetime | None = None) -> int:
    """Submit ExpireEject for every eject past its deadline; returns how many were found.
    Repeating it is harmless: the command id is derived from the eject's own id."""
    now = now or utcnow()
    async with runtime.sessions() as session:
        rows = (
            await session.execute(
                select(StationSlot.station_id, StationSlot.eject_command_id).where(
                    StationSlot.status == "ejecting", StationSlot.eject_deadline_at < now
                )
            )
        ).all()
    for station_id, command_id in rows:
        await runtime.submit(
            KIND, str(station_id), "ExpireEject",
            {"eject_command_id": command_id, "as_of": now.isoformat()},
            command_id=f"expire:{command_id}",
        )
    return len(rows)


async def mark_silent_stations_offline(runtime: Runtime, now: datetime | None = None) -> int:
    """Submit MarkOffline for online stations not heard from for 3 heartbeat intervals (any
    message counts as a sign of life); returns how many. The command id carries the last-seen
    time it judged by, so a repeat is a duplicate and a station that spoke since is left alone."""
    now = now or utcnow()
    async with runtime.sessions() as session:
        rows = (
            await session.execute(
                select(Station.id, Station.last_seen_at, Station.heartbeat_interval_s).where(Station.status == "online")
            )
        ).all()
    silent = [
        (station_id, last_seen)
        for station_id, last_seen, interval_s in rows
        if last_seen is None or now - last_seen > timedelta(seconds=MISSED_HEARTBEATS_BEFORE_OFFLINE * interval_s)
    ]
    for station_id, last_seen in silent:
        marker = epoch_ms(last_seen) if last_seen else 0
        await runtime.submit(
            KIND, str(station_id), "MarkOffline",
            {"reason": "silent", "seen_before": (last_seen or now).isoformat()},
            command_id=f"silent:{station_id}:{marker}",
        )
    return len(silent)


async def expire_reservations(runtime: Runtime, now: datetime | None = None) -> int:
    """Submit ExpireReservation for every confirmed reservation past its time; how many. The
    command id is the reservation's, so a repeat is a duplicate."""
    now = now or utcnow()
    async with runtime.sessions() as session:
        rows = (await session.execute(
            select(Reservation.id, Reservation.station_id).where(Reservation.status == "confirmed", Reservation.expires_at <= now)
        )).all()
    for reservation_id, station_id in rows:
        await runtime.submit(
            KIND, str(station_id), "ExpireReservation", {"reservation_id": str(reservation_id), "as_of": now.isoformat()},
            command_id=f"expire-reservation:{reservation_id}",
        )
    return len(rows)

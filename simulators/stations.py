"""A station-fleet simulator speaking the real protocol (broker/protocol.py) over real MQTT.

Each `StationSimulator` is one station: its own amqtt client (username = client id = serial,
its own password, a last will on its status topic), a persistent seq counter, slots with
banks that charge along a lithium curve (`charge_after`), and the station's duties from
docs/station-protocol.md: boot with a full inventory, heartbeat at the configured interval,
answer eject commands after a mechanical delay (refusing expired ones, answering a repeated
command id with the same code), keep every slot event until the backend acknowledges it and
re-send it (periodically, and after every reconnect, before a fresh inventory).

Faults, per station (`FaultKnobs`): dropped, duplicated and reordered events, ejects that fail
or jam their slot, ejects that arrive late, clock skew. `disconnect_abruptly()` cuts the TCP
connection as a network loss would; `cut_power()` / `restore_power()` model a power loss with
events buffered meanwhile. Fleet-wide (`Fleet`, `ChaosPlan`): reconnect storms and power cuts
on a schedule, and `stats()` for a live display.

An idle station costs no wake-ups beyond its heartbeat and charge tick, so one process can
hold thousands (see `powerbank bench stations`). `provision_fleet` creates the database rows.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import secrets
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import quote, urlsplit

from amqtt.client import MQTTClient
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.broker import mqtt
from powerbank.broker.embedded import STATION_PASSWORD_BYTES, hash_password
from powerbank.broker.protocol import (
    EJECT_ERROR,
    EJECT_EXPIRED,
    EJECT_OK,
    EJECT_BANK_MISMATCH,
    EJECT_JAMMED,
    EJECT_SLOT_EMPTY,
    PROTOCOL_VERSION,
    Ack,
    BankInserted,
    BankRemoved,
    Battery,
    Boot,
    Config,
    Eject,
    EjectAck,
    Error,
    Heartbeat,
    Inventory,
    Offline,
    Rejection,
    SlotFault,
    SlotState,
    StationEvent,
    Topics,
    decode_command,
    encode,
    epoch_ms,
)
from powerbank.storage.models import PowerBank, Station, StationSlot
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

DEFAULT_CENTER = (27.7172, 85.3240)  # Kathmandu
BATTERY_REPORT_STEP_PERCENT = 10


# --- provisioning -----------------------------------------------------------------------------


@dataclass
class StationSpec:
    """What a simulated station needs to know about itself (and its password, shown once)."""

    serial: str
    password: str
    station_id: str
    latitude: float
    longitude: float
    slot_count: int
    banks: dict[int, tuple[str, int]] = field(default_factory=dict)  # slot -> (serial, charge %)

    @property
    def bank_serials(self) -> list[str]:
        return [serial for serial, _ in self.banks.values()]


async def provision_fleet(
    sessions: async_sessionmaker[AsyncSession],
    n_stations: int,
    slots_per_station: int,
    banks_per_station: int,
    *,
    serial_prefix: str = "SIM",
    currency: str | None = None,
    settings=None,
    center: tuple[float, float] = DEFAULT_CENTER,
    spread_deg: float = 0.05,
    charge_range: tuple[int, int] = (40, 100),
    seed: int = 0,
) -> list[StationSpec]:
    """Create (or reuse) the rows of a simulated fleet: stations, slots, banks in the first
    `banks_per_station` slots, and fresh MQTT passwords. Re-running with the same prefix keeps
    the stations and their banks where the database has them and only issues new passwords,
    so a demo restarts on its own data.

    This is setup, like an operator installing kiosks, so it writes the rows directly rather
    than through the Station actor (which takes over with the first boot)."""
    if n_stations < 0 or slots_per_station < 1 or banks_per_station < 0:
        raise ValueError("need n_stations >= 0, slots_per_station >= 1 and banks_per_station >= 0")
    if banks_per_station > slots_per_station:
        raise ValueError("banks_per_station cannot exceed slots_per_station")
    currency = currency or (settings.currency if settings is not None else "NPR")
    heartbeat_interval_s = settings.heartbeat_interval_s if settings is not None else 30
    rng = random.Random(seed)
    serials = [f"{serial_prefix}-{i + 1:04d}" for i in range(n_stations)]
    passwords = {serial: secrets.token_urlsafe(STATION_PASSWORD_BYTES) for serial in serials}
    places = {
        serial: (center[0] + rng.uniform(-spread_deg, spread_deg), center[1] + rng.uniform(-spread_deg, spread_deg))
        for serial in serials
    }
    async with sessions.begin() as db:
        existing = {}
        for chunk in _chunks(serials):
            existing.update((await db.execute(select(Station.serial, Station.id).where(Station.serial.in_(chunk)))).all())
        new_rows = _fleet_rows(
            [s for s in serials if s not in existing], places, slots_per_station, banks_per_station, currency,
            heartbeat_interval_s, rng, charge_range,
        )
        for model, rows in new_rows:
            for chunk in _chunks(rows):
                await db.execute(insert(model), chunk)
        station_ids = {**existing, **{row["serial"]: row["id"] for row in new_rows[0][1]}}
        for chunk in _chunks(serials):
            await db.execute(
                update(Station),
                [{"id": station_ids[serial], "mqtt_password_hash": hash_password(passwords[serial])} for serial in chunk],
            )
        stations = {}
        for chunk in _chunks(serials):
            rows = await db.execute(
                select(Station.serial, Station.latitude, Station.longitude, Station.slot_count).where(Station.serial.in_(chunk))
            )
            stations.update((row.serial, row) for row in rows)
        banks = await _banks_in_slots(db, list(station_ids.values()))
    return [
        StationSpec(
            serial=serial, password=passwords[serial], station_id=str(station_ids[serial]),
            latitude=stations[serial].latitude, longitude=stations[serial].longitude,
            slot_count=stations[serial].slot_count, banks=banks.get(station_ids[serial], {}),
        )
        for serial in serials
    ]


def _chunks(items: list, size: int = 500) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _fleet_rows(
    serials, places, slot_count, bank_count, currency, heartbeat_interval_s, rng, charge_range
) -> list[tuple[type, list[dict[str, Any]]]]:
    """Rows for new stations, their banks and slots, inserted in bulk (a fleet of ten
    thousand is set up in seconds rather than minutes of one INSERT each)."""
    now = utcnow()
    stations, banks, slots = [], [], []
    for serial in serials:
        station_id = uuid.uuid4()
        lat, lng = places[serial]
        stations.append({
            "id": station_id, "serial": serial, "name": f"Simulated station {serial}", "address": "simulated",
            "latitude": lat, "longitude": lng, "slot_count": slot_count, "status": "offline",
            "heartbeat_interval_s": heartbeat_interval_s, "last_event_seq": 0, "created_at": now, "updated_at": now,
        })
        for number in range(1, slot_count + 1):
            bank_id = None
            if number <= bank_count:
                bank_id = uuid.uuid4()
                banks.append({
                    "id": bank_id, "serial": f"{serial}-B{number:02d}", "charge_percent": rng.randint(*charge_range),
                    "currency": currency, "station_id": station_id, "status": "in_slot", "updated_at": now,
                })
            slots.append({
                "id": uuid.uuid4(), "station_id": station_id, "slot_number": number, "power_bank_id": bank_id,
                "status": "occupied" if bank_id else "empty", "last_event_seq": 0, "updated_at": now,
            })
    return [(Station, stations), (PowerBank, banks), (StationSlot, slots)]


async def _banks_in_slots(db: AsyncSession, station_ids: list) -> dict[Any, dict[int, tuple[str, int]]]:
    """station id -> {slot number: (bank serial, charge)}."""
    found: dict[Any, dict[int, tuple[str, int]]] = {}
    for chunk in _chunks(station_ids):
        rows = await db.execute(
            select(StationSlot.station_id, StationSlot.slot_number, PowerBank.serial, PowerBank.charge_percent)
            .join(PowerBank, PowerBank.id == StationSlot.power_bank_id)
            .where(StationSlot.station_id.in_(chunk))
        )
        for station_id, number, serial, charge in rows.all():
            found.setdefault(station_id, {})[number] = (serial, charge)
    return found


# --- one station ------------------------------------------------------------------------------


@dataclass
class FaultKnobs:
    """How a simulated station misbehaves (all off by default) and how its hardware behaves.

    Network faults apply to station -> backend events: `drop_rate` loses an event on the way (it
    stays unacknowledged and is re-sent), `duplicate_rate` publishes it twice, `reorder_rate`
    holds it back `reorder_delay_ms` so later events overtake it. Hardware: ejects take
    `eject_delay_ms`, fail once with `eject_failure_code` at `eject_failure_rate`, or jam their
    slot for good at `jam_rate`; `eject_latency_ms` delays an eject command before the latch
    controller sees it (a slow link), which is how a command arrives after its expiry."""

    eject_delay_ms: tuple[int, int] = (50, 200)
    eject_failure_rate: float = 0.0
    eject_failure_code: str = EJECT_ERROR
    jam_rate: float = 0.0
    eject_latency_ms: int = 0
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    reorder_delay_ms: tuple[int, int] = (50, 300)
    resend_after_s: float = 3.0  # re-send an unacknowledged event after this long
    reconnect_delay_s: float = 0.2
    clock_skew_ms: int = 0  # the station's clock minus real time
    charge_percent_per_minute: float = 2.0  # charging speed below CV_START_PERCENT (0: banks do not charge)
    charge_tick_s: float = 1.0  # how often the charge is updated (and a changed level reported)


RESEND_MAX_S = 60.0
CV_START_PERCENT = 80.0
JAM_FAULT_CODE = "latch"


def charge_after(charge: float, elapsed_s: float, rate_percent_per_minute: float) -> float:
    """A lithium bank's charging curve: constant current (a steady `rate`) up to 80 %, then
    constant voltage, where the rate falls in proportion to what is left to fill (an
    exponential approach to 100 %, continuous in slope at 80 %). The last half percent counts
    as full, as a charger's own gauge does."""
    if rate_percent_per_minute <= 0 or elapsed_s <= 0 or charge >= 100:
        return min(100.0, charge)
    minutes = elapsed_s / 60
    if charge < CV_START_PERCENT:
        minutes_to_cv = (CV_START_PERCENT - charge) / rate_percent_per_minute
        if minutes <= minutes_to_cv:
            return charge + rate_percent_per_minute * minutes
        charge, minutes = CV_START_PERCENT, minutes - minutes_to_cv
    rate_constant_per_minute = rate_percent_per_minute / (100 - CV_START_PERCENT)
    left = (100 - charge) * math.exp(-rate_constant_per_minute * minutes)
    return 100.0 if left < 0.5 else 100 - left


@dataclass
class SimSlot:
    bank: str | None = None
    charge: float = 0.0
    reported_charge: int = 0
    fault: str | None = None  # a jammed latch or another reported fault; the slot is out of service


def _with_credentials(url: str, username: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{quote(username, safe='')}:{quote(password, safe='')}@{host}{port}"


class StationSimulator:
    """One simulated station on a real MQTT connection."""

    def __init__(
        self,
        spec: StationSpec,
        broker_url: str,
        *,
        topics: Topics | None = None,
        knobs: FaultKnobs | None = None,
        heartbeat_interval_s: float = 30.0,
        firmware: str = "sim-1.0",
        seed: int | None = None,
        keep_alive_s: int = 10,
    ) -> None:
        self.spec = spec
        self.serial = spec.serial
        self.url = _with_credentials(broker_url, spec.serial, spec.password)
        self.topics = topics or Topics.from_env()
        self.knobs = knobs or FaultKnobs()
        self.heartbeat_interval_s = heartbeat_interval_s
        self.firmware = firmware
        self.keep_alive_s = keep_alive_s
        self.rng = random.Random(seed if seed is not None else spec.serial)
        self.slots: dict[int, SimSlot] = {n: SimSlot() for n in range(1, spec.slot_count + 1)}
        for number, (bank, charge) in spec.banks.items():
            self.slots[number] = SimSlot(bank, float(charge), charge)
        self.seq = 0  # kept across reconnects and power cuts, like non-volatile memory
        # seq -> (payload, last sent monotonic time); only events the backend must see. Also
        # non-volatile: what happens during a power cut is buffered here and sent afterwards.
        self.unacked: collections.OrderedDict[int, tuple[bytes, float]] = collections.OrderedDict()
        self.acked: set[int] = set()
        # (monotonic time of the ack, seconds since the event's last publish): the event lag as
        # the station sees it, from sending to the backend's commit and acknowledgement.
        self.ack_lags: collections.deque[tuple[float, float]] = collections.deque(maxlen=1000)
        self.errors: list[Error] = []
        self.config: Config | None = None
        self.eject_results: dict[str, str] = {}  # eject command id -> code answered
        self.handed_out: list[str] = []  # banks that left through an eject
        self.connections = 0
        self.published = 0  # PUBLISH packets sent, re-sends and duplicates included
        self.powered = True
        self._last_snapshot_seq = -1
        self._last_snapshot: tuple[type, float] | None = None
        self._client: MQTTClient | None = None
        self._connected = asyncio.Event()
        self._needs_boot = True  # the first connection after power-up boots
        self._online_wanted = False
        self._reconnect_allowed = asyncio.Event()
        self._owes_backend = asyncio.Event()  # something waits for an ack: the re-send loop runs
        self._ack_arrived = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._supervisor: asyncio.Task | None = None
        self._next_reconnect_delay_s: float | None = None  # set by disconnect_abruptly
        self._resend_round = 0  # re-send rounds since the last ack (see resend_wait_s)

    # --- what the demo and the tests look at --------------------------------------------------

    @property
    def bank_serials_in_slots(self) -> list[str]:
        return [slot.bank for _, slot in sorted(self.slots.items()) if slot.bank]

    @property
    def free_slots(self) -> list[int]:
        """Slots a rider can push a bank into: empty and in service."""
        return [number for number, slot in sorted(self.slots.items()) if slot.bank is None and slot.fault is None]

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def station_clock_ms(self) -> int:
        return epoch_ms(utcnow()) + self.knobs.clock_skew_ms

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.serial}: condition not met within {timeout_s} s")
            await asyncio.sleep(0.01)

    async def wait_acked(self, timeout_s: float = 10.0) -> None:
        """Until every slot event so far, and the latest boot or inventory, is acknowledged."""
        await self.wait_until(lambda: not self._owes_acks(), timeout_s)

    async def wait_for_room(self, max_unacked: int) -> None:
        """Until fewer than `max_unacked` events wait for their ack (a load generator's window)."""
        while len(self.unacked) >= max_unacked:
            self._ack_arrived.clear()
            await self._ack_arrived.wait()

    def _owes_acks(self) -> bool:
        return bool(self.unacked) or (self._last_snapshot is not None and self._last_snapshot_seq not in self.acked)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, *, wait_s: float | None = 10.0) -> None:
        """Power on: connect, boot, and keep the connection up until stop()."""
        self._online_wanted = True
        self._reconnect_allowed.set()
        self._supervisor = asyncio.create_task(self._run(), name=f"station-{self.serial}")
        self._spawn(self._heartbeat_loop())
        self._spawn(self._resend_loop())
        if wait_s:
            await asyncio.wait_for(self._connected.wait(), wait_s)

    async def stop(self) -> None:
        """Power off cleanly (MQTT DISCONNECT: no last will)."""
        self._online_wanted = False
        self._reconnect_allowed.set()
        tasks = [t for t in (self._supervisor, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._supervisor = None

    def disconnect_abruptly(self, *, reconnect_after_s: float | None = None) -> None:
        """Cut the TCP connection without DISCONNECT (the broker publishes the last will). The
        station reconnects after `reconnect_after_s` (default: the knob), or waits for
        `reconnect()` when given a negative value."""
        delay = self.knobs.reconnect_delay_s if reconnect_after_s is None else reconnect_after_s
        if delay < 0:
            self._reconnect_allowed.clear()
        else:
            self._next_reconnect_delay_s = delay
        mqtt.abort(self._client)

    def reconnect(self) -> None:
        self._reconnect_allowed.set()

    def cut_power(self) -> None:
        """Mains and modem go dark: the connection drops without DISCONNECT (the broker sends the
        last will), no heartbeats, no commands. The latch controller runs on its backup cell:
        it keeps its clock and still records what happens (a bank pushed in), numbered and
        buffered in non-volatile memory until the backend acknowledges it."""
        self.powered = False
        self.disconnect_abruptly(reconnect_after_s=-1)

    def restore_power(self, *, rebooted: bool = False) -> None:
        """Power is back: reconnect, send the buffered events in seq order, then a full
        inventory, or a boot when the controller restarted (`rebooted`)."""
        self.powered = True
        if rebooted:
            self._needs_boot = True
        self.reconnect()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        delay_s = self.knobs.reconnect_delay_s
        will = (self.topics.status(self.serial), encode(Offline()).decode())
        while self._online_wanted:
            await self._reconnect_allowed.wait()
            client = None
            try:
                client = await mqtt.connect(self.url, self.serial, will=will, keep_alive_s=self.keep_alive_s)
                codes = await client.subscribe(
                    [(self.topics.commands(self.serial), mqtt.QOS_1), (self.topics.errors(self.serial), mqtt.QOS_1)]
                )
                if any(code not in (0, 1, 2) for code in codes):
                    raise ConnectionError(f"subscription refused: {codes}")
                if not self._reconnect_allowed.is_set():
                    raise ConnectionError("the power went while connecting")
                self._client = client
                self.connections += 1
                reader = asyncio.create_task(self._read(client))
                await self._after_connect()
                self._connected.set()
                delay_s = self.knobs.reconnect_delay_s
                await reader
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("station %s connection failed: %r", self.serial, exc)
            finally:
                self._connected.clear()
                self._client = None
                await mqtt.close(client)
            if self._online_wanted:
                if self._next_reconnect_delay_s is not None:
                    delay_s, self._next_reconnect_delay_s = self._next_reconnect_delay_s, None
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)

    async def _after_connect(self) -> None:
        """Buffered events first, in seq order, then a snapshot: a boot after power-up, a fresh
        inventory after every other reconnect, so the backend reconciles whatever happened
        while apart. The order matters: a snapshot applied before a buffered return would
        close that rental at the snapshot's time instead of the return's."""
        for seq, (payload, _) in list(self.unacked.items()):
            if seq in self.unacked:
                self.unacked[seq] = (payload, time.monotonic())
                await self._send(payload)
        if self._needs_boot:
            self._needs_boot = False
            await self._emit(self._boot(), keep=False)
        else:
            await self._emit(self._inventory_event(), keep=False)

    # --- sending ------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _event_fields(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "seq": self._next_seq(), "ts": self.station_clock_ms()}

    def _boot(self) -> Boot:
        return Boot(**self._event_fields(), firmware=self.firmware, hardware="sim-hw",
                    slot_count=len(self.slots), slots=self._inventory())

    def _inventory_event(self) -> Inventory:
        return Inventory(**self._event_fields(), slot_count=len(self.slots), slots=self._inventory())

    def _inventory(self) -> list[SlotState]:
        return [
            SlotState(slot=n, bank=s.bank, charge=int(s.charge) if s.bank else None, fault=s.fault)
            for n, s in sorted(self.slots.items())
        ]

    async def _emit(self, event: StationEvent, *, keep: bool = True) -> int:
        """Publish an event; with `keep`, hold it until acknowledged (and re-send it). The
        network faults of the knobs apply here."""
        payload = encode(event)
        if isinstance(event, (Boot, Inventory)):
            self._last_snapshot_seq = event.seq
            self._last_snapshot = (type(event), time.monotonic())
            self._owes_backend.set()
        if keep:
            self.unacked[event.seq] = (payload, time.monotonic())
            self._owes_backend.set()
            if self.rng.random() < self.knobs.drop_rate:
                return event.seq
        copies = 2 if self.rng.random() < self.knobs.duplicate_rate else 1
        if self.rng.random() < self.knobs.reorder_rate:
            delay_s = self.rng.uniform(*self.knobs.reorder_delay_ms) / 1000
            self._spawn(self._send_later(payload, delay_s, copies))
            return event.seq
        for _ in range(copies):
            await self._send(payload)
        return event.seq

    async def _send_later(self, payload: bytes, delay_s: float, copies: int) -> None:
        await asyncio.sleep(delay_s)
        for _ in range(copies):
            await self._send(payload)

    async def _send(self, payload: bytes) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            await asyncio.wait_for(client.publish(self.topics.events(self.serial), payload, qos=mqtt.QOS_1), 10)
            self.published += 1
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("station %s publish failed: %r", self.serial, exc)
            return False

    async def _heartbeat_loop(self) -> None:
        """Beat at the interval the backend configured, and let the banks charge in between.
        Sleeps until the next beat or charge tick, whichever is first (a config reply that
        changes the interval is picked up at the next tick)."""
        last_beat = last_charge = time.monotonic()
        while True:
            next_beat = last_beat + self.heartbeat_interval_s
            next_charge = last_charge + self.knobs.charge_tick_s
            await asyncio.sleep(max(0.01, min(next_beat, next_charge) - time.monotonic()))
            now = time.monotonic()
            if now >= next_charge:
                await self._charge(now - last_charge)
                last_charge = now
            if now - last_beat >= self.heartbeat_interval_s:
                last_beat = now
                if self._connected.is_set():
                    await self._emit(Heartbeat(**self._event_fields()), keep=False)

    async def _charge(self, elapsed_s: float) -> None:
        """Banks charge along `charge_after`'s curve; a change of a whole step is reported."""
        rate = self.knobs.charge_percent_per_minute
        if rate <= 0 or not self.powered:
            return
        for number, slot in sorted(self.slots.items()):
            if slot.bank is None or slot.charge >= 100:
                continue
            slot.charge = charge_after(slot.charge, elapsed_s, rate)
            level = int(slot.charge)
            if level // BATTERY_REPORT_STEP_PERCENT != slot.reported_charge // BATTERY_REPORT_STEP_PERCENT or level == 100:
                if level != slot.reported_charge:
                    slot.reported_charge = level
                    await self._emit(Battery(**self._event_fields(), slot=number, bank=slot.bank, charge=level))

    def resend_wait_s(self) -> float:
        """How long an event waits for its ack before it is sent again: `resend_after_s`,
        doubled after every round of re-sends that no ack answered, up to RESEND_MAX_S. An
        overloaded backend acknowledges late; re-sending at a fixed pace would multiply its
        load (every re-sent boot is a new command) just when it can least take it."""
        return min(RESEND_MAX_S, self.knobs.resend_after_s * 2 ** self._resend_round)

    async def _resend_loop(self) -> None:
        """While something waits for an ack, look a few times per `resend_after_s`; otherwise
        sleep until something does (an idle station costs no wake-ups)."""
        while True:
            if not self._owes_acks():
                self._owes_backend.clear()
                await self._owes_backend.wait()
            await asyncio.sleep(max(0.05, self.knobs.resend_after_s / 4))
            if not self._connected.is_set():
                continue
            cutoff = time.monotonic() - self.resend_wait_s()
            resent = False
            for seq, (payload, sent_at) in list(self.unacked.items()):
                if sent_at < cutoff and seq in self.unacked:
                    self.unacked[seq] = (payload, time.monotonic())
                    await self._send(payload)
                    resent = True
            resent = await self._refresh_unacknowledged_snapshot(cutoff) or resent
            if resent:
                self._resend_round = min(self._resend_round + 1, 10)

    async def _refresh_unacknowledged_snapshot(self, cutoff: float) -> bool:
        """A boot or inventory is never re-sent, but if it (or its ack) got lost, a fresh one
        of the same kind replaces it: the backend needs the boot to send config."""
        if self._last_snapshot is None or self._last_snapshot_seq in self.acked:
            return False
        kind, sent_at = self._last_snapshot
        if sent_at >= cutoff:
            return False
        await self._emit(self._boot() if kind is Boot else self._inventory_event(), keep=False)
        return True

    # --- receiving ----------------------------------------------------------------------------

    async def _read(self, client: MQTTClient) -> None:
        async for _, payload in mqtt.messages(client):
            self._on_command(payload)

    def _on_command(self, data: bytes) -> None:
        command = decode_command(data)
        if isinstance(command, Rejection):
            log.warning("station %s got an undecodable command: %s", self.serial, command.detail)
        elif isinstance(command, Ack):
            sent = self.unacked.pop(command.seq, None)
            if sent is not None:
                now = time.monotonic()
                self.ack_lags.append((now, now - sent[1]))
            self.acked.add(command.seq)
            self._ack_arrived.set()
            self._resend_round = 0
        elif isinstance(command, Config):
            self.config = command
            self.heartbeat_interval_s = command.heartbeat_interval_s
            self.seq = max(self.seq, command.last_seq)  # a counter that went backwards continues above
        elif isinstance(command, Eject):
            self._spawn(self._eject(command))
        elif isinstance(command, Error):
            self.errors.append(command)

    async def _eject(self, command: Eject) -> None:
        """Answer an eject: refuse it when it reaches the latch controller after its expiry
        (station clock), otherwise release the bank after the mechanical delay. A repeated
        command gets the same answer and moves nothing."""
        if self.knobs.eject_latency_ms > 0:
            await asyncio.sleep(self.knobs.eject_latency_ms / 1000)
        if command.command_id in self.eject_results:
            code = self.eject_results[command.command_id]
        elif self.station_clock_ms() > command.expires_at:
            code = self.eject_results[command.command_id] = EJECT_EXPIRED
        else:
            self.eject_results[command.command_id] = "in_progress"
            await asyncio.sleep(self.rng.uniform(*self.knobs.eject_delay_ms) / 1000)
            code = self._release(command)
            self.eject_results[command.command_id] = code
        if code == "in_progress":
            return
        await self._emit(EjectAck(**self._event_fields(), command_id=command.command_id,
                                  slot=command.slot, bank=command.bank, code=code))

    def _release(self, command: Eject) -> str:
        slot = self.slots.get(command.slot)
        if slot is None or slot.bank is None:
            return EJECT_SLOT_EMPTY
        if slot.bank != command.bank:
            return EJECT_BANK_MISMATCH
        if slot.fault is not None:
            return EJECT_JAMMED
        if self.rng.random() < self.knobs.jam_rate:
            slot.fault = JAM_FAULT_CODE
            return EJECT_JAMMED
        if self.rng.random() < self.knobs.eject_failure_rate:
            return self.knobs.eject_failure_code
        self.handed_out.append(slot.bank)
        slot.bank, slot.charge, slot.reported_charge = None, 0.0, 0
        return EJECT_OK

    # --- things people do at the station ------------------------------------------------------

    async def insert_bank(self, serial: str, slot: int | None = None, charge: int = 50) -> int:
        """Someone pushes a bank into a slot (a return, or restocking); returns the slot used.
        Works during a power cut too: the controller records it for later."""
        if slot is None:
            free = self.free_slots
            if not free:
                raise RuntimeError(f"station {self.serial} has no free slot")
            slot = free[0]
        if self.slots[slot].bank is not None:
            raise RuntimeError(f"slot {slot} of {self.serial} is occupied")
        if serial in self.bank_serials_in_slots:
            raise RuntimeError(f"bank {serial} is already in {self.serial}")
        self.slots[slot] = SimSlot(serial, float(charge), charge)
        with contextlib.suppress(ValueError):
            self.handed_out.remove(serial)
        await self._emit(BankInserted(**self._event_fields(), slot=slot, bank=serial, charge=charge))
        return slot

    async def remove_bank(self, slot: int) -> str | None:
        """A bank is pulled out without an eject (forced, or by an operator)."""
        bank = self.slots[slot].bank
        self.slots[slot] = SimSlot()
        await self._emit(BankRemoved(**self._event_fields(), slot=slot, bank=bank))
        return bank

    async def report_fault(self, slot: int, code: str = "sensor") -> None:
        self.slots[slot].fault = code
        await self._emit(SlotFault(**self._event_fields(), slot=slot, code=code))

    async def clear_fault(self, slot: int) -> None:
        """A technician repairs the slot; a fresh inventory puts it back in service."""
        self.slots[slot].fault = None
        if self.connected:
            await self._emit(self._inventory_event(), keep=False)

    async def send_raw(self, payload: bytes) -> bool:
        """Publish arbitrary bytes on the events topic (to test the backend's rejections)."""
        return await self._send(payload)


# --- a fleet ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetStats:
    """What the live progress display shows about a fleet."""

    stations: int
    connected: int
    powered_off: int
    events: int  # events numbered so far (each station counts from 1)
    published: int  # PUBLISH packets, re-sends and duplicates included
    unacked: int
    reconnects: int
    errors: int


class Fleet:
    """N simulated stations, started and stopped concurrently. Each station gets its own copy
    of the knobs (`skew_spread_ms` gives each a clock skew drawn around the knob's)."""

    def __init__(
        self,
        specs: Iterable[StationSpec],
        broker_url: str,
        *,
        topics: Topics | None = None,
        knobs: FaultKnobs | None = None,
        heartbeat_interval_s: float = 30.0,
        seed: int = 0,
        skew_spread_ms: int = 0,
        keep_alive_s: int = 10,
    ) -> None:
        base = knobs or FaultKnobs()
        rng = random.Random(seed)
        self.rng = random.Random(seed + 1)
        self.stations: dict[str, StationSimulator] = {}
        for index, spec in enumerate(specs):
            skew = base.clock_skew_ms + (rng.randint(-skew_spread_ms, skew_spread_ms) if skew_spread_ms else 0)
            self.stations[spec.serial] = StationSimulator(
                spec, broker_url, topics=topics, knobs=replace(base, clock_skew_ms=skew),
                heartbeat_interval_s=heartbeat_interval_s, seed=seed + index, keep_alive_s=keep_alive_s,
            )
        self.storms = 0
        self.power_cuts = 0
        self._chaos_tasks: set[asyncio.Task] = set()

    def __iter__(self) -> Iterator[StationSimulator]:
        return iter(self.stations.values())

    def __len__(self) -> int:
        return len(self.stations)

    def station(self, serial: str) -> StationSimulator:
        return self.stations[serial]

    def set_knobs(self, **changes: Any) -> None:
        """Change knobs on every station at once (each keeps its own clock skew unless given)."""
        for station in self:
            station.knobs = replace(station.knobs, **changes)

    def station_with_free_slot(self, *, exclude: Iterable[str] = (), rng: random.Random | None = None) -> StationSimulator | None:
        """A connected station with room for a return (random when `rng` is given)."""
        excluded = set(exclude)
        candidates = [s for s in self if s.free_slots and s.serial not in excluded and s.connected]
        if not candidates:
            return None
        return rng.choice(candidates) if rng else candidates[0]

    def station_holding(self, bank_serial: str) -> StationSimulator | None:
        return next((s for s in self if bank_serial in s.bank_serials_in_slots), None)

    async def start(self, *, concurrency: int = 100, wait_s: float = 30.0) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def start_one(station: StationSimulator) -> None:
            async with gate:
                await station.start(wait_s=wait_s)

        await asyncio.gather(*(start_one(s) for s in self))

    async def stop(self) -> None:
        for task in list(self._chaos_tasks):
            task.cancel()
        await asyncio.gather(*self._chaos_tasks, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self), return_exceptions=True)

    async def wait_acked(self, timeout_s: float = 10.0) -> None:
        await asyncio.gather(*(s.wait_acked(timeout_s) for s in self))

    def stats(self) -> FleetStats:
        stations = list(self)
        return FleetStats(
            stations=len(stations),
            connected=sum(s.connected for s in stations),
            powered_off=sum(not s.powered for s in stations),
            events=sum(s.seq for s in stations),
            published=sum(s.published for s in stations),
            unacked=sum(len(s.unacked) for s in stations),
            reconnects=sum(max(0, s.connections - 1) for s in stations),
            errors=sum(len(s.errors) for s in stations),
        )

    def reconnect_storm(self, fraction: float, down_s: tuple[float, float] = (0.1, 2.0)) -> int:
        """Cut the connections of `fraction` of the connected, powered stations at once, as a
        cell tower or a broker failover would; each comes back after a random `down_s`.
        Returns how many were cut."""
        candidates = [s for s in self if s.connected and s.powered]
        victims = self.rng.sample(candidates, k=min(len(candidates), max(1, round(fraction * len(candidates))))) if candidates else []
        for station in victims:
            station.disconnect_abruptly(reconnect_after_s=self.rng.uniform(*down_s))
        self.storms += 1
        return len(victims)

    async def run_chaos(self, plan: "ChaosPlan") -> None:
        """Storms and power cuts at the plan's pace until cancelled."""
        tasks = []
        if plan.storm_every_s > 0:
            tasks.append(self._every(plan.storm_every_s, lambda: self.reconnect_storm(plan.storm_fraction, plan.storm_down_s)))
        if plan.power_cut_every_s > 0:
            tasks.append(self._every(plan.power_cut_every_s, lambda: self._spawn_power_cut(plan.power_cut_s)))
        await asyncio.gather(*tasks)

    async def _every(self, period_s: float, action: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(period_s * self.rng.uniform(0.5, 1.5))
            action()

    def _spawn_power_cut(self, duration_s: tuple[float, float]) -> None:
        candidates = [s for s in self if s.connected and s.powered]
        if not candidates:
            return
        station = self.rng.choice(candidates)
        self.power_cuts += 1
        task = asyncio.ensure_future(self._power_cut(station, self.rng.uniform(*duration_s)))
        self._chaos_tasks.add(task)
        task.add_done_callback(self._chaos_tasks.discard)

    async def _power_cut(self, station: StationSimulator, duration_s: float) -> None:
        station.cut_power()
        try:
            await asyncio.sleep(duration_s)
        finally:
            station.restore_power(rebooted=self.rng.random() < 0.5)


@dataclass(frozen=True)
class ChaosPlan:
    """Fleet-wide faults on a schedule (0 disables one): every ~`storm_every_s` a reconnect
    storm cuts `storm_fraction` of the stations for `storm_down_s`; every ~`power_cut_every_s`
    one station loses power for `power_cut_s` (buffering its events; half of them reboot)."""

    storm_every_s: float = 0.0
    storm_fraction: float = 0.2
    storm_down_s: tuple[float, float] = (0.1, 2.0)
    power_cut_every_s: float = 0.0
    power_cut_s: tuple[float, float] = (2.0, 10.0)

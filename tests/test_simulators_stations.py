"""The station-fleet simulator: provisioning, and the station duties it must perform right
(expired commands refused, repeated commands answered once, faults, charging), checked through
the real bridge and Station actor on the embedded broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
from sqlalchemy import select

from powerbank.broker import mqtt
from powerbank.broker.embedded import verify_password
from powerbank.broker.protocol import EJECT_EXPIRED, EJECT_JAMMED, EJECT_OK, Eject, encode, epoch_ms
from powerbank.broker.testing import station_stack
from powerbank.simulators.stations import CV_START_PERCENT, FaultKnobs, Fleet, charge_after, provision_fleet
from powerbank.storage.models import ActorCommand, PowerBank, Station, StationEvent, StationSlot
from powerbank.storage.types import utcnow


@pytest.fixture
async def stack(tmp_path):
    async with station_stack(tmp_path, heartbeat_interval_s=1, currency="USD") as stack:
        yield stack


@contextlib.asynccontextmanager
async def one_station(stack, *, slots=3, banks=2, knobs=None):
    [spec] = await provision_fleet(stack.sessions, 1, slots, banks, serial_prefix=f"S{uuid.uuid4().hex[:5]}", settings=stack.settings)
    fleet = Fleet([spec], stack.broker_url, topics=stack.topics, knobs=knobs or FaultKnobs(resend_after_s=1.0))
    await fleet.start()
    sim = fleet.station(spec.serial)
    await sim.wait_acked()
    try:
        yield sim, spec
    finally:
        await fleet.stop()


@contextlib.asynccontextmanager
async def backend_client(stack):
    """Publishes as the backend does (the bridge login may publish anywhere)."""
    host_port = stack.broker_url.split("://", 1)[1]
    url = f"mqtt://{stack.settings.bridge_username}:{stack.settings.bridge_password}@{host_port}"
    client = await mqtt.connect(url, f"backend-{uuid.uuid4().hex[:6]}")
    try:
        yield client
    finally:
        await mqtt.close(client)


async def station_commands(stack, name):
    """Commands named `name` (every Station-actor command when None), in acceptance order."""
    async with stack.sessions() as db:
        query = select(ActorCommand).order_by(ActorCommand.id)
        query = query.where(ActorCommand.kind == "station") if name is None else query.where(ActorCommand.name == name)
        return list((await db.execute(query)).scalars())


async def test_provision_fleet_creates_rows_and_reissues_passwords_on_rerun(stack):
    specs = await provision_fleet(stack.sessions, 3, 4, 2, serial_prefix="PROV", settings=stack.settings)
    assert [s.serial for s in specs] == ["PROV-0001", "PROV-0002", "PROV-0003"]
    async with stack.sessions() as db:
        stations = {s.serial: s for s in (await db.execute(select(Station))).scalars()}
        banks = list((await db.execute(select(PowerBank))).scalars())
        slots = list((await db.execute(select(StationSlot))).scalars())
    assert len(banks) == 6 and {b.currency for b in banks} == {"USD"}
    assert sorted(s.status for s in slots).count("occupied") == 6 and len(slots) == 12
    for spec in specs:
        assert spec.bank_serials == [f"{spec.serial}-B01", f"{spec.serial}-B02"]
        assert verify_password(stations[spec.serial].mqtt_password_hash, spec.password)
        assert stations[spec.serial].status == "offline"
        assert -90 <= spec.latitude <= 90 and -180 <= spec.longitude <= 180
    again = await provision_fleet(stack.sessions, 3, 4, 2, serial_prefix="PROV", settings=stack.settings)
    assert [s.station_id for s in again] == [s.station_id for s in specs]
    assert [s.banks for s in again] == [s.banks for s in specs]
    async with stack.sessions() as db:
        station = (await db.execute(select(Station).where(Station.serial == "PROV-0001"))).scalar_one()
        assert len(list((await db.execute(select(PowerBank))).scalars())) == 6
    assert verify_password(station.mqtt_password_hash, again[0].password)
    assert not verify_password(station.mqtt_password_hash, specs[0].password)
    with pytest.raises(ValueError):
        await provision_fleet(stack.sessions, 1, 2, 3, serial_prefix="BAD")


async def test_an_expired_eject_is_refused_and_nothing_moves(stack):
    async with one_station(stack) as (sim, spec), backend_client(stack) as backend:
        bank = spec.banks[1][0]
        command = Eject(command_id="late-1", slot=1, bank=bank, expires_at=sim.station_clock_ms() - 1)
        await backend.publish(stack.topics.commands(sim.serial), encode(command), qos=1)
        await sim.wait_until(lambda: sim.eject_results.get("late-1") == EJECT_EXPIRED)
        await sim.wait_acked()
        await stack.dispatcher.settle()  # acknowledged means durable; applied follows
        assert sim.slots[1].bank == bank and sim.handed_out == []
        [ack] = await station_commands(stack, "EjectAck")
        assert (ack.payload["command_id"], ack.payload["code"], ack.status) == ("late-1", EJECT_EXPIRED, "applied")


async def test_a_repeated_eject_command_releases_the_bank_once(stack):
    knobs = FaultKnobs(eject_delay_ms=(10, 20), resend_after_s=1.0)
    async with one_station(stack, knobs=knobs) as (sim, spec), backend_client(stack) as backend:
        bank = spec.banks[2][0]
        command = encode(Eject(command_id="twice", slot=2, bank=bank, expires_at=sim.station_clock_ms() + 5000))
        await backend.publish(stack.topics.commands(sim.serial), command, qos=1)
        await sim.wait_until(lambda: sim.eject_results.get("twice") == EJECT_OK)
        await backend.publish(stack.topics.commands(sim.serial), command, qos=1)  # outbox re-delivery
        await sim.wait_until(lambda: len([s for s in sim.acked if s > 1]) >= 2)
        await sim.wait_acked()
        assert sim.handed_out == [bank] and sim.slots[2].bank is None
        acks = await station_commands(stack, "EjectAck")
        assert [a.payload["code"] for a in acks] == [EJECT_OK, EJECT_OK]


async def test_an_eject_that_keeps_failing_fails_the_rental_after_one_retry(stack):
    knobs = FaultKnobs(eject_delay_ms=(5, 10), eject_failure_rate=1.0, resend_after_s=1.0)
    async with one_station(stack, banks=3, knobs=knobs) as (sim, spec):
        rental_id = str(uuid.uuid4())
        await stack.runtime.submit(
            "station", spec.station_id, "ReserveAndEject", {"rental_id": rental_id, "user_id": "u"}, f"eject:{rental_id}"
        )
        deadline = time.monotonic() + 10
        while not await station_commands(stack, "EjectFailed"):
            assert time.monotonic() < deadline, "the rental was never failed"
            await asyncio.sleep(0.02)
        [failed] = await station_commands(stack, "EjectFailed")
        assert (failed.entity_id, failed.payload) == (rental_id, {"reason": "eject_failed"})
        assert len(sim.eject_results) == 2 and sim.handed_out == []
        assert sim.bank_serials_in_slots == spec.bank_serials


async def test_banks_charge_in_their_slots_and_the_backend_hears_it(stack):
    knobs = FaultKnobs(charge_percent_per_minute=1200, resend_after_s=1.0)  # 20 % a second
    async with one_station(stack, slots=1, banks=0, knobs=knobs) as (sim, spec):
        await sim.insert_bank("PB-CHARGE", charge=20)
        await sim.wait_until(lambda: sim.slots[1].charge >= 45, timeout_s=5)
        await sim.wait_acked()
        await stack.dispatcher.settle()
        async with stack.sessions() as db:
            bank = (await db.execute(select(PowerBank).where(PowerBank.serial == "PB-CHARGE"))).scalar_one()
            station = (await db.execute(select(Station).where(Station.serial == sim.serial))).scalar_one()
        assert bank.charge_percent >= 40
        assert station.last_heartbeat_at is not None
        assert len(await station_commands(stack, "Battery")) >= 2


async def test_duplicated_events_have_one_effect(stack):
    knobs = FaultKnobs(duplicate_rate=1.0, resend_after_s=1.0)
    async with one_station(stack, slots=2, banks=0, knobs=knobs) as (sim, spec):
        await sim.insert_bank("PB-DUP-1", slot=1)
        await sim.remove_bank(1)
        await sim.insert_bank("PB-DUP-2", slot=2)
        await sim.wait_acked()
        await stack.dispatcher.settle()
        async with stack.sessions() as db:
            seqs = [e.seq for e in (await db.execute(select(StationEvent).order_by(StationEvent.seq))).scalars()]
        assert seqs == sorted(set(seqs)) and len([s for s in seqs if s > 1]) >= 3
        assert len(await station_commands(stack, "BankInserted")) == 2


async def test_fleet_finds_stations_by_bank_and_by_free_slot(stack):
    specs = await provision_fleet(stack.sessions, 2, 2, 2, serial_prefix="FIND", settings=stack.settings)
    fleet = Fleet(specs, stack.broker_url, topics=stack.topics)
    await fleet.start()
    try:
        full, other = fleet.station("FIND-0001"), fleet.station("FIND-0002")
        assert fleet.station_with_free_slot() is None
        handed = await other.remove_bank(2)
        assert fleet.station_with_free_slot() is other
        assert fleet.station_with_free_slot(exclude=["FIND-0002"]) is None
        assert fleet.station_holding(full.bank_serials_in_slots[0]) is full
        assert fleet.station_holding(handed) is None
        await other.insert_bank(handed)
        assert fleet.station_holding(handed) is other
        with pytest.raises(RuntimeError):
            await other.insert_bank("PB-NO-ROOM")
        assert epoch_ms(utcnow()) - other.station_clock_ms() < 1000
    finally:
        await fleet.stop()


async def test_a_boot_nobody_heard_is_replaced_by_a_fresh_one(stack):
    [spec] = await provision_fleet(stack.sessions, 1, 2, 1, serial_prefix="DEAF", settings=stack.settings)
    await stack.bridge.stop()  # the boot goes out while no backend listens
    fleet = Fleet([spec], stack.broker_url, topics=stack.topics, knobs=FaultKnobs(resend_after_s=0.3))
    await fleet.start()
    try:
        sim = fleet.station(spec.serial)
        await asyncio.sleep(0.2)
        assert sim.config is None and 1 not in sim.acked
        await stack.bridge.start(wait_s=10)
        await sim.wait_until(lambda: sim.config is not None)
        await sim.wait_acked()
        boots = await station_commands(stack, "Boot")
        assert boots and all(b.payload["seq"] > 1 for b in boots)
    finally:
        await fleet.stop()


def test_banks_charge_at_a_steady_rate_then_taper_towards_full():
    rate = 2.0  # percent per minute below CV_START_PERCENT
    assert charge_after(20, 60, rate) == pytest.approx(22.0)
    assert charge_after(79, 30, rate) == pytest.approx(80.0)
    # Past 80 % each minute adds less than the last, and the curve never overshoots.
    levels = [charge_after(CV_START_PERCENT, minutes * 60, rate) for minutes in range(0, 35, 5)]
    gains = [b - a for a, b in zip(levels, levels[1:])]
    assert all(later < earlier for earlier, later in zip(gains, gains[1:]))
    assert gains[0] < rate * 5  # slower than constant current already
    assert charge_after(50, 10 * 3600, rate) == 100.0
    # Charging in many small steps follows the same curve as one big step.
    stepwise = 30.0
    for _ in range(120):
        stepwise = charge_after(stepwise, 30, rate)
    assert stepwise == pytest.approx(charge_after(30.0, 3600, rate), abs=0.6)
    assert charge_after(40, 60, 0) == 40


async def test_a_power_cut_buffers_what_happens_and_sends_it_before_the_inventory(stack):
    async with one_station(stack, slots=2, banks=0) as (sim, spec):
        sim.cut_power()
        await sim.wait_until(lambda: not sim.connected)
        await _eventually_status(stack, sim.serial, "offline")  # the broker sent the last will
        slot = await sim.insert_bank("PB-IN-THE-DARK", charge=40)
        assert len(sim.unacked) == 1 and sim.connections == 1
        sim.restore_power()
        await sim.wait_acked()
        await stack.dispatcher.settle()
        names = [c.name for c in await station_commands(stack, None)]
        assert names[-2:] == ["BankInserted", "Inventory"]
        await _eventually_status(stack, sim.serial, "online")
        async with stack.sessions() as db:
            bank = (await db.execute(select(PowerBank).where(PowerBank.serial == "PB-IN-THE-DARK"))).scalar_one()
            slot_row = (await db.execute(select(StationSlot).where(StationSlot.power_bank_id == bank.id))).scalar_one()
        assert (slot_row.slot_number, str(bank.station_id)) == (slot, spec.station_id)


async def test_a_controller_that_rebooted_sends_its_buffer_then_boots(stack):
    async with one_station(stack, slots=2, banks=0) as (sim, spec):
        sim.cut_power()
        await sim.wait_until(lambda: not sim.connected)
        await sim.insert_bank("PB-REBOOT", charge=40)
        sim.restore_power(rebooted=True)
        await sim.wait_acked()
        await sim.wait_until(lambda: sim.config is not None)
        await stack.dispatcher.settle()
        names = [c.name for c in await station_commands(stack, None)]
        assert names[0] == "Boot" and names[-2:] == ["BankInserted", "Boot"]


async def test_reordered_events_arrive_out_of_order_and_still_end_in_the_stations_state(stack):
    knobs = FaultKnobs(reorder_rate=0.5, reorder_delay_ms=(50, 150), resend_after_s=1.0)
    async with one_station(stack, slots=3, banks=0, knobs=knobs) as (sim, spec):
        for round_ in range(6):  # in and out of slots 1-3, then slots 1-3 filled
            await sim.insert_bank(f"PB-RO-{round_}", slot=1 + round_ % 3)
            if round_ < 3:
                await sim.remove_bank(1 + round_ % 3)
        await sim.wait_acked()
        await stack.dispatcher.settle()
        slot_events = [c for c in await station_commands(stack, None) if c.name in ("BankInserted", "BankRemoved")]
        arrival = [c.payload["seq"] for c in slot_events]
        assert arrival != sorted(arrival)  # the knob did reorder them
        async with stack.sessions() as db:
            rows = await db.execute(
                select(StationSlot.slot_number, PowerBank.serial)
                .outerjoin(PowerBank, PowerBank.id == StationSlot.power_bank_id)
                .where(StationSlot.station_id == uuid.UUID(spec.station_id))
                .order_by(StationSlot.slot_number)
            )
            stored = {number: serial for number, serial in rows.all()}
        assert stored == {n: s.bank for n, s in sim.slots.items()}


async def test_a_jammed_slot_keeps_its_bank_and_is_out_of_service_until_repaired(stack):
    knobs = FaultKnobs(eject_delay_ms=(5, 10), jam_rate=1.0, resend_after_s=1.0)
    async with one_station(stack, slots=2, banks=2, knobs=knobs) as (sim, spec):
        rental_id = str(uuid.uuid4())
        await stack.runtime.submit(
            "station", spec.station_id, "ReserveAndEject", {"rental_id": rental_id, "user_id": "u"}, f"eject:{rental_id}"
        )
        await sim.wait_until(lambda: len(sim.eject_results) == 2 and "in_progress" not in sim.eject_results.values())
        assert set(sim.eject_results.values()) == {EJECT_JAMMED}
        assert all(slot.fault for slot in sim.slots.values()) and sim.bank_serials_in_slots == spec.bank_serials
        await sim.wait_acked()
        await stack.dispatcher.settle()
        assert [s.status for s in await _slots(stack, spec)] == ["fault", "fault"]
        await sim.clear_fault(1)
        await sim.wait_acked()
        await stack.dispatcher.settle()
        assert [s.status for s in await _slots(stack, spec)] == ["occupied", "fault"]


async def test_a_reconnect_storm_brings_every_station_back_online(stack):
    specs = await provision_fleet(stack.sessions, 4, 2, 1, serial_prefix=f"STORM{uuid.uuid4().hex[:4]}", settings=stack.settings)
    fleet = Fleet(specs, stack.broker_url, topics=stack.topics, knobs=FaultKnobs(resend_after_s=1.0))
    await fleet.start()
    try:
        await fleet.wait_acked()
        assert fleet.reconnect_storm(1.0, down_s=(0.1, 0.5)) == 4
        await asyncio.gather(*(s.wait_until(lambda s=s: s.connections == 2 and s.connected) for s in fleet))
        await fleet.wait_acked()
        await stack.dispatcher.settle()
        stats = fleet.stats()
        assert (stats.connected, stats.reconnects, stats.unacked) == (4, 4, 0)
        for spec in specs:
            await _eventually_status(stack, spec.serial, "online")
    finally:
        await fleet.stop()


async def _slots(stack, spec):
    async with stack.sessions() as db:
        rows = await db.execute(
            select(StationSlot).where(StationSlot.station_id == uuid.UUID(spec.station_id)).order_by(StationSlot.slot_number)
        )
        return list(rows.scalars())


async def _eventually_status(stack, serial, status, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        await stack.dispatcher.settle()
        async with stack.sessions() as db:
            row = (await db.execute(select(Station).where(Station.serial == serial))).scalar_one()
        if row.status == status:
            return row
        assert time.monotonic() < deadline, f"{serial} stayed {row.status}, expected {status}"
        await asyncio.sleep(0.05)

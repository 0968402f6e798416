"""The bridge end to end: simulated stations on real MQTT (the embedded amqtt broker and the
machine's Mosquitto), the bridge, the runtime and the Station actor on SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select

from powerbank.broker import mqtt
from powerbank.broker.bridge import StationBridge
from powerbank.broker.embedded import start_embedded_broker
from powerbank.broker.protocol import (
    INVALID_MESSAGE,
    MALFORMED_JSON,
    MAX_PAYLOAD_BYTES,
    PAYLOAD_TOO_LARGE,
    UNKNOWN_STATION,
    UNSUPPORTED_VERSION,
)
from powerbank.broker.testing import broker_reachable, station_stack
from powerbank.simulators.stations import FaultKnobs, Fleet, provision_fleet
from powerbank.storage.models import (
    ActorCommand,
    OutboxMessage,
    PowerBank,
    Rental,
    RentalPackage,
    Station,
    StationEvent,
    StationSlot,
    User,
)
from powerbank.storage.types import utcnow


@pytest.fixture(params=["embedded", "mosquitto"])
async def stack(request, tmp_path):
    if request.param == "mosquitto" and not broker_reachable():
        pytest.skip("Mosquitto is not listening on 127.0.0.1:1883")
    async with station_stack(tmp_path, broker=request.param) as stack:
        yield stack


@contextlib.asynccontextmanager
async def running_fleet(stack, n_stations=1, slots=4, banks=2, *, prefix=None, knobs=None):
    prefix = prefix or f"BR{uuid.uuid4().hex[:6].upper()}"
    specs = await provision_fleet(stack.sessions, n_stations, slots, banks, serial_prefix=prefix, settings=stack.settings)
    fleet = Fleet(specs, stack.broker_url, topics=stack.topics, knobs=knobs or FaultKnobs(resend_after_s=1.0))
    await fleet.start()
    try:
        yield fleet, specs
    finally:
        await fleet.stop()


async def eventually(check, timeout_s=10.0):
    """Poll an async check until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def station_row(stack, serial) -> Station:
    async with stack.sessions() as db:
        return (await db.execute(select(Station).where(Station.serial == serial))).scalar_one()


async def commands(stack, kind, name=None):
    async with stack.sessions() as db:
        query = select(ActorCommand).where(ActorCommand.kind == kind).order_by(ActorCommand.id)
        if name:
            query = query.where(ActorCommand.name == name)
        return list((await db.execute(query)).scalars())


async def test_boot_is_submitted_applied_and_acknowledged(stack):
    async with running_fleet(stack, n_stations=2) as (fleet, specs):
        await fleet.wait_acked()
        for sim in fleet:
            await sim.wait_until(lambda sim=sim: sim.config is not None)  # the outbox reached it
            assert 1 in sim.acked
            assert sim.config.heartbeat_interval_s == stack.settings.heartbeat_interval_s
        await stack.dispatcher.settle()
        for spec in specs:
            row = await station_row(stack, spec.serial)
            assert (row.status, row.firmware_version, row.last_event_seq) == ("online", "sim-1.0", 1)
            assert row.clock_offset_ms is not None and abs(row.clock_offset_ms) < 2000
        boots = await commands(stack, "station", "Boot")
        assert sorted(c.command_id.split(":")[1] for c in boots) == sorted(s.serial for s in specs)
        assert all(c.status == "applied" for c in boots)
        assert stack.bridge.acks_sent >= 2 and stack.bridge.malformed_count == 0


async def test_rent_over_mqtt_and_return_at_another_station(stack):
    await rent_and_return(stack)


@pytest.mark.postgres
async def test_rent_over_mqtt_and_return_on_postgres(tmp_path, postgres_url):
    async with station_stack(tmp_path, database_url=postgres_url) as stack:
        await rent_and_return(stack)


async def rent_and_return(stack):
    async with running_fleet(stack, n_stations=2, banks=2) as (fleet, specs):
        home, away = specs
        await fleet.wait_acked()
        await stack.dispatcher.settle()
        rental_id = str(uuid.uuid4())
        await stack.runtime.submit(
            "station", home.station_id, "ReserveAndEject", {"rental_id": rental_id, "user_id": "u"}, f"eject:{rental_id}"
        )
        home_sim = fleet.station(home.serial)
        await home_sim.wait_until(lambda: home_sim.handed_out)
        [bank_serial] = home_sim.handed_out
        [ejected] = await eventually(lambda: commands(stack, "rental", "BankEjected"))
        assert (ejected.entity_id, ejected.payload["power_bank_serial"]) == (rental_id, bank_serial)
        # The rider walks to the other station; the rental is open (the Rental actor would have
        # activated it on BankEjected, which this test does not run).
        await open_rental(stack, home.station_id, bank_serial)
        away_sim = fleet.station(away.serial)
        slot = await away_sim.insert_bank(bank_serial, charge=35)
        [returned] = await eventually(lambda: commands(stack, "rental", "BankReturned"))
        assert returned.payload["station_id"] == away.station_id
        await away_sim.wait_acked()
        async with stack.sessions() as db:
            bank = (await db.execute(select(PowerBank).where(PowerBank.serial == bank_serial))).scalar_one()
            slot_row = (
                await db.execute(
                    select(StationSlot).where(
                        StationSlot.station_id == uuid.UUID(away.station_id), StationSlot.slot_number == slot
                    )
                )
            ).scalar_one()
        assert (bank.status, str(bank.station_id), bank.charge_percent) == ("in_slot", away.station_id, 35)
        assert slot_row.power_bank_id == bank.id


async def open_rental(stack, station_id, bank_serial) -> str:
    async with stack.sessions.begin() as db:
        user = User(phone=f"+977{uuid.uuid4().int % 10**10:010d}", referral_code=uuid.uuid4().hex[:12])
        package = RentalPackage(
            code=uuid.uuid4().hex[:10], name="1h", duration_minutes=60, price_minor=10000, currency="NPR",
            max_duration_minutes=1440,
        )
        db.add_all([user, package])
        await db.flush()
        bank = (await db.execute(select(PowerBank).where(PowerBank.serial == bank_serial))).scalar_one()
        rental = Rental(
            user_id=user.id, station_id=uuid.UUID(station_id), package_id=package.id, power_bank_id=bank.id,
            status="active", currency="NPR", started_at=utcnow() - timedelta(minutes=30),
        )
        db.add(rental)
        await db.flush()
        return str(rental.id)


async def test_malformed_payloads_are_counted_answered_and_harmless(stack):
    async with running_fleet(stack) as (fleet, specs):
        sim = fleet.station(specs[0].serial)
        await sim.wait_acked()
        bad = [
            b"\xff\xfe not json",
            json.dumps({"type": "heartbeat", "v": 9, "seq": 50, "ts": 1}).encode(),
            json.dumps({"type": "battery", "v": 1, "seq": 51, "ts": 1, "slot": "one"}).encode(),
            b"{" + b" " * MAX_PAYLOAD_BYTES + b"}",
        ]
        for payload in bad:
            await sim.send_raw(payload)
        await sim.wait_until(lambda: len(sim.errors) == len(bad))
        assert sorted((e.reason, e.seq) for e in sim.errors) == sorted(
            [(MALFORMED_JSON, None), (UNSUPPORTED_VERSION, 50), (INVALID_MESSAGE, 51), (PAYLOAD_TOO_LARGE, None)]
        )
        assert stack.bridge.malformed_count == len(bad)
        # Nothing of it reached the actor, and the bridge carries on.
        assert all(seq not in (50, 51) for seq in sim.acked)
        slot = await sim.insert_bank("PB-AFTER-GARBAGE")
        await sim.wait_acked()
        assert slot in (3, 4)


async def test_last_will_marks_offline_and_a_reconnect_resends_what_was_not_acknowledged(stack):
    async with running_fleet(stack, knobs=FaultKnobs(resend_after_s=60)) as (fleet, specs):
        sim = fleet.station(specs[0].serial)
        await sim.wait_acked()
        sim.knobs.drop_rate = 1.0  # the next event is lost on the way
        await sim.insert_bank("PB-LOST-ONCE")
        assert len(sim.unacked) == 1
        sim.knobs.drop_rate = 0.0
        sim.disconnect_abruptly(reconnect_after_s=-1)  # power cut; stays down until reconnect()
        row = await eventually(
            lambda: _status_is(stack, specs[0].serial, "offline")
        )
        assert row.status == "offline"
        sim.reconnect()
        await sim.wait_acked()
        await stack.dispatcher.settle()
        row = await station_row(stack, specs[0].serial)
        assert row.status == "online"
        names = [c.name for c in await commands(stack, "station")]
        assert names.index("MarkOffline") < names.index("BankInserted") < names.index("Inventory")
        async with stack.sessions() as db:
            bank = (await db.execute(select(PowerBank).where(PowerBank.serial == "PB-LOST-ONCE"))).scalar_one()
        assert str(bank.station_id) == specs[0].station_id and sim.connections == 2


async def _status_is(stack, serial, status):
    row = await station_row(stack, serial)
    return row if row.status == status else None


async def test_one_stations_events_are_applied_in_the_order_sent(stack):
    async with running_fleet(stack, slots=1, banks=0) as (fleet, specs):
        sim = fleet.station(specs[0].serial)
        await sim.wait_acked()
        for round_ in range(10):
            await sim.insert_bank(f"PB-ORD-{round_}", slot=1)
            await sim.remove_bank(1)
        await sim.insert_bank("PB-ORD-LAST", slot=1)
        await sim.wait_acked()
        await stack.dispatcher.settle()
        events = [c for c in await commands(stack, "station") if c.name in ("BankInserted", "BankRemoved")]
        seqs = [c.payload["seq"] for c in events]
        assert seqs == sorted(seqs) and len(seqs) == 21
        async with stack.sessions() as db:
            slot = (await db.execute(select(StationSlot).where(StationSlot.station_id == uuid.UUID(specs[0].station_id)))).scalar_one()
            bank = await db.get(PowerBank, slot.power_bank_id)
            recorded = len(list((await db.execute(select(StationEvent))).scalars()))
        assert bank.serial == "PB-ORD-LAST" and recorded == 22  # boot + 21 slot events


async def test_an_unknown_station_is_told_so(stack):
    serial = f"GHOST{uuid.uuid4().hex[:6].upper()}"
    if stack.embedded is not None:  # only the bridge login may publish for a serial with no row
        url = f"mqtt://{stack.settings.bridge_username}:{stack.settings.bridge_password}@{stack.broker_url.split('://')[1]}"
    else:
        url = stack.broker_url
    client = await mqtt.connect(url, f"ghost-{uuid.uuid4().hex[:6]}")
    try:
        await client.subscribe([(stack.topics.errors(serial), 1)])
        await client.publish(
            stack.topics.events(serial), json.dumps({"type": "heartbeat", "v": 1, "seq": 3, "ts": 1}).encode(), qos=1
        )
        message = await client.deliver_message(timeout_duration=5)
        error = json.loads(message.data)
        assert (error["type"], error["reason"], error["seq"]) == ("error", UNKNOWN_STATION, 3)
    finally:
        await mqtt.close(client)
    assert await commands(stack, "station") == []


async def test_bridge_and_stations_reconnect_after_the_broker_restarts(tmp_path):
    async with station_stack(tmp_path) as stack:
        async with running_fleet(stack, knobs=FaultKnobs(resend_after_s=0.5)) as (fleet, specs):
            sim = fleet.station(specs[0].serial)
            await sim.wait_acked()
            port = stack.embedded.port
            await stack.embedded.stop()
            await eventually(lambda: _false_to_true(not stack.bridge.connected))
            stack.embedded = await start_embedded_broker(
                replace(stack.settings, mqtt_port=port), stack.sessions, topics=stack.topics
            )
            await stack.bridge.wait_connected(15)
            await sim.wait_until(lambda: sim.connected and sim.connections >= 2, 15)
            await sim.insert_bank("PB-AFTER-RESTART")
            await sim.wait_acked(15)
            assert stack.bridge.connections >= 2
        await stack.embedded.stop()


async def _false_to_true(value):
    return value


async def test_a_publish_only_bridge_delivers_the_outbox_and_takes_no_station_messages(stack):
    """The worker process's bridge: it publishes commands but leaves station topics alone."""
    publisher = StationBridge(stack.settings, stack.runtime, stack.sessions, url=stack.bridge.url,
                              topics=stack.topics, subscribe=False)
    await publisher.start(wait_s=10)
    try:
        stack.runtime.outbox_sink = publisher
        async with running_fleet(stack, banks=1) as (fleet, specs):
            sim = fleet.station(specs[0].serial)
            await sim.wait_acked()
            rental_id = str(uuid.uuid4())
            await stack.runtime.submit(
                "station", specs[0].station_id, "ReserveAndEject", {"rental_id": rental_id, "user_id": "u"},
                f"eject:{rental_id}",
            )
            await sim.wait_until(lambda: sim.handed_out)
            await sim.wait_acked()
        assert publisher.accepted == 0 and stack.bridge.accepted >= 2
    finally:
        stack.runtime.outbox_sink = stack.bridge
        await publisher.stop()


async def test_the_outbox_leaves_in_commit_order_per_station_and_stations_at_once(stack):
    """One publish at a time, each waiting for its PUBACK, held the single writer's pump for
    seconds per batch at fleet scale. Now each topic's rows go one after another (a station
    gets config before the eject committed after it) and different topics at once; a row
    that cannot be published stops its own topic and fails the batch (it stays unsent)."""
    bridge = StationBridge(stack.settings, stack.runtime, stack.sessions, url=stack.bridge.url, subscribe=False)
    bridge._connected.set()
    started, in_flight, most_in_flight = [], set(), [0]
    refuse = set()

    async def publish(topic, data):
        started.append((topic, json.loads(data)["n"]))
        in_flight.add(topic)
        most_in_flight[0] = max(most_in_flight[0], len(in_flight))
        assert len([t for t in in_flight if t == topic]) == 1
        await asyncio.sleep(0.01)
        in_flight.discard(topic)
        return json.loads(data)["n"] not in refuse

    bridge._publish = publish
    rows = [OutboxMessage(id=n, channel="mqtt", topic=f"pb/S{n % 3}/commands", payload={"n": n}) for n in range(12)]
    await bridge.deliver(rows)
    assert most_in_flight[0] == 3
    for station in range(3):
        assert [n for topic, n in started if topic == f"pb/S{station}/commands"] == list(range(station, 12, 3))
    started.clear()
    refuse.add(4)
    with pytest.raises(ConnectionError, match="4"):
        await bridge.deliver(rows)
    assert [n for topic, n in started if topic == "pb/S1/commands"] == [1, 4]  # 7 and 10 wait behind 4
    assert len(started) == 2 + 4 + 4


async def test_heartbeats_of_online_stations_are_applied_in_batches_and_acknowledged(stack):
    """Heartbeats of stations already online skip the mailbox queue: the bridge applies those
    arriving together in one transaction (Runtime.apply_idle_batch), still one applied command
    and one event row each, acknowledged once committed."""
    knobs = FaultKnobs(resend_after_s=1.0, charge_tick_s=0.05, charge_percent_per_minute=0)
    async with running_fleet(stack, n_stations=3, knobs=knobs) as (fleet, specs):
        for sim in fleet:
            await sim.wait_until(lambda sim=sim: sim.config is not None)
        await stack.dispatcher.settle()
        for sim in fleet:
            sim.heartbeat_interval_s = 0.1
        await eventually(lambda: _at_least(stack.bridge.heartbeats_batched, 9), timeout_s=15)
        for sim in fleet:
            sim.heartbeat_interval_s = 3600
        await asyncio.sleep(0.3)
        await stack.dispatcher.settle()
        beats = await commands(stack, "station", "Heartbeat")
        assert beats and all(c.status == "applied" for c in beats)
        async with stack.sessions() as db:
            recorded = {(str(s), q) for s, q in (await db.execute(
                select(StationEvent.station_id, StationEvent.seq).where(StationEvent.kind == "heartbeat"))).all()}
        by_serial = {spec.serial: spec.station_id for spec in specs}
        assert recorded == {(by_serial[c.payload["serial"]], c.payload["seq"]) for c in beats}
        for sim in fleet:
            row = await station_row(stack, sim.serial)
            assert row.status == "online" and row.last_event_seq == sim.seq and row.last_heartbeat_at is not None
            assert {c.payload["seq"] for c in beats if c.payload["serial"] == sim.serial} <= sim.acked


async def _at_least(value, wanted):
    return value >= wanted

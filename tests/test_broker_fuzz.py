"""Acceptance 3 of issue 4: malformed input from authenticated stations and from clients that
never logged in, on the embedded broker and on Mosquitto. Broker and bridge stay up, the
database does not change, and every rejected message is counted (and answered on the
station's error topic) or, for a refused login, counted by reason.

The payloads come from a seeded generator of the ways a payload can be wrong (bytes that are
not JSON, JSON that is not an object, wrong types, missing fields, values out of range,
inconsistent inventories, unknown versions and types, oversized, deeply nested); each is
checked to be one the protocol rejects, so the expected count per reason is known up front.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import uuid

import pytest
from amqtt.errors import ConnectError
from sqlalchemy import select

from powerbank.broker import mqtt
from powerbank.broker.bridge import MESSAGES_REJECTED
from powerbank.broker.embedded import (
    REFUSED_ANONYMOUS,
    REFUSED_BAD_CLIENT_ID,
    REFUSED_BRIDGE_PASSWORD,
    REFUSED_FOREIGN_WILL,
    REFUSED_UNKNOWN_STATION,
    REFUSED_WRONG_PASSWORD,
)
from powerbank.broker.protocol import (
    MAX_PAYLOAD_BYTES,
    UNKNOWN_TOPIC,
    Rejection,
    decode_event,
    decode_status,
)
from powerbank.broker.testing import broker_reachable, station_stack
from powerbank.simulators.stations import FaultKnobs, Fleet, provision_fleet
from powerbank.storage.models import Base

STATION_PAYLOADS = 10_000
FUZZ_STATIONS = 8
ANONYMOUS_PAYLOADS = 1_000  # Mosquitto lets anonymous clients publish; the bridge must cope
GARBAGE_CONNECTIONS = 100
ANSWER_WINDOW = 16  # per station: payloads sent and not yet answered

VALID_EVENTS = [
    {"type": "heartbeat", "v": 1, "seq": 5, "ts": 1_700_000_000_000, "uptime_s": 10},
    {"type": "bank_inserted", "v": 1, "seq": 6, "ts": 1_700_000_000_000, "slot": 1, "bank": "PB-1", "charge": 50},
    {"type": "bank_removed", "v": 1, "seq": 7, "ts": 1_700_000_000_000, "slot": 2, "bank": "PB-2"},
    {"type": "battery", "v": 1, "seq": 8, "ts": 1_700_000_000_000, "slot": 1, "bank": "PB-1", "charge": 60},
    {"type": "slot_fault", "v": 1, "seq": 9, "ts": 1_700_000_000_000, "slot": 3, "code": "latch"},
    {"type": "eject_ack", "v": 1, "seq": 10, "ts": 1_700_000_000_000, "command_id": "c-1", "slot": 1, "bank": "PB-1", "code": "ok"},
    {"type": "inventory", "v": 1, "seq": 11, "ts": 1_700_000_000_000, "slot_count": 2,
     "slots": [{"slot": 1, "bank": "PB-1", "charge": 50}, {"slot": 2}]},
    {"type": "boot", "v": 1, "seq": 12, "ts": 1_700_000_000_000, "firmware": "1", "hardware": "h", "slot_count": 2,
     "slots": [{"slot": 1, "bank": "PB-1", "charge": 50}, {"slot": 2}]},
]
WRONG_VALUES = ["5", 5.5, True, None, [], {}, -1, 0, 2**70, "", "x" * 40, "a/b", "#"]


# --- the generator ------------------------------------------------------------------------------


def random_bytes(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))


def truncated(rng: random.Random) -> bytes:
    text = json.dumps(rng.choice(VALID_EVENTS)).encode()
    return text[: rng.randint(0, len(text) - 1)]


def not_an_object(rng: random.Random) -> bytes:
    return json.dumps(rng.choice([1, -2.5, "heartbeat", None, True, [1, 2], [VALID_EVENTS[0]]])).encode()


def wrong_field(rng: random.Random) -> bytes:
    event = dict(rng.choice(VALID_EVENTS))
    event[rng.choice([k for k in event if k != "type"])] = rng.choice(WRONG_VALUES)
    return json.dumps(event).encode()


def missing_field(rng: random.Random) -> bytes:
    event = dict(rng.choice(VALID_EVENTS))
    del event[rng.choice(list(event))]
    return json.dumps(event).encode()


def wrong_version_or_type(rng: random.Random) -> bytes:
    event = dict(rng.choice(VALID_EVENTS))
    if rng.random() < 0.5:
        event["v"] = rng.choice([0, 2, "1", 1.0, None, True, -1, 99])
    else:
        event["type"] = rng.choice(["reboot", "", "HEARTBEAT", "eject", "ack", 7, None, "config"])
    return json.dumps(event).encode()


def bad_inventory(rng: random.Random) -> bytes:
    event = dict(rng.choice(VALID_EVENTS[-2:]))
    event["slots"] = rng.choice([
        [{"slot": 1}, {"slot": 1}],  # a slot twice
        [{"slot": 1, "bank": "PB-1", "charge": 5}, {"slot": 2, "bank": "PB-1", "charge": 5}],  # a bank twice
        [{"slot": 1, "bank": "PB-1"}],  # a bank without its charge
        [{"slot": 3}],  # beyond slot_count
        [{"slot": n} for n in range(1, 70)],  # more than 64 slots
        "all of them",
    ])
    return json.dumps(event).encode()


def oversized(rng: random.Random) -> bytes:
    event = dict(VALID_EVENTS[0], padding="x" * (MAX_PAYLOAD_BYTES + rng.randint(1, 5000)))
    return json.dumps(event).encode()


def odd_json(rng: random.Random) -> bytes:
    return rng.choice([
        b"[" * 3000 + b"]" * 3000,  # deep nesting, still under the size limit
        b'{"type": "heartbeat", "v": 1, "seq": NaN, "ts": 1}',
        b'{"type": "heartbeat", "v": 1, "seq": 1e400, "ts": 1}',
        b'{"type": "heartbeat", "v": 1, "seq": 1, "ts": Infinity}',
        b'\xef\xbb\xbf{"type": "heartbeat", "v": 1, "seq": 1, "ts": 1}',  # a byte-order mark
        '{"type": "heartbeat", "v": 1, "seq": 1, "ts": 1, "bank": "\ud800"}'.encode("utf-8", "surrogatepass"),
        b"",
        b"\x00" * 64,
    ])


GENERATORS = [random_bytes, truncated, not_an_object, wrong_field, missing_field, wrong_version_or_type,
              bad_inventory, oversized, odd_json]


def malformed_payloads(count: int, seed: int) -> list[bytes]:
    """`count` payloads the protocol must reject (anything that happens to decode is drawn again)."""
    rng = random.Random(seed)
    payloads: list[bytes] = []
    while len(payloads) < count:
        payload = rng.choice(GENERATORS)(rng)
        if isinstance(decode_event(payload), Rejection):
            payloads.append(payload)
    return payloads


def expected_reason(topics, topic: str, payload: bytes) -> str:
    parsed = topics.parse(topic)
    if parsed is None:
        return UNKNOWN_TOPIC
    decoded = decode_event(payload) if parsed[1] == "events" else decode_status(payload)
    assert isinstance(decoded, Rejection)
    return decoded.reason


# --- the run ------------------------------------------------------------------------------------


@pytest.fixture(params=["embedded", "mosquitto"])
async def stack(request, tmp_path):
    if request.param == "mosquitto" and not broker_reachable():
        pytest.skip("Mosquitto is not listening on 127.0.0.1:1883")
    async with station_stack(tmp_path, broker=request.param) as stack:
        stack.specs = await provision_fleet(stack.sessions, FUZZ_STATIONS + 1, 2, 1, serial_prefix=f"FZ{uuid.uuid4().hex[:4].upper()}")
        yield stack


def station_url(stack, serial: str, password: str) -> str:
    return f"mqtt://{serial}:{password}@{stack.broker_url.split('://', 1)[1]}"


async def database_snapshot(stack) -> dict[str, list[str]]:
    """Every row of every table, as text, in a stable order."""
    snapshot = {}
    async with stack.sessions() as db:
        for table in Base.metadata.sorted_tables:
            rows = (await db.execute(select(table))).all()
            snapshot[table.name] = sorted(repr(tuple(row)) for row in rows)
    return snapshot


def rejected_metric_total() -> float:
    return sum(sample.value for metric in MESSAGES_REJECTED.collect() for sample in metric.samples
               if sample.name.endswith("_total"))


async def test_malformed_input_is_rejected_counted_answered_and_changes_nothing(stack):
    before = await database_snapshot(stack)
    metric_before = rejected_metric_total()
    stations = stack.specs[:FUZZ_STATIONS]
    payloads = malformed_payloads(STATION_PAYLOADS, seed=11)
    expected = collections.Counter(decode_event(p).reason for p in payloads)

    answered = await publish_as_stations(stack, stations, payloads)
    if stack.embedded is not None:
        expected_refusals = await refused_logins(stack)
        assert stack.embedded.authority.refusals == expected_refusals
    else:
        expected += await publish_anonymously(stack)
    await send_garbage_connections(stack)
    await wait_for(lambda: sum(stack.bridge.rejected.values()) >= sum(expected.values()))

    assert stack.bridge.rejected == expected  # every one counted, under its reason
    assert rejected_metric_total() - metric_before == sum(expected.values())
    assert sum(answered.values()) == STATION_PAYLOADS  # every station payload answered
    assert stack.bridge.accepted == 0
    await stack.dispatcher.settle()
    assert await database_snapshot(stack) == before
    await still_serving(stack)


async def publish_as_stations(stack, stations, payloads) -> collections.Counter:
    """Each station publishes its share from its own login, QoS 1, with at most
    `ANSWER_WINDOW` payloads not yet answered by an error, and checks every answer (they come
    back in order: one lane per station). Unpaced, eight publishers outrun the bridge and
    Mosquitto drops what it cannot queue for it (`max_queued_messages`, 1000 by default;
    see docs/station-protocol.md). Returns the errors each station received."""
    answered: collections.Counter[str] = collections.Counter()
    inboxes = {s.serial: asyncio.Queue() for s in stations}
    clients = [await mqtt.connect(station_url(stack, s.serial, s.password), s.serial) for s in stations]
    readers = []
    try:
        for spec, client in zip(stations, clients):
            assert await client.subscribe([(stack.topics.errors(spec.serial), 1)]) == [1]
            readers.append(asyncio.create_task(collect_errors(client, inboxes[spec.serial])))

        async def publish_share(index: int) -> None:
            spec, client = stations[index], clients[index]
            share = payloads[index::len(stations)]
            window = asyncio.Semaphore(ANSWER_WINDOW)

            async def check_answers() -> None:
                for payload in share:
                    error = await asyncio.wait_for(inboxes[spec.serial].get(), 20)
                    assert error["type"] == "error" and error["reason"] == decode_event(payload).reason
                    answered[spec.serial] += 1
                    window.release()

            checker = asyncio.create_task(check_answers())
            for payload in share:
                await window.acquire()
                await client.publish(stack.topics.events(spec.serial), payload, qos=1)
            await checker

        await asyncio.gather(*(publish_share(i) for i in range(len(stations))))
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(mqtt.close(c) for c in clients))
    return answered


async def collect_errors(client, inbox: asyncio.Queue) -> None:
    async for _, payload in mqtt.messages(client):
        inbox.put_nowait(json.loads(payload))


async def refused_logins(stack) -> collections.Counter:
    """Clients that try to log in without the right credentials, every way we know; returns
    the refusals the broker must have counted. A station serial kept offline is used for the
    wrong passwords: amqtt drops a connected session with the same client id before it checks
    the newcomer (docs/station-protocol.md, known limitation)."""
    target = stack.specs[FUZZ_STATIONS]
    host = stack.broker_url.split("://", 1)[1]
    rng = random.Random(5)
    attempts = []
    for n in range(40):
        attempts.append((REFUSED_WRONG_PASSWORD, f"mqtt://{target.serial}:wrong{n % 8}@{host}", target.serial, None))
        attempts.append((REFUSED_ANONYMOUS, f"mqtt://{host}", f"anon-{n}", None))
        ghost = f"GHOST-{rng.randrange(10**6)}"
        attempts.append((REFUSED_UNKNOWN_STATION, f"mqtt://{ghost}:{target.password}@{host}", ghost, None))
        attempts.append((REFUSED_BAD_CLIENT_ID, f"mqtt://{target.serial}:{target.password}@{host}", f"other-{n}", None))
        attempts.append((REFUSED_BAD_CLIENT_ID, f"mqtt://bad%2Fserial:{target.password}@{host}", "bad/serial", None))
        attempts.append((REFUSED_BRIDGE_PASSWORD, f"mqtt://{stack.settings.bridge_username}:nope@{host}", f"br-{n}", None))
        will = (stack.topics.status(stack.specs[0].serial), '{"type":"offline"}')
        attempts.append((REFUSED_FOREIGN_WILL, f"mqtt://{target.serial}:{target.password}@{host}", target.serial, will))
    refusals: collections.Counter[str] = collections.Counter()
    for reason, url, client_id, will in attempts:
        with pytest.raises(ConnectError):
            client = await mqtt.connect(url, client_id, will=will)
            await mqtt.close(client)
        refusals[reason] += 1
    return refusals


async def publish_anonymously(stack) -> collections.Counter:
    """On the machine's Mosquitto anyone may publish: garbage under station topics (of stations
    that exist, that do not, and topic levels that are not serials at all)."""
    payloads = malformed_payloads(ANONYMOUS_PAYLOADS, seed=12)
    rng = random.Random(13)
    base = stack.topics.base
    # All within the bridge's subscriptions (base/+/events, base/+/status): the last three have
    # levels that are no serial, which only the bridge can tell.
    topics = [stack.topics.events(stack.specs[0].serial), stack.topics.status(stack.specs[1].serial),
              stack.topics.events("NOBODY-1"), f"{base}/not a serial/events", f"{base}/-dash/status",
              f"{base}/{'x' * 40}/events"]
    expected: collections.Counter[str] = collections.Counter()
    already = sum(stack.bridge.rejected.values())
    client = await mqtt.connect(stack.broker_url, f"anon-{uuid.uuid4().hex[:6]}")
    try:
        for sent, payload in enumerate(payloads, start=1):
            topic = rng.choice(topics)
            await client.publish(topic, payload, qos=1)
            expected[expected_reason(stack.topics, topic, payload)] += 1
            if sent % 100 == 0:  # paced, so the broker never has to drop (see publish_as_stations)
                await wait_for(lambda: sum(stack.bridge.rejected.values()) >= already + sent - 100)
    finally:
        await mqtt.close(client)
    return expected


async def send_garbage_connections(stack) -> None:
    """TCP clients that do not speak MQTT, or speak it wrong: random bytes, a CONNECT with a
    bad protocol level or a lying length, a PUBLISH before any CONNECT."""
    host, port = stack.broker_url.split("://", 1)[1].split(":")
    rng = random.Random(17)
    shapes = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))),
        lambda: b"\x10\x0c\x00\x04MQTT\x09\x02\x00\x3c\x00\x00",  # protocol level 9
        lambda: b"\x10\xff\xff\xff\x7f" + b"x" * 50,  # remaining length far beyond what follows
        lambda: b"\x30\x0a\x00\x03a/bhello",  # PUBLISH before CONNECT
        lambda: b"\x10",  # half a header, then gone
    ]
    for _ in range(GARBAGE_CONNECTIONS):
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            continue
        try:
            writer.write(rng.choice(shapes)())
            await writer.drain()
            await asyncio.wait_for(reader.read(100), 0.05)
        except (OSError, asyncio.TimeoutError, TimeoutError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


async def still_serving(stack) -> None:
    """A station that behaves is still heard and answered after all that."""
    spec = stack.specs[0]
    fleet = Fleet([spec], stack.broker_url, topics=stack.topics, knobs=FaultKnobs(resend_after_s=0.5))
    await fleet.start()
    try:
        station = fleet.station(spec.serial)
        await station.wait_acked()
        await station.insert_bank("PB-AFTER-FUZZ")
        await station.wait_acked()
        assert stack.bridge.connected and stack.bridge.accepted >= 2
    finally:
        await fleet.stop()


async def wait_for(predicate, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.05)


def test_the_generator_covers_every_way_a_payload_can_be_wrong():
    reasons = collections.Counter(decode_event(p).reason for p in malformed_payloads(2_000, seed=1))
    assert set(reasons) == {"malformed_json", "invalid_message", "unsupported_version", "unknown_type", "payload_too_large"}
    assert min(reasons.values()) >= 50

"""The bridge between MQTT and the Station actors, for the embedded broker or an external one.

Inbound: every station message becomes one Station-actor command. The station's event is
acknowledged (`{"type": "ack", "seq": n}` on its commands topic) only after `runtime.submit`
returned, i.e. once the command is durable; amqtt (and any broker) has already PUBACKed the
QoS 1 PUBLISH before anyone looked at it, so this application ack is what tells a station it
may forget an event. A station re-sends unacknowledged events, and (station, seq) makes every
re-send harmless.

Ordering: amqtt hands all messages to one reader loop. Each station gets its own lane (a FIFO
and a task) so one station's messages are applied in arrival order while different stations
proceed concurrently; an idle lane ends and is re-created on the next message.

Outbound: the bridge is the runtime's OutboxSink. Rows committed by actors (config, eject) are
published with QoS 1 after commit; `deliver` raises when it cannot publish so the rows stay
unsent and are delivered by the next flush.

Malformed payloads are counted (attribute `rejected` and a Prometheus counter), answered on the
station's errors topic and otherwise dropped; nothing a station sends can stop the bridge.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import msgspec
from amqtt.client import MQTTClient
from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.actors.runtime import Runtime
from powerbank.broker import mqtt
from powerbank.actors.mailbox import Envelope
from powerbank.broker.batching import BatchedCalls, BatchedLookup
from powerbank.broker.protocol import (
    UNKNOWN_STATION,
    UNKNOWN_TOPIC,
    Ack,
    AnyStationEvent,
    Boot,
    Offline,
    Rejection,
    Topics,
    decode_event,
    decode_status,
    encode,
)
from powerbank.config import Settings
from powerbank.storage.models import OutboxMessage, Station
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

MESSAGES_ACCEPTED = Counter(
    "powerbank_mqtt_messages_accepted_total", "Station messages submitted to the Station actor", ["type"]
)
MESSAGES_REJECTED = Counter(
    "powerbank_mqtt_messages_rejected_total", "Station payloads rejected by the bridge", ["reason"]
)

COMMAND_NAMES = {
    "boot": "Boot",
    "inventory": "Inventory",
    "heartbeat": "Heartbeat",
    "bank_inserted": "BankInserted",
    "bank_removed": "BankRemoved",
    "battery": "Battery",
    "slot_fault": "SlotFault",
    "eject_ack": "EjectAck",
    "offline": "MarkOffline",
}
UNKNOWN_STATION_RECHECK_S = 5.0
_json = msgspec.json.Encoder()


def bridge_url(settings: Settings) -> str:
    """settings.mqtt_url for an external broker, else the embedded one with the bridge login."""
    if settings.mqtt_url:
        return settings.mqtt_url
    user, password = quote(settings.bridge_username, safe=""), quote(settings.bridge_password, safe="")
    return f"mqtt://{user}:{password}@{settings.mqtt_host}:{settings.mqtt_port}"


@dataclass(frozen=True)
class Submission:
    """One station message as a Station-actor command."""

    name: str
    payload: dict[str, Any]
    command_id: str
    ack_seq: int | None  # the seq to acknowledge once the command is durable


def submission_for(serial: str, message: AnyStationEvent | Offline, received_at: datetime) -> Submission:
    """Map a decoded message to its command. Events are idempotent by (station, seq). A boot's
    id also carries its timestamp: boots are never re-sent, and a station that lost its seq
    counter must still be heard so the config reply can tell it where to continue."""
    payload = {**msgspec.to_builtins(message), "serial": serial, "received_at": received_at.isoformat()}
    kind = payload["type"]
    if isinstance(message, Offline):
        # No seq on a last will; the broker sends it once per dead connection.
        return Submission(COMMAND_NAMES[kind], {**payload, "reason": "last_will"}, f"offline:{serial}:{uuid.uuid4().hex}", None)
    if isinstance(message, Boot):
        command_id = f"boot:{serial}:{message.seq}:{message.ts}"
    else:
        command_id = f"evt:{serial}:{message.seq}"
    return Submission(COMMAND_NAMES[kind], payload, command_id, message.seq)


@dataclass
class _Lane:
    """One station's pending messages, applied in arrival order by one task."""

    items: collections.deque = field(default_factory=collections.deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class StationBridge:
    """MQTT client that feeds the Station actors and delivers their outbox."""

    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        sessions: async_sessionmaker[AsyncSession],
        *,
        url: str | None = None,
        topics: Topics | None = None,
        client_id: str | None = None,
        subscribe: bool = True,
        reconnect_max_s: float = 5.0,
        lane_idle_s: float = 30.0,
        submit_attempts: int = 5,
        publish_timeout_s: float = 10.0,
        deliver_wait_s: float = 5.0,
        deliver_concurrency: int = 256,
        readonly: async_sessionmaker[AsyncSession] | None = None,
        batch_heartbeats: bool = True,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.sessions = sessions
        # Station lookups only read: on SQLite a read-only session does not queue for the one
        # writer connection behind every actor's transaction.
        self.readonly = readonly or sessions
        self.url = url or bridge_url(settings)
        self.topics = topics or Topics.from_env()
        self.client_id = client_id or f"{settings.bridge_username}-{uuid.uuid4().hex[:8]}"
        # False: a publish-only bridge (a worker process delivering the outbox) that leaves the
        # station topics to the mqtt process's bridge.
        self.subscribe = subscribe
        self.reconnect_max_s = reconnect_max_s
        self.lane_idle_s = lane_idle_s
        self.submit_attempts = submit_attempts
        self.publish_timeout_s = publish_timeout_s
        self.deliver_wait_s = deliver_wait_s
        # Outbox publishes in flight at once (each waits for its PUBACK).
        self.deliver_concurrency = deliver_concurrency
        # Observable counters (also exported to Prometheus).
        self.rejected: collections.Counter[str] = collections.Counter()
        self.accepted = 0
        self.acks_sent = 0
        self.seq_conflicts = 0
        self.connections = 0
        self._client: MQTTClient | None = None
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task | None = None
        self._outbox_pump: asyncio.Task | None = None
        self._lanes: dict[str, _Lane] = {}
        self._station_ids: dict[str, str] = {}
        self._id_lookup: BatchedLookup[str, str] = BatchedLookup(self._station_ids_of)
        self._unknown_until: dict[str, float] = {}
        self._stopping = False
        # Heartbeats of idle online stations, applied many per transaction (`_apply_heartbeats`).
        self.batch_heartbeats = batch_heartbeats
        self._heartbeats: BatchedCalls[tuple[str, Submission], bool] = BatchedCalls(self._apply_heartbeats)
        self.heartbeats_batched = 0

    @property
    def malformed_count(self) -> int:
        return sum(self.rejected.values())

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, *, wait_s: float | None = 10.0, pump_outbox_every_s: float | None = None) -> None:
        """Connect (and keep reconnecting) in the background. With `wait_s`, wait until the first
        connection is up or raise TimeoutError. With `pump_outbox_every_s`, also flush the
        runtime's outbox periodically (for processes where actors commit in another process;
        the runtime's outbox_sink must be this bridge)."""
        self._stopping = False
        self._supervisor = asyncio.create_task(self._run(), name="station-bridge")
        if pump_outbox_every_s:
            self._outbox_pump = asyncio.create_task(self._pump_outbox(pump_outbox_every_s), name="outbox-pump")
        if wait_s:
            await self.wait_connected(wait_s)

    async def wait_connected(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._supervisor, self._outbox_pump) if t is not None]
        tasks += [lane.task for lane in self._lanes.values() if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._heartbeats.close()
        self._lanes.clear()
        self._supervisor = self._outbox_pump = None

    async def _run(self) -> None:
        delay_s = 0.1
        while not self._stopping:
            client = None
            try:
                client = await mqtt.connect(self.url, self.client_id)
                if self.subscribe:
                    codes = await client.subscribe(
                        [(self.topics.events_filter, mqtt.QOS_1), (self.topics.status_filter, mqtt.QOS_1)]
                    )
                    if any(code not in (0, 1, 2) for code in codes):
                        raise ConnectionError(f"subscription refused by the broker: {codes}")
                self._client = client
                self.connections += 1
                self._connected.set()
                delay_s = 0.1
                log.info("bridge connected to %s as %s", _without_password(self.url), self.client_id)
                await self._read(client)
                log.warning("bridge lost its MQTT connection; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("bridge cannot connect to %s: %r", _without_password(self.url), exc)
            finally:
                self._connected.clear()
                self._client = None
                await mqtt.close(client)
            if not self._stopping:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, self.reconnect_max_s)

    async def _read(self, client: MQTTClient) -> None:
        """Hand every message to its station's lane until the connection is gone."""
        async for topic, payload in mqtt.messages(client):
            self._dispatch(topic, payload, utcnow())

    # --- inbound ------------------------------------------------------------------------------

    def _dispatch(self, topic: str, data: bytes, received_at: datetime) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None:
            self._count(Rejection(UNKNOWN_TOPIC, topic))
            return
        serial, channel = parsed
        lane = self._lanes.get(serial)
        if lane is None:
            lane = self._lanes[serial] = _Lane()
            lane.task = asyncio.create_task(self._run_lane(serial, lane), name=f"lane-{serial}")
        lane.items.append((channel, data, received_at))
        lane.wakeup.set()

    async def _run_lane(self, serial: str, lane: _Lane) -> None:
        while True:
            while lane.items:
                channel, data, received_at = lane.items.popleft()
                try:
                    await self.handle(serial, channel, data, received_at)
                except Exception:  # one bad message must not stop the station's lane
                    log.exception("bridge failed on a message of %s", serial)
            lane.wakeup.clear()
            try:
                await asyncio.wait_for(lane.wakeup.wait(), self.lane_idle_s)
            except TimeoutError:
                if not lane.items:  # nothing arrived meanwhile: end; the next message starts anew
                    if self._lanes.get(serial) is lane:
                        del self._lanes[serial]
                    return

    async def handle(self, serial: str, channel: str, data: bytes, received_at: datetime) -> None:
        """Decode one station payload, submit it as a command, acknowledge it once durable."""
        if channel == "events":
            message = decode_event(data)
        elif channel == "status":
            message = decode_status(data)
        else:
            return
        if isinstance(message, Rejection):
            await self._reject(serial, message)
            return
        station_id = await self._station_id(serial)
        if station_id is None:
            await self._reject(serial, Rejection(UNKNOWN_STATION, serial, getattr(message, "seq", None)))
            return
        submission = submission_for(serial, message, received_at)
        if not await self._applied_at_once(station_id, submission) and not await self._submit(station_id, submission):
            return  # not durable, so no ack: the station re-sends it
        self.accepted += 1
        MESSAGES_ACCEPTED.labels(submission.payload["type"]).inc()
        if submission.ack_seq is not None:
            if await self._publish(self.topics.commands(serial), encode(Ack(seq=submission.ack_seq))):
                self.acks_sent += 1

    async def _applied_at_once(self, station_id: str, submission: Submission) -> bool:
        """A heartbeat of an online station with nothing pending is applied with the others
        that arrive meanwhile, in one transaction (`Runtime.apply_idle_batch`); True when it
        was. Any other, or on any error, goes through the mailbox as usual (False)."""
        if not self.batch_heartbeats or submission.name != "Heartbeat":
            return False
        try:
            return await self._heartbeats.run((station_id, submission))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("batched heartbeats failed, sending them to the mailbox: %r", exc)
            return False

    async def _apply_heartbeats(self, items: list[tuple[str, Submission]]) -> list[bool]:
        envelopes = [Envelope("station", station_id, s.name, s.payload, s.command_id) for station_id, s in items]
        results = await self.runtime.apply_idle_batch("station", "Heartbeat", envelopes)
        applied = [result is not None for result in results]
        self.heartbeats_batched += sum(applied)
        return applied

    async def _submit(self, station_id: str, submission: Submission) -> bool:
        for attempt in range(self.submit_attempts):
            try:
                await self.runtime.submit(
                    "station", station_id, submission.name, submission.payload, submission.command_id
                )
                return True
            except ValueError as exc:
                # The station reused a seq for a different message (it lost its counter).
                # Acknowledge so it moves on; its next boot's config carries last_seq.
                self.seq_conflicts += 1
                log.warning("station %s: %s", submission.payload.get("serial"), exc)
                return True
            except Exception as exc:
                log.warning("submit of %s failed (attempt %d): %r", submission.command_id, attempt + 1, exc)
                await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
        return False

    async def _reject(self, serial: str, rejection: Rejection) -> None:
        self._count(rejection)
        log.info("rejected payload from %s: %s %s", serial, rejection.reason, rejection.detail)
        await self._publish(self.topics.errors(serial), encode(rejection.as_error()))

    def _count(self, rejection: Rejection) -> None:
        self.rejected[rejection.reason] += 1
        MESSAGES_REJECTED.labels(rejection.reason).inc()

    async def _station_id(self, serial: str) -> str | None:
        cached = self._station_ids.get(serial)
        if cached is not None:
            return cached
        if self._unknown_until.get(serial, 0.0) > time.monotonic():
            return None
        found = await self._id_lookup.get(serial)
        if found is None:
            self._unknown_until[serial] = time.monotonic() + UNKNOWN_STATION_RECHECK_S
            return None
        self._station_ids[serial] = found
        return found

    async def _station_ids_of(self, serials: list[str]) -> dict[str, str]:
        """Many stations' ids in one query: the first messages of a boot storm ask together."""
        async with self.readonly() as db:
            rows = await db.execute(select(Station.serial, Station.id).where(Station.serial.in_(serials)))
            return {serial: str(station_id) for serial, station_id in rows.all()}

    # --- outbound -----------------------------------------------------------------------------

    async def _publish(self, topic: str, data: bytes) -> bool:
        client = self._client
        if client is None or not self._connected.is_set():
            return False
        try:
            await asyncio.wait_for(client.publish(topic, data, qos=mqtt.QOS_1), self.publish_timeout_s)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("publish to %s failed: %r", topic, exc)
            return False

    async def deliver(self, messages: list[OutboxMessage]) -> None:
        """The runtime's OutboxSink: publish committed outbox rows (topic + JSON, QoS 1), in
        order per topic (per station), different topics at once.

        One at a time, each publish waited for its PUBACK before the next left, and the single
        writer's pump waits for delivery after every commit: at 3,000 booting stations a batch
        of configs took seconds to deliver while boots queued behind it (`powerbank bench
        stations`). A station's messages still leave in commit order: its topic's rows go one
        after another. Raises when any row could not be published; the runtime then leaves the
        whole batch unsent and publishes it again (receivers dedupe by command id)."""
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), self.deliver_wait_s)
            except TimeoutError:
                raise ConnectionError("MQTT bridge not connected; outbox rows stay unsent") from None
        gate = asyncio.Semaphore(self.deliver_concurrency)
        failed = await asyncio.gather(*(self._deliver_in_order(rows, gate) for rows in _by_topic(messages)))
        unsent = [message_id for ids in failed for message_id in ids]
        if unsent:
            raise ConnectionError(f"could not publish outbox rows {unsent[:10]} ({len(unsent)} in all)")

    async def _deliver_in_order(self, rows: list[OutboxMessage], gate: asyncio.Semaphore) -> list[int]:
        """One topic's rows, one after another; stops at the first failure (so none overtakes
        it) and returns the ids left unpublished."""
        for index, message in enumerate(rows):
            async with gate:
                published = await self._publish(message.topic, _json.encode(message.payload))
            if not published:
                return [row.id for row in rows[index:]]
        return []

    async def _pump_outbox(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            if not self._connected.is_set():
                continue
            try:
                while await self.runtime.flush_outbox():
                    pass
            except Exception as exc:
                log.warning("outbox flush failed: %r", exc)


def _by_topic(messages: list[OutboxMessage]) -> list[list[OutboxMessage]]:
    """The rows grouped by topic, each group in the given (commit) order."""
    groups: dict[str, list[OutboxMessage]] = {}
    for message in messages:
        groups.setdefault(message.topic, []).append(message)
    return list(groups.values())


def _without_password(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"

"""The embedded MQTT broker (amqtt) with station authentication and topic ACLs.

Who may connect:
- a station: username = its serial = its MQTT client id, password checked against the argon2
  hash in `stations.mqtt_password_hash`; if it sets a last will, the will topic must be its own
  `.../status` (amqtt publishes wills without asking the ACL plugin, so the check happens here);
- the bridge: `settings.bridge_username` / `settings.bridge_password`;
- nobody anonymously.

What they may do (the ACL plugin):
- a station publishes only to its own `.../events` and `.../status`, subscribes to (and
  receives) only its own `.../commands` and `.../errors`, with no wildcards;
- the bridge may do everything.

amqtt loads plugins by dotted class path and builds their config from a dict, so the plugins
cannot be handed live objects. Each started broker registers a `BrokerAuthority` (settings,
database sessions, caches) under a random key and passes only the key in the plugin config.

Known amqtt limitation (documented in docs/station-protocol.md): amqtt removes an existing
session with the same client id before it authenticates the newcomer, so a client that knows a
station's serial can knock that station off (not impersonate it). Production deployments that
worry about this run Mosquitto or EMQX with an equivalent ACL; the bridge works with both.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import secrets
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import Broker
from prometheus_client import Counter
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.broker.batching import BatchedLookup
from powerbank.broker.mqtt import no_delay
from powerbank.broker.protocol import (
    STATION_PUBLISHES,
    STATION_SUBSCRIBES,
    Topics,
    is_valid_serial,
)
from powerbank.config import Settings
from powerbank.storage.models import Station

log = logging.getLogger(__name__)

# Station passwords are 192-bit random tokens issued by us, never chosen by people. A slow
# hash (argon2, bcrypt) protects low-entropy secrets from guessing; against 2**192 candidates
# a salted SHA-256 is already out of reach, as for API tokens. What a slow hash would cost is
# real: argon2 at OWASP's minimum took 27 ms of CPU per login here, so 10,000 stations
# reconnecting after a broker restart meant 270 CPU-seconds of logins (minutes on two cores,
# with logins timing out and retrying meanwhile). Hashes stored by earlier versions (argon2)
# are still verified.
STATION_HASH_SCHEME = "sha256"
LEGACY_HASHER = PasswordHasher()
STATION_PASSWORD_BYTES = 24
HASH_CACHE_TTL_S = 30.0
REFUSAL_CACHE_TTL_S = 5.0
VERIFIED_CACHE_SIZE = 50_000

# Admission: a station's login waits while this many messages are on their way to the bridge
# (fanned out and not yet acknowledged by it, or not yet fanned out), for at most
# ADMISSION_WAIT_MAX_S; then it is refused and the station tries again later (see `Admission`).
ADMISSION_BACKLOG_MAX = 400
# ... and while more than this many commands wait in the mailboxes of a single writer (the
# embedded default), each login being about one boot to apply: see `Admission`.
ADMISSION_MAILBOX_MAX = 1000
ADMISSION_WAIT_MAX_S = 3.0
ADMISSION_TICK_S = 0.05
ADMISSIONS_PER_TICK_MAX = 50

LOGINS_REFUSED = Counter(
    "powerbank_mqtt_logins_refused_total", "MQTT logins the embedded broker refused", ["reason"]
)
# Why a login was refused (the `reason` label).
REFUSED_ANONYMOUS = "anonymous"
REFUSED_BAD_CLIENT_ID = "bad_client_id"  # not a valid serial, or not the username
REFUSED_FOREIGN_WILL = "foreign_will"  # a last will on another topic than its own status
REFUSED_UNKNOWN_STATION = "unknown_station"  # no station, or one without credentials
REFUSED_WRONG_PASSWORD = "wrong_password"
REFUSED_BRIDGE_PASSWORD = "bridge_password"
REFUSED_BUSY = "busy"  # the backend is behind; the station logs in again after its back-off

ROLE_ATTRIBUTE = "powerbank_role"
SERIAL_ATTRIBUTE = "powerbank_serial"
ROLE_BRIDGE = "bridge"
ROLE_STATION = "station"


# --- credentials ------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """`sha256$<salt hex>$<digest hex>` of a station password (see STATION_HASH_SCHEME)."""
    salt = secrets.token_bytes(16)
    return f"{STATION_HASH_SCHEME}${salt.hex()}${_salted_digest(salt, password).hex()}"


def verify_password(stored_hash: str, password: str) -> bool:
    if stored_hash.startswith(STATION_HASH_SCHEME + "$"):
        try:
            _, salt_hex, digest_hex = stored_hash.split("$")
            salt, digest = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
        except ValueError:
            return False
        return hmac.compare_digest(_salted_digest(salt, password), digest)
    try:
        return LEGACY_HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _salted_digest(salt: bytes, password: str) -> bytes:
    return hashlib.sha256(salt + password.encode()).digest()


async def provision_station_password_by_serial(session: AsyncSession, serial: str) -> tuple[uuid.UUID, str]:
    """`provision_station_password` for the station with this serial: (station id, password)."""
    station_id = (await session.execute(select(Station.id).where(Station.serial == serial))).scalar_one_or_none()
    if station_id is None:
        raise LookupError(f"no station {serial}")
    return station_id, await provision_station_password(session, station_id)


async def provision_station_password(session: AsyncSession, station_id: uuid.UUID | str) -> str:
    """Give a station new MQTT credentials; returns the plain password (shown once, never stored).

    Writes only `stations.mqtt_password_hash` in the caller's transaction (the caller commits).
    Credentials are an operator action, not station state, so this is not a Station-actor command.
    A broker process may accept the old password for up to HASH_CACHE_TTL_S afterwards."""
    station = await session.get(Station, uuid.UUID(str(station_id)))
    if station is None:
        raise LookupError(f"no station {station_id}")
    password = secrets.token_urlsafe(STATION_PASSWORD_BYTES)
    station.mqtt_password_hash = hash_password(password)
    await session.flush()
    log.info("station %s: new MQTT password issued", station.serial)
    return password


# --- admission --------------------------------------------------------------------------------


class Admission:
    """Station logins let in at the pace the backend keeps up with.

    Why: every station boots right after it logs in, and its boot must reach the bridge and be
    acknowledged within the station's re-send time (seconds), or it boots again, which is one
    more full reconcile. 5,000 to 10,000 stations logging in within a minute queued tens of
    thousands of messages for the bridge (one MQTT connection, one event loop); acks came late,
    stations re-sent their boots two and three times over, and the backend never caught up
    (`powerbank bench stations`: 24,600 boots for 10,000 stations, 48 applied). Here a login
    waits while `backlog()` (messages for the bridge not yet through) exceeds
    ADMISSION_BACKLOG_MAX; waiting logins are let in in arrival order, at most
    ADMISSIONS_PER_TICK_MAX every ADMISSION_TICK_S, and one that waited ADMISSION_WAIT_MAX_S
    is refused (reason `busy`): the station logs in again after its back-off, which costs the
    backend a TCP connection and a cached password check, not a boot.

    The same holds one step further on a single writer (the embedded default): a boot the bridge
    has submitted still waits in the mailbox until the one writer applies it, and a station
    whose boot waits keeps sending heartbeats, which queue behind the boot (they must follow it)
    and cost the writer a command each. 10,000 stations admitted as fast as the bridge took
    their boots left the writer minutes behind, stations waiting longer than the 90 s after
    which the scheduler takes them for silent, and 6,177 online at the end (`powerbank bench
    stations`). So with `mailbox_backlog` (the runtime's in-memory count of commands waiting),
    a login also waits while more than `mailbox_max` commands wait: logins then come at the
    pace boots are applied."""

    def __init__(self, backlog=lambda: 0, *, backlog_max: int = ADMISSION_BACKLOG_MAX,
                 wait_max_s: float = ADMISSION_WAIT_MAX_S, mailbox_backlog=None,
                 mailbox_max: int = ADMISSION_MAILBOX_MAX) -> None:
        self.backlog = backlog
        self.backlog_max = backlog_max
        self.mailbox_backlog = mailbox_backlog
        self.mailbox_max = mailbox_max
        self.wait_max_s = wait_max_s
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ticker: asyncio.Task | None = None

    async def enter(self) -> bool:
        """True once there is room (at once when nobody waits and the backlog is small)."""
        if not self._waiting and self.room() >= 0:
            return True
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._let_in())
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.wait_max_s)
            return True
        except TimeoutError:
            return False
        finally:
            turn.cancel()  # no-op when let in; otherwise the ticker skips it

    async def _let_in(self) -> None:
        """Every tick, let in as many waiting logins as the backlog has room for."""
        while self._waiting:
            room = min(ADMISSIONS_PER_TICK_MAX, self.room())
            while room > 0 and self._waiting:
                turn = self._waiting.popleft()
                if not turn.done():
                    turn.set_result(None)
                    room -= 1
            if self._waiting:
                await asyncio.sleep(ADMISSION_TICK_S)

    def room(self) -> int:
        """How many more logins the backend takes now (negative: it is over its limit)."""
        room = self.backlog_max - self.backlog()
        waiting = self.mailbox_backlog() if self.mailbox_backlog is not None else None
        if waiting is not None:
            room = min(room, self.mailbox_max - waiting)
        return room

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()


# --- the shared authority ---------------------------------------------------------------------


@dataclass
class BrokerAuthority:
    """Decides who may connect and what they may touch; one per running embedded broker."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    topics: Topics = field(default_factory=Topics)
    # serial -> (argon2 hash or None, monotonic expiry)
    _hashes: dict[str, tuple[str | None, float]] = field(default_factory=dict)
    # (serial, password digest) -> the hash it verified against
    _verified: OrderedDict[tuple[str, bytes], str] = field(default_factory=OrderedDict)
    # (serial, password digest) -> monotonic expiry; throttles argon2 work for a wrong password
    _refused: dict[tuple[str, bytes], float] = field(default_factory=dict)
    # Keyed digest: the caches never hold a plain password, and the key dies with the process.
    _digest_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    # Every refused login, by reason (also powerbank_mqtt_logins_refused_total).
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    _hash_lookup: BatchedLookup[str, str] | None = None
    admission: Admission = field(default_factory=Admission)
    # The bridge's sessions (their unacknowledged deliveries are the backlog Admission watches).
    bridge_sessions: weakref.WeakValueDictionary[str, Session] = field(default_factory=weakref.WeakValueDictionary)

    def __post_init__(self) -> None:
        self._hash_lookup = BatchedLookup(self._hashes_of)

    @property
    def refused_logins(self) -> int:
        return sum(self.refusals.values())

    async def authenticate(self, session: Session) -> bool:
        refusal = await self._refusal(session)
        if refusal is None:
            return True
        self.refusals[refusal] += 1
        LOGINS_REFUSED.labels(refusal).inc()
        return False

    async def _refusal(self, session: Session) -> str | None:
        """Why this login is refused, or None to admit it (and give the session its role)."""
        username, password = session.username, session.password or ""
        if not username:
            return REFUSED_ANONYMOUS
        if username == self.settings.bridge_username:
            return self._authenticate_bridge(session, password)
        return await self._authenticate_station(session, username, password)

    def _authenticate_bridge(self, session: Session, password: str) -> str | None:
        expected = self.settings.bridge_password
        if not expected or not hmac.compare_digest(password.encode(), expected.encode()):
            return REFUSED_BRIDGE_PASSWORD
        session.attributes[ROLE_ATTRIBUTE] = ROLE_BRIDGE
        self.bridge_sessions[session.client_id] = session
        return None

    async def _authenticate_station(self, session: Session, serial: str, password: str) -> str | None:
        if not is_valid_serial(serial) or session.client_id != serial:
            return REFUSED_BAD_CLIENT_ID
        if session.will_flag and session.will_topic != self.topics.status(serial):
            return REFUSED_FOREIGN_WILL
        if await self._station_hash(serial) is None:
            return REFUSED_UNKNOWN_STATION
        if not await self.check_station_password(serial, password):
            return REFUSED_WRONG_PASSWORD
        if not await self.admission.enter():
            return REFUSED_BUSY
        session.attributes[ROLE_ATTRIBUTE] = ROLE_STATION
        session.attributes[SERIAL_ATTRIBUTE] = serial
        return None

    async def check_station_password(self, serial: str, password: str) -> bool:
        stored = await self._station_hash(serial)
        if stored is None or not password:
            return False
        key = (serial, hmac.digest(self._digest_key, password.encode(), hashlib.sha256))
        if self._verified.get(key) == stored:
            self._verified.move_to_end(key)
            return True
        now = time.monotonic()
        if self._refused.get(key, 0.0) > now:
            return False
        if await self._verify(stored, password):
            self._remember_verified(key, stored)
            return True
        self._refused[key] = now + REFUSAL_CACHE_TTL_S
        if len(self._refused) > VERIFIED_CACHE_SIZE:
            self._refused = {k: t for k, t in self._refused.items() if t > now}
        return False

    @staticmethod
    async def _verify(stored: str, password: str) -> bool:
        """A legacy argon2 hash takes tens of milliseconds: off the event loop then."""
        if stored.startswith(STATION_HASH_SCHEME + "$"):
            return verify_password(stored, password)
        return await asyncio.to_thread(verify_password, stored, password)

    def _remember_verified(self, key: tuple[str, bytes], stored: str) -> None:
        self._verified[key] = stored
        while len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)

    async def _station_hash(self, serial: str) -> str | None:
        cached = self._hashes.get(serial)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        stored = await self._hash_lookup.get(serial)
        self._hashes[serial] = (stored, time.monotonic() + HASH_CACHE_TTL_S)
        return stored

    async def _hashes_of(self, serials: list[str]) -> dict[str, str]:
        """The stored hashes of many stations in one query (see broker/batching.py)."""
        async with self.sessions() as db:
            rows = await db.execute(select(Station.serial, Station.mqtt_password_hash).where(Station.serial.in_(serials)))
            return {serial: stored for serial, stored in rows.all() if stored is not None}

    def forget(self, serial: str) -> None:
        """Drop cached credentials of one station (after re-provisioning in this process)."""
        self._hashes.pop(serial, None)

    def may(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        if session is None or not topic:
            return False
        role = session.attributes.get(ROLE_ATTRIBUTE)
        if role == ROLE_BRIDGE:
            return True
        if role != ROLE_STATION:
            return False
        serial = session.attributes.get(SERIAL_ATTRIBUTE)
        return station_may(self.topics, serial, topic, action)


def station_may(topics: Topics, serial: str | None, topic: str, action: Action | None) -> bool:
    """The station ACL as a pure function: own events/status to publish, own commands/errors
    to subscribe and receive. Exact topics only, so a wildcard filter is always refused."""
    if not serial:
        return False
    if action == Action.PUBLISH:
        allowed = STATION_PUBLISHES
    elif action in (Action.SUBSCRIBE, Action.RECEIVE):
        allowed = STATION_SUBSCRIBES
    else:
        return False
    return any(topic == topics.topic(serial, channel) for channel in allowed)


_AUTHORITIES: dict[str, BrokerAuthority] = {}


def _authority(key: str) -> BrokerAuthority | None:
    return _AUTHORITIES.get(key)


# --- the amqtt plugins ------------------------------------------------------------------------


class StationAuthPlugin(BaseAuthPlugin):
    """Refuses anonymous clients; admits stations by argon2-checked password and the bridge."""

    @dataclass
    class Config:
        authority_key: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._key = self.config.authority_key

    async def authenticate(self, *, session: Session) -> bool:
        authority = _authority(self._key)
        if authority is None or session is None:
            return False
        try:
            return await authority.authenticate(session)
        except Exception:  # a database hiccup must refuse one login, not kill the listener
            log.exception("authentication of %r failed", session.username)
            return False


class StationTopicPlugin(BaseTopicPlugin):
    """The topic ACL; see `station_may`."""

    @dataclass
    class Config:
        authority_key: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._key = self.config.authority_key

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        authority = _authority(self._key)
        return authority is not None and authority.may(session, topic, action)


# --- amqtt fix -------------------------------------------------------------------------------


class _SnapshotList(list):
    """A list that iterates over a copy of itself."""

    def __iter__(self):
        return iter(list(list.__iter__(self)))


class _Subscriptions(dict):
    """amqtt's subscription table (topic filter -> [(session, qos)]), made safe to change while
    it is being iterated and cheap at fleet scale.

    Safe: amqtt 0.12 walks the table to broadcast a message and awaits the topic plugins (our
    ACL's RECEIVE check) inside that walk; a client subscribing or disconnecting meanwhile
    changed the dict, the walk died with "dictionary changed size during iteration" and the
    message was silently dropped for every remaining subscriber, the bridge included. Walks go
    over snapshots.

    Cheap: every station subscribes to a command topic of its own, so at 10,000 stations the
    table holds 10,000 filters, and amqtt walked all of them for every message (matching each
    and formatting a debug line for each miss), for every connect (replaying retained messages
    for every filter in the broker, not the client's), and for every disconnect; after every
    SUBSCRIBE it also formatted the whole table for a debug line. Found by `powerbank bench
    stations`: at 1,500 to 10,000 stations the broker's loop was busy connecting and boots
    waited for minutes. Here:
    - a broadcast walks only the `candidates` for its topic (the filter equal to the topic and
      the filters with wildcards; see `_Broker._fan_out`);
    - with no retained message in the broker the connect-time replay has nothing to walk;
    - `filters_of` (kept by `_Broker`) lets a disconnect visit only the client's own filters;
    - `repr` is a count."""

    def __init__(self, has_retained=lambda: True) -> None:
        super().__init__()
        self._wildcards: set[str] = set()
        self._has_retained = has_retained
        self.filters_of: dict[str, set[str]] = {}

    def __setitem__(self, key, value):
        if type(value) is list:
            value = _SnapshotList(value)
        if "+" in key or "#" in key:
            self._wildcards.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        super().__delitem__(key)
        self._wildcards.discard(key)

    def pop(self, key, *default):
        self._wildcards.discard(key)
        return super().pop(key, *default)

    def clear(self) -> None:
        super().clear()
        self._wildcards.clear()
        self.filters_of.clear()

    def __iter__(self):
        # amqtt's only walk over the keys left is the connect-time retained replay.
        return iter(list(super().keys())) if self._has_retained() else iter(())

    def __repr__(self) -> str:
        return f"<{len(self)} topic filters, {len(self._wildcards)} with wildcards>"

    def items(self):
        return list(super().items())

    def candidates(self, topic: str) -> list[str]:
        """The filters a message on `topic` can match: the one equal to it and the wildcards."""
        return [key for key in dict.fromkeys((topic, *self._wildcards)) if key in self]


# A broadcast turn takes at most this many queued messages before it lets other tasks run.
BROADCAST_BATCH_MAX = 500
# The broker's list of delivery tasks is swept whole once it holds this many (or twice what
# the last sweep kept).
DELIVERY_TASKS_SWEEP_AT = 1000


class _Broker(Broker):
    """amqtt's broker with a subscription table and a fan-out loop that hold up at fleet scale.

    The fan-out: amqtt 0.12 broadcasts every message from one loop that, per message, creates
    a task, waits for it with `asyncio.wait`, and asks the topic plugins through the plugin
    manager (a `gather`: more tasks) once per subscriber: several turns of the event loop per
    message, and every message of the system (station events to the bridge, acks, config and
    commands to stations) queues for it. Measured by `powerbank bench stations` at 3,000
    stations: 13,000 messages waiting in the broadcast queue and growing, acks so late that
    stations re-sent their boots (each one more full reconcile for the actor), 900 of 3,000
    stations online after four minutes. Here one turn takes every queued message (up to
    BROADCAST_BATCH_MAX) and asks the ACL directly (`BrokerAuthority.may`, pure), so a message
    no longer costs turns of the loop of its own; each delivery is still its own task, in
    queue order, as in amqtt."""

    def __init__(self, *args: Any, authority: BrokerAuthority | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._authority = authority
        self._subscriptions = _Subscriptions(has_retained=lambda: bool(self._retained_messages))

    def backlog(self) -> int:
        """Messages on their way to the bridge: queued for fan-out, or sent to a bridge session
        and not yet acknowledged by it (what `Admission` keeps small)."""
        bridges = self._authority.bridge_sessions if self._authority is not None else {}
        in_flight = sum(len(session.inflight_out) for session in list(bridges.values())
                        if session.transitions.state == "connected")
        return self._broadcast_queue.qsize() + in_flight

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """The ACL without a round through the plugin manager: the broker's only topic plugin
        is StationTopicPlugin, which asks this same authority."""
        if self._authority is None:
            return await super()._topic_filtering(session, topic, action)
        return self._authority.may(session, topic, action)

    async def _broadcast_loop(self) -> None:
        running, sweep_at = self._tasks_queue, DELIVERY_TASKS_SWEEP_AT
        try:
            while True:
                first = await self._next_broadcast()
                if first is None:
                    return
                for broadcast in [first, *self._queued_broadcasts(BROADCAST_BATCH_MAX - 1)]:
                    try:
                        await self._fan_out(broadcast, running)
                    except Exception:  # one message must not stop every later one
                        log.exception("broadcast of a message on %r failed", broadcast.get("topic"))
                sweep_at = _sweep_finished(running, sweep_at)
                await asyncio.sleep(0)  # a full queue must not keep the loop to itself
        finally:
            for task in running:
                if not task.done():
                    task.cancel()

    async def _next_broadcast(self) -> dict[str, Any] | None:
        """The next queued message, or None once the broker shuts down (a message taken in
        the same instant goes back, to be counted in amqtt's 'not broadcasted' warning)."""
        getter = asyncio.ensure_future(self._broadcast_queue.get())
        shutdown = self._broadcast_shutdown_waiter
        try:
            await asyncio.wait([getter, shutdown], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if shutdown.done():
            if getter.done() and not getter.cancelled():
                self._broadcast_queue.put_nowait(getter.result())
            return None
        return getter.result()

    def _queued_broadcasts(self, limit: int) -> list[dict[str, Any]]:
        taken = []
        while len(taken) < limit and not self._broadcast_queue.empty():
            taken.append(self._broadcast_queue.get_nowait())
        return taken

    async def _fan_out(self, broadcast: dict[str, Any], running: collections.deque) -> None:
        """amqtt's `_run_broadcast` for one message, over the filters that can match. It awaits
        only to keep a message for a disconnected persistent session (stations and the bridge
        connect with a clean session)."""
        topic = broadcast["topic"]
        for a_filter in self._subscriptions.candidates(topic):
            if not self._matches(topic, a_filter):
                continue
            for target_session, sub_qos in self._subscriptions.get(a_filter, ()):
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    continue
                connected = target_session.transitions.state == "connected"
                if not connected and not target_session.clean_session and qos in (1, 2) and not target_session.is_anonymous:
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                handler = self._get_handler(target_session) if connected else None
                if handler:
                    running.append(asyncio.ensure_future(handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)))

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        granted = await super().add_subscription(subscription, session)
        if granted != 0x80:
            self._subscriptions.filters_of.setdefault(session.client_id, set()).add(subscription[0])
        return granted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = super()._del_subscription(a_filter, session)
        filters = self._subscriptions.filters_of.get(session.client_id)
        if filters is not None:
            filters.discard(a_filter)
            if not filters:
                del self._subscriptions.filters_of[session.client_id]
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        """amqtt's walks every filter in the broker; the client's own are enough."""
        for topic_filter in list(self._subscriptions.filters_of.get(session.client_id, ())):
            if self._del_subscription(topic_filter, session) and not self._subscriptions.get(topic_filter):
                self._subscriptions.pop(topic_filter, None)

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        """One connection's whole life; its socket is closed when it ends, whatever happened.

        amqtt 0.12's StreamWriterAdapter.close() marks itself closed, then awaits drain();
        when the client has already reset the connection (a power cut, a reconnect storm)
        drain raises, the socket is never closed, and every later close() is a no-op: one
        file descriptor leaked per abrupt disconnect until garbage collection. Some of its
        error paths (a client gone before CONNECT) do not close at all. It also leaves Nagle's
        algorithm on (see mqtt.no_delay)."""
        no_delay(writer)
        try:
            await super()._client_connected(listener_name, reader, writer)
        except OSError as exc:  # the client vanished while amqtt was closing on it
            log.debug("connection on %s ended with %r", listener_name, exc)
        finally:
            close_stream(writer)


def _sweep_finished(running: collections.deque, sweep_at: int) -> int:
    """Forget finished deliveries, in place, reading their outcome so no error goes
    unretrieved; returns the size at which to sweep the whole list next. amqtt pops finished
    tasks off the front only, so one slow subscriber at the front kept every later delivery
    alive; a whole sweep runs when the list has doubled since the last (linear overall)."""
    while running and running[0].done():
        _reap(running.popleft())
    if len(running) < sweep_at:
        return sweep_at
    alive = [task for task in running if not task.done() or _reap(task)]
    running.clear()
    running.extend(alive)
    return max(DELIVERY_TASKS_SWEEP_AT, 2 * len(alive))


def _reap(task: asyncio.Future) -> bool:
    """Log a finished delivery's error; False, so a filter can drop the task."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("a delivery failed: %r", task.exception())
    return False


def close_stream(writer: Any) -> None:
    """Close the asyncio transport under an amqtt writer adapter (idempotent)."""
    stream = getattr(writer, "_writer", None)
    if stream is not None:
        stream.close()


# --- start / stop -----------------------------------------------------------------------------


@dataclass
class EmbeddedBroker:
    """A running embedded broker. `port` is the bound port (useful when started on port 0)."""

    broker: Broker
    authority: BrokerAuthority
    host: str
    port: int
    _key: str

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    _stopped: bool = False

    async def stop(self) -> None:
        """Close every client connection and the listeners; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.authority.admission.close()
            await self.broker.shutdown()
        finally:
            _AUTHORITIES.pop(self._key, None)


def broker_config(settings: Settings, key: str, extra_listeners: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    listeners: dict[str, Any] = {
        "default": {"type": "tcp", "bind": f"{settings.mqtt_host}:{settings.mqtt_port}"}
    }
    listeners.update(extra_listeners or {})
    return {
        "listeners": listeners,
        "timeout_disconnect_delay": 2,
        "plugins": {
            f"{__name__}.StationAuthPlugin": {"authority_key": key},
            f"{__name__}.StationTopicPlugin": {"authority_key": key},
        },
    }


async def start_embedded_broker(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    *,
    extra_listeners: dict[str, dict[str, Any]] | None = None,
    topics: Topics | None = None,
    readonly: async_sessionmaker[AsyncSession] | None = None,
) -> EmbeddedBroker:
    """Start the broker on settings.mqtt_host:mqtt_port (port 0 picks a free one), plus any
    `extra_listeners` in amqtt's listener format, e.g. {"ws": {"type": "ws", "bind": "0.0.0.0:8083"}}.
    Logins only read the stations table: give `readonly` sessions where they exist (on SQLite
    every other session queues for the single writer connection, and a login storm with it)."""
    if not settings.bridge_password:
        raise ValueError("settings.bridge_password is empty; the bridge could not log in")
    key = uuid.uuid4().hex
    authority = BrokerAuthority(settings=settings, sessions=readonly or sessions, topics=topics or Topics())
    _AUTHORITIES[key] = authority
    try:
        broker = _Broker(broker_config(settings, key, extra_listeners), authority=authority)
        await broker.start()
    except BaseException:
        _AUTHORITIES.pop(key, None)
        raise
    authority.admission.backlog = broker.backlog
    port = _bound_port(broker, settings.mqtt_port)
    log.info("embedded MQTT broker listening on %s:%s", settings.mqtt_host, port)
    return EmbeddedBroker(broker=broker, authority=authority, host=settings.mqtt_host, port=port, _key=key)


def _bound_port(broker: Broker, configured: int) -> int:
    server = broker._servers.get("default")  # amqtt keeps listeners private; read-only use
    sockets = getattr(getattr(server, "instance", None), "sockets", None) or ()
    for sock in sockets:
        return sock.getsockname()[1]
    return configured

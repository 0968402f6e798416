"""Station protocol v1: topics and payloads between station hardware and the backend.

The one place that knows the wire format; docs/station-protocol.md is its prose twin.

Rules that shape the code:
- Every station -> backend event carries `v` (protocol version), `seq` (per station, strictly
  increasing for the station's whole life, kept across reconnects and reboots) and `ts` (the
  station's own clock as integer epoch milliseconds, UTC). Epoch milliseconds rather than
  ISO-8601 because a microcontroller has them natively and there is no zone to get wrong.
- Decoding is strict (no type coercion, required fields required) and total: whatever bytes
  arrive, `decode_event` returns either a message or a `Rejection` with a machine-readable
  reason code; it never raises. Unknown *fields* are ignored so firmware can add optional fields
  within v1; an unknown *version* or *type* is rejected.
- Backend -> station commands (`config`, `ack`, `eject`, `error`) are built here too, so the
  simulator and the backend share one definition.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import msgspec

PROTOCOL_VERSION = 1
DEFAULT_TOPIC_ROOT = "pb"
# A boot report of 64 slots is about 4 KiB; anything far beyond that is not a station talking.
MAX_PAYLOAD_BYTES = 8 * 1024
MAX_SLOTS = 64

# A serial is also an MQTT username, client id and topic level: no '/', '+', '#' or spaces.
SERIAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"
_SERIAL_RE = re.compile(SERIAL_PATTERN)

# --- rejection reason codes (the `reason` of an error message) --------------------------------

PAYLOAD_TOO_LARGE = "payload_too_large"
MALFORMED_JSON = "malformed_json"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_TYPE = "unknown_type"
INVALID_MESSAGE = "invalid_message"
UNKNOWN_STATION = "unknown_station"
UNKNOWN_TOPIC = "unknown_topic"
REJECTION_REASONS = (
    PAYLOAD_TOO_LARGE,
    MALFORMED_JSON,
    UNSUPPORTED_VERSION,
    UNKNOWN_TYPE,
    INVALID_MESSAGE,
    UNKNOWN_STATION,
    UNKNOWN_TOPIC,
)

# --- eject result codes (the `code` of an eject_ack) ------------------------------------------

EJECT_OK = "ok"
EJECT_EXPIRED = "expired"  # the command arrived after its expires_at; nothing moved
EJECT_JAMMED = "jammed"  # the latch did not release; the slot needs service
EJECT_BANK_MISMATCH = "bank_mismatch"  # the slot holds a different bank than commanded
EJECT_SLOT_EMPTY = "slot_empty"  # the slot holds no bank at all
EJECT_ERROR = "error"  # anything else; nothing moved
EjectCode = Literal["ok", "expired", "jammed", "bank_mismatch", "slot_empty", "error"]

# --- field types -------------------------------------------------------------------------------

Serial = Annotated[str, msgspec.Meta(pattern=SERIAL_PATTERN)]
Seq = Annotated[int, msgspec.Meta(ge=1, le=2**62)]
EpochMs = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
SlotNumber = Annotated[int, msgspec.Meta(ge=1, le=MAX_SLOTS)]
ChargePercent = Annotated[int, msgspec.Meta(ge=0, le=100)]
ShortText = Annotated[str, msgspec.Meta(max_length=32)]
CommandId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


# --- station -> backend -------------------------------------------------------------------------


class StationEvent(msgspec.Struct, tag_field="type", kw_only=True, frozen=True):
    """Fields every event on `.../events` carries."""

    v: int
    seq: Seq
    ts: EpochMs


class SlotState(msgspec.Struct, kw_only=True, frozen=True):
    """One slot in a boot or inventory report. `bank` is None for an empty slot; `fault` is a
    short code when the slot reports itself broken (it may still hold a bank)."""

    slot: SlotNumber
    bank: Serial | None = None
    charge: ChargePercent | None = None
    fault: ShortText | None = None


def _check_inventory(slot_count: int, slots: list[SlotState]) -> None:
    numbers = [s.slot for s in slots]
    if len(set(numbers)) != len(numbers):
        raise ValueError("slot numbers repeat")
    if any(n > slot_count for n in numbers):
        raise ValueError("slot number beyond slot_count")
    banks = [s.bank for s in slots if s.bank is not None]
    if len(set(banks)) != len(banks):
        raise ValueError("one bank reported in two slots")
    if any(s.bank is not None and s.charge is None for s in slots):
        raise ValueError("a slot with a bank must report its charge")


class Boot(StationEvent, tag="boot", kw_only=True, frozen=True):
    """Sent once after every power-up, before anything else: identity and a full inventory."""

    firmware: ShortText
    hardware: ShortText
    slot_count: SlotNumber
    slots: Annotated[list[SlotState], msgspec.Meta(max_length=MAX_SLOTS)]

    def __post_init__(self) -> None:
        _check_inventory(self.slot_count, self.slots)


class Inventory(StationEvent, tag="inventory", kw_only=True, frozen=True):
    """A full inventory, sent after every reconnect (and whenever the station likes)."""

    slot_count: SlotNumber
    slots: Annotated[list[SlotState], msgspec.Meta(max_length=MAX_SLOTS)]

    def __post_init__(self) -> None:
        _check_inventory(self.slot_count, self.slots)


class Heartbeat(StationEvent, tag="heartbeat", kw_only=True, frozen=True):
    uptime_s: Annotated[int, msgspec.Meta(ge=0)] | None = None


class BankInserted(StationEvent, tag="bank_inserted", kw_only=True, frozen=True):
    """A bank was pushed into a slot: a return, or an operator restocking."""

    slot: SlotNumber
    bank: Serial
    charge: ChargePercent


class BankRemoved(StationEvent, tag="bank_removed", kw_only=True, frozen=True):
    """A bank left a slot without an eject command (forced, or by an operator)."""

    slot: SlotNumber
    bank: Serial | None = None


class Battery(StationEvent, tag="battery", kw_only=True, frozen=True):
    slot: SlotNumber
    bank: Serial
    charge: ChargePercent


class SlotFault(StationEvent, tag="slot_fault", kw_only=True, frozen=True):
    slot: SlotNumber
    code: ShortText


class EjectAck(StationEvent, tag="eject_ack", kw_only=True, frozen=True):
    """The answer to one eject command. `ok` means the bank physically left the slot."""

    command_id: CommandId
    slot: SlotNumber
    bank: Serial | None = None
    code: EjectCode


AnyStationEvent = Boot | Inventory | Heartbeat | BankInserted | BankRemoved | Battery | SlotFault | EjectAck
EVENT_TYPES: dict[str, type[StationEvent]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (Boot, Inventory, Heartbeat, BankInserted, BankRemoved, Battery, SlotFault, EjectAck)
}
# Snapshots and heartbeats are never re-sent (a fresh one supersedes them); these are.
RESENT_EVENT_TYPES = ("bank_inserted", "bank_removed", "battery", "slot_fault", "eject_ack")


class Offline(msgspec.Struct, tag_field="type", tag="offline", kw_only=True, frozen=True):
    """The last will, on `.../status`. Set by the station at connect time; the broker publishes
    it when the connection dies without a DISCONNECT."""

    v: int = PROTOCOL_VERSION


# --- backend -> station -----------------------------------------------------------------------


class Command(msgspec.Struct, tag_field="type", kw_only=True, frozen=True):
    v: int = PROTOCOL_VERSION


class Config(Command, tag="config", kw_only=True, frozen=True):
    """The answer to a boot: how often to beat, the server clock, and the last seq the backend
    has applied (a station that lost its counter continues above it)."""

    heartbeat_interval_s: Annotated[int, msgspec.Meta(ge=1)]
    server_time: EpochMs
    eject_timeout_ms: Annotated[int, msgspec.Meta(ge=1)]
    last_seq: Annotated[int, msgspec.Meta(ge=0)]


class Ack(Command, tag="ack", kw_only=True, frozen=True):
    """The event with this seq is stored; the station may forget it."""

    seq: Seq


class Eject(Command, tag="eject", kw_only=True, frozen=True):
    """Release `bank` from `slot`. `expires_at` is in the station's clock (the backend subtracts
    its skew estimate); past it the station must refuse with code `expired`."""

    command_id: CommandId
    slot: SlotNumber
    bank: Serial
    expires_at: EpochMs


class Error(Command, tag="error", kw_only=True, frozen=True):
    reason: str
    seq: int | None = None
    detail: str = ""


AnyCommand = Config | Ack | Eject | Error


# --- decoding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejection:
    """Why a payload was not accepted; becomes an `error` message to the station."""

    reason: str
    detail: str = ""
    seq: int | None = None

    def as_error(self) -> Error:
        return Error(reason=self.reason, seq=self.seq, detail=self.detail[:200])


class _Header(msgspec.Struct):
    """Just enough to classify a payload before the strict decode."""

    v: Any = None
    type: Any = None
    seq: Any = None


_header_decoder = msgspec.json.Decoder(_Header)
_event_decoder = msgspec.json.Decoder(AnyStationEvent)
_offline_decoder = msgspec.json.Decoder(Offline)
_command_decoder = msgspec.json.Decoder(AnyCommand)
_encoder = msgspec.json.Encoder()


def _read_header(data: bytes) -> _Header | Rejection:
    if len(data) > MAX_PAYLOAD_BYTES:
        return Rejection(PAYLOAD_TOO_LARGE, f"{len(data)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        return _header_decoder.decode(data)
    except msgspec.ValidationError:
        return Rejection(INVALID_MESSAGE, "payload is not a JSON object")
    except msgspec.DecodeError as exc:
        return Rejection(MALFORMED_JSON, str(exc))


def _plain_seq(header: _Header) -> int | None:
    seq = header.seq
    return seq if type(seq) is int and seq >= 1 else None


def decode_event(data: bytes) -> AnyStationEvent | Rejection:
    """Decode a payload from `.../events`. Never raises."""
    header = _read_header(data)
    if isinstance(header, Rejection):
        return header
    seq = _plain_seq(header)
    if header.v != PROTOCOL_VERSION or type(header.v) is not int:
        return Rejection(UNSUPPORTED_VERSION, f"v={header.v!r}; this backend speaks {PROTOCOL_VERSION}", seq)
    if header.type not in EVENT_TYPES:
        return Rejection(UNKNOWN_TYPE, f"type={header.type!r}", seq)
    try:
        return _event_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return Rejection(INVALID_MESSAGE, str(exc), seq)


def decode_status(data: bytes) -> Offline | Rejection:
    """Decode a payload from `.../status` (only the last will lives there). Never raises."""
    header = _read_header(data)
    if isinstance(header, Rejection):
        return header
    if header.v is not None and (header.v != PROTOCOL_VERSION or type(header.v) is not int):
        return Rejection(UNSUPPORTED_VERSION, f"v={header.v!r}; this backend speaks {PROTOCOL_VERSION}")
    if header.type != "offline":
        return Rejection(UNKNOWN_TYPE, f"type={header.type!r}")
    try:
        return _offline_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return Rejection(INVALID_MESSAGE, str(exc))


def decode_command(data: bytes) -> AnyCommand | Rejection:
    """Decode a backend -> station payload (the simulator's side). Never raises."""
    header = _read_header(data)
    if isinstance(header, Rejection):
        return header
    try:
        return _command_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return Rejection(INVALID_MESSAGE, str(exc))


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def to_payload(message: msgspec.Struct) -> dict[str, Any]:
    """A plain dict (with its `type` tag) for the transactional outbox."""
    return msgspec.to_builtins(message)


def is_valid_serial(serial: str) -> bool:
    return bool(_SERIAL_RE.match(serial))


# --- time -------------------------------------------------------------------------------------


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_epoch_ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, tz=timezone.utc)


# --- topics -----------------------------------------------------------------------------------

TopicChannel = Literal["events", "status", "commands", "errors"]
STATION_PUBLISHES: tuple[TopicChannel, ...] = ("events", "status")
STATION_SUBSCRIBES: tuple[TopicChannel, ...] = ("commands", "errors")


@dataclass(frozen=True)
class Topics:
    """Topic names under a root (`pb` by default). A deployment sharing an external broker with
    others (or a test sharing the machine's Mosquitto) picks its own root."""

    root: str = DEFAULT_TOPIC_ROOT

    @classmethod
    def from_env(cls) -> "Topics":
        """The root from `MQTT_TOPIC_ROOT`, so every process of a deployment agrees on it."""
        return cls(os.environ.get("MQTT_TOPIC_ROOT") or DEFAULT_TOPIC_ROOT)

    @property
    def base(self) -> str:
        return f"{self.root}/v{PROTOCOL_VERSION}/stations"

    def topic(self, serial: str, channel: TopicChannel) -> str:
        return f"{self.base}/{serial}/{channel}"

    def events(self, serial: str) -> str:
        return self.topic(serial, "events")

    def status(self, serial: str) -> str:
        return self.topic(serial, "status")

    def commands(self, serial: str) -> str:
        return self.topic(serial, "commands")

    def errors(self, serial: str) -> str:
        return self.topic(serial, "errors")

    @property
    def events_filter(self) -> str:
        return f"{self.base}/+/events"

    @property
    def status_filter(self) -> str:
        return f"{self.base}/+/status"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(serial, channel) for a topic of this root, else None."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        if len(parts) != 2 or parts[1] not in ("events", "status", "commands", "errors"):
            return None
        serial, channel = parts
        return (serial, channel) if is_valid_serial(serial) else None

"""Station protocol v1: what decodes, what is rejected and why, and the topic names."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from powerbank.broker.protocol import (
    INVALID_MESSAGE,
    MALFORMED_JSON,
    MAX_PAYLOAD_BYTES,
    PAYLOAD_TOO_LARGE,
    REJECTION_REASONS,
    UNKNOWN_TYPE,
    UNSUPPORTED_VERSION,
    Ack,
    BankInserted,
    Boot,
    Config,
    Eject,
    EjectAck,
    Error,
    Heartbeat,
    Offline,
    Rejection,
    SlotState,
    Topics,
    decode_command,
    decode_event,
    decode_status,
    encode,
)


def raw(**fields) -> bytes:
    return json.dumps(fields).encode()


BOOT = dict(
    type="boot", v=1, seq=1, ts=1_700_000_000_000, firmware="1.0", hardware="A", slot_count=2,
    slots=[{"slot": 1, "bank": "PB-1", "charge": 80}, {"slot": 2}],
)


def test_valid_events_decode_to_their_types():
    assert decode_event(raw(**BOOT)) == Boot(
        v=1, seq=1, ts=1_700_000_000_000, firmware="1.0", hardware="A", slot_count=2,
        slots=[SlotState(slot=1, bank="PB-1", charge=80), SlotState(slot=2)],
    )
    assert isinstance(decode_event(raw(type="heartbeat", v=1, seq=2, ts=5)), Heartbeat)
    ack = decode_event(raw(type="eject_ack", v=1, seq=3, ts=5, command_id="c-1", slot=4, code="jammed"))
    assert isinstance(ack, EjectAck) and (ack.code, ack.bank) == ("jammed", None)
    # Fields a newer v1 firmware adds are ignored, not fatal.
    inserted = decode_event(raw(type="bank_inserted", v=1, seq=4, ts=5, slot=1, bank="PB-9", charge=55, rssi=-60))
    assert inserted == BankInserted(v=1, seq=4, ts=5, slot=1, bank="PB-9", charge=55)


@pytest.mark.parametrize(
    ("payload", "reason", "seq"),
    [
        (b"x" * (MAX_PAYLOAD_BYTES + 1), PAYLOAD_TOO_LARGE, None),
        (b"{not json", MALFORMED_JSON, None),
        (b"", MALFORMED_JSON, None),
        (b"[1, 2]", INVALID_MESSAGE, None),
        (raw(type="heartbeat", v=2, seq=7, ts=1), UNSUPPORTED_VERSION, 7),
        (raw(type="heartbeat", seq=7, ts=1), UNSUPPORTED_VERSION, 7),
        (raw(type="heartbeat", v="1", seq=7, ts=1), UNSUPPORTED_VERSION, 7),
        (raw(type="heartbeat", v=True, seq=7, ts=1), UNSUPPORTED_VERSION, 7),
        (raw(type="teleport", v=1, seq=7, ts=1), UNKNOWN_TYPE, 7),
        (raw(v=1, seq=7, ts=1), UNKNOWN_TYPE, 7),
        (raw(type="heartbeat", v=1, ts=1), INVALID_MESSAGE, None),  # missing seq
        (raw(type="heartbeat", v=1, seq=0, ts=1), INVALID_MESSAGE, None),  # seq starts at 1
        (raw(type="heartbeat", v=1, seq="8", ts=1), INVALID_MESSAGE, None),  # no coercion
        (raw(type="heartbeat", v=1, seq=8, ts="2024-01-01T00:00:00Z"), INVALID_MESSAGE, 8),  # ts is epoch ms
        (raw(type="bank_inserted", v=1, seq=9, ts=1, slot=1, bank="PB-1"), INVALID_MESSAGE, 9),  # no charge
        (raw(type="bank_inserted", v=1, seq=9, ts=1, slot=1, bank="PB-1", charge=101), INVALID_MESSAGE, 9),
        (raw(type="bank_inserted", v=1, seq=9, ts=1, slot=65, bank="PB-1", charge=1), INVALID_MESSAGE, 9),
        (raw(type="bank_inserted", v=1, seq=9, ts=1, slot=1, bank="PB/+/#", charge=1), INVALID_MESSAGE, 9),
        (raw(type="eject_ack", v=1, seq=9, ts=1, command_id="c", slot=1, code="maybe"), INVALID_MESSAGE, 9),
        (raw(**{**BOOT, "slots": [{"slot": 1}, {"slot": 1}]}), INVALID_MESSAGE, 1),
        (raw(**{**BOOT, "slots": [{"slot": 3}]}), INVALID_MESSAGE, 1),  # beyond slot_count
        (raw(**{**BOOT, "slots": [{"slot": 1, "bank": "A", "charge": 1}, {"slot": 2, "bank": "A", "charge": 1}]}), INVALID_MESSAGE, 1),
        (raw(**{**BOOT, "slots": [{"slot": 1, "bank": "A"}]}), INVALID_MESSAGE, 1),  # bank without charge
    ],
)
def test_rejections_carry_a_reason_code_and_the_seq_when_known(payload, reason, seq):
    result = decode_event(payload)
    assert isinstance(result, Rejection), result
    assert (result.reason, result.seq) == (reason, seq)
    assert result.reason in REJECTION_REASONS
    error = decode_command(encode(result.as_error()))
    assert isinstance(error, Error) and (error.reason, error.seq) == (reason, seq)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_decoding_never_raises(data):
    assert isinstance(decode_event(data), (Rejection, msgspec.Struct))
    assert isinstance(decode_status(data), (Rejection, Offline))


def test_last_will_decodes_with_or_without_version():
    assert decode_status(b'{"type":"offline"}') == Offline()
    assert decode_status(b'{"type":"offline","v":1}') == Offline()
    assert decode_status(b'{"type":"offline","v":3}').reason == UNSUPPORTED_VERSION
    assert decode_status(b'{"type":"heartbeat","v":1}').reason == UNKNOWN_TYPE


def test_commands_round_trip():
    for command in (
        Config(heartbeat_interval_s=30, server_time=1, eject_timeout_ms=8000, last_seq=4),
        Ack(seq=12),
        Eject(command_id="e-1", slot=3, bank="PB-3", expires_at=99),
        Error(reason=INVALID_MESSAGE, seq=None, detail="x"),
    ):
        assert decode_command(encode(command)) == command
    assert json.loads(encode(Ack(seq=12))) == {"type": "ack", "seq": 12, "v": 1}


def test_topics():
    topics = Topics("pb")
    assert topics.events("ST-1") == "pb/v1/stations/ST-1/events"
    assert topics.events_filter == "pb/v1/stations/+/events"
    assert topics.parse("pb/v1/stations/ST-1/status") == ("ST-1", "status")
    assert topics.parse("pb/v1/stations/ST-1/other") is None
    assert topics.parse("pb/v1/stations/ST-1/events/extra") is None
    assert topics.parse("xx/v1/stations/ST-1/events") is None
    assert Topics("other").parse("pb/v1/stations/ST-1/events") is None

"""Request and response bodies of the field-staff remote eject (same conventions as schemas.py:
requests forbid unknown fields)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from msgspec import Meta

from powerbank.http.schemas import Request, Response


class ServiceEjectRequest(Request):
    slot: Annotated[int, Meta(ge=1, le=48, description="the slot whose bank to take out")]
    reason: Annotated[str, Meta(min_length=1, max_length=200, description="why, for the action log")]


class ServiceEjectView(Response):
    station_id: uuid.UUID
    slot: int
    bank_serial: str
    # The Eject command's id: its ack (or its expiry) settles it; the bank then leaves as `faulty`.
    eject_command_id: str
    expires_at: datetime

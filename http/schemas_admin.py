"""Request and response bodies of the admin content, system and achievement endpoints (same
conventions as schemas.py: requests forbid unknown fields, every bound the database enforces is
also a bound here, so a bad value is a 400 and never a driver error)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta

from powerbank.http.schemas import Request, Response

SortOrder = Annotated[int, Meta(ge=-10_000, le=10_000, description="display order, ascending")]
Version = Annotated[str, Meta(max_length=32, pattern=r"^[0-9]+(\.[0-9]+){0,3}$", description="e.g. 2.10.1")]
HttpUrl = Annotated[str, Meta(max_length=500, pattern=r"^https?://\S+$")]
AwareTime = Annotated[datetime, Meta(tz=True, description="with a zone, e.g. 2026-11-01T00:00:00Z")]
ContactKind = Literal["email", "phone", "whatsapp", "address", "website"]
AchievementMetric = Literal["rentals_completed", "timely_returns", "stations_visited"]


# --- content ---------------------------------------------------------------------------------


class ContentPageWrite(Request):
    title: Annotated[str, Meta(min_length=1, max_length=200)]
    body: Annotated[str, Meta(min_length=1, max_length=60_000, description="markdown; the whole request is capped at 64 KiB")]
    version: Annotated[str, Meta(min_length=1, max_length=32)] = "1"


class FaqWrite(Request):
    question: Annotated[str, Meta(min_length=1, max_length=300)]
    answer: Annotated[str, Meta(min_length=1, max_length=10_000)]
    category: Annotated[str, Meta(min_length=1, max_length=40, pattern=r"^[a-z0-9_\-]+$")] = "general"
    sort_order: SortOrder = 0
    is_active: bool = True


class FaqAdminView(Response):
    id: uuid.UUID
    category: str
    question: str
    answer: str
    sort_order: int
    is_active: bool
    updated_at: datetime


class BannerWrite(Request):
    title: Annotated[str, Meta(min_length=1, max_length=120)]
    image_url: HttpUrl
    link_url: HttpUrl | None = None
    sort_order: SortOrder = 0
    is_active: bool = True
    starts_at: AwareTime | None = None
    ends_at: AwareTime | None = None


class BannerAdminView(Response):
    id: uuid.UUID
    title: str
    image_url: str
    link_url: str | None
    sort_order: int
    is_active: bool
    starts_at: datetime | None
    ends_at: datetime | None
    created_at: datetime


class CountryWrite(Request):
    code: Annotated[str, Meta(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")]
    name: Annotated[str, Meta(min_length=1, max_length=80)]
    dial_code: Annotated[str, Meta(pattern=r"^\+[0-9]{1,6}$")]
    flag: Annotated[str, Meta(min_length=1, max_length=8)] | None = None
    sort_order: SortOrder = 0
    is_active: bool = True


class CountryAdminView(Response):
    id: uuid.UUID
    code: str
    name: str
    dial_code: str
    flag: str | None
    sort_order: int
    is_active: bool


class ContactWrite(Request):
    kind: ContactKind
    label: Annotated[str, Meta(min_length=1, max_length=80)]
    value: Annotated[str, Meta(min_length=1, max_length=300)]
    sort_order: SortOrder = 0


class ContactAdminView(Response):
    id: uuid.UUID
    kind: str
    label: str
    value: str
    sort_order: int
    updated_at: datetime


class AppVersionWrite(Request):
    latest_version: Version
    min_supported_version: Version
    store_url: HttpUrl | None = None
    release_notes: Annotated[str, Meta(max_length=10_000)] | None = None


class AppUpdateWrite(Request):
    version: Version
    title: Annotated[str, Meta(min_length=1, max_length=200)]
    notes: Annotated[str, Meta(min_length=1, max_length=10_000)]
    released_at: AwareTime


class AppUpdateAdminView(Response):
    id: uuid.UUID
    version: str
    title: str
    notes: str
    released_at: datetime


# --- system ----------------------------------------------------------------------------------


class SystemLogView(Response):
    id: int
    level: str
    logger: str
    message: str
    created_at: datetime


class SystemLogPage(Response):
    items: list[SystemLogView]
    page: int
    page_size: int
    total: int


class DeliveryView(Response):
    id: uuid.UUID
    notification_id: uuid.UUID
    user_id: uuid.UUID
    channel: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    sent_at: datetime | None
    created_at: datetime


class DeliveryPage(Response):
    items: list[DeliveryView]
    page: int
    page_size: int
    total: int


class SmsFcmLogView(Response):
    id: uuid.UUID
    user_id: uuid.UUID | None
    channel: str
    recipient: str
    purpose: str
    provider: str
    status: str
    created_at: datetime


class SmsFcmLogPage(Response):
    items: list[SmsFcmLogView]
    page: int
    page_size: int
    total: int


# --- achievements ----------------------------------------------------------------------------


class AchievementWrite(Request):
    code: Annotated[str, Meta(min_length=2, max_length=40, pattern=r"^[a-z0-9_\-]+$")]
    name: Annotated[str, Meta(min_length=1, max_length=80)]
    description: Annotated[str, Meta(min_length=1, max_length=300)]
    metric: AchievementMetric
    threshold: Annotated[int, Meta(ge=1, le=1_000_000)]
    points: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    sort_order: SortOrder = 0
    is_active: bool = True


class AchievementAdminView(Response):
    id: uuid.UUID
    code: str
    name: str
    description: str
    metric: str
    threshold: int
    points: int
    sort_order: int
    is_active: bool
    unlocked_by: int


class AchievementAdminPage(Response):
    items: list[AchievementAdminView]
    page: int
    page_size: int
    total: int


class UnlockView(Response):
    user_id: uuid.UUID
    phone: str | None
    full_name: str | None
    progress: int
    unlocked_at: datetime


class UnlockPage(Response):
    items: list[UnlockView]
    page: int
    page_size: int
    total: int

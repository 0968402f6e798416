"""Request and response bodies of the app's content, profile, station, notification, rental-extra
and social endpoints (the rest live in schemas.py). Same rules: requests forbid unknown fields,
money is integer minor units next to its currency.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from powerbank.http.schemas import DeviceId, IdempotencyKey, Platform, Request, Response

AppPlatform = Literal["ios", "android", "web", "other"]
Version = Annotated[str, Meta(pattern=r"^[0-9]+(\.[0-9]+){0,3}$", max_length=32, description="dotted version, e.g. 2.4.1")]
Email = Annotated[str, Meta(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=254)]
FullName = Annotated[str, Meta(min_length=1, max_length=120)]
Description = Annotated[str, Meta(max_length=1000)]
Latitude = Annotated[float, Meta(ge=-90, le=90)]
Longitude = Annotated[float, Meta(ge=-180, le=180)]


# --- content ------------------------------------------------------------------------------


class AppVersionView(Response):
    platform: str
    latest_version: str
    min_supported_version: str
    store_url: str | None
    release_notes: str | None
    # Only when the caller says which version it runs (`current`).
    update_available: bool | None = None
    update_required: bool | None = None


class BannerView(Response):
    id: uuid.UUID
    title: str
    image_url: str
    link_url: str | None
    sort_order: int
    starts_at: datetime | None
    ends_at: datetime | None


class CountryView(Response):
    code: str
    name: str
    dial_code: str
    flag: str | None


class ContentPageView(Response):
    slug: str
    title: str
    body: str
    version: str
    updated_at: datetime


class ContactView(Response):
    kind: str
    label: str
    value: str


class FaqView(Response):
    id: uuid.UUID
    category: str
    question: str
    answer: str


class AppUpdateView(Response):
    version: str
    title: str
    notes: str
    released_at: datetime


class MediaView(Response):
    id: uuid.UUID
    purpose: str
    content_type: str
    size_bytes: int
    sha256: str
    created_at: datetime


# --- devices, profile, KYC -------------------------------------------------------------------


class DeviceRequest(Request):
    device_id: DeviceId
    platform: Platform = "other"
    push_token: Annotated[str, Meta(min_length=1, max_length=500)] | None = None
    app_version: Version | None = None


class DeviceView(Response):
    id: uuid.UUID
    device_id: str
    platform: str
    push_token_set: bool
    app_version: str | None
    last_seen_at: datetime
    created_at: datetime


class ProfilePut(Request):
    """Replaces every editable field: an omitted field becomes empty."""

    full_name: FullName | None = None
    email: Email | None = None
    avatar_media_id: uuid.UUID | None = None


class ProfilePatch(Request):
    """Changes only the fields present; null empties one."""

    full_name: FullName | None | msgspec.UnsetType = msgspec.UNSET
    email: Email | None | msgspec.UnsetType = msgspec.UNSET
    avatar_media_id: uuid.UUID | None | msgspec.UnsetType = msgspec.UNSET


class ProfileView(Response):
    user_id: uuid.UUID
    phone: str | None
    full_name: str | None
    email: str | None
    avatar_media_id: uuid.UUID | None
    kyc_status: str
    created_at: datetime


class AccountDeleted(Response):
    user_id: uuid.UUID
    status: str
    erased: list[str]


KycDocumentType = Literal["national_id", "passport", "driving_license", "citizenship"]


class KycSubmit(Request):
    document_type: KycDocumentType
    document_number: Annotated[str, Meta(min_length=3, max_length=64, pattern=r"^[A-Za-z0-9 /-]+$")]
    full_name: FullName
    date_of_birth: Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")] | None = None
    document_front_id: uuid.UUID | None = None
    document_back_id: uuid.UUID | None = None
    selfie_id: uuid.UUID | None = None


class KycPatch(Request):
    document_type: KycDocumentType | msgspec.UnsetType = msgspec.UNSET
    document_number: Annotated[str, Meta(min_length=3, max_length=64, pattern=r"^[A-Za-z0-9 /-]+$")] | msgspec.UnsetType = msgspec.UNSET
    full_name: FullName | msgspec.UnsetType = msgspec.UNSET
    date_of_birth: Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")] | None | msgspec.UnsetType = msgspec.UNSET
    document_front_id: uuid.UUID | None | msgspec.UnsetType = msgspec.UNSET
    document_back_id: uuid.UUID | None | msgspec.UnsetType = msgspec.UNSET
    selfie_id: uuid.UUID | None | msgspec.UnsetType = msgspec.UNSET


class KycStatusView(Response):
    # not_submitted, pending, approved or rejected
    status: str
    document_type: str | None
    # Only the last four characters: the number itself never leaves the server again.
    document_number_last4: str | None
    submitted_at: datetime | None
    reviewed_at: datetime | None
    rejection_reason: str | None


class UsageStats(Response):
    rentals_total: int
    rentals_completed: int
    rentals_cancelled: int
    rentals_open: int
    minutes_rented_total: int
    quick_returns: int
    stations_used: int
    currency: str | None
    charged_minor_total: int
    due_minor_total: int
    wallet_debits_minor: int
    wallet_credits_minor: int
    points_earned: int
    points_spent: int
    first_rental_at: datetime | None
    last_rental_at: datetime | None


# --- stations: favourites and issues ---------------------------------------------------------


class FavoriteView(Response):
    station_id: uuid.UUID
    serial: str
    name: str
    address: str | None
    status: str
    latitude: float
    longitude: float
    available_banks: int
    favorited_at: datetime


StationIssueKind = Literal["no_bank_ejected", "station_offline", "damaged", "dirty", "slot_stuck", "other"]


class StationIssueRequest(Request):
    kind: StationIssueKind
    description: Description | None = None
    media_id: uuid.UUID | None = None


class StationIssueView(Response):
    id: uuid.UUID
    station_sn: str
    kind: str
    description: str | None
    status: str
    has_media: bool
    created_at: datetime


class StationIssuePage(Response):
    items: list[StationIssueView]
    page: int
    page_size: int
    total: int


# --- notifications -------------------------------------------------------------------------


class NotificationView(Response):
    id: uuid.UUID
    kind: str
    title: str
    body: str
    data: dict[str, object]
    read: bool
    read_at: datetime | None
    created_at: datetime


class NotificationPage(Response):
    items: list[NotificationView]
    page: int
    page_size: int
    total: int
    unread: int


class MarkedRead(Response):
    marked: int
    unread: int


# --- rentals: cancel, extend, location, issues ------------------------------------------------


class ExtendRentalRequest(Request):
    """Buy `periods` more of the rental's package time, paid now from the wallet."""

    periods: Annotated[int, Meta(ge=1, le=48)] = 1
    # The same key is the same extension: a retried request pays and extends once.
    idempotency_key: IdempotencyKey | None = None


class RentalExtensionView(Response):
    id: uuid.UUID
    rental_id: uuid.UUID
    minutes: int
    price_minor: int
    currency: str
    due_at_before: datetime
    due_at_after: datetime
    created_at: datetime


class LocationRequest(Request):
    latitude: Latitude
    longitude: Longitude
    accuracy_m: Annotated[float, Meta(ge=0, le=100_000)] | None = None
    # When the phone took the fix (with its UTC offset); defaults to when it arrived.
    recorded_at: Annotated[datetime, Meta(tz=True)] | None = None


class LocationRecorded(Response):
    rental_id: uuid.UUID
    recorded_at: datetime


RentalIssueKind = Literal["bank_faulty", "bank_not_charging", "not_ejected", "cannot_return", "wrong_charge", "other"]


class RentalIssueRequest(Request):
    kind: RentalIssueKind
    description: Description | None = None
    media_id: uuid.UUID | None = None


class RentalIssueView(Response):
    id: uuid.UUID
    rental_id: uuid.UUID
    kind: str
    description: str | None
    status: str
    created_at: datetime


# --- social --------------------------------------------------------------------------------


class LeaderboardEntry(Response):
    rank: int
    # First name and the initial of the last: never a phone, never a full name.
    display_name: str
    rentals_completed: int
    minutes_total: int
    is_you: bool


class Leaderboard(Response):
    period: str
    computed_at: datetime
    items: list[LeaderboardEntry]
    you: LeaderboardEntry | None


class AchievementView(Response):
    code: str
    name: str
    description: str
    metric: str
    threshold: int
    points: int
    progress: int
    unlocked: bool
    unlocked_at: datetime | None


class NotificationPreferencesView(Response):
    push_enabled: bool
    sms_enabled: bool
    # Kinds whose push and SMS are silenced (the inbox still gets them; critical ones still go out).
    muted_kinds: list[str]
    language: str
    # Every kind there is, to build the settings screen from.
    kinds: list[str]


class NotificationPreferencesChange(Request):
    push_enabled: bool | None = None
    sms_enabled: bool | None = None
    muted_kinds: Annotated[list[Annotated[str, Meta(min_length=1, max_length=40)]], Meta(max_length=50)] | None = None
    language: Annotated[str, Meta(pattern=r"^[a-z]{2}(-[A-Z]{2})?$")] | None = None

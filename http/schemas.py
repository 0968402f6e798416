"""Request and response bodies. Requests forbid unknown fields, so a typo (`amount` for
`amount_minor`) is a validation error instead of a silently ignored value. Money is always an
integer in minor units next to its ISO 4217 currency.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# E.164: a plus, a country code that does not start with 0, at most 15 digits in all.
PHONE_PATTERN = r"^\+[1-9][0-9]{6,14}$"
Phone = Annotated[str, Meta(pattern=PHONE_PATTERN, description="E.164 phone number, e.g. +9779812345678")]
OtpCode = Annotated[str, Meta(pattern=r"^[0-9]{6}$", description="the 6-digit code sent by SMS")]
Currency = Annotated[str, Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]
DeviceId = Annotated[str, Meta(min_length=1, max_length=128)]
IdempotencyKey = Annotated[str, Meta(min_length=1, max_length=100)]
Platform = Literal["ios", "android", "web", "other"]
OtpPurpose = Literal["login", "register"]


class Request(msgspec.Struct, forbid_unknown_fields=True):
    """Base for request bodies."""


class Response(msgspec.Struct, omit_defaults=False):
    """Base for response bodies."""


# --- auth ---------------------------------------------------------------------------------


class OtpRequest(Request):
    phone: Phone
    purpose: OtpPurpose


class OtpSent(Response, omit_defaults=True):
    phone: str
    purpose: str
    expires_in_s: int
    # Only when POWERBANK_OTP_ECHO=1 (development and the demo's simulated riders).
    debug_code: str | None = None


class RegisterRequest(Request):
    phone: Phone
    code: OtpCode
    full_name: Annotated[str, Meta(min_length=1, max_length=120)] | None = None
    device_id: DeviceId | None = None
    platform: Platform = "other"


class LoginRequest(Request):
    phone: Phone
    code: OtpCode
    device_id: DeviceId | None = None
    platform: Platform = "other"


class VerifyOtpRequest(Request):
    """Verifies a code and signs in: `purpose` register creates the account, login opens a session."""

    phone: Phone
    code: OtpCode
    purpose: OtpPurpose
    full_name: Annotated[str, Meta(min_length=1, max_length=120)] | None = None
    device_id: DeviceId | None = None
    platform: Platform = "other"


class RefreshRequest(Request):
    refresh_token: Annotated[str, Meta(min_length=1, max_length=4096)]


class UserView(Response):
    id: uuid.UUID
    phone: str | None
    role: str
    status: str
    referral_code: str
    full_name: str | None
    email: str | None
    created_at: datetime


class TokenPair(Response):
    access_token: str
    refresh_token: str
    expires_in_s: int
    user: UserView
    token_type: str = "bearer"


# --- stations and packages ----------------------------------------------------------------


class StationSummary(Response):
    id: uuid.UUID
    serial: str
    name: str
    address: str | None
    latitude: float
    longitude: float
    status: str
    slot_count: int
    # Banks a person could rent now: in an occupied slot and charged at least the minimum.
    available_banks: int
    empty_slots: int
    last_seen_at: datetime | None
    distance_m: float | None = None


class StationPage(Response):
    items: list[StationSummary]
    page: int
    page_size: int
    total: int


class SlotView(Response):
    slot_number: int
    status: str
    power_bank_serial: str | None
    charge_percent: int | None
    rentable: bool


class StationMediaView(Response):
    kind: str
    url: str
    caption: str | None


class AmenityView(Response):
    code: str
    name: str
    icon: str | None
    note: str | None


class StationDetail(StationSummary, kw_only=True):
    slots: list[SlotView]
    media: list[StationMediaView] = msgspec.field(default_factory=list)
    amenities: list[AmenityView] = msgspec.field(default_factory=list)


class PackageView(Response):
    id: uuid.UUID
    code: str
    name: str
    duration_minutes: int
    price_minor: int
    currency: str
    grace_minutes: int
    late_fee_per_hour_minor: int
    late_fee_daily_cap_minor: int
    max_duration_minutes: int


class HealthView(Response):
    status: str
    database: str
    time: datetime


# --- money --------------------------------------------------------------------------------


class WalletView(Response):
    currency: str
    balance_minor: int
    held_minor: int
    available_minor: int
    points: int
    points_held: int
    # What the spendable points pay for at the configured ratio, in the wallet's currency.
    points_value_minor: int = 0


# --- points and hybrid payment ----------------------------------------------------------------

RentalPaymentMode = Literal["wallet", "card"]
PaymentModeName = Literal["points_first", "wallet_first", "wallet_only", "points_only"]
# Below 2**53 so every amount survives a JavaScript client, far above any real charge.
AmountMinor = Annotated[int, Meta(gt=0, le=10**12, description="integer amount in minor units")]


class PointsRatioView(Response):
    """`points` points are worth `minor_units` minor units of the wallet's currency."""

    points: int
    minor_units: int


class PointsEntry(Response):
    id: uuid.UUID
    kind: str
    points: int  # signed: earned > 0, spent < 0
    balance_after: int
    rental_id: uuid.UUID | None
    description: str | None
    created_at: datetime


class PointsHistoryPage(Response):
    items: list[PointsEntry]
    page: int
    page_size: int
    total: int


class PointsSummary(Response):
    points: int
    points_held: int
    value_minor: int
    currency: str
    ratio: PointsRatioView
    earned_total: int
    spent_total: int
    earned_by_kind: dict[str, int]


class CalculateOptionsRequest(Request):
    """Exactly one of: a package (its price), a rental (its due), or an amount with its currency."""

    package_id: uuid.UUID | None = None
    rental_id: uuid.UUID | None = None
    amount_minor: AmountMinor | None = None
    currency: Currency | None = None


class PaymentOption(Response):
    mode: str
    points: int
    points_minor: int
    wallet_minor: int
    shortfall_minor: int
    sufficient: bool


class PaymentOptions(Response):
    purpose: str  # package | due | amount
    amount_minor: int
    currency: str
    wallet_available_minor: int
    points_available: int
    points_value_minor: int
    ratio: PointsRatioView
    options: list[PaymentOption]


class PayDueRequest(Request):
    payment_mode: PaymentModeName = "points_first"
    # The same key from the same person is the same payment; without one the due itself makes
    # a repeat harmless (a rental's due is paid at most once).
    idempotency_key: IdempotencyKey | None = None


class PayDueResult(Response):
    rental_id: uuid.UUID
    paid_minor: int
    wallet_minor: int
    points: int
    already_paid: bool
    due_minor: int
    wallet: WalletView


class CreditRequest(Request):
    amount_minor: Annotated[int, Meta(gt=0, le=10**12)]
    currency: Currency
    reason: Annotated[str, Meta(min_length=1, max_length=200)]
    idempotency_key: IdempotencyKey | None = None


class CreditResult(Response):
    user_id: uuid.UUID
    transfer_id: uuid.UUID
    amount_minor: int
    currency: str
    wallet: WalletView


class StationCredentials(Response):
    """A station's MQTT login, issued once: only its hash is kept, so a lost password is
    replaced, never read back. A broker running elsewhere may accept the previous one for
    up to `previous_valid_up_to_s` (its credential cache)."""

    station_id: uuid.UUID
    serial: str
    username: str
    password: str
    topic_prefix: str
    previous_valid_up_to_s: int


class StatusChangeView(Response):
    from_status: str
    to_status: str
    # boot, heartbeat or another message kind (it came back), last_will, silent (3 missed
    # heartbeats), or an operator action.
    reason: str
    changed_at: datetime
    # How long the station stayed in `to_status`: until the next change, or until now.
    lasted_s: float


class StationStatusHistory(Response):
    """A station's status changes, newest first, for the operator chasing a flaky kiosk."""

    station_id: uuid.UUID
    serial: str
    status: str
    items: list[StatusChangeView]
    page: int
    page_size: int
    total: int


# --- rentals ------------------------------------------------------------------------------


class StartRentalRequest(Request):
    station_sn: Annotated[str, Meta(min_length=1, max_length=32)]
    package_id: uuid.UUID
    # The same key from the same person names the same rental: a retried request starts nothing new.
    idempotency_key: IdempotencyKey | None = None
    # "wallet": the price is held from the wallet (and points); "card": authorised on the saved card.
    payment_mode: RentalPaymentMode = "wallet"
    # Take the bank held by this (confirmed) reservation of yours at this station.
    reservation_id: uuid.UUID | None = None


class RentalView(Response):
    id: uuid.UUID
    status: str
    station_id: uuid.UUID
    station_sn: str | None
    package_id: uuid.UUID
    package_code: str | None
    power_bank_serial: str | None
    slot_number: int | None
    return_station_sn: str | None
    currency: str
    hold_minor: int
    fee_minor: int
    charged_minor: int
    due_minor: int
    quick_return: bool
    cancel_reason: str | None
    started_at: datetime | None
    due_at: datetime | None
    returned_at: datetime | None
    created_at: datetime


class RentalPage(Response):
    items: list[RentalView]
    page: int
    page_size: int
    total: int


class RentalRefused(Response):
    """409 body of a refused start: `error` is the reason (insufficient_funds, no_bank_available...)."""

    error: str
    detail: str
    rental: RentalView | None = None


# --- reservations ---------------------------------------------------------------------------


class ReserveRequest(Request):
    station_sn: Annotated[str, Meta(min_length=1, max_length=32)]


class ReservationView(Response):
    id: uuid.UUID
    status: str
    station_id: uuid.UUID
    station_sn: str
    slot_number: int | None
    expires_at: datetime | None
    rental_id: uuid.UUID | None
    cancel_reason: str | None
    created_at: datetime

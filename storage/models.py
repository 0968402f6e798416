"""The tables. Names follow the endpoint map in the brief (seed 002), in snake case.

Rules kept throughout: UUID keys for entities, timezone-aware UTC timestamps, money as integer
minor units with a currency, CHECK constraints on every enumerated or bounded column, an explicit
ON DELETE on every foreign key, and an index on every foreign key, status and time column that a
query filters by.

Who writes what: the Station actor owns `stations`, `station_slots`, `station_events`,
`station_status_changes` and the location columns of `power_banks`; the Rental actor owns
`rentals`; the Wallet actor owns `wallets`, `ledger_accounts` and `ledger_transfers`. Other code
reads them, never writes them.
The promotions tables (`coupons`, `coupon_usages`, `referrals`) are written by the HTTP
requests that apply a coupon or claim a referral, each in one transaction (actors/promotions.py).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    BigInteger,
    Float,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from powerbank.storage.types import BigSerial, JSONDoc, UTCDateTime, new_id, utcnow

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONDoc, uuid.UUID: Uuid()}


def one_of(column: str, values: tuple[str, ...], name: str | None = None) -> CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=name or f"{column}_valid")


def created_at_column() -> Mapped[datetime]:
    return mapped_column(default=utcnow)


def updated_at_column() -> Mapped[datetime]:
    return mapped_column(default=utcnow, onupdate=utcnow)


# --- people -------------------------------------------------------------------------------

USER_ROLES = ("user", "operator", "admin", "superadmin")
USER_STATUSES = ("active", "blocked", "deleted")


class Tenant(Base):
    """An operator: a company that owns stations (seed 003's Tenant). Staff with the role
    `operator` belong to one and see and manage only its stations; admins see every tenant."""

    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(150), unique=True)
    # URL-friendly and stable: admin URLs and exports name a tenant by it.
    slug: Mapped[str] = mapped_column(String(160), unique=True)
    email: Mapped[str | None] = mapped_column(String(254))
    url: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        one_of("role", USER_ROLES),
        one_of("status", USER_STATUSES),
        Index(None, "status"),
        Index(None, "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    # Null after account deletion: the row stays so money and audit records keep their subject.
    phone: Mapped[str | None] = mapped_column(String(20), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="user")
    status: Mapped[str] = mapped_column(String(16), default="active")
    referral_code: Mapped[str] = mapped_column(String(16), unique=True)
    max_active_rentals: Mapped[int] = mapped_column(Integer, default=1)
    # The operator a staff member works for; null for riders and platform admins. A tenant with
    # people in it cannot be deleted (RESTRICT), as in seed 003.
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()
    last_login_at: Mapped[datetime | None]


class UserProfile(Base):
    __tablename__ = "user_profiles"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    full_name: Mapped[str | None] = mapped_column(String(120))
    email: Mapped[str | None] = mapped_column(String(254))
    avatar_url: Mapped[str | None] = mapped_column(String(500))
    # An upload (purpose avatar) the person chose as their picture.
    avatar_media_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("media_uploads.id", ondelete="SET NULL"), index=True
    )
    updated_at: Mapped[datetime] = updated_at_column()


class UserDevice(Base):
    __tablename__ = "user_devices"
    __table_args__ = (
        UniqueConstraint("user_id", "device_id"),
        one_of("platform", ("ios", "android", "web", "other")),
        Index(None, "user_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(128))
    platform: Mapped[str] = mapped_column(String(16), default="other")
    push_token: Mapped[str | None] = mapped_column(String(500))
    app_version: Mapped[str | None] = mapped_column(String(32))
    # Refresh tokens are rotated per device; a reused one revokes the whole family.
    refresh_family: Mapped[uuid.UUID | None]
    refresh_jti: Mapped[uuid.UUID | None]
    revoked_at: Mapped[datetime | None]
    last_seen_at: Mapped[datetime] = created_at_column()
    created_at: Mapped[datetime] = created_at_column()


class OtpChallenge(Base):
    """A one-time code sent to a phone; only its hash is kept."""

    __tablename__ = "otp_challenges"
    __table_args__ = (
        one_of("purpose", ("login", "register")),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        Index(None, "phone", "created_at"),
        Index(None, "expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    phone: Mapped[str] = mapped_column(String(20))
    purpose: Mapped[str] = mapped_column(String(16))
    code_hash: Mapped[str] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime]
    consumed_at: Mapped[datetime | None]
    requester_ip: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = created_at_column()


class SmsFcmLog(Base):
    """Every SMS or push message handed to a provider (the default provider only logs)."""

    __tablename__ = "sms_fcm_log"
    __table_args__ = (
        one_of("channel", ("sms", "fcm")),
        one_of("status", ("queued", "sent", "failed")),
        Index(None, "user_id"),
        Index(None, "created_at"),
        Index(None, "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    channel: Mapped[str] = mapped_column(String(8))
    recipient: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    provider: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    created_at: Mapped[datetime] = created_at_column()


# --- configuration --------------------------------------------------------------------------


class AppConfig(Base):
    __tablename__ = "app_config"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]]
    description: Mapped[str | None] = mapped_column(String(300))
    updated_at: Mapped[datetime] = updated_at_column()


class RentalPackage(Base):
    __tablename__ = "rental_packages"
    __table_args__ = (
        CheckConstraint("duration_minutes > 0", name="duration_positive"),
        CheckConstraint("price_minor >= 0", name="price_non_negative"),
        CheckConstraint("grace_minutes >= 0", name="grace_non_negative"),
        CheckConstraint("late_fee_per_hour_minor >= 0", name="late_fee_non_negative"),
        CheckConstraint("late_fee_daily_cap_minor >= 0", name="late_cap_non_negative"),
        CheckConstraint("max_duration_minutes >= duration_minutes", name="max_after_duration"),
        CheckConstraint("length(currency) = 3", name="currency_iso"),
        Index(None, "is_active"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(80))
    duration_minutes: Mapped[int] = mapped_column(Integer)
    price_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    grace_minutes: Mapped[int] = mapped_column(Integer, default=5)
    late_fee_per_hour_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    late_fee_daily_cap_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    # Past this a bank counts as lost and its price is charged.
    max_duration_minutes: Mapped[int] = mapped_column(Integer)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    sort_order: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = created_at_column()


# --- stations and banks -----------------------------------------------------------------------

STATION_STATUSES = ("online", "offline", "maintenance")
SLOT_STATUSES = ("empty", "occupied", "ejecting", "fault")
BANK_STATUSES = ("in_slot", "ejecting", "rented", "lost", "faulty")


class Station(Base):
    __tablename__ = "stations"
    __table_args__ = (
        one_of("status", STATION_STATUSES),
        CheckConstraint("slot_count BETWEEN 1 AND 64", name="slot_count_range"),
        CheckConstraint("latitude BETWEEN -90 AND 90", name="latitude_range"),
        CheckConstraint("longitude BETWEEN -180 AND 180", name="longitude_range"),
        Index(None, "status"),
        Index(None, "latitude", "longitude"),
        Index(None, "last_seen_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    serial: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(120))
    address: Mapped[str | None] = mapped_column(String(300))
    latitude: Mapped[float] = mapped_column(Float)
    longitude: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="offline")
    slot_count: Mapped[int] = mapped_column(Integer)
    firmware_version: Mapped[str | None] = mapped_column(String(32))
    hardware_version: Mapped[str | None] = mapped_column(String(32))
    # MQTT credentials: the station logs in with its serial and this password (a salted hash,
    # broker/embedded.py; older rows may hold argon2).
    mqtt_password_hash: Mapped[str | None] = mapped_column(String(200))
    heartbeat_interval_s: Mapped[int] = mapped_column(Integer, default=30)
    last_heartbeat_at: Mapped[datetime | None]
    last_seen_at: Mapped[datetime | None]
    # Highest event sequence number applied; (station, seq) makes every event idempotent.
    last_event_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # Estimated (receive time - station clock) from the latest boot or heartbeat; added to a
    # station timestamp to put it on the server's clock. Null until the first estimate.
    clock_offset_ms: Mapped[int | None] = mapped_column(BigInteger)
    # The operator that owns the kiosk; null while the platform runs it itself.
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class PowerBank(Base):
    __tablename__ = "power_banks"
    __table_args__ = (
        one_of("status", BANK_STATUSES),
        CheckConstraint("charge_percent BETWEEN 0 AND 100", name="charge_range"),
        CheckConstraint("price_minor >= 0", name="price_non_negative"),
        Index(None, "status"),
        Index(None, "station_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    serial: Mapped[str] = mapped_column(String(32), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="in_slot")
    charge_percent: Mapped[int] = mapped_column(Integer, default=100)
    capacity_mah: Mapped[int] = mapped_column(Integer, default=5000)
    # Charged when the bank is lost.
    price_minor: Mapped[int] = mapped_column(BigInteger, default=250000)
    currency: Mapped[str] = mapped_column(String(3))
    station_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("stations.id", ondelete="SET NULL")
    )
    # The rental the bank went out on, recorded by the ejecting station itself, so a return
    # seconds later is recognised even before the Rental actor has heard of the eject. No
    # foreign key: rentals already reference power_banks, and the cycle buys nothing.
    rental_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    updated_at: Mapped[datetime] = updated_at_column()


class StationSlot(Base):
    __tablename__ = "station_slots"
    __table_args__ = (
        UniqueConstraint("station_id", "slot_number"),
        one_of("status", SLOT_STATUSES),
        CheckConstraint("slot_number >= 1", name="slot_number_positive"),
        # A slot with a bank is occupied or ejecting; an empty slot has none.
        CheckConstraint(
            "(status IN ('occupied', 'ejecting')) = (power_bank_id IS NOT NULL)"
            " OR status = 'fault'",
            name="bank_matches_status",
        ),
        Index(None, "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    station_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    slot_number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="empty")
    # Unique: one bank is in at most one slot anywhere.
    power_bank_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("power_banks.id", ondelete="SET NULL"), unique=True
    )
    # The rental an in-flight eject is for, and the command id the station was sent.
    ejecting_rental_id: Mapped[uuid.UUID | None]
    eject_command_id: Mapped[str | None] = mapped_column(String(64))
    eject_deadline_at: Mapped[datetime | None]
    # 1 for the first eject of a rental at this station, 2 for the one retry.
    eject_attempt: Mapped[int | None] = mapped_column(Integer)
    # The reservation this slot's bank is held for, until when (the Station actor releases it at
    # that time, or the scheduler's sweep does).
    reserved_for_id: Mapped[uuid.UUID | None]
    reserved_until: Mapped[datetime | None]
    # Seq of the newest station event that set this slot; an older event arriving late (reordered)
    # is recorded but does not move the slot back in time.
    last_event_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = updated_at_column()


class StationEvent(Base):
    """Every station event received once, keyed by (station, seq) so re-sends are harmless."""

    __tablename__ = "station_events"
    __table_args__ = (
        UniqueConstraint("station_id", "seq"),
        Index(None, "received_at"),
    )

    id: Mapped[int] = mapped_column(BigSerial, primary_key=True, autoincrement=True)
    station_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]]
    station_time: Mapped[datetime]
    received_at: Mapped[datetime] = created_at_column()


class StationStatusChange(Base):
    """One row per change of a station's status, so an operator can see when and why a station
    went dark and for how long (the `stations` row only holds the present)."""

    __tablename__ = "station_status_changes"
    __table_args__ = (
        one_of("from_status", STATION_STATUSES),
        one_of("to_status", STATION_STATUSES),
        Index(None, "station_id", "changed_at"),
    )

    id: Mapped[int] = mapped_column(BigSerial, primary_key=True, autoincrement=True)
    station_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    from_status: Mapped[str] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    # What moved it: the message kind that proved it alive (boot, heartbeat, ...), last_will,
    # silent (missed heartbeats) or an operator action.
    reason: Mapped[str] = mapped_column(String(32))
    # Server time: when the message arrived or the decision was taken.
    changed_at: Mapped[datetime]


# --- rentals ----------------------------------------------------------------------------------

RENTAL_STATUSES = (
    "pending",  # accepted, funds being held
    "ejecting",  # funds held, the station is ejecting a bank
    "active",
    "overdue",
    "completed",
    "cancelled",
    "lost",
)
RENTAL_FINAL_STATUSES = ("completed", "cancelled", "lost")
# How a rental is paid: held from the wallet (and points), or authorised on the saved card.
RENTAL_PAYMENT_MODES = ("wallet", "card")


class Rental(Base):
    __tablename__ = "rentals"
    __table_args__ = (
        one_of("status", RENTAL_STATUSES),
        one_of("payment_mode", RENTAL_PAYMENT_MODES),
        CheckConstraint("payment_mode = 'card' OR card_intent_id IS NULL", name="card_intent_only_for_card"),
        CheckConstraint("hold_minor >= 0", name="hold_non_negative"),
        CheckConstraint("fee_minor >= 0", name="fee_non_negative"),
        CheckConstraint("charged_minor >= 0", name="charged_non_negative"),
        CheckConstraint("due_minor >= 0", name="due_non_negative"),
        CheckConstraint("length(currency) = 3", name="currency_iso"),
        Index(None, "user_id", "status"),
        Index(None, "status", "due_at"),
        Index(None, "station_id"),
        Index(None, "return_station_id"),
        Index(None, "power_bank_id"),
        Index(None, "package_id"),
        Index(None, "created_at"),
        Index(None, "card_intent_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    station_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stations.id", ondelete="RESTRICT"))
    package_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("rental_packages.id", ondelete="RESTRICT")
    )
    power_bank_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("power_banks.id", ondelete="SET NULL")
    )
    slot_number: Mapped[int | None] = mapped_column(Integer)
    return_station_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("stations.id", ondelete="SET NULL")
    )
    status: Mapped[str] = mapped_column(String(16), default="pending")
    currency: Mapped[str] = mapped_column(String(3))
    hold_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    fee_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    charged_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    due_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    payment_mode: Mapped[str] = mapped_column(String(8), default="wallet", server_default="wallet")
    # The manual-capture PaymentIntent authorised for a card rental (payment_mode "card").
    card_intent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("payment_intents.id", ondelete="RESTRICT")
    )
    quick_return: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_reason: Mapped[str | None] = mapped_column(String(64))
    # The reservation this rental takes its bank from, if it began as one.
    reservation_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("reservations.id", ondelete="SET NULL"), index=True)
    started_at: Mapped[datetime | None]
    due_at: Mapped[datetime | None]
    returned_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


# --- money ------------------------------------------------------------------------------------

ACCOUNT_KINDS = (
    "user_wallet",
    "user_points",
    "holds",
    "provider_clearing",
    "platform_revenue",
    "operator_payable",
    "admin_adjustments",
)
TRANSFER_STATES = ("posted", "pending", "voided")


class LedgerAccount(Base):
    """A double-entry account. Balances are kept as posted and pending debit/credit totals.

    A credit-normal account with `no_overdraft` can never have its debits (posted plus pending)
    exceed its posted credits; the database enforces that as well as the Wallet actor.
    """

    __tablename__ = "ledger_accounts"
    __table_args__ = (
        one_of("kind", ACCOUNT_KINDS),
        CheckConstraint("length(currency) = 3", name="currency_iso"),
        CheckConstraint(
            "debits_posted >= 0 AND credits_posted >= 0"
            " AND debits_pending >= 0 AND credits_pending >= 0",
            name="totals_non_negative",
        ),
        CheckConstraint(
            "NOT no_overdraft OR debits_posted + debits_pending <= credits_posted",
            name="no_overdraft",
        ),
        Index(None, "user_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    code: Mapped[str] = mapped_column(String(120), unique=True)
    kind: Mapped[str] = mapped_column(String(24))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    currency: Mapped[str] = mapped_column(String(3))
    no_overdraft: Mapped[bool] = mapped_column(Boolean, default=False)
    debits_posted: Mapped[int] = mapped_column(BigInteger, default=0)
    credits_posted: Mapped[int] = mapped_column(BigInteger, default=0)
    debits_pending: Mapped[int] = mapped_column(BigInteger, default=0)
    credits_pending: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = created_at_column()


class LedgerTransfer(Base):
    """An immutable movement between two accounts, idempotent by id.

    Two-phase holds: a `pending` transfer reserves funds; a later transfer with `pending_id` set
    posts it (possibly for less) or voids it, exactly once. The pending row's state records which.
    """

    __tablename__ = "ledger_transfers"
    __table_args__ = (
        one_of("state", TRANSFER_STATES),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint("debit_account_id <> credit_account_id", name="distinct_accounts"),
        CheckConstraint("length(currency) = 3", name="currency_iso"),
        Index(None, "debit_account_id", "created_at"),
        Index(None, "credit_account_id", "created_at"),
        Index(None, "rental_id"),
        # At most one resolution (post or void) per pending transfer.
        UniqueConstraint("pending_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    debit_account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("ledger_accounts.id", ondelete="RESTRICT")
    )
    credit_account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("ledger_accounts.id", ondelete="RESTRICT")
    )
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    pending_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("ledger_transfers.id", ondelete="RESTRICT")
    )
    rental_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("rentals.id", ondelete="SET NULL")
    )
    description: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = created_at_column()


class Wallet(Base):
    """A person's money and points: two ledger accounts owned by one Wallet actor."""

    __tablename__ = "wallets"
    __table_args__ = (CheckConstraint("length(currency) = 3", name="currency_iso"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="RESTRICT"), unique=True
    )
    currency: Mapped[str] = mapped_column(String(3))
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("ledger_accounts.id", ondelete="RESTRICT"), unique=True
    )
    points_account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("ledger_accounts.id", ondelete="RESTRICT"), unique=True
    )
    created_at: Mapped[datetime] = created_at_column()


# --- promotions: coupons and referrals --------------------------------------------------------
#
# A coupon's `uses` counter is the one row every applier of that coupon writes, so its limit is a
# database fact: a conditional `UPDATE ... SET uses = uses + 1 WHERE uses < max_uses` in the same
# transaction as the usage row, backed by a CHECK. Points a coupon or a referral earns move later,
# as Wallet-actor commands accepted in that same transaction (actors/promotions.py).

COUPON_KINDS = ("points", "discount_percent", "discount_minor")
REFERRAL_STATUSES = ("claimed", "revoked")


class Coupon(Base):
    """A promotional code. `value` is points (kind points), a percentage 1-100 (discount_percent)
    or an amount in minor units of `currency` (discount_minor)."""

    __tablename__ = "coupons"
    __table_args__ = (
        one_of("kind", COUPON_KINDS),
        CheckConstraint("value > 0", name="value_positive"),
        CheckConstraint("kind <> 'discount_percent' OR value <= 100", name="percent_at_most_100"),
        CheckConstraint(
            "(kind = 'discount_minor') = (currency IS NOT NULL)", name="currency_iff_money"
        ),
        CheckConstraint("currency IS NULL OR length(currency) = 3", name="currency_iso"),
        CheckConstraint("max_uses IS NULL OR max_uses > 0", name="max_uses_positive"),
        CheckConstraint("uses >= 0", name="uses_non_negative"),
        CheckConstraint("max_uses IS NULL OR uses <= max_uses", name="uses_within_max"),
        CheckConstraint("per_user_limit > 0", name="per_user_limit_positive"),
        CheckConstraint(
            "valid_until IS NULL OR valid_from IS NULL OR valid_until > valid_from", name="valid_window"
        ),
        Index(None, "active", "valid_until"),
        Index(None, "created_by"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    # Stored upper-case: people type codes in any case.
    code: Mapped[str] = mapped_column(String(32), unique=True)
    kind: Mapped[str] = mapped_column(String(24))
    value: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    # Null: no overall limit.
    max_uses: Mapped[int | None] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    per_user_limit: Mapped[int] = mapped_column(Integer, default=1)
    valid_from: Mapped[datetime | None]
    valid_until: Mapped[datetime | None]
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str | None] = mapped_column(String(200))
    created_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = created_at_column()


class CouponUsage(Base):
    """One application of a coupon by one person. `use_number` counts that person's uses of
    the coupon from 1; unique with (coupon, user) it makes the per-person limit hold under
    concurrency: two simultaneous applications draw the same number and one insert fails."""

    __tablename__ = "coupon_usages"
    __table_args__ = (
        UniqueConstraint("coupon_id", "user_id", "use_number"),
        CheckConstraint("use_number >= 1", name="use_number_positive"),
        CheckConstraint("points >= 0", name="points_non_negative"),
        Index(None, "user_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    coupon_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("coupons.id", ondelete="RESTRICT"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    use_number: Mapped[int] = mapped_column(Integer, default=1)
    # Points credited for it (0 for discount coupons) and the ledger transfer that carries them.
    points: Mapped[int] = mapped_column(BigInteger, default=0)
    points_transfer_id: Mapped[uuid.UUID | None] = mapped_column(unique=True)
    created_at: Mapped[datetime] = created_at_column()


class Referral(Base):
    """A new person (referee) signed up with someone's (referrer's) code. One per referee, ever;
    both get points, carried by two ledger transfers named after this row."""

    __tablename__ = "referrals"
    __table_args__ = (
        one_of("status", REFERRAL_STATUSES),
        CheckConstraint("referrer_id <> referee_id", name="not_self"),
        CheckConstraint("referrer_points >= 0 AND referee_points >= 0", name="points_non_negative"),
        Index(None, "referrer_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    referrer_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    referee_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), unique=True)
    code: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="claimed")
    referrer_points: Mapped[int] = mapped_column(BigInteger, default=0)
    referee_points: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = created_at_column()


# --- the actor runtime ------------------------------------------------------------------------

ACTOR_KINDS = ("station", "rental", "wallet")
COMMAND_STATUSES = ("pending", "applied", "failed")


class ActorCommand(Base):
    """An entity's mailbox: a command is accepted once this row commits.

    The id orders an entity's commands; (kind, command_id) makes acceptance idempotent, and the
    stored result is what a retried caller gets back.
    """

    __tablename__ = "actor_commands"
    __table_args__ = (
        UniqueConstraint("kind", "command_id"),
        one_of("kind", ACTOR_KINDS),
        one_of("status", COMMAND_STATUSES),
        Index(
            "ix_actor_commands_pending",
            "kind",
            "entity_id",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index(None, "status", "accepted_at"),
    )

    id: Mapped[int] = mapped_column(BigSerial, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[str] = mapped_column(String(64))
    command_id: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(48))
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    result: Mapped[dict[str, Any] | None]
    # Attempts that ended in an unexpected error; the command is retried in place until a limit.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    accepted_at: Mapped[datetime] = created_at_column()
    applied_at: Mapped[datetime | None]


class OutboxMessage(Base):
    """A message to the outside world committed with the state change that caused it."""

    __tablename__ = "outbox_messages"
    __table_args__ = (
        one_of("channel", ("mqtt",)),
        Index(
            "ix_outbox_messages_unsent",
            "id",
            postgresql_where=text("sent_at IS NULL"),
            sqlite_where=text("sent_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigSerial, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))
    topic: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = created_at_column()
    sent_at: Mapped[datetime | None]


# --- payments (the provider side of money) ------------------------------------------------------
#
# The ledger says where money is; these tables say what the payment provider was asked and what it
# answered. The Wallet actor writes `payment_intents`' status, `transactions` and `refunds` in the
# same transaction as the ledger transfer they describe; the HTTP layer only creates an intent row
# (status waiting) before asking the provider, and logs webhooks.

PAYMENT_STATUSES = ("waiting", "preauth", "confirmed", "rejected", "refunded", "error")
PAYMENT_PURPOSES = ("topup", "rental_hold", "due", "auto_refill")
TRANSACTION_TYPES = ("topup", "refund", "rental", "due", "auto_refill")
TRANSACTION_STATUSES = ("pending", "succeeded", "failed", "reversed")
# requested: above the approval threshold, waiting for an admin (nothing reserved yet);
# rejected: an admin declined it (final, nothing was ever reserved).
REFUND_STATUSES = ("requested", "pending", "succeeded", "failed", "rejected")


class PaymentMethod(Base):
    """A configured gateway (seed 003's gateway config): the app offers enabled ones by priority."""

    __tablename__ = "payment_methods"
    __table_args__ = (
        CheckConstraint("min_amount_minor > 0", name="min_positive"),
        CheckConstraint("max_amount_minor >= min_amount_minor", name="max_after_min"),
        Index(None, "enabled", "priority"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(80))
    priority: Mapped[int] = mapped_column(Integer, default=100)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    min_amount_minor: Mapped[int] = mapped_column(BigInteger, default=100)
    max_amount_minor: Mapped[int] = mapped_column(BigInteger, default=10_000_000)
    # Upper-case ISO 4217 codes this gateway accepts, e.g. ["NPR", "USD"].
    currencies: Mapped[list[str]] = mapped_column(JSONDoc, default=list)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class PaymentCustomer(Base):
    """A person's customer at a provider, their saved card and auto-refill setting (seed 000:
    the wallet is tied to a provider customer and refills below a threshold)."""

    __tablename__ = "payment_customers"
    __table_args__ = (
        UniqueConstraint("user_id", "provider"),
        UniqueConstraint("provider", "provider_customer_id"),
        CheckConstraint("auto_refill_threshold_minor >= 0", name="threshold_non_negative"),
        CheckConstraint("auto_refill_amount_minor >= 0", name="refill_non_negative"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(32))
    provider_customer_id: Mapped[str] = mapped_column(String(100))
    saved_payment_method_id: Mapped[str | None] = mapped_column(String(100))
    auto_refill: Mapped[bool] = mapped_column(Boolean, default=False)
    auto_refill_threshold_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    auto_refill_amount_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class PaymentIntent(Base):
    """Our side of one provider payment: what we asked for and the state we last saw (seed 003's
    statuses). The status only moves along `actors.payments.next_status`."""

    __tablename__ = "payment_intents"
    __table_args__ = (
        one_of("status", PAYMENT_STATUSES),
        one_of("purpose", PAYMENT_PURPOSES),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint("amount_received_minor >= 0", name="received_non_negative"),
        CheckConstraint("length(currency) = 3", name="currency_iso"),
        UniqueConstraint("idempotency_key"),
        UniqueConstraint("provider", "provider_intent_id"),
        Index(None, "user_id", "created_at"),
        Index(None, "status", "updated_at"),
        Index(None, "payment_method_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    payment_method_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("payment_methods.id", ondelete="SET NULL")
    )
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    amount_received_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    currency: Mapped[str] = mapped_column(String(3))
    purpose: Mapped[str] = mapped_column(String(16), default="topup")
    provider: Mapped[str] = mapped_column(String(32))
    provider_intent_id: Mapped[str | None] = mapped_column(String(100))
    provider_status: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16), default="waiting")
    idempotency_key: Mapped[str] = mapped_column(String(120))
    failure_code: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class Transaction(Base):
    """A money movement the person sees in their history; `ledger_transfer_id` is the ledger row
    that actually moved it."""

    __tablename__ = "transactions"
    __table_args__ = (
        one_of("type", TRANSACTION_TYPES),
        one_of("status", TRANSACTION_STATUSES),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint("refunded_minor >= 0 AND refunded_minor <= amount_minor", name="refunded_within_amount"),
        CheckConstraint("length(currency) = 3", name="currency_iso"),
        UniqueConstraint("ledger_transfer_id"),
        Index(None, "user_id", "created_at"),
        Index(None, "payment_intent_id"),
        Index(None, "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    payment_intent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("payment_intents.id", ondelete="RESTRICT")
    )
    type: Mapped[str] = mapped_column(String(16))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    ledger_transfer_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("ledger_transfers.id", ondelete="RESTRICT")
    )
    description: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class PaymentWebhook(Base):
    """Every provider event we accepted (signature checked), once per provider event id; a
    repeat delivery finds the row and changes nothing."""

    __tablename__ = "payment_webhooks"
    __table_args__ = (
        UniqueConstraint("provider", "provider_event_id"),
        Index(None, "provider_intent_id"),
        Index(None, "received_at"),
        Index(None, "processed_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    provider: Mapped[str] = mapped_column(String(32))
    provider_event_id: Mapped[str] = mapped_column(String(100))
    event_type: Mapped[str] = mapped_column(String(64))
    provider_intent_id: Mapped[str | None] = mapped_column(String(100))
    signature_ok: Mapped[bool] = mapped_column(Boolean)
    # "webhook" or "reconciliation": who told us.
    source: Mapped[str] = mapped_column(String(16), default="webhook")
    payload: Mapped[dict[str, Any]]
    received_at: Mapped[datetime] = created_at_column()
    processed_at: Mapped[datetime | None]


class Refund(Base):
    """Money given back on a transaction. The wallet is debited first (the Wallet actor refuses
    if the money is no longer there), then the provider is asked; a provider failure reverses it."""

    __tablename__ = "refunds"
    __table_args__ = (
        one_of("status", REFUND_STATUSES),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint("length(currency) = 3", name="currency_iso"),
        UniqueConstraint("provider_refund_id"),
        Index(None, "transaction_id"),
        Index(None, "user_id", "created_at"),
        Index(None, "status"),
        Index(None, "ledger_transfer_id"),
        Index(None, "reviewed_by"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    transaction_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("transactions.id", ondelete="RESTRICT"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    reason: Mapped[str | None] = mapped_column(String(200))
    provider_refund_id: Mapped[str | None] = mapped_column(String(100))
    ledger_transfer_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("ledger_transfers.id", ondelete="RESTRICT")
    )
    failure_code: Mapped[str | None] = mapped_column(String(64))
    # The admin's decision on a `requested` refund (kept, as null, if the admin is deleted).
    reviewed_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    reviewed_at: Mapped[datetime | None]
    rejection_reason: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class AdminActionLog(Base):
    """Every action taken through the admin API, written in the same transaction as the change
    it records (or, for changes an actor applies, right after the actor's answer). Rows outlive
    their actor: deleting a person sets `actor_id` null, the row stays."""

    __tablename__ = "admin_action_logs"
    __table_args__ = (
        Index(None, "created_at"),
        Index(None, "target_type", "target_id"),
    )

    id: Mapped[int] = mapped_column(BigSerial, primary_key=True, autoincrement=True)
    actor_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    actor_role: Mapped[str] = mapped_column(String(16))
    # The tenant the action was taken in (an operator's own, or the target's); scopes what an
    # operator may read back.
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tenants.id", ondelete="SET NULL"), index=True)
    action: Mapped[str] = mapped_column(String(48))
    target_type: Mapped[str] = mapped_column(String(24))
    target_id: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    ip: Mapped[str | None] = mapped_column(String(45))
    created_at: Mapped[datetime] = created_at_column()


LOG_LEVELS = ("WARNING", "ERROR", "CRITICAL")


class SystemLog(Base):
    """A WARNING or worse from the `powerbank` loggers, written off the request path by
    `http/system_log.py` (bounded: messages truncated, a per-minute cap). For admins to see
    what went wrong without shell access; the process's own log stays the full record."""

    __tablename__ = "system_logs"
    __table_args__ = (
        one_of("level", LOG_LEVELS),
        Index(None, "created_at"),
        Index(None, "level", "created_at"),
        Index(None, "logger", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigSerial, primary_key=True, autoincrement=True)
    level: Mapped[str] = mapped_column(String(8))
    logger: Mapped[str] = mapped_column(String(100))
    message: Mapped[str] = mapped_column(String(2000))
    created_at: Mapped[datetime] = created_at_column()


# --- app content (static tables, cached by http/cache.py) ---------------------------------------
#
# Admins write these rarely and every app start reads them, so the HTTP layer keeps them in
# process memory; whoever writes one of these tables must call `ReadCache.invalidate` with the
# key named next to the table (see http/cache.py).

APP_PLATFORMS = ("ios", "android", "web", "other")
CONTENT_SLUGS = ("terms-of-service", "privacy-policy", "about")
CONTACT_KINDS = ("email", "phone", "whatsapp", "address", "website")


class Country(Base):
    """cache key: countries"""

    __tablename__ = "countries"
    __table_args__ = (
        CheckConstraint("length(code) = 2", name="code_iso2"),
        CheckConstraint("dial_code LIKE '+%'", name="dial_code_plus"),
        Index(None, "is_active", "sort_order"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    # ISO 3166-1 alpha-2, upper case.
    code: Mapped[str] = mapped_column(String(2), unique=True)
    name: Mapped[str] = mapped_column(String(80))
    dial_code: Mapped[str] = mapped_column(String(8))
    flag: Mapped[str | None] = mapped_column(String(8))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    sort_order: Mapped[int] = mapped_column(Integer, default=0)


class ContentPage(Base):
    """Terms, privacy policy, about; one row per slug. cache key: content:<slug>"""

    __tablename__ = "content_pages"
    __table_args__ = (one_of("slug", CONTENT_SLUGS),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    slug: Mapped[str] = mapped_column(String(32), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    # Markdown.
    body: Mapped[str] = mapped_column(Text)
    version: Mapped[str] = mapped_column(String(32), default="1")
    updated_at: Mapped[datetime] = updated_at_column()


class ContactInfo(Base):
    """cache key: contact"""

    __tablename__ = "contact_info"
    __table_args__ = (one_of("kind", CONTACT_KINDS), Index(None, "sort_order"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(80))
    value: Mapped[str] = mapped_column(String(300))
    sort_order: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = updated_at_column()


class Faq(Base):
    """cache key: faq"""

    __tablename__ = "faqs"
    __table_args__ = (Index(None, "is_active", "category", "sort_order"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    category: Mapped[str] = mapped_column(String(40), default="general")
    question: Mapped[str] = mapped_column(String(300))
    answer: Mapped[str] = mapped_column(Text)
    sort_order: Mapped[int] = mapped_column(Integer, default=0)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = updated_at_column()


class AppVersion(Base):
    """The newest app build per platform and the oldest one still allowed. cache key: app_versions"""

    __tablename__ = "app_versions"
    __table_args__ = (one_of("platform", APP_PLATFORMS),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    platform: Mapped[str] = mapped_column(String(16), unique=True)
    latest_version: Mapped[str] = mapped_column(String(32))
    min_supported_version: Mapped[str] = mapped_column(String(32))
    store_url: Mapped[str | None] = mapped_column(String(500))
    release_notes: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = updated_at_column()


class AppUpdate(Base):
    """What changed in each release, for the app's "what's new". cache key: app_updates"""

    __tablename__ = "app_updates"
    __table_args__ = (Index(None, "released_at"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    version: Mapped[str] = mapped_column(String(32))
    title: Mapped[str] = mapped_column(String(200))
    notes: Mapped[str] = mapped_column(Text)
    released_at: Mapped[datetime]


class Banner(Base):
    """A home-screen promotion, shown while active and inside its window. cache key: banners"""

    __tablename__ = "banners"
    __table_args__ = (
        CheckConstraint("ends_at IS NULL OR starts_at IS NULL OR ends_at > starts_at", name="window_valid"),
        Index(None, "is_active", "sort_order"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    title: Mapped[str] = mapped_column(String(120))
    image_url: Mapped[str] = mapped_column(String(500))
    link_url: Mapped[str | None] = mapped_column(String(500))
    sort_order: Mapped[int] = mapped_column(Integer, default=0)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    starts_at: Mapped[datetime | None]
    ends_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = created_at_column()


# --- a person's own records ---------------------------------------------------------------------
#
# Written by HTTP requests directly (no actor owns them: one person writes their own rows, and
# nothing else reads them to decide about money or banks). Everything here that describes a person
# is erased when they delete their account (http/routes_profile.py, `erase_personal_data`).

MEDIA_PURPOSES = ("avatar", "kyc", "station_issue", "rental_issue")
KYC_STATUSES = ("pending", "approved", "rejected")
KYC_DOCUMENT_TYPES = ("national_id", "passport", "driving_license", "citizenship")
ISSUE_STATUSES = ("open", "acknowledged", "resolved", "dismissed")
STATION_ISSUE_KINDS = ("no_bank_ejected", "station_offline", "damaged", "dirty", "slot_stuck", "other")
RENTAL_ISSUE_KINDS = ("bank_faulty", "bank_not_charging", "not_ejected", "cannot_return", "wrong_charge", "other")


class MediaUpload(Base):
    """A file a person uploaded; the bytes live in the media store (local disk or S3-compatible)
    under `storage_key`."""

    __tablename__ = "media_uploads"
    __table_args__ = (
        one_of("purpose", MEDIA_PURPOSES),
        CheckConstraint("size_bytes > 0", name="size_positive"),
        Index(None, "user_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(16))
    content_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300), unique=True)
    created_at: Mapped[datetime] = created_at_column()


class UserKyc(Base):
    """A person's identity check: submitted (pending), then approved or rejected by an admin."""

    __tablename__ = "user_kyc"
    __table_args__ = (
        one_of("status", KYC_STATUSES),
        one_of("document_type", KYC_DOCUMENT_TYPES),
        Index(None, "status", "submitted_at"),
        Index(None, "document_front_id"),
        Index(None, "document_back_id"),
        Index(None, "selfie_id"),
        Index(None, "reviewed_by"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    document_type: Mapped[str] = mapped_column(String(24))
    document_number: Mapped[str] = mapped_column(String(64))
    full_name: Mapped[str] = mapped_column(String(120))
    date_of_birth: Mapped[str | None] = mapped_column(String(10))
    document_front_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("media_uploads.id", ondelete="SET NULL"))
    document_back_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("media_uploads.id", ondelete="SET NULL"))
    selfie_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("media_uploads.id", ondelete="SET NULL"))
    rejection_reason: Mapped[str | None] = mapped_column(String(300))
    reviewed_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    submitted_at: Mapped[datetime] = created_at_column()
    reviewed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = updated_at_column()


class UserStationFavorite(Base):
    __tablename__ = "user_station_favorites"
    __table_args__ = (UniqueConstraint("user_id", "station_id"), Index(None, "station_id"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    station_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = created_at_column()


class StationIssue(Base):
    """A problem a person reported at a station. The reporter is set null on account deletion so
    the fleet keeps the report."""

    __tablename__ = "station_issues"
    __table_args__ = (
        one_of("kind", STATION_ISSUE_KINDS),
        one_of("status", ISSUE_STATUSES),
        Index(None, "station_id", "created_at"),
        Index(None, "user_id", "created_at"),
        Index(None, "status"),
        Index(None, "media_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    station_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(24))
    description: Mapped[str | None] = mapped_column(String(1000))
    media_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("media_uploads.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(16), default="open")
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class Notification(Base):
    """A message in a person's in-app inbox."""

    __tablename__ = "notifications"
    __table_args__ = (Index(None, "user_id", "created_at"), Index(None, "user_id", "read_at"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # rental_overdue, topup_succeeded, promotion, ... (the template's code when one was used)
    kind: Mapped[str] = mapped_column(String(40))
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(String(2000))
    data: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    read_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = created_at_column()


NOTIFICATION_CHANNELS = ("push", "sms")  # the external ones; the in-app inbox is the Notification row
DELIVERY_STATUSES = ("queued", "sent", "failed")


class NotificationTemplate(Base):
    """The words of one kind of notification in one language. Placeholders are named
    (`{station_name}`) and filled only from the data the event provides (actors/notifications.py)."""

    __tablename__ = "notification_templates"
    __table_args__ = (UniqueConstraint("code", "language"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    code: Mapped[str] = mapped_column(String(40))
    language: Mapped[str] = mapped_column(String(8), default="en")
    title_template: Mapped[str] = mapped_column(String(200))
    body_template: Mapped[str] = mapped_column(String(2000))
    updated_at: Mapped[datetime] = updated_at_column()


class NotificationRule(Base):
    """Where one kind of notification goes, and whether it is critical: a critical one is sent on
    its channels even when the person muted them (an overdue fee, a lost bank)."""

    __tablename__ = "notification_rules"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(40), unique=True)
    in_app: Mapped[bool] = mapped_column(Boolean, default=True)
    push: Mapped[bool] = mapped_column(Boolean, default=False)
    sms: Mapped[bool] = mapped_column(Boolean, default=False)
    is_critical: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = updated_at_column()


class NotificationPreference(Base):
    """A person's choices (seed 001); no row means the defaults: push and SMS on, nothing muted,
    English."""

    __tablename__ = "notification_preferences"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    push_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    sms_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # Kinds whose push and SMS the person silenced; the inbox still gets them.
    muted_kinds: Mapped[list[str]] = mapped_column(JSONDoc, default=list)
    language: Mapped[str] = mapped_column(String(8), default="en")
    updated_at: Mapped[datetime] = updated_at_column()


class NotificationDelivery(Base):
    """One notification on one external channel, queued in the transaction that created the
    notification and sent later by the scheduler (`deliver_notifications`), with retries."""

    __tablename__ = "notification_deliveries"
    __table_args__ = (
        UniqueConstraint("notification_id", "channel"),
        one_of("channel", NOTIFICATION_CHANNELS),
        one_of("status", DELIVERY_STATUSES),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        Index(None, "status", "next_attempt_at"),
        Index(None, "user_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    notification_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("notifications.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    last_error: Mapped[str | None] = mapped_column(String(200))
    provider_message_id: Mapped[str | None] = mapped_column(String(200))
    sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = created_at_column()


class UserAuditLog(Base):
    """A sensitive action by a person. Survives their deletion: the actor is set null."""

    __tablename__ = "user_audit_logs"
    __table_args__ = (Index(None, "actor_id", "created_at"), Index(None, "action", "created_at"))

    id: Mapped[int] = mapped_column(BigSerial, primary_key=True, autoincrement=True)
    actor_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    action: Mapped[str] = mapped_column(String(48))
    target_type: Mapped[str | None] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(String(64))
    ip: Mapped[str | None] = mapped_column(String(64))
    # Which fields changed, never their values: the log must not keep what deletion erases.
    details: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    created_at: Mapped[datetime] = created_at_column()


# --- rental extras ----------------------------------------------------------------------------


class RentalExtension(Base):
    """Time bought on top of a rental's package: moves `due_at` and is paid at once from the
    wallet (the ledger transfer `transfer_id`). Written by the Rental actor."""

    __tablename__ = "rental_extensions"
    __table_args__ = (
        CheckConstraint("minutes > 0", name="minutes_positive"),
        CheckConstraint("price_minor >= 0", name="price_non_negative"),
        CheckConstraint("length(currency) = 3", name="currency_iso"),
        Index(None, "rental_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    rental_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rentals.id", ondelete="CASCADE"))
    minutes: Mapped[int] = mapped_column(Integer)
    price_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    transfer_id: Mapped[uuid.UUID | None] = mapped_column(unique=True)
    due_at_before: Mapped[datetime]
    due_at_after: Mapped[datetime]
    created_at: Mapped[datetime] = created_at_column()


class RentalLocation(Base):
    """A GPS fix the app sent during a rental (to find lost banks). Erased with the account."""

    __tablename__ = "rental_locations"
    __table_args__ = (
        CheckConstraint("latitude BETWEEN -90 AND 90", name="latitude_range"),
        CheckConstraint("longitude BETWEEN -180 AND 180", name="longitude_range"),
        CheckConstraint("accuracy_m IS NULL OR accuracy_m >= 0", name="accuracy_non_negative"),
        Index(None, "rental_id", "recorded_at"),
    )

    id: Mapped[int] = mapped_column(BigSerial, primary_key=True, autoincrement=True)
    rental_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rentals.id", ondelete="CASCADE"))
    latitude: Mapped[float] = mapped_column(Float)
    longitude: Mapped[float] = mapped_column(Float)
    accuracy_m: Mapped[float | None] = mapped_column(Float)
    recorded_at: Mapped[datetime]
    received_at: Mapped[datetime] = created_at_column()


class RentalIssue(Base):
    __tablename__ = "rental_issues"
    __table_args__ = (
        one_of("kind", RENTAL_ISSUE_KINDS),
        one_of("status", ISSUE_STATUSES),
        Index(None, "rental_id", "created_at"),
        Index(None, "status"),
        Index(None, "media_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    rental_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rentals.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(24))
    description: Mapped[str | None] = mapped_column(String(1000))
    media_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("media_uploads.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(16), default="open")
    created_at: Mapped[datetime] = created_at_column()


# --- social ---------------------------------------------------------------------------------

ACHIEVEMENT_METRICS = ("rentals_completed", "timely_returns", "stations_visited")
LEADERBOARD_PERIODS = ("all_time", "month")


class Achievement(Base):
    """A goal: reach `threshold` of `metric` (counted from the person's rentals)."""

    __tablename__ = "achievements"
    __table_args__ = (
        one_of("metric", ACHIEVEMENT_METRICS),
        CheckConstraint("threshold > 0", name="threshold_positive"),
        CheckConstraint("points >= 0", name="points_non_negative"),
        Index(None, "is_active", "sort_order"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    code: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(80))
    description: Mapped[str] = mapped_column(String(300))
    metric: Mapped[str] = mapped_column(String(24))
    threshold: Mapped[int] = mapped_column(Integer)
    points: Mapped[int] = mapped_column(Integer, default=0)
    sort_order: Mapped[int] = mapped_column(Integer, default=0)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)


class UserAchievement(Base):
    __tablename__ = "user_achievements"
    __table_args__ = (
        UniqueConstraint("user_id", "achievement_id"),
        CheckConstraint("progress >= 0", name="progress_non_negative"),
        Index(None, "achievement_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    achievement_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("achievements.id", ondelete="CASCADE"))
    progress: Mapped[int] = mapped_column(Integer, default=0)
    unlocked_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = updated_at_column()


class UserLeaderboard(Base):
    """A ranking snapshot, recomputed from rentals when older than a few minutes
    (http/routes_social.py): reads stay one indexed query however many rentals there are."""

    __tablename__ = "user_leaderboard"
    __table_args__ = (
        UniqueConstraint("period", "user_id"),
        one_of("period", LEADERBOARD_PERIODS),
        CheckConstraint("rank >= 1", name="rank_positive"),
        Index(None, "period", "rank"),
        Index(None, "user_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    period: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(Integer)
    rentals_completed: Mapped[int] = mapped_column(Integer, default=0)
    minutes_total: Mapped[int] = mapped_column(Integer, default=0)
    computed_at: Mapped[datetime]


# --- station media and amenities (station detail) ------------------------------------------------

STATION_MEDIA_KINDS = ("image", "video")


class StationMedia(Base):
    """Photos (or a short video) of a station, shown on its detail page."""

    __tablename__ = "station_media"
    __table_args__ = (one_of("kind", STATION_MEDIA_KINDS), Index(None, "station_id", "sort_order"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    station_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8), default="image")
    url: Mapped[str] = mapped_column(String(500))
    caption: Mapped[str | None] = mapped_column(String(200))
    sort_order: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = created_at_column()


class StationAmenity(Base):
    """A kind of amenity a station may offer (wifi, seating, 24 h access...)."""

    __tablename__ = "station_amenities"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(80))
    icon: Mapped[str | None] = mapped_column(String(64))


class StationAmenityMapping(Base):
    __tablename__ = "station_amenity_mappings"
    __table_args__ = (UniqueConstraint("station_id", "amenity_id"), Index(None, "amenity_id"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    station_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stations.id", ondelete="CASCADE"))
    amenity_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("station_amenities.id", ondelete="CASCADE"))
    note: Mapped[str | None] = mapped_column(String(120))


# --- live events a person's apps can catch up on ---------------------------------------------
#
# Every event an actor publishes on a person's channel (`user:<id>`) is also kept here, numbered
# per person in commit order, so an app that was offline asks for what came after the last number
# it saw (docs/websocket.md). The counter row is updated by the transaction that publishes, which
# holds its lock until commit: numbers are handed out in the order the events become true.


class UserEventCounter(Base):
    # No foreign keys here: these rows are written on the hot path of every actor that tells a
    # person something, and they only ever name people the actor already holds; old events are
    # pruned by age (actors/user_events.py).
    __tablename__ = "user_event_counters"

    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)


class UserEvent(Base):
    __tablename__ = "user_events"
    __table_args__ = (Index(None, "created_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    type: Mapped[str] = mapped_column(String(48))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = created_at_column()


# --- reservations -------------------------------------------------------------------------------
#
# Seed 004's booking states applied to holding a bank: pending (asked; the HTTP request inserts
# the row) -> confirmed (the Station actor held a slot's bank until `expires_at`) -> completed (a
# rental took that bank) | cancelled (by the person, or nothing to hold) | expired. One open
# reservation per person is a database fact (the partial unique index).

RESERVATION_STATUSES = ("pending", "confirmed", "completed", "cancelled", "expired")
OPEN_RESERVATION_STATUSES = ("pending", "confirmed")


class Reservation(Base):
    __tablename__ = "reservations"
    __table_args__ = (
        one_of("status", RESERVATION_STATUSES),
        Index(None, "user_id", unique=True, postgresql_where=text("status IN ('pending', 'confirmed')"),
              sqlite_where=text("status IN ('pending', 'confirmed')")),
        Index(None, "status", "expires_at"),
        Index(None, "station_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    station_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stations.id", ondelete="RESTRICT"))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    slot_number: Mapped[int | None] = mapped_column(Integer)
    power_bank_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("power_banks.id", ondelete="SET NULL"), index=True)
    expires_at: Mapped[datetime | None]
    rental_id: Mapped[uuid.UUID | None]
    cancel_reason: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()

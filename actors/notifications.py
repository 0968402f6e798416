"""Notifications: rendered from a template, stored in the person's inbox, pushed on their
websocket, and queued for push and SMS per the kind's rule and the person's preferences.

Why it is exactly once: `notify_person` runs inside the actor transaction that made the change
(a rental turning active, a top-up credited), so the inbox row, its delivery rows and the state
change commit together or not at all; the websocket event goes out only after that commit
(`ctx.notify`). The inbox row's id is derived from a dedupe key naming the event
(`rental_started:<rental>`), so a replayed or duplicated command that reaches it again finds the
row and does nothing.

Delivery to the outside world is at least once and happens later: `deliver_notifications` (a
scheduler job) claims queued delivery rows, hands them to a `Provider`, and marks them sent or
schedules a retry. The default provider only writes `sms_fcm_log` rows; a real one (FCM, an SMS
gateway) plugs in with `install_provider`.
"""

from __future__ import annotations

import logging
import string
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.actors import user_events
from powerbank.actors.runtime import ActorContext
from powerbank.storage.models import (
    Notification,
    NotificationDelivery,
    NotificationPreference,
    NotificationRule,
    NotificationTemplate,
    SmsFcmLog,
    Station,
    StationIssue,
    User,
    UserDevice,
)
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

# uuid5 namespace of notification ids: the same dedupe key always names the same notification.
NOTIFICATION_NAMESPACE = uuid.UUID("6f1d3c52-9a4e-4d1b-8a57-2f0c7e9b1d44")
DEFAULT_LANGUAGE = "en"
EXTERNAL_CHANNELS = ("push", "sms")


# --- defaults (seeded into the tables by storage/seed.py; used as-is when a row is missing) ----


@dataclass(frozen=True)
class Rule:
    kind: str
    in_app: bool = True
    push: bool = False
    sms: bool = False
    is_critical: bool = False


DEFAULT_RULES: dict[str, Rule] = {
    rule.kind: rule
    for rule in (
        Rule("rental_started", push=True),
        Rule("rental_ending_soon", push=True, sms=True),
        Rule("rental_overdue", push=True, sms=True, is_critical=True),
        Rule("rental_lost", push=True, sms=True, is_critical=True),
        Rule("rental_returned", push=True),
        Rule("rental_charged", push=True),
        Rule("topup_succeeded", push=True),
        Rule("refund_succeeded", push=True),
        Rule("station_issue_resolved", push=True),
        Rule("kyc_approved", push=True),
        Rule("kyc_rejected", push=True),
        Rule("refund_rejected", push=True),
    )
}

DEFAULT_TEMPLATES: dict[str, tuple[str, str]] = {
    "rental_started": ("Rental started", "Your power bank from {station_name} is out (slot {slot_number}). Return it by {due_at}."),
    "rental_ending_soon": ("Rental ending soon", "Your rental ends at {due_at}. Return the power bank or extend it to avoid a late fee."),
    "rental_overdue": ("Rental overdue", "Your rental was due at {due_at}. A late fee is running until you return the power bank."),
    "rental_lost": ("Power bank charged as lost", "The power bank was not returned in time and is charged as lost: {fee}."),
    "rental_returned": ("Power bank returned", "Thanks! Returned at {return_station_name}. Rental fee: {fee}."),
    "rental_charged": ("Payment for your rental", "Charged {charged}. Still due: {due}."),
    "topup_succeeded": ("Wallet topped up", "{amount} was added to your wallet."),
    "refund_succeeded": ("Refund processed", "{amount} was refunded."),
    "station_issue_resolved": ("Issue resolved", "The issue you reported at {station_name} is resolved. Thank you!"),
    "kyc_approved": ("Identity verified", "Your documents were checked and your identity is verified."),
    "kyc_rejected": ("Identity not verified", "We could not verify your documents: {reason}. Please submit them again."),
    "refund_rejected": ("Refund declined", "Your refund request of {amount} was declined: {reason}."),
}


@dataclass(frozen=True)
class Preferences:
    """No row means these: everything on, nothing muted."""

    push_enabled: bool = True
    sms_enabled: bool = True
    muted_kinds: frozenset[str] = field(default_factory=frozenset)
    language: str = DEFAULT_LANGUAGE


# --- pure decisions ---------------------------------------------------------------------------


class _KnownKeysOnly(string.Formatter):
    """`str.format` restricted to plain names the caller provided: `{user.__class__}` or
    `{0}` render as written instead of reaching into objects, and a missing key is left
    visible (an operator sees the template's mistake) instead of failing the command."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def render(self, template: str) -> str:
        try:
            parts = list(self.parse(template))
        except ValueError:  # an unbalanced brace: the template is shown as written
            return template
        return "".join(self._part(*part) for part in parts)

    def _part(self, literal: str, name: str | None, spec: str | None, conversion: str | None) -> str:
        if name is None:
            return literal
        if not name.isidentifier() or name not in self.data:
            return literal + "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        value = self.data[name]
        try:
            return literal + format(self.convert_field(value, conversion), spec or "")
        except (ValueError, TypeError):  # a spec that does not fit the value
            return literal + str(value)


def render(template: str, data: Mapping[str, Any]) -> str:
    """Fill `{name}` placeholders from `data`, never failing (see `_KnownKeysOnly`)."""
    return _KnownKeysOnly(data).render(template)


def choose_channels(rule: Rule, preferences: Preferences) -> tuple[str, ...]:
    """The external channels this notification goes to. The rule decides the candidates; the
    person's switches and per-kind mutes remove them, except for a critical kind, which the
    person cannot silence (it announces money being taken)."""
    wanted = [channel for channel in EXTERNAL_CHANNELS if getattr(rule, channel)]
    if rule.is_critical:
        return tuple(wanted)
    if rule.kind in preferences.muted_kinds:
        return ()
    enabled = {"push": preferences.push_enabled, "sms": preferences.sms_enabled}
    return tuple(channel for channel in wanted if enabled[channel])


def notification_id(dedupe_key: str) -> uuid.UUID:
    return uuid.uuid5(NOTIFICATION_NAMESPACE, dedupe_key)


def format_money(amount_minor: int | None, currency: str | None) -> str:
    """Minor units as the person reads them (two decimals), without floats."""
    amount_minor = int(amount_minor or 0)
    sign, amount_minor = ("-" if amount_minor < 0 else ""), abs(amount_minor)
    return f"{sign}{amount_minor // 100}.{amount_minor % 100:02d} {currency or ''}".rstrip()


def format_time(value: datetime | None) -> str:
    return value.strftime("%H:%M UTC") if value else ""


# --- reading the configuration ------------------------------------------------------------------


async def load_rule(session: AsyncSession, kind: str) -> Rule:
    row = (await session.execute(select(NotificationRule).where(NotificationRule.kind == kind))).scalar_one_or_none()
    if row is None:
        return DEFAULT_RULES.get(kind, Rule(kind))
    return Rule(kind, in_app=row.in_app, push=row.push, sms=row.sms, is_critical=row.is_critical)


async def load_preferences(session: AsyncSession, user_id: uuid.UUID) -> Preferences:
    row = await session.get(NotificationPreference, user_id)
    if row is None:
        return Preferences()
    return Preferences(row.push_enabled, row.sms_enabled, frozenset(row.muted_kinds or ()), row.language or DEFAULT_LANGUAGE)


async def load_template(session: AsyncSession, kind: str, language: str) -> tuple[str, str]:
    """The person's language, else English, else the built-in words, else the kind itself."""
    rows = (await session.execute(
        select(NotificationTemplate).where(NotificationTemplate.code == kind,
                                           NotificationTemplate.language.in_((language, DEFAULT_LANGUAGE)))
    )).scalars().all()
    by_language = {row.language: row for row in rows}
    row = by_language.get(language) or by_language.get(DEFAULT_LANGUAGE)
    if row is not None:
        return row.title_template, row.body_template
    return DEFAULT_TEMPLATES.get(kind, (kind.replace("_", " ").capitalize(), ""))


# --- creating a notification (inside an actor's transaction) ------------------------------------


def notification_view(row: Notification) -> dict[str, Any]:
    """The websocket shape; the same fields as the app's GET /api/user/notifications items."""
    return {
        "id": str(row.id), "kind": row.kind, "title": row.title, "body": row.body, "data": dict(row.data or {}),
        "read": row.read_at is not None, "read_at": row.read_at.isoformat() if row.read_at else None,
        "created_at": row.created_at.isoformat(),
    }


async def notify_person(
    ctx: ActorContext, user_id: uuid.UUID | str, kind: str, data: dict[str, Any], *, dedupe_key: str
) -> dict[str, Any] | None:
    """Store the notification, queue its push/SMS deliveries and announce it on the person's
    websocket after commit. `ctx` is the actor's context: all of it commits with the change that
    caused it. Returns the view, or None when this dedupe key was notified already."""
    session: AsyncSession = ctx.session
    user_id = uuid.UUID(str(user_id))
    row_id = notification_id(dedupe_key)
    if await session.get(Notification, row_id) is not None:
        return None
    rule, preferences = await load_rule(session, kind), await load_preferences(session, user_id)
    title_template, body_template = await load_template(session, kind, preferences.language)
    row = Notification(
        id=row_id, user_id=user_id, kind=kind, title=render(title_template, data)[:200],
        body=render(body_template, data)[:2000], data=data, created_at=ctx.now,
        # Not for the inbox: kept only as the record its deliveries point at, already read.
        read_at=None if rule.in_app else ctx.now,
    )
    session.add(row)
    await session.flush()
    for channel in choose_channels(rule, preferences):
        session.add(NotificationDelivery(
            notification_id=row_id, user_id=user_id, channel=channel, status="queued", attempts=0,
            next_attempt_at=ctx.now, created_at=ctx.now,
        ))
    await session.flush()
    view = notification_view(row)
    if rule.in_app:
        ctx.notify(f"user:{user_id}", {"type": "notification.created", "notification": view})
    return view


async def notify_rental(ctx: ActorContext, rental, kind: str, **extra: Any) -> dict[str, Any] | None:
    """A rental's notification, once per rental and kind (`extra` adds to the template data)."""
    station = await ctx.session.get(Station, rental.station_id)
    back = await ctx.session.get(Station, rental.return_station_id) if rental.return_station_id else None
    data = {
        "rental_id": str(rental.id), "station_name": station.name if station else "",
        "return_station_name": back.name if back else "", "slot_number": rental.slot_number or "",
        "due_at": format_time(rental.due_at), "fee": format_money(rental.fee_minor, rental.currency),
        "charged": format_money(rental.charged_minor, rental.currency),
        "due": format_money(rental.due_minor, rental.currency), **extra,
    }
    return await notify_person(ctx, rental.user_id, kind, data, dedupe_key=f"{kind}:{rental.id}")


async def notify_money(ctx: ActorContext, user_id, kind: str, event_id, amount_minor: int, currency: str) -> dict[str, Any] | None:
    """A top-up or refund notification, once per `event_id` (the intent or the refund)."""
    data = {"amount": format_money(amount_minor, currency), "amount_minor": int(amount_minor), "currency": currency}
    return await notify_person(ctx, user_id, kind, data, dedupe_key=f"{kind}:{event_id}")


async def set_station_issue_status(runtime, issue_id: uuid.UUID, status: str) -> StationIssue | None:
    """Staff move a reported issue along (acknowledged, resolved, dismissed); the reporter hears
    of a resolution in the same transaction. Issues have no actor (nothing races on them but
    staff), so this is a plain transaction with an actor-like context; like the runtime, it keeps
    the person's event (user_events, for catch-up) in the transaction and publishes it after the
    commit. None: no such issue."""

    async with runtime.sessions.begin() as session:
        issue = await session.get(StationIssue, issue_id)
        if issue is None:
            return None
        ctx = ActorContext(session=session, now=utcnow())
        if issue.status != status:
            issue.status = status
            if status == "resolved" and issue.user_id is not None:
                station = await session.get(Station, issue.station_id)
                data = {"issue_id": str(issue.id), "station_name": station.name if station else "", "issue_kind": issue.kind}
                await notify_person(ctx, issue.user_id, "station_issue_resolved", data,
                                    dedupe_key=f"station_issue_resolved:{issue.id}")
        await user_events.record(session, ctx.notifications, ctx.now)
    if ctx.notifications:
        await runtime.bus.publish_many(ctx.notifications)
    return issue


# --- delivery ------------------------------------------------------------------------------------


class Provider(Protocol):
    """A push or SMS provider. Returns the provider's message id; raises to have the delivery
    retried later."""

    async def send(self, channel: str, recipient: str, title: str, body: str, *, user_id: uuid.UUID | None = None,
                   purpose: str = "notification") -> str: ...


class LogProvider:
    """The default: nothing leaves the machine; every message is a sent `sms_fcm_log` row."""

    name = "log"

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def send(self, channel: str, recipient: str, title: str, body: str, *, user_id: uuid.UUID | None = None,
                   purpose: str = "notification") -> str:
        row = SmsFcmLog(
            user_id=user_id, channel="fcm" if channel == "push" else "sms", recipient=recipient[:500],
            purpose=purpose[:32], body=f"{title}\n{body}", provider=self.name, status="sent",
        )
        async with self.sessions.begin() as session:
            session.add(row)
        return str(row.id)


PROVIDERS: dict[str, Provider] = {}
MAX_DELIVERY_ATTEMPTS = 5
DELIVERY_BATCH = 100
# A claimed delivery is invisible to other claimers this long; one whose sender died is retried
# after it (so a crash between sending and recording means a second send: at least once).
CLAIM_LEASE_S = 120
RETRY_BASE_S = 30
RETRY_CAP_S = 3600


def install_provider(channel: str, provider: Provider | None) -> None:
    """Route a channel ("push" or "sms") through a real provider; None restores the log."""
    if provider is None:
        PROVIDERS.pop(channel, None)
    else:
        PROVIDERS[channel] = provider


def retry_delay_s(attempts: int) -> int:
    """Exponential backoff after the `attempts`-th failed try: 30 s, 60 s, 120 s, ... capped."""
    return min(RETRY_CAP_S, RETRY_BASE_S * 2 ** max(0, attempts - 1))


@dataclass
class Claimed:
    id: uuid.UUID
    user_id: uuid.UUID
    channel: str
    attempts: int
    kind: str
    title: str
    body: str


@dataclass
class Outcome:
    status: str  # sent, queued (retry) or failed
    provider_message_id: str | None = None
    error: str | None = None


async def deliver_notifications(runtime, now: datetime) -> int:
    """Scheduler job: send the queued deliveries due by `now`; how many were tried."""
    claimed = await _claim_due(runtime.sessions, now)
    outcomes = [(item, await _send(runtime.sessions, item)) for item in claimed]
    if outcomes:
        await _record(runtime.sessions, outcomes, now)
    return len(claimed)


async def _claim_due(sessions: async_sessionmaker[AsyncSession], now: datetime) -> list[Claimed]:
    """Take a batch out of everyone else's sight for CLAIM_LEASE_S and count the attempt. On
    PostgreSQL rows another scheduler is claiming are skipped (SKIP LOCKED), not waited for."""
    async with sessions.begin() as session:
        query = (
            select(NotificationDelivery, Notification.kind, Notification.title, Notification.body)
            .join(Notification, Notification.id == NotificationDelivery.notification_id)
            .where(NotificationDelivery.status == "queued", NotificationDelivery.next_attempt_at <= now)
            .order_by(NotificationDelivery.next_attempt_at)
            .limit(DELIVERY_BATCH)
        )
        if session.bind.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True, of=NotificationDelivery)
        rows = (await session.execute(query)).all()
        if not rows:
            return []
        claimed = [Claimed(d.id, d.user_id, d.channel, d.attempts + 1, kind, title, body) for d, kind, title, body in rows]
        await session.execute(
            update(NotificationDelivery)
            .where(NotificationDelivery.id.in_([delivery.id for delivery, *_ in rows]))
            .values(attempts=NotificationDelivery.attempts + 1, next_attempt_at=now + timedelta(seconds=CLAIM_LEASE_S))
        )
    return claimed


async def _recipients(sessions: async_sessionmaker[AsyncSession], item: Claimed) -> list[str]:
    """The phone for SMS; every live device's push token for push."""
    async with sessions() as session:
        if item.channel == "sms":
            phone = await session.scalar(select(User.phone).where(User.id == item.user_id))
            return [phone] if phone else []
        tokens = await session.execute(
            select(UserDevice.push_token).where(UserDevice.user_id == item.user_id, UserDevice.revoked_at.is_(None),
                                                UserDevice.push_token.is_not(None))
        )
        return [token for token in tokens.scalars() if token]


async def _send(sessions: async_sessionmaker[AsyncSession], item: Claimed) -> Outcome:
    recipients = await _recipients(sessions, item)
    if not recipients:
        return Outcome("failed", error="no_phone" if item.channel == "sms" else "no_push_token")
    provider = PROVIDERS.get(item.channel) or LogProvider(sessions)
    try:
        ids = [await provider.send(item.channel, recipient, item.title, item.body, user_id=item.user_id, purpose=item.kind)
               for recipient in recipients]
    except Exception as error:  # any provider failure is retried, up to MAX_DELIVERY_ATTEMPTS
        log.warning("%s delivery %s failed (attempt %d): %r", item.channel, item.id, item.attempts, error)
        status = "queued" if item.attempts < MAX_DELIVERY_ATTEMPTS else "failed"
        return Outcome(status, error=repr(error)[:200])
    return Outcome("sent", provider_message_id=",".join(ids)[:200])


async def _record(sessions: async_sessionmaker[AsyncSession], outcomes: list[tuple[Claimed, Outcome]], now: datetime) -> None:
    async with sessions.begin() as session:
        for item, outcome in outcomes:
            values: dict[str, Any] = {"status": outcome.status, "last_error": outcome.error}
            if outcome.status == "sent":
                values.update(sent_at=now, provider_message_id=outcome.provider_message_id)
            if outcome.status == "queued":
                values["next_attempt_at"] = now + timedelta(seconds=retry_delay_s(item.attempts))
            await session.execute(update(NotificationDelivery).where(NotificationDelivery.id == item.id).values(**values))

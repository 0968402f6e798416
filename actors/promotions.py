"""Coupons and referrals: pure decisions, and the one transaction that records each.

Neither a coupon nor a referral is an actor's state. A coupon's use counter is shared by everyone
who applies it, so its limit is made a database fact rather than a decision taken on a read: the
usage row goes in, then `UPDATE coupons SET uses = uses + 1 WHERE id = :id AND uses < max_uses`
(a CHECK backs it), in one transaction. Concurrent appliers queue on that row's lock; each
re-checks the condition on the row the previous one committed, so exactly `max_uses` succeed.

Points, which are Wallet-actor state, are not written here: the AwardPoints command
(actors/wallet_rewards.py) is accepted into the wallet's mailbox in the same transaction, with
ids derived from the usage or referral, so the points are credited once, after commit, whatever
crashes or retries happen in between.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.actors.mailbox import Envelope
from powerbank.actors.runtime import insert_command
from powerbank.actors.wallet_rewards import award_envelope
from powerbank.storage.models import ActorCommand, AppConfig, Coupon, CouponUsage, Referral, User, Wallet

REFERRAL_CONFIG_KEY = "referral_rewards"
# Used when app_config has no `referral_rewards` row (or a malformed one).
DEFAULT_REFERRER_POINTS = 100
DEFAULT_REFEREE_POINTS = 50
DEFAULT_CLAIM_WINDOW_DAYS = 7
MAX_REWARD_POINTS = 1_000_000


class PromotionRefused(Exception):
    """A refusal with a machine-readable reason; the HTTP layer picks the status."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


# --- pure decisions ---------------------------------------------------------------------------


def normalize_code(raw: str) -> str:
    """Codes are compared upper-case without surrounding blanks: people type them by hand."""
    return raw.strip().upper()


@dataclass(frozen=True)
class CouponFacts:
    """What deciding an application needs to know about a coupon, read once."""

    active: bool
    valid_from: datetime | None
    valid_until: datetime | None
    max_uses: int | None
    uses: int
    per_user_limit: int


def coupon_refusal(coupon: CouponFacts, now: datetime, uses_by_user: int) -> str | None:
    """Why this person may not apply this coupon now, or None. Exhaustion is checked here only to
    answer early; the conditional UPDATE is what enforces it. The person's own limit comes
    before exhaustion: it is the one they can do nothing about either way, and it is stable."""
    if not coupon.active:
        return "coupon_inactive"
    if coupon.valid_from is not None and now < coupon.valid_from:
        return "coupon_not_yet_valid"
    if coupon.valid_until is not None and now >= coupon.valid_until:
        return "coupon_expired"
    if uses_by_user >= coupon.per_user_limit:
        return "coupon_already_used"
    if coupon.max_uses is not None and coupon.uses >= coupon.max_uses:
        return "coupon_exhausted"
    return None


def coupon_points(kind: str, value: int) -> int:
    """Points an application credits at once: a points coupon's value; discounts credit none
    (they are recorded for the charge they reduce)."""
    return value if kind == "points" else 0


def coupon_definition_problem(
    kind: str, value: int, currency: str | None, valid_from: datetime | None, valid_until: datetime | None
) -> tuple[str, str] | None:
    """(field, message) of the first rule a new coupon breaks across fields, or None. The same
    rules are CHECK constraints; saying which field is wrong is kinder than a constraint name."""
    if kind == "discount_percent" and value > 100:
        return "value", "a percentage discount is at most 100"
    if kind == "discount_minor" and currency is None:
        return "currency", "a money discount needs its currency"
    if kind != "discount_minor" and currency is not None:
        return "currency", "only a discount_minor coupon has a currency"
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        return "valid_until", "must be after valid_from"
    return None


@dataclass(frozen=True)
class ReferralRewards:
    referrer_points: int = DEFAULT_REFERRER_POINTS
    referee_points: int = DEFAULT_REFEREE_POINTS
    claim_window_days: int = DEFAULT_CLAIM_WINDOW_DAYS


def referral_rewards_from(value: dict[str, Any] | None) -> ReferralRewards:
    """The configured rewards, each field falling back to its default when missing or not a
    sensible number: a typo in app_config must not give away a million points or none."""
    defaults = ReferralRewards()
    value = value or {}

    def number(name: str, default: int, low: int, high: int) -> int:
        raw = value.get(name)
        ok = isinstance(raw, int) and not isinstance(raw, bool) and low <= raw <= high
        return raw if ok else default

    return ReferralRewards(
        referrer_points=number("referrer_points", defaults.referrer_points, 0, MAX_REWARD_POINTS),
        referee_points=number("referee_points", defaults.referee_points, 0, MAX_REWARD_POINTS),
        claim_window_days=number("claim_window_days", defaults.claim_window_days, 0, 3650),
    )


@dataclass(frozen=True)
class ReferralFacts:
    referrer_id: uuid.UUID
    referrer_active: bool
    referee_id: uuid.UUID
    referee_created_at: datetime
    referee_has_claimed: bool
    # The referrer was referred by this referee: a pair of new accounts farming each other.
    referrer_referred_by_referee: bool


def referral_refusal(facts: ReferralFacts, now: datetime, window_days: int) -> str | None:
    """Why this person may not claim this code, or None. A claim is for new people (within the
    window after sign-up), once, never their own code, never back and forth."""
    if facts.referrer_id == facts.referee_id:
        return "self_referral"
    if not facts.referrer_active:
        return "referral_code_not_found"
    if facts.referee_has_claimed:
        return "referral_already_claimed"
    if now - facts.referee_created_at > timedelta(days=window_days):
        return "referral_window_closed"
    if facts.referrer_referred_by_referee:
        return "referral_cycle"
    return None


def usage_points_transfer_id(usage_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(usage_id, "coupon-points")


def referral_transfer_id(referral_id: uuid.UUID, side: str) -> uuid.UUID:
    """side is "referrer" or "referee": one transfer each, named after the referral."""
    return uuid.uuid5(referral_id, f"referral-{side}")


def referral_awards(referral: Referral) -> list[Envelope]:
    """The AwardPoints commands a referral earns (none for a zero reward)."""
    awards = []
    for side, user_id, points in (
        ("referee", referral.referee_id, referral.referee_points),
        ("referrer", referral.referrer_id, referral.referrer_points),
    ):
        if points > 0:
            description = f"referral {referral.code}"
            awards.append(award_envelope(user_id, points, referral_transfer_id(referral.id, side), f"referral_{side}", description))
    return awards


# --- coupons: the transaction -----------------------------------------------------------------


async def has_wallet(session: AsyncSession, user_id: uuid.UUID) -> bool:
    """The person's wallet exists, or its OpenWallet command (`open:{user}`, accepted with the
    account at sign-up or login) is waiting in the mailbox ahead of any award: either way an
    award applies. Accounts made by operators' tools have neither until they sign in, and an
    award to them would be refused after the coupon use or the referral was already taken."""
    if await session.scalar(select(Wallet.id).where(Wallet.user_id == user_id)) is not None:
        return True
    opening = await session.scalar(
        select(ActorCommand.status).where(ActorCommand.kind == "wallet", ActorCommand.command_id == f"open:{user_id}")
    )
    return opening == "pending"


@dataclass(frozen=True)
class Redemption:
    usage: CouponUsage
    coupon: Coupon
    award: Envelope | None
    replayed: bool = False


async def apply_coupon(
    session: AsyncSession, *, user_id: uuid.UUID, code: str, usage_id: uuid.UUID, now: datetime
) -> Redemption:
    """Record one application of `code` by `user_id` (inside the caller's transaction), or raise
    PromotionRefused. A usage id seen before (a retried request) returns that usage unchanged.
    The per-person limit rests on a unique (coupon, user, use number); a concurrent duplicate
    makes the caller's commit fail with IntegrityError, which means coupon_already_used."""
    earlier = await session.get(CouponUsage, usage_id)
    if earlier is not None:
        return await _replay(session, earlier, user_id, code)
    coupon = (await session.execute(select(Coupon).where(Coupon.code == normalize_code(code)))).scalar_one_or_none()
    if coupon is None:
        raise PromotionRefused("coupon_not_found")
    uses_by_user = await session.scalar(
        select(func.count()).select_from(CouponUsage).where(CouponUsage.coupon_id == coupon.id, CouponUsage.user_id == user_id)
    ) or 0
    reason = coupon_refusal(_facts(coupon), now, uses_by_user)
    if reason is not None:
        raise PromotionRefused(reason)
    points = coupon_points(coupon.kind, coupon.value)
    if points and not await has_wallet(session, user_id):
        raise PromotionRefused("wallet_not_found")
    usage = CouponUsage(
        id=usage_id, coupon_id=coupon.id, user_id=user_id, use_number=uses_by_user + 1, points=points,
        points_transfer_id=usage_points_transfer_id(usage_id) if points else None, created_at=now,
    )
    session.add(usage)
    await session.flush()
    if not await _count_use(session, coupon.id):
        raise PromotionRefused("coupon_exhausted")
    award = None
    if points:
        award = award_envelope(user_id, points, usage.points_transfer_id, "coupon_points", f"coupon {coupon.code}")
        await insert_command(session, award)
    return Redemption(usage=usage, coupon=coupon, award=award)


async def _count_use(session: AsyncSession, coupon_id: uuid.UUID) -> bool:
    """Take one use if one is left: the statement that makes the limit hold. On PostgreSQL a
    concurrent applier waits for this row's lock and re-evaluates the condition on the committed
    row; on SQLite writers are serial anyway."""
    table = Coupon.__table__
    taken = await session.execute(
        update(table)
        .where(table.c.id == coupon_id, table.c.active.is_(True), or_(table.c.max_uses.is_(None), table.c.uses < table.c.max_uses))
        .values(uses=table.c.uses + 1)
    )
    return taken.rowcount == 1


async def _replay(session: AsyncSession, usage: CouponUsage, user_id: uuid.UUID, code: str) -> Redemption:
    coupon = await session.get(Coupon, usage.coupon_id)
    if usage.user_id != user_id or coupon is None or coupon.code != normalize_code(code):
        raise PromotionRefused("idempotency_key_reused")
    award = None
    if usage.points_transfer_id is not None:
        award = award_envelope(user_id, usage.points, usage.points_transfer_id, "coupon_points", f"coupon {coupon.code}")
    return Redemption(usage=usage, coupon=coupon, award=award, replayed=True)


def _facts(coupon: Coupon) -> CouponFacts:
    return CouponFacts(
        active=coupon.active, valid_from=coupon.valid_from, valid_until=coupon.valid_until,
        max_uses=coupon.max_uses, uses=coupon.uses, per_user_limit=coupon.per_user_limit,
    )


# --- referrals: the transaction ---------------------------------------------------------------


async def referral_rewards(session: AsyncSession) -> ReferralRewards:
    row = await session.get(AppConfig, REFERRAL_CONFIG_KEY)
    return referral_rewards_from(row.value if row is not None else None)


async def find_referrer(session: AsyncSession, code: str) -> User | None:
    return (await session.execute(select(User).where(User.referral_code == normalize_code(code)))).scalar_one_or_none()


async def referral_facts(session: AsyncSession, referrer: User, referee: User) -> ReferralFacts:
    claimed = await session.scalar(select(Referral.id).where(Referral.referee_id == referee.id))
    cycle = await session.scalar(
        select(Referral.id).where(Referral.referee_id == referrer.id, Referral.referrer_id == referee.id)
    )
    return ReferralFacts(
        referrer_id=referrer.id,
        referrer_active=referrer.status == "active",
        referee_id=referee.id,
        referee_created_at=referee.created_at,
        referee_has_claimed=claimed is not None,
        referrer_referred_by_referee=cycle is not None,
    )


async def claim_referral(session: AsyncSession, *, referee_id: uuid.UUID, code: str, now: datetime) -> tuple[Referral, list[Envelope]]:
    """Record that `referee_id` joined on `code` and accept both rewards (inside the caller's
    transaction), or raise PromotionRefused. A concurrent second claim by the same person fails
    the caller's commit on the unique referee (IntegrityError: referral_already_claimed)."""
    referee = await session.get(User, referee_id)
    referrer = await find_referrer(session, code)
    if referee is None or referrer is None:
        raise PromotionRefused("referral_code_not_found")
    rewards = await referral_rewards(session)
    reason = referral_refusal(await referral_facts(session, referrer, referee), now, rewards.claim_window_days)
    if reason is not None:
        raise PromotionRefused(reason)
    if not await has_wallet(session, referee.id):
        raise PromotionRefused("wallet_not_found")
    if not await has_wallet(session, referrer.id):
        raise PromotionRefused("referral_code_not_found")  # an operator's account: not a code to share
    referral = Referral(
        id=uuid.uuid4(), referrer_id=referrer.id, referee_id=referee.id, code=referrer.referral_code,
        status="claimed", referrer_points=rewards.referrer_points, referee_points=rewards.referee_points, created_at=now,
    )
    session.add(referral)
    await session.flush()
    awards = referral_awards(referral)
    for award in awards:
        await insert_command(session, award)
    return referral, awards

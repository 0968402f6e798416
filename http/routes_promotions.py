"""Referral codes and coupons for the signed-in person, and coupon creation for admins.

Thin handlers: validate (msgspec), run the one transaction in `actors/promotions.py`, then ring
the wallets whose AwardPoints commands that transaction accepted and wait briefly for the
caller's own points, so the answer can say whether they have landed. If the wait times out the
points still land: the command is durable.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody, Parameter
from msgspec import Meta
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

import powerbank.actors.wallet_rewards  # noqa: F401  (registers AwardPoints wherever the app runs)
from powerbank.actors import promotions
from powerbank.actors.mailbox import Envelope
from powerbank.actors.promotions import PromotionRefused
from powerbank.http.auth import BEARER_SECURITY, AuthUser, require_admin
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.schemas import Currency, IdempotencyKey
from powerbank.storage.models import Coupon, CouponUsage, Referral, User
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

AWARD_WAIT_S = 5.0
# Fixed namespace: the same idempotency key from the same person names the same usage.
USAGE_NAMESPACE = uuid.UUID("0b5e8a5e-7c1d-4f7e-9d55-2f6a3c1e8b40")
# What the status code of each refusal is; anything not listed is a 409 (refused in this state).
REFUSAL_STATUS = {
    "coupon_not_found": 404,
    "referral_code_not_found": 404,
    "self_referral": 422,
}

REFUSAL_DETAIL = {
    "coupon_not_found": "no coupon with this code",
    "coupon_inactive": "this coupon is switched off",
    "coupon_not_yet_valid": "this coupon is not valid yet",
    "coupon_expired": "this coupon has expired",
    "coupon_already_used": "this account has used this coupon as often as it may",
    "coupon_exhausted": "every use of this coupon is taken",
    "idempotency_key_reused": "this idempotency_key was used for another coupon",
    "wallet_not_found": "this account has no wallet to credit yet; sign in first",
    "referral_code_not_found": "no referral code like this",
    "self_referral": "one's own referral code cannot be claimed",
    "referral_already_claimed": "this account has already claimed a referral code",
    "referral_window_closed": "referral codes can only be claimed soon after signing up",
    "referral_cycle": "this person joined on your code; you cannot claim theirs",
}

CouponCode = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$", description="case-insensitive")]
NewCouponCode = Annotated[str, Meta(min_length=3, max_length=32, pattern=r"^[A-Za-z0-9_-]+$", description="stored upper-case")]
ReferralCodeParam = Annotated[
    str, Parameter(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9]+$", description="someone's referral code, any case")
]


# --- bodies -----------------------------------------------------------------------------------


class ApplyCouponRequest(msgspec.Struct, forbid_unknown_fields=True):
    code: CouponCode
    # The same key from the same person names the same application: a retry applies nothing new.
    idempotency_key: IdempotencyKey | None = None


class CouponApplied(msgspec.Struct):
    usage_id: uuid.UUID
    code: str
    kind: str
    value: int
    currency: str | None
    # Points this application credits (0 for discounts), and whether they are in the balance yet.
    points: int
    points_credited: bool
    use_number: int
    applied_at: datetime
    replayed: bool


class MyCoupon(msgspec.Struct):
    usage_id: uuid.UUID
    code: str
    kind: str
    value: int
    currency: str | None
    points: int
    use_number: int
    applied_at: datetime
    valid_until: datetime | None


class MyCouponPage(msgspec.Struct):
    items: list[MyCoupon]
    page: int
    page_size: int
    total: int


class ClaimReferralRequest(msgspec.Struct, forbid_unknown_fields=True):
    code: Annotated[str, Meta(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9]+$")]


class ReferralClaimed(msgspec.Struct):
    referral_id: uuid.UUID
    referrer_code: str
    points: int
    points_credited: bool
    referrer_points: int
    claimed_at: datetime


class MyReferralCode(msgspec.Struct):
    code: str
    referred_count: int
    points_earned: int
    # What the next referral earns each side, and how long after sign-up a code may be claimed.
    referrer_points: int
    referee_points: int
    claim_window_days: int


class ReferralValidation(msgspec.Struct):
    code: str
    exists: bool
    # Whether the caller could claim it now; otherwise `reason` says why not.
    claimable: bool
    reason: str | None
    referee_points: int


class CreateCouponRequest(msgspec.Struct, forbid_unknown_fields=True):
    code: NewCouponCode
    kind: Literal["points", "discount_percent", "discount_minor"]
    value: Annotated[int, Meta(gt=0, le=10**9)]
    currency: Currency | None = None
    max_uses: Annotated[int, Meta(ge=1, le=10**9)] | None = None
    per_user_limit: Annotated[int, Meta(ge=1, le=1000)] = 1
    valid_from: Annotated[datetime, Meta(tz=True)] | None = None
    valid_until: Annotated[datetime, Meta(tz=True)] | None = None
    active: bool = True
    description: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


class CouponView(msgspec.Struct):
    id: uuid.UUID
    code: str
    kind: str
    value: int
    currency: str | None
    max_uses: int | None
    uses: int
    per_user_limit: int
    valid_from: datetime | None
    valid_until: datetime | None
    active: bool
    description: str | None
    created_at: datetime


# --- small steps ------------------------------------------------------------------------------


def refusal_error(refused: PromotionRefused) -> ApiError:
    status = REFUSAL_STATUS.get(refused.reason, 409)
    detail = REFUSAL_DETAIL.get(refused.reason, refused.reason.replace("_", " "))
    return ApiError(status, refused.reason, detail, **refused.details)


def usage_id_for(user_id: uuid.UUID, idempotency_key: str | None) -> uuid.UUID:
    if idempotency_key is None:
        return uuid.uuid4()
    return uuid.uuid5(USAGE_NAMESPACE, f"{user_id}:{idempotency_key}")


async def await_award(services, award: Envelope | None) -> bool:
    """Ring the wallet and wait (briefly) for the award to apply; True once it has."""
    if award is None:
        return False
    services.runtime.ring(award.kind, award.entity_id)
    try:
        result = await services.runtime.call(
            award.kind, award.entity_id, award.name, award.payload, command_id=award.command_id, timeout_s=AWARD_WAIT_S
        )
    except (TimeoutError, asyncio.TimeoutError):
        log.warning("points award %s not applied after %.1f s; it applies when the wallet catches up", award.command_id, AWARD_WAIT_S)
        return False
    if not result.get("ok", False):
        log.error("points award %s refused: %s", award.command_id, result)
    return bool(result.get("ok", False))


def coupon_view(coupon: Coupon) -> CouponView:
    return CouponView(
        id=coupon.id, code=coupon.code, kind=coupon.kind, value=coupon.value, currency=coupon.currency,
        max_uses=coupon.max_uses, uses=coupon.uses, per_user_limit=coupon.per_user_limit,
        valid_from=coupon.valid_from, valid_until=coupon.valid_until, active=coupon.active,
        description=coupon.description, created_at=coupon.created_at,
    )


# --- routes -----------------------------------------------------------------------------------


class ReferralController(Controller):
    path = "/api/referral"
    tags = ["promotions"]
    security = BEARER_SECURITY

    @get("/my-code", responses=error_responses(401))
    async def my_code(self, state: State, request: Request) -> MyReferralCode:
        """The caller's code to share, how many people claimed it and the points it earned."""
        async with services_of(state).readonly() as session:
            user = await session.get(User, request.user.id)
            count, earned = (
                await session.execute(
                    select(func.count(), func.coalesce(func.sum(Referral.referrer_points), 0))
                    .where(Referral.referrer_id == user.id, Referral.status == "claimed")
                )
            ).one()
            rewards = await promotions.referral_rewards(session)
        return MyReferralCode(
            code=user.referral_code, referred_count=count, points_earned=int(earned),
            referrer_points=rewards.referrer_points, referee_points=rewards.referee_points,
            claim_window_days=rewards.claim_window_days,
        )

    @get("/validate", responses=error_responses(400, 401))
    async def validate(self, state: State, request: Request, code: ReferralCodeParam) -> ReferralValidation:
        """Whether a code exists and whether the caller could claim it now (and if not, why)."""
        async with services_of(state).readonly() as session:
            referrer = await promotions.find_referrer(session, code)
            referee = await session.get(User, request.user.id)
            rewards = await promotions.referral_rewards(session)
            if referrer is None or referee is None:
                reason = "referral_code_not_found"
            else:
                facts = await promotions.referral_facts(session, referrer, referee)
                reason = promotions.referral_refusal(facts, utcnow(), rewards.claim_window_days)
                if reason is None and not await promotions.has_wallet(session, referrer.id):
                    reason = "referral_code_not_found"
        exists = referrer is not None and referrer.status == "active" and reason != "referral_code_not_found"
        return ReferralValidation(
            code=promotions.normalize_code(code), exists=exists, claimable=reason is None, reason=reason,
            referee_points=rewards.referee_points,
        )

    @post("/claim", status_code=201, responses=error_responses(400, 401, 404, 409, 422))
    async def claim(self, state: State, request: Request, data: JSONBody[ClaimReferralRequest]) -> ReferralClaimed:
        """Claim someone's referral code: once per person, not one's own, within the window after
        sign-up. Both people get points (app_config `referral_rewards`)."""
        services = services_of(state)
        try:
            async with services.sessions.begin() as session:
                referral, awards = await promotions.claim_referral(
                    session, referee_id=request.user.id, code=data.code, now=utcnow()
                )
        except PromotionRefused as refused:
            raise refusal_error(refused) from None
        except IntegrityError as exc:  # a concurrent claim by the same person won
            raise ApiError(409, "referral_already_claimed", REFUSAL_DETAIL["referral_already_claimed"]) from exc
        own = next((award for award in awards if award.entity_id == str(request.user.id)), None)
        for award in awards:
            if award is not own:
                services.runtime.ring(award.kind, award.entity_id)
        credited = await await_award(services, own)
        log.info("referral %s: %s joined on %s's code", referral.id, referral.referee_id, referral.referrer_id)
        return ReferralClaimed(
            referral_id=referral.id, referrer_code=referral.code, points=referral.referee_points,
            points_credited=credited, referrer_points=referral.referrer_points, claimed_at=referral.created_at,
        )


class PromotionController(Controller):
    path = "/api/promotions"
    tags = ["promotions"]
    security = BEARER_SECURITY
    dependencies = {"paging": Provide(provide_paging)}

    @post("/apply-coupon", status_code=200, responses=error_responses(400, 401, 404, 409))
    async def apply_coupon(self, state: State, request: Request, data: JSONBody[ApplyCouponRequest]) -> CouponApplied:
        """Apply a coupon. A points coupon credits its points; a discount coupon is recorded for
        the person. Refusals: coupon_not_found (404), coupon_inactive, coupon_not_yet_valid,
        coupon_expired, coupon_already_used (per-person limit), coupon_exhausted (all uses
        taken), idempotency_key_reused (409)."""
        services = services_of(state)
        usage_id = usage_id_for(request.user.id, data.idempotency_key)
        try:
            async with services.sessions.begin() as session:
                redemption = await promotions.apply_coupon(
                    session, user_id=request.user.id, code=data.code, usage_id=usage_id, now=utcnow()
                )
        except PromotionRefused as refused:
            raise refusal_error(refused) from None
        except IntegrityError as exc:  # the same person's concurrent application took this use number
            raise ApiError(409, "coupon_already_used", REFUSAL_DETAIL["coupon_already_used"]) from exc
        credited = await await_award(services, redemption.award)
        usage, coupon = redemption.usage, redemption.coupon
        return CouponApplied(
            usage_id=usage.id, code=coupon.code, kind=coupon.kind, value=coupon.value, currency=coupon.currency,
            points=usage.points, points_credited=credited, use_number=usage.use_number, applied_at=usage.created_at,
            replayed=redemption.replayed,
        )

    @get("/my-coupons", responses=error_responses(400, 401))
    async def my_coupons(self, state: State, request: Request, paging: NamedDependency[Paging]) -> MyCouponPage:
        """The caller's coupon applications, newest first."""
        mine = select(CouponUsage, Coupon).join(Coupon, Coupon.id == CouponUsage.coupon_id).where(CouponUsage.user_id == request.user.id)
        async with services_of(state).readonly() as session:
            total = await session.scalar(select(func.count()).select_from(CouponUsage).where(CouponUsage.user_id == request.user.id))
            rows = (
                await session.execute(
                    mine.order_by(CouponUsage.created_at.desc(), CouponUsage.id).offset(paging.offset).limit(paging.page_size)
                )
            ).all()
        items = [
            MyCoupon(
                usage_id=usage.id, code=coupon.code, kind=coupon.kind, value=coupon.value, currency=coupon.currency,
                points=usage.points, use_number=usage.use_number, applied_at=usage.created_at, valid_until=coupon.valid_until,
            )
            for usage, coupon in rows
        ]
        return MyCouponPage(items=items, page=paging.page, page_size=paging.page_size, total=total or 0)


class AdminCouponController(Controller):
    path = "/api/admin/coupons"
    tags = ["admin"]
    security = BEARER_SECURITY
    guards = [require_admin]

    @post("/", status_code=201, responses=error_responses(400, 401, 403, 409))
    async def create_coupon(self, state: State, request: Request, data: JSONBody[CreateCouponRequest]) -> CouponView:
        """Create a coupon. `value` is points (kind points), a percentage 1-100
        (discount_percent) or minor units of `currency` (discount_minor, the only kind with a
        currency). `max_uses` null means no overall limit. The code is stored upper-case and
        must be unused (coupon_code_taken)."""
        problem = promotions.coupon_definition_problem(data.kind, data.value, data.currency, data.valid_from, data.valid_until)
        if problem is not None:
            field, message = problem
            raise ApiError(400, "validation_failed", f"{field}: {message}", fields=[{"field": field, "source": "body", "message": message}])
        admin: AuthUser = request.user
        coupon = Coupon(
            id=uuid.uuid4(), code=promotions.normalize_code(data.code), kind=data.kind, value=data.value,
            currency=data.currency, max_uses=data.max_uses, uses=0, per_user_limit=data.per_user_limit,
            valid_from=data.valid_from, valid_until=data.valid_until, active=data.active,
            description=data.description, created_by=admin.id, created_at=utcnow(),
        )
        try:
            async with services_of(state).sessions.begin() as session:
                session.add(coupon)
        except IntegrityError as exc:
            raise ApiError(409, "coupon_code_taken", f"a coupon {coupon.code} exists already") from exc
        log.info("admin %s created coupon %s (%s %s, max %s uses)", admin.id, coupon.code, coupon.kind, coupon.value, coupon.max_uses)
        return coupon_view(coupon)

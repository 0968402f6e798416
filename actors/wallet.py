"""The Wallet actor: one per person (entity id = user id), owning their money and points.

Because every command for one person passes through this mailbox one at a time, the checks that
must not race (enough funds, no unpaid dues, not too many rentals at once) are plain reads here.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, select

from powerbank.actors import payments, pricing
from powerbank.actors.notifications import notify_money
from powerbank.actors.runtime import ActorContext, CommandRejected, handles
from powerbank.storage import ledger
from powerbank.storage.ledger import LedgerError
from powerbank.storage.models import ActorCommand, AppConfig, LedgerTransfer, PaymentCustomer, Rental, RentalPackage, User, Wallet

RENTAL_HOLD = "rental_hold"
POINTS_HOLD = "rental_points_hold"
POINTS_CURRENCY = "PTS"
# Points are issued from and redeemed back into one platform account per points currency,
# `admin_adjustments:PTS`: its (debit) balance is the points outstanding. It reuses an existing
# shared account kind, so no migration of the kind CHECK constraint is needed.
POINTS_ISSUER_KIND = "admin_adjustments"
REVENUE_KIND = "platform_revenue"
# The ledger rows a person may ask to have reversed, and what the reversal is called.
REFUNDABLE_KINDS = frozenset({
    "rental_hold:post", "rental_points_hold:post", "rental_overage", "rental_points", "due_wallet", "due_points", "points_spend", "wallet_spend",
})


@dataclass(frozen=True)
class MoneyConfig:
    """The AppConfig values money decisions need, with SPEC's defaults when a key is missing."""

    ratio: pricing.PointsRatio = pricing.PointsRatio()
    quick_return_s: int = pricing.QUICK_RETURN_S
    timely_return_points: int = pricing.TIMELY_RETURN_POINTS


async def load_money_config(session) -> MoneyConfig:
    rows = {
        row.key: row.value
        for row in (await session.execute(
            select(AppConfig).where(AppConfig.key.in_(("points_per_currency_unit", "quick_return_s", "timely_return_points")))
        )).scalars()
    }

    def number(key: str, default: int) -> int:
        value = (rows.get(key) or {}).get("value")
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default

    return MoneyConfig(
        ratio=pricing.PointsRatio.of(rows.get("points_per_currency_unit")),
        quick_return_s=number("quick_return_s", pricing.QUICK_RETURN_S),
        timely_return_points=number("timely_return_points", pricing.TIMELY_RETURN_POINTS),
    )


def is_amount(value: Any) -> bool:
    """A positive integer (bool is an int in Python, and never an amount)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class HoldRequest:
    amount_minor: int
    open_rental_holds: int
    max_active_rentals: int
    unpaid_dues_minor: int
    available_minor: int


def refuse_hold_reason(request: HoldRequest) -> str | None:
    """Why a rental hold must be refused, or None to place it. Order matters: the app shows the
    first reason, and dues are the one a person can act on first."""
    if request.unpaid_dues_minor > 0:
        return "unpaid_dues"
    if request.open_rental_holds >= request.max_active_rentals:
        return "too_many_active_rentals"
    if request.available_minor < request.amount_minor:
        return "insufficient_funds"
    return None


def hold_id(rental_id: str) -> uuid.UUID:
    return uuid.uuid5(uuid.UUID(rental_id), "hold")


async def load_wallet(ctx: ActorContext, user_id: str) -> Wallet:
    wallet = (
        await ctx.session.execute(select(Wallet).where(Wallet.user_id == uuid.UUID(user_id)))
    ).scalar_one_or_none()
    if wallet is None:
        raise CommandRejected("wallet_not_found")
    return wallet


# Built once: constructing an ORM select costs about as much as the round trip it makes, and
# this is the first read of every money command, the idle debit included.
_WALLET_AND_ACCOUNT = (
    select(Wallet, ledger.LedgerAccount)
    .join(ledger.LedgerAccount, ledger.LedgerAccount.id == Wallet.account_id)
    .where(Wallet.user_id == bindparam("user_id"))
)


async def load_wallet_and_account(ctx: ActorContext, user_id: str) -> tuple[Wallet, ledger.LedgerAccount]:
    """The wallet and its money account in one read: the two rows every money command needs
    (the account then stays in the session, so `wallet_account` costs nothing more)."""
    row = (await ctx.session.execute(_WALLET_AND_ACCOUNT, {"user_id": uuid.UUID(user_id)})).first()
    if row is None:
        raise CommandRejected("wallet_not_found")
    return row[0], row[1]


async def wallet_account(ctx: ActorContext, wallet: Wallet):
    return await ctx.session.get(ledger.LedgerAccount, wallet.account_id)


def wallet_view(wallet: Wallet, account, points) -> dict[str, Any]:
    balance = ledger.credit_balance(account)
    return {
        "currency": wallet.currency,
        "balance_minor": balance.posted_minor,
        "held_minor": balance.held_minor,
        "available_minor": balance.available_minor,
        "points": ledger.credit_balance(points).posted_minor,
    }


async def notify_wallet(ctx: ActorContext, user_id: str, wallet: Wallet) -> dict[str, Any]:
    """Tell the person's apps (after commit) what their wallet looks like now; every wallet
    command that moves money ends here, including those in wallet_payments and wallet_rewards."""
    account = await ctx.session.get(ledger.LedgerAccount, wallet.account_id)
    points = await ctx.session.get(ledger.LedgerAccount, wallet.points_account_id)
    view = wallet_view(wallet, account, points)
    ctx.notify(f"user:{user_id}", {"type": "wallet.updated", "wallet": view})
    return view


async def refill_if_low(ctx: ActorContext, user_id: str, account) -> bool:
    """After a debit: if it left the wallet below the person's auto-refill threshold and a saved
    card refills it, announce the refill for right after this commit (the provider is never
    called inside the transaction). `payment_flows.auto_refill` keys the intent on the wallet's
    posted credits, so however many debits announce it, one refill is in flight per wallet; the
    scheduler's sweep remains the safety net for a lost notice."""
    customer = (await ctx.session.execute(select(PaymentCustomer).where(
        PaymentCustomer.user_id == uuid.UUID(user_id), PaymentCustomer.auto_refill.is_(True),
        PaymentCustomer.saved_payment_method_id.is_not(None)).limit(1))).scalar_one_or_none()
    if customer is None:
        return False
    setting = payments.RefillSetting(customer.auto_refill, customer.auto_refill_threshold_minor,
                                     customer.auto_refill_amount_minor, customer.saved_payment_method_id)
    if payments.auto_refill_amount(setting, ledger.credit_balance(account).available_minor) == 0:
        return False
    ctx.notify(payments.CARD_WORK, payments.refill_work(user_id))
    return True


@handles("wallet", "OpenWallet")
async def open_wallet(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    uid = uuid.UUID(user_id)
    existing = (await ctx.session.execute(select(Wallet).where(Wallet.user_id == uid))).scalar_one_or_none()
    if existing is not None:
        return {"ok": True, "wallet_id": str(existing.id)}
    if await ctx.session.get(User, uid) is None:
        raise CommandRejected("user_not_found")
    currency = payload["currency"]
    account = await ledger.get_or_create_account(
        ctx.session, f"wallet:{uid}", "user_wallet", currency, user_id=uid, no_overdraft=True
    )
    points = await ledger.get_or_create_account(
        ctx.session, f"points:{uid}", "user_points", "PTS", user_id=uid, no_overdraft=True
    )
    wallet = Wallet(user_id=uid, currency=currency, account_id=account.id, points_account_id=points.id)
    ctx.session.add(wallet)
    await ctx.session.flush()
    return {"ok": True, "wallet_id": str(wallet.id)}


@handles("wallet", "CreditWallet")
async def credit_wallet(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """An operator's manual credit (a goodwill gesture, a correction): admin adjustments ->
    wallet, idempotent by `transfer_id`. Money a person pays in arrives through the provider
    instead (`ApplyIntentStatus` in wallet_payments.py)."""
    wallet, account = await load_wallet_and_account(ctx, user_id)
    if payload.get("currency") != wallet.currency:
        raise CommandRejected("currency_mismatch")
    source = await ledger.system_account(ctx.session, "admin_adjustments", wallet.currency)
    try:
        await ledger.transfer(
            ctx.session,
            transfer_id=uuid.UUID(payload["transfer_id"]),
            debit=source,
            credit=account,
            amount_minor=payload["amount_minor"],
            kind="admin_credit",
            description=payload.get("reason"),
        )
    except LedgerError as error:
        raise CommandRejected(error.reason) from None
    return {"ok": True, "wallet": await notify_wallet(ctx, user_id, wallet)}


@handles("wallet", "PlaceHold")
async def place_hold(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Set the rental's price aside: from the wallet, and when the wallet alone is short, the
    rest from points at the configured ratio (SPEC: wallet, points or both). Each part is a
    pending transfer that the return posts or releases exactly once."""
    rental_id = payload["rental_id"]
    reason = await _hold_refusal(ctx, user_id, payload)
    if reason is not None:
        await ctx.send("rental", rental_id, "HoldRefused", {"reason": reason}, f"hold-refused:{rental_id}")
        return {"ok": False, "reason": reason}
    wallet, account = await load_wallet_and_account(ctx, user_id)
    if not needs_ledger_hold(payload):
        # A free package, or a rental the card pays: nothing to set aside here (a zero-amount
        # transfer is not a transfer), but the checks above still ran.
        await ctx.send("rental", rental_id, "HoldPlaced", {"transfer_id": None}, f"hold-placed:{rental_id}")
        return {"ok": True, "transfer_id": None, "held_minor": 0, "points_held": 0}
    points = await ctx.session.get(ledger.LedgerAccount, wallet.points_account_id)
    split = pricing.split_payment(
        payload["amount_minor"], wallet_available_minor=ledger.credit_balance(account).available_minor,
        points_available=ledger.credit_balance(points).available_minor,
        ratio=(await load_money_config(ctx.session)).ratio, mode="wallet_first",
    )
    if split.wallet_minor or not split.points:
        revenue = await ledger.system_account(ctx.session, REVENUE_KIND, wallet.currency)
        await ledger.transfer(
            ctx.session, transfer_id=hold_id(rental_id), debit=account, credit=revenue, amount_minor=split.wallet_minor,
            kind=RENTAL_HOLD, pending=True, rental_id=uuid.UUID(rental_id),
        )
    if split.points:
        issuer = await ledger.system_account(ctx.session, POINTS_ISSUER_KIND, POINTS_CURRENCY)
        await ledger.transfer(
            ctx.session, transfer_id=points_hold_id(rental_id), debit=points, credit=issuer, amount_minor=split.points,
            kind=POINTS_HOLD, pending=True, rental_id=uuid.UUID(rental_id),
        )
    first = hold_id(rental_id) if split.wallet_minor or not split.points else points_hold_id(rental_id)
    await ctx.send("rental", rental_id, "HoldPlaced", {"transfer_id": str(first)}, f"hold-placed:{rental_id}")
    await notify_wallet(ctx, user_id, wallet)
    return {"ok": True, "transfer_id": str(first), "held_minor": split.wallet_minor, "points_held": split.points}


def needs_ledger_hold(payload: dict[str, Any]) -> bool:
    """A rental's price is set aside in the ledger only when the wallet (or points) pays it and
    it is not free."""
    return payload.get("payment_mode", "wallet") == "wallet" and payload["amount_minor"] > 0


def points_hold_id(rental_id: str) -> uuid.UUID:
    return uuid.uuid5(uuid.UUID(rental_id), "points-hold")


async def _hold_refusal(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> str | None:
    wallet = (
        await ctx.session.execute(select(Wallet).where(Wallet.user_id == uuid.UUID(user_id)))
    ).scalar_one_or_none()
    if wallet is None:
        return "wallet_not_found"
    if payload.get("currency") != wallet.currency:
        return "currency_mismatch"
    account = await wallet_account(ctx, wallet)
    points = await ctx.session.get(ledger.LedgerAccount, wallet.points_account_id)
    ratio = (await load_money_config(ctx.session)).ratio
    rentals_held = {
        hold.rental_id
        for hold in await ledger.open_holds(ctx.session, account.id, RENTAL_HOLD)
        + await ledger.open_holds(ctx.session, points.id, POINTS_HOLD)
    }
    request = HoldRequest(
        # A card rental's money is authorised on the card; the wallet only checks dues and limits.
        amount_minor=payload["amount_minor"] if needs_ledger_hold(payload) else 0,
        open_rental_holds=len(rentals_held) + await _open_holdless_rentals(ctx, user_id, payload["rental_id"]),
        max_active_rentals=payload.get("max_active_rentals", 1),
        unpaid_dues_minor=await _unpaid_dues_minor(ctx, user_id),
        available_minor=ledger.credit_balance(account).available_minor
        + pricing.points_value_minor(ledger.credit_balance(points).available_minor, ratio),
    )
    return refuse_hold_reason(request)


async def _open_holdless_rentals(ctx: ActorContext, user_id: str, rental_id: str) -> int:
    """Open rentals that hold nothing in the ledger (card-paid or free) still count towards the
    person's limit: from the moment this wallet approved them. Past the wallet (ejecting or
    later) the rental's status says so; while still pending, the approval this mailbox already
    sent it (`hold-placed:<rental>`, accepted in the same transaction as the decision) does. A
    pending one without it is the very rental asking, or a start this wallet has not decided."""
    rows = (await ctx.session.execute(
        select(Rental.id, Rental.status).join(RentalPackage, RentalPackage.id == Rental.package_id).where(
            Rental.user_id == uuid.UUID(user_id), Rental.id != uuid.UUID(rental_id),
            Rental.status.in_(("pending", "ejecting", "active", "overdue")),
            (Rental.payment_mode == "card") | (RentalPackage.price_minor == 0),
        )
    )).all()
    pending = [f"hold-placed:{rid}" for rid, status in rows if status == "pending"]
    approved = 0
    if pending:
        approved = int(await ctx.session.scalar(
            select(func.count()).select_from(ActorCommand).where(ActorCommand.kind == "rental", ActorCommand.command_id.in_(pending))
        ) or 0)
    return len(rows) - len(pending) + approved


async def _unpaid_dues_minor(ctx: ActorContext, user_id: str) -> int:
    total = await ctx.session.scalar(
        select(func.coalesce(func.sum(Rental.due_minor), 0)).where(Rental.user_id == uuid.UUID(user_id))
    )
    return int(total or 0)


@handles("wallet", "VoidHold")
async def void_hold(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    voided = False
    for transfer_id in (hold_id(payload["rental_id"]), points_hold_id(payload["rental_id"])):
        pending = await ctx.session.get(ledger.LedgerTransfer, transfer_id)
        if pending is not None:
            await ledger.resolve_pending(ctx.session, pending, post_amount_minor=None)
            voided = True
    if not voided:
        return {"ok": True, "voided": False}
    wallet = await load_wallet(ctx, user_id)
    await notify_wallet(ctx, user_id, wallet)
    return {"ok": True, "voided": True}


@handles("wallet", "CaptureHold")
async def capture_hold(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Charge a finished rental: from the hold first, then from what is left in the wallet, then
    points at the configured ratio (`pricing.settle_fee`); any remainder becomes a due on the
    rental. A timely return's points are awarded after the charge, so they never pay for the
    rental that earned them."""
    rental_id = payload["rental_id"]
    fee_minor = payload["amount_minor"]
    wallet, account = await load_wallet_and_account(ctx, user_id)
    points = await ctx.session.get(ledger.LedgerAccount, wallet.points_account_id)
    config = await load_money_config(ctx.session)
    pending, hold_minor = await _capturable_hold(ctx, hold_id(rental_id))
    points_pending, points_hold = await _capturable_hold(ctx, points_hold_id(rental_id))
    settlement = pricing.settle_fee(
        fee_minor,
        hold_minor=hold_minor,
        # Whatever is left after the hold: the hold pays first, so the wallet only pays once the
        # hold is used up, and then the released part is nil.
        wallet_available_minor=ledger.credit_balance(account).available_minor,
        points_available=ledger.credit_balance(points).available_minor,
        ratio=config.ratio,
        mode=payload.get("payment_mode", "wallet_first"),
        points_hold=points_hold,
    )
    if pending is not None:
        # Posting the hold for less than its amount releases the rest; posting 0 voids it.
        await ledger.resolve_pending(ctx.session, pending, post_amount_minor=settlement.from_hold_minor)
    if points_pending is not None:
        await ledger.resolve_pending(ctx.session, points_pending, post_amount_minor=settlement.points_from_hold)
    await _charge_wallet(ctx, wallet, account, rental_id, settlement.split.wallet_minor, kind="rental_overage", tag="overage")
    await _spend_points(ctx, points, rental_id, settlement.split.points, kind="rental_points", tag="points")
    awarded = await _award_points(ctx, points, uuid.uuid5(uuid.UUID(rental_id), "timely-points"),
                                  payload.get("award_points", 0), kind="timely_return_points",
                                  rental_id=uuid.UUID(rental_id))
    settled = {"charged_minor": settlement.charged_minor, "due_minor": settlement.due_minor}
    await ctx.send("rental", rental_id, "ChargeSettled", settled, f"charge-settled:{rental_id}")
    await notify_wallet(ctx, user_id, wallet)
    await refill_if_low(ctx, user_id, account)
    points_spent = settlement.points_from_hold + settlement.split.points
    return {"ok": True, **settled, "points_spent": points_spent, "points_awarded": awarded}


async def _capturable_hold(ctx: ActorContext, pending_id: uuid.UUID) -> tuple[LedgerTransfer | None, int]:
    """A rental's hold and what it can still pay: its amount while open, what was posted if
    it was resolved before (a repeat), 0 if it was voided or never placed."""
    pending = await ctx.session.get(LedgerTransfer, pending_id)
    if pending is None:
        return None, 0
    resolution = await ctx.session.get(LedgerTransfer, uuid.uuid5(pending.id, "resolution"))
    if resolution is None:
        return pending, pending.amount_minor
    return pending, resolution.amount_minor if resolution.state == "posted" else 0


async def _charge_wallet(ctx, wallet: Wallet, account, rental_id: str, amount_minor: int, *, kind: str, tag: str) -> None:
    if amount_minor <= 0:
        return
    revenue = await ledger.system_account(ctx.session, REVENUE_KIND, wallet.currency)
    await ledger.transfer(
        ctx.session, transfer_id=uuid.uuid5(uuid.UUID(rental_id), tag), debit=account, credit=revenue,
        amount_minor=amount_minor, kind=kind, rental_id=uuid.UUID(rental_id),
    )


async def _spend_points(ctx, points_account, rental_id: str, points: int, *, kind: str, tag: str) -> None:
    """Points paid for something go back to the issuer: they stop being outstanding."""
    if points <= 0:
        return
    issuer = await ledger.system_account(ctx.session, POINTS_ISSUER_KIND, POINTS_CURRENCY)
    await ledger.transfer(
        ctx.session, transfer_id=uuid.uuid5(uuid.UUID(rental_id), tag), debit=points_account, credit=issuer,
        amount_minor=points, kind=kind, rental_id=uuid.UUID(rental_id),
    )


async def _award_points(ctx, points_account, transfer_id: uuid.UUID, points: int, *, kind: str,
                        rental_id: uuid.UUID | None = None, description: str | None = None) -> int:
    if not is_amount(points):
        return 0
    issuer = await ledger.system_account(ctx.session, POINTS_ISSUER_KIND, POINTS_CURRENCY)
    await ledger.transfer(
        ctx.session, transfer_id=transfer_id, debit=issuer, credit=points_account, amount_minor=points,
        kind=kind, rental_id=rental_id, description=description,
    )
    return points


@handles("wallet", "GrantPoints")
async def grant_points(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Points granted outside a rental and outside promotions (an achievement, an operator's
    gesture); referral and coupon rewards are `AwardPoints` in actors/wallet_rewards.py on main,
    from the same issuer account. Idempotent by `transfer_id`."""
    wallet = await load_wallet(ctx, user_id)
    points_account = await ctx.session.get(ledger.LedgerAccount, wallet.points_account_id)
    if not is_amount(payload.get("points")):
        raise CommandRejected("invalid_amount")
    try:
        await _award_points(ctx, points_account, uuid.UUID(payload["transfer_id"]), payload["points"],
                            kind="points_award", description=payload.get("reason"))
    except LedgerError as error:
        raise CommandRejected(error.reason) from None
    return {"ok": True, "wallet": await notify_wallet(ctx, user_id, wallet)}


@handles("wallet", "SpendPoints")
async def spend_points(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Redeem points (back to the issuer). Refused, writing nothing, beyond the balance."""
    wallet = await load_wallet(ctx, user_id)
    points_account = await ctx.session.get(ledger.LedgerAccount, wallet.points_account_id)
    issuer = await ledger.system_account(ctx.session, POINTS_ISSUER_KIND, POINTS_CURRENCY)
    try:
        await ledger.transfer(
            ctx.session, transfer_id=uuid.UUID(payload["transfer_id"]), debit=points_account, credit=issuer,
            amount_minor=payload.get("points"), kind="points_spend", description=payload.get("reason"),
        )
    except LedgerError as error:
        raise CommandRejected(error.reason) from None
    return {"ok": True, "wallet": await notify_wallet(ctx, user_id, wallet)}


@handles("wallet", "SpendWallet")
async def spend_wallet(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Pay the platform from the wallet for something that is not a rental's own charge (an
    extension, a purchase). Refused, writing nothing, beyond what is available; idempotent by
    `transfer_id`; refundable with RefundTransfer."""
    wallet, account = await load_wallet_and_account(ctx, user_id)
    if payload.get("currency") != wallet.currency:
        raise CommandRejected("currency_mismatch")
    revenue = await ledger.system_account(ctx.session, REVENUE_KIND, wallet.currency)
    try:
        await ledger.transfer(
            ctx.session, transfer_id=uuid.UUID(payload["transfer_id"]), debit=account, credit=revenue,
            amount_minor=payload.get("amount_minor"), kind="wallet_spend", description=payload.get("reason"),
        )
    except LedgerError as error:
        raise CommandRejected(error.reason) from None
    await refill_if_low(ctx, user_id, account)
    return {"ok": True, "wallet": await notify_wallet(ctx, user_id, wallet)}


def due_transfer_ids(rental_id: str) -> tuple[uuid.UUID, uuid.UUID]:
    """(wallet part, points part) of paying a rental's due: one payment per rental, so a repeat
    by any command id finds the first."""
    rental = uuid.UUID(rental_id)
    return uuid.uuid5(rental, "due-wallet"), uuid.uuid5(rental, "due-points")


@handles("wallet", "PayDue")
async def pay_due(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Pay a rental's whole due from points and the wallet, in the order the person chose. All
    or nothing: a due is either settled or stays as it was (a partial payment would leave the
    person blocked anyway, and with less money)."""
    rental_id = payload["rental_id"]
    rental = await ctx.session.get(Rental, uuid.UUID(rental_id))
    if rental is None or str(rental.user_id) != user_id:
        raise CommandRejected("rental_not_found")
    wallet, account = await load_wallet_and_account(ctx, user_id)
    wallet_id, points_id = due_transfer_ids(rental_id)
    earlier = [t for t in (await ctx.session.get(LedgerTransfer, wallet_id), await ctx.session.get(LedgerTransfer, points_id)) if t]
    if earlier:
        return {"ok": True, "already_paid": True, "wallet_minor": sum(t.amount_minor for t in earlier if t.currency != POINTS_CURRENCY),
                "points": sum(t.amount_minor for t in earlier if t.currency == POINTS_CURRENCY)}
    if rental.due_minor <= 0:
        raise CommandRejected("nothing_due")
    if rental.currency != wallet.currency:
        raise CommandRejected("currency_mismatch")
    points_account = await ctx.session.get(ledger.LedgerAccount, wallet.points_account_id)
    config = await load_money_config(ctx.session)
    split = pricing.split_payment(
        rental.due_minor,
        wallet_available_minor=ledger.credit_balance(account).available_minor,
        points_available=ledger.credit_balance(points_account).available_minor,
        ratio=config.ratio,
        mode=payload.get("payment_mode", "points_first"),
    )
    if not split.sufficient:
        raise CommandRejected("insufficient_funds", due_minor=rental.due_minor, shortfall_minor=split.shortfall_minor)
    await _charge_wallet(ctx, wallet, account, rental_id, split.wallet_minor, kind="due_wallet", tag="due-wallet")
    await _spend_points(ctx, points_account, rental_id, split.points, kind="due_points", tag="due-points")
    await ctx.send("rental", rental_id, "DuePaid", {"paid_minor": split.amount_minor}, f"due-paid:{rental_id}")
    view = await notify_wallet(ctx, user_id, wallet)
    await refill_if_low(ctx, user_id, account)
    return {"ok": True, "paid_minor": split.amount_minor, "wallet_minor": split.wallet_minor,
            "points": split.points, "points_minor": split.points_minor, "wallet": view}


# --- refunds: one rule, one way to post them -------------------------------------------------

# A refund of a ledger transfer is posted the other way, never by editing it (rows are
# immutable). Every refund row names what it refunds in its description, so "how much of this
# transfer was refunded" is read from the ledger itself, whichever path posted it: the wallet's
# RefundTransfer, the card refund endpoint (ReserveRefund) or a refund the provider reports
# (ApplyProviderRefund, e.g. one made in the Stripe dashboard).
REFUND_KIND, REFUND_SHORTFALL_KIND, REFUND_REVERSAL_KIND = "refund", "refund_shortfall", "refund_reversal"


def refund_marker(original_id: uuid.UUID) -> str:
    return f"refund of {original_id}"


async def refunded_minor(ctx: ActorContext, original: LedgerTransfer) -> int:
    """What was refunded of `original` so far: refunds (and shortfalls) minus the reversals of
    refunds the provider failed."""
    rows = (await ctx.session.execute(
        select(LedgerTransfer.kind, func.sum(LedgerTransfer.amount_minor))
        .where(LedgerTransfer.description == refund_marker(original.id))
        .group_by(LedgerTransfer.kind)
    )).all()
    sums = {kind: int(total or 0) for kind, total in rows}
    return sums.get(REFUND_KIND, 0) + sums.get(REFUND_SHORTFALL_KIND, 0) - sums.get(REFUND_REVERSAL_KIND, 0)


async def post_refund(ctx: ActorContext, original: LedgerTransfer, *, transfer_id: uuid.UUID, amount_minor: Any,
                      shortfall_from: ledger.LedgerAccount | None = None) -> int:
    """Post a refund of `original` (its credit account pays its debit account back), idempotent
    by `transfer_id`; the refundable amount left afterwards. Refused above what is left
    (`payments.refundable_minor`), writing nothing. `shortfall_from` pays whatever the refunded
    account no longer holds: for money the provider already gave back, so it must be recorded."""
    if not is_amount(amount_minor):
        raise CommandRejected("invalid_amount")
    already = await refunded_minor(ctx, original)
    earlier = await ctx.session.get(LedgerTransfer, transfer_id)
    if earlier is not None:
        shortfall = await ctx.session.get(LedgerTransfer, uuid.uuid5(transfer_id, "shortfall"))
        if earlier.description != refund_marker(original.id) or (
                earlier.amount_minor + (shortfall.amount_minor if shortfall else 0)) != amount_minor:
            raise CommandRejected("transfer_id_reused")
        return payments.refundable_minor(original.amount_minor, already)
    refundable = payments.refundable_minor(original.amount_minor, already)
    if amount_minor > refundable:
        raise CommandRejected("exceeds_refundable", refundable_minor=refundable)
    payer = await ctx.session.get(ledger.LedgerAccount, original.credit_account_id)
    payee = await ctx.session.get(ledger.LedgerAccount, original.debit_account_id)
    from_payer = amount_minor
    if shortfall_from is not None and payer.no_overdraft:
        from_payer = min(amount_minor, max(0, ledger.credit_balance(payer).available_minor))
    marker = refund_marker(original.id)
    try:
        await ledger.transfer(ctx.session, transfer_id=transfer_id, debit=payer, credit=payee, amount_minor=from_payer,
                              kind=REFUND_KIND, rental_id=original.rental_id, description=marker)
        if amount_minor > from_payer:
            await ledger.transfer(ctx.session, transfer_id=uuid.uuid5(transfer_id, "shortfall"), debit=shortfall_from,
                                  credit=payee, amount_minor=amount_minor - from_payer, kind=REFUND_SHORTFALL_KIND,
                                  rental_id=original.rental_id, description=marker)
    except LedgerError as error:
        raise CommandRejected(error.reason) from None
    return refundable - amount_minor


@handles("wallet", "RefundTransfer")
async def refund_transfer(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Give back (part of) a charge the person paid from their wallet or points (an operator's
    decision). Idempotent by `refund_id`; with every other refund path, never more than the charge
    (`post_refund`)."""
    wallet = await load_wallet(ctx, user_id)
    original = await ctx.session.get(LedgerTransfer, uuid.UUID(payload["transfer_id"]))
    mine = {wallet.account_id, wallet.points_account_id}
    if original is None or original.debit_account_id not in mine or original.kind not in REFUNDABLE_KINDS:
        raise CommandRejected("transfer_not_found")
    refund_id, amount = uuid.UUID(payload["refund_id"]), payload.get("amount_minor")
    repeat = await ctx.session.get(LedgerTransfer, refund_id) is not None
    left = await post_refund(ctx, original, transfer_id=refund_id, amount_minor=amount)
    if repeat:
        return {"ok": True, "refund_id": str(refund_id), "amount_minor": amount, "repeat": True}
    if original.debit_account_id == wallet.account_id:  # money back (a points refund is not announced)
        await notify_money(ctx, user_id, "refund_succeeded", refund_id, amount, wallet.currency)
    return {"ok": True, "refund_id": str(refund_id), "amount_minor": amount,
            "refundable_minor": left, "wallet": await notify_wallet(ctx, user_id, wallet)}


# --- the scheduler's side ---------------------------------------------------------------------

HOLD_EXPIRY = timedelta(minutes=10)


async def expire_orphaned_holds(runtime, now: datetime) -> int:
    """Release rental holds still pending `HOLD_EXPIRY` after they were placed although their
    rental was cancelled (or never written): the safety net behind the rental's own VoidHold.
    Its own command id (`expire-hold:`): VoidHold is idempotent by the hold, so a second release
    changes nothing, while reusing the rental's `void:` id could hide a hold that id missed.
    Holds of open or finished rentals are left to the return's capture."""
    resolved = select(LedgerTransfer.pending_id).where(LedgerTransfer.pending_id.is_not(None))
    async with runtime.sessions() as session:
        rows = (await session.execute(
            select(LedgerTransfer.rental_id, Wallet.user_id)
            .join(Wallet, (Wallet.account_id == LedgerTransfer.debit_account_id) | (Wallet.points_account_id == LedgerTransfer.debit_account_id))
            .outerjoin(Rental, Rental.id == LedgerTransfer.rental_id)
            .where(
                LedgerTransfer.state == "pending", LedgerTransfer.kind.in_((RENTAL_HOLD, POINTS_HOLD)),
                LedgerTransfer.created_at < now - HOLD_EXPIRY, LedgerTransfer.id.not_in(resolved),
                LedgerTransfer.rental_id.is_not(None), (Rental.id.is_(None)) | (Rental.status == "cancelled"),
            )
            .distinct()
        )).all()
    for rental_id, user_id in rows:
        await runtime.submit("wallet", str(user_id), "VoidHold", {"rental_id": str(rental_id)}, f"expire-hold:{rental_id}")
    return len(rows)

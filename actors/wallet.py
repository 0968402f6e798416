"""The Wallet actor: one per person (entity id = user id), owning their money and points.

Because every command for one person passes through this mailbox one at a time, the checks that
must not race (enough funds, no unpaid dues, not too many rentals at once) are plain reads here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from powerbank.actors.runtime import ActorContext, CommandRejected, handles
from powerbank.storage import ledger
from powerbank.storage.ledger import LedgerError
from powerbank.storage.models import Rental, User, Wallet

RENTAL_HOLD = "rental_hold"


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


async def load_wallet_and_account(ctx: ActorContext, user_id: str) -> tuple[Wallet, ledger.LedgerAccount]:
    """The wallet and its money account in one read: the two rows every money command needs
    (the account then stays in the session, so `wallet_account` costs nothing more)."""
    row = (
        await ctx.session.execute(
            select(Wallet, ledger.LedgerAccount)
            .join(ledger.LedgerAccount, ledger.LedgerAccount.id == Wallet.account_id)
            .where(Wallet.user_id == uuid.UUID(user_id))
        )
    ).first()
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


async def _notify_wallet(ctx: ActorContext, user_id: str, wallet: Wallet) -> dict[str, Any]:
    account = await ctx.session.get(ledger.LedgerAccount, wallet.account_id)
    points = await ctx.session.get(ledger.LedgerAccount, wallet.points_account_id)
    view = wallet_view(wallet, account, points)
    ctx.notify(f"user:{user_id}", {"type": "wallet.updated", "wallet": view})
    return view


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
    """An operator's manual credit (until top-ups through the payment provider land)."""
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
    return {"ok": True, "wallet": await _notify_wallet(ctx, user_id, wallet)}


@handles("wallet", "PlaceHold")
async def place_hold(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    rental_id = payload["rental_id"]
    reason = await _hold_refusal(ctx, user_id, payload)
    if reason is not None:
        await ctx.send("rental", rental_id, "HoldRefused", {"reason": reason}, f"hold-refused:{rental_id}")
        return {"ok": False, "reason": reason}
    wallet, account = await load_wallet_and_account(ctx, user_id)
    revenue = await ledger.system_account(ctx.session, "platform_revenue", wallet.currency)
    hold = await ledger.transfer(
        ctx.session,
        transfer_id=hold_id(rental_id),
        debit=account,
        credit=revenue,
        amount_minor=payload["amount_minor"],
        kind=RENTAL_HOLD,
        pending=True,
        rental_id=uuid.UUID(rental_id),
    )
    await ctx.send("rental", rental_id, "HoldPlaced", {"transfer_id": str(hold.id)}, f"hold-placed:{rental_id}")
    await _notify_wallet(ctx, user_id, wallet)
    return {"ok": True, "transfer_id": str(hold.id)}


async def _hold_refusal(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> str | None:
    wallet = (
        await ctx.session.execute(select(Wallet).where(Wallet.user_id == uuid.UUID(user_id)))
    ).scalar_one_or_none()
    if wallet is None:
        return "wallet_not_found"
    if payload.get("currency") != wallet.currency:
        return "currency_mismatch"
    account = await wallet_account(ctx, wallet)
    request = HoldRequest(
        amount_minor=payload["amount_minor"],
        open_rental_holds=len(await ledger.open_holds(ctx.session, account.id, RENTAL_HOLD)),
        max_active_rentals=payload.get("max_active_rentals", 1),
        unpaid_dues_minor=await _unpaid_dues_minor(ctx, user_id),
        available_minor=ledger.credit_balance(account).available_minor,
    )
    return refuse_hold_reason(request)


async def _unpaid_dues_minor(ctx: ActorContext, user_id: str) -> int:
    total = await ctx.session.scalar(
        select(func.coalesce(func.sum(Rental.due_minor), 0)).where(Rental.user_id == uuid.UUID(user_id))
    )
    return int(total or 0)


@handles("wallet", "VoidHold")
async def void_hold(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    pending = await ctx.session.get(ledger.LedgerTransfer, hold_id(payload["rental_id"]))
    if pending is None:
        return {"ok": True, "voided": False}
    await ledger.resolve_pending(ctx.session, pending, post_amount_minor=None)
    wallet = await load_wallet(ctx, user_id)
    await _notify_wallet(ctx, user_id, wallet)
    return {"ok": True, "voided": True}


@handles("wallet", "CaptureHold")
async def capture_hold(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Charge a finished rental: from the hold first, then from what is left in the wallet; any
    remainder becomes a due on the rental."""
    rental_id = payload["rental_id"]
    fee_minor = payload["amount_minor"]
    wallet = await load_wallet(ctx, user_id)
    from_hold = await _capture_from_hold(ctx, rental_id, fee_minor)
    extra = await _charge_available(ctx, wallet, rental_id, fee_minor - from_hold)
    settled = {"charged_minor": from_hold + extra, "due_minor": fee_minor - from_hold - extra}
    await ctx.send("rental", rental_id, "ChargeSettled", settled, f"charge-settled:{rental_id}")
    await _notify_wallet(ctx, user_id, wallet)
    return {"ok": True, **settled}


async def _capture_from_hold(ctx: ActorContext, rental_id: str, fee_minor: int) -> int:
    """Post the hold for up to the fee; what it actually covered (0 if it was voided before)."""
    pending = await ctx.session.get(ledger.LedgerTransfer, hold_id(rental_id))
    if pending is None:
        return 0
    wanted = min(fee_minor, pending.amount_minor)
    resolution = await ledger.resolve_pending(ctx.session, pending, post_amount_minor=wanted)
    return resolution.amount_minor if resolution.state == "posted" else 0


async def _charge_available(ctx: ActorContext, wallet: Wallet, rental_id: str, wanted_minor: int) -> int:
    if wanted_minor <= 0:
        return 0
    account = await wallet_account(ctx, wallet)
    amount = min(wanted_minor, ledger.credit_balance(account).available_minor)
    if amount <= 0:
        return 0
    revenue = await ledger.system_account(ctx.session, "platform_revenue", wallet.currency)
    await ledger.transfer(
        ctx.session,
        transfer_id=uuid.uuid5(uuid.UUID(rental_id), "overage"),
        debit=account,
        credit=revenue,
        amount_minor=amount,
        kind="rental_overage",
        rental_id=uuid.UUID(rental_id),
    )
    return amount

"""Points the Wallet actor credits for promotions: referrals and points coupons.

A points account belongs to its Wallet actor, so a reward is a command in that mailbox, never a
write from the HTTP layer. The command is accepted in the same transaction as the fact that earns
it (the referral row, the coupon usage), and carries a transfer id derived from that fact: the
command id is unique, and the ledger is idempotent by transfer id, so a retried claim, a
redelivered command or a re-derived one credits the points exactly once.

The points come from one shared account, `admin_adjustments:PTS` (an existing account kind; a
shared account keeps no stored totals, so many wallets may credit from it at once without
queueing on one row). Its balance, a sum over its transfers, is minus every point ever given.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from powerbank.actors.mailbox import Envelope
from powerbank.actors.runtime import ActorContext, CommandRejected, handles
from powerbank.storage import ledger
from powerbank.storage.ledger import LedgerError
from powerbank.storage.models import LedgerAccount, Wallet

AWARD_POINTS = "AwardPoints"
POINTS_CURRENCY = "PTS"
POINTS_SOURCE_KIND = "admin_adjustments"
# What a reward may be for; the ledger transfer's kind says which.
REWARD_KINDS = frozenset({"referral_referrer", "referral_referee", "coupon_points"})


def award_command_id(transfer_id: uuid.UUID) -> str:
    """One command per transfer: the same reason always names the same command."""
    return f"award:{transfer_id}"


def award_envelope(user_id: uuid.UUID, points: int, transfer_id: uuid.UUID, kind: str, description: str) -> Envelope:
    """The AwardPoints command for `user_id`'s Wallet actor, to accept inside the transaction
    that records why the points are earned."""
    payload = {"points": points, "transfer_id": str(transfer_id), "kind": kind, "description": description}
    return Envelope("wallet", str(user_id), AWARD_POINTS, payload, award_command_id(transfer_id))


def award_refusal(payload: dict[str, Any]) -> str | None:
    """Why an award payload cannot be applied, or None. Checked before any read: a malformed
    command is refused as a result, not retried as a crash."""
    points = payload.get("points")
    if not isinstance(points, int) or isinstance(points, bool) or points <= 0:
        return "invalid_points"
    if payload.get("kind") not in REWARD_KINDS:
        return "invalid_reward_kind"
    try:
        uuid.UUID(str(payload.get("transfer_id")))
    except ValueError:
        return "invalid_transfer_id"
    return None


@handles("wallet", AWARD_POINTS)
async def award_points(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Credit points to the person's points account from the shared source account."""
    reason = award_refusal(payload)
    if reason is not None:
        raise CommandRejected(reason)
    points_account = await _points_account(ctx, user_id)
    source = await ledger.system_account(ctx.session, POINTS_SOURCE_KIND, POINTS_CURRENCY)
    transfer_id = uuid.UUID(payload["transfer_id"])
    try:
        await ledger.transfer(
            ctx.session,
            transfer_id=transfer_id,
            debit=source,
            credit=points_account,
            amount_minor=payload["points"],
            kind=payload["kind"],
            description=str(payload.get("description") or "")[:200] or None,
        )
    except LedgerError as error:
        raise CommandRejected(error.reason) from None
    balance = ledger.credit_balance(points_account).posted_minor
    ctx.notify(
        f"user:{user_id}",
        {"type": "points.awarded", "points": payload["points"], "kind": payload["kind"], "points_balance": balance},
    )
    return {"ok": True, "transfer_id": str(transfer_id), "points": payload["points"], "points_balance": balance}


async def _points_account(ctx: ActorContext, user_id: str) -> LedgerAccount:
    row = (
        await ctx.session.execute(
            select(LedgerAccount)
            .join(Wallet, Wallet.points_account_id == LedgerAccount.id)
            .where(Wallet.user_id == uuid.UUID(user_id))
        )
    ).scalar_one_or_none()
    if row is None:
        raise CommandRejected("wallet_not_found")
    return row

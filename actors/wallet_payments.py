"""Wallet-actor commands for money that crosses the payment provider: top-up credits, refunds.

They run in the person's Wallet mailbox like every other wallet mutation, so the intent's status,
the ledger transfer and the person's transaction row change in one transaction, and a check such
as "is the refunded money still in the wallet" cannot race a rental charge.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select

from powerbank.actors import payments
from powerbank.actors.notifications import format_money, notify_money, notify_person
from powerbank.actors.runtime import ActorContext, CommandRejected, handles
from powerbank.actors.wallet import (
    load_wallet_and_account,
    notify_wallet,
    open_wallet,
    post_refund,
    refund_marker,
    refunded_minor,
)
from powerbank.storage import ledger
from powerbank.storage.ledger import LedgerError
from powerbank.storage.models import LedgerTransfer, PaymentCustomer, PaymentIntent, Refund, Transaction, Wallet


@handles("wallet", "ApplyIntentStatus")
async def apply_intent_status(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Fold one observation of a provider intent into ours (see payments.next_status); credit
    the wallet the first time it is confirmed. Any source may send it, any number of times."""
    intent = await ctx.session.get(PaymentIntent, uuid.UUID(payload["intent_id"]))
    if intent is None or str(intent.user_id) != user_id:
        raise CommandRejected("intent_not_found")
    if intent.provider_intent_id is None:
        intent.provider_intent_id = payload["provider_intent_id"]
    elif intent.provider_intent_id != payload["provider_intent_id"]:
        raise CommandRejected("provider_intent_mismatch")
    current = intent.status
    new = payments.next_status(current, payments.status_from_provider(payload["provider_status"]))
    if new != current:
        intent.status = new
        intent.provider_status = payload["provider_status"]
    if payload.get("failure_code") and new == "waiting":
        intent.failure_code = payload["failure_code"]
    credited = None
    if payments.credits_now(current, new) and intent.purpose == "rental_hold":
        credited = await _record_card_charge(ctx, intent, payload)
    elif payments.credits_now(current, new):
        credited = await _credit_topup(ctx, user_id, intent, payload)
        await _remember_saved_card(ctx, intent, payload)
    return {"ok": True, "status": intent.status, "credited_minor": credited}


async def _record_card_charge(ctx: ActorContext, intent: PaymentIntent, payload: dict[str, Any]) -> int:
    """A captured card hold paid a rental straight from the card: the money goes from provider
    clearing to platform revenue, never through the wallet (the person did not top up)."""
    amount = _amount_received(intent, payload)
    revenue = await ledger.system_account(ctx.session, "platform_revenue", intent.currency)
    await _post_received(ctx, intent, amount, revenue, kind="rental_card_charge", transaction_type="rental")
    return amount


async def _credit_topup(ctx: ActorContext, user_id: str, intent: PaymentIntent, payload: dict[str, Any]) -> int:
    """provider clearing -> wallet, by a transfer id derived from the provider intent id."""
    amount = _amount_received(intent, payload)
    wallet, account = await _wallet_opened(ctx, user_id, intent.currency)
    if wallet.currency != intent.currency:
        raise CommandRejected("currency_mismatch")
    transaction_type = "auto_refill" if intent.purpose == "auto_refill" else "topup"
    await _post_received(ctx, intent, amount, account, kind="topup", transaction_type=transaction_type)
    await notify_wallet(ctx, user_id, wallet)
    await notify_money(ctx, user_id, "topup_succeeded", intent.id, amount, intent.currency)
    return amount


def _amount_received(intent: PaymentIntent, payload: dict[str, Any]) -> int:
    amount = int(payload["amount_received_minor"])
    if str(payload["currency"]).upper() != intent.currency:
        raise CommandRejected("currency_mismatch")
    return amount


async def _post_received(
    ctx: ActorContext, intent: PaymentIntent, amount: int, credit, *, kind: str, transaction_type: str
) -> None:
    """Money the provider received moves out of provider clearing, once: the transfer id comes
    from the provider's intent id, and the person sees it as one succeeded transaction."""
    clearing = await ledger.system_account(ctx.session, "provider_clearing", intent.currency)
    transfer_id = payments.topup_transfer_id(intent.provider, intent.provider_intent_id)
    try:
        await ledger.transfer(
            ctx.session, transfer_id=transfer_id, debit=clearing, credit=credit, amount_minor=amount,
            kind=kind, description=f"{intent.provider} {intent.provider_intent_id}",
        )
    except LedgerError as error:
        raise CommandRejected(error.reason) from None
    intent.amount_received_minor = amount
    ctx.session.add(Transaction(
        user_id=intent.user_id, payment_intent_id=intent.id, type=transaction_type, amount_minor=amount,
        currency=intent.currency, status="succeeded", ledger_transfer_id=transfer_id,
    ))
    await ctx.session.flush()


async def _wallet_opened(ctx: ActorContext, user_id: str, currency: str):
    """Money received is never refused for want of a wallet row: open it here if need be."""
    exists = await ctx.session.scalar(select(Wallet.id).where(Wallet.user_id == uuid.UUID(user_id)))
    if exists is None:
        await open_wallet(ctx, user_id, {"currency": currency})
    return await load_wallet_and_account(ctx, user_id)


async def _remember_saved_card(ctx: ActorContext, intent: PaymentIntent, payload: dict[str, Any]) -> None:
    """A top-up made with setup_future_usage leaves a card attached to the customer: keep it for
    auto-refill."""
    method, customer = payload.get("saved_payment_method"), payload.get("customer")
    if not method or not customer:
        return
    row = (await ctx.session.execute(
        select(PaymentCustomer).where(
            PaymentCustomer.user_id == intent.user_id, PaymentCustomer.provider == intent.provider,
            PaymentCustomer.provider_customer_id == customer,
        )
    )).scalar_one_or_none()
    if row is not None:
        row.saved_payment_method_id = method


async def _checked_refund(ctx: ActorContext, user_id: str, txn_id: str, amount: int,
                          refund_id: uuid.UUID) -> tuple[Transaction, LedgerTransfer | None, int]:
    """The top-up, its ledger transfer and what was refunded of it, once `amount` passed the
    refund rules (payments.refund_refusal); CommandRejected otherwise. Other refunds of it still
    waiting for approval count as refunded, so two requests cannot promise the same money."""
    txn = await ctx.session.get(Transaction, uuid.UUID(txn_id))
    if txn is None or str(txn.user_id) != user_id:
        raise CommandRejected("transaction_not_found")
    _, account = await load_wallet_and_account(ctx, user_id)
    original = await ctx.session.get(LedgerTransfer, txn.ledger_transfer_id) if txn.ledger_transfer_id else None
    already = await refunded_minor(ctx, original) if original is not None else txn.refunded_minor
    waiting = await ctx.session.scalar(select(func.coalesce(func.sum(Refund.amount_minor), 0)).where(
        Refund.transaction_id == txn.id, Refund.status == "requested", Refund.id != refund_id))
    reason = payments.refund_refusal(payments.RefundRequest(
        transaction_type=txn.type, transaction_status=txn.status, captured_minor=txn.amount_minor,
        refunded_minor=already + int(waiting or 0), requested_minor=amount,
        wallet_available_minor=ledger.credit_balance(account).available_minor,
    ))
    if reason is None and original is None:
        reason = "not_refundable"
    if reason is not None:
        raise CommandRejected(reason, refundable_minor=payments.refundable_minor(txn.amount_minor, already + int(waiting or 0)))
    return txn, original, already


@handles("wallet", "RequestRefund")
async def request_refund(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A refund above the approval threshold: checked now (so the person hears at once that it
    cannot be made), stored `requested`, nothing reserved until an admin approves it (ReserveRefund
    with `approved`). A repeat answers with the stored refund."""
    refund_id = uuid.UUID(payload["refund_id"])
    existing = await ctx.session.get(Refund, refund_id)
    if existing is not None:
        return {"ok": True, "refund_id": str(existing.id), "status": existing.status, "amount_minor": existing.amount_minor}
    amount = int(payload["amount_minor"])
    txn, _, _ = await _checked_refund(ctx, user_id, payload["transaction_id"], amount, refund_id)
    ctx.session.add(Refund(
        id=refund_id, transaction_id=txn.id, user_id=txn.user_id, amount_minor=amount, currency=txn.currency,
        status="requested", reason=payload.get("reason"),
    ))
    await ctx.session.flush()
    return {"ok": True, "refund_id": str(refund_id), "status": "requested", "amount_minor": amount}


@handles("wallet", "ReserveRefund")
async def reserve_refund(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Take the refunded amount out of the wallet before the provider is asked, so it cannot be
    spent meanwhile; the Refund row starts (or, for an approved request, becomes) `pending`.
    Refusals write nothing: a refused approval leaves the request waiting. Any other existing
    refund is answered as it stands."""
    refund_id = uuid.UUID(payload["refund_id"])
    existing = await ctx.session.get(Refund, refund_id)
    approving = existing is not None and existing.status == "requested" and bool(payload.get("approved"))
    if existing is not None and not approving:
        return {"ok": True, "refund_id": str(existing.id), "status": existing.status, "amount_minor": existing.amount_minor}
    wallet, _ = await load_wallet_and_account(ctx, user_id)
    amount = existing.amount_minor if approving else int(payload["amount_minor"])
    txn_id = str(existing.transaction_id) if approving else payload["transaction_id"]
    txn, original, already = await _checked_refund(ctx, user_id, txn_id, amount, refund_id)
    transfer_id = payments.refund_transfer_id(refund_id)
    await post_refund(ctx, original, transfer_id=transfer_id, amount_minor=amount)
    txn.refunded_minor = already + amount
    ctx.session.add(Transaction(
        user_id=txn.user_id, payment_intent_id=txn.payment_intent_id, type="refund", amount_minor=amount,
        currency=txn.currency, status="pending", ledger_transfer_id=transfer_id, description=f"refund of {txn.id}",
    ))
    if approving:
        existing.status, existing.ledger_transfer_id = "pending", transfer_id
        existing.reviewed_by, existing.reviewed_at = _reviewer(payload), ctx.now
    else:
        ctx.session.add(Refund(
            id=refund_id, transaction_id=txn.id, user_id=txn.user_id, amount_minor=amount, currency=txn.currency,
            status="pending", reason=payload.get("reason"), ledger_transfer_id=transfer_id,
        ))
    await ctx.session.flush()
    await notify_wallet(ctx, user_id, wallet)
    return {"ok": True, "refund_id": str(refund_id), "status": "pending", "amount_minor": amount, "approved": approving}


def _reviewer(payload: dict[str, Any]) -> uuid.UUID | None:
    return uuid.UUID(payload["reviewed_by"]) if payload.get("reviewed_by") else None


@handles("wallet", "RejectRefund")
async def reject_refund(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """An admin declines a requested refund: it is closed with the reason, the person is told;
    nothing was reserved, so nothing moves."""
    refund = await ctx.session.get(Refund, uuid.UUID(payload["refund_id"]))
    if refund is None or str(refund.user_id) != user_id:
        raise CommandRejected("refund_not_found")
    if (reason := payments.refund_review_refusal(refund.status)) is not None:
        raise CommandRejected(reason, refund_status=refund.status)
    refund.status, refund.rejection_reason = "rejected", payload["reason"]
    refund.reviewed_by, refund.reviewed_at = _reviewer(payload), ctx.now
    data = {"amount": format_money(refund.amount_minor, refund.currency), "amount_minor": refund.amount_minor,
            "currency": refund.currency, "reason": payload["reason"]}
    await notify_person(ctx, user_id, "refund_rejected", data, dedupe_key=f"refund_rejected:{refund.id}")
    return {"ok": True, "refund_id": str(refund.id), "status": "rejected"}


@handles("wallet", "SettleRefund")
async def settle_refund(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The provider's answer to a reserved refund: succeeded (the intent becomes `refunded` once
    fully refunded) or failed (the money goes back into the wallet). Once settled, repeats are
    no-ops."""
    refund = await ctx.session.get(Refund, uuid.UUID(payload["refund_id"]))
    if refund is None or str(refund.user_id) != user_id:
        raise CommandRejected("refund_not_found")
    if refund.status != "pending":
        return {"ok": True, "status": refund.status}
    txn = await ctx.session.get(Transaction, refund.transaction_id)
    shown = (await ctx.session.execute(
        select(Transaction).where(Transaction.ledger_transfer_id == refund.ledger_transfer_id))).scalar_one_or_none()
    if payload["succeeded"]:
        refund.status = "succeeded"
        refund.provider_refund_id = payload.get("provider_refund_id")
        await _mark_refunded(ctx, txn)
        await notify_money(ctx, user_id, "refund_succeeded", refund.id, refund.amount_minor, refund.currency)
    else:
        await _reverse_refund(ctx, user_id, refund, txn)
        refund.status = "failed"
        refund.failure_code = payload.get("failure_code")
    if shown is not None:
        shown.status = "succeeded" if refund.status == "succeeded" else "reversed"
    return {"ok": True, "status": refund.status}


async def _mark_refunded(ctx: ActorContext, txn: Transaction) -> None:
    if txn.refunded_minor < txn.amount_minor or txn.payment_intent_id is None:
        return
    intent = await ctx.session.get(PaymentIntent, txn.payment_intent_id)
    intent.status = payments.next_status(intent.status, "refunded")


async def _reverse_refund(ctx: ActorContext, user_id: str, refund: Refund, txn: Transaction) -> None:
    wallet, account = await load_wallet_and_account(ctx, user_id)
    clearing = await ledger.system_account(ctx.session, "provider_clearing", wallet.currency)
    # Described like the refund it undoes, so `refunded_minor` of the top-up counts it back.
    await ledger.transfer(
        ctx.session, transfer_id=payments.refund_reversal_id(refund.id), debit=clearing, credit=account,
        amount_minor=refund.amount_minor, kind="refund_reversal", description=refund_marker(txn.ledger_transfer_id),
    )
    txn.refunded_minor -= refund.amount_minor
    await notify_wallet(ctx, user_id, wallet)


@handles("wallet", "ApplyProviderRefund")
async def apply_provider_refund(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A refund the provider reports (webhook or reconciliation), whoever started it. One we
    started (named by `metadata.refund_id`, or already known by its provider id) is only settled;
    one made elsewhere (the provider's dashboard) is applied once: the ledger reversal's id and
    the Refund row's id both derive from the provider refund id, and `post_refund` keeps every
    refund of the payment together within what was captured. Money the provider already gave
    back is recorded even if the wallet has spent it since (the shortfall is the platform's)."""
    ours = await _our_refund(ctx, payload)
    status = payload["status"]
    if ours is not None:
        if ours.status != "pending" or status not in ("succeeded", "failed", "canceled"):
            return {"ok": True, "applied": False, "status": ours.status}
        outcome = {"refund_id": str(ours.id), "succeeded": status == "succeeded",
                   "provider_refund_id": payload["provider_refund_id"], "failure_code": payload.get("failure_reason")}
        return {**await settle_refund(ctx, user_id, outcome), "applied": False}
    if status != "succeeded":
        return {"ok": True, "applied": False, "status": status}
    intent = await ctx.session.get(PaymentIntent, uuid.UUID(payload["intent_id"]))
    if intent is None or str(intent.user_id) != user_id:
        raise CommandRejected("intent_not_found")
    if str(payload["currency"]).upper() != intent.currency:
        raise CommandRejected("currency_mismatch")
    txn = await _received_transaction(ctx, intent)
    if txn is None:
        # Reported before the payment itself was applied: refused, so the webhook stays
        # unprocessed and a redelivery or reconciliation applies it after the payment.
        raise CommandRejected("payment_not_applied")
    refund_id = payments.provider_refund_uuid(intent.provider, payload["provider_refund_id"])
    if await ctx.session.get(Refund, refund_id) is not None:
        return {"ok": True, "applied": False, "status": "succeeded"}
    original = await ctx.session.get(LedgerTransfer, txn.ledger_transfer_id)
    amount = payload["amount_minor"]
    transfer_id = payments.refund_transfer_id(refund_id)
    shortfall = await ledger.system_account(ctx.session, "admin_adjustments", intent.currency)
    await post_refund(ctx, original, transfer_id=transfer_id, amount_minor=amount, shortfall_from=shortfall)
    txn.refunded_minor = await refunded_minor(ctx, original)
    ctx.session.add(Transaction(
        user_id=txn.user_id, payment_intent_id=intent.id, type="refund", amount_minor=amount, currency=txn.currency,
        status="succeeded", ledger_transfer_id=transfer_id, description=f"refund of {txn.id}",
    ))
    ctx.session.add(Refund(
        id=refund_id, transaction_id=txn.id, user_id=txn.user_id, amount_minor=amount, currency=txn.currency,
        status="succeeded", reason="provider", provider_refund_id=payload["provider_refund_id"],
        ledger_transfer_id=transfer_id,
    ))
    await ctx.session.flush()
    await _mark_refunded(ctx, txn)
    await notify_money(ctx, user_id, "refund_succeeded", refund_id, amount, txn.currency)
    wallet = (await ctx.session.execute(select(Wallet).where(Wallet.user_id == intent.user_id))).scalar_one_or_none()
    if wallet is not None:
        await notify_wallet(ctx, user_id, wallet)
    return {"ok": True, "applied": True, "refund_id": str(refund_id), "amount_minor": amount}


async def _our_refund(ctx: ActorContext, payload: dict[str, Any]) -> Refund | None:
    ours = (payload.get("metadata") or {}).get("refund_id")
    if ours:
        try:
            found = await ctx.session.get(Refund, uuid.UUID(ours))
        except ValueError:
            found = None
        if found is not None and found.provider_refund_id in (None, payload["provider_refund_id"]):
            return found
    return (await ctx.session.execute(
        select(Refund).where(Refund.provider_refund_id == payload["provider_refund_id"]))).scalar_one_or_none()


async def _received_transaction(ctx: ActorContext, intent: PaymentIntent) -> Transaction | None:
    """The person's row for the money this intent brought in (a top-up, a refill or a card
    rental charge), by the ledger transfer `_post_received` wrote."""
    if intent.provider_intent_id is None:
        return None
    transfer_id = payments.topup_transfer_id(intent.provider, intent.provider_intent_id)
    return (await ctx.session.execute(
        select(Transaction).where(Transaction.ledger_transfer_id == transfer_id))).scalar_one_or_none()

"""Wallet-actor commands for money that crosses the payment provider: top-up credits, refunds.

They run in the person's Wallet mailbox like every other wallet mutation, so the intent's status,
the ledger transfer and the person's transaction row change in one transaction, and a check such
as "is the refunded money still in the wallet" cannot race a rental charge.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from powerbank.actors import payments
from powerbank.actors.runtime import ActorContext, CommandRejected, handles
from powerbank.actors.wallet import _notify_wallet, load_wallet_and_account, open_wallet
from powerbank.storage import ledger
from powerbank.storage.ledger import LedgerError
from powerbank.storage.models import PaymentCustomer, PaymentIntent, Refund, Transaction, Wallet


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
    await _notify_wallet(ctx, user_id, wallet)
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


@handles("wallet", "ReserveRefund")
async def reserve_refund(ctx: ActorContext, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Take the refunded amount out of the wallet before the provider is asked, so it cannot be
    spent meanwhile; the Refund row starts `pending`. Refusals write nothing."""
    refund_id = uuid.UUID(payload["refund_id"])
    existing = await ctx.session.get(Refund, refund_id)
    if existing is not None:
        return {"ok": True, "refund_id": str(existing.id), "status": existing.status, "amount_minor": existing.amount_minor}
    txn = await ctx.session.get(Transaction, uuid.UUID(payload["transaction_id"]))
    if txn is None or str(txn.user_id) != user_id:
        raise CommandRejected("transaction_not_found")
    wallet, account = await load_wallet_and_account(ctx, user_id)
    amount = int(payload["amount_minor"])
    reason = payments.refund_refusal(payments.RefundRequest(
        transaction_type=txn.type, transaction_status=txn.status, captured_minor=txn.amount_minor,
        refunded_minor=txn.refunded_minor, requested_minor=amount,
        wallet_available_minor=ledger.credit_balance(account).available_minor,
    ))
    if reason is not None:
        refundable = payments.refundable_minor(txn.amount_minor, txn.refunded_minor)
        raise CommandRejected(reason, refundable_minor=refundable)
    clearing = await ledger.system_account(ctx.session, "provider_clearing", wallet.currency)
    transfer_id = payments.refund_transfer_id(refund_id)
    await ledger.transfer(
        ctx.session, transfer_id=transfer_id, debit=account, credit=clearing, amount_minor=amount,
        kind="refund", description=f"refund of {txn.id}",
    )
    txn.refunded_minor += amount
    ctx.session.add(Transaction(
        user_id=txn.user_id, payment_intent_id=txn.payment_intent_id, type="refund", amount_minor=amount,
        currency=txn.currency, status="pending", ledger_transfer_id=transfer_id, description=f"refund of {txn.id}",
    ))
    ctx.session.add(Refund(
        id=refund_id, transaction_id=txn.id, user_id=txn.user_id, amount_minor=amount, currency=txn.currency,
        status="pending", reason=payload.get("reason"), ledger_transfer_id=transfer_id,
    ))
    await ctx.session.flush()
    await _notify_wallet(ctx, user_id, wallet)
    return {"ok": True, "refund_id": str(refund_id), "status": "pending", "amount_minor": amount}


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
    await ledger.transfer(
        ctx.session, transfer_id=payments.refund_reversal_id(refund.id), debit=clearing, credit=account,
        amount_minor=refund.amount_minor, kind="refund_reversal", description=f"refund {refund.id} failed",
    )
    txn.refunded_minor -= refund.amount_minor
    await _notify_wallet(ctx, user_id, wallet)

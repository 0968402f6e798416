"""Payment flows: the I/O around the pure decisions in actors/payments.py. Each flow reads our
rows, asks the provider (payment_gateway), and hands every observation of a provider intent to
the person's Wallet actor (`ApplyIntentStatus`), which alone changes the intent's status and the
wallet. The HTTP routes, the webhook receiver, the reconciliation job and auto-refill all end in
that one command, so together they credit a top-up exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import stripe
from prometheus_client import Counter
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

import powerbank.actors.wallet_payments  # noqa: F401  (registers the commands these flows send)
from powerbank.actors import payments
from powerbank.payment_gateway import (
    GatewayError,
    PaymentDeclined,
    PaymentGateway,
    ProviderIntent,
    ProviderRefund,
    StripeGateway,
    intent_from_stripe,
    refund_from_stripe,
)
from powerbank.storage import ledger
from powerbank.storage.db import insert_unless_exists
from powerbank.storage.models import (
    LedgerAccount,
    PaymentCustomer,
    PaymentIntent,
    PaymentMethod,
    PaymentWebhook,
    Refund,
    Rental,
    Transaction,
    Wallet,
)
from powerbank.storage.types import utcnow

if TYPE_CHECKING:
    from powerbank.config import Settings
    from powerbank.services import Services

log = logging.getLogger(__name__)

WALLET_WAIT_S = 10.0
# Stripe's own default; a signed event older (or newer) than this is refused as a replay.
WEBHOOK_TOLERANCE_S = 300
RECONCILE_WINDOW = timedelta(days=3)
REFUND_RETRY_AFTER = timedelta(minutes=1)
# The one trace a refused webhook leaves (nothing is written for it).
WEBHOOKS = Counter("powerbank_payment_webhooks_total", "Provider webhooks by outcome", ["provider", "outcome"])
NOT_FOUND_REASONS = frozenset({"intent_not_found", "transaction_not_found", "refund_not_found", "wallet_not_found"})


class PaymentProblem(Exception):
    """A refusal with an HTTP status and a machine code; the routes turn it into ApiError."""

    def __init__(self, http_status: int, code: str, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or code)
        self.status, self.code, self.detail, self.extra = http_status, code, detail or code, extra


def build_gateway(settings: "Settings") -> PaymentGateway | None:
    if not settings.stripe_secret_key:
        return None
    return StripeGateway(settings.stripe_secret_key, settings.stripe_api_base)


def default_method(settings: "Settings") -> dict[str, Any]:
    return dict(
        id=uuid.uuid4(), code="stripe", name="Card", priority=10, enabled=True, min_amount_minor=100,
        max_amount_minor=10_000_000, currencies=[settings.currency], created_at=utcnow(), updated_at=utcnow(),
    )


async def ensure_payment_methods(services: "Services") -> None:
    """With a Stripe key and no configured gateway at all, offer Stripe cards in the installation's
    currency (an operator edits or disables the row; a row that exists is never touched)."""
    if not services.settings.stripe_secret_key:
        return
    async with services.readonly() as session:
        if (await session.execute(select(PaymentMethod.id).limit(1))).first() is not None:
            return  # the common case, without taking SQLite's write lock
    async with services.sessions.begin() as session:
        if (await session.execute(select(PaymentMethod.id).limit(1))).first() is None:
            await session.execute(insert_unless_exists(
                session.bind.dialect.name, PaymentMethod, default_method(services.settings), ["code"]
            ))


async def enabled_methods(session: AsyncSession) -> list[PaymentMethod]:
    query = select(PaymentMethod).where(PaymentMethod.enabled.is_(True)).order_by(PaymentMethod.priority, PaymentMethod.code)
    return list((await session.execute(query)).scalars())


# --- top-up -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopUpRequest:
    user_id: uuid.UUID
    amount_minor: int
    currency: str
    method_code: str
    save_card: bool
    idempotency_key: str | None


def topup_refusal(method: PaymentMethod | None, wallet_currency: str, amount_minor: int, currency: str) -> PaymentProblem | None:
    """Why a top-up request is refused before anything is written, or None."""
    if method is None or not method.enabled:
        return PaymentProblem(400, "unknown_payment_method", "no enabled payment method with that code")
    if currency not in method.currencies or currency != wallet_currency:
        return PaymentProblem(400, "unsupported_currency", f"top-ups are in {wallet_currency}", currency=wallet_currency)
    if not method.min_amount_minor <= amount_minor <= method.max_amount_minor:
        return PaymentProblem(
            400, "amount_out_of_range", "amount outside the method's limits",
            min_amount_minor=method.min_amount_minor, max_amount_minor=method.max_amount_minor,
        )
    return None


async def create_topup(services: "Services", gateway: PaymentGateway, request: TopUpRequest) -> tuple[PaymentIntent, ProviderIntent]:
    """Our intent row first (status waiting), then the provider's, created with an idempotency
    key derived from our id: a crash between the two is repaired by retrying with the same key
    or by reconciliation (the provider intent carries our id in its metadata)."""
    await ensure_payment_methods(services)
    key = _topup_key(request)
    async with services.sessions.begin() as session:
        method = (await session.execute(select(PaymentMethod).where(PaymentMethod.code == request.method_code))).scalar_one_or_none()
        refusal = topup_refusal(method, await wallet_currency(session, request.user_id, services.settings.currency),
                                request.amount_minor, request.currency)
        if refusal is not None:
            raise refusal
        intent = await _intent_for_key(session, key, request, method)
        customer = await session.scalar(select(PaymentCustomer.provider_customer_id).where(
            PaymentCustomer.user_id == request.user_id, PaymentCustomer.provider == gateway.code))
    if intent.provider_intent_id:
        return intent, await _provider_call(gateway.retrieve(intent.provider_intent_id))
    customer = await _customer(services, gateway, request.user_id, customer)
    try:
        provider = await gateway.create_intent(
            amount_minor=intent.amount_minor, currency=intent.currency, customer=customer,
            idempotency_key=f"pi:{intent.id}", save_card=request.save_card,
            metadata={"intent_id": str(intent.id), "user_id": str(request.user_id), "purpose": intent.purpose},
        )
    except GatewayError as error:
        await _mark_error(services, intent.id, error.code)
        raise PaymentProblem(502, "payment_provider_error", str(error), provider_code=error.code) from None
    async with services.sessions.begin() as session:
        await session.execute(
            update(PaymentIntent).where(PaymentIntent.id == intent.id, PaymentIntent.provider_intent_id.is_(None))
            .values(provider_intent_id=provider.id, provider_status=provider.status, updated_at=utcnow())
        )
    intent.provider_intent_id = provider.id
    return intent, provider


def _topup_key(request: TopUpRequest) -> str:
    if request.idempotency_key is None:
        return f"topup:{uuid.uuid4()}"
    return f"topup:{request.user_id}:{request.idempotency_key}"


async def _intent_for_key(session: AsyncSession, key: str, request: TopUpRequest, method: PaymentMethod) -> PaymentIntent:
    """The intent this request names: a new one, or the one a retry with the same key made."""
    values = dict(
        id=uuid.uuid4(), user_id=request.user_id, payment_method_id=method.id, amount_minor=request.amount_minor,
        amount_received_minor=0, currency=request.currency, purpose="topup", provider=method.code,
        status="waiting", idempotency_key=key, created_at=utcnow(), updated_at=utcnow(),
    )
    await session.execute(insert_unless_exists(session.bind.dialect.name, PaymentIntent, values, ["idempotency_key"]))
    intent = (await session.execute(select(PaymentIntent).where(PaymentIntent.idempotency_key == key))).scalar_one()
    if (intent.amount_minor, intent.currency) != (request.amount_minor, request.currency):
        raise PaymentProblem(409, "idempotency_key_reused", "this idempotency_key was used for another top-up")
    return intent


async def wallet_currency(session: AsyncSession, user_id: uuid.UUID, default: str) -> str:
    found = await session.scalar(select(Wallet.currency).where(Wallet.user_id == user_id))
    return found or default


async def _customer(services: "Services", gateway: PaymentGateway, user_id: uuid.UUID, known: str | None) -> str:
    if known:
        return known
    try:
        customer_id = await gateway.get_or_create_customer(str(user_id), None)
    except GatewayError as error:
        raise PaymentProblem(502, "payment_provider_error", str(error), provider_code=error.code) from None
    async with services.sessions.begin() as session:
        await session.execute(insert_unless_exists(session.bind.dialect.name, PaymentCustomer, dict(
            id=uuid.uuid4(), user_id=user_id, provider=gateway.code, provider_customer_id=customer_id,
            auto_refill=False, auto_refill_threshold_minor=0, auto_refill_amount_minor=0,
            created_at=utcnow(), updated_at=utcnow(),
        ), ["user_id", "provider"]))
    return customer_id


async def _mark_error(services: "Services", intent_id: uuid.UUID, code: str) -> None:
    """No provider intent exists, so nothing else can be changing this row."""
    async with services.sessions.begin() as session:
        await session.execute(
            update(PaymentIntent)
            .where(PaymentIntent.id == intent_id, PaymentIntent.provider_intent_id.is_(None), PaymentIntent.status == "waiting")
            .values(status="error", failure_code=code[:64], updated_at=utcnow())
        )


async def apply_observation(services: "Services", user_id: uuid.UUID, intent_id: uuid.UUID, provider: ProviderIntent) -> dict[str, Any]:
    """Hand one provider snapshot to the Wallet actor. The command id names the observation, so
    the same snapshot seen twice (webhook copies, verify + webhook) is one command."""
    command_id = f"pi:{provider.id}:{provider.status}:{provider.amount_received_minor}"
    return await services.runtime.call(
        "wallet", str(user_id), "ApplyIntentStatus", provider.observation(str(intent_id)),
        command_id=command_id, timeout_s=WALLET_WAIT_S,
    )


async def owned_intent(services: "Services", user_id: uuid.UUID, intent_id: uuid.UUID) -> PaymentIntent:
    """The caller's intent; someone else's is reported exactly like a missing one."""
    async with services.readonly() as session:
        intent = await session.get(PaymentIntent, intent_id)
    if intent is None or intent.user_id != user_id:
        raise PaymentProblem(404, "intent_not_found", f"no payment intent {intent_id}")
    return intent


async def verify_topup(services: "Services", gateway: PaymentGateway, user_id: uuid.UUID, intent_id: uuid.UUID,
                       payment_method: str | None) -> PaymentIntent:
    """Confirm with the given card if the intent still waits for one (what Stripe.js does in a
    real app), then read the provider's state and apply it."""
    intent = await owned_intent(services, user_id, intent_id)
    if intent.provider_intent_id is None:
        raise PaymentProblem(409, "intent_not_ready", "the provider intent was never created", intent_status=intent.status)
    if payment_method and intent.status == "waiting":
        await _confirm(services, gateway, intent, payment_method)
    provider = await _provider_call(gateway.retrieve(intent.provider_intent_id))
    await _applied(services, user_id, intent.id, provider)
    return await owned_intent(services, user_id, intent_id)


async def _confirm(services: "Services", gateway: PaymentGateway, intent: PaymentIntent, payment_method: str) -> None:
    try:
        await gateway.confirm(intent.provider_intent_id, payment_method, f"confirm:{intent.id}:{payment_method}")
    except PaymentDeclined as declined:
        if declined.intent is not None:
            await _applied(services, intent.user_id, intent.id, declined.intent)
        raise PaymentProblem(402, "payment_declined", "the card was declined", decline_code=declined.code) from None
    except GatewayError as error:
        if error.code != "payment_intent_unexpected_state":
            raise PaymentProblem(400 if error.status == 400 else 502, "payment_provider_error", str(error),
                                 provider_code=error.code) from None


async def _applied(services: "Services", user_id: uuid.UUID, intent_id: uuid.UUID, provider: ProviderIntent) -> dict[str, Any]:
    result = await apply_observation(services, user_id, intent_id, provider)
    if not result.get("ok", False):
        raise PaymentProblem(409, str(result.get("reason")), "the wallet refused the payment update")
    return result


async def _provider_call(pending):
    try:
        return await pending
    except GatewayError as error:
        raise PaymentProblem(502, "payment_provider_error", str(error), provider_code=error.code) from None


async def cancel_topup(services: "Services", gateway: PaymentGateway, user_id: uuid.UUID, intent_id: uuid.UUID) -> PaymentIntent:
    """Cancel at the provider while no money was taken; a race with a payment that just went
    through ends with the payment applied and a 409."""
    intent = await owned_intent(services, user_id, intent_id)
    if intent.status not in ("waiting", "error"):
        raise PaymentProblem(409, "intent_not_cancellable", f"the intent is {intent.status}", intent_status=intent.status)
    if intent.provider_intent_id is None:
        await _mark_error(services, intent.id, "canceled_before_provider")
        return await owned_intent(services, user_id, intent_id)
    try:
        provider = await gateway.cancel(intent.provider_intent_id, f"cancel:{intent.id}")
    except (GatewayError, PaymentDeclined):
        provider = await _provider_call(gateway.retrieve(intent.provider_intent_id))
    await _applied(services, user_id, intent.id, provider)
    intent = await owned_intent(services, user_id, intent_id)
    if intent.status != "rejected":
        raise PaymentProblem(409, "intent_not_cancellable", f"the intent is {intent.status}", intent_status=intent.status)
    return intent


# --- refunds ----------------------------------------------------------------------------------


async def refund_transaction(services: "Services", gateway: PaymentGateway, user_id: uuid.UUID, transaction_id: uuid.UUID,
                             amount_minor: int | None, reason: str | None, idempotency_key: str | None) -> Refund:
    """Reserve in the wallet (Wallet actor), ask the provider, settle. The provider call carries
    the refund id as its idempotency key, so the reconciliation job may repeat it safely."""
    async with services.readonly() as session:
        txn = await session.get(Transaction, transaction_id)
        if txn is None or txn.user_id != user_id:
            raise PaymentProblem(404, "transaction_not_found", f"no transaction {transaction_id}")
        intent = await session.get(PaymentIntent, txn.payment_intent_id) if txn.payment_intent_id else None
    if intent is None or intent.provider_intent_id is None:
        raise PaymentProblem(409, "not_refundable", "only card top-ups are refunded")
    amount = amount_minor if amount_minor is not None else payments.refundable_minor(txn.amount_minor, txn.refunded_minor)
    refund_id = uuid.uuid5(transaction_id, idempotency_key) if idempotency_key else uuid.uuid4()
    if payments.needs_approval(amount, services.settings.refund_approval_above_minor):
        return await request_refund(services, user_id, refund_id, transaction_id, amount, reason)
    reserved = await services.runtime.call(
        "wallet", str(user_id), "ReserveRefund",
        {"refund_id": str(refund_id), "transaction_id": str(transaction_id), "amount_minor": amount, "reason": reason},
        command_id=f"refund:{refund_id}", timeout_s=WALLET_WAIT_S,
    )
    if not reserved.get("ok", False):
        reason_code = str(reserved.get("reason"))
        status = 404 if reason_code in NOT_FOUND_REASONS else 409
        raise PaymentProblem(status, reason_code, "the refund was refused", refundable_minor=reserved.get("refundable_minor"))
    if reserved.get("status") in ("requested", "rejected"):
        # A repeat of a request waiting for (or declined by) an admin: only approval reaches the provider.
        return await load_refund(services, refund_id)
    # A repeat with the same key asks the provider for the amount first reserved, never another.
    await settle_refund_at_provider(services, gateway, user_id, refund_id, intent.provider_intent_id,
                                    int(reserved["amount_minor"]))
    async with services.readonly() as session:
        refund = await session.get(Refund, refund_id)
    if refund.status == "failed":
        raise PaymentProblem(502, "refund_failed", "the provider refused the refund; the wallet was restored",
                             refund_id=str(refund_id), provider_code=refund.failure_code)
    return refund


async def request_refund(services: "Services", user_id: uuid.UUID, refund_id: uuid.UUID, transaction_id: uuid.UUID,
                         amount: int, reason: str | None) -> Refund:
    """Above the approval threshold: the refund is checked and stored `requested` (Wallet actor,
    `RequestRefund`); an admin approves (approve_refund) or rejects it."""
    requested = await services.runtime.call(
        "wallet", str(user_id), "RequestRefund",
        {"refund_id": str(refund_id), "transaction_id": str(transaction_id), "amount_minor": amount, "reason": reason},
        command_id=f"refund-requested:{refund_id}", timeout_s=WALLET_WAIT_S,
    )
    _raise_if_refused(requested)
    async with services.readonly() as session:
        return await session.get(Refund, refund_id)


def _raise_if_refused(result: dict[str, Any]) -> None:
    if not result.get("ok", False):
        reason_code = str(result.get("reason"))
        status = 404 if reason_code in NOT_FOUND_REASONS else 409
        raise PaymentProblem(status, reason_code, "the refund was refused", refundable_minor=result.get("refundable_minor"),
                             refund_status=result.get("refund_status"))


async def approve_refund(services: "Services", gateway: PaymentGateway, refund_id: uuid.UUID,
                         reviewer_id: uuid.UUID) -> tuple[Refund, bool]:
    """An admin approves a requested refund: reserved in the wallet (ReserveRefund, `approved`),
    then the provider is asked outside any transaction with the refund id as its idempotency key,
    then settled. Approving again is harmless: a settled refund is answered as it stands, a
    pending one (provider outcome unknown) asks the provider again under the same key. Each call
    is its own command (the Wallet actor serializes them and only the first finds the refund
    `requested`), so the second element says whether this call made the approval."""
    refund = await load_refund(services, refund_id)
    approved_now = False
    if refund.status == "requested":
        reserved = await services.runtime.call(
            "wallet", str(refund.user_id), "ReserveRefund",
            {"refund_id": str(refund_id), "approved": True, "reviewed_by": str(reviewer_id)},
            command_id=f"refund-approved:{refund_id}:{uuid.uuid4()}", timeout_s=WALLET_WAIT_S,
        )
        _raise_if_refused(reserved)
        approved_now = bool(reserved.get("approved"))
        refund = await load_refund(services, refund_id)
    if refund.status == "rejected":
        raise PaymentProblem(409, "refund_not_requested", "the refund was rejected", refund_status=refund.status)
    if refund.status == "pending":
        async with services.readonly() as session:
            txn = await session.get(Transaction, refund.transaction_id)
            intent = await session.get(PaymentIntent, txn.payment_intent_id)
        await settle_refund_at_provider(services, gateway, refund.user_id, refund_id, intent.provider_intent_id,
                                        refund.amount_minor)
        refund = await load_refund(services, refund_id)
    return refund, approved_now


async def reject_refund(services: "Services", refund_id: uuid.UUID, reviewer_id: uuid.UUID, reason: str) -> Refund:
    """An admin declines a requested refund (Wallet actor, `RejectRefund`); the person is told why."""
    refund = await load_refund(services, refund_id)
    rejected = await services.runtime.call(
        "wallet", str(refund.user_id), "RejectRefund",
        {"refund_id": str(refund_id), "reason": reason, "reviewed_by": str(reviewer_id)},
        command_id=f"refund-rejected:{refund_id}:{uuid.uuid4()}", timeout_s=WALLET_WAIT_S,
    )
    _raise_if_refused(rejected)
    return await load_refund(services, refund_id)


async def load_refund(services: "Services", refund_id: uuid.UUID) -> Refund:
    async with services.readonly() as session:
        refund = await session.get(Refund, refund_id)
    if refund is None:
        raise PaymentProblem(404, "refund_not_found", f"no refund {refund_id}")
    return refund


async def settle_refund_at_provider(services: "Services", gateway: PaymentGateway, user_id: uuid.UUID,
                                    refund_id: uuid.UUID, provider_intent_id: str, amount_minor: int) -> None:
    try:
        # Our id travels with the refund, so its webhook is recognised as ours even if it
        # arrives before SettleRefund records the provider's refund id.
        provider_refund_id = await gateway.refund(provider_intent_id, amount_minor, f"refund:{refund_id}",
                                                  metadata={"refund_id": str(refund_id)})
        outcome = {"succeeded": True, "provider_refund_id": provider_refund_id}
    except GatewayError as error:
        if error.status is None or error.status >= 500:
            return  # unknown outcome: stays pending; reconciliation asks again with the same key
        outcome = {"succeeded": False, "failure_code": error.code[:64]}
    await services.runtime.call(
        "wallet", str(user_id), "SettleRefund", {"refund_id": str(refund_id), **outcome},
        command_id=f"refund-settled:{refund_id}", timeout_s=WALLET_WAIT_S,
    )


# --- webhooks ---------------------------------------------------------------------------------


def verified_event(body: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """The event, if Stripe signed it with our secret within the tolerance; PaymentProblem(400)
    otherwise. Nothing is written before this passes."""
    try:
        stripe.Webhook.construct_event(body.decode("utf-8"), signature or "", secret, tolerance=WEBHOOK_TOLERANCE_S)
        if not signed_recently(signature or "", time.time()):
            raise ValueError("timestamp in the future")
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, stripe.SignatureVerificationError):
        raise PaymentProblem(400, "invalid_signature", "the webhook signature or timestamp did not verify") from None


def signed_recently(signature: str, now_s: float) -> bool:
    """The SDK refuses timestamps too old, not too far ahead; a replay window works both ways."""
    stamps = [part[2:] for part in signature.split(",") if part.startswith("t=")]
    return bool(stamps) and stamps[0].isdigit() and abs(now_s - int(stamps[0])) <= WEBHOOK_TOLERANCE_S


REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"})


async def ingest_webhook(services: "Services", provider: str, body: bytes, signature: str | None,
                         gateway: PaymentGateway | None = None) -> bool:
    """Verify, log once per provider event id, apply. Returns True when the event had already
    been processed (a duplicate delivery). An event that could not be applied yet (a refund of a
    payment not applied yet) stays unprocessed, so a redelivery applies it."""
    if provider != "stripe":
        raise PaymentProblem(404, "unknown_provider", f"no payment provider {provider}")
    secret = services.settings.stripe_webhook_secret
    if not secret:
        raise PaymentProblem(503, "webhooks_not_configured", "STRIPE_WEBHOOK_SECRET is not set")
    try:
        event = verified_event(body, signature, secret)
    except PaymentProblem:
        WEBHOOKS.labels(provider, "invalid_signature").inc()
        raise
    obj = (event.get("data") or {}).get("object") or {}
    intent_obj = obj if obj.get("object") == "payment_intent" else None
    row_id = await log_event(services, provider, event["id"], event["type"], obj.get("id") if intent_obj else obj.get("payment_intent"),
                             event, "webhook")
    if row_id is None:
        WEBHOOKS.labels(provider, "duplicate").inc()
        return True
    applied = True
    if intent_obj is not None:
        await apply_snapshot(services, intent_from_stripe(intent_obj))
    elif event["type"] in REFUND_EVENTS and obj.get("object") == "refund":
        applied = await apply_provider_refund(services, gateway, refund_from_stripe(obj))
    elif event["type"] == "charge.refunded" and gateway is not None and obj.get("payment_intent"):
        # The charge says how much was refunded, not by which refunds: ask for them.
        refunds = await _provider_call(gateway.refunds_of(obj["payment_intent"]))
        applied = all([await apply_provider_refund(services, gateway, refund) for refund in refunds])
    if not applied:
        # Not a 2xx: the provider delivers it again later (and reconciliation also finds it).
        WEBHOOKS.labels(provider, "deferred").inc()
        raise PaymentProblem(503, "webhook_deferred", "the event cannot be applied yet; deliver it again")
    await mark_processed(services, row_id)
    WEBHOOKS.labels(provider, "processed").inc()
    return False


async def log_event(services: "Services", provider: str, event_id: str, event_type: str, provider_intent_id: str | None,
                    payload: dict[str, Any], source: str) -> uuid.UUID | None:
    """The event's log row id if it still needs processing; None if it was processed before."""
    async with services.sessions.begin() as session:
        await session.execute(insert_unless_exists(session.bind.dialect.name, PaymentWebhook, dict(
            id=uuid.uuid4(), provider=provider, provider_event_id=event_id, event_type=event_type[:64],
            provider_intent_id=provider_intent_id, signature_ok=source == "webhook", source=source,
            payload=payload, received_at=utcnow(),
        ), ["provider", "provider_event_id"]))
        row = (await session.execute(select(PaymentWebhook.id, PaymentWebhook.processed_at).where(
            PaymentWebhook.provider == provider, PaymentWebhook.provider_event_id == event_id))).one()
    return None if row.processed_at is not None else row.id


async def mark_processed(services: "Services", row_id: uuid.UUID) -> None:
    async with services.sessions.begin() as session:
        await session.execute(update(PaymentWebhook).where(PaymentWebhook.id == row_id, PaymentWebhook.processed_at.is_(None))
                              .values(processed_at=utcnow()))


async def apply_snapshot(services: "Services", provider: ProviderIntent) -> bool:
    """Apply a provider snapshot to the intent it belongs to (found by our id in its metadata, or
    by the provider id); False for an intent that is not ours."""
    intent = await _find_intent(services, provider)
    if intent is None:
        log.info("provider intent %s is not one of ours; logged only", provider.id)
        return False
    result = await apply_observation(services, intent.user_id, intent.id, provider)
    if not result.get("ok", False):
        log.error("the wallet refused provider intent %s (%s): %s", provider.id, provider.status, result)
    return True


async def apply_provider_refund(services: "Services", gateway: PaymentGateway | None, refund: ProviderRefund) -> bool:
    """Hand a provider refund to the person's Wallet actor (`ApplyProviderRefund`); False when
    it could not be applied yet. The intent's latest state is applied first when the provider
    can be asked, so a refund event that overtook its payment's events still applies."""
    async with services.readonly() as session:
        intent = (await session.execute(select(PaymentIntent).where(
            PaymentIntent.provider_intent_id == refund.payment_intent))).scalar_one_or_none() if refund.payment_intent else None
    if intent is None:
        log.info("provider refund %s is not of one of our payments; logged only", refund.id)
        return True
    if gateway is not None and intent.status not in ("confirmed", "refunded"):
        try:
            await apply_observation(services, intent.user_id, intent.id, await gateway.retrieve(refund.payment_intent))
        except GatewayError as error:
            log.warning("could not read %s before its refund: %s", refund.payment_intent, error.code)
    payload = {"intent_id": str(intent.id), "provider_refund_id": refund.id, "amount_minor": refund.amount_minor,
               "currency": refund.currency, "status": refund.status, "metadata": refund.metadata,
               "failure_reason": refund.failure_reason}
    result = await services.runtime.call("wallet", str(intent.user_id), "ApplyProviderRefund", payload,
                                         command_id=f"provider-refund:{refund.id}:{refund.status}", timeout_s=WALLET_WAIT_S)
    if not result.get("ok", False):
        log.error("the wallet refused provider refund %s: %s", refund.id, result)
        return False
    return True


async def _find_intent(services: "Services", provider: ProviderIntent) -> PaymentIntent | None:
    async with services.readonly() as session:
        ours = provider.metadata.get("intent_id")
        if ours:
            try:
                found = await session.get(PaymentIntent, uuid.UUID(ours))
            except ValueError:
                found = None
            if found is not None and found.provider_intent_id in (None, provider.id):
                return found
        return (await session.execute(select(PaymentIntent).where(PaymentIntent.provider_intent_id == provider.id))).scalar_one_or_none()


# --- reconciliation ---------------------------------------------------------------------------


async def reconcile(services: "Services", gateway: PaymentGateway, window: timedelta = RECONCILE_WINDOW) -> dict[str, int]:
    """List the provider's recent intents and fold each into ours (a missed or failed webhook is
    repaired here), then retry refunds whose provider answer never came."""
    since = utcnow() - window
    observed = await gateway.recent_intents(since)
    applied = 0
    for provider in observed:
        intent = await _find_intent(services, provider)
        if intent is None or payments.next_status(intent.status, payments.status_from_provider(provider.status)) == intent.status:
            continue
        await log_event(services, gateway.code, f"reconcile:{provider.id}:{provider.status}", f"reconcile.{provider.status}",
                        provider.id, {"id": provider.id, "status": provider.status, "amount_received": provider.amount_received_minor},
                        "reconciliation")
        await apply_observation(services, intent.user_id, intent.id, provider)
        applied += 1
    retried = await _retry_pending_refunds(services, gateway)
    refunds = await _reconcile_refunds(services, gateway, since)
    if applied or retried or refunds:
        log.warning("reconciliation repaired %d intents and %d refunds, retried %d refunds", applied, refunds, retried)
    return {"checked": len(observed), "repaired": applied, "refunds_retried": retried, "refunds_applied": refunds}


async def _reconcile_refunds(services: "Services", gateway: PaymentGateway, since) -> int:
    """Refunds the provider made that we have not recorded (a missed webhook, or a dashboard
    refund whose event was lost): applied through the same command as the webhook."""
    reported = [refund for refund in await gateway.recent_refunds(since) if refund.status == "succeeded"]
    async with services.readonly() as session:
        known = set((await session.execute(select(Refund.provider_refund_id).where(
            Refund.provider_refund_id.in_([refund.id for refund in reported])))).scalars()) if reported else set()
    applied = 0
    for refund in reported:
        if refund.id in known:
            continue
        await log_event(services, gateway.code, f"reconcile:{refund.id}:{refund.status}", "reconcile.refund", refund.payment_intent,
                        {"id": refund.id, "status": refund.status, "amount": refund.amount_minor}, "reconciliation")
        applied += await apply_provider_refund(services, gateway, refund)
    return applied


async def _retry_pending_refunds(services: "Services", gateway: PaymentGateway) -> int:
    async with services.readonly() as session:
        rows = (await session.execute(
            select(Refund.id, Refund.user_id, Refund.amount_minor, PaymentIntent.provider_intent_id)
            .join(Transaction, Transaction.id == Refund.transaction_id)
            .join(PaymentIntent, PaymentIntent.id == Transaction.payment_intent_id)
            .where(Refund.status == "pending", Refund.created_at < utcnow() - REFUND_RETRY_AFTER)
        )).all()
    for row in rows:
        await settle_refund_at_provider(services, gateway, row.user_id, row.id, row.provider_intent_id, row.amount_minor)
    return len(rows)


# --- card holds for rentals ---------------------------------------------------------------------


async def place_card_hold(services: "Services", gateway: PaymentGateway, user_id: uuid.UUID, amount_minor: int,
                          hold_key: str) -> PaymentIntent:
    """Authorize `amount_minor` on the saved card (manual capture): the intent becomes `preauth`
    and no money moves in our ledger until it is captured. `hold_key` (the rental id) makes a
    repeat name the same hold."""
    async with services.readonly() as session:
        customer = (await session.execute(select(PaymentCustomer).where(
            PaymentCustomer.user_id == user_id, PaymentCustomer.provider == gateway.code))).scalar_one_or_none()
        currency = await wallet_currency(session, user_id, services.settings.currency)
    if customer is None or not customer.saved_payment_method_id:
        raise PaymentProblem(409, "no_saved_card", "a card hold needs a saved card")
    key = f"card-hold:{user_id}:{hold_key}"
    async with services.sessions.begin() as session:
        values = dict(id=uuid.uuid4(), user_id=user_id, amount_minor=amount_minor, amount_received_minor=0, currency=currency,
                      purpose="rental_hold", provider=gateway.code, status="waiting", idempotency_key=key,
                      created_at=utcnow(), updated_at=utcnow())
        await session.execute(insert_unless_exists(session.bind.dialect.name, PaymentIntent, values, ["idempotency_key"]))
        intent = (await session.execute(select(PaymentIntent).where(PaymentIntent.idempotency_key == key))).scalar_one()
    if intent.provider_intent_id:
        # A repeat: read the hold back rather than rely on the provider's idempotency key, which
        # expires (24 h at Stripe) and would then authorise the card a second time.
        await _applied(services, user_id, intent.id, await _provider_call(gateway.retrieve(intent.provider_intent_id)))
        return await owned_intent(services, user_id, intent.id)
    try:
        provider = await gateway.authorize(
            amount_minor=intent.amount_minor, currency=currency, customer=customer.provider_customer_id,
            payment_method=customer.saved_payment_method_id, idempotency_key=f"pi:{intent.id}",
            metadata={"intent_id": str(intent.id), "user_id": str(user_id), "purpose": "rental_hold"},
        )
    except PaymentDeclined as declined:
        if declined.intent is not None:
            await _applied(services, user_id, intent.id, declined.intent)
        raise PaymentProblem(402, "payment_declined", "the card was declined", decline_code=declined.code) from None
    except GatewayError as error:
        await _mark_error(services, intent.id, error.code)
        raise PaymentProblem(502, "payment_provider_error", str(error), provider_code=error.code) from None
    await _applied(services, user_id, intent.id, provider)
    return await owned_intent(services, user_id, intent.id)


async def capture_card_hold(services: "Services", gateway: PaymentGateway, user_id: uuid.UUID, intent_id: uuid.UUID,
                            amount_minor: int) -> PaymentIntent:
    """Capture up to the held amount (the rest is released by the provider); 0 voids the hold."""
    intent = await owned_intent(services, user_id, intent_id)
    if intent.purpose != "rental_hold" or intent.status != "preauth":
        raise PaymentProblem(409, "hold_not_capturable", f"the intent is {intent.status}", intent_status=intent.status)
    if not 0 <= amount_minor <= intent.amount_minor:
        raise PaymentProblem(400, "amount_out_of_range", "capture at most the held amount", max_amount_minor=intent.amount_minor)
    if amount_minor == 0:
        provider = await _provider_call(gateway.cancel(intent.provider_intent_id, f"void:{intent.id}"))
    else:
        provider = await _provider_call(gateway.capture(intent.provider_intent_id, amount_minor, f"capture:{intent.id}"))
    await _applied(services, user_id, intent.id, provider)
    return await owned_intent(services, user_id, intent_id)


# --- rentals paid by card ----------------------------------------------------------------------


async def authorise_rental_card(services: "Services", gateway: PaymentGateway, user_id: uuid.UUID,
                                rental_id: uuid.UUID, amount_minor: int) -> uuid.UUID | None:
    """Before a card rental's StartRental: authorise its price on the saved card (key derived
    from the rental id, so a retried start authorises once). A free package authorises nothing
    but still needs a saved card, for the late fees the card will not cover as a due. Raises
    PaymentProblem: 409 `no_saved_card`, 402 `payment_declined`, 502."""
    if amount_minor > 0:
        return (await place_card_hold(services, gateway, user_id, amount_minor, str(rental_id))).id
    async with services.readonly() as session:
        saved = await session.scalar(select(PaymentCustomer.saved_payment_method_id).where(
            PaymentCustomer.user_id == user_id, PaymentCustomer.provider == gateway.code))
    if not saved:
        raise PaymentProblem(409, "no_saved_card", "a card hold needs a saved card")
    return None


async def settle_card_rental(services: "Services", gateway: PaymentGateway, rental_id: uuid.UUID) -> str | None:
    """Bring a card rental's hold in line with the rental (`payments.card_hold_action`): release
    it when the rental never started; capture the fee (at most the hold) when it ended, then tell
    the Rental actor what was charged and what is left as a due. Every provider call has a key
    derived from our intent id, and ChargeSettled a command id derived from the rental, so the
    listener, the sweep and a retry after a crash all end in one capture and one settlement."""
    async with services.readonly() as session:
        rental = await session.get(Rental, rental_id)
        intent = await session.get(PaymentIntent, rental.card_intent_id) if rental and rental.card_intent_id else None
    if intent is None or intent.provider_intent_id is None:
        return None
    settled = rental.charged_minor + rental.due_minor >= rental.fee_minor
    action = payments.card_hold_action(rental.status, intent.status, settled)
    if action is None:
        return None
    charge = payments.card_charge(rental.fee_minor, intent.amount_minor)
    if action == "cancel" or (action == "capture" and charge.capture_minor == 0):
        provider = await _hold_call(gateway, intent, gateway.cancel(intent.provider_intent_id, f"void:{intent.id}"))
    elif action == "capture":
        provider = await _hold_call(gateway, intent, gateway.capture(
            intent.provider_intent_id, charge.capture_minor, f"capture:{intent.id}"))
    else:
        provider = None
    if provider is not None:
        await apply_observation(services, rental.user_id, intent.id, provider)
    if rental.status != "cancelled":
        await _settle_rental_charge(services, rental, intent.id)
    return action


async def _hold_call(gateway: PaymentGateway, intent: PaymentIntent, pending):
    """The provider's intent after a capture or cancel; when the call is refused (the
    authorisation lapsed, or a retry finds it already done) the intent as it is now. None when
    the provider cannot be reached: the sweep tries again."""
    try:
        return await pending
    except (GatewayError, PaymentDeclined) as error:
        log.warning("card hold %s: %s; reading it back", intent.provider_intent_id, getattr(error, "code", error))
    try:
        return await gateway.retrieve(intent.provider_intent_id)
    except GatewayError:
        return None


async def _settle_rental_charge(services: "Services", rental: Rental, intent_id: uuid.UUID) -> None:
    async with services.readonly() as session:
        intent = await session.get(PaymentIntent, intent_id)
    if intent.status not in ("confirmed", "refunded", "rejected"):
        return  # the provider has not decided yet
    received = intent.amount_received_minor if intent.status != "rejected" else 0
    settled = {"charged_minor": received, "due_minor": max(0, rental.fee_minor - received)}
    await services.runtime.call("rental", str(rental.id), "ChargeSettled", settled,
                                command_id=f"charge-settled:{rental.id}", timeout_s=WALLET_WAIT_S)


async def card_rentals_sweep(services: "Services", gateway: PaymentGateway) -> int:
    """The safety net behind the after-commit notices: every card rental whose hold is still
    open after the rental ended or failed, or whose charge was never settled."""
    async with services.readonly() as session:
        ids = list((await session.execute(
            select(Rental.id).join(PaymentIntent, PaymentIntent.id == Rental.card_intent_id).where(
                Rental.payment_mode == "card",
                ((Rental.status == "cancelled") & (PaymentIntent.status == "preauth"))
                | (Rental.status.in_(("completed", "lost"))
                   & ((PaymentIntent.status == "preauth") | (Rental.charged_minor + Rental.due_minor < Rental.fee_minor))),
            )
        )).scalars())
    done = 0
    for rental_id in ids:
        done += await settle_card_rental(services, gateway, rental_id) is not None
    return done


async def do_payment_work(services: "Services", gateway: PaymentGateway, notice: dict[str, Any]) -> None:
    """One notice from an actor (see `payments.CARD_WORK`)."""
    if notice.get("type") == "settle_card_rental":
        await settle_card_rental(services, gateway, uuid.UUID(notice["rental_id"]))
    elif notice.get("type") == "auto_refill":
        await auto_refill(services, gateway, uuid.UUID(notice["user_id"]))


async def run_payment_listener(services: "Services", gateway: PaymentGateway, ready: "asyncio.Event | None" = None) -> None:
    """Do the provider I/O actors announce after their commits, one notice at a time (each is
    idempotent, so a notice seen by two listeners is harmless)."""
    async with services.bus.subscribe(payments.CARD_WORK) as subscription:
        if ready is not None:
            ready.set()
        while True:
            try:
                _, notice = await subscription.get(30.0)
            except TimeoutError:
                continue
            try:
                await do_payment_work(services, gateway, notice)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("payment work %s failed; the sweep will retry", notice)


# --- auto-refill ------------------------------------------------------------------------------


async def auto_refill(services: "Services", gateway: PaymentGateway, user_id: uuid.UUID) -> uuid.UUID | None:
    """Charge the saved card off-session if the wallet is below its threshold; the intent's id,
    or None when no refill is due. Safe to call from anywhere, any number of times."""
    async with services.readonly() as session:
        state = await _refill_state(session, user_id, gateway.code)
    if state is None:
        return None
    customer, wallet, account = state
    setting = payments.RefillSetting(customer.auto_refill, customer.auto_refill_threshold_minor,
                                     customer.auto_refill_amount_minor, customer.saved_payment_method_id)
    amount = payments.auto_refill_amount(setting, ledger.credit_balance(account).available_minor)
    if amount == 0:
        return None
    key = payments.auto_refill_key(user_id, account.credits_posted)
    async with services.sessions.begin() as session:
        values = dict(id=uuid.uuid4(), user_id=user_id, amount_minor=amount, amount_received_minor=0, currency=wallet.currency,
                      purpose="auto_refill", provider=gateway.code, status="waiting", idempotency_key=key,
                      created_at=utcnow(), updated_at=utcnow())
        await session.execute(insert_unless_exists(session.bind.dialect.name, PaymentIntent, values, ["idempotency_key"]))
        intent = (await session.execute(select(PaymentIntent).where(PaymentIntent.idempotency_key == key))).scalar_one()
    if intent.status != "waiting" or intent.provider_intent_id:
        return intent.id
    try:
        provider = await gateway.create_intent(
            amount_minor=amount, currency=wallet.currency, customer=customer.provider_customer_id,
            idempotency_key=f"pi:{intent.id}", payment_method=customer.saved_payment_method_id, off_session=True,
            metadata={"intent_id": str(intent.id), "user_id": str(user_id), "purpose": "auto_refill"},
        )
    except PaymentDeclined as declined:
        if declined.intent is not None:
            await apply_observation(services, user_id, intent.id, declined.intent)
        log.warning("auto-refill of %s declined: %s", user_id, declined.code)
        return intent.id
    except GatewayError as error:
        await _mark_error(services, intent.id, error.code)
        return intent.id
    await apply_observation(services, user_id, intent.id, provider)
    return intent.id


async def _refill_state(session: AsyncSession, user_id: uuid.UUID, provider: str):
    customer = (await session.execute(select(PaymentCustomer).where(
        PaymentCustomer.user_id == user_id, PaymentCustomer.provider == provider))).scalar_one_or_none()
    wallet = (await session.execute(select(Wallet).where(Wallet.user_id == user_id))).scalar_one_or_none()
    if customer is None or wallet is None:
        return None
    return customer, wallet, await session.get(LedgerAccount, wallet.account_id)


async def auto_refill_sweep(services: "Services", gateway: PaymentGateway) -> int:
    """Every wallet with auto-refill on: the scheduler's periodic check (a wallet debited by a
    rental charge is refilled within one interval)."""
    async with services.readonly() as session:
        users = list((await session.execute(select(PaymentCustomer.user_id).where(
            PaymentCustomer.auto_refill.is_(True), PaymentCustomer.provider == gateway.code,
            PaymentCustomer.saved_payment_method_id.is_not(None)))).scalars())
    started = 0
    for user_id in users:
        started += await auto_refill(services, gateway, user_id) is not None
    return started

"""Payment endpoints: gateways, card top-ups, their status, cancel, refunds, the provider's
webhooks and the person's transaction history. Thin: validate, authorize, run a flow from
payment_flows (which ends in the Wallet actor), read rows back."""

from __future__ import annotations

import contextlib
import uuid

from litestar import Controller, Request, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from sqlalchemy import func, select

from powerbank import payment_flows as flows
from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.schemas_payment import (
    AutoRefillRequest,
    AutoRefillView,
    IntentView,
    PaymentMethodView,
    PaymentStatusView,
    RefundPage,
    RefundRequest,
    RefundView,
    TopUpIntentCreated,
    TopUpIntentRequest,
    TransactionPage,
    TransactionView,
    VerifyTopUpRequest,
    WebhookAck,
)
from powerbank.payment_gateway import PaymentGateway
from powerbank.storage.models import PaymentCustomer, PaymentIntent, PaymentWebhook, Refund, Transaction
from powerbank.storage.types import utcnow

PUBLIC = {"exclude_from_auth": True}


@contextlib.contextmanager
def as_api_errors():
    """PaymentProblem (the flows' refusals) -> the API's one error shape."""
    try:
        yield
    except flows.PaymentProblem as problem:
        extra = {k: v for k, v in problem.extra.items() if v is not None}
        raise ApiError(problem.status, problem.code, problem.detail, **extra) from None
    except TimeoutError as exc:
        raise ApiError(503, "wallet_timeout", "accepted but not applied yet; ask again") from exc


def gateway_of(state: State) -> PaymentGateway:
    gateway = state.get("payment_gateway")
    if gateway is None:
        raise ApiError(503, "payments_unavailable", "no payment provider is configured (STRIPE_SECRET_KEY)")
    return gateway


def intent_view(intent: PaymentIntent) -> IntentView:
    return IntentView(
        intent_id=intent.id, status=intent.status, purpose=intent.purpose, amount_minor=intent.amount_minor,
        amount_received_minor=intent.amount_received_minor, currency=intent.currency, provider=intent.provider,
        provider_intent_id=intent.provider_intent_id, failure_code=intent.failure_code,
        created_at=intent.created_at, updated_at=intent.updated_at,
    )


def refund_view(refund: Refund) -> RefundView:
    return RefundView(
        refund_id=refund.id, transaction_id=refund.transaction_id, amount_minor=refund.amount_minor,
        currency=refund.currency, status=refund.status, provider_refund_id=refund.provider_refund_id,
        created_at=refund.created_at,
    )


def transaction_view(txn: Transaction) -> TransactionView:
    return TransactionView(
        transaction_id=txn.id, type=txn.type, status=txn.status, amount_minor=txn.amount_minor,
        refunded_minor=txn.refunded_minor, currency=txn.currency, payment_intent_id=txn.payment_intent_id,
        created_at=txn.created_at,
    )


async def status_view(state: State, user_id: uuid.UUID, intent_id: uuid.UUID) -> PaymentStatusView:
    services = services_of(state)
    with as_api_errors():
        intent = await flows.owned_intent(services, user_id, intent_id)
    async with services.readonly() as session:
        txn_id = await session.scalar(select(Transaction.id).where(Transaction.payment_intent_id == intent.id))
        events = 0
        if intent.provider_intent_id:
            events = await session.scalar(select(func.count()).select_from(PaymentWebhook).where(
                PaymentWebhook.provider_intent_id == intent.provider_intent_id)) or 0
    return PaymentStatusView(intent=intent_view(intent), transaction_id=txn_id, webhook_events=events)


class PaymentFlowController(Controller):
    path = "/api/payment"
    tags = ["payment"]
    security = BEARER_SECURITY
    dependencies = {"paging": Provide(provide_paging)}

    @get("/methods", responses=error_responses(401))
    async def methods(self, state: State) -> list[PaymentMethodView]:
        """Enabled gateways, best priority first (lowest number)."""
        services = services_of(state)
        await flows.ensure_payment_methods(services)
        async with services.readonly() as session:
            rows = await flows.enabled_methods(session)
        return [PaymentMethodView(code=m.code, name=m.name, priority=m.priority, min_amount_minor=m.min_amount_minor,
                                  max_amount_minor=m.max_amount_minor, currencies=list(m.currencies)) for m in rows]

    @post("/wallet/topup-intent", status_code=201, responses=error_responses(400, 401, 409, 502, 503))
    async def topup_intent(self, state: State, request: Request, data: JSONBody[TopUpIntentRequest]) -> TopUpIntentCreated:
        """Start a card top-up: our intent (status `waiting`) and the provider's, whose
        `client_secret` the app confirms with. The wallet is credited once the provider reports
        the payment succeeded (verify-topup, webhook or reconciliation, whichever comes first).
        A retry with the same `idempotency_key` returns the same intent."""
        top_up = flows.TopUpRequest(request.user.id, data.amount_minor, data.currency, data.method, data.save_card,
                                    data.idempotency_key)
        with as_api_errors():
            intent, provider = await flows.create_topup(services_of(state), gateway_of(state), top_up)
        return TopUpIntentCreated(intent=intent_view(intent), client_secret=provider.client_secret)

    @post("/verify-topup", status_code=200, responses=error_responses(400, 401, 402, 404, 409, 502, 503))
    async def verify_topup(self, state: State, request: Request, data: JSONBody[VerifyTopUpRequest]) -> PaymentStatusView:
        """Ask the provider where the payment stands and apply it (with `payment_method`, confirm
        with that card first). 402 `payment_declined` leaves the intent waiting for another card."""
        with as_api_errors():
            await flows.verify_topup(services_of(state), gateway_of(state), request.user.id, data.intent_id,
                                     data.payment_method)
        return await status_view(state, request.user.id, data.intent_id)

    @get("/status/{intent_id:uuid}", responses=error_responses(400, 401, 404))
    async def status(self, state: State, request: Request, intent_id: FromPath[uuid.UUID]) -> PaymentStatusView:
        """Our view of one intent: status (waiting, preauth, confirmed, rejected, refunded, error),
        its wallet transaction once credited, and how many provider events were logged for it."""
        return await status_view(state, request.user.id, intent_id)

    @post("/cancel/{intent_id:uuid}", status_code=200, responses=error_responses(400, 401, 404, 409, 502, 503))
    async def cancel(self, state: State, request: Request, intent_id: FromPath[uuid.UUID]) -> PaymentStatusView:
        """Cancel a top-up that has not been paid; 409 `intent_not_cancellable` once it has."""
        with as_api_errors():
            await flows.cancel_topup(services_of(state), gateway_of(state), request.user.id, intent_id)
        return await status_view(state, request.user.id, intent_id)

    @post("/refund/{transaction_id:uuid}", status_code=201, responses=error_responses(400, 401, 404, 409, 502, 503))
    async def refund(self, state: State, request: Request, transaction_id: FromPath[uuid.UUID],
                     data: JSONBody[RefundRequest]) -> RefundView:
        """Refund (part of) a card top-up to the card. Refused with 409 `exceeds_refundable` above
        what was paid minus what was already refunded, and 409 `insufficient_funds` when the
        wallet no longer holds that money (it was spent on rentals). Above
        REFUND_APPROVAL_ABOVE_MINOR the refund is checked the same way but stored `requested`:
        nothing moves until an admin approves it (docs/admin.md)."""
        with as_api_errors():
            refund = await flows.refund_transaction(services_of(state), gateway_of(state), request.user.id, transaction_id,
                                                    data.amount_minor, data.reason, data.idempotency_key)
        return refund_view(refund)

    @get("/refunds", responses=error_responses(400, 401))
    async def refunds(self, state: State, request: Request, paging: NamedDependency[Paging]) -> RefundPage:
        """The caller's refunds, newest first."""
        mine = select(Refund).where(Refund.user_id == request.user.id)
        async with services_of(state).readonly() as session:
            total = await session.scalar(select(func.count()).select_from(mine.subquery()))
            rows = (await session.execute(mine.order_by(Refund.created_at.desc(), Refund.id)
                                          .offset(paging.offset).limit(paging.page_size))).scalars()
            return RefundPage(items=[refund_view(r) for r in rows], page=paging.page, page_size=paging.page_size,
                              total=total or 0)

    @put("/auto-refill", responses=error_responses(400, 401, 409))
    async def auto_refill(self, state: State, request: Request, data: JSONBody[AutoRefillRequest]) -> AutoRefillView:
        """Refill the wallet from the saved card (a top-up with `save_card`) whenever the available
        balance falls below `threshold_minor`, by `amount_minor`."""
        if data.enabled and data.amount_minor <= 0:
            raise ApiError(400, "invalid_amount", "amount_minor must be positive to enable auto-refill")
        async with services_of(state).sessions.begin() as session:
            customer = (await session.execute(select(PaymentCustomer).where(
                PaymentCustomer.user_id == request.user.id))).scalars().first()
            if customer is None or (data.enabled and not customer.saved_payment_method_id):
                raise ApiError(409, "no_saved_card", "top up once with save_card=true first")
            customer.auto_refill = data.enabled
            customer.auto_refill_threshold_minor = data.threshold_minor
            customer.auto_refill_amount_minor = data.amount_minor
            customer.updated_at = utcnow()
            return AutoRefillView(enabled=data.enabled, threshold_minor=data.threshold_minor,
                                  amount_minor=data.amount_minor, saved_card=bool(customer.saved_payment_method_id))

    @post("/webhook/{provider:str}", status_code=200, opt=PUBLIC, security=[], responses=error_responses(400, 404, 503))
    async def webhook(self, state: State, request: Request, provider: FromPath[str]) -> WebhookAck:
        """The provider's events. Verified by signature (400 `invalid_signature`, nothing written,
        for a bad signature or a timestamp outside 5 minutes), logged once per event id, applied
        through the Wallet actor. A repeat delivery is acknowledged as a duplicate."""
        body = await request.body()
        with as_api_errors():
            duplicate = await flows.ingest_webhook(services_of(state), provider, body, request.headers.get("stripe-signature"),
                                                   gateway=state.get("payment_gateway"))
        return WebhookAck(received=True, duplicate=duplicate)


class UserTransactionsController(Controller):
    path = "/api/user"
    tags = ["wallet"]
    security = BEARER_SECURITY
    dependencies = {"paging": Provide(provide_paging)}

    @get("/transactions", responses=error_responses(400, 401))
    async def transactions(self, state: State, request: Request, paging: NamedDependency[Paging]) -> TransactionPage:
        """The caller's money movements (top-ups, auto-refills, refunds of them), newest first."""
        mine = select(Transaction).where(Transaction.user_id == request.user.id)
        async with services_of(state).readonly() as session:
            total = await session.scalar(select(func.count()).select_from(mine.subquery()))
            rows = (await session.execute(mine.order_by(Transaction.created_at.desc(), Transaction.id)
                                          .offset(paging.offset).limit(paging.page_size))).scalars()
            return TransactionPage(items=[transaction_view(t) for t in rows], page=paging.page,
                                   page_size=paging.page_size, total=total or 0)

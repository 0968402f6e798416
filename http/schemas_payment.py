"""Request and response bodies of the payment endpoints (same conventions as schemas.py: requests
forbid unknown fields; money is an integer in minor units next to its ISO 4217 currency)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from msgspec import Meta

from powerbank.http.schemas import Currency, IdempotencyKey, Request, Response

# Far above any top-up, far below where int64 sums could overflow.
AmountMinor = Annotated[int, Meta(gt=0, le=10**12, description="minor units (e.g. paisa, cents), > 0")]
MethodCode = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[a-z0-9_\-]+$")]
ProviderPaymentMethod = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_]+$")]


class PaymentMethodView(Response):
    code: str
    name: str
    priority: int
    min_amount_minor: int
    max_amount_minor: int
    currencies: list[str]


class TopUpIntentRequest(Request):
    amount_minor: AmountMinor
    currency: Currency
    method: MethodCode = "stripe"
    # Keep the card for later top-ups and auto-refill (Stripe's setup_future_usage).
    save_card: bool = False
    idempotency_key: IdempotencyKey | None = None


class IntentView(Response):
    intent_id: uuid.UUID
    status: str
    purpose: str
    amount_minor: int
    amount_received_minor: int
    currency: str
    provider: str
    provider_intent_id: str | None
    failure_code: str | None
    created_at: datetime
    updated_at: datetime


class TopUpIntentCreated(Response):
    intent: IntentView
    # For the app's Stripe SDK (confirmCardPayment); never stored by us.
    client_secret: str | None


class VerifyTopUpRequest(Request):
    intent_id: uuid.UUID
    # A payment method to confirm with, when the app did not confirm itself (tests, the demo).
    payment_method: ProviderPaymentMethod | None = None


class PaymentStatusView(Response):
    intent: IntentView
    transaction_id: uuid.UUID | None
    webhook_events: int


class RefundRequest(Request):
    # Omitted: everything still refundable.
    amount_minor: AmountMinor | None = None
    reason: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    idempotency_key: IdempotencyKey | None = None


class RefundView(Response):
    refund_id: uuid.UUID
    transaction_id: uuid.UUID
    amount_minor: int
    currency: str
    status: str
    provider_refund_id: str | None
    created_at: datetime


class RefundPage(Response):
    items: list[RefundView]
    page: int
    page_size: int
    total: int


class TransactionView(Response):
    transaction_id: uuid.UUID
    type: str
    status: str
    amount_minor: int
    refunded_minor: int
    currency: str
    payment_intent_id: uuid.UUID | None
    created_at: datetime


class TransactionPage(Response):
    items: list[TransactionView]
    page: int
    page_size: int
    total: int


class WebhookAck(Response):
    received: bool
    duplicate: bool


class AutoRefillRequest(Request):
    enabled: bool
    threshold_minor: Annotated[int, Meta(ge=0, le=10**12)] = 0
    amount_minor: Annotated[int, Meta(ge=0, le=10**12)] = 0


class AutoRefillView(Response):
    enabled: bool
    threshold_minor: int
    amount_minor: int
    saved_card: bool

"""Request and response bodies of the admin review queues: KYC submissions and refunds waiting
for approval (same conventions as schemas.py: requests forbid unknown fields)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from msgspec import Meta

from powerbank.http.schemas import Request, Response

ReviewReason = Annotated[str, Meta(min_length=1, max_length=300, description="why; shown to the person")]


class ReviewRejection(Request):
    reason: ReviewReason


class KycQueueItem(Response):
    user_id: uuid.UUID
    phone: str | None
    # pending, approved or rejected
    status: str
    document_type: str
    # Only the last four characters, as in the person's own view.
    document_number_last4: str | None
    full_name: str
    date_of_birth: str | None
    document_front_id: uuid.UUID | None
    document_back_id: uuid.UUID | None
    selfie_id: uuid.UUID | None
    submitted_at: datetime
    reviewed_at: datetime | None
    reviewed_by: uuid.UUID | None
    rejection_reason: str | None


class KycQueuePage(Response):
    items: list[KycQueueItem]
    page: int
    page_size: int
    total: int


class AdminRefundView(Response):
    refund_id: uuid.UUID
    transaction_id: uuid.UUID
    user_id: uuid.UUID
    amount_minor: int
    currency: str
    # requested, pending, succeeded, failed or rejected
    status: str
    reason: str | None
    provider_refund_id: str | None
    failure_code: str | None
    reviewed_by: uuid.UUID | None
    reviewed_at: datetime | None
    rejection_reason: str | None
    created_at: datetime


class AdminRefundPage(Response):
    items: list[AdminRefundView]
    page: int
    page_size: int
    total: int

"""Refund approval for admins. A refund a person asks for above REFUND_APPROVAL_ABOVE_MINOR is
stored `requested` and waits here; approving it runs the ordinary refund flow (wallet reserve,
provider, settle: payment_flows.approve_refund), rejecting it closes it with a reason the person
is told. Both changes are the Wallet actor's, so the action log row follows its answer
(http/admin_log.py).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy import select

from powerbank import payment_flows as flows
from powerbank.http.admin_log import admin_action, record_admin_action
from powerbank.http.auth import BEARER_SECURITY, require_admin
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import error_responses
from powerbank.http.routes_payment import as_api_errors, gateway_of
from powerbank.http.routes_staff import page_of
from powerbank.http.schemas_review import AdminRefundPage, AdminRefundView, ReviewRejection
from powerbank.storage.models import Refund

RefundStatusFilter = Annotated[
    str, QueryParameter(pattern="^(requested|pending|succeeded|failed|rejected)$", description="default requested")
]


def admin_refund_view(refund: Refund) -> AdminRefundView:
    return AdminRefundView(
        refund_id=refund.id, transaction_id=refund.transaction_id, user_id=refund.user_id,
        amount_minor=refund.amount_minor, currency=refund.currency, status=refund.status, reason=refund.reason,
        provider_refund_id=refund.provider_refund_id, failure_code=refund.failure_code,
        reviewed_by=refund.reviewed_by, reviewed_at=refund.reviewed_at, rejection_reason=refund.rejection_reason,
        created_at=refund.created_at,
    )


def refund_details(refund: Refund, **extra) -> dict:
    return {"user_id": str(refund.user_id), "amount_minor": refund.amount_minor, "currency": refund.currency,
            "status": refund.status, **extra}


class AdminRefundController(Controller):
    path = "/api/admin/refunds"
    tags = ["admin"]
    security = BEARER_SECURITY
    guards = [require_admin]
    dependencies = {"paging": Provide(provide_paging)}

    @get("/", responses=error_responses(400, 401, 403))
    async def refunds(self, state: State, paging: NamedDependency[Paging], status: RefundStatusFilter = "requested") -> AdminRefundPage:
        """Refunds in this state, oldest first (the approval queue is worked from its front)."""
        query = select(Refund).where(Refund.status == status)
        async with services_of(state).readonly() as session:
            rows, total = await page_of(session, query, paging, [Refund.created_at, Refund.id])
        return AdminRefundPage(items=[admin_refund_view(r) for r in rows], page=paging.page, page_size=paging.page_size,
                               total=total)

    @post("/{refund_id:uuid}/approve", status_code=200, responses=error_responses(400, 401, 403, 404, 409, 502, 503))
    async def approve(self, state: State, request: Request, refund_id: FromPath[uuid.UUID]) -> AdminRefundView:
        """Make a requested refund: reserved in the wallet, refunded to the card, settled. Exactly
        once: approving again answers with the refund as it stands. 409 `insufficient_funds` or
        `exceeds_refundable` if the money is no longer there (the request keeps waiting);
        409 `refund_not_requested` for a rejected one."""
        services = services_of(state)
        with as_api_errors():
            refund, approved_now = await flows.approve_refund(services, gateway_of(state), refund_id, request.user.id)
        if approved_now:  # one log row per refund, however many admins pressed approve at once
            await record_admin_action(services.sessions, admin_action(
                request, "refund_approved", "refund", refund_id, details=refund_details(refund)))
        return admin_refund_view(refund)

    @post("/{refund_id:uuid}/reject", status_code=200, responses=error_responses(400, 401, 403, 404, 409, 503))
    async def reject(
        self, state: State, request: Request, refund_id: FromPath[uuid.UUID], data: JSONBody[ReviewRejection]
    ) -> AdminRefundView:
        """Decline a requested refund with a reason the person is told; nothing was reserved, so
        nothing moves. 409 `refund_not_requested` once it was approved or rejected."""
        services = services_of(state)
        with as_api_errors():
            refund = await flows.reject_refund(services, refund_id, request.user.id, data.reason)
        await record_admin_action(services.sessions, admin_action(
            request, "refund_rejected", "refund", refund_id, details=refund_details(refund, reason=data.reason)))
        return admin_refund_view(refund)

"""KYC review for admins: the queue of submissions and the decision on one.

KYC has no actor (only the person and the admins write it, and a decision is guarded by the
submission still being `pending`), so a decision is one plain transaction holding the status
change, the person's notification (and its websocket event, recorded for catch-up like the
station-issue resolution in actors/notifications.py), the AdminActionLog row and the person's
UserAuditLog row: all of them or none.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy import select

from powerbank.actors import user_events
from powerbank.actors.notifications import notify_person
from powerbank.actors.runtime import ActorContext
from powerbank.http.admin_log import admin_action, client_ip
from powerbank.http.auth import BEARER_SECURITY, require_admin
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.routes_profile import last4
from powerbank.http.routes_staff import page_of
from powerbank.http.schemas_review import KycQueueItem, KycQueuePage, ReviewRejection
from powerbank.storage.models import User, UserKyc
from powerbank.storage.types import utcnow
from powerbank.storage.user_audit import record_user_action

KycStatusFilter = Annotated[str, QueryParameter(pattern="^(pending|approved|rejected)$", description="default pending")]


@dataclass(frozen=True)
class KycDecision:
    status: str  # approved or rejected
    reason: str | None = None


def kyc_review_refusal(kyc: UserKyc | None) -> ApiError | None:
    """Only a pending submission is decided: an approved one stays approved, a rejected one
    waits for the person to submit again (which makes it pending)."""
    if kyc is None:
        return ApiError(404, "kyc_not_found", "this person has not submitted documents")
    if kyc.status != "pending":
        return ApiError(409, "kyc_not_pending", f"the submission is {kyc.status}", kyc_status=kyc.status)
    return None


def kyc_item(kyc: UserKyc, phone: str | None) -> KycQueueItem:
    return KycQueueItem(
        user_id=kyc.user_id, phone=phone, status=kyc.status, document_type=kyc.document_type,
        document_number_last4=last4(kyc.document_number), full_name=kyc.full_name, date_of_birth=kyc.date_of_birth,
        document_front_id=kyc.document_front_id, document_back_id=kyc.document_back_id, selfie_id=kyc.selfie_id,
        submitted_at=kyc.submitted_at, reviewed_at=kyc.reviewed_at, reviewed_by=kyc.reviewed_by,
        rejection_reason=kyc.rejection_reason,
    )


def decision_notification(kyc: UserKyc, decision: KycDecision) -> tuple[str, dict, str]:
    """Kind, data and dedupe key: once per decision on one submission (a resubmission after a
    rejection is a new submission and is told its own outcome)."""
    kind = f"kyc_{decision.status}"
    data = {"kyc_status": decision.status, "reason": decision.reason or ""}
    return kind, data, f"{kind}:{kyc.id}:{kyc.submitted_at.isoformat()}"


async def decide_kyc(runtime, request: Request, user_id: uuid.UUID, decision: KycDecision) -> KycQueueItem:
    """Apply the decision, notify the person, log it for both sides, in one transaction; the
    person's websocket hears of it after the commit."""
    async with runtime.sessions.begin() as session:
        kyc = (await session.execute(
            select(UserKyc).where(UserKyc.user_id == user_id).with_for_update())).scalar_one_or_none()
        if (refusal := kyc_review_refusal(kyc)) is not None:
            raise refusal
        ctx = ActorContext(session=session, now=utcnow())
        kyc.status, kyc.rejection_reason = decision.status, decision.reason
        kyc.reviewed_at, kyc.reviewed_by = ctx.now, request.user.id
        kind, data, dedupe_key = decision_notification(kyc, decision)
        await notify_person(ctx, user_id, kind, data, dedupe_key=dedupe_key)
        details = {"decision": decision.status, **({"reason": decision.reason} if decision.reason else {})}
        session.add(admin_action(request, f"kyc_{decision.status}", "user", user_id, details=details))
        record_user_action(session, request.user.id, f"kyc_{decision.status}", target_type="kyc", target_id=kyc.id,
                           ip=client_ip(request), details={"user_id": str(user_id), "decision": decision.status})
        await user_events.record(session, ctx.notifications, ctx.now)
        phone = await session.scalar(select(User.phone).where(User.id == user_id))
        await session.flush()
        item = kyc_item(kyc, phone)
    if ctx.notifications:
        await runtime.bus.publish_many(ctx.notifications)
    return item


class AdminKycController(Controller):
    path = "/api/admin/kyc"
    tags = ["admin"]
    security = BEARER_SECURITY
    guards = [require_admin]
    dependencies = {"paging": Provide(provide_paging)}

    @get("/", responses=error_responses(400, 401, 403))
    async def queue(self, state: State, paging: NamedDependency[Paging], status: KycStatusFilter = "pending") -> KycQueuePage:
        """Submissions in this state, oldest first: the queue is worked from its front."""
        query = select(UserKyc).where(UserKyc.status == status)
        async with services_of(state).readonly() as session:
            rows, total = await page_of(session, query, paging, [UserKyc.submitted_at, UserKyc.id])
            phones = dict((await session.execute(
                select(User.id, User.phone).where(User.id.in_([r.user_id for r in rows])))).all())
        items = [kyc_item(r, phones.get(r.user_id)) for r in rows]
        return KycQueuePage(items=items, page=paging.page, page_size=paging.page_size, total=total)

    @post("/{user_id:uuid}/approve", status_code=200, responses=error_responses(400, 401, 403, 404, 409))
    async def approve(self, state: State, request: Request, user_id: FromPath[uuid.UUID]) -> KycQueueItem:
        """Approve a pending submission; the person is notified."""
        return await decide_kyc(services_of(state).runtime, request, user_id, KycDecision("approved"))

    @post("/{user_id:uuid}/reject", status_code=200, responses=error_responses(400, 401, 403, 404, 409))
    async def reject(
        self, state: State, request: Request, user_id: FromPath[uuid.UUID], data: JSONBody[ReviewRejection]
    ) -> KycQueueItem:
        """Reject a pending submission with a reason the person is shown; they may submit again."""
        return await decide_kyc(services_of(state).runtime, request, user_id, KycDecision("rejected", data.reason))

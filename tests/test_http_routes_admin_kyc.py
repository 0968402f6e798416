"""KYC review by admins over ASGI: the pending queue, approve and reject (only a pending
submission), the person's notification, and both audit logs."""

from __future__ import annotations

from sqlalchemy import select

from powerbank.http.auth import ensure_admin_token
from powerbank.http.routes_admin_kyc import kyc_review_refusal
from powerbank.http.testing import bearer, sign_up
from powerbank.storage.models import AdminActionLog, Notification, UserAuditLog, UserKyc


async def submit(client, phone: str, number: str = "PA1234567"):
    headers, user_id = await sign_up(client, phone)
    body = {"document_type": "passport", "document_number": number, "full_name": "Asha Karki"}
    response = await client.post("/api/auth/kyc", headers=headers, json=body)
    assert response.status_code == 201, response.text
    return headers, user_id


def test_only_a_pending_submission_is_decided():
    assert kyc_review_refusal(None).status_code == 404
    assert kyc_review_refusal(UserKyc(status="pending")) is None
    for status in ("approved", "rejected"):
        assert kyc_review_refusal(UserKyc(status=status)).error == "kyc_not_pending"


async def test_admin_works_the_queue_and_the_person_is_told(app_client, app_services):
    admin = bearer(await ensure_admin_token(app_services, "+9779800000001"))
    asha, asha_id = await submit(app_client, "+9779816100001", "PA0001111")
    _, bina_id = await submit(app_client, "+9779816100002", "PA0002222")

    queue = (await app_client.get("/api/admin/kyc?status=pending", headers=admin)).json()
    assert [i["user_id"] for i in queue["items"]] == [str(asha_id), str(bina_id)] and queue["total"] == 2
    assert queue["items"][0]["document_number_last4"] == "1111" and queue["items"][0]["phone"] == "+9779816100001"

    approved = await app_client.post(f"/api/admin/kyc/{asha_id}/approve", headers=admin)
    assert approved.status_code == 200 and approved.json()["status"] == "approved", approved.text
    assert (await app_client.get("/api/auth/kyc-status", headers=asha)).json()["status"] == "approved"
    again = await app_client.post(f"/api/admin/kyc/{asha_id}/approve", headers=admin)
    assert again.status_code == 409 and again.json()["error"] == "kyc_not_pending"

    no_reason = await app_client.post(f"/api/admin/kyc/{bina_id}/reject", headers=admin, json={})
    assert no_reason.status_code == 400
    rejected = await app_client.post(f"/api/admin/kyc/{bina_id}/reject", headers=admin, json={"reason": "blurry photo"})
    assert rejected.status_code == 200 and rejected.json()["rejection_reason"] == "blurry photo"
    assert (await app_client.get("/api/admin/kyc?status=pending", headers=admin)).json()["total"] == 0
    assert (await app_client.get("/api/admin/kyc?status=rejected", headers=admin)).json()["items"][0]["user_id"] == str(bina_id)

    async with app_services.readonly() as session:
        kinds = dict((await session.execute(select(Notification.user_id, Notification.kind))).all())
        assert kinds == {asha_id: "kyc_approved", bina_id: "kyc_rejected"}
        told = (await session.execute(select(Notification).where(Notification.user_id == bina_id))).scalar_one()
        assert "blurry photo" in told.body
        logged = (await session.execute(select(AdminActionLog.action, AdminActionLog.target_id))).all()
        assert sorted(logged) == sorted([("kyc_approved", str(asha_id)), ("kyc_rejected", str(bina_id))])
        audited = (await session.execute(select(UserAuditLog.action).where(UserAuditLog.action.like("kyc_%ed")))).scalars()
        assert sorted(audited) == ["kyc_approved", "kyc_rejected", "kyc_submitted", "kyc_submitted"]


async def test_riders_cannot_review_and_unknown_people_are_not_found(app_client, app_services):
    rider, rider_id = await submit(app_client, "+9779816100003")
    admin = bearer(await ensure_admin_token(app_services, "+9779800000001"))
    assert (await app_client.get("/api/admin/kyc", headers=rider)).status_code == 403
    assert (await app_client.post(f"/api/admin/kyc/{rider_id}/approve", headers=rider)).status_code == 403
    missing = await app_client.post("/api/admin/kyc/00000000-0000-4000-8000-000000000000/approve", headers=admin)
    assert missing.status_code == 404 and missing.json()["error"] == "kyc_not_found"

"""Devices, profile, KYC, usage statistics and account deletion, over ASGI."""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import func, select

from powerbank.http.routes_profile import deletion_refusal, kyc_patch_refusal, kyc_submit_refusal
from powerbank.http.testing import credit_wallet, insert_rental, sign_up
from powerbank.storage.ledger import ledger_discrepancies
from powerbank.storage.models import (
    LedgerTransfer,
    MediaUpload,
    Notification,
    OtpChallenge,
    RentalLocation,
    SmsFcmLog,
    User,
    UserAuditLog,
    UserDevice,
    UserKyc,
    UserProfile,
    Wallet,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


async def upload(client, headers, purpose: str) -> str:
    response = await client.post(
        "/api/app/upload", headers=headers, files={"file": ("a.png", PNG, "image/png")}, data={"purpose": purpose}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


# --- pure decisions ---------------------------------------------------------------------------


def test_kyc_and_deletion_rules():
    assert kyc_submit_refusal(None) is None and kyc_submit_refusal("rejected") is None
    assert kyc_submit_refusal("pending").error == "kyc_pending"
    assert kyc_submit_refusal("approved").error == "kyc_already_approved"
    assert kyc_patch_refusal(None).status_code == 404
    assert kyc_patch_refusal("rejected") is None and kyc_patch_refusal("approved").status_code == 409
    assert deletion_refusal(1, 0).error == "open_rentals"
    assert deletion_refusal(0, 500).error == "unpaid_dues"
    assert deletion_refusal(0, 0) is None


# --- devices ----------------------------------------------------------------------------------


async def test_device_register_then_update(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779816000001")
    device = {"device_id": "pixel-8", "platform": "android", "push_token": "fcm-1", "app_version": "1.2.0"}
    created = await app_client.post("/api/auth/device", headers=headers, json=device)
    assert created.status_code == 201 and created.json()["push_token_set"] is True
    again = await app_client.post("/api/auth/device", headers=headers, json={**device, "push_token": "fcm-2"})
    assert again.status_code == 200 and again.json()["id"] == created.json()["id"]
    updated = await app_client.put("/api/auth/device", headers=headers, json={**device, "app_version": "1.3.0"})
    assert updated.status_code == 200 and updated.json()["app_version"] == "1.3.0"
    unknown = await app_client.put("/api/auth/device", headers=headers, json={**device, "device_id": "other"})
    assert unknown.status_code == 404 and unknown.json()["error"] == "device_not_found"
    async with app_services.sessions() as session:
        row = (await session.execute(select(UserDevice).where(UserDevice.device_id == "pixel-8"))).scalar_one()
        actions = list((await session.execute(select(UserAuditLog.action).where(UserAuditLog.actor_id == user_id))).scalars())
    assert row.push_token == "fcm-1" and row.app_version == "1.3.0" and row.user_id == user_id  # the PUT sent fcm-1 again
    assert actions.count("device_registered") == 1 and actions.count("device_updated") == 2


# --- profile ----------------------------------------------------------------------------------


async def test_profile_get_put_patch(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779816000002")
    profile = (await app_client.get("/api/user/profile", headers=headers)).json()
    assert profile["phone"] == "+9779816000002" and profile["kyc_status"] == "not_submitted"
    avatar = await upload(app_client, headers, "avatar")
    put = await app_client.put(
        "/api/user/profile", headers=headers, json={"full_name": "Asha Karki", "email": "asha@example.org", "avatar_media_id": avatar}
    )
    assert put.status_code == 200 and put.json()["avatar_media_id"] == avatar
    patched = (await app_client.patch("/api/user/profile", headers=headers, json={"email": None})).json()
    assert patched["full_name"] == "Asha Karki" and patched["email"] is None
    replaced = (await app_client.put("/api/user/profile", headers=headers, json={"full_name": "Asha K"})).json()
    assert replaced["avatar_media_id"] is None  # PUT replaces: what is omitted is emptied
    bad = await app_client.patch("/api/user/profile", headers=headers, json={"email": "not-an-email"})
    assert bad.status_code == 400 and bad.json()["fields"][0]["field"] == "email"
    unknown = await app_client.patch("/api/user/profile", headers=headers, json={"phone": "+1555"})
    assert unknown.status_code == 400
    async with app_services.sessions() as session:
        details = list((await session.execute(
            select(UserAuditLog.details).where(UserAuditLog.actor_id == user_id, UserAuditLog.action == "profile_updated")
        )).scalars())
    assert {"fields": ["email"]} in details
    assert all("Asha" not in str(d) for d in details)  # names of fields, never values


async def test_profile_refuses_someone_elses_upload(app_client):
    alice, _ = await sign_up(app_client, "+9779816000003")
    bob, _ = await sign_up(app_client, "+9779816000004")
    alices = await upload(app_client, alice, "avatar")
    response = await app_client.patch("/api/user/profile", headers=bob, json={"avatar_media_id": alices})
    assert response.status_code == 404 and response.json()["error"] == "media_not_found"
    anonymous = await app_client.get("/api/user/profile")
    assert anonymous.status_code == 401


# --- KYC --------------------------------------------------------------------------------------


async def test_kyc_submit_status_and_patch(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779816000005")
    assert (await app_client.get("/api/auth/kyc-status", headers=headers)).json()["status"] == "not_submitted"
    assert (await app_client.patch("/api/auth/kyc", headers=headers, json={"full_name": "X"})).status_code == 404
    front = await upload(app_client, headers, "kyc")
    submission = {"document_type": "passport", "document_number": "PA1234567", "full_name": "Asha Karki", "document_front_id": front}
    submitted = await app_client.post("/api/auth/kyc", headers=headers, json=submission)
    assert submitted.status_code == 201, submitted.text
    assert submitted.json()["status"] == "pending" and submitted.json()["document_number_last4"] == "4567"
    again = await app_client.post("/api/auth/kyc", headers=headers, json=submission)
    assert again.status_code == 409 and again.json()["error"] == "kyc_pending"
    async with app_services.sessions.begin() as session:
        kyc = (await session.execute(select(UserKyc).where(UserKyc.user_id == user_id))).scalar_one()
        kyc.status, kyc.rejection_reason = "rejected", "blurry photo"
    status = (await app_client.get("/api/auth/kyc-status", headers=headers)).json()
    assert status["status"] == "rejected" and status["rejection_reason"] == "blurry photo"
    fixed = await app_client.patch("/api/auth/kyc", headers=headers, json={"document_number": "PA7654321"})
    assert fixed.status_code == 200 and fixed.json()["status"] == "pending" and fixed.json()["rejection_reason"] is None
    async with app_services.sessions.begin() as session:
        (await session.execute(select(UserKyc))).scalar_one().status = "approved"
    locked = await app_client.patch("/api/auth/kyc", headers=headers, json={"full_name": "Someone Else"})
    assert locked.status_code == 409 and locked.json()["error"] == "kyc_already_approved"
    assert (await app_client.get("/api/user/profile", headers=headers)).json()["kyc_status"] == "approved"


async def test_kyc_refuses_an_avatar_as_a_document(app_client):
    headers, _ = await sign_up(app_client, "+9779816000006")
    avatar = await upload(app_client, headers, "avatar")
    response = await app_client.post(
        "/api/auth/kyc", headers=headers,
        json={"document_type": "passport", "document_number": "PA1", "full_name": "A B", "selfie_id": avatar},
    )
    assert response.status_code == 404 and response.json()["error"] == "media_not_found"


# --- usage statistics -------------------------------------------------------------------------


async def test_usage_stats_count_the_callers_rentals_only(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779816000007")
    _, other = await sign_up(app_client, "+9779816000008")
    await credit_wallet(app_services, user_id, 10_000)
    await insert_rental(app_services, user_id, status="completed", serial="SN-U1")
    await insert_rental(app_services, user_id, status="completed", serial="SN-U1", quick_return=True)
    await insert_rental(app_services, user_id, status="cancelled", serial="SN-U2")
    await insert_rental(app_services, other, status="completed")
    stats = (await app_client.get("/api/user/analytics/usage-stats", headers=headers)).json()
    assert (stats["rentals_total"], stats["rentals_completed"], stats["rentals_cancelled"], stats["rentals_open"]) == (3, 2, 1, 0)
    assert stats["stations_used"] == 2 and stats["quick_returns"] == 1
    assert stats["charged_minor_total"] == 10_000 and stats["minutes_rented_total"] == 20
    assert stats["wallet_credits_minor"] == 10_000 and stats["currency"] == "NPR"
    assert stats["first_rental_at"] is not None


# --- account deletion ------------------------------------------------------------------------


async def test_account_deletion_erases_the_person_and_keeps_the_money(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779816000009")
    await app_client.put("/api/user/profile", headers=headers, json={"full_name": "Asha Karki", "email": "a@example.org"})
    front = await upload(app_client, headers, "kyc")
    await app_client.post("/api/auth/kyc", headers=headers, json={
        "document_type": "passport", "document_number": "PA1234567", "full_name": "Asha Karki", "document_front_id": front})
    await app_client.post("/api/auth/device", headers=headers, json={"device_id": "phone-1", "push_token": "t"})
    await credit_wallet(app_services, user_id, 7_000)
    rental = await insert_rental(app_services, user_id, status="completed")
    async with app_services.sessions.begin() as session:
        session.add(Notification(user_id=user_id, kind="promo", title="Hi", body="Hello"))
        session.add(RentalLocation(rental_id=rental.id, latitude=27.7, longitude=85.3, recorded_at=rental.started_at))
        transfers_before = await session.scalar(select(func.count()).select_from(LedgerTransfer))
        media_key = (await session.execute(select(MediaUpload.storage_key))).scalar_one()
    media_path = app_services.settings.data_dir / "media" / media_key
    assert media_path.exists()

    response = await app_client.delete("/api/auth/account", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "deleted"

    async with app_services.sessions() as session:
        user = await session.get(User, user_id)
        profile = await session.get(UserProfile, user_id)
        assert user.phone is None and user.status == "deleted"
        assert (profile.full_name, profile.email) == (None, None)
        for model in (UserKyc, MediaUpload, UserDevice, Notification, RentalLocation):
            assert await session.scalar(select(func.count()).select_from(model)) == 0, model
        # Money stays: the wallet, every ledger transfer, and the books still balance.
        assert (await session.execute(select(Wallet).where(Wallet.user_id == user_id))).scalar_one() is not None
        assert await session.scalar(select(func.count()).select_from(LedgerTransfer)) == transfers_before > 0
        assert await ledger_discrepancies(session) == []
        # Audit rows stay, none pointing at the person any more.
        audit = list((await session.execute(select(UserAuditLog))).scalars())
        assert {row.action for row in audit} >= {"kyc_submitted", "profile_updated", "account_deleted"}
        assert all(row.actor_id is None for row in audit)
        assert "Asha" not in str([row.details for row in audit])
        # The phone is nowhere: not in sign-in codes, not in the SMS log.
        assert await session.scalar(select(func.count()).select_from(OtpChallenge)) == 0
        assert "+9779816000009" not in str(list((await session.execute(select(SmsFcmLog.recipient, SmsFcmLog.body))).all()))
    assert not media_path.exists()
    # Every token stops working, and the phone can register again.
    assert (await app_client.get("/api/user/profile", headers=headers)).status_code == 401
    again, new_id = await sign_up(app_client, "+9779816000009")
    assert new_id != user_id


async def test_account_deletion_refused_while_a_bank_is_out(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779816000010")
    await insert_rental(app_services, user_id, status="active")
    response = await app_client.delete("/api/auth/account", headers=headers)
    assert response.status_code == 409 and response.json()["error"] == "open_rentals"
    async with app_services.sessions() as session:
        assert (await session.get(User, user_id)).phone == "+9779816000010"
    assert uuid.UUID((await app_client.get("/api/user/profile", headers=headers)).json()["user_id"]) == user_id


async def test_concurrent_kyc_submissions_leave_one(app_client, app_services):
    headers, user_id = await sign_up(app_client, "+9779816000011")
    submission = {"document_type": "national_id", "document_number": "NID-42", "full_name": "Ram Thapa"}
    responses = await asyncio.gather(*(app_client.post("/api/auth/kyc", headers=headers, json=submission) for _ in range(3)))
    assert sorted(r.status_code for r in responses) == [201, 409, 409]
    assert {r.json()["error"] for r in responses if r.status_code == 409} <= {"kyc_pending", "concurrent_update"}
    async with app_services.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(UserKyc).where(UserKyc.user_id == user_id)) == 1

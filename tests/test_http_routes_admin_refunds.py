"""Refund approval through the real `stripe` SDK against the local emulator, over real HTTP:
above the threshold a refund waits `requested` with nothing reserved or sent; approval makes it
exactly once; rejection closes it and tells the person; below the threshold nothing changes."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import httpx
import pytest
from sqlalchemy import func, select

from powerbank.actors import payments
from powerbank.http.app import create_app
from powerbank.http.auth import AuthPolicy, ensure_admin_token
from powerbank.http.testing import bearer, running_services, serve, settings_for_tests
from powerbank.payment_gateway import StripeGateway
from powerbank.simulators.stripe_emulator import StripeEmulator
from powerbank.storage.audit import audit
from powerbank.storage.ledger import ledger_discrepancies
from powerbank.storage.models import AdminActionLog, Notification, Refund

POLICY = AuthPolicy(otp_echo=True, otp_rate_per_ip=1000)
THRESHOLD = 3000
_phones = itertools.count(9812000000)


class Env:
    def __init__(self, emu, services, client):
        self.emu, self.services, self.client = emu, services, client

    def provider_refunds(self) -> list[dict]:
        return [o for o in self.emu.state.objects.values() if isinstance(o, dict) and o.get("object") == "refund"]

    async def refund_row(self, refund_id) -> Refund:
        async with self.services.readonly() as session:
            return await session.get(Refund, uuid.UUID(str(refund_id)))


@pytest.fixture
async def env(database_url, tmp_path):
    async with StripeEmulator(seed=12) as emu:
        settings = settings_for_tests(tmp_path, database_url, stripe_secret_key=emu.api_key,
                                      stripe_api_base=emu.api_base, refund_approval_above_minor=THRESHOLD)
        async with running_services(settings) as services:
            gateway = StripeGateway(emu.api_key, emu.api_base)
            try:
                async with serve(create_app(services, auth_policy=POLICY, payment_gateway=gateway)) as base_url:
                    async with httpx.AsyncClient(base_url=base_url, timeout=20) as client:
                        yield Env(emu, services, client)
            finally:
                await gateway.close()


async def rider_with_topup(env: Env, amount_minor: int = 5000) -> tuple[dict[str, str], str]:
    phone = f"+977{next(_phones)}"
    code = (await env.client.post("/api/auth/get-otp", json={"phone": phone, "purpose": "register"})).json()["debug_code"]
    auth = bearer((await env.client.post("/api/auth/register", json={"phone": phone, "code": code})).json()["access_token"])
    created = await env.client.post("/api/payment/wallet/topup-intent", headers=auth,
                                    json={"amount_minor": amount_minor, "currency": "NPR"})
    verified = await env.client.post("/api/payment/verify-topup", headers=auth, json={
        "intent_id": created.json()["intent"]["intent_id"], "payment_method": "pm_card_visa"})
    assert verified.json()["intent"]["status"] == "confirmed", verified.text
    return auth, verified.json()["transaction_id"]


async def balance(env: Env, auth) -> int:
    return (await env.client.get("/api/user/wallet", headers=auth)).json()["balance_minor"]


def test_only_refunds_above_the_threshold_wait_and_only_requested_ones_are_decided():
    assert not payments.needs_approval(3000, 3000) and payments.needs_approval(3001, 3000)
    assert payments.refund_review_refusal("requested") is None
    for status in ("pending", "succeeded", "failed", "rejected"):
        assert payments.refund_review_refusal(status) == "refund_not_requested"


async def test_a_large_refund_waits_and_is_made_once_on_approval(env):
    admin = bearer(await ensure_admin_token(env.services, "+9779800000001"))
    auth, txn = await rider_with_topup(env, 5000)
    small = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"amount_minor": 1000})
    assert small.status_code == 201 and small.json()["status"] == "succeeded", small.text  # unchanged below
    asked = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"idempotency_key": "big"})
    assert asked.status_code == 201 and asked.json()["status"] == "requested", asked.text
    refund_id = asked.json()["refund_id"]
    assert asked.json()["amount_minor"] == 4000 and await balance(env, auth) == 4000 and len(env.provider_refunds()) == 1
    repeat = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"idempotency_key": "big"})
    assert repeat.json() == asked.json() and len(env.provider_refunds()) == 1
    second = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"amount_minor": 100})
    assert second.status_code == 409 and second.json()["error"] == "exceeds_refundable"  # promised to the request

    rider_sees = await env.client.get("/api/admin/refunds", headers=auth)
    assert rider_sees.status_code == 403
    queue = (await env.client.get("/api/admin/refunds?status=requested", headers=admin)).json()
    assert [r["refund_id"] for r in queue["items"]] == [refund_id] and queue["total"] == 1

    approvals = await asyncio.gather(*[
        env.client.post(f"/api/admin/refunds/{refund_id}/approve", headers=admin) for _ in range(3)])
    assert {a.status_code for a in approvals} == {200}, [a.text for a in approvals]
    assert {a.json()["status"] for a in approvals} == {"succeeded"}
    again = await env.client.post(f"/api/admin/refunds/{refund_id}/approve", headers=admin)
    assert again.status_code == 200 and again.json()["status"] == "succeeded"
    assert sorted(r["amount"] for r in env.provider_refunds()) == [1000, 4000]  # the provider was asked once
    assert await balance(env, auth) == 0
    row = await env.refund_row(refund_id)
    assert row.status == "succeeded" and row.reviewed_by is not None and row.reviewed_at is not None
    late_reject = await env.client.post(f"/api/admin/refunds/{refund_id}/reject", headers=admin, json={"reason": "no"})
    assert late_reject.status_code == 409 and late_reject.json()["error"] == "refund_not_requested"
    async with env.services.readonly() as session:
        assert await ledger_discrepancies(session) == []
        logged = (await session.execute(select(AdminActionLog.action).where(AdminActionLog.target_id == refund_id))).scalars()
        assert list(logged) == ["refund_approved"]
    assert await audit(env.services.sessions) == {}


async def test_a_rejected_refund_closes_with_the_reason_and_nothing_moves(env):
    admin = bearer(await ensure_admin_token(env.services, "+9779800000001"))
    auth, txn = await rider_with_topup(env, 5000)
    asked = (await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"reason": "changed my mind"})).json()
    refund_id = asked["refund_id"]
    assert (await env.client.post(f"/api/admin/refunds/{refund_id}/reject", headers=admin, json={})).status_code == 400
    rejected = await env.client.post(f"/api/admin/refunds/{refund_id}/reject", headers=admin, json={"reason": "used for rentals"})
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected", rejected.text
    assert rejected.json()["rejection_reason"] == "used for rentals"
    approve = await env.client.post(f"/api/admin/refunds/{refund_id}/approve", headers=admin)
    assert approve.status_code == 409 and approve.json()["error"] == "refund_not_requested"
    assert env.provider_refunds() == [] and await balance(env, auth) == 5000
    missing = await env.client.post("/api/admin/refunds/00000000-0000-4000-8000-000000000000/approve", headers=admin)
    assert missing.status_code == 404 and missing.json()["error"] == "refund_not_found"
    async with env.services.readonly() as session:
        told = (await session.execute(select(Notification).where(Notification.kind == "refund_rejected"))).scalar_one()
        assert "used for rentals" in told.body
        assert await session.scalar(select(func.count()).select_from(AdminActionLog).where(
            AdminActionLog.action == "refund_rejected")) == 1
    # The money the request had promised is free again.
    redo = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"amount_minor": 2000})
    assert redo.status_code == 201 and redo.json()["status"] == "succeeded"

"""Card top-ups, webhooks, cancel, refunds, reconciliation and auto-refill through the real
`stripe` SDK against the local emulator, over real HTTP (the emulator delivers signed webhooks to
the app served by uvicorn), on SQLite and (marked) PostgreSQL. Issue 5, acceptance 2 and 5."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from powerbank import payment_flows as flows
from powerbank.actors import payments
from powerbank.actors.runtime import handles
from powerbank.actors.wallet import load_wallet_and_account
from powerbank.http.app import create_app
from powerbank.http.auth import AuthPolicy
from powerbank.http.testing import running_services, serve, settings_for_tests
from powerbank.payment_gateway import GatewayError, StripeGateway
from powerbank.simulators.stripe_emulator import StripeEmulator, WebhookOptions, stripe_signature_header
from powerbank.storage import ledger
from powerbank.storage.audit import audit
from powerbank.storage.ledger import ledger_discrepancies
from powerbank.storage.models import (
    LedgerTransfer,
    PaymentCustomer,
    PaymentIntent,
    PaymentWebhook,
    PowerBank,
    Refund,
    Rental,
    RentalPackage,
    Station,
    StationSlot,
    Transaction,
)
from powerbank.storage.types import utcnow

POLICY = AuthPolicy(otp_echo=True, otp_rate_per_ip=1000)
SECRET = "whsec_test_payments"
_phones = itertools.count(9811000000)


# --- pure decisions ---------------------------------------------------------------------------


def test_intent_status_is_the_same_whatever_the_order_of_observations():
    observed = ["waiting", "preauth", "confirmed", "rejected", "waiting", "error"]
    finals = set()
    for order in itertools.permutations(observed):
        status = "waiting"
        for seen in order:
            status = payments.next_status(status, seen)
        finals.add(status)
    assert finals == {"confirmed"}


def test_credit_happens_only_on_the_first_arrival_at_confirmed():
    assert payments.credits_now("waiting", "confirmed")
    assert payments.credits_now("rejected", "confirmed")  # the provider took the money: it is credited
    assert not payments.credits_now("confirmed", "confirmed")
    assert not payments.credits_now("refunded", "refunded")
    assert payments.next_status("confirmed", "rejected") == "confirmed"
    assert payments.status_from_provider("something_new") == "error"


def test_refund_limits():
    def refusal(**changes):
        base = dict(transaction_type="topup", transaction_status="succeeded", captured_minor=5000,
                    refunded_minor=2000, requested_minor=3000, wallet_available_minor=9000)
        return payments.refund_refusal(payments.RefundRequest(**{**base, **changes}))

    assert refusal() is None
    assert refusal(requested_minor=3001) == "exceeds_refundable"
    assert refusal(requested_minor=0) == "invalid_amount"
    assert refusal(wallet_available_minor=2999) == "insufficient_funds"
    assert refusal(transaction_type="rental") == "not_refundable"


def test_auto_refill_decision():
    setting = payments.RefillSetting(enabled=True, threshold_minor=1000, amount_minor=5000, saved_payment_method="pm_1")
    assert payments.auto_refill_amount(setting, 999) == 5000
    assert payments.auto_refill_amount(setting, 1000) == 0
    assert payments.auto_refill_amount(payments.RefillSetting(True, 1000, 5000, None), 0) == 0
    assert payments.auto_refill_amount(payments.RefillSetting(False, 1000, 5000, "pm_1"), 0) == 0
    user = uuid.uuid4()
    assert payments.auto_refill_key(user, 10) == payments.auto_refill_key(user, 10) != payments.auto_refill_key(user, 11)


def test_a_card_rentals_fee_is_captured_up_to_the_hold_and_the_rest_is_a_due():
    assert payments.card_charge(3000, 5000) == payments.CardCharge(capture_minor=3000, due_minor=0)
    assert payments.card_charge(8000, 5000) == payments.CardCharge(capture_minor=5000, due_minor=3000)
    assert payments.card_charge(0, 5000) == payments.CardCharge(capture_minor=0, due_minor=0)


def test_what_a_card_rentals_hold_needs():
    assert payments.card_hold_action("cancelled", "preauth", settled=False) == "cancel"
    assert payments.card_hold_action("cancelled", "rejected", settled=False) is None
    assert payments.card_hold_action("active", "preauth", settled=False) is None
    assert payments.card_hold_action("completed", "preauth", settled=True) == "capture"
    assert payments.card_hold_action("lost", "confirmed", settled=False) == "settle"
    assert payments.card_hold_action("completed", "confirmed", settled=True) is None


# --- the system through HTTP and the SDK ----------------------------------------------------


@dataclass
class Env:
    emu: StripeEmulator
    services: object
    gateway: StripeGateway
    client: httpx.AsyncClient
    base_url: str

    def webhook(self, options: WebhookOptions | None = None) -> None:
        self.emu.add_webhook_endpoint(f"{self.base_url}/api/payment/webhook/stripe", SECRET, options=options)

    async def count(self, model, *where) -> int:
        async with self.services.readonly() as session:
            return await session.scalar(select(func.count()).select_from(model).where(*where)) or 0


@pytest.fixture
async def env(database_url, tmp_path):
    async with StripeEmulator(seed=11) as emu:
        settings = settings_for_tests(tmp_path, database_url, stripe_secret_key=emu.api_key,
                                      stripe_webhook_secret=SECRET, stripe_api_base=emu.api_base,
                                      rental_start_timeout_ms=1500)
        async with running_services(settings) as services:
            gateway = StripeGateway(emu.api_key, emu.api_base)
            try:
                async with serve(create_app(services, auth_policy=POLICY, payment_gateway=gateway)) as base_url:
                    async with httpx.AsyncClient(base_url=base_url, timeout=20) as client:
                        yield Env(emu, services, gateway, client, base_url)
            finally:
                await gateway.close()


async def sign_up(client) -> dict[str, str]:
    phone = f"+977{next(_phones)}"
    code = (await client.post("/api/auth/get-otp", json={"phone": phone, "purpose": "register"})).json()["debug_code"]
    response = await client.post("/api/auth/register", json={"phone": phone, "code": code})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def start_topup(env: Env, auth, amount_minor=5000, **extra) -> dict:
    response = await env.client.post("/api/payment/wallet/topup-intent", headers=auth,
                                     json={"amount_minor": amount_minor, "currency": "NPR", **extra})
    assert response.status_code == 201, response.text
    return response.json()


async def balance(env: Env, auth) -> int:
    return (await env.client.get("/api/user/wallet", headers=auth)).json()["balance_minor"]


async def topped_up(env: Env, auth, amount_minor=5000, **extra) -> dict:
    created = await start_topup(env, auth, amount_minor, **extra)
    verified = await env.client.post("/api/payment/verify-topup", headers=auth,
                                     json={"intent_id": created["intent"]["intent_id"], "payment_method": "pm_card_visa"})
    assert verified.status_code == 200, verified.text
    assert verified.json()["intent"]["status"] == "confirmed"
    return verified.json()


async def test_methods_are_listed_by_priority(env):
    auth = await sign_up(env.client)
    methods = (await env.client.get("/api/payment/methods", headers=auth)).json()
    assert [m["code"] for m in methods] == ["stripe"]
    assert methods[0]["currencies"] == ["NPR"]


async def test_topup_happy_path_credits_once_and_lists_the_transaction(env):
    auth = await sign_up(env.client)
    status = await topped_up(env, auth, 5000)
    assert status["transaction_id"] is not None
    assert await balance(env, auth) == 5000
    # Verify again: nothing more.
    again = await env.client.post("/api/payment/verify-topup", headers=auth, json={"intent_id": status["intent"]["intent_id"]})
    assert again.status_code == 200 and await balance(env, auth) == 5000
    page = (await env.client.get("/api/user/transactions", headers=auth)).json()
    assert page["total"] == 1 and page["items"][0]["type"] == "topup" and page["items"][0]["amount_minor"] == 5000
    assert await audit(env.services.sessions) == {}


async def test_each_webhook_three_times_shuffled_and_delayed_credits_exactly_once(env):
    env.webhook(WebhookOptions(duplicates=2, shuffle=True, delay_ms=(0, 150), concurrency=3))  # copies race each other
    auth = await sign_up(env.client)
    created = await start_topup(env, auth, 7000)
    # The app confirms with Stripe itself (client_secret); we never call verify: webhooks alone.
    await env.gateway.confirm(created["intent"]["provider_intent_id"], "pm_card_visa", "client-confirm")
    await env.emu.wait_for_deliveries_async(timeout_s=20)
    ok = [d for d in env.emu.deliveries if d.ok]
    events = {d.event_id for d in ok}
    assert len(ok) == 3 * len(events) and len(events) >= 3
    assert await balance(env, auth) == 7000
    assert await env.count(Transaction) == 1
    assert await env.count(LedgerTransfer, LedgerTransfer.kind == "topup") == 1
    assert await env.count(PaymentWebhook) == len(events)
    status = (await env.client.get(f"/api/payment/status/{created['intent']['intent_id']}", headers=auth)).json()
    assert status["intent"]["status"] == "confirmed" and status["webhook_events"] >= 2
    # The verify call after the webhooks changes nothing either.
    await env.client.post("/api/payment/verify-topup", headers=auth, json={"intent_id": created["intent"]["intent_id"]})
    assert await balance(env, auth) == 7000 and await env.count(Transaction) == 1
    assert await audit(env.services.sessions) == {}


async def test_bad_signature_or_stale_timestamp_is_400_and_writes_nothing(env):
    auth = await sign_up(env.client)
    created = await start_topup(env, auth, 3000)
    provider = await env.gateway.confirm(created["intent"]["provider_intent_id"], "pm_card_visa", "k")
    event = {"id": "evt_forged", "object": "event", "type": "payment_intent.succeeded",
             "data": {"object": {"id": provider.id, "object": "payment_intent", "status": "succeeded", "amount": 3000,
                                 "amount_received": 3000, "currency": "npr",
                                 "metadata": {"intent_id": created["intent"]["intent_id"]}}}}
    body = json.dumps(event).encode()
    now = int(time.time())
    for header in (stripe_signature_header(body, "whsec_wrong", now),
                   stripe_signature_header(body, SECRET, now - 3600),
                   stripe_signature_header(body, SECRET, now + 3600),
                   "garbage", None):
        headers = {"Content-Type": "application/json"} | ({"Stripe-Signature": header} if header else {})
        response = await env.client.post("/api/payment/webhook/stripe", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_signature"
    assert await env.count(PaymentWebhook) == 0
    assert await env.count(Transaction) == 0 and await balance(env, auth) == 0
    # The same body, signed properly, is applied once.
    good = {"Stripe-Signature": stripe_signature_header(body, SECRET, now), "Content-Type": "application/json"}
    first = await env.client.post("/api/payment/webhook/stripe", content=body, headers=good)
    second = await env.client.post("/api/payment/webhook/stripe", content=body, headers=good)
    assert first.json() == {"received": True, "duplicate": False} and second.json()["duplicate"] is True
    assert await balance(env, auth) == 3000
    unknown = await env.client.post("/api/payment/webhook/paypal", content=body, headers=good)
    assert unknown.status_code == 404


async def test_bad_input_everywhere_is_a_clear_4xx_and_writes_nothing(env):
    auth = await sign_up(env.client)
    other = await sign_up(env.client)
    bad_bodies = [
        {"amount_minor": 0, "currency": "NPR"},
        {"amount_minor": -500, "currency": "NPR"},
        {"amount_minor": 10**13, "currency": "NPR"},
        {"amount_minor": 12.5, "currency": "NPR"},
        {"amount_minor": "5.5", "currency": "NPR"},
        {"amount_minor": None, "currency": "NPR"},
        {"amount_minor": 500, "currency": "npr"},
        {"amount_minor": 500},
        {"amount_minor": 500, "currency": "NPR", "amount": 1},
    ]
    for body in bad_bodies:
        response = await env.client.post("/api/payment/wallet/topup-intent", headers=auth, json=body)
        assert response.status_code == 400 and response.json()["error"] == "validation_failed", (body, response.text)
    refusals = [
        ({"amount_minor": 500, "currency": "USD"}, "unsupported_currency"),
        ({"amount_minor": 500, "currency": "XYZ"}, "unsupported_currency"),
        ({"amount_minor": 50, "currency": "NPR"}, "amount_out_of_range"),
        ({"amount_minor": 10**11, "currency": "NPR"}, "amount_out_of_range"),
        ({"amount_minor": 500, "currency": "NPR", "method": "paypal"}, "unknown_payment_method"),
    ]
    for body, code in refusals:
        response = await env.client.post("/api/payment/wallet/topup-intent", headers=auth, json=body)
        assert response.status_code == 400 and response.json()["error"] == code, (body, response.text)
    assert await env.count(PaymentIntent) == 0
    assert (await env.client.post("/api/payment/wallet/topup-intent", json={"amount_minor": 500, "currency": "NPR"})).status_code == 401

    status = await topped_up(env, auth, 4000)
    intent_id, txn_id = status["intent"]["intent_id"], status["transaction_id"]
    intents, refunds = await env.count(PaymentIntent), await env.count(Refund)
    # Someone else's intent and transaction look exactly like missing ones.
    for method, path, body in [
        ("GET", f"/api/payment/status/{intent_id}", None),
        ("POST", f"/api/payment/cancel/{intent_id}", None),
        ("POST", "/api/payment/verify-topup", {"intent_id": intent_id, "payment_method": "pm_card_visa"}),
        ("POST", f"/api/payment/refund/{txn_id}", {"amount_minor": 100}),
        ("GET", f"/api/payment/status/{uuid.uuid4()}", None),
        ("POST", f"/api/payment/refund/{uuid.uuid4()}", {}),
    ]:
        response = await env.client.request(method, path, headers=other, json=body)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"] in ("intent_not_found", "transaction_not_found")
    for body in ({"amount_minor": 0}, {"amount_minor": -1}, {"amount_minor": 1.5}, {"amount_minor": 10**13}):
        response = await env.client.post(f"/api/payment/refund/{txn_id}", headers=auth, json=body)
        assert response.status_code == 400, response.text
    assert (await env.client.get("/api/payment/status/not-a-uuid", headers=auth)).status_code in (400, 404)
    assert (await env.count(PaymentIntent), await env.count(Refund)) == (intents, refunds)
    assert await balance(env, auth) == 4000 and await balance(env, other) == 0


async def test_a_declined_card_leaves_the_intent_waiting_and_another_card_pays(env):
    auth = await sign_up(env.client)
    created = await start_topup(env, auth, 2500)
    intent_id = created["intent"]["intent_id"]
    declined = await env.client.post("/api/payment/verify-topup", headers=auth,
                                     json={"intent_id": intent_id, "payment_method": "pm_card_chargeDeclined"})
    assert declined.status_code == 402 and declined.json()["error"] == "payment_declined"
    status = (await env.client.get(f"/api/payment/status/{intent_id}", headers=auth)).json()
    assert status["intent"]["status"] == "waiting" and status["intent"]["failure_code"] == "generic_decline"
    paid = await env.client.post("/api/payment/verify-topup", headers=auth,
                                 json={"intent_id": intent_id, "payment_method": "pm_card_visa"})
    assert paid.json()["intent"]["status"] == "confirmed" and await balance(env, auth) == 2500


async def test_cancel_before_payment_and_not_after(env):
    auth = await sign_up(env.client)
    created = await start_topup(env, auth, 1500)
    intent_id = created["intent"]["intent_id"]
    cancelled = await env.client.post(f"/api/payment/cancel/{intent_id}", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["intent"]["status"] == "rejected"
    again = await env.client.post(f"/api/payment/cancel/{intent_id}", headers=auth)
    assert again.status_code == 409 and again.json()["error"] == "intent_not_cancellable"
    paid = await topped_up(env, auth, 1500)
    response = await env.client.post(f"/api/payment/cancel/{paid['intent']['intent_id']}", headers=auth)
    assert response.status_code == 409 and response.json()["intent_status"] == "confirmed"
    assert await balance(env, auth) == 1500


async def test_refunds_up_to_what_was_paid_and_never_more(env):
    auth = await sign_up(env.client)
    status = await topped_up(env, auth, 5000)
    txn = status["transaction_id"]
    first = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"amount_minor": 2000, "idempotency_key": "r1"})
    assert first.status_code == 201 and first.json()["status"] == "succeeded", first.text
    repeat = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"amount_minor": 2000, "idempotency_key": "r1"})
    assert repeat.json()["refund_id"] == first.json()["refund_id"]
    changed = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"amount_minor": 1000, "idempotency_key": "r1"})
    assert changed.json()["refund_id"] == first.json()["refund_id"] and changed.json()["amount_minor"] == 2000
    assert await balance(env, auth) == 3000
    over = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"amount_minor": 3001})
    assert over.status_code == 409 and over.json()["error"] == "exceeds_refundable" and over.json()["refundable_minor"] == 3000
    rest = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={})
    assert rest.status_code == 201 and rest.json()["amount_minor"] == 3000
    assert await balance(env, auth) == 0
    none_left = await env.client.post(f"/api/payment/refund/{txn}", headers=auth, json={"amount_minor": 1})
    assert none_left.status_code == 409 and none_left.json()["error"] == "exceeds_refundable"
    refunds = (await env.client.get("/api/payment/refunds", headers=auth)).json()
    assert refunds["total"] == 2 and {r["status"] for r in refunds["items"]} == {"succeeded"}
    history = (await env.client.get("/api/user/transactions", headers=auth)).json()["items"]
    assert sorted((t["type"], t["amount_minor"], t["status"]) for t in history) == [
        ("refund", 2000, "succeeded"), ("refund", 3000, "succeeded"), ("topup", 5000, "succeeded")]
    not_again = await env.client.post(f"/api/payment/refund/{history[0]['transaction_id']}", headers=auth, json={})
    assert not_again.status_code == 409
    provider_refunds = env.emu.state.refunds if hasattr(env.emu.state, "refunds") else None
    if provider_refunds is not None:
        assert sum(r["amount"] for r in provider_refunds.values()) == 5000
    status = (await env.client.get(f"/api/payment/status/{status['intent']['intent_id']}", headers=auth)).json()
    assert status["intent"]["status"] == "refunded"
    assert await audit(env.services.sessions) == {}


@handles("wallet", "TestSpend")
async def _test_spend(ctx, user_id, payload):
    """Stands in for a rental charge (money-core's CaptureHold): wallet -> platform revenue."""
    wallet, account = await load_wallet_and_account(ctx, user_id)
    revenue = await ledger.system_account(ctx.session, "platform_revenue", wallet.currency)
    await ledger.transfer(ctx.session, transfer_id=uuid.uuid4(), debit=account, credit=revenue,
                          amount_minor=payload["amount_minor"], kind="rental_charge")
    return {"ok": True}


async def test_a_refund_of_money_no_longer_in_the_wallet_is_refused(env):
    auth = await sign_up(env.client)
    status = await topped_up(env, auth, 5000)
    async with env.services.readonly() as session:
        user_id = (await session.get(Transaction, uuid.UUID(status["transaction_id"]))).user_id
    assert (await env.services.runtime.call("wallet", str(user_id), "TestSpend", {"amount_minor": 4000}))["ok"]
    response = await env.client.post(f"/api/payment/refund/{status['transaction_id']}", headers=auth, json={"amount_minor": 2000})
    assert response.status_code == 409 and response.json()["error"] == "insufficient_funds"
    assert await env.count(Refund) == 0 and await balance(env, auth) == 1000
    partial = await env.client.post(f"/api/payment/refund/{status['transaction_id']}", headers=auth, json={"amount_minor": 1000})
    assert partial.status_code == 201 and await balance(env, auth) == 0


async def test_reconciliation_repairs_a_missed_webhook(env):
    auth = await sign_up(env.client)
    created = await start_topup(env, auth, 6000)
    # Paid at the provider, but no webhook endpoint is configured and nobody calls verify.
    await env.gateway.confirm(created["intent"]["provider_intent_id"], "pm_card_visa", "client-confirm")
    assert await balance(env, auth) == 0
    report = await flows.reconcile(env.services, env.gateway)
    assert report["repaired"] == 1 and await balance(env, auth) == 6000
    assert (await flows.reconcile(env.services, env.gateway))["repaired"] == 0
    assert await env.count(Transaction) == 1
    assert await env.count(PaymentWebhook, PaymentWebhook.source == "reconciliation") == 1


async def test_auto_refill_charges_the_saved_card_once_below_the_threshold(env):
    auth = await sign_up(env.client)
    refused = await env.client.put("/api/payment/auto-refill", headers=auth,
                                   json={"enabled": True, "threshold_minor": 6000, "amount_minor": 3000})
    assert refused.status_code == 409 and refused.json()["error"] == "no_saved_card"
    await topped_up(env, auth, 5000, save_card=True)
    async with env.services.readonly() as session:
        customer = (await session.execute(select(PaymentCustomer))).scalar_one()
    assert customer.saved_payment_method_id
    enabled = await env.client.put("/api/payment/auto-refill", headers=auth,
                                   json={"enabled": True, "threshold_minor": 6000, "amount_minor": 3000})
    assert enabled.status_code == 200, enabled.text
    first = await flows.auto_refill(env.services, env.gateway, customer.user_id)
    again = await flows.auto_refill(env.services, env.gateway, customer.user_id)
    assert first is not None and again is None
    assert await balance(env, auth) == 8000
    kinds = [t["type"] for t in (await env.client.get("/api/user/transactions", headers=auth)).json()["items"]]
    assert sorted(kinds) == ["auto_refill", "topup"]


class FlakyRefunds:
    """The gateway, with the provider's answer to the first refund lost (a timeout)."""

    def __init__(self, gateway: StripeGateway) -> None:
        self.inner, self.code, self.lost = gateway, gateway.code, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def refund(self, provider_intent_id, amount_minor, idempotency_key, metadata=None):
        if self.lost == 0:
            self.lost += 1
            await self.inner.refund(provider_intent_id, amount_minor, idempotency_key, metadata)  # it did happen at Stripe
            raise GatewayError("timeout", "no answer", None)
        return await self.inner.refund(provider_intent_id, amount_minor, idempotency_key, metadata)


async def test_a_refund_whose_answer_was_lost_is_settled_by_reconciliation_without_a_second_refund(env, monkeypatch):
    auth = await sign_up(env.client)
    status = await topped_up(env, auth, 5000)
    async with env.services.readonly() as session:
        user_id = (await session.get(Transaction, uuid.UUID(status["transaction_id"]))).user_id
    flaky = FlakyRefunds(env.gateway)
    refund = await flows.refund_transaction(env.services, flaky, user_id, uuid.UUID(status["transaction_id"]), 1500, None, "k1")
    assert refund.status == "pending" and await balance(env, auth) == 3500
    monkeypatch.setattr(flows, "REFUND_RETRY_AFTER", timedelta(0))
    report = await flows.reconcile(env.services, flaky)
    assert report["refunds_retried"] == 1
    async with env.services.readonly() as session:
        assert (await session.get(Refund, refund.id)).status == "succeeded"
    provider_refunds = await env.gateway.client.v1.refunds.list_async(params={"payment_intent": status["intent"]["provider_intent_id"]})
    assert [r.amount for r in provider_refunds.data] == [1500]  # the same idempotency key: one refund at Stripe
    assert await balance(env, auth) == 3500


async def test_an_auto_refill_declined_by_the_saved_card_charges_nothing_and_is_not_retried(env):
    auth = await sign_up(env.client)
    await topped_up(env, auth, 5000, save_card=True)
    # The saved card has since started failing (Stripe's test token for a declined card).
    async with env.services.sessions.begin() as session:
        customer = (await session.execute(select(PaymentCustomer))).scalar_one()
        customer.saved_payment_method_id = "pm_card_chargeDeclined"
        customer.auto_refill, customer.auto_refill_threshold_minor, customer.auto_refill_amount_minor = True, 6000, 3000
        user_id = customer.user_id
    intent_id = await flows.auto_refill(env.services, env.gateway, user_id)
    assert intent_id is not None
    assert await flows.auto_refill(env.services, env.gateway, user_id) == intent_id  # the same intent: no second charge
    assert await flows.auto_refill_sweep(env.services, env.gateway) == 1  # finds it again, charges nothing new
    async with env.services.readonly() as session:
        intent = await session.get(PaymentIntent, intent_id)
        assert await session.scalar(select(func.count()).select_from(PaymentIntent).where(PaymentIntent.purpose == "auto_refill")) == 1
    assert intent.status in ("waiting", "error") and await balance(env, auth) == 5000


async def test_a_card_hold_is_preauthorised_then_captured_in_part_without_touching_the_wallet(env):
    auth = await sign_up(env.client)
    await topped_up(env, auth, 5000, save_card=True)
    async with env.services.readonly() as session:
        user_id = (await session.execute(select(PaymentCustomer))).scalar_one().user_id
    rental_key = str(uuid.uuid4())
    hold = await flows.place_card_hold(env.services, env.gateway, user_id, 8000, rental_key)
    assert hold.status == "preauth" and hold.purpose == "rental_hold"
    assert (await flows.place_card_hold(env.services, env.gateway, user_id, 8000, rental_key)).id == hold.id
    with pytest.raises(flows.PaymentProblem) as too_much:
        await flows.capture_card_hold(env.services, env.gateway, user_id, hold.id, 8001)
    assert too_much.value.code == "amount_out_of_range"
    captured = await flows.capture_card_hold(env.services, env.gateway, user_id, hold.id, 3000)
    assert captured.status == "confirmed" and captured.amount_received_minor == 3000
    assert await balance(env, auth) == 5000  # paid from the card, not the wallet
    history = (await env.client.get("/api/user/transactions", headers=auth)).json()["items"]
    assert sorted((t["type"], t["amount_minor"]) for t in history) == [("rental", 3000), ("topup", 5000)]
    refused = await env.client.post(f"/api/payment/refund/{[t for t in history if t['type'] == 'rental'][0]['transaction_id']}",
                                    headers=auth, json={})
    assert refused.status_code == 409 and refused.json()["error"] == "not_refundable"
    voided = await flows.place_card_hold(env.services, env.gateway, user_id, 2000, str(uuid.uuid4()))
    assert (await flows.capture_card_hold(env.services, env.gateway, user_id, voided.id, 0)).status == "rejected"
    assert await audit(env.services.sessions) == {}


async def test_the_scheduler_job_reconciles_at_once_on_start(env):
    from powerbank.processes import run_payment_jobs

    auth = await sign_up(env.client)
    created = await start_topup(env, auth, 4200)
    await env.gateway.confirm(created["intent"]["provider_intent_id"], "pm_card_visa", "client-confirm")
    job = asyncio.create_task(run_payment_jobs(env.services))
    try:
        for _ in range(200):
            if await balance(env, auth) == 4200:
                break
            await asyncio.sleep(0.05)
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
    assert await balance(env, auth) == 4200


def signed_event(event_id: str, intent: dict) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"id": event_id, "object": "event", "type": f"payment_intent.{intent['status']}",
                       "data": {"object": {"object": "payment_intent", **intent}}}).encode()
    return body, {"Stripe-Signature": stripe_signature_header(body, SECRET, int(time.time())),
                  "Content-Type": "application/json"}


@pytest.mark.parametrize("order", [("succeeded", "canceled", "processing"), ("canceled", "processing", "succeeded")])
async def test_snapshots_in_any_order_end_confirmed_with_one_credit(env, order):
    """A stale `processing` or a `canceled` racing the payment, before or after `succeeded`:
    the status is the highest one seen and the wallet is credited once."""
    auth = await sign_up(env.client)
    created = await start_topup(env, auth, 3300)
    base = {"id": created["intent"]["provider_intent_id"], "amount": 3300, "currency": "npr",
            "metadata": {"intent_id": created["intent"]["intent_id"]}}
    for n, status in enumerate(order):
        received = 3300 if status == "succeeded" else 0
        body, headers = signed_event(f"evt_order_{n}", {**base, "status": status, "amount_received": received})
        response = await env.client.post("/api/payment/webhook/stripe", content=body, headers=headers)
        assert response.status_code == 200, response.text
    status = (await env.client.get(f"/api/payment/status/{created['intent']['intent_id']}", headers=auth)).json()
    assert status["intent"]["status"] == "confirmed" and status["webhook_events"] == 3
    assert await balance(env, auth) == 3300 and await env.count(Transaction) == 1


# --- refunds the provider reports (webhooks, reconciliation), whoever started them ----------------


async def user_of(env: Env, transaction_id: str) -> uuid.UUID:
    async with env.services.readonly() as session:
        return (await session.get(Transaction, uuid.UUID(transaction_id))).user_id


async def test_a_refund_via_the_api_then_its_webhook_three_times_reverses_once(env):
    env.webhook(WebhookOptions(duplicates=2, shuffle=True, delay_ms=(0, 100), concurrency=3))
    auth = await sign_up(env.client)
    status = await topped_up(env, auth, 5000)
    refund = await env.client.post(f"/api/payment/refund/{status['transaction_id']}", headers=auth, json={"amount_minor": 2000})
    assert refund.status_code == 201 and refund.json()["status"] == "succeeded", refund.text
    await env.emu.wait_for_deliveries_async(timeout_s=20)
    refund_events = [d for d in env.emu.deliveries if d.ok and d.event_type in ("refund.created", "charge.refunded")]
    assert len(refund_events) == 6  # two refund events, three copies each
    assert await env.count(LedgerTransfer, LedgerTransfer.kind == "refund") == 1
    assert await env.count(Refund) == 1 and await balance(env, auth) == 3000
    over = await env.client.post(f"/api/payment/refund/{status['transaction_id']}", headers=auth, json={"amount_minor": 3001})
    assert over.status_code == 409 and over.json()["error"] == "exceeds_refundable" and over.json()["refundable_minor"] == 3000
    assert (await flows.reconcile(env.services, env.gateway))["refunds_applied"] == 0


async def test_a_refund_made_in_the_dashboard_is_applied_once_and_counts_against_the_api(env):
    env.webhook(WebhookOptions(duplicates=2, shuffle=True, delay_ms=(0, 100), concurrency=3))
    auth = await sign_up(env.client)
    status = await topped_up(env, auth, 5000)
    # Someone refunds 1500 in the Stripe dashboard: no idempotency key of ours, no metadata.
    provider_refund = await env.gateway.refund(status["intent"]["provider_intent_id"], 1500, "dashboard-1")
    await env.emu.wait_for_deliveries_async(timeout_s=20)
    assert await balance(env, auth) == 3500
    assert await env.count(LedgerTransfer, LedgerTransfer.kind == "refund") == 1
    async with env.services.readonly() as session:
        row = (await session.execute(select(Refund))).scalar_one()
        txn = await session.get(Transaction, uuid.UUID(status["transaction_id"]))
    assert (row.provider_refund_id, row.status, row.amount_minor, txn.refunded_minor) == (provider_refund, "succeeded", 1500, 1500)
    # The API sees what the dashboard refunded: only the rest can still be refunded.
    over = await env.client.post(f"/api/payment/refund/{status['transaction_id']}", headers=auth, json={"amount_minor": 3501})
    assert over.status_code == 409 and over.json()["refundable_minor"] == 3500
    rest = await env.client.post(f"/api/payment/refund/{status['transaction_id']}", headers=auth, json={})
    assert rest.status_code == 201 and rest.json()["amount_minor"] == 3500
    await env.emu.wait_for_deliveries_async(timeout_s=20)
    assert await balance(env, auth) == 0 and await env.count(LedgerTransfer, LedgerTransfer.kind == "refund") == 2
    intent = (await env.client.get(f"/api/payment/status/{status['intent']['intent_id']}", headers=auth)).json()["intent"]
    assert intent["status"] == "refunded"
    async with env.services.readonly() as session:
        assert await ledger_discrepancies(session) == []


async def test_reconciliation_applies_a_dashboard_refund_whose_webhook_was_missed(env):
    auth = await sign_up(env.client)
    status = await topped_up(env, auth, 5000)
    user_id = await user_of(env, status["transaction_id"])
    # The wallet spends most of it meanwhile; the provider's refund is real money gone all the same.
    assert (await env.services.runtime.call("wallet", str(user_id), "TestSpend", {"amount_minor": 4000}))["ok"]
    await env.gateway.refund(status["intent"]["provider_intent_id"], 2500, "dashboard-2")
    assert await balance(env, auth) == 1000  # no webhook endpoint: nothing known yet
    report = await flows.reconcile(env.services, env.gateway)
    assert report["refunds_applied"] == 1
    assert (await flows.reconcile(env.services, env.gateway))["refunds_applied"] == 0
    assert await balance(env, auth) == 0  # what was left; the other 1500 is the platform's loss
    assert await env.count(LedgerTransfer, LedgerTransfer.kind == "refund_shortfall", LedgerTransfer.amount_minor == 1500) == 1
    async with env.services.readonly() as session:
        assert await ledger_discrepancies(session) == []
        assert (await session.get(Transaction, uuid.UUID(status["transaction_id"]))).refunded_minor == 2500


# --- rentals paid by card -------------------------------------------------------------------------


@pytest.fixture
async def listener(env):
    """The payment side's listener, as `run_payment_jobs` runs it (with no periodic sweeps)."""
    ready = asyncio.Event()
    task = asyncio.create_task(flows.run_payment_listener(env.services, env.gateway, ready))
    await ready.wait()
    yield task
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def rental_world(env: Env, *, banks: int = 1, price_minor: int = 3000) -> dict[str, Any]:
    serial = uuid.uuid4().hex[:10]
    async with env.services.sessions.begin() as session:
        station = Station(serial=serial, name="s", latitude=27.7, longitude=85.3, status="online", slot_count=2)
        package = RentalPackage(code=uuid.uuid4().hex[:10], name="p", duration_minutes=60, price_minor=price_minor, currency="NPR",
                                grace_minutes=5, late_fee_per_hour_minor=1000, late_fee_daily_cap_minor=20000, max_duration_minutes=1440)
        session.add_all([station, package])
        await session.flush()
        bank_ids = []
        for number in range(1, banks + 1):
            bank = PowerBank(serial=f"{serial}-B{number}", charge_percent=100, status="in_slot", currency="NPR", station_id=station.id)
            session.add(bank)
            await session.flush()
            session.add(StationSlot(station_id=station.id, slot_number=number, status="occupied", power_bank_id=bank.id))
            bank_ids.append(bank.id)
        if not banks:
            session.add(StationSlot(station_id=station.id, slot_number=1, status="empty"))
    return {"serial": serial, "station_id": station.id, "package_id": str(package.id), "bank_ids": bank_ids}


async def start_card_rental(env: Env, auth, world, key="card-1"):
    return await env.client.post("/api/rentals/start", headers=auth, json={
        "station_sn": world["serial"], "package_id": world["package_id"], "payment_mode": "card", "idempotency_key": key})


async def eventually(check, timeout_s: float = 10.0):
    for _ in range(int(timeout_s / 0.05)):
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    return await check()


async def rental_row(env: Env, rental_id) -> Rental:
    async with env.services.readonly() as session:
        return await session.get(Rental, uuid.UUID(str(rental_id)))


async def out_and_back(env: Env, world, rental_id: str, *, minutes_out: float) -> None:
    """The station reports the bank out, then (`minutes_out` later) back."""
    runtime = env.services.runtime
    ejected = {"power_bank_id": str(world["bank_ids"][0]), "slot_number": 1}
    assert (await runtime.call("rental", rental_id, "BankEjected", ejected, f"ejected:{rental_id}"))["ok"]
    async with env.services.sessions.begin() as session:
        (await session.get(Rental, uuid.UUID(rental_id))).started_at = utcnow() - timedelta(minutes=minutes_out)
    returned = {"returned_at": utcnow().isoformat(), "station_id": str(world["station_id"])}
    assert (await runtime.call("rental", rental_id, "BankReturned", returned, f"returned:{rental_id}"))["ok"]


async def test_a_card_rental_holds_the_card_then_captures_the_fee_without_touching_the_wallet(env, listener):
    auth = await sign_up(env.client)
    await topped_up(env, auth, 5000, save_card=True)
    world = await rental_world(env)
    started = await start_card_rental(env, auth, world)
    assert started.status_code == 202, started.text  # held, ejecting: the station never answers here
    rental_id = started.json()["id"]
    rental = await rental_row(env, rental_id)
    async with env.services.readonly() as session:
        hold = await session.get(PaymentIntent, rental.card_intent_id)
    assert (rental.payment_mode, rental.status, hold.status, hold.amount_minor) == ("card", "ejecting", "preauth", 3000)
    assert rental_id in hold.idempotency_key
    wallet = (await env.client.get("/api/user/wallet", headers=auth)).json()
    assert (wallet["balance_minor"], wallet["held_minor"]) == (5000, 0)
    again = await start_card_rental(env, auth, world)  # a retried tap: the same rental, the same hold
    assert again.json()["id"] == rental_id
    assert await env.count(PaymentIntent, PaymentIntent.purpose == "rental_hold") == 1
    await out_and_back(env, world, rental_id, minutes_out=30)
    rental = await eventually(lambda: _settled(env, rental_id))
    assert (rental.status, rental.fee_minor, rental.charged_minor, rental.due_minor) == ("completed", 3000, 3000, 0)
    provider = await env.gateway.retrieve(hold.provider_intent_id)
    assert (provider.status, provider.amount_received_minor) == ("succeeded", 3000)
    assert await balance(env, auth) == 5000  # the card paid
    history = (await env.client.get("/api/user/transactions", headers=auth)).json()["items"]
    assert sorted((t["type"], t["amount_minor"]) for t in history) == [("rental", 3000), ("topup", 5000)]
    assert (await env.client.get("/api/user/wallet", headers=auth)).json()["points"] == 10  # timely return
    assert await env.count(LedgerTransfer, LedgerTransfer.kind == "rental_card_charge") == 1
    assert await flows.card_rentals_sweep(env.services, env.gateway) == 0
    async with env.services.readonly() as session:
        assert await ledger_discrepancies(session) == []


async def _settled(env: Env, rental_id) -> Rental | None:
    rental = await rental_row(env, rental_id)
    return rental if rental.status in ("completed", "lost") and rental.charged_minor + rental.due_minor == rental.fee_minor else None


async def test_a_late_card_rental_captures_the_hold_and_leaves_the_rest_as_a_due(env):
    # No listener: the scheduler's sweep alone must settle it.
    auth = await sign_up(env.client)
    await topped_up(env, auth, 5000, save_card=True)
    world = await rental_world(env)
    rental_id = (await start_card_rental(env, auth, world)).json()["id"]
    await out_and_back(env, world, rental_id, minutes_out=190)  # 3 started hours late: 3000 + 3 * 1000
    assert await flows.card_rentals_sweep(env.services, env.gateway) == 1
    assert await flows.card_rentals_sweep(env.services, env.gateway) == 0
    rental = await rental_row(env, rental_id)
    assert (rental.fee_minor, rental.charged_minor, rental.due_minor) == (6000, 3000, 3000)
    async with env.services.readonly() as session:
        hold = await session.get(PaymentIntent, rental.card_intent_id)
    assert (hold.status, hold.amount_received_minor) == ("confirmed", 3000)
    paid = await env.client.post(f"/api/rentals/{rental_id}/pay-due", headers=auth, json={"payment_mode": "wallet_only"})
    assert paid.status_code == 200, paid.text
    rental = await eventually(lambda: _due_paid(env, rental_id))
    assert (rental.charged_minor, rental.due_minor) == (6000, 0) and await balance(env, auth) == 2000


async def _due_paid(env: Env, rental_id) -> Rental | None:
    rental = await rental_row(env, rental_id)
    return rental if rental.due_minor == 0 else None


async def test_a_card_rental_that_fails_to_start_releases_the_hold(env, listener):
    auth = await sign_up(env.client)
    await topped_up(env, auth, 5000, save_card=True)
    world = await rental_world(env, banks=0)
    refused = await start_card_rental(env, auth, world)
    assert refused.status_code == 409 and refused.json()["error"] == "no_bank_available", refused.text
    rental = await rental_row(env, refused.json()["rental"]["id"])

    async def released():
        async with env.services.readonly() as session:
            intent = await session.get(PaymentIntent, rental.card_intent_id)
        return intent if intent.status == "rejected" else None

    intent = await eventually(released)
    assert intent is not None and (await env.gateway.retrieve(intent.provider_intent_id)).status == "canceled"
    assert await env.count(Transaction, Transaction.type == "rental") == 0 and await balance(env, auth) == 5000


async def test_a_card_rental_refused_for_unpaid_dues_releases_the_hold(env, listener):
    auth = await sign_up(env.client)
    status = await topped_up(env, auth, 5000, save_card=True)
    world = await rental_world(env)
    async with env.services.sessions.begin() as session:
        session.add(Rental(user_id=await user_of(env, status["transaction_id"]), station_id=world["station_id"],
                           package_id=uuid.UUID(world["package_id"]), currency="NPR", status="completed",
                           fee_minor=100, due_minor=100))
    refused = await start_card_rental(env, auth, world)
    assert refused.status_code == 409 and refused.json()["error"] == "unpaid_dues", refused.text
    rental = await rental_row(env, refused.json()["rental"]["id"])

    async def released():
        async with env.services.readonly() as session:
            return (await session.get(PaymentIntent, rental.card_intent_id)).status == "rejected"

    assert await eventually(released)


async def test_a_card_rental_without_a_saved_card_is_refused_and_writes_nothing(env):
    auth = await sign_up(env.client)
    world = await rental_world(env)
    refused = await start_card_rental(env, auth, world)
    assert refused.status_code == 409 and refused.json()["error"] == "no_saved_card", refused.text
    bad = await env.client.post("/api/rentals/start", headers=auth, json={
        "station_sn": world["serial"], "package_id": world["package_id"], "payment_mode": "cash"})
    assert bad.status_code == 400
    assert await env.count(Rental) == 0 and await env.count(PaymentIntent) == 0


# --- auto-refill the moment a debit crosses the threshold -----------------------------------------


async def test_a_debit_below_the_threshold_starts_one_refill_at_once(env, listener):
    auth = await sign_up(env.client)
    status = await topped_up(env, auth, 5000, save_card=True)
    user_id = await user_of(env, status["transaction_id"])
    enabled = await env.client.put("/api/payment/auto-refill", headers=auth,
                                   json={"enabled": True, "threshold_minor": 2000, "amount_minor": 3000})
    assert enabled.status_code == 200, enabled.text
    spend = {"currency": "NPR", "amount_minor": 2500, "transfer_id": str(uuid.uuid4())}
    assert (await env.services.runtime.call("wallet", str(user_id), "SpendWallet", spend))["ok"]
    assert await env.count(PaymentIntent, PaymentIntent.purpose == "auto_refill") == 0  # 2500 left: not below
    for _ in range(2):  # two debits below the threshold before the refill lands: still one refill
        spend = {"currency": "NPR", "amount_minor": 1000, "transfer_id": str(uuid.uuid4())}
        assert (await env.services.runtime.call("wallet", str(user_id), "SpendWallet", spend))["ok"]
    assert await eventually(lambda: _balance_is(env, auth, 500 + 3000))
    await asyncio.sleep(0.2)
    assert await env.count(PaymentIntent, PaymentIntent.purpose == "auto_refill") == 1
    assert await balance(env, auth) == 3500


async def _balance_is(env: Env, auth, expected: int) -> bool:
    return await balance(env, auth) == expected

"""The Stripe emulator driven by the real `stripe` SDK (sync and async), and its webhooks
verified by the SDK's own signature check. If the SDK accepts what the emulator says, the
backend will too; where the emulator departs from Stripe, docs/payments.md says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import stripe
from litestar import Litestar, Request, post

from powerbank.http.testing import serve
from powerbank.simulators.stripe_emulator import (
    StripeEmulator,
    StripeHTTPXClient,
    WebhookOptions,
    parse_form,
    stripe_signature_header,
)
from powerbank.simulators.stripe_state import StripeError, StripeState, params_fingerprint

ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_emulator_test"


class Receiver:
    """A webhook endpoint on its own thread: records every POST and answers with
    `status_for(event_id, nth_time_seen)`."""

    def __init__(self, status_for=lambda event_id, nth: 200) -> None:
        self.status_for = status_for
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                event_id = json.loads(body)["id"]
                with receiver._lock:
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    receiver._seen[event_id] = receiver._seen.get(event_id, 0) + 1
                    status = receiver.status_for(event_id, receiver._seen[event_id])
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def events(self, secret: str = SECRET) -> list[stripe.Event]:
        """Every delivery, verified as a backend verifies it."""
        return [stripe.Webhook.construct_event(body, headers["stripe-signature"], secret) for headers, body in self.received]


@contextmanager
def sync_client(emulator: StripeEmulator):
    http = stripe.RequestsClient()
    try:
        yield emulator.stripe_client(http_client=http)
    finally:
        http.close()


@pytest.fixture
def emulator():
    with StripeEmulator(seed=1) as emu:
        yield emu


@pytest.fixture
def client(emulator):
    with sync_client(emulator) as stripe_client:
        yield stripe_client


def visa_payment(client, **params):
    return client.v1.payment_intents.create(params={"amount": 1000, "currency": "usd", "payment_method": "pm_card_visa",
                                                    "confirm": True, **params})


# --- payment intents ---------------------------------------------------------------------

def test_an_intent_goes_through_every_status_to_succeeded(client, emulator):
    intent = client.v1.payment_intents.create(params={"amount": 1500, "currency": "usd", "metadata": {"topup": "t1"}})
    assert isinstance(intent, stripe.PaymentIntent)
    assert (intent.status, intent.amount, intent.currency, intent.metadata["topup"]) == ("requires_payment_method", 1500, "usd", "t1")
    intent = client.v1.payment_intents.update(intent.id, params={"payment_method": "pm_card_authenticationRequired"})
    assert intent.status == "requires_confirmation"
    intent = client.v1.payment_intents.confirm(intent.id)
    assert intent.status == "requires_action" and intent.next_action.type == "use_stripe_sdk"
    with pytest.raises(stripe.InvalidRequestError) as capture_early:
        client.v1.payment_intents.capture(intent.id)
    assert capture_early.value.code == "payment_intent_unexpected_state"

    completed = emulator.complete_action(intent.id)
    assert completed["status"] == "succeeded"
    intent = client.v1.payment_intents.retrieve(intent.id, params={"expand": ["latest_charge"]})
    assert (intent.status, intent.amount_received, intent.amount_capturable) == ("succeeded", 1500, 0)
    assert isinstance(intent.latest_charge, stripe.Charge)
    assert (intent.latest_charge.amount_captured, intent.latest_charge.payment_intent) == (1500, intent.id)
    types = [e["type"] for e in emulator.events if e["data"]["object"].get("id") == intent.id]
    assert types == ["payment_intent.created", "payment_intent.requires_action", "payment_intent.succeeded"]
    with pytest.raises(stripe.InvalidRequestError, match="already succeeded"):
        client.v1.payment_intents.confirm(intent.id)


def test_failed_authentication_asks_for_another_payment_method(client, emulator):
    intent = client.v1.payment_intents.create(params={"amount": 700, "currency": "eur", "payment_method": "pm_card_threeDSecure2Required",
                                                      "confirm": True})
    assert intent.status == "requires_action"
    failed = emulator.complete_action(intent.id, succeed=False)
    assert failed["status"] == "requires_payment_method"
    assert failed["last_payment_error"]["code"] == "payment_intent_authentication_failure"
    with pytest.raises(StripeError, match="requires_action"):
        emulator.complete_action(intent.id)
    intent = client.v1.payment_intents.confirm(intent.id, params={"payment_method": "pm_card_visa"})
    assert intent.status == "succeeded" and intent.last_payment_error is None


def test_declines_are_card_errors_with_the_intent_inside(client):
    with pytest.raises(stripe.CardError) as declined:
        client.v1.payment_intents.create(params={"amount": 1000, "currency": "usd", "payment_method": "pm_card_chargeDeclined",
                                                 "confirm": True})
    error = declined.value
    assert (error.http_status, error.code, error.error.decline_code) == (402, "card_declined", "generic_decline")
    intent_id = error.error.payment_intent.id
    intent = client.v1.payment_intents.retrieve(intent_id)
    assert intent.status == "requires_payment_method"
    assert intent.last_payment_error.code == "card_declined"
    assert client.v1.charges.retrieve(intent.latest_charge).status == "failed"

    with pytest.raises(stripe.CardError) as poor:
        client.v1.payment_intents.confirm(intent_id, params={"payment_method": "pm_card_insufficientFunds"})
    assert poor.value.error.decline_code == "insufficient_funds"
    intent = client.v1.payment_intents.confirm(intent_id, params={"payment_method": "pm_card_visa"})
    assert (intent.status, intent.amount_received, intent.last_payment_error) == ("succeeded", 1000, None)


def test_manual_capture_partial_then_refunds_up_to_the_captured_amount(client, emulator):
    hold = visa_payment(client, capture_method="manual")
    assert (hold.status, hold.amount_capturable, hold.amount_received) == ("requires_capture", 1000, 0)
    with pytest.raises(stripe.InvalidRequestError) as too_much:
        client.v1.payment_intents.capture(hold.id, params={"amount_to_capture": 1001})
    assert (too_much.value.code, too_much.value.param) == ("amount_too_large", "amount_to_capture")
    with pytest.raises(stripe.InvalidRequestError) as not_yet:
        client.v1.refunds.create(params={"payment_intent": hold.id})
    assert not_yet.value.code == "charge_not_refundable"

    captured = client.v1.payment_intents.capture(hold.id, params={"amount_to_capture": 600})
    assert (captured.status, captured.amount_received, captured.amount_capturable) == ("succeeded", 600, 0)
    first = client.v1.refunds.create(params={"payment_intent": hold.id, "amount": 200, "reason": "requested_by_customer"})
    assert isinstance(first, stripe.Refund)
    assert (first.status, first.amount, first.payment_intent) == ("succeeded", 200, hold.id)
    with pytest.raises(stripe.InvalidRequestError) as over:
        client.v1.refunds.create(params={"payment_intent": hold.id, "amount": 401})
    assert (over.value.http_status, over.value.code, over.value.param) == (400, "amount_too_large", "amount")
    rest = client.v1.refunds.create(params={"payment_intent": hold.id})
    assert rest.amount == 400
    with pytest.raises(stripe.InvalidRequestError) as again:
        client.v1.refunds.create(params={"payment_intent": hold.id, "amount": 1})
    assert again.value.code == "charge_already_refunded"

    charge = client.v1.charges.retrieve(captured.latest_charge)
    assert (charge.amount_captured, charge.amount_refunded, charge.refunded) == (600, 600, True)
    refunds = client.v1.refunds.list(params={"payment_intent": hold.id})
    assert [r.amount for r in refunds.data] == [400, 200]
    assert client.v1.refunds.retrieve(first.id).amount == 200
    types = [e["type"] for e in emulator.events]
    assert types.count("refund.created") == 2 and types.count("charge.refunded") == 2
    assert "payment_intent.amount_capturable_updated" in types and "charge.captured" in types


def test_cancel_releases_a_hold_and_only_open_intents_cancel(client, emulator):
    hold = visa_payment(client, capture_method="manual")
    canceled = client.v1.payment_intents.cancel(hold.id, params={"cancellation_reason": "abandoned"})
    assert (canceled.status, canceled.amount_capturable, canceled.cancellation_reason) == ("canceled", 0, "abandoned")
    assert canceled.canceled_at is not None
    with pytest.raises(stripe.InvalidRequestError) as capture:
        client.v1.payment_intents.capture(hold.id)
    assert capture.value.code == "payment_intent_unexpected_state"
    paid = visa_payment(client)
    with pytest.raises(stripe.InvalidRequestError, match="status of succeeded"):
        client.v1.payment_intents.cancel(paid.id)
    assert emulator.events[-1]["type"] != "payment_intent.canceled"
    assert [e["type"] for e in emulator.events].count("payment_intent.canceled") == 1


def test_processing_intents_settle_after_the_delay(emulator):
    with StripeEmulator(seed=2, processing_delay_ms=30) as emu, sync_client(emu) as client:
        intent = visa_payment(client)
        assert intent.status == "processing"
        emu.wait_for_deliveries(timeout_s=5)
        assert client.v1.payment_intents.retrieve(intent.id).status == "succeeded"
        manual = visa_payment(client)
        assert emu.settle(manual.id)["status"] == "succeeded"  # before its timer; the timer then does nothing
        emu.wait_for_deliveries(timeout_s=5)
        types = [e["type"] for e in emu.events if e["data"]["object"].get("id") == manual.id]
        assert types == ["payment_intent.created", "payment_intent.processing", "payment_intent.succeeded"]


# --- customers and saved cards -------------------------------------------------------------

def test_saved_cards_charge_off_session_and_follow_stripes_rules(client, emulator):
    customer = client.v1.customers.create(params={"email": "rider@example.com", "name": "Rider", "metadata": {"user_id": "u1"}})
    assert isinstance(customer, stripe.Customer) and customer.metadata["user_id"] == "u1"
    card = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    assert isinstance(card, stripe.PaymentMethod)
    assert card.id.startswith("pm_") and card.id != "pm_card_visa" and card.customer == customer.id
    assert (card.card.brand, card.card.last4) == ("visa", "4242")
    customer = client.v1.customers.update(customer.id, params={"invoice_settings": {"default_payment_method": card.id},
                                                              "metadata": {"user_id": "", "tier": "gold"}})
    assert customer.invoice_settings.default_payment_method == card.id
    expanded = client.v1.customers.retrieve(customer.id, params={"expand": ["invoice_settings.default_payment_method"]})
    assert expanded.invoice_settings.default_payment_method.card.last4 == "4242"
    assert customer.metadata.to_dict() == {"tier": "gold"}

    refill = client.v1.payment_intents.create(params={"amount": 2000, "currency": "usd", "customer": customer.id,
                                                      "payment_method": card.id, "confirm": True, "off_session": True})
    assert refill.status == "succeeded"
    with pytest.raises(stripe.InvalidRequestError) as foreign:
        client.v1.payment_intents.create(params={"amount": 2000, "currency": "usd", "payment_method": card.id, "confirm": True})
    assert foreign.value.code == "payment_method_unexpected_state"

    with pytest.raises(stripe.CardError) as refused:
        client.v1.payment_methods.attach("pm_card_chargeDeclined", params={"customer": customer.id})
    assert refused.value.code == "card_declined"
    failing = client.v1.payment_methods.attach("pm_card_chargeCustomerFail", params={"customer": customer.id})
    with pytest.raises(stripe.CardError):
        client.v1.payment_intents.create(params={"amount": 2000, "currency": "usd", "customer": customer.id,
                                                 "payment_method": failing.id, "confirm": True, "off_session": True})
    strong = client.v1.payment_methods.attach("pm_card_authenticationRequired", params={"customer": customer.id})
    with pytest.raises(stripe.CardError) as needs_customer:
        client.v1.payment_intents.create(params={"amount": 2000, "currency": "usd", "customer": customer.id,
                                                 "payment_method": strong.id, "confirm": True, "off_session": True})
    assert needs_customer.value.code == "authentication_required"
    assert needs_customer.value.error.payment_intent.status == "requires_payment_method"

    saved = client.v1.payment_intents.create(params={"amount": 500, "currency": "usd", "customer": customer.id,
                                                     "payment_method": "pm_card_mastercard", "confirm": True,
                                                     "setup_future_usage": "off_session"})
    listed = client.v1.customers.payment_methods.list(customer.id)
    assert {m.id for m in listed.data} == {card.id, failing.id, strong.id, saved.payment_method}
    assert client.v1.payment_methods.list(params={"customer": customer.id, "type": "card"}).data[0].id == saved.payment_method

    detached = client.v1.payment_methods.detach(card.id)
    assert detached.customer is None
    assert client.v1.customers.retrieve(customer.id).invoice_settings.default_payment_method is None
    with pytest.raises(stripe.InvalidRequestError, match="may not be used again"):
        client.v1.payment_intents.create(params={"amount": 500, "currency": "usd", "payment_method": card.id})
    attached = [e for e in emulator.events if e["type"] == "payment_method.attached"]
    assert {e["data"]["object"]["id"] for e in attached} == {card.id, failing.id, strong.id, saved.payment_method}
    assert [e["type"] for e in emulator.events][:1] == ["customer.created"]


def test_a_one_off_card_is_spent_after_a_payment(client):
    method = client.v1.payment_methods.create(params={"type": "card", "card": {"token": "tok_visa"}})
    assert visa_payment(client, payment_method=method.id).status == "succeeded"
    with pytest.raises(stripe.InvalidRequestError) as spent:
        visa_payment(client, payment_method=method.id)
    assert (spent.value.code, spent.value.param) == ("payment_method_unexpected_state", "payment_method")


def test_customers_list_filter_and_delete(client):
    ids = [client.v1.customers.create(params={"email": f"c{n}@example.com"}).id for n in range(3)]
    assert [c.id for c in client.v1.customers.list().data] == ids[::-1]
    assert [c.id for c in client.v1.customers.list(params={"email": "c1@example.com"}).data] == [ids[1]]
    deleted = client.v1.customers.delete(ids[0])
    assert deleted.deleted is True
    with pytest.raises(stripe.InvalidRequestError) as gone:
        client.v1.customers.retrieve(ids[0])
    assert (gone.value.http_status, gone.value.code) == (404, "resource_missing")


# --- validation, authentication, idempotency ------------------------------------------------

@pytest.mark.parametrize("params, param, code", [
    ({"currency": "usd"}, "amount", "parameter_missing"),
    ({"amount": 0, "currency": "usd"}, "amount", "parameter_invalid_integer"),
    ({"amount": -500, "currency": "usd"}, "amount", "parameter_invalid_integer"),
    ({"amount": 10.5, "currency": "usd"}, "amount", "parameter_invalid_integer"),
    ({"amount": "1e3", "currency": "usd"}, "amount", "parameter_invalid_integer"),
    ({"amount": 49, "currency": "usd"}, "amount", "amount_too_small"),
    ({"amount": 100_000_000, "currency": "usd"}, "amount", "amount_too_large"),
    ({"amount": 1000}, "currency", "parameter_missing"),
    ({"amount": 1000, "currency": "xyz"}, "currency", None),
    ({"amount": 1000, "currency": "usd", "customer": "cus_nobody"}, "customer", "resource_missing"),
    ({"amount": 1000, "currency": "usd", "payment_method": "pm_nothing"}, "payment_method", "resource_missing"),
    ({"amount": 1000, "currency": "usd", "capture_method": "later"}, "capture_method", "parameter_invalid_string"),
    ({"amount": 1000, "currency": "usd", "off_session": True}, "off_session", None),
    ({"amount": 1000, "currency": "usd", "confirm": True}, "payment_method", "payment_intent_unexpected_state"),
    ({"amount": 1000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True, "expand": ["amount"]}, "expand", None),
    ({"amount": 1000, "currency": "usd", "amout": 5}, "amout", "parameter_unknown"),
])
def test_bad_intents_are_refused_like_stripe_and_write_nothing(client, emulator, params, param, code):
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.payment_intents.create(params=params)
    assert (refused.value.http_status, refused.value.param, refused.value.code) == (400, param, code)
    assert client.v1.payment_intents.list().data == []
    assert emulator.events == []


def test_currencies_are_case_insensitive_and_come_back_lowercase(client):
    intent = client.v1.payment_intents.create(params={"amount": 5000, "currency": "NPR"})
    assert intent.currency == "npr"  # no published minimum for npr, so none is enforced
    assert client.v1.payment_intents.create(params={"amount": 50, "currency": "jpy"}).amount == 50


def test_unknown_ids_are_404_resource_missing(client):
    for call in (lambda: client.v1.payment_intents.retrieve("pi_missing"), lambda: client.v1.refunds.retrieve("re_missing"),
                 lambda: client.v1.events.retrieve("evt_missing"), lambda: client.v1.payment_intents.capture("pi_missing")):
        with pytest.raises(stripe.InvalidRequestError) as missing:
            call()
        assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")


def test_a_wrong_or_missing_api_key_is_401(emulator):
    http = stripe.RequestsClient()
    try:
        wrong = stripe.StripeClient("sk_test_wrong_key_123", base_addresses={"api": emulator.api_base}, http_client=http)
        with pytest.raises(stripe.AuthenticationError) as refused:
            wrong.v1.customers.list()
        assert refused.value.http_status == 401 and "sk_test_" in str(refused.value) and "wrong_key" not in str(refused.value)
    finally:
        http.close()
    answer = httpx.get(f"{emulator.api_base}/v1/customers")
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "invalid_request_error" and "API key" in answer.json()["error"]["message"]
    basic = httpx.get(f"{emulator.api_base}/v1/customers", auth=(emulator.api_key, ""))
    assert basic.status_code == 200 and basic.json()["object"] == "list"


def test_unknown_urls_answer_in_stripes_shape(emulator):
    answer = httpx.get(f"{emulator.api_base}/v1/subscriptions", headers={"Authorization": f"Bearer {emulator.api_key}"})
    assert answer.status_code == 404 and "Unrecognized request URL" in answer.json()["error"]["message"]


def test_idempotency_keys_replay_the_first_answer_and_refuse_other_params(client, emulator):
    params = {"amount": 1200, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
    first = client.v1.payment_intents.create(params=params, options={"idempotency_key": "topup-1"})
    again = client.v1.payment_intents.create(params=dict(reversed(list(params.items()))), options={"idempotency_key": "topup-1"})
    assert again.id == first.id
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(client.v1.payment_intents.list().data) == 1
    assert [e["type"] for e in emulator.events].count("payment_intent.succeeded") == 1
    assert emulator.events[0]["request"]["idempotency_key"] == "topup-1"

    with pytest.raises(stripe.IdempotencyError) as other:
        client.v1.payment_intents.create(params={**params, "amount": 1300}, options={"idempotency_key": "topup-1"})
    assert other.value.http_status == 400 and "topup-1" in str(other.value)
    with pytest.raises(stripe.IdempotencyError):
        client.v1.customers.create(options={"idempotency_key": "topup-1"})

    # a declined payment started executing, so its 402 is replayed (no second charge) ...
    declined = {**params, "payment_method": "pm_card_chargeDeclined"}
    errors = []
    for _ in range(2):
        with pytest.raises(stripe.CardError) as error:
            client.v1.payment_intents.create(params=declined, options={"idempotency_key": "topup-2"})
        errors.append(error.value)
    assert errors[0].error.payment_intent.id == errors[1].error.payment_intent.id
    assert [e["type"] for e in emulator.events].count("charge.failed") == 1
    # ... while a request refused by validation may be fixed and sent again with its key
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.create(params={**params, "amount": 0}, options={"idempotency_key": "topup-3"})
    assert client.v1.payment_intents.create(params=params, options={"idempotency_key": "topup-3"}).status == "succeeded"


# --- lists and events ---------------------------------------------------------------------

def test_intents_list_newest_first_with_cursors_and_filters(client):
    customer = client.v1.customers.create()
    ids = [visa_payment(client, customer=customer.id, amount=1000 + n).id for n in range(5)]
    visa_payment(client)  # someone else's
    page = client.v1.payment_intents.list(params={"customer": customer.id, "limit": 2})
    assert [i.id for i in page.data] == ids[:2:-1][:2] and page.has_more
    assert [i.id for i in page.auto_paging_iter()] == ids[::-1]
    after = client.v1.payment_intents.list(params={"customer": customer.id, "starting_after": ids[1]})
    assert [i.id for i in after.data] == [ids[0]] and not after.has_more
    before = client.v1.payment_intents.list(params={"customer": customer.id, "ending_before": ids[1], "limit": 2})
    assert [i.id for i in before.data] == [ids[3], ids[2]] and before.has_more
    created = client.v1.payment_intents.retrieve(ids[0]).created
    assert len(client.v1.payment_intents.list(params={"created": {"gte": created}, "limit": 100}).data) == 6
    assert client.v1.payment_intents.list(params={"created": {"gt": created + 3600}}).data == []
    with pytest.raises(stripe.InvalidRequestError) as too_big:
        client.v1.payment_intents.list(params={"limit": 101})
    assert too_big.value.param == "limit"


def test_events_list_by_type_wildcard_and_time_and_retrieve(client, emulator):
    customer = client.v1.customers.create()
    paid = visa_payment(client, customer=customer.id)
    client.v1.refunds.create(params={"payment_intent": paid.id, "amount": 100})
    succeeded = client.v1.events.list(params={"type": "payment_intent.succeeded"})
    assert [e.data.object.id for e in succeeded.data] == [paid.id]
    assert isinstance(succeeded.data[0], stripe.Event)
    assert isinstance(succeeded.data[0].data.object, stripe.PaymentIntent)
    intents = client.v1.events.list(params={"type": "payment_intent.*"})
    assert [e.type for e in intents.data] == ["payment_intent.succeeded", "payment_intent.created"]
    several = client.v1.events.list(params={"types": ["customer.created", "refund.created"]})
    assert [e.type for e in several.data] == ["refund.created", "customer.created"]
    everything = client.v1.events.list(params={"created": {"gte": emulator.events[0]["created"]}, "limit": 3})
    assert len(everything.data) == 3 and everything.has_more
    assert len(list(everything.auto_paging_iter())) == len(emulator.events) == 6
    assert client.v1.events.list(params={"created": {"gte": int(time.time()) + 3600}}).data == []
    event = client.v1.events.retrieve(succeeded.data[0].id)
    assert event.type == "payment_intent.succeeded" and event.data.object.status == "succeeded"
    assert event.request.id.startswith("req_")


def test_the_module_level_api_works_too(emulator):
    saved = stripe.api_key, stripe.api_base, stripe.default_http_client
    stripe.api_key, stripe.api_base = emulator.api_key, emulator.api_base
    stripe.default_http_client = http = stripe.RequestsClient()
    try:
        intent = stripe.PaymentIntent.create(amount=800, currency="usd", payment_method="pm_card_visa", confirm=True)
        assert intent.status == "succeeded"
        assert stripe.PaymentIntent.retrieve(intent.id).amount_received == 800
    finally:
        http.close()
        stripe.api_key, stripe.api_base, stripe.default_http_client = saved


async def test_async_methods_through_httpx():
    async with StripeEmulator(seed=3) as emu:
        http = StripeHTTPXClient()
        client = emu.stripe_client(http_client=http)
        try:
            customer = await client.v1.customers.create_async(params={"email": "async@example.com"})
            hold = await client.v1.payment_intents.create_async(params={
                "amount": 3000, "currency": "usd", "customer": customer.id, "payment_method": "pm_card_visa",
                "capture_method": "manual", "confirm": True})
            assert hold.status == "requires_capture"
            captured = await client.v1.payment_intents.capture_async(hold.id, params={"amount_to_capture": 2500})
            assert (captured.status, captured.amount_received) == ("succeeded", 2500)
            refund = await client.v1.refunds.create_async(params={"payment_intent": hold.id, "amount": 500})
            assert refund.amount == 500
            with pytest.raises(stripe.InvalidRequestError) as over:
                await client.v1.refunds.create_async(params={"payment_intent": hold.id, "amount": 2001})
            assert over.value.code == "amount_too_large"
            with pytest.raises(stripe.CardError):
                await client.v1.payment_intents.create_async(params={"amount": 3000, "currency": "usd", "confirm": True,
                                                                     "payment_method": "pm_card_chargeDeclined"})
            events = await client.v1.events.list_async(params={"type": "charge.refunded"})
            assert [e.data.object.amount_refunded for e in events.data] == [500]
            intents = [i async for i in (await client.v1.payment_intents.list_async(params={"limit": 1})).auto_paging_iter()]
            assert len(intents) == 2
        finally:
            await http.close_async()


# --- webhooks -----------------------------------------------------------------------------

def test_webhooks_are_signed_so_the_sdk_verifies_them(client, emulator):
    with Receiver() as receiver:
        endpoint = emulator.add_webhook_endpoint(receiver.url, SECRET)
        paid = visa_payment(client)
        emulator.wait_for_deliveries(timeout_s=5)
        verified = receiver.events()
        assert [e.type for e in verified] == ["payment_intent.created", "charge.succeeded", "payment_intent.succeeded"]
        assert [e.id for e in verified] == [e["id"] for e in emulator.events]
        assert verified[-1].data.object.id == paid.id and isinstance(verified[-1].data.object, stripe.PaymentIntent)
        headers, body = receiver.received[0]
        assert headers["content-type"].startswith("application/json")
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(body, headers["stripe-signature"], "whsec_someone_else")
        stale = stripe_signature_header(body, SECRET, int(time.time()) - 600)
        with pytest.raises(stripe.SignatureVerificationError, match="tolerance"):
            stripe.Webhook.construct_event(body, stale, SECRET)
        attempts = emulator.deliveries
        assert [(a.event_id, a.ok, a.attempt, a.copy, a.url) for a in attempts] == [
            (e["id"], True, 1, 0, endpoint.url) for e in emulator.events]


def test_endpoints_receive_only_the_events_they_enable(client, emulator):
    with Receiver() as receiver:
        emulator.add_webhook_endpoint(receiver.url, SECRET, enabled_events=["payment_intent.succeeded", "refund.*"])
        paid = visa_payment(client)
        client.v1.refunds.create(params={"payment_intent": paid.id})
        emulator.wait_for_deliveries(timeout_s=5)
        assert [e.type for e in receiver.events()] == ["payment_intent.succeeded", "refund.created"]


def run_shuffled(seed: int) -> tuple[list[tuple[str, str]], list[dict]]:
    """Three payments held back, then released: 9 events x 3 copies in one seeded shuffle."""
    with Receiver() as receiver:
        options = WebhookOptions(duplicates=2, shuffle=True)
        with StripeEmulator(seed=seed, webhook_url=receiver.url, webhook_secret=SECRET, webhook_options=options) as emu:
            with sync_client(emu) as client:
                emu.hold_webhooks()
                for _ in range(3):
                    visa_payment(client)
                with pytest.raises(TimeoutError, match="held"):
                    emu.wait_for_deliveries(timeout_s=0.05)
                assert receiver.received == []
                emu.release_webhooks()
                emu.wait_for_deliveries(timeout_s=5)
                return [(e.id, e.type) for e in receiver.events()], emu.events


def test_duplicates_and_shuffle_are_reproducible_by_seed():
    delivered, events = run_shuffled(seed=11)
    in_order = [(e["id"], e["type"]) for e in events]
    assert len(events) == 9 and len(delivered) == 27
    assert sorted(delivered) == sorted(in_order * 3)  # every event exactly three times
    first_seen = list(dict.fromkeys(delivered))
    assert first_seen != in_order  # out of order
    assert run_shuffled(seed=11)[0] == delivered  # same seed, same ids, same order
    assert run_shuffled(seed=12)[0] != delivered


def test_duplicate_rate_adds_copies_to_some_events():
    with Receiver() as receiver:
        options = WebhookOptions(duplicate_rate=0.5)
        with StripeEmulator(seed=5, webhook_url=receiver.url, webhook_secret=SECRET, webhook_options=options) as emu:
            with sync_client(emu) as client:
                for _ in range(4):
                    visa_payment(client)
                emu.wait_for_deliveries(timeout_s=5)
                counts = [sum(1 for a in emu.deliveries if a.event_id == e["id"]) for e in emu.events]
    assert set(counts) == {1, 2}


def test_failed_deliveries_are_retried_with_backoff_then_given_up(client, emulator):
    def flaky(event_id, nth):
        return 200 if nth >= 3 else 500

    with Receiver(flaky) as receiver, Receiver(lambda event_id, nth: 503) as down:
        quick = WebhookOptions(retries=3, retry_backoff_ms=20)
        emulator.add_webhook_endpoint(receiver.url, SECRET, options=quick, enabled_events=["payment_intent.succeeded"])
        emulator.add_webhook_endpoint(down.url, SECRET, options=quick, enabled_events=["payment_intent.succeeded"])
        closed = Receiver()  # never started, its port closed: connection refused
        closed.server.server_close()
        emulator.add_webhook_endpoint(closed.url, SECRET, options=WebhookOptions(retries=1, retry_backoff_ms=10),
                                      enabled_events=["payment_intent.succeeded"])
        visa_payment(client)
        emulator.wait_for_deliveries(timeout_s=5)
        by_url = {url: [a for a in emulator.deliveries if a.url == url] for url in (receiver.url, down.url, closed.url)}
    assert [(a.attempt, a.status_code) for a in by_url[receiver.url]] == [(1, 500), (2, 500), (3, 200)]
    assert [(a.attempt, a.status_code) for a in by_url[down.url]] == [(1, 503), (2, 503), (3, 503), (4, 503)]
    refused = by_url[closed.url]
    assert [(a.attempt, a.status_code) for a in refused] == [(1, None), (2, None)] and "ConnectError" in refused[0].error
    gaps_ms = [(b.sent_at_s - a.sent_at_s) * 1000 for a, b in zip(by_url[down.url], by_url[down.url][1:])]
    assert gaps_ms[0] >= 18 and gaps_ms[1] >= 38 and gaps_ms[2] >= 78  # 20, 40, 80 ms backoff


def test_deliveries_wait_their_delay_and_resend_delivers_again(client, emulator):
    with Receiver() as receiver:
        emulator.add_webhook_endpoint(receiver.url, SECRET, options=WebhookOptions(delay_ms=(40, 60)),
                                      enabled_events=["payment_intent.succeeded"])
        started = time.time()
        visa_payment(client)
        emulator.wait_for_deliveries(timeout_s=5)
        assert emulator.deliveries[0].sent_at_s - started >= 0.035
        emulator.resend_event(emulator.deliveries[0].event_id)
        emulator.wait_for_deliveries(timeout_s=5)
        assert [e.id for e in receiver.events()] == [emulator.deliveries[0].event_id] * 2


async def test_a_receiver_on_the_callers_loop_gets_async_settlements():
    """The backend under test usually runs on the test's own loop: deliveries must reach it
    while the test awaits, and `processing` intents succeed later, by webhook."""
    received: list[stripe.Event] = []

    @post("/webhook", status_code=200)
    async def webhook(request: Request) -> None:
        received.append(stripe.Webhook.construct_event(await request.body(), request.headers["stripe-signature"], SECRET))

    async with serve(Litestar([webhook])) as base_url:
        async with StripeEmulator(seed=4, webhook_url=f"{base_url}/webhook", webhook_secret=SECRET,
                                  webhook_options=WebhookOptions(concurrency=4), processing_delay_ms=20) as emu:
            http = StripeHTTPXClient()
            client = emu.stripe_client(http_client=http)
            try:
                intent = await client.v1.payment_intents.create_async(params={
                    "amount": 900, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True})
                assert intent.status == "processing"
                await emu.wait_for_deliveries_async(timeout_s=5)
            finally:
                await http.close_async()
    assert {e.type for e in received} == {"payment_intent.created", "payment_intent.processing", "charge.succeeded",
                                          "payment_intent.succeeded"}


# --- pieces -------------------------------------------------------------------------------

def test_form_parsing_matches_the_sdks_encoding():
    assert parse_form("amount=5&metadata[a]=1&metadata[b]=&expand[0]=x&expand[1]=y&tags[]=p&tags[]=q") == {
        "amount": "5", "metadata": {"a": "1", "b": ""}, "expand": {"0": "x", "1": "y"}, "tags": {"0": "p", "1": "q"}}
    assert parse_form("card%5Btoken%5D=tok_visa") == {"card": {"token": "tok_visa"}}
    with pytest.raises(StripeError):
        parse_form("metadata=1&metadata[a]=2")
    assert params_fingerprint({"a": "1", "b": {"c": "2"}}) == params_fingerprint({"b": {"c": "2"}, "a": "1"})


def test_state_is_reproducible_by_seed_and_clock():
    def run():
        state = StripeState(seed=9, now_s=lambda: 1_700_000_000)
        state.handle("POST", "/v1/payment_intents", {"amount": "500", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"})
        return [(e["id"], e["created"]) for e in state.take_new_events()]

    assert run() == run() and run()[0][1] == 1_700_000_000


def test_the_cli_serves_until_terminated(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    process = subprocess.Popen([sys.executable, "-m", "powerbank.cli", "stripe-emulator", "--port", "0", "--seed", "1",
                                "--webhook-url", "http://127.0.0.1:9/hook", "--webhook-secret", "whsec_cli",
                                "--duplicates", "1", "--delay-ms", "0:5", "--shuffle"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = json.loads(process.stdout.readline())
        assert started["webhook_endpoints"] == [{"url": "http://127.0.0.1:9/hook", "secret": "whsec_cli"}]
        http = stripe.RequestsClient()
        try:
            client = stripe.StripeClient(started["api_key"], base_addresses={"api": started["api_base"]}, http_client=http)
            assert visa_payment(client).status == "succeeded"
        finally:
            http.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert process.stderr.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
